//! HTTP routes: the public API (`/v1/...`), the agent protocol (`/v1/agent/...`) and `/metrics`.
//! Handlers parse, call the core, render; errors always have the `{"error": {...}}` shape.

use crate::core::{now, Core, CoreError};
use crate::events::Events;
use crate::liveness::Liveness;
use crate::scheduler::Unplaced;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use capstan_api::wire::*;
use capstan_model::resources::milli_to_cpus as milli_to_cpus_text;
use capstan_model::{AgentId, ByteSize, Desired, JobKey, JobType, TaskId, TaskSpec, TaskState, ValidationPolicy};
use capstan_state::{ClusterState, Command, Job, Rejection, Task};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct AppState {
    pub core: Arc<Core>,
    pub unplaced: Unplaced,
    pub policy: Arc<ValidationPolicy>,
    pub http: reqwest::Client,
    /// The latest usage of each task, as agents report it; in memory only.
    pub usage: Arc<parking_lot::Mutex<std::collections::HashMap<TaskId, TaskUsage>>>,
    pub liveness: Arc<Liveness>,
    pub events: Arc<Events>,
    pub admission: Arc<Admission>,
    /// The master's data directory (a restore's upload is written there).
    pub data_dir: std::path::PathBuf,
}

/// Back-pressure: how many requests of each costly kind are served at once. A request over the
/// limit is answered 503 with `Retry-After` at once (agents back off with jitter), so neither a
/// re-registration storm nor a flood of status updates queues up without bound in the master.
pub struct Admission {
    pub registrations: tokio::sync::Semaphore,
    pub updates: tokio::sync::Semaphore,
    /// Status-update batches waiting for a turn (at most [`MAX_UPDATE_BATCHES_WAITING`]).
    pub updates_waiting: std::sync::atomic::AtomicUsize,
    pub heartbeats: tokio::sync::Semaphore,
    /// Large lists being rendered (CPU): held while the answer is built, never while it is sent.
    pub lists: Arc<tokio::sync::Semaphore>,
    /// Bytes (in KiB) of large answers rendered and not yet sent: held until the body is sent or
    /// its client gone, so that slow readers hold at most this much memory. Small answers do not
    /// count, so they never wait behind large ones.
    pub answer_kib: Arc<tokio::sync::Semaphore>,
    /// Restores: one at a time (each streams up to 2 GiB to a file and installs a whole state).
    pub restores: tokio::sync::Semaphore,
}

/// Requests of each kind served at once.
pub const MAX_REGISTRATIONS: usize = 64;
pub const MAX_UPDATE_BATCHES: usize = 128;
/// Status-update batches that may wait for one of the [`MAX_UPDATE_BATCHES`] turns; past this a
/// batch is shed at once. Updates report tasks that ended or started (they free and confirm
/// resources), so a burst of them queues briefly instead of being turned away for a second.
pub const MAX_UPDATE_BATCHES_WAITING: usize = 1_024;
/// The longest a status-update batch waits for its turn before it is shed.
pub const UPDATE_TURN_WAIT_MS: u64 = 2_000;
pub const MAX_HEARTBEATS: usize = 512;
/// Large lists rendered at once (a list of at most `LIST_SMALL_ITEMS_MAX` items needs no place).
pub const MAX_LIST_ANSWERS: usize = 8;
/// A list answer of at most this many items is small: rendered without a place among the large.
pub const LIST_SMALL_ITEMS_MAX: usize = 100;
/// An answer of at most this many bytes is sent without counting against `ANSWER_BYTES_IN_FLIGHT_MAX`.
pub const ANSWER_SMALL_BYTES: usize = 64 * 1024;
/// Bytes of large answers rendered but not yet sent, at most (slow readers hold them).
pub const ANSWER_BYTES_IN_FLIGHT_MAX: usize = 256 << 20;
/// Tasks rendered per hold of the state's read lock in a large list.
pub const RENDER_BATCH_ITEMS: usize = 1_000;
/// Items of a list page when `next` is given without `limit`, and the most a `limit` may ask.
pub const LIST_PAGE_ITEMS_DEFAULT: usize = 1_000;
pub const LIST_PAGE_ITEMS_MAX: usize = 5_000;
/// Status updates in one batch at most.
pub const MAX_UPDATES_PER_BATCH: usize = 10_000;

impl Default for Admission {
    fn default() -> Self {
        Admission {
            registrations: tokio::sync::Semaphore::new(MAX_REGISTRATIONS),
            updates: tokio::sync::Semaphore::new(MAX_UPDATE_BATCHES),
            updates_waiting: std::sync::atomic::AtomicUsize::new(0),
            heartbeats: tokio::sync::Semaphore::new(MAX_HEARTBEATS),
            lists: Arc::new(tokio::sync::Semaphore::new(MAX_LIST_ANSWERS)),
            answer_kib: Arc::new(tokio::sync::Semaphore::new(ANSWER_BYTES_IN_FLIGHT_MAX / 1024)),
            restores: tokio::sync::Semaphore::new(1),
        }
    }
}

/// The 503 of a shed request: retry after `secs` (agents add jitter).
fn shed(app: &AppState, route: &str, secs: u64) -> ApiFailure {
    app.core.metrics.requests_shed.get_or_create(&crate::metrics::RouteLabel { route: route.into() }).inc();
    let mut f = ApiFailure::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        format!("the master is busy with other {route} requests; retry in {secs} s"),
    );
    f.retry_after = Some(secs);
    f
}

pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/jobs", post(create_job).get(list_jobs))
        .route("/v1/jobs/{role}/{env}/{name}", get(get_job).delete(kill_job))
        .route("/v1/tasks", get(list_tasks))
        .route("/v1/tasks/{id}", get(get_task).delete(kill_task))
        .route("/v1/tasks/{id}/logs", get(task_logs))
        .route("/v1/agents", get(list_agents))
        .route("/v1/quotas", get(list_quotas))
        .route("/v1/quotas/{role}", axum::routing::put(set_quota).delete(remove_quota))
        .route("/v1/scheduler", get(get_scheduler).put(set_scheduler))
        .route("/v1/admin/status", get(admin_status))
        .route("/v1/admin/freeze", post(freeze))
        .route("/v1/admin/unfreeze", post(unfreeze))
        .route("/v1/admin/breaker/reset", post(reset_breaker))
        .route("/v1/events", get(events))
        .route("/v1/agent/register", post(register_agent))
        .route("/v1/agent/{id}/heartbeat", post(agent_heartbeat))
        .route("/v1/agent/{id}/orders", get(agent_orders))
        .route("/v1/agent/updates", post(agent_updates))
        .route("/v1/agent/usage", post(agent_usage))
        .route("/metrics", get(metrics))
        .route("/v1/jobs/{role}/{env}/{name}/start", post(start_job))
        .merge(crate::drain_http::routes())
        .merge(crate::backup::routes())
        .route(
            "/v1/jobs/{role}/{env}/{name}/update",
            get(crate::updater::get_updates).post(crate::updater::start_update),
        )
        .route("/v1/jobs/{role}/{env}/{name}/update/{action}", post(crate::updater::update_action))
        .fallback(|| async { ApiFailure::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(axum::middleware::from_fn_with_state(app.clone(), frozen_notice))
        .with_state(app)
}

/// An error response in the API's one error shape.
pub struct ApiFailure {
    status: StatusCode,
    body: ErrorBody,
    retry_after: Option<u64>,
    /// Answered with `capstan-leader: none`: the request was not served because no term runs.
    no_leader: bool,
}

impl ApiFailure {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiFailure {
        ApiFailure {
            status,
            body: ErrorBody { error: ErrorDetail { code: code.into(), message: message.into(), details: vec![] } },
            retry_after: None,
            no_leader: false,
        }
    }
    /// What the error says, in words.
    pub fn message(&self) -> &str {
        &self.body.error.message
    }
    fn details(mut self, details: Vec<serde_json::Value>) -> ApiFailure {
        self.body.error.details = details;
        self
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, secs.into());
        }
        if self.no_leader {
            resp.headers_mut().insert(LEADER_HEADER, axum::http::HeaderValue::from_static("none"));
        }
        resp
    }
}

impl From<CoreError> for ApiFailure {
    fn from(e: CoreError) -> ApiFailure {
        let (status, code) = match &e {
            CoreError::Rejected(Rejection::JobExists(_)) => (StatusCode::CONFLICT, "job_exists"),
            CoreError::Rejected(Rejection::JobKilled(_)) => (StatusCode::CONFLICT, "job_killed"),
            CoreError::Rejected(Rejection::NoSuchJob(_) | Rejection::NoSuchTask(_) | Rejection::NoSuchAgent(_)) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            CoreError::Rejected(Rejection::Invalid(_)) => (StatusCode::BAD_REQUEST, "bad_request"),
            CoreError::Rejected(Rejection::OverQuota(_)) => (StatusCode::CONFLICT, "over_quota"),
            CoreError::Rejected(Rejection::Frozen(_)) => (StatusCode::CONFLICT, "frozen"),
            CoreError::Rejected(Rejection::Conflict(_)) => (StatusCode::CONFLICT, "conflict"),
            CoreError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            // Not applied: the term ended first. Said as "no leader", so that clients wait for
            // the next leader and ask again.
            CoreError::Closed => (StatusCode::SERVICE_UNAVAILABLE, "no_leader"),
        };
        let closed = matches!(e, CoreError::Closed);
        let mut failure = ApiFailure::new(status, code, e.to_string());
        if closed {
            failure.retry_after = Some(1);
            failure.no_leader = true;
        }
        failure
    }
}

type ApiResult<T> = Result<T, ApiFailure>;

fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", format!("invalid request body: {e}")))
}

fn parse_task_id(id: &str) -> ApiResult<TaskId> {
    id.parse().map_err(|e: String| ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", e))
}

fn parse_job_key(role: &str, env: &str, name: &str) -> ApiResult<JobKey> {
    format!("{role}/{env}/{name}")
        .parse()
        .map_err(|e: capstan_model::ids::JobKeyError| ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", e.0))
}

async fn health(State(app): State<AppState>) -> Json<serde_json::Value> {
    let index = app.core.state.read().index;
    Json(serde_json::json!({"status": "ok", "index": index, "version": env!("CARGO_PKG_VERSION")}))
}

async fn create_job(State(app): State<AppState>, body: Bytes) -> ApiResult<(StatusCode, Json<CreatedJob>)> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", "the body is not UTF-8"))?;
    let spec = capstan_model::parse_json(text, &app.policy).map_err(|problems| {
        let details = problems.0.iter().map(|p| serde_json::to_value(p).expect("serializable")).collect();
        ApiFailure::new(StatusCode::BAD_REQUEST, "invalid_job", format!("invalid job:\n{problems}")).details(details)
    })?;
    let job = spec.job.clone();
    let applied = app.core.submit(Command::CreateJob { spec, seed: rand::random() }).await?;
    Ok((StatusCode::CREATED, Json(CreatedJob { job, tasks: applied.created })))
}

#[derive(Deserialize, Default)]
struct PageQuery {
    limit: Option<usize>,
    next: Option<String>,
}

impl PageQuery {
    /// How many items this page holds at most: all without `limit` or `next` (the unpaginated
    /// answer older clients expect), else `limit` (default `LIST_PAGE_ITEMS_DEFAULT`) up to
    /// `LIST_PAGE_ITEMS_MAX`.
    fn items(&self) -> ApiResult<usize> {
        match (self.limit, &self.next) {
            (Some(0), _) => Err(ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", "limit must be at least 1")),
            (Some(n), _) => Ok(n.min(LIST_PAGE_ITEMS_MAX)),
            (None, Some(_)) => Ok(LIST_PAGE_ITEMS_DEFAULT),
            (None, None) => Ok(usize::MAX),
        }
    }
}

fn bad_cursor(next: &str) -> ApiFailure {
    ApiFailure::new(
        StatusCode::BAD_REQUEST,
        "bad_request",
        format!("next={next:?} is not a cursor this master gave (the {NEXT_HEADER} header of the previous page)"),
    )
}

async fn list_jobs(State(app): State<AppState>, Query(page): Query<PageQuery>) -> ApiResult<Response> {
    let items = page.items()?;
    let after: Option<JobKey> = match &page.next {
        Some(n) => Some(n.parse().map_err(|_| bad_cursor(n))?),
        None => None,
    };
    let jobs_count = app.core.state.read().jobs.len();
    let permit = render_permit(&app, jobs_count.min(items))?;
    let render_app = app.clone();
    let (bytes, next) = rendered(permit, move || {
        let app = render_app;
        let state = app.core.state.read();
        let unplaced = app.unplaced.lock();
        let range = match &after {
            Some(k) => state.jobs.range((std::ops::Bound::Excluded(k.clone()), std::ops::Bound::Unbounded)),
            None => state.jobs.range::<JobKey, _>(..),
        };
        let mut views: Vec<JobView> = Vec::new();
        let mut next = None;
        for (_, j) in range {
            if views.len() == items {
                next = views.last().map(|v: &JobView| v.job.to_string());
                break;
            }
            views.push(job_view(&state, j, &unplaced));
        }
        (serde_json::to_vec(&views), next)
    })
    .await?;
    Ok(answer(&app, bytes, next))
}

/// A place among the large lists being rendered, for a list of `items` items (none needed for a
/// small one), or a 503 to retry.
fn render_permit(app: &AppState, items: usize) -> ApiResult<Option<tokio::sync::OwnedSemaphorePermit>> {
    if items <= LIST_SMALL_ITEMS_MAX {
        return Ok(None);
    }
    app.admission.lists.clone().try_acquire_owned().map(Some).map_err(|_| shed(app, "list", 1))
}

/// Runs `render` (JSON of a list, and what else it returns) — on a blocking thread when it is
/// large (it holds a render place), so that the async workers keep serving — then gives the
/// render place back, before anything is sent.
async fn rendered<R: Send + 'static>(
    place: Option<tokio::sync::OwnedSemaphorePermit>,
    render: impl FnOnce() -> (serde_json::Result<Vec<u8>>, R) + Send + 'static,
) -> ApiResult<(Bytes, R)> {
    let internal = |e: String| ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e);
    let (bytes, extra) = match &place {
        Some(_) => tokio::task::spawn_blocking(render).await.map_err(|e| internal(e.to_string()))?,
        None => render(),
    };
    drop(place);
    Ok((Bytes::from(bytes.map_err(|e| internal(e.to_string()))?), extra))
}

