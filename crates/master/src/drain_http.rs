//! Routes of drain and maintenance: `POST /v1/agents/{id}/drain` and `/undrain`,
//! `GET|POST /v1/admin/maintenance`, `POST /v1/admin/maintenance/{id}/cancel`,
//! `GET /v1/admin/sla/safe-to-drain?percent=P`. Merged into the router by `http::router`.

use crate::core::now;
use crate::http::{agent_view, ApiFailure, AppState};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use capstan_api::wire::*;
use capstan_model::{AgentId, Timestamp};
use capstan_state::{ClusterState, Command, MaintenanceWindow};
use serde::Deserialize;

type ApiResult<T> = Result<T, ApiFailure>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/agents/{id}/drain", post(drain_agent))
        .route("/v1/agents/{id}/undrain", post(undrain_agent))
        .route("/v1/admin/maintenance", get(list_maintenance).post(schedule_maintenance))
        .route("/v1/admin/maintenance/{id}/cancel", post(cancel_maintenance))
        .route("/v1/admin/sla/safe-to-drain", get(safe_to_drain))
}

fn bad_request(message: impl Into<String>) -> ApiFailure {
    ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid request body: {e}")))
}

fn operator(by: &str) -> ApiResult<String> {
    let by = by.trim();
    if by.is_empty() {
        return Err(bad_request("`by` must say who asks (user@host)"));
    }
    Ok(by.to_string())
}

fn parse_agent(id: &str) -> ApiResult<AgentId> {
    id.parse().map_err(|e: String| bad_request(e))
}

fn view_of(app: &AppState, agent: AgentId) -> ApiResult<Json<AgentView>> {
    let state = app.core.state.read();
    let a = state
        .agents
        .get(&agent)
        .ok_or_else(|| ApiFailure::new(StatusCode::NOT_FOUND, "not_found", format!("no agent {agent}")))?;
    let progress = state.drain_progress(agent);
    Ok(Json(agent_view(app, &state, a, progress.as_ref())))
}

async fn drain_agent(State(app): State<AppState>, Path(id): Path<String>, body: Bytes) -> ApiResult<Json<AgentView>> {
    let agent = parse_agent(&id)?;
    let by = operator(&parse::<OperatorRequest>(&body)?.by)?;
    let already = app.core.state.read().agents.get(&agent).is_some_and(|a| a.drain.is_some());
    app.core.submit(Command::DrainAgent { agent, by: by.clone() }).await?;
    if !already {
        let frozen = app.core.state.read().frozen.is_some();
        let note = if frozen { "; the cluster is frozen: no task moves until it is unfrozen" } else { "" };
        app.events.add(
            "agent_draining",
            format!("agent {agent} drained by {by}: nothing new is placed there; its service tasks move within their jobs' SLA{note}"),
        );
    }
    view_of(&app, agent)
}

async fn undrain_agent(State(app): State<AppState>, Path(id): Path<String>, body: Bytes) -> ApiResult<Json<AgentView>> {
    let agent = parse_agent(&id)?;
    let by = operator(&parse::<OperatorRequest>(&body)?.by)?;
    let was = app.core.state.read().agents.get(&agent).is_some_and(|a| a.drain.is_some());
    app.core.submit(Command::UndrainAgent { agent, by: by.clone() }).await?;
    if was {
        app.events.add("agent_undrained", format!("agent {agent} undrained by {by}: it takes new tasks again"));
    }
    view_of(&app, agent)
}

pub(crate) fn maintenance_view(w: &MaintenanceWindow, at: Timestamp) -> MaintenanceView {
    MaintenanceView {
        id: w.id,
        agents: w.agents.clone(),
        start: rfc3339(w.start),
        end: rfc3339(w.end()),
        duration_ms: w.duration_ms,
        phase: w.phase(at).as_str().into(),
        by: w.by.clone(),
        created_at: rfc3339(w.created_at),
    }
}

