//! A fleet of simulated agents in one process, each speaking the real agent protocol to a real
//! master: register, long-poll orders, report numbered status updates until acknowledged.
//!
//! Built so that 10,000 agents fit on two cores:
//! - one shared HTTP client (HTTP/1.1, one connection per agent's long poll, pooled);
//! - per agent one tokio task, which is the long poll itself; no thread, no timer of its own
//!   (a sleep only while backing off after an error);
//! - status updates are queued per agent and sent by one flusher task every [`FLUSH_EVERY`],
//!   one POST per agent with everything it queued meanwhile, at most [`POSTS_IN_FLIGHT_MAX`] at a
//!   time (a full pipe makes batches bigger instead of queues longer);
//! - timed exits (`sim:finish`, `sim:fail`) wait in one shared heap served by one task;
//! - an agent forgets a task once it ended and left its orders, so memory follows what runs.

use crate::executor::{behavior, Behavior};
use capstan_api::{RegisterRequest, RegisterResponse, UpdatesRequest, UpdatesResponse};
use capstan_model::{AgentId, Capacity, Desired, TaskExit, TaskId, Timestamp};
use capstan_state::{AgentInfo, Report, StatusUpdate};
use parking_lot::Mutex;
use serde::Deserialize;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};
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
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

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
    pub killed: AtomicU64,
    /// Running tasks that left the agent's orders without a stop order (lost, say).
    pub vanished: AtomicU64,
    /// `Exited(Killed)` reports the master acknowledged.
    pub killed_acked: AtomicU64,
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
    pub vanished: u64,
    pub killed_acked: u64,
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
}

impl AgentState {
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
    registrations: Semaphore,
    posts: Arc<Semaphore>,
    stats: Stats,
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

enum CallError {
    /// The master does not know the agent: register again.
    UnknownAgent,
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
            registrations: Semaphore::new(REGISTRATIONS_IN_FLIGHT_MAX),
            posts: Arc::new(Semaphore::new(POSTS_IN_FLIGHT_MAX)),
            stats: Stats::default(),
            last_error: Mutex::new(None),
        });
        let mut handles = Vec::with_capacity(config.count + 2);
        handles.push(tokio::spawn(flusher(shared.clone())));
        handles.push(tokio::spawn(timed_exits(shared.clone())));
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
        let ended = get(&s.exited) + get(&s.killed) + get(&s.vanished);
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
            vanished: get(&s.vanished),
            killed_acked: get(&s.killed_acked),
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
        let bytes = resp.bytes().await.map_err(|e| CallError::Other(error_chain(&e)))?;
        if status.as_u16() == 404 {
            return Err(CallError::UnknownAgent);
        }
        if !status.is_success() {
            return Err(CallError::Other(format!("{status}: {}", String::from_utf8_lossy(&bytes))));
        }
        serde_json::from_slice(&bytes).map_err(|e| CallError::Other(format!("unreadable answer: {e}")))
    }

    /// Registers (again) until the master answers; returns the master's epoch.
    async fn register(&self, index: u32) -> u64 {
        let agent = &self.agents[index as usize];
        let mut delay = RETRY_MIN;
        loop {
            let known: Vec<TaskId> = {
                let st = agent.state.lock();
                st.tasks.iter().filter(|(_, t)| !t.ended).map(|(id, _)| *id).collect()
            };
            let body = serde_json::to_vec(&RegisterRequest {
                info: agent.info.clone(),
                known_tasks: known.clone(),
                running_tasks: known,
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
                    let first = st.epoch == 0;
                    st.epoch = resp.master_epoch;
                    st.continue_after(resp.last_update_seq);
                    if !st.queue.is_empty() {
                        self.mark_dirty(index, &mut st);
                    }
                    drop(st);
                    if first {
                        self.stats.registered.fetch_add(1, Ordering::Relaxed);
                    }
                    return resp.master_epoch;
                }
                Err(CallError::UnknownAgent) | Err(CallError::Other(_)) => {
                    tokio::time::sleep(delay).await;
                    delay = backoff(delay);
                }
            }
        }
    }

    /// Makes what the agent runs match its orders, queueing the reports.
    fn reconcile(&self, index: u32, orders: Vec<OrderLite>) {
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
                    st.tasks.insert(order.task, SimTask { ended: false });
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
                    st.tasks.insert(order.task, SimTask { ended: true });
                    st.push(
                        order.task,
                        Report::Exited { exit: TaskExit::Killed { by: "killed on the master's order".into() } },
                    );
                    self.stats.killed.fetch_add(1, Ordering::Relaxed);
                }
                (Desired::Stop, None) => {
                    st.tasks.insert(order.task, SimTask { ended: true });
                    st.push(
                        order.task,
                        Report::Exited { exit: TaskExit::Killed { by: "stopped before it started".into() } },
                    );
                    // Never counted as launched, so not as killed either.
                }
                (Desired::Run, Some(_)) | (Desired::Stop, Some(true)) => {}
            }
        }
        // What the master no longer places here is over for this agent: forget it.
        let launched_gone = st.tasks.iter().filter(|(id, t)| !t.ended && !in_orders.contains(id)).count() as u64;
        st.tasks.retain(|id, _| in_orders.contains(id));
        if launched_gone > 0 {
            self.stats.vanished.fetch_add(launched_gone, Ordering::Relaxed);
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
    let mut epoch = shared.register(index).await;
    let mut version = 0u64;
    let mut delay = RETRY_MIN;
    loop {
        let url = format!(
            "{}/v1/agent/{id}/orders?epoch={epoch}&version={version}&wait_ms={}",
            shared.base,
            POLL_WAIT.as_millis()
        );
        let req = shared.http.get(url).timeout(POLL_WAIT + Duration::from_secs(10));
        match shared.call::<OrdersLite>(req).await {
            Ok(orders) => {
                delay = RETRY_MIN;
                shared.stats.orders_received.fetch_add(1, Ordering::Relaxed);
                if orders.master_epoch != epoch {
                    // A new master run: register again so it learns what runs here.
                    epoch = shared.register(index).await;
                }
                version = orders.version;
                shared.reconcile(index, orders.tasks);
            }
            Err(CallError::UnknownAgent) => {
                epoch = shared.register(index).await;
                version = 0;
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
            st.retry_delay = backoff(st.retry_delay);
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
            stop: vec![],
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
}
