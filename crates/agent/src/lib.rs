//! The Capstan agent: registers with the master, follows its orders (what must run here), runs
//! tasks through the containerizer, reports what happens to them, and serves their logs.
//!
//! Loops, each a tokio task: `orders` (long-polls the master and reconciles what runs here with
//! what must), `send_updates` (status updates from the durable queue in batches, retried until
//! acknowledged), `usage` (measures running tasks, enforces disk quotas), `gc` (removes old
//! sandboxes), and one watcher per task (waits for its supervisor and turns what it sees into
//! updates).
//!
//! On start the agent reads its checkpoint (`checkpoint`): a damaged or newer file stops it with a
//! message naming the file, unless the operator asked for `--recover=cleanup`.

pub mod checkpoint;
mod gc;
pub mod health;
pub mod http;
pub mod resources;
pub mod updates;
pub mod usage;

pub use checkpoint::{CheckpointError, RecoverMode};

use anyhow::Context as _;
use capstan_api::{ApiError, Client, Order, RegisterRequest};
use capstan_containerizer::{AttachError, Attached, Containerizer, ContainerizerConfig, LaunchSpec};
use capstan_model::spec::HealthCheckSpec;
use capstan_model::{AgentId, Capacity, Desired, TaskExit, TaskId};
use capstan_state::{AgentInfo, Report, StatusUpdate};
use checkpoint::{REPORTED_MARKER, SANDBOXES_DIR, UPDATE_LOG_FILE};
use health::{CheckTarget, HealthEvent};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use updates::UpdateQueue;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `http://host:port[,…]` of the master(s).
    pub masters: String,
    pub data_dir: PathBuf,
    /// Where the agent's own API (logs) listens.
    pub bind: SocketAddr,
    /// The URL the master uses to reach this agent; default from `bind` and the hostname.
    pub advertise: Option<String>,
    pub attributes: BTreeMap<String, String>,
    /// `cpus=N,mem=SIZE,disk=SIZE,ports=LO-HI` over the detected values.
    pub resources: Option<String>,
    pub allow_root_tasks: bool,
    pub cgroup_root: String,
    /// How to start a supervisor; default: this binary with `supervise`.
    pub supervisor_cmd: Option<Vec<std::ffi::OsString>>,
    /// What to do with the tasks and files found in the data directory.
    pub recover: RecoverMode,
    /// How often running tasks are measured (usage to the master, disk quota).
    pub usage_interval: Duration,
    /// How often ended sandboxes are considered for removal.
    pub gc_interval: Duration,
    /// Sandboxes of ended (and reported) tasks older than this are removed.
    pub sandbox_max_age: Duration,
    /// Below this much free space (percent of the data directory's file system), ended sandboxes
    /// are removed oldest first.
    pub sandbox_min_free_percent: f64,
    /// Most processes (and threads) a task may have; 0: no limit.
    pub task_pids_max: u64,
}

impl AgentConfig {
    pub const DEFAULT_USAGE_INTERVAL: Duration = Duration::from_secs(5);
    pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(60);
    pub const DEFAULT_SANDBOX_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
    pub const DEFAULT_SANDBOX_MIN_FREE_PERCENT: f64 = 10.0;
    pub const DEFAULT_TASK_PIDS_MAX: u64 = 4096;

    /// The defaults: listen on `127.0.0.1:0`, detected resources, cgroup root `capstan`.
    pub fn new(masters: impl Into<String>, data_dir: impl Into<PathBuf>) -> AgentConfig {
        AgentConfig {
            masters: masters.into(),
            data_dir: data_dir.into(),
            bind: "127.0.0.1:0".parse().expect("literal address"),
            advertise: None,
            attributes: BTreeMap::new(),
            resources: None,
            allow_root_tasks: false,
            cgroup_root: "capstan".into(),
            supervisor_cmd: None,
            recover: RecoverMode::Reattach,
            usage_interval: Self::DEFAULT_USAGE_INTERVAL,
            gc_interval: Self::DEFAULT_GC_INTERVAL,
            sandbox_max_age: Self::DEFAULT_SANDBOX_MAX_AGE,
            sandbox_min_free_percent: Self::DEFAULT_SANDBOX_MIN_FREE_PERCENT,
            task_pids_max: Self::DEFAULT_TASK_PIDS_MAX,
        }
    }
}

