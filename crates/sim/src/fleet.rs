//! A fleet of simulated agents in one process, each speaking the real agent protocol to a real
//! master: register, long-poll orders, report numbered status updates until acknowledged, send
//! heartbeats with what they run, obey stop orders, and back off when the master sheds load.
//!
//! Built so that 10,000 agents fit on two cores:
//! - one shared HTTP client (HTTP/1.1, one connection per agent's long poll, pooled);
//! - per agent one tokio task, which is the long poll itself; no thread, no timer of its own
//!   (a sleep only while backing off after an error);
//! - status updates are queued per agent and sent by one flusher task every [`FLUSH_EVERY`],
//!   one POST per agent with everything it queued meanwhile, at most [`POSTS_IN_FLIGHT_MAX`] at a
//!   time (a full pipe makes batches bigger instead of queues longer);
//! - timed exits (`sim:finish`, `sim:fail`) wait in one shared heap served by one task;
//! - heartbeats too: one heap of (due, agent) served by one task, at most
//!   [`HEARTBEATS_IN_FLIGHT_MAX`] out; an agent is in the heap or has one heartbeat out, never both;
//! - an agent forgets a task once it ended and left its orders, so memory follows what runs.
//!
//! Answers of the master, as the real agent reads them:
//! - 404 with code `unknown_agent`: the master does not know the agent: register again (once,
//!   however many of its loops heard it: see [`Shared::register`]). Any other 404 (a master
//!   without the route, say) is an ordinary failure: back off and retry, never re-register.
//! - 503 or 429: the master sheds load: wait what its `Retry-After` says, at least
//!   [`SHED_BACKOFF_MIN`], longer after each further shed answer, with jitter upwards.

use crate::executor::{behavior, Behavior};
use capstan_api::{
    ErrorBody, HeartbeatRequest, HeartbeatResponse, RegisterRequest, RegisterResponse, UpdatesRequest, UpdatesResponse,
};
use capstan_model::{AgentId, Capacity, Desired, TaskExit, TaskId, Timestamp};
use capstan_state::{AgentInfo, Report, StatusUpdate};
use parking_lot::Mutex;
use serde::Deserialize;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// How long a status update waits to be coalesced with the next ones of its agent.
pub const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// Status-update POSTs in flight across the fleet at most.
pub const POSTS_IN_FLIGHT_MAX: usize = 256;
/// Registrations in flight across the fleet at most.
pub const REGISTRATIONS_IN_FLIGHT_MAX: usize = 128;
/// Updates in one POST at most (the real agent's batch size).
pub const UPDATES_PER_POST_MAX: usize = 1000;
/// How long one orders request waits on the master.
pub const POLL_WAIT: Duration = Duration::from_secs(30);
/// Heartbeats in flight across the fleet at most.
pub const HEARTBEATS_IN_FLIGHT_MAX: usize = 256;
/// How long one heartbeat waits for its answer (as the real agent's client).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
/// After a shed answer (503, 429), the least wait, whatever `Retry-After` says.
pub const SHED_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Consecutive shed answers double the wait up to this (or to what `Retry-After` asks, if more).
pub const SHED_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// After a heartbeat failed otherwise (timeout, connection, an error answer), the least wait.
pub const HEARTBEAT_RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// The heartbeat interval an agent uses before a master told it one, and the least it accepts.
const HEARTBEAT_INTERVAL_DEFAULT_MS: u32 = 5_000;
const HEARTBEAT_INTERVAL_MIN_MS: u32 = 100;

#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// `http://host:port` of the master.
    pub master: String,
    pub count: usize,
    /// What every agent offers.
    pub capacity: Capacity,
    /// Agent `i` gets `rack=r{i % racks}`, `pod=p{i % pods}`, `dc=dc1`.
    pub racks: u32,
    pub pods: u32,
}

impl FleetConfig {
    /// `cpus=8,mem=32GiB,disk=100GiB,ports=31000-32000`, overridden by `resources` when given.
    pub fn capacity_from(resources: Option<&str>) -> Result<Capacity, String> {
        let base = Capacity::parse_overrides(
            &Capacity { cpus_milli: 0, mem_bytes: 0, disk_bytes: 0, ports: vec![] },
            "cpus=8,mem=32GiB,disk=100GiB,ports=31000-32000",
        )?;
        match resources {
            Some(text) => Capacity::parse_overrides(&base, text),
            None => Ok(base),
        }
    }

    /// `rack=R,pod=P` → (R, P); each at least 1.
    pub fn parse_spread(text: &str) -> Result<(u32, u32), String> {
        let (mut racks, mut pods) = (10, 4);
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').ok_or_else(|| format!("`{item}` is not key=count"))?;
            let n: u32 = v.trim().parse().map_err(|_| format!("`{item}`: {v} is not a count"))?;
            if n == 0 {
                return Err(format!("`{item}`: the count must be at least 1"));
            }
            match k.trim() {
                "rack" => racks = n,
                "pod" => pods = n,
                other => return Err(format!("unknown attribute `{other}` (known: rack, pod)")),
            }
        }
        Ok((racks, pods))
    }
}

