//! An HTTP client for the master's API. With several masters it finds the leader: it starts
//! with the master that answered last, follows a follower's redirect (307) to the leader and
//! remembers it, and moves on to the next address when a master cannot be reached or says that
//! no master leads yet (503 with `capstan-leader: none`).

use crate::wire::*;
use capstan_model::{AgentId, TaskId};
use serde::de::DeserializeOwned;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The master answered with an error body.
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        details: Vec<serde_json::Value>,
        /// The master's `Retry-After` (seconds), when it sheds load.
        retry_after_secs: Option<u64>,
    },
    /// No master could be reached.
    #[error("cannot reach a Capstan master at {addrs}: {detail}")]
    Unreachable { addrs: String, detail: String },
    #[error("unexpected answer from {url}: {detail}")]
    Protocol { url: String, detail: String },
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How long a request waits for a leader while every master says that none leads.
pub const LEADER_WAIT: Duration = Duration::from_secs(6);

/// A request body: JSON, or raw bytes (a backup file).
enum Body {
    Json(serde_json::Value),
    Raw(bytes::Bytes),
}

/// Items per page when the client reads a whole list (`Client::tasks`, `Client::jobs`).
pub const LIST_PAGE_ITEMS: usize = 1_000;

#[derive(Clone, Debug)]
pub struct Client {
    addrs: Vec<String>,
    http: reqwest::Client,
    frozen: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// The address tried first: the one that answered last (the leader, as far as we know).
    preferred: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Client {
    /// `addrs`: `http://host:port[,http://host:port…]`.
    pub fn new(addrs: &str) -> Client {
        let addrs = addrs
            .split(',')
            .map(|a| a.trim().trim_end_matches('/').to_string())
            .filter(|a| !a.is_empty())
            .map(|a| if a.contains("://") { a } else { format!("http://{a}") })
            .collect();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .expect("building an HTTP client cannot fail with these settings");
        Client { addrs, http, frozen: Default::default(), preferred: Default::default() }
    }

    /// The master tried first now.
    pub fn current(&self) -> Option<&str> {
        let n = self.addrs.len();
        (n > 0).then(|| self.addrs[self.preferred.load(std::sync::atomic::Ordering::Relaxed) % n].as_str())
    }

    /// Tries another master first from now on (the current one answered as a deposed leader).
    pub fn prefer_next(&self) {
        if !self.addrs.is_empty() {
            let n = self.addrs.len();
            let _ = self.preferred.fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |i| Some((i + 1) % n),
            );
        }
    }