/// A request to stop a running task.
#[derive(Clone, Debug)]
pub(crate) enum Stop {
    /// Ends as `TaskExit::Killed { by }`.
    By(String),
    /// Ends as this (over disk quota, failed health check).
    Because(TaskExit),
}

/// What the agent knows of one task it runs or ran.
struct Local {
    stop: mpsc::UnboundedSender<Stop>,
    ended: bool,
    /// The master acknowledged the task's end (the sandbox holds the `reported` marker).
    reported: bool,
    /// When it ended (ms since the epoch); 0 while it runs.
    ended_at_ms: u64,
    /// The task's disk reservation (0: not known yet, or none).
    disk_limit_bytes: u64,
    /// The task process runs (its supervisor reported it started).
    started: bool,
    /// The job's health check and what it checks, once known (from the launch order, or from the
    /// first order after a re-attach).
    health_check: Option<(HealthCheckSpec, CheckTarget)>,
    /// The running checker; aborted when the task ends.
    checker: Option<JoinHandle<()>>,
    /// The watcher of the task (aborted by [`AgentHandle::stop`]).
    watcher: Option<tokio::task::AbortHandle>,
}

impl Local {
    fn running(stop: mpsc::UnboundedSender<Stop>, disk_limit_bytes: u64) -> Local {
        Local {
            stop,
            ended: false,
            reported: false,
            ended_at_ms: 0,
            disk_limit_bytes,
            started: false,
            health_check: None,
            checker: None,
            watcher: None,
        }
    }

    fn ended(ended_at_ms: u64, reported: bool) -> Local {
        let (stop, _) = mpsc::unbounded_channel();
        Local { ended: true, reported, ended_at_ms, ..Local::running(stop, 0) }
    }
}

/// Tasks whose sandboxes were collected: never launched again, even if a stale order names
/// them. Bounded; the oldest are forgotten first.
#[derive(Default)]
struct Collected {
    order: VecDeque<TaskId>,
    set: HashSet<TaskId>,
}

const COLLECTED_MAX: usize = 100_000;

impl Collected {
    fn insert(&mut self, task: TaskId) {
        if self.set.insert(task) {
            self.order.push_back(task);
            if self.order.len() > COLLECTED_MAX {
                let old = self.order.pop_front().expect("non-empty");
                self.set.remove(&old);
            }
        }
    }
}

pub struct Agent {
    pub id: AgentId,
    pub info: AgentInfo,
    pub(crate) config: AgentConfig,
    pub(crate) client: Client,
    pub(crate) containerizer: Containerizer,
    sandboxes: PathBuf,
    tasks: Mutex<HashMap<TaskId, Local>>,
    collected: Mutex<Collected>,
    pub updates: Arc<UpdateQueue>,
    epoch: Mutex<u64>,
    /// The agent's loops (for [`AgentHandle::stop`]).
    loops: Mutex<Vec<tokio::task::AbortHandle>>,
}

pub struct AgentHandle {
    pub agent: Arc<Agent>,
    pub addr: SocketAddr,
}

impl AgentHandle {
    /// Stops the agent's loops and its API (tasks keep running; a new agent on the same data
    /// directory finds them again). For tests that restart an agent within one process.
    pub fn stop(&self) {
        for l in self.agent.loops.lock().drain(..) {
            l.abort();
        }
        for local in self.agent.tasks.lock().values_mut() {
            if let Some(w) = local.watcher.take() {
                w.abort();
            }
            if let Some(c) = local.checker.take() {
                c.abort();
            }
        }
    }
}

