//! The agent's own API: task logs straight from the sandbox (the master proxies `capstan task logs`
//! here).

use crate::Agent;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use capstan_model::TaskId;
use serde::Deserialize;
use std::io::SeekFrom;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

const FOLLOW_POLL: Duration = Duration::from_millis(200);
const CHUNK_BYTES: usize = 64 * 1024;

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/health", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .route("/v1/sandboxes/{task}/logs", get(logs))
        .with_state(agent)
}

fn failure(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(serde_json::json!({"error": {"code": code, "message": message, "details": []}}))).into_response()
}

#[derive(Deserialize)]
struct LogQuery {
    stream: Option<String>,
    follow: Option<bool>,
    tail: Option<u64>,
}

/// Where the last `lines` lines of the file start.
async fn tail_offset(file: &mut tokio::fs::File, lines: u64) -> std::io::Result<u64> {
    let len = file.metadata().await?.len();
    if lines == 0 {
        return Ok(len);
    }
    let mut pos = len;
    let mut seen = 0u64;
    let mut buf = vec![0u8; CHUNK_BYTES];
    // A trailing newline ends the last line; it does not start a new one.
    let mut skip_last_newline = true;
    while pos > 0 {
        let n = (pos as usize).min(CHUNK_BYTES);
        pos -= n as u64;
        file.seek(SeekFrom::Start(pos)).await?;
        file.read_exact(&mut buf[..n]).await?;
        for i in (0..n).rev() {
            if buf[i] == b'\n' {
                if skip_last_newline && pos + i as u64 == len - 1 {
                    continue;
                }
                seen += 1;
                if seen == lines {
                    return Ok(pos + i as u64 + 1);
                }
            }
        }
        skip_last_newline = false;
    }
    Ok(0)
}

async fn logs(State(agent): State<Arc<Agent>>, Path(task): Path<String>, Query(q): Query<LogQuery>) -> Response {
    let task: TaskId = match task.parse() {
        Ok(t) => t,
        Err(e) => return failure(StatusCode::BAD_REQUEST, "bad_request", e),
    };
    let stream = match q.stream.as_deref().unwrap_or("stdout") {
        s @ ("stdout" | "stderr") => s,
        other => {
            return failure(StatusCode::BAD_REQUEST, "bad_request", format!("stream `{other}`: use stdout or stderr"))
        }
    };
    let path = agent.sandbox(task).join(stream);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return failure(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("task {task} has no {stream} on this agent (no sandbox, or it was collected)"),
            )
        }
        Err(e) => {
            return failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot open {}: {e}", path.display()),
            )
        }
    };
    let start = match q.tail {
        Some(n) => match tail_offset(&mut file, n).await {
            Ok(o) => o,
            Err(e) => return failure(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        },
        None => 0,
    };
    if let Err(e) = file.seek(SeekFrom::Start(start)).await {
        return failure(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string());
    }
    let follow = q.follow.unwrap_or(false);
    let body = futures::stream::unfold((file, agent, false), move |(mut file, agent, done)| async move {
        if done {
            return None;
        }
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            match file.read(&mut buf).await {
                Ok(0) => {
                    if !follow || !agent.is_running(task) {
                        // One last read after the task ended catches its final words.
                        return match file.read(&mut buf).await {
                            Ok(n) if n > 0 => Some((
                                Ok::<Bytes, std::io::Error>(Bytes::copy_from_slice(&buf[..n])),
                                (file, agent, false),
                            )),
                            _ => None,
                        };
                    }
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
                Ok(n) => return Some((Ok(Bytes::copy_from_slice(&buf[..n])), (file, agent, false))),
                Err(e) => return Some((Err(e), (file, agent, true))),
            }
        }
    });
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], Body::from_stream(body)).into_response()
}