    /// Remembers which master answered: the one asked, or the one a redirect led to.
    fn remember(&self, asked: usize, answered: &reqwest::Url) {
        let origin = answered.origin();
        let index =
            self.addrs.iter().position(|a| reqwest::Url::parse(a).is_ok_and(|u| u.origin() == origin)).unwrap_or(asked);
        self.preferred.store(index, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<reqwest::Response, ApiError> {
        self.send_body(method, path, body.map(Body::Json), timeout).await
    }

    async fn send_body(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Body>,
        timeout: Duration,
    ) -> Result<reqwest::Response, ApiError> {
        let waiting_since = std::time::Instant::now();
        loop {
            let mut dead_leader = false;
            match self.send_once(&method, path, body.as_ref(), timeout, &mut dead_leader).await {
                // Every master that answered said that none leads (a failover, a restore): the
                // request was not served, so asking again is safe. Wait a little for a leader.
                Ok(resp)
                    if resp.headers().get(LEADER_HEADER).is_some_and(|v| v == "none")
                        && waiting_since.elapsed() < LEADER_WAIT =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // No master could be reached, during what looks like a failover: a new leader comes
                // within the lease; ask again meanwhile.
                Err(ApiError::Unreachable { .. }) if dead_leader && waiting_since.elapsed() < LEADER_WAIT => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    async fn send_once(
        &self,
        method: &reqwest::Method,
        path: &str,
        body: Option<&Body>,
        timeout: Duration,
        dead_leader: &mut bool,
    ) -> Result<reqwest::Response, ApiError> {
        let mut last = String::from("no address given");
        let n = self.addrs.len();
        let first = self.preferred.load(std::sync::atomic::Ordering::Relaxed);
        let mut no_leader = None;
        for k in 0..n {
            let i = (first + k) % n;
            let url = format!("{}{path}", self.addrs[i]);
            let mut req = self.http.request(method.clone(), &url).timeout(timeout);
            match body {
                Some(Body::Json(b)) => req = req.json(b),
                Some(Body::Raw(b)) => {
                    req = req.header(reqwest::header::CONTENT_TYPE, "application/octet-stream").body(b.clone())
                }
                None => {}
            }
            match req.send().await {
                Ok(resp)
                    if resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE
                        && resp.headers().get(LEADER_HEADER).is_some_and(|v| v == "none") =>
                {
                    // This master knows no leader yet; another one may.
                    last = format!("{url}: no master leads yet");
                    no_leader = Some(resp);
                }
                Ok(resp) => {
                    self.remember(i, resp.url());
                    let notice = resp.headers().get(FROZEN_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
                    if notice.is_some() {
                        *self.frozen.lock().expect("not poisoned") = notice;
                    }
                    return Ok(resp);
                }
                // Refused, or the connection broke (a master killed while a pooled connection to it
                // was open): try the next master. A timeout is not retried here: the master may
                // still be working on the request.
                Err(e) if !e.is_timeout() => {
                    // With several masters, one that cannot be reached is a failover under way (the
                    // leader died; followers send clients to it until its lease runs out); with
                    // one, it is a redirect to a leader that does not answer.
                    *dead_leader |= n > 1 || e.url().is_some_and(|failed| !failed.as_str().starts_with(&self.addrs[i]));
                    last = format!("{}: {}", e.url().map_or(url.as_str(), |u| u.as_str()), describe(&e));
                }
                Err(e) => {
                    return Err(ApiError::Unreachable {
                        addrs: self.addrs.join(","),
                        detail: format!("{url}: {}", describe(&e)),
                    })
                }
            }
        }
        // Every master that answered said none leads: let the caller see the 503 and its
        // Retry-After, and try again.
        if let Some(resp) = no_leader {
            return Ok(resp);
        }
        Err(ApiError::Unreachable { addrs: self.addrs.join(","), detail: last })
    }

    async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ApiError> {
        let url = resp.url().to_string();
        let status = resp.status();
        let retry_after_secs = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let bytes = resp.bytes().await.map_err(|e| ApiError::Protocol { url: url.clone(), detail: e.to_string() })?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => ApiError::Api {
                    status: status.as_u16(),
                    code: b.error.code,
                    message: b.error.message,
                    details: b.error.details,
                    retry_after_secs,
                },
                Err(_) => ApiError::Api {
                    status: status.as_u16(),
                    code: "http".into(),
                    message: format!("{status}: {}", String::from_utf8_lossy(&bytes)),
                    details: vec![],
                    retry_after_secs,
                },
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Protocol { url, detail: e.to_string() })
    }

    async fn post<T: DeserializeOwned>(&self, path: &str, body: serde_json::Value) -> Result<T, ApiError> {
        Self::decode(self.send(reqwest::Method::POST, path, Some(body), Duration::from_secs(30)).await?).await
    }

    /// The frozen notice of the latest answer that carried one (see [`FROZEN_HEADER`]): the CLI
    /// shows it after a mutating command.
    pub fn frozen_notice(&self) -> Option<String> {
        self.frozen.lock().expect("not poisoned").clone()
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        Self::decode(self.send(reqwest::Method::GET, path, None, Duration::from_secs(30)).await?).await
    }

    pub async fn health(&self) -> Result<serde_json::Value, ApiError> {
        self.get("/v1/health").await
    }

    /// Creates a job from its JSON spec (as `JobSpec` serializes, or as a job file reads).
    pub async fn create_job(&self, spec: &serde_json::Value) -> Result<CreatedJob, ApiError> {
        Self::decode(self.send(reqwest::Method::POST, "/v1/jobs", Some(spec.clone()), Duration::from_secs(30)).await?)
            .await
    }

    pub async fn jobs(&self) -> Result<Vec<JobView>, ApiError> {
        self.get_all("/v1/jobs").await
    }

    /// Every item of a list route, a page of `LIST_PAGE_ITEMS` at a time, following each page's
    /// [`NEXT_HEADER`] (a master that does not page answers everything at once, without it).
    /// Pages are read one after the other, not as one snapshot: an item added meanwhile before
    /// the cursor is not seen, and none is seen twice.
    async fn get_all<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>, ApiError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut all = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page_path = match &next {
                None => format!("{path}{sep}limit={LIST_PAGE_ITEMS}"),
                Some(n) => format!("{path}{sep}limit={LIST_PAGE_ITEMS}&next={n}"),
            };
            let resp = self.send(reqwest::Method::GET, &page_path, None, Duration::from_secs(30)).await?;
            let following = resp.headers().get(NEXT_HEADER).and_then(|v| v.to_str().ok()).map(String::from);
            let page: Vec<T> = Self::decode(resp).await?;
            all.extend(page);
            match following {
                Some(n) if next.as_ref() != Some(&n) => next = Some(n),
                _ => return Ok(all),
            }
        }
    }

    pub async fn job(&self, key: &str) -> Result<JobView, ApiError> {
        self.get(&format!("/v1/jobs/{key}")).await
    }

    /// Starts a run of a cron job now (`POST /v1/jobs/{key}/start`).
    pub async fn start_job(&self, key: &str) -> Result<CronStartedView, ApiError> {
        self.post(&format!("/v1/jobs/{key}/start"), serde_json::json!({})).await
    }

    pub async fn kill_job(&self, key: &str) -> Result<serde_json::Value, ApiError> {
        Self::decode(
            self.send(reqwest::Method::DELETE, &format!("/v1/jobs/{key}"), None, Duration::from_secs(30)).await?,
        )
        .await
    }

    pub async fn tasks(&self, job: Option<&str>, state: Option<&str>) -> Result<Vec<TaskView>, ApiError> {
        let mut q = vec![];
        if let Some(j) = job {
            q.push(format!("job={j}"));
        }
        if let Some(s) = state {
            q.push(format!("state={s}"));
        }
        let qs = if q.is_empty() { String::new() } else { format!("?{}", q.join("&")) };
        self.get_all(&format!("/v1/tasks{qs}")).await
    }

    pub async fn task(&self, id: TaskId) -> Result<TaskView, ApiError> {
        self.get(&format!("/v1/tasks/{id}")).await
    }

    pub async fn kill_task(&self, id: TaskId) -> Result<TaskView, ApiError> {
        Self::decode(
            self.send(reqwest::Method::DELETE, &format!("/v1/tasks/{id}"), None, Duration::from_secs(30)).await?,
        )
        .await
    }

    pub async fn agents(&self) -> Result<Vec<AgentView>, ApiError> {
        self.get("/v1/agents").await
    }

    /// A task's log as a byte stream (follows when asked).
    pub async fn logs(
        &self,
        id: TaskId,
        stderr: bool,
        follow: bool,
        tail: Option<u64>,
    ) -> Result<reqwest::Response, ApiError> {
        let mut path =
            format!("/v1/tasks/{id}/logs?stream={}&follow={follow}", if stderr { "stderr" } else { "stdout" });
        if let Some(n) = tail {
            path.push_str(&format!("&tail={n}"));
        }
        let timeout = if follow { Duration::from_secs(365 * 24 * 3600) } else { Duration::from_secs(60) };
        let resp = self.send(reqwest::Method::GET, &path, None, timeout).await?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(Self::decode::<serde_json::Value>(resp).await.expect_err("a failed status decodes to an error"))
        }
    }

    pub async fn quotas(&self) -> Result<Vec<QuotaView>, ApiError> {
        self.get("/v1/quotas").await
    }

    pub async fn set_quota(&self, role: &str, req: &QuotaRequest) -> Result<QuotaView, ApiError> {
        let body = serde_json::to_value(req).expect("serializable");
        Self::decode(
            self.send(reqwest::Method::PUT, &format!("/v1/quotas/{role}"), Some(body), Duration::from_secs(30)).await?,
        )
        .await
    }

    pub async fn remove_quota(&self, role: &str) -> Result<serde_json::Value, ApiError> {
        Self::decode(
            self.send(reqwest::Method::DELETE, &format!("/v1/quotas/{role}"), None, Duration::from_secs(30)).await?,
        )
        .await
    }

    pub async fn scheduler(&self) -> Result<SchedulerView, ApiError> {
        self.get("/v1/scheduler").await
    }

    pub async fn set_scheduler(&self, max_placements_per_second: Option<u32>) -> Result<SchedulerView, ApiError> {
        let body = serde_json::json!({ "max_placements_per_second": max_placements_per_second });
        Self::decode(self.send(reqwest::Method::PUT, "/v1/scheduler", Some(body), Duration::from_secs(30)).await?).await
    }

    pub async fn admin_status(&self) -> Result<AdminStatus, ApiError> {
        self.get("/v1/admin/status").await
    }

    pub async fn freeze(&self, req: &FreezeRequest) -> Result<AdminStatus, ApiError> {
        self.post("/v1/admin/freeze", serde_json::to_value(req).expect("serializable")).await
    }

    pub async fn unfreeze(&self, req: &OperatorRequest) -> Result<AdminStatus, ApiError> {
        self.post("/v1/admin/unfreeze", serde_json::to_value(req).expect("serializable")).await
    }

    pub async fn reset_breaker(&self, req: &OperatorRequest) -> Result<AdminStatus, ApiError> {
        self.post("/v1/admin/breaker/reset", serde_json::to_value(req).expect("serializable")).await
    }

    /// Events after `after`; waits up to `wait` for one when there is none yet.
    pub async fn events(&self, after: u64, wait: Duration) -> Result<EventsPage, ApiError> {
        let path = format!("/v1/events?after={after}&wait_ms={}", wait.as_millis());
        Self::decode(self.send(reqwest::Method::GET, &path, None, wait + Duration::from_secs(10)).await?).await
    }

    pub async fn metrics(&self) -> Result<String, ApiError> {
        let resp = self.send(reqwest::Method::GET, "/metrics", None, Duration::from_secs(30)).await?;
        resp.text().await.map_err(|e| ApiError::Protocol { url: "/metrics".into(), detail: e.to_string() })
    }

    // ---- agent protocol

    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ApiError> {
        let body = serde_json::to_value(req).expect("serializable");
        Self::decode(self.send(reqwest::Method::POST, "/v1/agent/register", Some(body), Duration::from_secs(30)).await?)
            .await
    }

    /// Waits up to `wait` for orders newer than `version` of `epoch`.
    pub async fn orders(&self, agent: AgentId, epoch: u64, version: u64, wait: Duration) -> Result<Orders, ApiError> {
        let path = format!("/v1/agent/{agent}/orders?epoch={epoch}&version={version}&wait_ms={}", wait.as_millis());
        Self::decode(self.send(reqwest::Method::GET, &path, None, wait + Duration::from_secs(10)).await?).await
    }

    pub async fn heartbeat(&self, req: &HeartbeatRequest) -> Result<HeartbeatResponse, ApiError> {
        let body = serde_json::to_value(req).expect("serializable");
        let path = format!("/v1/agent/{}/heartbeat", req.agent);
        Self::decode(self.send(reqwest::Method::POST, &path, Some(body), Duration::from_secs(10)).await?).await
    }

    pub async fn send_usage(&self, req: &UsageReport) -> Result<serde_json::Value, ApiError> {
        let body = serde_json::to_value(req).expect("serializable");
        Self::decode(self.send(reqwest::Method::POST, "/v1/agent/usage", Some(body), Duration::from_secs(30)).await?)
            .await
    }

    pub async fn send_updates(&self, req: &UpdatesRequest) -> Result<UpdatesResponse, ApiError> {
        let body = serde_json::to_value(req).expect("serializable");
        Self::decode(self.send(reqwest::Method::POST, "/v1/agent/updates", Some(body), Duration::from_secs(30)).await?)
            .await
    }

    // ---- rolling updates

    /// Starts a rolling update of job `key` to `spec` (a job spec as JSON).
    pub async fn start_update(&self, key: &str, req: &UpdateRequest) -> Result<JobUpdatesView, ApiError> {
        self.post(&format!("/v1/jobs/{key}/update"), serde_json::to_value(req).expect("serializable")).await
    }

    /// The job's update in progress and its history.
    pub async fn job_updates(&self, key: &str) -> Result<JobUpdatesView, ApiError> {
        self.get(&format!("/v1/jobs/{key}/update")).await
    }

    /// `action`: promote, pause, resume, abort or rollback.
    pub async fn update_action(&self, key: &str, action: &str, by: &str) -> Result<JobUpdatesView, ApiError> {
        let body = serde_json::to_value(OperatorRequest { by: by.to_string() }).expect("serializable");
        self.post(&format!("/v1/jobs/{key}/update/{action}"), body).await
    }
}

/// Drain and maintenance.
impl Client {
    /// Stops placing on the agent and moves its service tasks away within each job's SLA.
    pub async fn drain_agent(&self, agent: AgentId, req: &OperatorRequest) -> Result<AgentView, ApiError> {
        self.post(&format!("/v1/agents/{agent}/drain"), serde_json::to_value(req).expect("serializable")).await
    }

    pub async fn undrain_agent(&self, agent: AgentId, req: &OperatorRequest) -> Result<AgentView, ApiError> {
        self.post(&format!("/v1/agents/{agent}/undrain"), serde_json::to_value(req).expect("serializable")).await
    }

    pub async fn maintenance(&self) -> Result<Vec<MaintenanceView>, ApiError> {
        self.get("/v1/admin/maintenance").await
    }

    pub async fn schedule_maintenance(&self, req: &MaintenanceRequest) -> Result<MaintenanceView, ApiError> {
        self.post("/v1/admin/maintenance", serde_json::to_value(req).expect("serializable")).await
    }

    pub async fn cancel_maintenance(&self, id: u64, req: &OperatorRequest) -> Result<MaintenanceView, ApiError> {
        self.post(&format!("/v1/admin/maintenance/{id}/cancel"), serde_json::to_value(req).expect("serializable")).await
    }

    pub async fn safe_to_drain(&self, percent: f64) -> Result<SafeToDrainView, ApiError> {
        self.get(&format!("/v1/admin/sla/safe-to-drain?percent={percent}")).await
    }
}

impl Client {
    /// `GET /v1/leader` of one master (not redirected: every master answers it).
    pub async fn leader_of(&self, base: &str) -> Result<LeaderView, ApiError> {
        let url = format!("{}/v1/leader", base.trim_end_matches('/'));
        let resp = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| ApiError::Unreachable { addrs: base.to_string(), detail: format!("{url}: {e}") })?;
        Self::decode(resp).await
    }
}

/// Backup and restore: bodies that are not JSON (a backup file, a dump).
impl Client {
    /// A request with a raw body (or none), to the leader as [`Client::send`] finds it.
    async fn send_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<reqwest::Response, ApiError> {
        // Shared, not copied, for each address tried.
        self.send_body(method, path, body.map(|b| Body::Raw(bytes::Bytes::from(b))), timeout).await
    }