const POLL_WAIT: Duration = Duration::from_secs(30);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Jittered exponential backoff: the next delay after `d` (doubling, capped at `RETRY_MAX`,
/// ±25 % jitter so that many agents do not retry in step).
fn backoff(d: Duration) -> Duration {
    let next = (d * 2).min(RETRY_MAX);
    let jitter = rand::random::<f64>() * 0.5 + 0.75;
    next.mul_f64(jitter).clamp(RETRY_MIN, RETRY_MAX)
}

/// Reads (or, with `--recover=cleanup`, resets) the checkpoint: the agent id and the update log.
fn open_checkpoint(config: &AgentConfig, containerizer: &Containerizer) -> anyhow::Result<(AgentId, UpdateQueue)> {
    let data_dir = &config.data_dir;
    let log = data_dir.join(UPDATE_LOG_FILE);
    let sandboxes = data_dir.join(SANDBOXES_DIR);
    let id = match config.recover {
        RecoverMode::Cleanup => checkpoint::cleanup(data_dir, containerizer)?,
        RecoverMode::Reattach => match checkpoint::read_identity(data_dir)? {
            Some(id) => id,
            None => {
                let earlier = log.exists() || !checkpoint::task_sandboxes(&sandboxes).is_empty();
                if earlier {
                    return Err(CheckpointError {
                        file: data_dir.join(checkpoint::IDENTITY_FILE),
                        problem: "missing, but the data directory holds the update log or sandboxes of an \
                                  earlier agent"
                            .into(),
                    }
                    .into());
                }
                let id = AgentId(rand::random());
                checkpoint::write_identity(data_dir, id).context("cannot write agent.json")?;
                id
            }
        },
    };
    let updates = UpdateQueue::open(&log).map_err(CheckpointError::from)?;
    std::fs::create_dir_all(&sandboxes)
        .with_context(|| format!("cannot create the sandboxes directory {}", sandboxes.display()))?;
    checkpoint::check_sandboxes(&sandboxes)?;
    Ok((id, updates))
}

pub async fn start(config: AgentConfig) -> anyhow::Result<AgentHandle> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create the data directory {}", config.data_dir.display()))?;
    let detected = resources::detect(&config.data_dir);
    let capacity = match &config.resources {
        Some(text) => Capacity::parse_overrides(&detected, text).map_err(|e| anyhow::anyhow!("--resources: {e}"))?,
        None => detected,
    };
    let mut cz = ContainerizerConfig {
        cgroup_root: config.cgroup_root.clone(),
        allow_root: config.allow_root_tasks,
        ..Default::default()
    };
    if let Some(cmd) = &config.supervisor_cmd {
        cz.supervisor_cmd = cmd.clone();
    }
    let containerizer = Containerizer::new(cz)?;
    let (id, updates) = open_checkpoint(&config, &containerizer)?;
    let sandboxes = config.data_dir.join(SANDBOXES_DIR);
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("cannot listen on {}", config.bind))?;
    let addr = listener.local_addr()?;
    let hostname = resources::hostname();
    let address = config.advertise.clone().unwrap_or_else(|| {
        let host = if addr.ip().is_unspecified() { hostname.clone() } else { addr.ip().to_string() };
        format!("http://{host}:{}", addr.port())
    });
    let mut attributes = config.attributes.clone();
    attributes.entry("hostname".into()).or_insert_with(|| hostname.clone());
    let info = AgentInfo { id, hostname, address, capacity, attributes, version: env!("CARGO_PKG_VERSION").into() };
    let agent = Arc::new(Agent {
        id,
        info,
        client: Client::new(&config.masters),
        containerizer,
        sandboxes,
        tasks: Mutex::new(HashMap::new()),
        collected: Mutex::new(Collected::default()),
        updates: Arc::new(updates),
        epoch: Mutex::new(0),
        loops: Mutex::new(Vec::new()),
        config,
    });
    agent.recover()?;
    let router = http::router(agent.clone());
    let mut loops = vec![tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("agent HTTP server stopped: {e}");
        }
    })];
    // Registration waits for a master; the API (logs of tasks that run here) serves meanwhile,
    // and `start` returns at once so that the caller can say where.
    let a = agent.clone();
    loops.push(tokio::spawn(async move {
        a.register().await;
        let started = [
            tokio::spawn(a.clone().send_updates()),
            tokio::spawn(usage::usage_loop(a.clone())),
            tokio::spawn(gc::gc_loop(a.clone())),
        ];
        a.loops.lock().extend(started.iter().map(JoinHandle::abort_handle));
        a.clone().follow_orders().await;
    }));
    agent.loops.lock().extend(loops.iter().map(JoinHandle::abort_handle));
    tracing::info!(agent = %id, "agent running; API on http://{addr}");
    Ok(AgentHandle { agent, addr })
}