/// Counters of the whole fleet, for progress lines and the benchmark's report.
#[derive(Debug, Default)]
pub struct Stats {
    pub registered: AtomicU64,
    pub registrations: AtomicU64,
    pub orders_received: AtomicU64,
    pub poll_errors: AtomicU64,
    pub update_posts: AtomicU64,
    pub updates_sent: AtomicU64,
    pub updates_acked: AtomicU64,
    pub update_errors: AtomicU64,
    pub launched: AtomicU64,
    pub exited: AtomicU64,
    /// Running tasks the master stopped: `Desired::Stop` in the orders, or a stop order.
    pub killed: AtomicU64,
    /// The part of `killed` that a stop order (`Orders.stop`) named.
    pub stop_orders: AtomicU64,
    /// Running tasks that left the agent's orders without being stopped (lost, say). As with the
    /// real agent, they keep running (and are reported in heartbeats) until a stop order names
    /// them.
    pub vanished: AtomicU64,
    /// `Exited(Killed)` reports the master acknowledged.
    pub killed_acked: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    /// Heartbeats that got no answer, or an error answer (shed ones included).
    pub heartbeat_failures: AtomicU64,
    /// Answers 503 or 429 on any route.
    pub shed: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StatsSnapshot {
    pub registered: u64,
    pub registrations: u64,
    pub orders_received: u64,
    pub poll_errors: u64,
    pub update_posts: u64,
    pub updates_sent: u64,
    pub updates_acked: u64,
    pub update_errors: u64,
    pub launched: u64,
    pub exited: u64,
    pub killed: u64,
    pub stop_orders: u64,
    pub vanished: u64,
    pub killed_acked: u64,
    pub heartbeats_sent: u64,
    pub heartbeat_failures: u64,
    pub shed: u64,
    /// Tasks the fleet runs now.
    pub running: u64,
}

/// The subset of `capstan_api::Orders` the simulator reads. Serde skips the other fields, so
/// decoding 100-task orders costs a fraction of the full `TaskSpec`s; a test pins that a real
/// `Orders` decodes into it.
#[derive(Deserialize)]
pub(crate) struct OrdersLite {
    pub master_epoch: u64,
    pub version: u64,
    pub tasks: Vec<OrderLite>,
    #[serde(default)]
    pub stop: Vec<StopOrderLite>,
}

#[derive(Deserialize)]
pub(crate) struct StopOrderLite {
    pub task: TaskId,
    #[serde(default)]
    pub reason: String,
}

#[derive(Deserialize)]
pub(crate) struct OrderLite {
    pub task: TaskId,
    pub desired: Desired,
    pub spec: SpecLite,
}

#[derive(Deserialize)]
pub(crate) struct SpecLite {
    pub command: String,
}

struct SimTask {
    ended: bool,
    /// Left the orders while running: the master does not place it here any more.
    stray: bool,
}

#[derive(Default)]
struct AgentState {
    epoch: u64,
    tasks: HashMap<TaskId, SimTask>,
    queue: VecDeque<StatusUpdate>,
    next_seq: u64,
    next_pid: u32,
    /// In the fleet's dirty list (its queue waits for the flusher).
    dirty: bool,
    /// A POST of its updates is out.
    posting: bool,
    /// After a failed POST: not before then, and the delay that led there.
    retry_at: Option<Instant>,
    retry_delay: Duration,
    /// Registrations completed. A loop that needs a new registration passes the count it saw
    /// before its request; if another loop registered meanwhile, it does not register again.
    registrations_done: u32,
    /// A registration is out.
    registering: bool,
    /// As the master said (0: not told yet).
    heartbeat_interval_ms: u32,
    /// The wait after the latest failed heartbeat; zero after an answered one.
    heartbeat_retry: Duration,
    /// When the latest heartbeat was answered, in ms after the fleet started (0: never).
    heartbeat_ok_ms: u64,
}

impl AgentState {
    fn heartbeat_interval(&self) -> Duration {
        let ms =
            if self.heartbeat_interval_ms == 0 { HEARTBEAT_INTERVAL_DEFAULT_MS } else { self.heartbeat_interval_ms };
        Duration::from_millis(u64::from(ms.max(HEARTBEAT_INTERVAL_MIN_MS)))
    }

    /// What a heartbeat reports: every task it has, the running ones, and the newest update's
    /// sequence number (the lists reflect every update queued so far).
    fn heartbeat_lists(&self) -> (Vec<TaskId>, Vec<TaskId>, u64) {
        let mut known = Vec::with_capacity(self.tasks.len());
        let mut running = Vec::with_capacity(self.tasks.len());
        for (id, t) in &self.tasks {
            known.push(*id);
            if !t.ended {
                running.push(*id);
            }
        }
        (known, running, self.next_seq.saturating_sub(1))
    }

    fn push(&mut self, task: TaskId, report: Report) {
        if self.next_seq == 0 {
            self.next_seq = 1;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push_back(StatusUpdate { seq, task, report, at: now() });
    }

    /// Numbering continues after what the master applied (as the real agent does).
    fn continue_after(&mut self, seq: u64) {
        if self.next_seq <= seq {
            let mut n = seq + 1;
            for u in self.queue.iter_mut() {
                u.seq = n;
                n += 1;
            }
            self.next_seq = n;
        }
    }
}

/// (when, agent index, task id, exit code) of a `sim:finish` or `sim:fail` task.
type TimedExit = (Instant, u32, u64, i32);

struct SimAgent {
    info: AgentInfo,
    state: Mutex<AgentState>,
}

struct Shared {
    http: reqwest::Client,
    base: String,
    agents: Vec<SimAgent>,
    /// Indexes of agents with updates waiting for the flusher.
    dirty: Mutex<Vec<u32>>,
    dirty_notify: Notify,
    /// Timed exits, earliest first.
    timers: Mutex<BinaryHeap<Reverse<TimedExit>>>,
    timers_notify: Notify,
    /// (due, agent index) of every agent's next heartbeat, earliest first.
    heartbeats: Mutex<BinaryHeap<Reverse<(Instant, u32)>>>,
    heartbeats_notify: Notify,
    heartbeat_posts: Arc<Semaphore>,
    registrations: Semaphore,
    posts: Arc<Semaphore>,
    stats: Stats,
    started: Instant,
    /// The fleet was dropped: loops that outlive its tasks (a heartbeat registering again) end.
    closed: std::sync::atomic::AtomicBool,
    /// The latest error an agent met, for progress lines.
    last_error: Mutex<Option<String>>,
}

/// A running fleet; dropping it stops every agent (their tasks stay on the master until it
/// declares them lost, as with real agents that vanish).
pub struct Fleet {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        for h in &self.handles {
            h.abort();
        }
    }
}

fn now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
    )
}

