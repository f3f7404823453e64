//! The agent's own API: task logs straight from the sandbox (the master proxies `capstan task logs`
//! here). Following a log survives its rotation (`stdout` → `stdout.1`): the reader notices
//! that the path names a new file, finishes the old one and reopens; `tail=N` reaches into
//! `stdout.1` when `stdout` has fewer than N lines.
//!
//! The agent runs as root and the files lie in a task's sandbox, so every file is opened through
//! the sandbox's log directory held open ([`LogDir`]: `logs/`, or the sandbox itself for one of
//! the previous layout), never following a link, and only a regular file of the directory's
//! owner with one link is read. A task cannot make this route read anything but its own output.

use crate::Agent;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use capstan_containerizer::LogDir;
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

/// Where the last `lines` lines of the file start, and how many lines the file has when it has
/// fewer (then the offset is 0): `(offset, lines found, at most lines)`.
async fn tail_start(file: &mut tokio::fs::File, lines: u64) -> std::io::Result<(u64, u64)> {
    let len = file.metadata().await?.len();
    if lines == 0 {
        return Ok((len, 0));
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
                    return Ok((pos + i as u64 + 1, lines));
                }
            }
        }
        skip_last_newline = false;
    }
    // The first line has no newline before it.
    Ok((0, if len > 0 { seen + 1 } else { 0 }))
}

/// True when `name` no longer names the file `file` reads (rotated: another inode), or the file
/// shrank below what was read (truncated).
async fn replaced(file: &tokio::fs::File, dir: &LogDir, name: &str, read_bytes: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata().await, dir.id_of(name)) {
        (Ok(open), Some((dev, ino, len))) => (open.dev(), open.ino()) != (dev, ino) || len < read_bytes,
        _ => false,
    }
}

/// Opens `name` in `dir` (see [`LogDir::open_file`]) for async reads.
fn open_log(dir: &LogDir, name: &str) -> std::io::Result<tokio::fs::File> {
    dir.open_file(name).map(tokio::fs::File::from_std)
}

/// What a log response reads: optionally the end of the rotated file first, then the live file,
/// reopened when it is rotated while being followed.
struct LogReader {
    /// Whether the task still runs (following stops after it ended).
    running: Box<dyn Fn() -> bool + Send + Sync>,
    /// The directory of the log, held open, and the log's name in it.
    dir: LogDir,
    name: String,
    follow: bool,
    /// The end of `stream.1`, read before `file` (for `tail` beyond the live file's lines).
    rotated: Option<tokio::fs::File>,
    file: tokio::fs::File,
    /// Bytes of `file` consumed (from its start).
    read_bytes: u64,
    /// `file` was replaced: read what is left of it, then reopen `path`.
    draining: bool,
    done: bool,
}