/// The answer of a rendered list. A large one holds its size in `answer_kib` until its body is
/// sent (or its client is gone); if that budget is spent, 503 to retry. `next`: the cursor of
/// the next page.
fn answer(app: &AppState, bytes: Bytes, next: Option<String>) -> Response {
    let mut resp = if bytes.len() <= ANSWER_SMALL_BYTES {
        ([(header::CONTENT_TYPE, "application/json")], bytes).into_response()
    } else {
        let kib = u32::try_from(bytes.len().div_ceil(1024)).unwrap_or(u32::MAX);
        let Ok(held) = app.admission.answer_kib.clone().try_acquire_many_owned(kib) else {
            return shed(app, "large answer", 1).into_response();
        };
        // In chunks: the server asks for the next one only once it could write the last, so the
        // budget (in the stream's state) goes back when the last chunk is taken or the client
        // is gone (a client that stops reading is cut off by the server's write-stall timeout).
        const CHUNK: usize = 64 * 1024;
        let body = futures::stream::unfold((bytes, held), |(mut rest, held)| async move {
            if rest.is_empty() {
                return None;
            }
            let chunk = rest.split_to(rest.len().min(CHUNK));
            Some((Ok::<Bytes, std::convert::Infallible>(chunk), (rest, held)))
        });
        ([(header::CONTENT_TYPE, "application/json")], Body::from_stream(body)).into_response()
    };
    if let Some(v) = next.and_then(|n| axum::http::HeaderValue::from_str(&n).ok()) {
        resp.headers_mut().insert(NEXT_HEADER, v);
    }
    resp
}

async fn get_job(
    State(app): State<AppState>,
    Path((role, env, name)): Path<(String, String, String)>,
) -> ApiResult<Json<JobView>> {
    let key = parse_job_key(&role, &env, &name)?;
    let state = app.core.state.read();
    let job = state
        .jobs
        .get(&key)
        .ok_or_else(|| ApiFailure::new(StatusCode::NOT_FOUND, "not_found", format!("no job {key}")))?;
    Ok(Json(job_view(&state, job, &app.unplaced.lock())))
}