/// Jittered exponential backoff: the next delay after `d`.
fn backoff(d: Duration) -> Duration {
    let next = (d * 2).min(RETRY_MAX);
    next.mul_f64(rand::random::<f64>() * 0.5 + 0.75).max(RETRY_MIN)
}

/// The wait after a shed answer (503, 429): what the master asked in `Retry-After`, at least
/// [`SHED_BACKOFF_MIN`], doubling `previous` (the wait after the shed answer before, zero if
/// none) up to [`SHED_BACKOFF_MAX`] or the master's ask if more; then `jitter` (0..1) adds up to
/// half, so agents shed together come back spread out, never sooner than asked.
pub fn shed_delay(previous: Duration, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let floor = retry_after.unwrap_or(Duration::ZERO).max(SHED_BACKOFF_MIN);
    let grown = (previous * 2).clamp(floor, SHED_BACKOFF_MAX.max(floor));
    grown.mul_f64(1.0 + jitter.clamp(0.0, 1.0) * 0.5)
}

/// The wait after a heartbeat failed without being shed: at least [`HEARTBEAT_RETRY_MIN`],
/// doubling `previous` up to twice the heartbeat interval (so an agent is heard soon after the
/// master is back), with `jitter` (0..1) of ±25%.
pub fn heartbeat_retry_delay(previous: Duration, interval: Duration, jitter: f64) -> Duration {
    let ceiling = (interval * 2).max(HEARTBEAT_RETRY_MIN * 2);
    let grown = (previous * 2).clamp(HEARTBEAT_RETRY_MIN, ceiling);
    grown.mul_f64(0.75 + jitter.clamp(0.0, 1.0) * 0.5).max(HEARTBEAT_RETRY_MIN)
}

/// The wait until the next heartbeat after an answered one: the interval less up to 20% (`jitter`
/// 0..1), so agents drift apart and none is ever late.
pub fn heartbeat_next(interval: Duration, jitter: f64) -> Duration {
    interval.mul_f64(1.0 - jitter.clamp(0.0, 1.0) * 0.2)
}

/// `Retry-After` in seconds (the HTTP-date form is not used by the master).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// What an answer that is not a success means to an agent; `None` for a success.
fn classify_failure(status: reqwest::StatusCode, retry_after: Option<Duration>, body: &[u8]) -> Option<CallError> {
    if status.is_success() {
        return None;
    }
    if matches!(status.as_u16(), 503 | 429) {
        return Some(CallError::Shed(retry_after));
    }
    let error = serde_json::from_slice::<ErrorBody>(body).ok();
    // Only the agent routes' own answer means "register again": a 404 of a route the master
    // does not have looks the same but for its code.
    if status.as_u16() == 404 && error.as_ref().is_some_and(|b| b.error.code == "unknown_agent") {
        return Some(CallError::UnknownAgent);
    }
    Some(CallError::Other(match error {
        Some(b) => format!("{status} {}: {}", b.error.code, b.error.message),
        None => format!("{status}: {}", String::from_utf8_lossy(body)),
    }))
}

/// The HTTP client every simulated agent shares: HTTP/1.1 (one connection per long poll, as
/// separate hosts would have), pooled without a per-host cap.
pub fn shared_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(usize::MAX)
        .tcp_nodelay(true)
        .build()
        .expect("building an HTTP client cannot fail with these settings")
}

/// An error with its causes (reqwest's own message leaves out why a request failed).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[derive(Debug)]
enum CallError {
    /// The master does not know the agent (404 `unknown_agent`): register again.
    UnknownAgent,
    /// The master sheds load (503, 429): wait at least this (its `Retry-After`).
    Shed(Option<Duration>),
    Other(String),
}

