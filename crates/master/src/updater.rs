//! Rolling updates in the master: the loop that drives every update in progress (it sends an
//! `UpdateStep` whenever `capstan_state::updates::step_needed` says a step would change
//! something; what the step does is decided by `apply`), and the update routes
//! (`/v1/jobs/{key}/update…`). The update itself lives in the replicated state, so a master that
//! restarts picks every update up where it was.

use crate::core::{now, Core, CoreError};
use crate::events::Events;
use crate::http::{ApiFailure, AppState};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use capstan_api::wire::*;
use capstan_model::JobKey;
use capstan_state::updates::{step_needed, Update, UpdateAction, UpdateState};
use capstan_state::{ClusterState, Command, Job, Rejection};
use std::sync::Arc;
use std::time::Duration;

/// How often the updater looks at the updates in progress; watch times are measured to this.
pub const TICK: Duration = Duration::from_millis(200);
/// Steps sent per tick at most (one per job); the others wait for the next tick.
pub const STEPS_PER_TICK_MAX: usize = 256;

/// Drives every update in progress, for as long as the master runs.
pub async fn run(core: Arc<Core>, events: Arc<Events>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let due: Vec<(JobKey, Update)> = {
            let state = core.state.read();
            let t = now();
            state
                .jobs
                .values()
                .filter(|j| j.updates.active.is_some() && step_needed(&state, j, t))
                .take(STEPS_PER_TICK_MAX)
                .map(|j| (j.spec.job.clone(), j.updates.active.clone().expect("filtered")))
                .collect()
        };
        for (job, before) in due {
            match core.submit(Command::UpdateStep { job: job.clone() }).await {
                Ok(_) => report(&core, &events, &job, &before),
                // The state moved on between the look and the step: the next tick looks again.
                Err(CoreError::Rejected(_)) => {}
                Err(e) => tracing::warn!(%job, "update step: {e}"),
            }
        }
    }
}

/// Events for what a step changed: a batch started, a rollback began, the update ended.
fn report(core: &Core, events: &Events, job: &JobKey, before: &Update) {
    let state = core.state.read();
    let Some(j) = state.jobs.get(job) else { return };
    match &j.updates.active {
        Some(u) if u.state != before.state => {
            events.add(&format!("update_{}", u.state.as_str()), format!("job {job}: update {}: {}", u.id, u.message))
        }
        Some(u) if u.batches != before.batches => {
            events.add("update_batch", format!("job {job}: update {}: {}", u.id, u.message))
        }
        Some(_) => {}
        None => {
            if let Some(u) = j.updates.history.last().filter(|u| u.id == before.id) {
                events
                    .add(&format!("update_{}", u.state.as_str()), format!("job {job}: update {}: {}", u.id, u.message));
            }
        }
    }
}

// ---- views

pub fn update_view(state: &ClusterState, job: &Job, u: &Update) -> UpdateView {
    let s = &u.settings;
    let bs = s.batch_size.max(1);
    let left = u.todo.len() as u32;
    let back = u.state == UpdateState::RollingBack || u.state == UpdateState::RolledBack;
    let to_come = if !back && s.canaries > 0 && u.batches == 0 {
        1 + left.saturating_sub(s.canaries).div_ceil(bs)
    } else {
        left.div_ceil(bs)
    };
    let t_now = now();
    let batch = u
        .batch
        .iter()
        .map(|(i, p)| {
            let t = job.current.get(i).and_then(|id| state.tasks.get(id));
            UpdateInstanceView {
                instance: *i,
                task: t.map(|t| t.id),
                state: t.map(|t| t.state),
                health: t
                    .filter(|t| t.state == capstan_model::TaskState::Running)
                    .and_then(|t| t.healthy)
                    .map(|h| if h { "healthy" } else { "unhealthy" }.to_string()),
                version: t.map(|t| t.job_version),
                up_ms: p.ok_since.map(|since| t_now.since(since)),
            }
        })
        .collect();
    UpdateView {
        id: u.id,
        job: job.spec.job.clone(),
        from_version: u.from_version,
        to_version: u.to_version,
        by: u.by.clone(),
        started_at: rfc3339(u.started_at),
        ended_at: u.ended_at.map(rfc3339),
        duration_ms: u.ended_at.map(|e| e.since(u.started_at)),
        state: u.state.as_str().into(),
        paused_by: u.paused.clone(),
        message: u.message.clone(),
        batch_size: s.batch_size,
        canaries: s.canaries,
        watch_ms: s.watch.0,
        max_per_instance_failures: s.max_per_instance_failures,
        max_total_failures: s.max_total_failures,
        rollback_on_failure: s.rollback_on_failure,
        auto_promote: s.auto_promote,
        batches: u.batches,
        batches_total: u.batches + to_come,
        total: u.total,
        batch,
        todo: u.todo.clone(),
        done: u.done.clone(),
        failed: u.failed.clone(),
        failures: u.failures.clone(),
        added: u.added.clone(),
        removed: u.removed.clone(),
        events: u.events.iter().map(|e| UpdateEventView { at: rfc3339(e.at), text: e.text.clone() }).collect(),
    }
}