impl Agent {
    pub fn sandbox(&self, task: TaskId) -> PathBuf {
        self.sandboxes.join(task.to_string())
    }

    pub fn is_running(&self, task: TaskId) -> bool {
        self.tasks.lock().get(&task).is_some_and(|l| !l.ended)
    }

    /// Running tasks and their disk reservations.
    pub(crate) fn running_tasks(&self) -> Vec<(TaskId, u64)> {
        self.tasks.lock().iter().filter(|(_, l)| !l.ended).map(|(id, l)| (*id, l.disk_limit_bytes)).collect()
    }

    /// Ended tasks whose end the master has, with when they ended.
    pub(crate) fn collectable_tasks(&self) -> Vec<(TaskId, u64)> {
        self.tasks.lock().iter().filter(|(_, l)| l.ended && l.reported).map(|(id, l)| (*id, l.ended_at_ms)).collect()
    }

    /// Forgets an ended, reported task (its sandbox is about to go). False if it is not one.
    pub(crate) fn forget_ended(&self, task: TaskId) -> bool {
        let mut tasks = self.tasks.lock();
        if !tasks.get(&task).is_some_and(|l| l.ended && l.reported) {
            return false;
        }
        tasks.remove(&task);
        self.collected.lock().insert(task);
        true
    }

    /// Asks a running task to stop (no effect once it ended).
    pub(crate) fn stop_task(&self, task: TaskId, stop: Stop) {
        if let Some(l) = self.tasks.lock().get(&task).filter(|l| !l.ended) {
            let _ = l.stop.send(stop);
        }
    }