impl Fleet {
    /// Starts `config.count` agents; returns at once (registration happens in the background; see
    /// [`Fleet::stats`]).
    pub fn start(config: FleetConfig) -> Fleet {
        let base = config.master.trim_end_matches('/').to_string();
        let agents = (0..config.count)
            .map(|i| {
                let mut attributes = BTreeMap::new();
                attributes.insert("rack".to_string(), format!("r{}", i as u32 % config.racks.max(1)));
                attributes.insert("pod".to_string(), format!("p{}", i as u32 % config.pods.max(1)));
                attributes.insert("dc".to_string(), "dc1".to_string());
                attributes.insert("hostname".to_string(), format!("sim-{i}"));
                SimAgent {
                    info: AgentInfo {
                        id: AgentId(rand::random()),
                        hostname: format!("sim-{i}"),
                        address: format!("http://sim-{i}.invalid"),
                        capacity: config.capacity.clone(),
                        attributes,
                        version: format!("{}-sim", env!("CARGO_PKG_VERSION")),
                    },
                    state: Mutex::new(AgentState::default()),
                }
            })
            .collect();
        let shared = Arc::new(Shared {
            http: shared_client(),
            base,
            agents,
            dirty: Mutex::new(Vec::new()),
            dirty_notify: Notify::new(),
            timers: Mutex::new(BinaryHeap::new()),
            timers_notify: Notify::new(),
            heartbeats: Mutex::new(BinaryHeap::with_capacity(config.count)),
            heartbeats_notify: Notify::new(),
            heartbeat_posts: Arc::new(Semaphore::new(HEARTBEATS_IN_FLIGHT_MAX)),
            registrations: Semaphore::new(REGISTRATIONS_IN_FLIGHT_MAX),
            posts: Arc::new(Semaphore::new(POSTS_IN_FLIGHT_MAX)),
            stats: Stats::default(),
            started: Instant::now(),
            closed: std::sync::atomic::AtomicBool::new(false),
            last_error: Mutex::new(None),
        });
        let mut handles = Vec::with_capacity(config.count + 3);
        handles.push(tokio::spawn(flusher(shared.clone())));
        handles.push(tokio::spawn(timed_exits(shared.clone())));
        handles.push(tokio::spawn(heartbeater(shared.clone())));
        for i in 0..config.count {
            handles.push(tokio::spawn(run_agent(shared.clone(), i as u32)));
        }
        Fleet { shared, handles }
    }

    pub fn len(&self) -> usize {
        self.shared.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.agents.is_empty()
    }

    pub fn agent_ids(&self) -> Vec<AgentId> {
        self.shared.agents.iter().map(|a| a.info.id).collect()
    }

    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.shared.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let launched = get(&s.launched);
        let ended = get(&s.exited) + get(&s.killed);
        StatsSnapshot {
            registered: get(&s.registered),
            registrations: get(&s.registrations),
            orders_received: get(&s.orders_received),
            poll_errors: get(&s.poll_errors),
            update_posts: get(&s.update_posts),
            updates_sent: get(&s.updates_sent),
            updates_acked: get(&s.updates_acked),
            update_errors: get(&s.update_errors),
            launched,
            exited: get(&s.exited),
            killed: get(&s.killed),
            stop_orders: get(&s.stop_orders),
            vanished: get(&s.vanished),
            killed_acked: get(&s.killed_acked),
            heartbeats_sent: get(&s.heartbeats_sent),
            heartbeat_failures: get(&s.heartbeat_failures),
            shed: get(&s.shed),
            running: launched.saturating_sub(ended),
        }
    }

    /// The latest error an agent met (orders, updates), if any.
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().clone()
    }

    /// Updates queued but not yet acknowledged, over the fleet.
    pub fn updates_queued(&self) -> usize {
        self.shared.agents.iter().map(|a| a.state.lock().queue.len()).sum()
    }

    /// Agents whose latest heartbeat was answered at or after `since`.
    pub fn heard_since(&self, since: Instant) -> usize {
        let threshold_ms = since.saturating_duration_since(self.shared.started).as_millis() as u64;
        self.shared
            .agents
            .iter()
            .filter(|a| {
                let ok = a.state.lock().heartbeat_ok_ms;
                ok != 0 && ok >= threshold_ms
            })
            .count()
    }
}

impl Shared {
    fn mark_dirty(&self, index: u32, st: &mut AgentState) {
        if !st.dirty {
            st.dirty = true;
            self.dirty.lock().push(index);
            self.dirty_notify.notify_one();
        }
    }

    async fn call<T: for<'de> Deserialize<'de>>(&self, req: reqwest::RequestBuilder) -> Result<T, CallError> {
        let resp = req.send().await.map_err(|e| CallError::Other(error_chain(&e)))?;
        let status = resp.status();
        let asked = retry_after(resp.headers());
        let bytes = resp.bytes().await.map_err(|e| CallError::Other(error_chain(&e)))?;
        if let Some(e) = classify_failure(status, asked, &bytes) {
            if matches!(e, CallError::Shed(_)) {
                self.stats.shed.fetch_add(1, Ordering::Relaxed);
            }
            return Err(e);
        }
        serde_json::from_slice(&bytes).map_err(|e| CallError::Other(format!("unreadable answer: {e}")))
    }