    /// The body of a successful answer as bytes; an error answer as its [`ApiError`].
    async fn body_bytes(resp: reqwest::Response) -> Result<Vec<u8>, ApiError> {
        if !resp.status().is_success() {
            return Err(Self::decode::<serde_json::Value>(resp)
                .await
                .expect_err("an error status decodes to an error"));
        }
        let url = resp.url().to_string();
        let bytes = resp.bytes().await.map_err(|e| ApiError::Protocol { url, detail: e.to_string() })?;
        Ok(bytes.to_vec())
    }

    /// `GET /v1/admin/backup`: the backup file of the master's state now.
    pub async fn backup(&self) -> Result<Vec<u8>, ApiError> {
        let resp = self.send_raw(reqwest::Method::GET, "/v1/admin/backup", None, Duration::from_secs(600)).await?;
        Self::body_bytes(resp).await
    }

    /// `GET /v1/admin/dump`: the whole state as canonical JSON text.
    pub async fn dump(&self) -> Result<Vec<u8>, ApiError> {
        let resp = self.send_raw(reqwest::Method::GET, "/v1/admin/dump", None, Duration::from_secs(600)).await?;
        Self::body_bytes(resp).await
    }

    /// `POST /v1/admin/restore`: sends a backup file; `source` names it in the restored state.
    pub async fn restore(
        &self,
        file: Vec<u8>,
        source: &str,
        dry_run: bool,
        force: bool,
    ) -> Result<RestoreView, ApiError> {
        let source: String = source
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let path = format!("/v1/admin/restore?dry_run={dry_run}&force={force}&source={source}");
        let resp = self.send_raw(reqwest::Method::POST, &path, Some(file), Duration::from_secs(600)).await?;
        Self::decode(resp).await
    }
}

/// A request error with its causes ("error sending request: connection refused"), which
/// reqwest's own message leaves out.
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