/// In words, the window that matters most to `agent` now: `active until …` or `starts at …`.
pub(crate) fn maintenance_note(state: &ClusterState, agent: AgentId, at: Timestamp) -> Option<String> {
    use capstan_state::MaintenancePhase as P;
    state
        .maintenance
        .values()
        .filter(|w| w.agents.contains(&agent))
        .map(|w| (w.phase(at), w))
        .filter(|(p, _)| *p != P::Ended)
        .min_by_key(|(p, w)| (*p, w.start))
        .map(|(p, w)| match p {
            P::Active => format!("window {} active until {}", w.id, rfc3339(w.end())),
            _ => format!("window {} starts at {} ({})", w.id, rfc3339(w.start), p.as_str()),
        })
}

async fn list_maintenance(State(app): State<AppState>) -> Json<Vec<MaintenanceView>> {
    let state = app.core.state.read();
    let at = now();
    Json(state.maintenance.values().map(|w| maintenance_view(w, at)).collect())
}

async fn schedule_maintenance(
    State(app): State<AppState>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<MaintenanceView>)> {
    let req: MaintenanceRequest = parse(&body)?;
    let by = operator(&req.by)?;
    let start = humantime::parse_rfc3339_weak(req.start.trim())
        .map_err(|e| bad_request(format!("start `{}` is not an RFC 3339 time: {e}", req.start)))?;
    let start_ms = start
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad_request(format!("start `{}` is before 1970", req.start)))?
        .as_millis() as u64;
    let applied = app
        .core
        .submit(Command::ScheduleMaintenance {
            agents: req.agents,
            start: Timestamp(start_ms),
            duration_ms: req.duration_ms,
            by: by.clone(),
        })
        .await?;
    let id = applied.maintenance_id.expect("a scheduled window has an id");
    let state = app.core.state.read();
    let w = state.maintenance.get(&id).expect("just scheduled");
    let view = maintenance_view(w, now());
    app.events.add(
        "maintenance_scheduled",
        format!(
            "maintenance window {id} scheduled by {by}: agents {} from {} to {}; new long-running tasks avoid them",
            w.agents.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","),
            view.start,
            view.end
        ),
    );
    Ok((StatusCode::CREATED, Json(view)))
}

async fn cancel_maintenance(
    State(app): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<MaintenanceView>> {
    let id: u64 = id.parse().map_err(|_| bad_request(format!("`{id}` is not a maintenance window id")))?;
    let by = operator(&parse::<OperatorRequest>(&body)?.by)?;
    let window =
        app.core.state.read().maintenance.get(&id).cloned().ok_or_else(|| {
            ApiFailure::new(StatusCode::NOT_FOUND, "not_found", format!("no maintenance window {id}"))
        })?;
    app.core.submit(Command::CancelMaintenance { id, by: by.clone() }).await?;
    app.events.add("maintenance_cancelled", format!("maintenance window {id} cancelled by {by}"));
    Ok(Json(maintenance_view(&window, now())))
}

#[derive(Deserialize)]
struct SafeQuery {
    percent: Option<f64>,
}

async fn safe_to_drain(State(app): State<AppState>, Query(q): Query<SafeQuery>) -> ApiResult<Json<SafeToDrainView>> {
    let percent = q.percent.ok_or_else(|| {
        bad_request("percent is required: the share (0-100) of its instances a job without min_healthy keeps healthy")
    })?;
    if !(0.0..=100.0).contains(&percent) {
        return Err(bad_request(format!("percent {percent}: use a number from 0 to 100")));
    }
    let state = app.core.state.read();
    let mut view = SafeToDrainView { percent, safe: vec![], not_safe: vec![] };
    for s in state.safe_to_drain(percent / 100.0) {
        let v = AgentSafetyView {
            agent: s.agent,
            hostname: state.agents.get(&s.agent).map(|a| a.info.hostname.clone()).unwrap_or_default(),
            serving_tasks: s.serving,
            reason: s.why,
        };
        if s.safe {
            view.safe.push(v);
        } else {
            view.not_safe.push(v);
        }
    }
    Ok(Json(view))
}