async fn kill_job(
    State(app): State<AppState>,
    Path((role, env, name)): Path<(String, String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let key = parse_job_key(&role, &env, &name)?;
    // The job is killed and its first slice of tasks stopped, durably; the reaper stops the rest.
    let applied = crate::reaper::kill_job(&app.core, &key, "job killed by user request").await?;
    let gone = applied.job_forgotten;
    Ok(Json(serde_json::json!({"job": key, "status": if gone { "killed" } else { "killing" }})))
}

#[derive(Deserialize)]
struct TaskQuery {
    job: Option<String>,
    state: Option<String>,
}

/// Where a task sorts in `/v1/tasks`: job, instance, creation, id; a page's cursor is its last
/// task's key, `CREATED_MS.INSTANCE.ID.JOB`.
type TaskKey = (JobKey, u32, u64, TaskId);

fn task_key(t: &Task) -> TaskKey {
    ((*t.job).clone(), t.instance, t.created_at.0, t.id)
}

fn task_cursor(k: &TaskKey) -> String {
    format!("{}.{}.{}.{}", k.2, k.1, k.3, k.0)
}

fn parse_task_cursor(text: &str) -> Option<TaskKey> {
    let mut parts = text.splitn(4, '.');
    let created: u64 = parts.next()?.parse().ok()?;
    let instance: u32 = parts.next()?.parse().ok()?;
    let id: TaskId = parts.next()?.parse().ok()?;
    let job: JobKey = parts.next()?.parse().ok()?;
    Some((job, instance, created, id))
}

async fn list_tasks(
    State(app): State<AppState>,
    Query(q): Query<TaskQuery>,
    Query(page): Query<PageQuery>,
) -> ApiResult<Response> {
    let items = page.items()?;
    let after = match &page.next {
        Some(n) => Some(parse_task_cursor(n).ok_or_else(|| bad_cursor(n))?),
        None => None,
    };
    let job: Option<JobKey> = match &q.job {
        Some(j) => Some(j.parse().map_err(|e: capstan_model::ids::JobKeyError| {
            ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", e.0)
        })?),
        None => None,
    };
    let wanted: Option<TaskState> = match &q.state {
        Some(s) => Some(s.parse().map_err(|e: String| ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", e))?),
        None => None,
    };
    let keep = |t: &&Task| wanted.is_none_or(|w| t.state == w);
    // The page's tasks, chosen by key under the read lock; only they are rendered.
    let (chosen, next, permit) = {
        let state = app.core.state.read();
        let mut keys: Vec<TaskKey> = match &job {
            Some(k) => {
                let j = state
                    .jobs
                    .get(k)
                    .ok_or_else(|| ApiFailure::new(StatusCode::NOT_FOUND, "not_found", format!("no job {k}")))?;
                state.tasks_of(j).filter(keep).map(task_key).collect()
            }
            None => state.tasks.values().filter(keep).map(task_key).collect(),
        };
        keys.sort_unstable();
        let from = match &after {
            Some(a) => keys.partition_point(|k| k <= a),
            None => 0,
        };
        let end = from.saturating_add(items).min(keys.len());
        let next = (end < keys.len() && end > from).then(|| task_cursor(&keys[end - 1]));
        keys.truncate(end);
        keys.drain(..from);
        let permit = render_permit(&app, keys.len())?;
        (keys, next, permit)
    };
    let render_app = app.clone();
    let (bytes, ()) = rendered(permit, move || {
        let app = render_app;
        // The read lock is taken per batch, so that the writer (and the readers queued behind
        // it) never waits for a whole large list; each task is seen whole.
        let mut views: Vec<TaskView> = Vec::with_capacity(chosen.len());
        for batch in chosen.chunks(RENDER_BATCH_ITEMS) {
            let state = app.core.state.read();
            for t in batch.iter().filter_map(|k| state.tasks.get(&k.3)) {
                views.push(task_view(&state, t, &app.usage.lock()));
            }
        }
        (serde_json::to_vec(&views), ())
    })
    .await?;
    Ok(answer(&app, bytes, next))
}

async fn get_task(State(app): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<TaskView>> {
    let id = parse_task_id(&id)?;
    let state = app.core.state.read();
    let t = state
        .tasks
        .get(&id)
        .ok_or_else(|| ApiFailure::new(StatusCode::NOT_FOUND, "not_found", format!("no task {id}")))?;
    Ok(Json(task_view(&state, t, &app.usage.lock())))
}

async fn kill_task(State(app): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<TaskView>> {
    let id = parse_task_id(&id)?;
    app.core.submit(Command::KillTask { task: id, by: "task killed by user request".into() }).await?;
    let state = app.core.state.read();
    let t = state
        .tasks
        .get(&id)
        .ok_or_else(|| ApiFailure::new(StatusCode::NOT_FOUND, "not_found", format!("no task {id}")))?;
    Ok(Json(task_view(&state, t, &app.usage.lock())))
}

#[derive(Deserialize)]
struct LogQuery {
    stream: Option<String>,
    follow: Option<bool>,
    tail: Option<u64>,
}

/// Streams a task's log from the agent that holds its sandbox.
async fn task_logs(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Response> {
    let id = parse_task_id(&id)?;
    let address = {
        let state = app.core.state.read();
        let t = state
            .tasks
            .get(&id)
            .ok_or_else(|| ApiFailure::new(StatusCode::NOT_FOUND, "not_found", format!("no task {id}")))?;
        let agent = t.agent.and_then(|a| state.agents.get(&a)).ok_or_else(|| {
            ApiFailure::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("task {id} never ran on an agent, so it has no logs"),
            )
        })?;
        agent.info.address.clone()
    };
    // Only the two names the agent knows: a value is never passed on as text (it once carried
    // `stdout&tail=1` into the agent's URL).
    let stream = match q.stream.as_deref().unwrap_or("stdout") {
        s @ ("stdout" | "stderr") => s,
        other => {
            return Err(ApiFailure::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("stream {other:?} is not a log stream; use stdout or stderr"),
            ))
        }
    };
    // Only to the agent's own registered host and port, over http, on the logs route, with a
    // path and query built from parsed values (a task id, one of two names, a bool, a number).
    let agent = parse_agent_address(&address).map_err(|e| {
        ApiFailure::new(StatusCode::BAD_GATEWAY, "bad_agent_address", format!("{e}; the agent must register again"))
    })?;
    let mut url = format!("{}/v1/sandboxes/{id}/logs?stream={stream}&follow={}", agent.base, q.follow.unwrap_or(false));
    if let Some(n) = q.tail {
        url.push_str(&format!("&tail={n}"));
    }
    let resp = app.http.get(&url).send().await.map_err(|e| {
        ApiFailure::new(
            StatusCode::BAD_GATEWAY,
            "agent_unreachable",
            format!("cannot reach the agent at {address}: {e}"),
        )
    })?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let mut out = Response::new(Body::from_stream(resp.bytes_stream()));
    *out.status_mut() = status;
    if let Some(ct) = content_type {
        out.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    Ok(out)
}

async fn list_agents(State(app): State<AppState>) -> Json<Vec<AgentView>> {
    let state = app.core.state.read();
    let mut drains = if state.agents.values().any(|a| a.drain.is_some()) {
        state.drain_plan(capstan_state::drain::DRAIN_MOVES_PER_STEP_MAX).agents
    } else {
        Default::default()
    };
    Json(state.agents.values().map(|a| agent_view(&app, &state, a, drains.remove(&a.info.id).as_ref())).collect())
}

/// One agent as the API shows it; `drain`: where its drain stands, if it is draining.
pub(crate) fn agent_view(
    app: &AppState,
    state: &ClusterState,
    a: &capstan_state::Agent,
    drain: Option<&capstan_state::DrainProgress>,
) -> AgentView {
    let c = &a.info.capacity;
    AgentView {
        id: a.info.id,
        hostname: a.info.hostname.clone(),
        address: a.info.address.clone(),
        version: a.info.version.clone(),
        registered_at: rfc3339(a.registered_at),
        attributes: a.info.attributes.clone(),
        capacity: ResourcesView {
            cpus: milli_to_cpus_text(c.cpus_milli),
            mem: ByteSize(c.mem_bytes),
            disk: ByteSize(c.disk_bytes),
            ports: c.port_count(),
        },
        used: ResourcesView {
            cpus: milli_to_cpus_text(a.used.cpus_milli),
            mem: ByteSize(a.used.mem_bytes),
            disk: ByteSize(a.used.disk_bytes),
            ports: a.used_ports.len() as u32,
        },
        tasks: a.tasks.len(),
        liveness: liveness_word(app, a).into(),
        last_seen: app.liveness.last_seen(a.info.id).map(rfc3339),
        unreachable_since: a.liveness.unreachable_since().map(rfc3339),
        drain: a.drain.as_ref().zip(drain).map(|(d, p)| DrainView {
            status: if d.drained_at.is_some() && p.done() { "drained" } else { "draining" }.into(),
            by: d.by.clone(),
            since: rfc3339(d.since),
            drained_at: d.drained_at.map(rfc3339),
            tasks_left: p.to_move + p.stopping + p.batch_running,
            stopping: p.stopping,
            batch_running: p.batch_running,
            blocked_by: p.blocked.iter().map(|b| b.to_string()).collect(),
            waiting: p.waiting.clone(),
            progress: p.describe(),
        }),
        maintenance: crate::drain_http::maintenance_note(state, a.info.id, now()),
    }
}

fn quota_view(state: &ClusterState, role: &str, q: &capstan_state::Quota) -> QuotaView {
    let used = state.production_usage(role);
    let view = |q: &capstan_state::Quota| ResourcesView {
        cpus: q.cpus_milli as f64 / 1000.0,
        mem: ByteSize(q.mem_bytes),
        disk: ByteSize(q.disk_bytes),
        ports: 0,
    };
    QuotaView { role: role.to_string(), quota: view(q), used: view(&used) }
}

async fn list_quotas(State(app): State<AppState>) -> Json<Vec<QuotaView>> {
    let state = app.core.state.read();
    Json(state.quotas.iter().map(|(role, q)| quota_view(&state, role, q)).collect())
}

fn check_role(role: &str) -> ApiResult<()> {
    // A role is the first part of a job key: check it the same way.
    format!("{role}/x/x")
        .parse::<JobKey>()
        .map(|_| ())
        .map_err(|e| ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", e.0))
}

async fn set_quota(State(app): State<AppState>, Path(role): Path<String>, body: Bytes) -> ApiResult<Json<QuotaView>> {
    check_role(&role)?;
    let req: QuotaRequest = parse_body(&body)?;
    if !req.cpus.is_finite() || req.cpus < 0.0 || req.cpus > 1e9 {
        return Err(ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("cpus {}: must be a number from 0 up", req.cpus),
        ));
    }
    let quota = capstan_state::Quota {
        cpus_milli: (req.cpus * 1000.0).round() as u64,
        mem_bytes: req.mem.0,
        disk_bytes: req.disk.0,
    };
    app.core.submit(Command::SetQuota { role: role.clone(), quota: Some(quota) }).await?;
    let state = app.core.state.read();
    Ok(Json(quota_view(&state, &role, &quota)))
}

async fn remove_quota(State(app): State<AppState>, Path(role): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    check_role(&role)?;
    if !app.core.state.read().quotas.contains_key(&role) {
        return Err(ApiFailure::new(StatusCode::NOT_FOUND, "not_found", format!("role {role} has no quota")));
    }
    app.core.submit(Command::SetQuota { role: role.clone(), quota: None }).await?;
    Ok(Json(serde_json::json!({"role": role, "quota": null})))
}

fn scheduler_view(state: &ClusterState) -> SchedulerView {
    SchedulerView {
        max_placements_per_second: state.scheduler.max_placements_per_second,
        pending_tasks: state.pending.len() as u64,
    }
}

async fn get_scheduler(State(app): State<AppState>) -> Json<SchedulerView> {
    Json(scheduler_view(&app.core.state.read()))
}

async fn set_scheduler(State(app): State<AppState>, body: Bytes) -> ApiResult<Json<SchedulerView>> {
    let req: SchedulerView = parse_body(&body)?;
    if req.max_placements_per_second == Some(0) {
        return Err(ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "max_placements_per_second 0 would stop all scheduling; use a positive number, or null for unlimited",
        ));
    }
    let settings = capstan_state::SchedulerSettings { max_placements_per_second: req.max_placements_per_second };
    app.core.submit(Command::SetSchedulerSettings { settings }).await?;
    app.core.pending_changed.notify_one();
    Ok(Json(scheduler_view(&app.core.state.read())))
}

async fn metrics(State(app): State<AppState>) -> Response {
    let text = app.core.metrics.render(&app.core.state.read());
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

// ---- agent protocol

async fn register_agent(State(app): State<AppState>, body: Bytes) -> ApiResult<Json<RegisterResponse>> {
    let Ok(_permit) = app.admission.registrations.try_acquire() else {
        return Err(shed(&app, "registration", 2));
    };
    let req: RegisterRequest = parse_body(&body)?;
    // The master's log proxy calls this address: only a plain http://HOST:PORT is taken.
    parse_agent_address(&req.info.address)
        .map_err(|e| ApiFailure::new(StatusCode::BAD_REQUEST, "bad_agent_address", format!("{e}; not registered")))?;
    let id = req.info.id;
    app.core.submit(Command::RegisterAgent { info: req.info }).await?;
    let applied = app
        .core
        .submit(Command::AgentReconcile {
            agent: id,
            known: req.known_tasks,
            running: req.running_tasks,
            as_of_seq: None,
        })
        .await?;
    app.liveness.seen(id);
    reconcile_events(&app, id, &applied, "registered again");
    let last_update_seq = app.core.state.read().agents.get(&id).map(|a| a.last_update_seq).unwrap_or(0);
    Ok(Json(RegisterResponse {
        master_epoch: app.core.epoch,
        last_update_seq,
        heartbeat_interval_ms: app.liveness.config.heartbeat_interval.as_millis() as u64,
    }))
}

/// Events for what reconciling an agent changed.
fn reconcile_events(app: &AppState, agent: AgentId, applied: &capstan_state::Applied, how: &str) {
    if applied.agent_back {
        app.events.add("agent_back", format!("agent {agent} {how}: it is active again"));
    }
    for (task, why) in &applied.strays_found {
        app.events.add("stray_task", format!("task {task} runs on agent {agent} but {why}"));
    }
    for task in &applied.taken_back {
        app.events.add(
            "task_taken_back",
            format!(
                "task {task} came back with agent {agent} before its replacement started: kept, replacement stopped"
            ),
        );
    }
}

/// The agent is alive; its lists are compared with the state under the read lock and logged as
/// an `AgentReconcile` only when they disagree (or the agent was not active).
async fn agent_heartbeat(
    State(app): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<HeartbeatResponse>> {
    let Ok(_permit) = app.admission.heartbeats.try_acquire() else {
        return Err(shed(&app, "heartbeat", 1));
    };
    let agent: AgentId = id.parse().map_err(|e: String| ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", e))?;
    let req: HeartbeatRequest = parse_body(&body)?;
    if req.agent != agent {
        return Err(ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the body names agent {} but the path agent {agent}", req.agent),
        ));
    }
    app.core.metrics.heartbeats.inc();
    let needed = {
        let state = app.core.state.read();
        if !state.agents.contains_key(&agent) {
            return Err(ApiFailure::new(
                StatusCode::NOT_FOUND,
                "unknown_agent",
                format!("agent {agent} is not registered; register first"),
            ));
        }
        state.reconcile_needed(agent, &req.known_tasks, &req.running_tasks, req.as_of_seq)
    };
    app.liveness.seen(agent);
    if needed {
        let applied = app
            .core
            .submit(Command::AgentReconcile {
                agent,
                known: req.known_tasks,
                running: req.running_tasks,
                as_of_seq: Some(req.as_of_seq),
            })
            .await?;
        reconcile_events(&app, agent, &applied, "answers heartbeats again");
    }
    Ok(Json(HeartbeatResponse {
        master_epoch: app.core.epoch,
        heartbeat_interval_ms: app.liveness.config.heartbeat_interval.as_millis() as u64,
    }))
}

#[derive(Deserialize)]
struct OrdersQuery {
    epoch: Option<u64>,
    version: Option<u64>,
    wait_ms: Option<u64>,
}

/// Long poll: answers at once if the agent's orders changed since `version` (or the master
/// restarted), else when they change, else after `wait_ms` with the same orders.
async fn agent_orders(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<OrdersQuery>,
) -> ApiResult<Json<Orders>> {
    let agent: AgentId = id.parse().map_err(|e: String| ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", e))?;
    let epoch = app.core.epoch;
    let known = q.version.unwrap_or(0);
    let fresh = q.epoch != Some(epoch);
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(30_000).min(60_000));
    // An agent asking for its orders is alive, whether or not its heartbeats get through.
    if app.core.state.read().agents.contains_key(&agent) {
        app.liveness.seen(agent);
    }
    if !fresh {
        app.core.wait_agent(agent, wait, |s| s.agents.get(&agent).is_none_or(|a| a.orders_version != known)).await;
    }
    if app.core.is_closed() {
        // The term ended while the agent waited: no orders from it; the agent asks the leader.
        return Err(CoreError::Closed.into());
    }
    let state = app.core.state.read();
    let a = state.agents.get(&agent).ok_or_else(|| {
        ApiFailure::new(
            StatusCode::NOT_FOUND,
            "unknown_agent",
            format!("agent {agent} is not registered; register first"),
        )
    })?;
    let tasks = state
        .tasks_on(agent)
        .filter_map(|t| {
            let job = state.job_of(t)?;
            let spec = job.spec_for(t.job_version);
            Some(order_for(t, &spec.task, spec.health_check.as_ref()))
        })
        .collect();
    // Strays are stopped only when the master's view is complete (not while agents may still be
    // re-registering), never while frozen, and unknown ones only after the grace period.
    let grace = app.liveness.config.stray_grace.as_millis() as u64;
    let t_now = now();
    let stop = if state.frozen.is_some() || app.liveness.reregistering() {
        vec![]
    } else {
        a.strays
            .iter()
            .filter(|(_, s)| s.stop_now || s.since.plus_ms(grace) <= t_now)
            .map(|(task, s)| StopOrder { task: *task, reason: s.reason.clone() })
            .collect()
    };
    Ok(Json(Orders { master_epoch: epoch, version: a.orders_version, tasks, stop, frozen: state.frozen.is_some() }))
}

fn order_for(t: &Task, spec: &TaskSpec, health_check: Option<&capstan_model::spec::HealthCheckSpec>) -> Order {
    Order {
        task: t.id,
        job: (*t.job).clone(),
        instance: t.instance,
        desired: t.desired,
        spec: spec.clone(),
        ports: spec.ports.iter().cloned().zip(t.ports.iter().copied()).collect(),
        health_check: health_check.cloned(),
    }
}

/// Keeps the newest usage per task, for tasks the master knows on that agent.
async fn agent_usage(State(app): State<AppState>, body: Bytes) -> ApiResult<Json<serde_json::Value>> {
    let req: UsageReport = parse_body(&body)?;
    let state = app.core.state.read();
    let mut usage = app.usage.lock();
    let mut kept = 0;
    for u in req.tasks {
        if state.tasks.get(&u.task).is_some_and(|t| t.agent == Some(req.agent)) {
            usage.insert(u.task, u);
            kept += 1;
        }
    }
    // Forget tasks the state no longer has, so the map is bounded by the number of tasks.
    if usage.len() > state.tasks.len() {
        usage.retain(|id, _| state.tasks.contains_key(id));
    }
    Ok(Json(serde_json::json!({"kept": kept})))
}

/// A turn to apply a status-update batch: at once if one of [`MAX_UPDATE_BATCHES`] is free, else
/// after waiting in line (FIFO) for at most [`UPDATE_TURN_WAIT_MS`]; shed (503) when the line is
/// full or the wait runs out.
async fn update_turn(app: &AppState) -> ApiResult<tokio::sync::SemaphorePermit<'_>> {
    use std::sync::atomic::Ordering;
    let admission = &app.admission;
    if let Ok(permit) = admission.updates.try_acquire() {
        return Ok(permit);
    }
    // Counted out again on drop: a caller that hangs up while waiting leaves the line too.
    struct InLine<'a>(&'a std::sync::atomic::AtomicUsize);
    impl Drop for InLine<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let in_line = InLine(&admission.updates_waiting);
    if in_line.0.fetch_add(1, Ordering::AcqRel) >= MAX_UPDATE_BATCHES_WAITING {
        return Err(shed(app, "status update", 1));
    }
    let wait = std::time::Duration::from_millis(UPDATE_TURN_WAIT_MS);
    match tokio::time::timeout(wait, admission.updates.acquire()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(shed(app, "status update", 1)),
    }
}

async fn agent_updates(State(app): State<AppState>, body: Bytes) -> ApiResult<Json<UpdatesResponse>> {
    let _permit = update_turn(&app).await?;
    let req: UpdatesRequest = parse_body(&body)?;
    if req.updates.len() > MAX_UPDATES_PER_BATCH {
        return Err(ApiFailure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_updates",
            format!("{} status updates in one batch; send at most {MAX_UPDATES_PER_BATCH}", req.updates.len()),
        ));
    }
    app.core.metrics.status_updates.inc_by(req.updates.len() as u64);
    let agent = req.agent;
    let last = req.updates.iter().map(|u| u.seq).max();
    if last.is_some() {
        app.core.submit(Command::AgentUpdates { agent: req.agent, updates: req.updates }).await?;
    }
    let state = app.core.state.read();
    let a = state.agents.get(&agent).ok_or_else(|| {
        ApiFailure::new(StatusCode::NOT_FOUND, "unknown_agent", format!("agent {agent} is not registered"))
    })?;
    Ok(Json(UpdatesResponse { acked_seq: a.last_update_seq }))
}

// ---- views

fn task_view(state: &ClusterState, t: &Task, usage: &std::collections::HashMap<TaskId, TaskUsage>) -> TaskView {
    let spec_ports = state.job_of(t).map(|j| j.spec_for(t.job_version).task.ports.clone()).unwrap_or_default();
    let agent = t.agent.and_then(|a| state.agents.get(&a));
    TaskView {
        id: t.id,
        job: (*t.job).clone(),
        instance: t.instance,
        state: t.state,
        desired: t.desired,
        agent_id: t.agent,
        host: agent.map(|a| a.info.hostname.clone()),
        ports: spec_ports.into_iter().zip(t.ports.iter().copied()).collect(),
        pid: t.pid,
        health: t
            .healthy
            .filter(|_| t.state == TaskState::Running)
            .map(|h| if h { "healthy" } else { "unhealthy" }.to_string()),
        reason: t.reason().to_string(),
        exit: t.exit.clone(),
        usage: usage.get(&t.id).cloned(),
        failures: t.failures,
        created_at: rfc3339(t.created_at),
        not_before: (t.state == TaskState::Pending && t.not_before > now()).then(|| rfc3339(t.not_before)),
        events: t
            .events
            .iter()
            .map(|e| TaskEventView { at: rfc3339(e.at), state: e.state, reason: e.reason.to_string() })
            .collect(),
        version: t.job_version,
    }
}

fn job_view(state: &ClusterState, j: &Job, unplaced: &crate::scheduler::UnplacedReasons) -> JobView {
    let mut tasks: BTreeMap<String, u64> = BTreeMap::new();
    let mut why_pending: BTreeMap<String, u32> = BTreeMap::new();
    let mut all_running = true;
    // A system job's dropped instances (agents removed or no longer matching) do not count.
    for id in j.current.iter().filter(|(i, _)| !j.is_system() || j.pinned.contains_key(*i)).map(|(_, id)| id) {
        let Some(t) = state.tasks.get(id) else { continue };
        *tasks.entry(t.state.as_str().to_string()).or_default() += 1;
        all_running &= t.state == TaskState::Running && t.desired == Desired::Run;
        if t.state == TaskState::Pending {
            let why = unplaced
                .tasks
                .get(id)
                .or_else(|| unplaced.jobs.get(&j.spec.job))
                .cloned()
                .unwrap_or_else(|| t.reason().to_string());
            *why_pending.entry(why).or_default() += 1;
        }
    }
    let mut reasons: Vec<String> = why_pending
        .into_iter()
        .map(|(why, n)| format!("{n} of {} instances pending: {why}", j.instance_count()))
        .collect();
    let system_idle = j.is_system() && j.pinned.is_empty() && j.killed.is_none();
    if system_idle {
        reasons.push("no active agent matches the job's constraints: an instance starts on each one that joins".into());
    }
    let batch = matches!(j.spec.job_type, JobType::Batch | JobType::Cron);
    let status = if j.killed.is_some() {
        "killing"
    } else if batch && j.finished_at.is_some() {
        if j.done.values().all(|ok| *ok) {
            "finished"
        } else {
            "failed"
        }
    } else if all_running && (!j.current.is_empty() || system_idle) {
        "running"
    } else {
        "starting"
    };
    // A cron job is never finished: its runs each have their own end, in `cron.runs`.
    let cron = crate::cron::view(j, now());
    let finished_at = j.finished_at.filter(|_| cron.is_none());
    JobView {
        job: j.spec.job.clone(),
        job_type: j.spec.job_type.as_str().into(),
        status: crate::cron::status(state, j).unwrap_or(status).into(),
        instances: j.instance_count(),
        version: j.version,
        created_at: rfc3339(j.created_at),
        finished_at: finished_at.map(rfc3339),
        duration_ms: finished_at.map(|f| f.since(j.created_at)),
        tasks,
        pending_reasons: reasons,
        spec: (*j.spec).clone(),
        cron,
        update: j.updates.active.as_ref().map(|u| crate::updater::update_view(state, j, u)),
    }
}

// ---- cron jobs

#[derive(Deserialize, Default)]
struct StartRequest {
    /// Who asks, for the run's record.
    by: Option<String>,
}

/// `POST /v1/jobs/{role}/{env}/{name}/start`: a run of a cron job now, under its collision policy.
async fn start_job(
    State(app): State<AppState>,
    Path((role, env, name)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult<Json<capstan_api::wire::CronStartedView>> {
    let key = parse_job_key(&role, &env, &name)?;
    let req: StartRequest = if body.is_empty() { StartRequest::default() } else { parse_body(&body)? };
    let by = match req.by.as_deref().map(str::trim) {
        Some(who) if !who.is_empty() => format!("started by hand by {who}"),
        _ => "started by hand (capstan job start)".to_string(),
    };
    let command = Command::StartCronRun { job: key.clone(), scheduled_at: None, missed: 0, seed: rand::random(), by };
    let applied = app.core.submit(command).await?;
    let started = applied.cron.ok_or_else(|| {
        ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the run request changed nothing")
    })?;
    crate::cron::record_event(&app.events, &key, &started, None, 0);
    Ok(Json(crate::cron::started_view(&key, &started, applied.created)))
}

// ---- operator controls

/// Every mutating answer says so while the cluster is frozen.
async fn frozen_notice(
    State(app): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mutating = req.method() != axum::http::Method::GET && !req.uri().path().starts_with("/v1/agent/");
    let mut resp = next.run(req).await;
    if mutating {
        if let Some(f) = &app.core.state.read().frozen {
            let text = format!("{} (frozen by {} since {})", f.reason, f.by, rfc3339(f.at));
            // Header values are visible ASCII; anything else is replaced.
            let ascii: String = text.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
            if let Ok(v) = axum::http::HeaderValue::from_str(&ascii) {
                resp.headers_mut().insert(FROZEN_HEADER, v);
            }
        }
    }
    resp
}

/// An agent's liveness as the API says it: `reregistering` for an active agent this master has
/// not heard from yet while it waits for agents to call in.
fn liveness_word(app: &AppState, a: &capstan_state::Agent) -> &'static str {
    let unheard = app.liveness.last_seen(a.info.id).is_none();
    if a.liveness == capstan_state::Liveness::Active && unheard && app.liveness.reregistering() {
        "reregistering"
    } else {
        a.liveness.as_str()
    }
}

fn admin_status_of(app: &AppState) -> AdminStatus {
    let state = app.core.state.read();
    let c = &app.liveness.config;
    let mut agents: BTreeMap<String, u64> = BTreeMap::new();
    for a in state.agents.values() {
        *agents.entry(liveness_word(app, a).into()).or_default() += 1;
    }
    let breaker = app.liveness.breaker();
    AdminStatus {
        frozen: state.frozen.as_ref().map(|f| FreezeView {
            reason: f.reason.clone(),
            by: f.by.clone(),
            since: rfc3339(f.at),
        }),
        breaker: BreakerView {
            tripped: breaker.is_some(),
            reason: breaker.as_ref().map(|t| t.reason.clone()),
            since: breaker.as_ref().map(|t| rfc3339(t.since)),
            threshold: c.breaker_threshold,
            window_ms: c.breaker_window.as_millis() as u64,
            fault_domain: c.fault_domain.clone(),
        },
        reregistration_until: app.liveness.reregistration_until().map(rfc3339),
        agents,
        removals_total: state.counters.agent_removals,
        tasks_replaced_total: state.counters.tasks_replaced_unreachable,
        stray_tasks: state.agents.values().map(|a| a.strays.len() as u64).sum(),
        settings: LivenessSettingsView {
            heartbeat_interval_ms: c.heartbeat_interval.as_millis() as u64,
            agent_timeout_ms: c.agent_timeout.as_millis() as u64,
            agent_removal_rate: c.removal_rate.to_string(),
            reregistration_period_ms: c.reregistration_period.as_millis() as u64,
            stray_grace_ms: c.stray_grace.as_millis() as u64,
        },
    }
}

async fn admin_status(State(app): State<AppState>) -> Json<AdminStatus> {
    Json(admin_status_of(&app))
}

/// The longest `by` of an operator request.
pub const OPERATOR_BYTES_MAX: usize = 256;
/// The longest freeze reason: it is echoed in a header of every answer while frozen, so it must
/// stay far below what HTTP clients accept in a response head.
pub const FREEZE_REASON_BYTES_MAX: usize = 1024;

fn check_operator(by: &str) -> ApiResult<()> {
    if by.trim().is_empty() {
        return Err(ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", "`by` must say who asks (user@host)"));
    }
    check_header_text("by", by, OPERATOR_BYTES_MAX)
}

/// Text that ends up in a response header: bounded, one line, no control characters.
fn check_header_text(field: &str, text: &str, bytes_max: usize) -> ApiResult<()> {
    if text.len() > bytes_max {
        return Err(ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("`{field}` has {} bytes; at most {bytes_max} are allowed", text.len()),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("`{field}` must be one line of text, without control characters"),
        ));
    }
    Ok(())
}

async fn freeze(State(app): State<AppState>, body: Bytes) -> ApiResult<Json<AdminStatus>> {
    let req: FreezeRequest = parse_body(&body)?;
    check_operator(&req.by)?;
    if req.reason.trim().is_empty() {
        return Err(ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a freeze needs a reason, for whoever finds the cluster frozen",
        ));
    }
    check_header_text("reason", &req.reason, FREEZE_REASON_BYTES_MAX)?;
    let freeze =
        capstan_state::Freeze { reason: req.reason.trim().to_string(), by: req.by.trim().to_string(), at: now() };
    app.core.submit(Command::SetFreeze { freeze: Some(freeze.clone()) }).await?;
    app.events.add(
        "frozen",
        format!(
            "cluster frozen by {}: {}; kills, replacements, preemptions and removals are paused",
            freeze.by, freeze.reason
        ),
    );
    Ok(Json(admin_status_of(&app)))
}

async fn unfreeze(State(app): State<AppState>, body: Bytes) -> ApiResult<Json<AdminStatus>> {
    let req: OperatorRequest = parse_body(&body)?;
    check_operator(&req.by)?;
    let was = app.core.state.read().frozen.clone();
    if let Some(f) = was {
        app.core.submit(Command::SetFreeze { freeze: None }).await?;
        app.events
            .add("unfrozen", format!("cluster unfrozen by {} (frozen by {} for: {})", req.by.trim(), f.by, f.reason));
    }
    Ok(Json(admin_status_of(&app)))
}

async fn reset_breaker(State(app): State<AppState>, body: Bytes) -> ApiResult<Json<AdminStatus>> {
    let req: OperatorRequest = parse_body(&body)?;
    check_operator(&req.by)?;
    if let Some(trip) = app.liveness.reset_breaker() {
        app.events.add(
            "breaker_reset",
            format!(
                "reset by {}: removals resume at the removal rate (it had tripped: {})",
                req.by.trim(),
                trip.reason
            ),
        );
    }
    Ok(Json(admin_status_of(&app)))
}

#[derive(Deserialize)]
struct EventsQuery {
    after: Option<u64>,
    wait_ms: Option<u64>,
}

async fn events(State(app): State<AppState>, Query(q): Query<EventsQuery>) -> Json<EventsPage> {
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0).min(60_000));
    let (events, missed, next) = app.events.wait_read(q.after.unwrap_or(0), wait).await;
    Json(EventsPage { events, next, missed })
}