    /// Finds the tasks that were running before this agent (re)started and watches them again;
    /// reports the ends the master does not have yet.
    fn recover(self: &Arc<Self>) -> Result<(), CheckpointError> {
        for (task, sandbox) in checkpoint::task_sandboxes(&self.sandboxes) {
            let marker = sandbox.join(REPORTED_MARKER);
            if marker.exists() {
                // Over, and the master has its end: remember it so it is never launched again.
                let ended_at_ms = std::fs::metadata(&marker)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64);
                self.tasks.lock().insert(task, Local::ended(ended_at_ms, true));
                continue;
            }
            match self.containerizer.attach(&sandbox) {
                Ok(Attached::Running(handle)) => {
                    tracing::info!(%task, "re-attached to a running task");
                    self.watch(task, handle, 0);
                }
                Ok(Attached::NotStarted) => {
                    // The agent stopped while it started the supervisor: nothing ran, so this is
                    // not an end of the task. Start it now, as the launch would have.
                    tracing::warn!(%task, "the agent stopped before the task's supervisor started; starting it now");
                    match self.containerizer.relaunch(&sandbox) {
                        Ok(handle) => self.watch(task, handle, 0),
                        Err(e) => {
                            tracing::warn!(%task, "relaunch failed: {e}");
                            self.tasks.lock().insert(task, Local::ended(updates::now().0, false));
                            if !self.updates.has_pending_exit(task) {
                                self.updates.push(
                                    task,
                                    Report::Exited { exit: TaskExit::LaunchFailed { message: e.to_string() } },
                                );
                            }
                        }
                    }
                }
                Ok(Attached::Exited(record)) => {
                    tracing::info!(%task, "task ended while the agent was away: {}", record.exit);
                    self.tasks.lock().insert(task, Local::ended(record.ended_at_ms, false));
                    if !self.updates.has_pending_exit(task) {
                        self.updates.push(task, Report::Exited { exit: record.exit });
                    }
                }
                Err(AttachError::NotLaunched(_)) => {
                    // The agent stopped between creating the sandbox and writing launch.json:
                    // nothing ran. The master decides again (the task is not among the known).
                    tracing::warn!(%task, "sandbox {} holds no launch: nothing ran there", sandbox.display());
                }
                Err(e) => return Err(CheckpointError { file: sandbox, problem: e.to_string() }),
            }
        }
        Ok(())
    }

    /// Writes the `reported` marker of every `Exited` among `acked` (before they leave the
    /// queue, so that a crash in between only leads to a resend the master drops).
    fn mark_reported(&self, acked: &[StatusUpdate]) {
        for u in acked.iter().filter(|u| matches!(u.report, Report::Exited { .. })) {
            let sandbox = self.sandbox(u.task);
            if sandbox.is_dir() {
                if let Err(e) = std::fs::write(sandbox.join(REPORTED_MARKER), b"") {
                    tracing::warn!(task = %u.task, "cannot mark the sandbox as reported: {e}");
                }
            }
            if let Some(l) = self.tasks.lock().get_mut(&u.task) {
                l.reported = true;
            }
        }
    }

    /// Registers (again) with the master, until it answers.
    async fn register(&self) {
        let mut delay = RETRY_MIN;
        loop {
            let known: Vec<TaskId> = self.tasks.lock().keys().copied().collect();
            match self
                .client
                .register(&RegisterRequest { info: self.info.clone(), known_tasks: known, running_tasks: vec![] })
                .await
            {
                Ok(resp) => {
                    *self.epoch.lock() = resp.master_epoch;
                    let last = resp.last_update_seq;
                    if !self.updates.renumber_if_behind(last) {
                        self.mark_reported(&self.updates.pending_upto(last));
                        self.updates.ack(last);
                    }
                    tracing::info!(agent = %self.id, "registered with the master");
                    return;
                }
                Err(e) => {
                    tracing::warn!("cannot register with the master: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = backoff(delay);
                }
            }
        }
    }

    async fn follow_orders(self: Arc<Self>) {
        let mut version = 0;
        let mut delay = RETRY_MIN;
        loop {
            let epoch = *self.epoch.lock();
            match self.client.orders(self.id, epoch, version, POLL_WAIT).await {
                Ok(orders) => {
                    delay = RETRY_MIN;
                    if orders.master_epoch != epoch {
                        // A new master run: register again so it learns what runs here.
                        self.register().await;
                    }
                    version = orders.version;
                    self.reconcile(orders.tasks);
                }
                Err(ApiError::Api { status: 404, .. }) => {
                    self.register().await;
                }
                Err(e) => {
                    tracing::warn!("cannot get orders: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = backoff(delay);
                }
            }
        }
    }

    /// Makes what runs here match the orders: launch what must run, stop what must stop.
    fn reconcile(self: &Arc<Self>, orders: Vec<Order>) {
        for order in orders {
            if self.collected.lock().set.contains(&order.task) {
                // Its end was reported and its sandbox collected: a stale order.
                continue;
            }
            let known = {
                let mut tasks = self.tasks.lock();
                tasks.get_mut(&order.task).map(|l| {
                    // A re-attached task learns its disk reservation and health check from its
                    // first order.
                    l.disk_limit_bytes = order.spec.disk.0;
                    if l.health_check.is_none() {
                        l.health_check = order.health_check.clone().map(|c| (c, self.check_target(&order)));
                    }
                    (l.ended, l.stop.clone())
                })
            };
            if known.as_ref().is_some_and(|(ended, _)| !ended) {
                self.start_health_check(order.task);
            }
            match (order.desired, known) {
                (Desired::Run, None) => self.launch(order),
                (Desired::Stop, Some((false, stop))) => {
                    let _ = stop.send(Stop::By("the master ordered it stopped".into()));
                }
                (Desired::Stop, None) => {
                    self.tasks.lock().insert(order.task, Local::ended(updates::now().0, false));
                    self.updates.push(
                        order.task,
                        Report::Exited {
                            exit: TaskExit::Killed { by: "the master ordered it stopped before it started".into() },
                        },
                    );
                }
                (Desired::Run, Some(_)) | (Desired::Stop, Some((true, _))) => {}
            }
        }
    }

    /// The task's environment: its spec's variables, `CAPSTAN_*` and `PORT_*`.
    fn task_env(&self, order: &Order) -> Vec<(String, String)> {
        let task = order.task;
        let mut env: Vec<(String, String)> = order.spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.push(("CAPSTAN_TASK_ID".into(), task.to_string()));
        env.push(("CAPSTAN_JOB".into(), order.job.to_string()));
        env.push(("CAPSTAN_INSTANCE".into(), order.instance.to_string()));
        env.push(("CAPSTAN_SANDBOX".into(), self.sandbox(task).display().to_string()));
        for (name, port) in &order.ports {
            env.push((capstan_model::TaskSpec::port_env_name(name), port.to_string()));
        }
        env
    }

    /// What a health check of this task probes, and as whom.
    fn check_target(&self, order: &Order) -> CheckTarget {
        CheckTarget {
            host: std::net::Ipv4Addr::LOCALHOST.into(),
            ports: order.ports.clone(),
            sandbox: self.sandbox(order.task),
            user: order.spec.user.clone(),
            env: self.task_env(order),
            allow_root: self.config.allow_root_tasks,
        }
    }

    /// Starts the task's health checker if it has a check, runs, and has no checker yet. Healthy
    /// and unhealthy become `Report::Health`; unhealthy also stops the task as
    /// `TaskExit::HealthCheckFailed`.
    fn start_health_check(self: &Arc<Self>, task: TaskId) {
        let mut tasks = self.tasks.lock();
        let Some(l) = tasks.get_mut(&task) else { return };
        if l.ended || !l.started || l.checker.is_some() {
            return;
        }
        let Some((spec, target)) = l.health_check.clone() else { return };
        let (events_tx, mut events) = mpsc::unbounded_channel();
        l.checker = Some(health::spawn(spec, target, events_tx));
        drop(tasks);
        let agent = self.clone();
        tokio::spawn(async move {
            // Ends when the checker is aborted (its sender goes with it).
            while let Some(event) = events.recv().await {
                match event {
                    HealthEvent::Healthy { detail } => {
                        tracing::info!(%task, "healthy: {detail}");
                        agent.updates.push(task, Report::Health { healthy: true, reason: detail });
                    }
                    HealthEvent::Unhealthy { reason } => {
                        tracing::warn!(%task, "unhealthy, stopping it: {reason}");
                        agent.updates.push(task, Report::Health { healthy: false, reason: reason.clone() });
                        agent.stop_task(task, Stop::Because(TaskExit::HealthCheckFailed { reason }));
                    }
                }
            }
        });
    }

    fn launch(self: &Arc<Self>, order: Order) {
        let task = order.task;
        let sandbox = self.sandbox(task);
        let env = self.task_env(&order);
        let pids_max = self.config.task_pids_max;
        let spec = LaunchSpec {
            task_id: task,
            command: order.spec.command.clone(),
            user: order.spec.user.clone(),
            env,
            cpus_milli: order.spec.cpus_milli,
            mem_bytes: order.spec.mem.0,
            pids_max: (pids_max > 0).then_some(pids_max),
            kill_grace_ms: order.spec.kill_grace.0,
            log_max_bytes: 0,
            log_keep: 0,
        };
        self.updates.push(task, Report::Starting);
        match self.containerizer.launch(&sandbox, &spec) {
            Ok(handle) => {
                self.watch(task, handle, order.spec.disk.0);
                if let Some(check) = order.health_check.clone() {
                    let target = self.check_target(&order);
                    if let Some(l) = self.tasks.lock().get_mut(&task) {
                        l.health_check = Some((check, target));
                    }
                    // In case the task already runs (else its watcher starts the check).
                    self.start_health_check(task);
                }
            }
            Err(e) => {
                tracing::warn!(%task, "launch failed: {e}");
                self.tasks.lock().insert(task, Local::ended(updates::now().0, false));
                self.updates.push(task, Report::Exited { exit: TaskExit::LaunchFailed { message: e.to_string() } });
            }
        }
    }

    /// Watches one task until it ends, reporting what it sees and passing on stop requests.
    fn watch(self: &Arc<Self>, task: TaskId, mut handle: capstan_containerizer::TaskHandle, disk_limit_bytes: u64) {
        let (stop_tx, mut stop_rx) = mpsc::unbounded_channel::<Stop>();
        self.tasks.lock().insert(task, Local::running(stop_tx, disk_limit_bytes));
        let agent = self.clone();
        let watcher = tokio::spawn(async move {
            let mut stopping = false;
            let mut stop = |handle: &capstan_containerizer::TaskHandle, request: Stop| {
                if std::mem::replace(&mut stopping, true) {
                    return;
                }
                tracing::info!(%task, "stopping: {request:?}");
                let sent = match request {
                    Stop::By(by) => handle.kill_by(&by),
                    Stop::Because(exit) => handle.kill_because(exit),
                };
                if let Err(e) = sent {
                    tracing::warn!(%task, "cannot signal the supervisor: {e}");
                }
            };
            let record = loop {
                tokio::select! {
                    started = handle.started() => match started {
                        Ok(pid) => {
                            agent.updates.push(task, Report::Running { pid });
                            if let Some(l) = agent.tasks.lock().get_mut(&task) {
                                l.started = true;
                            }
                            agent.start_health_check(task);
                            break None;
                        }
                        Err(record) => break Some(record),
                    },
                    Some(request) = stop_rx.recv() => stop(&handle, request),
                }
            };
            let record = match record {
                Some(r) => r,
                None => loop {
                    tokio::select! {
                        r = handle.wait() => break r,
                        Some(request) = stop_rx.recv() => stop(&handle, request),
                    }
                },
            };
            if let Some(l) = agent.tasks.lock().get_mut(&task) {
                l.ended = true;
                l.ended_at_ms = record.ended_at_ms;
                if let Some(checker) = l.checker.take() {
                    checker.abort();
                }
            }
            agent.updates.push(task, Report::Exited { exit: record.exit });
        });
        if let Some(l) = self.tasks.lock().get_mut(&task) {
            l.watcher = Some(watcher.abort_handle());
        }
    }

    /// Sends queued status updates in batches (each made durable first) until each is
    /// acknowledged, backing off while the master does not take them.
    async fn send_updates(self: Arc<Self>) {
        let mut delay = RETRY_MIN;
        loop {
            let notified = self.updates.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let queue = self.updates.clone();
            let batch = match tokio::task::spawn_blocking(move || queue.batch()).await {
                Ok(Ok(batch)) => batch,
                Ok(Err(e)) => {
                    tracing::error!(
                        "cannot write the status update log: {e}; nothing is sent before it is durable; \
                         retrying in {delay:?}"
                    );
                    tokio::time::sleep(delay).await;
                    delay = backoff(delay);
                    continue;
                }
                Err(e) => {
                    tracing::error!("writing the status update log failed: {e}");
                    tokio::time::sleep(delay).await;
                    delay = backoff(delay);
                    continue;
                }
            };
            let Some(last) = batch.last().map(|u| u.seq) else {
                notified.await;
                continue;
            };
            let req = capstan_api::UpdatesRequest { agent: self.id, updates: batch };
            match self.client.send_updates(&req).await {
                Ok(resp) => {
                    let acked: Vec<StatusUpdate> =
                        req.updates.into_iter().take_while(|u| u.seq <= resp.acked_seq).collect();
                    self.mark_reported(&acked);
                    self.updates.ack(resp.acked_seq);
                    if resp.acked_seq >= last {
                        delay = RETRY_MIN;
                    } else {
                        tracing::warn!(
                            "the master acknowledged status updates up to {} of {last}; retrying in {delay:?}",
                            resp.acked_seq
                        );
                        tokio::time::sleep(delay).await;
                        delay = backoff(delay);
                    }
                }
                Err(ApiError::Api { status: 404, .. }) => self.register().await,
                Err(e) => {
                    tracing::warn!("cannot send status updates: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = backoff(delay);
                }
            }
        }
    }
}