impl LogReader {
    async fn next_chunk(&mut self) -> Option<std::io::Result<Bytes>> {
        if self.done {
            return None;
        }
        let mut buf = vec![0u8; CHUNK_BYTES];
        if let Some(rotated) = &mut self.rotated {
            match rotated.read(&mut buf).await {
                Ok(0) => self.rotated = None,
                Ok(n) => return Some(Ok(Bytes::copy_from_slice(&buf[..n]))),
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        loop {
            match self.file.read(&mut buf).await {
                Ok(0) => {}
                Ok(n) => {
                    self.read_bytes += n as u64;
                    return Some(Ok(Bytes::copy_from_slice(&buf[..n])));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
            if !self.follow {
                return None;
            }
            if self.draining {
                // What was left of the old file is read: continue with the new one from its start.
                self.draining = false;
                match open_log(&self.dir, &self.name) {
                    Ok(f) => {
                        self.file = f;
                        self.read_bytes = 0;
                        continue;
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
            if replaced(&self.file, &self.dir, &self.name, self.read_bytes).await {
                // One more read of the old file catches what was written to it before the rename.
                self.draining = true;
                continue;
            }
            if !(self.running)() {
                // One last read after the task ended catches its final words.
                self.follow = false;
                continue;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
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
    let not_found = || {
        failure(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("task {task} has no {stream} on this agent (no sandbox, or it was collected)"),
        )
    };
    let sandbox = agent.sandbox(task);
    let opened = LogDir::open(&sandbox).and_then(|dir| open_log(&dir, stream).map(|file| (dir, file)));
    let (dir, mut file) = match opened {
        Ok(opened) => opened,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return not_found(),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!(%task, "log route: {e} (in {})", sandbox.display());
            return failure(StatusCode::FORBIDDEN, "forbidden", format!("task {task}'s {stream}: {e}"));
        }
        Err(e) => {
            return failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot open {stream} of task {task} in {}: {e}", sandbox.display()),
            )
        }
    };
    let internal = |e: std::io::Error| failure(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string());
    let mut rotated = None;
    let start = match q.tail {
        Some(n) => {
            let (offset, found) = match tail_start(&mut file, n).await {
                Ok(t) => t,
                Err(e) => return internal(e),
            };
            if found < n {
                // Fewer lines than asked: the rest comes from the end of the rotated file.
                if let Ok(mut old) = open_log(&dir, &format!("{stream}.1")) {
                    match tail_start(&mut old, n - found).await {
                        Ok((o, _)) => match old.seek(SeekFrom::Start(o)).await {
                            Ok(_) => rotated = Some(old),
                            Err(e) => return internal(e),
                        },
                        Err(e) => return internal(e),
                    }
                }
            }
            offset
        }
        None => 0,
    };
    if let Err(e) = file.seek(SeekFrom::Start(start)).await {
        return internal(e);
    }
    let reader = LogReader {
        running: Box::new(move || agent.is_running(task)),
        dir,
        name: stream.to_owned(),
        follow: q.follow.unwrap_or(false),
        rotated,
        file,
        read_bytes: start,
        draining: false,
        done: false,
    };
    let body = futures::stream::unfold(reader, |mut reader| async move {
        let chunk = reader.next_chunk().await?;
        Some((chunk, reader))
    });
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], Body::from_stream(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A sandbox of the current layout in `dir` (as root) or of the previous one, with its
    /// `stdout` path.
    fn sandbox(dir: &std::path::Path) -> std::path::PathBuf {
        std::fs::write(dir.join("launch.json"), "{}").unwrap();
        if nix::unistd::geteuid().is_root() {
            std::fs::create_dir(dir.join("logs")).unwrap();
            dir.join("logs").join("stdout")
        } else {
            dir.join("stdout")
        }
    }

    async fn reader(path: &std::path::Path, tail: Option<u64>, running: Arc<AtomicBool>) -> LogReader {
        let sandbox = path.parent().unwrap();
        let sandbox = if sandbox.ends_with("logs") { sandbox.parent().unwrap() } else { sandbox };
        let dir = LogDir::open(sandbox).unwrap();
        let mut file = open_log(&dir, "stdout").unwrap();
        let mut rotated = None;
        let mut start = 0;
        if let Some(n) = tail {
            let (offset, found) = tail_start(&mut file, n).await.unwrap();
            if found < n {
                let mut old = open_log(&dir, "stdout.1").unwrap();
                let (o, _) = tail_start(&mut old, n - found).await.unwrap();
                old.seek(SeekFrom::Start(o)).await.unwrap();
                rotated = Some(old);
            }
            start = offset;
        }
        file.seek(SeekFrom::Start(start)).await.unwrap();
        LogReader {
            running: Box::new(move || running.load(Ordering::SeqCst)),
            dir,
            name: "stdout".into(),
            follow: true,
            rotated,
            file,
            read_bytes: start,
            draining: false,
            done: false,
        }
    }

    async fn read_all(mut r: LogReader) -> String {
        let mut out = Vec::new();
        while let Some(chunk) = r.next_chunk().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn tail_reaches_into_the_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = sandbox(dir.path());
        std::fs::write(path.with_extension("1"), "a\nb\nc\n").unwrap();
        std::fs::write(&path, "d\ne\n").unwrap();
        let stopped = Arc::new(AtomicBool::new(false));
        assert_eq!(read_all(reader(&path, Some(4), stopped.clone()).await).await, "b\nc\nd\ne\n");
        assert_eq!(read_all(reader(&path, Some(2), stopped.clone()).await).await, "d\ne\n");
        assert_eq!(read_all(reader(&path, Some(1), stopped).await).await, "e\n");
    }

    #[tokio::test]
    async fn following_survives_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = sandbox(dir.path());
        std::fs::write(&path, "one\n").unwrap();
        let running = Arc::new(AtomicBool::new(true));
        let follow = tokio::spawn(read_all(reader(&path, None, running.clone()).await));
        tokio::time::sleep(FOLLOW_POLL * 2).await;
        // What a rotating writer does: a last write to the old file, rename, a new file.
        let mut old = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut old, b"two\n").unwrap();
        std::fs::rename(&path, path.with_extension("1")).unwrap();
        std::io::Write::write_all(&mut old, b"three\n").unwrap();
        std::fs::write(&path, "four\n").unwrap();
        tokio::time::sleep(FOLLOW_POLL * 3).await;
        // And a truncation of the live file.
        std::fs::write(&path, "5\n").unwrap();
        tokio::time::sleep(FOLLOW_POLL * 3).await;
        running.store(false, Ordering::SeqCst);
        let text = tokio::time::timeout(Duration::from_secs(5), follow).await.unwrap().unwrap();
        assert_eq!(text, "one\ntwo\nthree\nfour\n5\n");
    }
}