    /// Registers (again) until the master answers; returns the master's epoch. `seen` is the
    /// agent's `registrations_done` when the caller learned it must register: if another loop
    /// registered since (or is registering now), this waits for that one instead of sending a
    /// second registration.
    async fn register(&self, index: u32, seen: u32) -> u64 {
        let agent = &self.agents[index as usize];
        loop {
            if self.closed.load(Ordering::Relaxed) {
                return 0;
            }
            {
                let mut st = agent.state.lock();
                if st.registrations_done != seen {
                    return st.epoch;
                }
                if !st.registering {
                    st.registering = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut delay = RETRY_MIN;
        let mut shed = Duration::ZERO;
        loop {
            if self.closed.load(Ordering::Relaxed) {
                agent.state.lock().registering = false;
                return 0;
            }
            let (known, running, _) = agent.state.lock().heartbeat_lists();
            let body = serde_json::to_vec(&RegisterRequest {
                info: agent.info.clone(),
                known_tasks: known,
                running_tasks: running,
            })
            .expect("serializable");
            let result = {
                let _permit = self.registrations.acquire().await.expect("never closed");
                self.stats.registrations.fetch_add(1, Ordering::Relaxed);
                let req = self
                    .http
                    .post(format!("{}/v1/agent/register", self.base))
                    .header("content-type", "application/json")
                    .timeout(Duration::from_secs(30))
                    .body(body);
                self.call::<RegisterResponse>(req).await
            };
            match result {
                Ok(resp) => {
                    let mut st = agent.state.lock();
                    let first = st.registrations_done == 0;
                    st.epoch = resp.master_epoch;
                    st.registrations_done = st.registrations_done.wrapping_add(1).max(1);
                    st.registering = false;
                    st.heartbeat_interval_ms = u32::try_from(resp.heartbeat_interval_ms).unwrap_or(u32::MAX);
                    let interval = st.heartbeat_interval();
                    st.continue_after(resp.last_update_seq);
                    if !st.queue.is_empty() {
                        self.mark_dirty(index, &mut st);
                    }
                    drop(st);
                    if first {
                        self.stats.registered.fetch_add(1, Ordering::Relaxed);
                        // The first heartbeat anywhere in the first interval, so that a fleet
                        // registered at once does not beat in step.
                        self.schedule_heartbeat(index, Instant::now() + interval.mul_f64(rand::random::<f64>()));
                    }
                    return resp.master_epoch;
                }
                Err(CallError::Shed(asked)) => {
                    shed = shed_delay(shed, asked, rand::random());
                    tokio::time::sleep(shed).await;
                }
                Err(CallError::UnknownAgent) | Err(CallError::Other(_)) => {
                    tokio::time::sleep(delay).await;
                    delay = backoff(delay);
                }
            }
        }
    }

    fn schedule_heartbeat(&self, index: u32, at: Instant) {
        self.heartbeats.lock().push(Reverse((at, index)));
        self.heartbeats_notify.notify_one();
    }

    /// Makes what the agent runs match its orders and stop orders, queueing the reports.
    fn reconcile(&self, index: u32, orders: Vec<OrderLite>, stops: Vec<StopOrderLite>) {
        let agent = &self.agents[index as usize];
        let mut timers = Vec::new();
        let mut st = agent.state.lock();
        let before = st.queue.len();
        let mut in_orders = HashSet::with_capacity(orders.len());
        for order in orders {
            in_orders.insert(order.task);
            let known = st.tasks.get(&order.task).map(|t| t.ended);
            match (order.desired, known) {
                (Desired::Run, None) => {
                    st.next_pid = st.next_pid.wrapping_add(1).max(2);
                    let pid = st.next_pid;
                    st.tasks.insert(order.task, SimTask { ended: false, stray: false });
                    st.push(order.task, Report::Running { pid });
                    self.stats.launched.fetch_add(1, Ordering::Relaxed);
                    if let Behavior::Exit { after_ms, code } = behavior(&order.spec.command) {
                        timers.push(Reverse((
                            Instant::now() + Duration::from_millis(after_ms),
                            index,
                            order.task.0,
                            code,
                        )));
                    }
                }
                (Desired::Stop, Some(false)) => {
                    st.tasks.insert(order.task, SimTask { ended: true, stray: false });
                    st.push(
                        order.task,
                        Report::Exited { exit: TaskExit::Killed { by: "killed on the master's order".into() } },
                    );
                    self.stats.killed.fetch_add(1, Ordering::Relaxed);
                }
                (Desired::Stop, None) => {
                    st.tasks.insert(order.task, SimTask { ended: true, stray: false });
                    st.push(
                        order.task,
                        Report::Exited { exit: TaskExit::Killed { by: "stopped before it started".into() } },
                    );
                    // Never counted as launched, so not as killed either.
                }
                (Desired::Run, Some(_)) => {
                    // Placed here again (a stray taken back, say).
                    if let Some(t) = st.tasks.get_mut(&order.task) {
                        t.stray = false;
                    }
                }
                (Desired::Stop, Some(true)) => {}
            }
        }
        for stop in stops {
            let Some(t) = st.tasks.get_mut(&stop.task) else { continue };
            if t.ended {
                continue;
            }
            t.ended = true;
            let by = format!("stopped on the master's stop order: {}", stop.reason);
            st.push(stop.task, Report::Exited { exit: TaskExit::Killed { by } });
            self.stats.killed.fetch_add(1, Ordering::Relaxed);
            self.stats.stop_orders.fetch_add(1, Ordering::Relaxed);
        }
        // What ended and left the orders is over for this agent: forget it. What left the orders
        // while running keeps running, as on a real agent, until a stop order names it.
        let mut newly_stray = 0;
        st.tasks.retain(|id, t| {
            if in_orders.contains(id) {
                return true;
            }
            if t.ended {
                return false;
            }
            if !t.stray {
                t.stray = true;
                newly_stray += 1;
            }
            true
        });
        if newly_stray > 0 {
            self.stats.vanished.fetch_add(newly_stray, Ordering::Relaxed);
        }
        if st.queue.len() > before {
            self.mark_dirty(index, &mut st);
        }
        drop(st);
        if !timers.is_empty() {
            self.timers.lock().extend(timers);
            self.timers_notify.notify_one();
        }
    }
}

/// One agent: register, then long-poll orders forever.
async fn run_agent(shared: Arc<Shared>, index: u32) {
    let agent = &shared.agents[index as usize];
    let id = agent.info.id;
    let mut epoch = shared.register(index, 0).await;
    let mut version = 0u64;
    let mut delay = RETRY_MIN;
    let mut shed = Duration::ZERO;
    loop {
        let seen = agent.state.lock().registrations_done;
        let url = format!(
            "{}/v1/agent/{id}/orders?epoch={epoch}&version={version}&wait_ms={}",
            shared.base,
            POLL_WAIT.as_millis()
        );
        let req = shared.http.get(url).timeout(POLL_WAIT + Duration::from_secs(10));
        match shared.call::<OrdersLite>(req).await {
            Ok(orders) => {
                delay = RETRY_MIN;
                shed = Duration::ZERO;
                shared.stats.orders_received.fetch_add(1, Ordering::Relaxed);
                if orders.master_epoch != epoch {
                    // A new master run: register again so it learns what runs here (unless the
                    // heartbeat loop did already).
                    epoch = shared.register(index, seen).await;
                    if orders.master_epoch != epoch {
                        version = 0;
                        continue;
                    }
                }
                version = orders.version;
                shared.reconcile(index, orders.tasks, orders.stop);
            }
            Err(CallError::UnknownAgent) => {
                epoch = shared.register(index, seen).await;
                version = 0;
            }
            Err(CallError::Shed(asked)) => {
                shared.stats.poll_errors.fetch_add(1, Ordering::Relaxed);
                shed = shed_delay(shed, asked, rand::random());
                tokio::time::sleep(shed).await;
            }
            Err(CallError::Other(e)) => {
                shared.stats.poll_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(agent = index, "cannot get orders: {e}; retrying in {delay:?}");
                *shared.last_error.lock() = Some(format!("orders of sim-{index}: {e}"));
                tokio::time::sleep(delay).await;
                delay = backoff(delay);
            }
        }
    }
}

/// Sends every agent's heartbeat when it is due, at most `HEARTBEATS_IN_FLIGHT_MAX` out.
async fn heartbeater(shared: Arc<Shared>) {
    loop {
        let notified = shared.heartbeats_notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let now = Instant::now();
        let mut due = Vec::new();
        let next = {
            let mut heap = shared.heartbeats.lock();
            while heap.peek().is_some_and(|Reverse((at, _))| *at <= now) {
                due.push(heap.pop().expect("checked").0 .1);
            }
            heap.peek().map(|Reverse((at, _))| *at)
        };
        if !due.is_empty() {
            for index in due {
                let permit = shared.heartbeat_posts.clone().acquire_owned().await.expect("never closed");
                let shared = shared.clone();
                tokio::spawn(async move { heartbeat(&shared, index, permit).await });
            }
            // Waiting for permits took time: look again before sleeping.
            continue;
        }
        match next {
            Some(at) => {
                let _ = tokio::time::timeout_at(at.into(), notified).await;
            }
            None => notified.await,
        }
    }
}

/// One heartbeat of one agent, then the next one scheduled: an interval later when answered,
/// after a growing wait when not, after registering again when the master does not know it.
async fn heartbeat(shared: &Shared, index: u32, permit: OwnedSemaphorePermit) {
    let agent = &shared.agents[index as usize];
    let (body, seen) = {
        let st = agent.state.lock();
        let (known_tasks, running_tasks, as_of_seq) = st.heartbeat_lists();
        let req = HeartbeatRequest { agent: agent.info.id, known_tasks, running_tasks, as_of_seq };
        (serde_json::to_vec(&req).expect("serializable"), st.registrations_done)
    };
    shared.stats.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
    let req = shared
        .http
        .post(format!("{}/v1/agent/{}/heartbeat", shared.base, agent.info.id))
        .header("content-type", "application/json")
        .timeout(HEARTBEAT_TIMEOUT)
        .body(body);
    let result = shared.call::<HeartbeatResponse>(req).await;
    drop(permit);
    let mut register_again = false;
    let wait = {
        let mut st = agent.state.lock();
        if result.is_err() {
            shared.stats.heartbeat_failures.fetch_add(1, Ordering::Relaxed);
        }
        match result {
            Ok(resp) => {
                st.heartbeat_interval_ms = u32::try_from(resp.heartbeat_interval_ms).unwrap_or(u32::MAX);
                st.heartbeat_retry = Duration::ZERO;
                st.heartbeat_ok_ms = (shared.started.elapsed().as_millis() as u64).max(1);
                // A master of another run than the one registered with: register again.
                register_again = resp.master_epoch != st.epoch;
                heartbeat_next(st.heartbeat_interval(), rand::random())
            }
            Err(CallError::UnknownAgent) => {
                register_again = true;
                st.heartbeat_retry = Duration::ZERO;
                st.heartbeat_interval().mul_f64(rand::random::<f64>())
            }
            Err(CallError::Shed(asked)) => {
                st.heartbeat_retry = shed_delay(st.heartbeat_retry, asked, rand::random());
                st.heartbeat_retry
            }
            Err(CallError::Other(e)) => {
                tracing::debug!(agent = index, "heartbeat failed: {e}");
                *shared.last_error.lock() = Some(format!("heartbeat of sim-{index}: {e}"));
                st.heartbeat_retry = heartbeat_retry_delay(st.heartbeat_retry, st.heartbeat_interval(), rand::random());
                st.heartbeat_retry
            }
        }
    };
    if register_again {
        shared.register(index, seen).await;
    }
    if !shared.closed.load(Ordering::Relaxed) {
        shared.schedule_heartbeat(index, Instant::now() + wait);
    }
}

/// Every `FLUSH_EVERY`: one POST per agent with updates waiting, at most `POSTS_IN_FLIGHT_MAX` out.
async fn flusher(shared: Arc<Shared>) {
    let mut not_yet: Vec<u32> = Vec::new();
    loop {
        let notified = shared.dirty_notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let empty = shared.dirty.lock().is_empty() && not_yet.is_empty();
        if empty {
            notified.await;
        }
        tokio::time::sleep(FLUSH_EVERY).await;
        let mut due = std::mem::take(&mut *shared.dirty.lock());
        due.append(&mut not_yet);
        let now = Instant::now();
        for index in due {
            let agent = &shared.agents[index as usize];
            let batch = {
                let mut st = agent.state.lock();
                if st.posting || st.queue.is_empty() {
                    // The POST out now re-marks the agent when it returns if more is queued.
                    st.dirty = false;
                    continue;
                }
                if st.retry_at.is_some_and(|t| t > now) {
                    not_yet.push(index);
                    continue;
                }
                st.dirty = false;
                st.posting = true;
                st.queue.iter().take(UPDATES_PER_POST_MAX).cloned().collect::<Vec<_>>()
            };
            let permit = shared.posts.clone().acquire_owned().await.expect("never closed");
            let shared = shared.clone();
            tokio::spawn(async move {
                post_updates(&shared, index, batch).await;
                drop(permit);
            });
        }
    }
}

async fn post_updates(shared: &Shared, index: u32, batch: Vec<StatusUpdate>) {
    let agent = &shared.agents[index as usize];
    let n = batch.len() as u64;
    let body = serde_json::to_vec(&UpdatesRequest { agent: agent.info.id, updates: batch }).expect("serializable");
    shared.stats.update_posts.fetch_add(1, Ordering::Relaxed);
    shared.stats.updates_sent.fetch_add(n, Ordering::Relaxed);
    let req = shared
        .http
        .post(format!("{}/v1/agent/updates", shared.base))
        .header("content-type", "application/json")
        .timeout(Duration::from_secs(30))
        .body(body);
    let result = shared.call::<UpdatesResponse>(req).await;
    let mut st = agent.state.lock();
    st.posting = false;
    match result {
        Ok(resp) => {
            st.retry_at = None;
            st.retry_delay = RETRY_MIN;
            let (mut acked, mut killed) = (0, 0);
            while st.queue.front().is_some_and(|u| u.seq <= resp.acked_seq) {
                let u = st.queue.pop_front().expect("checked");
                acked += 1;
                if matches!(u.report, Report::Exited { exit: TaskExit::Killed { .. } }) {
                    killed += 1;
                }
            }
            shared.stats.updates_acked.fetch_add(acked, Ordering::Relaxed);
            shared.stats.killed_acked.fetch_add(killed, Ordering::Relaxed);
        }
        Err(e) => {
            shared.stats.update_errors.fetch_add(1, Ordering::Relaxed);
            if let CallError::Other(e) = &e {
                tracing::debug!(agent = index, "cannot send status updates: {e}");
                *shared.last_error.lock() = Some(format!("updates of sim-{index}: {e}"));
            }
            // Unknown agent: its orders loop gets the same answer and registers again.
            st.retry_delay = match e {
                CallError::Shed(asked) => shed_delay(st.retry_delay, asked, rand::random()),
                CallError::UnknownAgent | CallError::Other(_) => backoff(st.retry_delay),
            };
            st.retry_at = Some(Instant::now() + st.retry_delay);
        }
    }
    if !st.queue.is_empty() {
        shared.mark_dirty(index, &mut st);
    }
}

/// Reports the timed exits of `sim:finish` and `sim:fail` tasks when they are due.
async fn timed_exits(shared: Arc<Shared>) {
    loop {
        let notified = shared.timers_notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let now = Instant::now();
        let mut due = Vec::new();
        let next = {
            let mut timers = shared.timers.lock();
            while timers.peek().is_some_and(|Reverse((at, ..))| *at <= now) {
                due.push(timers.pop().expect("checked").0);
            }
            timers.peek().map(|Reverse((at, ..))| *at)
        };
        for (_, index, task, code) in due {
            let mut st = shared.agents[index as usize].state.lock();
            let task = TaskId(task);
            if let Some(t) = st.tasks.get_mut(&task) {
                if !t.ended {
                    t.ended = true;
                    st.push(task, Report::Exited { exit: TaskExit::Exited { code } });
                    shared.stats.exited.fetch_add(1, Ordering::Relaxed);
                    shared.mark_dirty(index, &mut st);
                }
            }
        }
        match next {
            Some(at) => {
                let _ = tokio::time::timeout_at(at.into(), notified).await;
            }
            None => notified.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_orders_decode_into_the_lite_form() {
        let spec: capstan_model::TaskSpec = serde_json::from_value(serde_json::json!({
            "command": "sim:finish:5", "user": "nobody", "cpus": 0.5, "mem": "64MiB", "disk": "1MiB",
            "ports": ["http"], "env": {"A": "b"}, "kill_grace": "10s"
        }))
        .expect("a task spec");
        let orders = capstan_api::Orders {
            master_epoch: 7,
            version: 3,
            stop: vec![capstan_api::StopOrder { task: TaskId(43), reason: "surplus copy".into() }],
            frozen: false,
            tasks: vec![capstan_api::Order {
                task: TaskId(42),
                job: "a/b/c".parse().expect("a job key"),
                instance: 0,
                desired: Desired::Stop,
                spec,
                ports: [("http".to_string(), 31001)].into_iter().collect(),
                health_check: None,
            }],
        };
        let lite: OrdersLite = serde_json::from_slice(&serde_json::to_vec(&orders).unwrap()).unwrap();
        assert_eq!((lite.master_epoch, lite.version), (7, 3));
        assert_eq!((lite.stop[0].task, lite.stop[0].reason.as_str()), (TaskId(43), "surplus copy"));
        assert_eq!(lite.tasks[0].task, TaskId(42));
        assert_eq!(lite.tasks[0].desired, Desired::Stop);
        assert_eq!(lite.tasks[0].spec.command, "sim:finish:5");
    }

    #[test]
    fn spread_and_capacity() {
        assert_eq!(FleetConfig::parse_spread("rack=20,pod=3"), Ok((20, 3)));
        assert!(FleetConfig::parse_spread("rack=0").is_err());
        assert!(FleetConfig::parse_spread("row=2").is_err());
        let c = FleetConfig::capacity_from(Some("cpus=4")).unwrap();
        assert_eq!(c.cpus_milli, 4000);
        assert_eq!(c.mem_bytes, 32 << 30);
        assert_eq!(c.port_count(), 1001);
    }

    #[test]
    fn renumbering_continues_after_the_master() {
        let mut st = AgentState::default();
        st.push(TaskId(1), Report::Running { pid: 2 });
        st.push(TaskId(1), Report::Exited { exit: TaskExit::Exited { code: 0 } });
        st.continue_after(10);
        let seqs: Vec<u64> = st.queue.iter().map(|u| u.seq).collect();
        assert_eq!(seqs, vec![11, 12]);
        st.push(TaskId(2), Report::Running { pid: 3 });
        assert_eq!(st.queue.back().unwrap().seq, 13);
    }

    #[test]
    fn orders_of_an_older_master_have_no_stop_orders() {
        let lite: OrdersLite = serde_json::from_str(r#"{"master_epoch": 1, "version": 2, "tasks": []}"#).unwrap();
        assert!(lite.stop.is_empty());
    }

    #[test]
    fn only_unknown_agent_means_register_again() {
        use reqwest::StatusCode;
        let body = |code: &str| format!(r#"{{"error": {{"code": "{code}", "message": "m", "details": []}}}}"#);
        let c =
            |status: u16, body: &str| classify_failure(StatusCode::from_u16(status).unwrap(), None, body.as_bytes());
        assert!(c(200, "{}").is_none());
        assert!(matches!(c(404, &body("unknown_agent")), Some(CallError::UnknownAgent)));
        // A master without the heartbeat route: its fallback says `not_found`.
        assert!(matches!(c(404, &body("not_found")), Some(CallError::Other(e)) if e.contains("not_found")));
        assert!(matches!(c(404, "not json"), Some(CallError::Other(_))));
        assert!(matches!(c(500, &body("internal")), Some(CallError::Other(_))));
        let shed = classify_failure(StatusCode::SERVICE_UNAVAILABLE, Some(Duration::from_secs(3)), b"");
        assert!(matches!(shed, Some(CallError::Shed(Some(d))) if d == Duration::from_secs(3)));
        assert!(matches!(c(429, ""), Some(CallError::Shed(None))));
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
    }

    #[test]
    fn shed_waits_at_least_a_second_and_what_was_asked_and_grow() {
        let s = Duration::from_secs;
        // At least 1 s, whatever was asked; jitter only adds.
        assert_eq!(shed_delay(Duration::ZERO, None, 0.0), s(1));
        assert_eq!(shed_delay(Duration::ZERO, Some(Duration::ZERO), 0.0), s(1));
        assert_eq!(shed_delay(Duration::ZERO, Some(s(4)), 0.0), s(4));
        assert_eq!(shed_delay(Duration::ZERO, Some(s(4)), 1.0), s(6));
        // Growing with consecutive sheds, up to the ceiling, or to what the master asks if more.
        let mut d = Duration::ZERO;
        let mut seen = vec![];
        for _ in 0..6 {
            d = shed_delay(d, Some(s(1)), 0.0);
            seen.push(d.as_secs());
        }
        assert_eq!(seen, vec![1, 2, 4, 8, 10, 10]);
        assert_eq!(shed_delay(s(10), Some(s(30)), 0.0), s(30));
    }

    #[test]
    fn heartbeat_waits() {
        let s = Duration::from_secs;
        // Answered: the interval less up to 20%, never late.
        assert_eq!(heartbeat_next(s(5), 0.0), s(5));
        assert_eq!(heartbeat_next(s(5), 1.0), s(4));
        // Failed: 1 s, doubling, up to twice the interval (at least 2 s), ±25%, never under 1 s.
        let mut d = Duration::ZERO;
        let mut seen = vec![];
        for _ in 0..6 {
            d = heartbeat_retry_delay(d, s(5), 0.5);
            seen.push(d.as_secs());
        }
        assert_eq!(seen, vec![1, 2, 4, 8, 10, 10]);
        assert_eq!(heartbeat_retry_delay(s(2), s(1), 0.5), s(2));
        assert_eq!(heartbeat_retry_delay(Duration::ZERO, s(1), 0.0), s(1));
        assert!(heartbeat_retry_delay(s(2), s(1), 1.0) <= Duration::from_millis(2500));
    }

    #[test]
    fn heartbeat_lists_follow_what_runs() {
        let mut st = AgentState::default();
        assert_eq!(st.heartbeat_interval(), Duration::from_secs(5));
        st.heartbeat_interval_ms = 1;
        assert_eq!(st.heartbeat_interval(), Duration::from_millis(100));
        st.tasks.insert(TaskId(1), SimTask { ended: false, stray: false });
        st.tasks.insert(TaskId(2), SimTask { ended: true, stray: false });
        st.push(TaskId(1), Report::Running { pid: 2 });
        st.push(TaskId(2), Report::Exited { exit: TaskExit::Exited { code: 0 } });
        let (mut known, running, as_of) = st.heartbeat_lists();
        known.sort();
        assert_eq!((known, running, as_of), (vec![TaskId(1), TaskId(2)], vec![TaskId(1)], 2));
    }
}