pub fn job_updates_view(state: &ClusterState, job: &Job) -> JobUpdatesView {
    JobUpdatesView {
        job: job.spec.job.clone(),
        version: job.version,
        active: job.updates.active.as_ref().map(|u| update_view(state, job, u)),
        history: job.updates.history.iter().rev().map(|u| update_view(state, job, u)).collect(),
    }
}

// ---- routes

type ApiResult<T> = Result<T, ApiFailure>;

fn job_key(role: &str, env: &str, name: &str) -> ApiResult<JobKey> {
    format!("{role}/{env}/{name}")
        .parse()
        .map_err(|e: capstan_model::ids::JobKeyError| ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", e.0))
}

fn body<T: for<'de> serde::Deserialize<'de>>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", format!("invalid request body: {e}")))
}

fn check_by(by: &str) -> ApiResult<()> {
    if by.trim().is_empty() {
        return Err(ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", "`by` must say who asks (user@host)"));
    }
    Ok(())
}

fn current(app: &AppState, key: &JobKey) -> ApiResult<JobUpdatesView> {
    let state = app.core.state.read();
    let job = state
        .jobs
        .get(key)
        .ok_or_else(|| ApiFailure::new(StatusCode::NOT_FOUND, "not_found", format!("no job {key}")))?;
    Ok(job_updates_view(&state, job))
}

fn failure(e: CoreError) -> ApiFailure {
    match e {
        CoreError::Rejected(Rejection::Conflict(m)) => ApiFailure::new(StatusCode::CONFLICT, "update_conflict", m),
        other => other.into(),
    }
}

/// `GET /v1/jobs/{key}/update`.
pub(crate) async fn get_updates(
    State(app): State<AppState>,
    Path((role, env, name)): Path<(String, String, String)>,
) -> ApiResult<Json<JobUpdatesView>> {
    let key = job_key(&role, &env, &name)?;
    Ok(Json(current(&app, &key)?))
}

/// `POST /v1/jobs/{key}/update` with `{"spec": …, "by": …}`: starts a rolling update (202).
pub(crate) async fn start_update(
    State(app): State<AppState>,
    Path((role, env, name)): Path<(String, String, String)>,
    raw: Bytes,
) -> ApiResult<(StatusCode, Json<JobUpdatesView>)> {
    let key = job_key(&role, &env, &name)?;
    let req: UpdateRequest = body(&raw)?;
    check_by(&req.by)?;
    let spec = capstan_model::parse_json(&req.spec.to_string(), &app.policy).map_err(|problems| {
        ApiFailure::new(StatusCode::BAD_REQUEST, "invalid_job", format!("invalid job:\n{problems}"))
    })?;
    if spec.job != key {
        return Err(ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the spec is for job {}, not {key}", spec.job),
        ));
    }
    let by = req.by.trim().to_string();
    app.core.submit(Command::StartUpdate { spec, by: by.clone(), seed: rand::random() }).await.map_err(failure)?;
    let view = current(&app, &key)?;
    let what = match &view.active {
        Some(u) => format!("job {key}: update {} by {by} from version {} to {}", u.id, u.from_version, u.to_version),
        None => format!("job {key}: updated by {by} to version {} without replacing any instance", view.version),
    };
    app.events.add("update_started", what);
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// `POST /v1/jobs/{key}/update/{action}` with `{"by": …}`.
pub(crate) async fn update_action(
    State(app): State<AppState>,
    Path((role, env, name, action)): Path<(String, String, String, String)>,
    raw: Bytes,
) -> ApiResult<Json<JobUpdatesView>> {
    let key = job_key(&role, &env, &name)?;
    let action: UpdateAction =
        action.parse().map_err(|e: String| ApiFailure::new(StatusCode::NOT_FOUND, "not_found", e))?;
    let req: OperatorRequest = body(&raw)?;
    check_by(&req.by)?;
    let by = req.by.trim().to_string();
    app.core.submit(Command::UpdateControl { job: key.clone(), action, by: by.clone() }).await.map_err(failure)?;
    app.events.add(&format!("update_{}", action.as_str()), format!("job {key}: update {} by {by}", action.as_str()));
    Ok(Json(current(&app, &key)?))
}
