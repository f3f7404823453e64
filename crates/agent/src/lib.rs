//! The Capstan agent: registers with the master, follows its orders (what must run here), runs
//! tasks through the containerizer, reports what happens to them, and serves their logs.
//!
//! Loops, each a tokio task: `orders` (long-polls the master and reconciles what runs here with
//! what must, stops what the master wants gone, and learns whether the cluster is frozen),
//! `send_updates` (status updates from the durable queue in batches, retried until acknowledged),
//! `heartbeat` (tells the master every heartbeat interval that the agent lives and what it has),
//! `usage` (measures running tasks, enforces disk quotas), `gc` (removes old sandboxes and their
//! disk volumes), and one watcher per task (waits for its supervisor and turns what it sees into updates).
//!
//! Every call to the master is retried with jittered backoff (`retry`); a master that sheds load
//! (503, 429) is given at least a second, and a re-registration after an outage waits a random
//! part of the heartbeat interval, so that a cluster's agents never hammer their master.
//!
//! On start the agent reads its checkpoint (`checkpoint`): a damaged or newer file stops it with a
//! message naming the file, unless the operator asked for `--recover=cleanup`.
//! How disk limits are held (project quota, a loop volume per task, check-and-kill) is chosen at
//! start in `disk`.

pub mod checkpoint;
mod disk;
mod gc;
pub mod health;
mod heartbeat;
pub mod http;
pub mod resources;
pub mod retry;
pub mod updates;
pub mod usage;

pub use checkpoint::{CheckpointError, RecoverMode};
pub use disk::{DiskEnforcement, VOLUMES_DIR};

use anyhow::Context as _;
use capstan_api::{Client, HeartbeatRequest, Order, RegisterRequest, StopOrder};
use capstan_containerizer::{AttachError, Attached, Containerizer, ContainerizerConfig, LaunchSpec};
use capstan_model::spec::{DurationMs, HealthCheckSpec};
use capstan_model::{AgentId, Capacity, Desired, TaskExit, TaskId};
use capstan_state::{AgentInfo, Report, StatusUpdate};
use checkpoint::{REPORTED_MARKER, SANDBOXES_DIR, UPDATE_LOG_FILE};
use health::{CheckTarget, HealthEvent};
use parking_lot::Mutex;
use retry::{Backoff, Failure};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use updates::UpdateQueue;

/// The agent attribute that says how disk limits are enforced here: `project_quota` (the file
/// system refuses writes past the limit), `loop_volume` (a size-limited volume per task refuses
/// them) or `check_and_kill` (measured every
/// [`AgentConfig::disk_check_interval`], the task killed when over). Jobs may constrain on it.
pub const DISK_ENFORCEMENT_ATTRIBUTE: &str = "disk_enforcement";

/// Default period of the disk check-and-kill fallback.
pub const DISK_CHECK_INTERVAL_DEFAULT_MS: u64 = 1_000;

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
    /// How often running tasks are measured (usage to the master).
    pub usage_interval: Duration,
    /// How often the sandboxes of running tasks without a project quota are measured against
    /// their disk limit (the check-and-kill fallback).
    pub disk_check_interval: Duration,
    /// What holds tasks to their disk limit (see [`DiskEnforcement`]).
    pub disk_enforcement: DiskEnforcement,
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
    pub const DEFAULT_DISK_CHECK_INTERVAL: Duration = Duration::from_millis(DISK_CHECK_INTERVAL_DEFAULT_MS);
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
            disk_check_interval: Self::DEFAULT_DISK_CHECK_INTERVAL,
            disk_enforcement: DiskEnforcement::Auto,
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
    /// The file system's project quota holds the sandbox to `disk_limit_bytes` (writes past it
    /// fail), so the agent's check-and-kill leaves the task alone.
    disk_quota_enforced: bool,
    /// The task process runs (its supervisor reported it started).
    started: bool,
    /// The job's health check and what it checks, once known (from the launch order, or from the
    /// first order after a re-attach).
    health_check: Option<(HealthCheckSpec, CheckTarget)>,
    /// The running checker; aborted when the task ends.
    checker: Option<JoinHandle<()>>,
    /// Counts the checkers started for this task; events of an earlier one are ignored.
    checker_generation: u64,
    /// The checker found the task unhealthy while the cluster was frozen, so it was not stopped;
    /// when the cluster is unfrozen its checker starts again and a new run of failures stops it.
    unhealthy_spared: bool,
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
            disk_quota_enforced: false,
            started: false,
            health_check: None,
            checker: None,
            checker_generation: 0,
            unhealthy_spared: false,
            watcher: None,
        }
    }

    fn ended(ended_at_ms: u64, reported: bool) -> Local {
        let (stop, _) = mpsc::unbounded_channel();
        Local { ended: true, reported, ended_at_ms, ..Local::running(stop, 0) }
    }
}

/// What the agent tells the master it has (at registration and in every heartbeat).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct TaskLists {
    /// Every task it has: running, or ended and not yet collected. Sorted.
    known: Vec<TaskId>,
    /// The tasks among `known` that have not ended (their process runs, or is being started).
    /// Sorted.
    running: Vec<TaskId>,
}

fn task_lists(tasks: &HashMap<TaskId, Local>) -> TaskLists {
    let mut lists = TaskLists::default();
    for (id, l) in tasks {
        lists.known.push(*id);
        if !l.ended {
            lists.running.push(*id);
        }
    }
    lists.known.sort_unstable();
    lists.running.sort_unstable();
    lists
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
    /// The newest master epoch seen (also in the data directory): a master answering with an
    /// older one is a deposed leader, whose orders are ignored.
    newest_epoch: AtomicU64,
    /// The heartbeat interval the master asked for last, in ms.
    heartbeat_interval_ms: AtomicU64,
    /// The latest orders say the cluster is frozen: a failed health check does not stop its task.
    frozen: AtomicBool,
    /// A call to the master failed as in an outage (unreachable, failing, shedding load) since the
    /// last registration: the next re-registration waits a random part of the heartbeat interval.
    outage_since_registered: AtomicBool,
    /// One registration at a time (orders, updates and heartbeats may each ask for one).
    registering: tokio::sync::Mutex<()>,
    /// Successful registrations so far.
    registrations: AtomicU64,
    /// The agent's loops (for [`AgentHandle::stop`]).
    loops: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Project quotas of the sandboxes' file system, when it has them (detected at start): the
    /// disk limit is then enforced by the kernel; otherwise by the check-and-kill in `usage`.
    quotas: Option<capstan_containerizer::ProjectQuotas>,
    /// The per-task volumes (DATA/volumes): made at launch when `volume_per_task`, removed with
    /// their sandboxes in any case (they may be left from a start with another enforcement).
    volumes: capstan_containerizer::LoopVolumes,
    /// `--disk-enforcement=loop-volume`: every launch with a disk limit gets a volume.
    volume_per_task: bool,
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
    // Tasks pass through it to their own sandbox; nobody but root lists which tasks run here.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sandboxes, std::fs::Permissions::from_mode(checkpoint::SANDBOXES_DIR_MODE))
            .with_context(|| format!("cannot chmod the sandboxes directory {}", sandboxes.display()))?;
    }
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
    let enforcer = disk::choose(
        config.disk_enforcement,
        &sandboxes,
        &config.data_dir.join(VOLUMES_DIR),
        config.disk_check_interval,
    )?;
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("cannot listen on {}", config.bind))?;
    let addr = listener.local_addr()?;
    let hostname = resources::hostname();
    let address = config.advertise.clone().unwrap_or_else(|| {
        if addr.ip().is_unspecified() {
            format!("http://{hostname}:{}", addr.port())
        } else {
            format!("http://{addr}")
        }
    });
    // The master registers only a plain http://HOST:PORT: say so here rather than at every retry.
    capstan_api::wire::parse_agent_address(&address).map_err(|e| anyhow::anyhow!("--advertise: {e}"))?;
    let mut attributes = config.attributes.clone();
    attributes.entry("hostname".into()).or_insert_with(|| hostname.clone());
    attributes.insert(DISK_ENFORCEMENT_ATTRIBUTE.into(), enforcer.attribute().into());
    let info = AgentInfo { id, hostname, address, capacity, attributes, version: env!("CARGO_PKG_VERSION").into() };
    let mut agent = Agent::new(config, info, containerizer, sandboxes, updates);
    agent.volume_per_task = matches!(enforcer, disk::Enforcer::Volumes);
    if let disk::Enforcer::Quotas(quotas) = enforcer {
        agent.quotas = Some(quotas);
    }
    let agent = Arc::new(agent);
    agent.recover()?;
    agent.sweep_volumes();
    let router = http::router(agent.clone());
    let mut loops = vec![tokio::spawn(capstan_api::serve::serve(listener, router, Default::default()))];
    // Registration waits for a master; the API (logs of tasks that run here) serves meanwhile,
    // and `start` returns at once so that the caller can say where.
    let a = agent.clone();
    loops.push(tokio::spawn(async move {
        a.register().await;
        let started = [
            tokio::spawn(a.clone().send_updates()),
            tokio::spawn(heartbeat::heartbeat_loop(a.clone())),
            tokio::spawn(usage::usage_loop(a.clone())),
            tokio::spawn(usage::disk_loop(a.clone())),
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
    fn new(
        config: AgentConfig,
        info: AgentInfo,
        containerizer: Containerizer,
        sandboxes: PathBuf,
        updates: UpdateQueue,
    ) -> Agent {
        Agent {
            id: info.id,
            info,
            client: Client::new(&config.masters),
            containerizer,
            sandboxes,
            tasks: Mutex::new(HashMap::new()),
            collected: Mutex::new(Collected::default()),
            updates: Arc::new(updates),
            epoch: Mutex::new(0),
            newest_epoch: AtomicU64::new(checkpoint::read_master_epoch(&config.data_dir)),
            heartbeat_interval_ms: AtomicU64::new(retry::HEARTBEAT_DEFAULT.as_millis() as u64),
            frozen: AtomicBool::new(false),
            outage_since_registered: AtomicBool::new(false),
            registering: tokio::sync::Mutex::new(()),
            registrations: AtomicU64::new(0),
            loops: Mutex::new(Vec::new()),
            quotas: None,
            volumes: capstan_containerizer::LoopVolumes::at(&config.data_dir.join(VOLUMES_DIR)),
            volume_per_task: false,
            config,
        }
    }

    pub fn sandbox(&self, task: TaskId) -> PathBuf {
        self.sandboxes.join(task.to_string())
    }

    pub fn is_running(&self, task: TaskId) -> bool {
        self.tasks.lock().get(&task).is_some_and(|l| !l.ended)
    }

    /// Whether the latest orders said the cluster is frozen.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// How often heartbeats go to the master (as it asked last).
    pub fn heartbeat_interval(&self) -> Duration {
        retry::heartbeat_interval(self.heartbeat_interval_ms.load(Ordering::Relaxed))
    }

    fn set_heartbeat_interval(&self, ms: u64) {
        self.heartbeat_interval_ms.store(ms, Ordering::Relaxed);
    }

    /// Remembers that a call to the master failed as in an outage (see `outage_since_registered`).
    fn note_failure(&self, failure: Failure) {
        if failure.is_outage() {
            self.outage_since_registered.store(true, Ordering::SeqCst);
        }
    }

    /// The heartbeat to send now. `as_of_seq` is read before the lists, and every status update
    /// is created after the change it reports is in the task table, so the lists are never older
    /// than `as_of_seq` claims.
    fn heartbeat_request(&self) -> HeartbeatRequest {
        let as_of_seq = self.updates.last_seq();
        let TaskLists { known, running } = task_lists(&self.tasks.lock());
        HeartbeatRequest { agent: self.id, known_tasks: known, running_tasks: running, as_of_seq }
    }

    fn register_request(&self) -> RegisterRequest {
        let TaskLists { known, running } = task_lists(&self.tasks.lock());
        RegisterRequest { info: self.info.clone(), known_tasks: known, running_tasks: running }
    }

    /// Running tasks and their disk reservations.
    pub(crate) fn running_tasks(&self) -> Vec<(TaskId, u64)> {
        self.tasks.lock().iter().filter(|(_, l)| !l.ended).map(|(id, l)| (*id, l.disk_limit_bytes)).collect()
    }

    /// Running tasks whose disk limit the agent enforces itself (no project quota holds them),
    /// with their limits.
    pub(crate) fn disk_checked_tasks(&self) -> Vec<(TaskId, u64)> {
        self.tasks
            .lock()
            .iter()
            .filter(|(_, l)| !l.ended && l.disk_limit_bytes > 0 && !l.disk_quota_enforced)
            .map(|(id, l)| (*id, l.disk_limit_bytes))
            .collect()
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
                    let stops = self.track(task, 0);
                    self.watch(task, handle, stops);
                }
                Ok(Attached::NotStarted) => {
                    // The agent stopped while it started the supervisor: nothing ran, so this is
                    // not an end of the task. Start it now, as the launch would have.
                    tracing::warn!(%task, "the agent stopped before the task's supervisor started; starting it now");
                    match self.containerizer.relaunch(&sandbox) {
                        Ok(handle) => {
                            let stops = self.track(task, 0);
                            self.watch(task, handle, stops);
                        }
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
                // Never through a link: a sandbox of the previous layout is the task user's.
                use std::os::unix::fs::OpenOptionsExt;
                let marked = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(sandbox.join(REPORTED_MARKER));
                if let Err(e) = marked {
                    tracing::warn!(task = %u.task, "cannot mark the sandbox as reported: {e}");
                }
            }
            if let Some(l) = self.tasks.lock().get_mut(&u.task) {
                l.reported = true;
            }
        }
    }

    /// Registers (again) with the master, until it answers. A caller that finds another
    /// registration under way waits for it and returns. A re-registration after an outage first
    /// waits a random part of the heartbeat interval (`retry::reregistration_delay`).
    async fn register(&self) {
        let seen = self.registrations.load(Ordering::SeqCst);
        let _one = self.registering.lock().await;
        if self.registrations.load(Ordering::SeqCst) != seen {
            return; // another loop registered meanwhile
        }
        if seen > 0 && self.outage_since_registered.load(Ordering::SeqCst) {
            let delay = retry::reregistration_delay(self.heartbeat_interval(), rand::random());
            tracing::info!("registering with the master again in {delay:?} (spread after an outage)");
            tokio::time::sleep(delay).await;
        }
        let mut backoff = Backoff::default();
        loop {
            match self.client.register(&self.register_request()).await {
                Ok(resp) if !self.accept_epoch(resp.master_epoch) => {
                    let delay = backoff.next(Failure::Outage, rand::random());
                    tracing::warn!("registering again in {delay:?}, with another master");
                    tokio::time::sleep(delay).await;
                }
                Ok(resp) => {
                    *self.epoch.lock() = resp.master_epoch;
                    self.set_heartbeat_interval(resp.heartbeat_interval_ms);
                    let last = resp.last_update_seq;
                    if !self.updates.renumber_if_behind(last) {
                        self.mark_reported(&self.updates.pending_upto(last));
                        self.updates.ack(last);
                    }
                    self.outage_since_registered.store(false, Ordering::SeqCst);
                    self.registrations.fetch_add(1, Ordering::SeqCst);
                    tracing::info!(agent = %self.id, "registered with the master");
                    return;
                }
                Err(e) => {
                    let failure = retry::classify(&e);
                    self.note_failure(failure);
                    let delay = backoff.next(failure, rand::random()).max(retry::retry_after(&e));
                    tracing::warn!("cannot register with the master: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Whether a master's answer with `epoch` may be followed: not when an epoch newer than it
    /// was seen (the answer comes from a deposed leader; the client tries another master next).
    /// A newer epoch is remembered, in the data directory too.
    fn accept_epoch(&self, epoch: u64) -> bool {
        let newest = self.newest_epoch.load(Ordering::SeqCst);
        if epoch < newest {
            tracing::warn!(
                "{} answered with epoch {epoch}, older than epoch {newest} this agent has seen: it no \
                 longer leads; its orders are ignored",
                self.client.current().unwrap_or("the master")
            );
            self.client.prefer_next();
            return false;
        }
        if epoch > newest {
            self.newest_epoch.store(epoch, Ordering::SeqCst);
            if let Err(e) = checkpoint::write_master_epoch(&self.config.data_dir, epoch) {
                tracing::warn!("cannot record master epoch {epoch} in {}: {e}", self.config.data_dir.display());
            }
        }
        true
    }

    async fn follow_orders(self: Arc<Self>) {
        let mut version = 0;
        let mut backoff = Backoff::default();
        loop {
            let epoch = *self.epoch.lock();
            match self.client.orders(self.id, epoch, version, POLL_WAIT).await {
                Ok(orders) if !self.accept_epoch(orders.master_epoch) => {
                    let delay = backoff.next(Failure::Outage, rand::random());
                    tokio::time::sleep(delay).await;
                }
                Ok(orders) => {
                    backoff.reset();
                    self.set_frozen(orders.frozen);
                    if orders.master_epoch != epoch {
                        // A new master run: register again so it learns what runs here.
                        self.register().await;
                    }
                    version = orders.version;
                    self.reconcile(orders.tasks);
                    self.apply_stop_orders(&orders.stop);
                }
                Err(e) => match retry::classify(&e) {
                    Failure::UnknownAgent => self.register().await,
                    failure => {
                        self.note_failure(failure);
                        let delay = backoff.next(failure, rand::random()).max(retry::retry_after(&e));
                        tracing::warn!("cannot get orders: {e}; retrying in {delay:?}");
                        tokio::time::sleep(delay).await;
                    }
                },
            }
        }
    }

    /// Stops the tasks that run here and that the master wants gone (`Orders.stop`), each as
    /// `TaskExit::Killed` with the order's reason; returns how many it asked to stop. An order
    /// naming a task that does not run here (unknown, or already ended) is ignored. Orders come
    /// again with every answer of the long poll; asking a stopping task to stop again does
    /// nothing.
    fn apply_stop_orders(&self, stops: &[StopOrder]) -> usize {
        let tasks = self.tasks.lock();
        let mut asked = 0;
        for order in stops {
            match tasks.get(&order.task) {
                Some(l) if !l.ended => {
                    tracing::info!(task = %order.task, "the master ordered it stopped: {}", order.reason);
                    let _ = l.stop.send(Stop::By(order.reason.clone()));
                    asked += 1;
                }
                _ => tracing::debug!(task = %order.task, "ignoring a stop order: the task does not run here"),
            }
        }
        asked
    }

    /// Follows the cluster's freeze as the latest orders say. When it ends, every task found
    /// unhealthy meanwhile gets a fresh checker (without a grace period: the task had its), so
    /// that the next run of failed checks stops it as usual.
    fn set_frozen(self: &Arc<Self>, frozen: bool) {
        if self.frozen.swap(frozen, Ordering::SeqCst) == frozen {
            return;
        }
        if frozen {
            tracing::warn!("the cluster is frozen: a failed health check no longer stops its task");
            return;
        }
        tracing::info!("the cluster is no longer frozen: failed health checks stop their tasks again");
        // Under the tasks lock after the swap: a checker's `Unhealthy` either saw the freeze and
        // is marked spared here, or sees the unfreeze and stops its task itself.
        let spared: Vec<TaskId> = {
            let mut tasks = self.tasks.lock();
            tasks
                .iter_mut()
                .filter(|(_, l)| l.unhealthy_spared)
                .map(|(id, l)| {
                    l.unhealthy_spared = false;
                    if let Some(checker) = l.checker.take() {
                        checker.abort();
                    }
                    *id
                })
                .collect()
        };
        for task in spared {
            tracing::info!(%task, "checking again the health of a task found unhealthy while the cluster was frozen");
            self.spawn_checker(task, false);
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
                        l.health_check =
                            order.health_check.clone().map(|c| (health::bounded(c), self.check_target(&order)));
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
        // The task's own directory in its sandbox (the rest of the sandbox is root's).
        env.push((
            "CAPSTAN_SANDBOX".into(),
            capstan_containerizer::work_dir(&self.sandbox(task)).display().to_string(),
        ));
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
            sandbox: capstan_containerizer::work_dir(&self.sandbox(order.task)),
            user: order.spec.user.clone(),
            env: self.task_env(order),
            allow_root: self.config.allow_root_tasks,
            cgroup: self.containerizer.task_cgroup(order.task).dirs().into_iter().map(PathBuf::from).collect(),
        }
    }

    /// Starts the task's health checker if it has a check, runs, and has no checker yet. Healthy
    /// and unhealthy become `Report::Health`; unhealthy also stops the task as
    /// `TaskExit::HealthCheckFailed`, unless the cluster is frozen.
    fn start_health_check(self: &Arc<Self>, task: TaskId) {
        self.spawn_checker(task, true);
    }

    /// [`Agent::start_health_check`]; `grace`: false to start checking again without the
    /// check's grace period.
    fn spawn_checker(self: &Arc<Self>, task: TaskId, grace: bool) {
        let mut tasks = self.tasks.lock();
        let Some(l) = tasks.get_mut(&task) else { return };
        if l.ended || !l.started || l.checker.is_some() {
            return;
        }
        let Some((mut spec, target)) = l.health_check.clone() else { return };
        if !grace {
            spec.grace_period = DurationMs(0);
        }
        l.checker_generation += 1;
        let generation = l.checker_generation;
        let (events_tx, mut events) = mpsc::unbounded_channel();
        l.checker = Some(health::spawn(spec, target, events_tx));
        drop(tasks);
        let agent = self.clone();
        tokio::spawn(async move {
            // Ends when the checker is aborted (its sender goes with it).
            while let Some(event) = events.recv().await {
                agent.on_health_event(task, generation, event);
            }
        });
    }

    /// Acts on what the `generation`th checker of `task` found.
    fn on_health_event(&self, task: TaskId, generation: u64, event: HealthEvent) {
        let mut tasks = self.tasks.lock();
        let Some(l) = tasks.get_mut(&task).filter(|l| !l.ended && l.checker_generation == generation) else {
            return; // the task ended, or a newer checker took over
        };
        match event {
            HealthEvent::Healthy { detail } => {
                l.unhealthy_spared = false;
                drop(tasks);
                tracing::info!(%task, "healthy: {detail}");
                self.updates.push(task, Report::Health { healthy: true, reason: detail });
            }
            HealthEvent::Unhealthy { reason } => {
                // Read under the tasks lock: see `set_frozen`.
                let frozen = self.frozen.load(Ordering::SeqCst);
                l.unhealthy_spared = frozen;
                let stop = l.stop.clone();
                drop(tasks);
                self.updates.push(task, Report::Health { healthy: false, reason: reason.clone() });
                if frozen {
                    tracing::warn!(
                        %task,
                        "unhealthy, but the cluster is frozen, so it keeps running: {reason}; once unfrozen, \
                         a new run of failed checks stops it"
                    );
                } else {
                    tracing::warn!(%task, "unhealthy, stopping it: {reason}");
                    let _ = stop.send(Stop::Because(TaskExit::HealthCheckFailed { reason }));
                }
            }
        }
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
            sandbox_gid: None, // chosen by the containerizer
        };
        // In the task table before its first update: a heartbeat whose `as_of_seq` covers the
        // update lists the task.
        let stops = self.track(task, order.spec.disk.0);
        self.updates.push(task, Report::Starting);
        let launched = self.limit_disk(task, &sandbox, order.spec.disk.0).and_then(|quota| {
            if quota {
                if let Some(l) = self.tasks.lock().get_mut(&task) {
                    l.disk_quota_enforced = true;
                }
            }
            self.containerizer.launch(&sandbox, &spec).map_err(|e| e.to_string())
        });
        match launched {
            Ok(handle) => {
                self.watch(task, handle, stops);
                if let Some(check) = order.health_check.clone().map(health::bounded) {
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

    /// Before the containerizer lays out the sandbox: with `loop-volume`, makes the task's volume
    /// of `disk_bytes` and mounts it on the sandbox's work directory (an error fails the launch:
    /// no silent fallback); where the file system has project quotas, creates the sandbox
    /// directory (so that everything below it counts) and holds it to `disk_bytes`. True when a
    /// project quota holds it; false (said in the log) when the check-and-kill must do so.
    fn limit_disk(&self, task: TaskId, sandbox: &std::path::Path, disk_bytes: u64) -> Result<bool, String> {
        if disk_bytes == 0 {
            return Ok(false);
        }
        if self.volume_per_task {
            let work = capstan_containerizer::sandbox::work_dir(sandbox);
            self.volumes.create(&task.to_string(), &work, disk_bytes).map_err(|e| {
                format!(
                    "cannot make the task's disk volume of {disk_bytes} bytes (--disk-enforcement=loop-volume): {e}"
                )
            })?;
            tracing::debug!(%task, "work directory on a volume of {disk_bytes} bytes");
            return Ok(false);
        }
        let Some(quotas) = &self.quotas else { return Ok(false) };
        let limited = std::fs::create_dir_all(sandbox)
            .map_err(|e| format!("creating {}: {e}", sandbox.display()))
            .and_then(|()| quotas.limit(sandbox, task.0, disk_bytes));
        match limited {
            Ok(project) => {
                tracing::debug!(%task, project, "sandbox held to {disk_bytes} bytes by its project quota");
                Ok(true)
            }
            Err(e) => {
                tracing::warn!(%task, "no project quota for the sandbox, check-and-kill instead: {e}");
                Ok(false)
            }
        }
    }

    /// Unmounts and deletes the volume of `task` (if it has one), before its sandbox goes.
    pub(crate) fn remove_volume(&self, task: TaskId) {
        let work = capstan_containerizer::sandbox::work_dir(&self.sandbox(task));
        if let Err(e) = self.volumes.remove(&task.to_string(), &work) {
            tracing::warn!(%task, "cannot remove the task's disk volume: {e}");
        }
    }

    /// At start: unmounts the volumes and deletes the images of tasks that no longer have a
    /// sandbox here (collected, or moved aside by `--recover=cleanup`), and mounts again the
    /// volume of a sandbox whose mount is gone (after a reboot). Mounted volumes of existing
    /// sandboxes are left as they are.
    fn sweep_volumes(&self) {
        let kept: HashSet<String> =
            checkpoint::task_sandboxes(&self.sandboxes).into_iter().map(|(task, _)| task.to_string()).collect();
        let removed = self.volumes.sweep(
            &self.config.data_dir,
            |mount| {
                mount
                    .parent()
                    .and_then(|s| Some((s.parent()? == self.sandboxes, s.file_name()?.to_str()?)))
                    .is_some_and(|(here, name)| here && kept.contains(name))
            },
            |name| kept.contains(name),
        );
        if !removed.is_empty() {
            tracing::info!("removed disk volumes of tasks no longer here: {}", removed.join(", "));
        }
        for name in self.volumes.names() {
            let work = capstan_containerizer::sandbox::work_dir(&self.sandboxes.join(&name));
            match self.volumes.remount(&name, &work) {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("cannot mount the disk volume of task {name} again on {}: {e}", work.display())
                }
            }
        }
    }

    /// Enters a task that runs (or is being started) in the task table; returns where its stop
    /// requests arrive, for [`Agent::watch`].
    fn track(&self, task: TaskId, disk_limit_bytes: u64) -> mpsc::UnboundedReceiver<Stop> {
        let (stop_tx, stop_rx) = mpsc::unbounded_channel::<Stop>();
        self.tasks.lock().insert(task, Local::running(stop_tx, disk_limit_bytes));
        stop_rx
    }

    /// Watches one task (entered by [`Agent::track`]) until it ends, reporting what it sees and
    /// passing on stop requests.
    fn watch(
        self: &Arc<Self>,
        task: TaskId,
        mut handle: capstan_containerizer::TaskHandle,
        mut stop_rx: mpsc::UnboundedReceiver<Stop>,
    ) {
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
        let mut backoff = Backoff::default();
        loop {
            let notified = self.updates.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let queue = self.updates.clone();
            let batch = match tokio::task::spawn_blocking(move || queue.batch()).await {
                Ok(Ok(batch)) => batch,
                Ok(Err(e)) => {
                    let delay = backoff.next(Failure::Other, rand::random());
                    tracing::error!(
                        "cannot write the status update log: {e}; nothing is sent before it is durable; \
                         retrying in {delay:?}"
                    );
                    tokio::time::sleep(delay).await;
                    continue;
                }
                Err(e) => {
                    let delay = backoff.next(Failure::Other, rand::random());
                    tracing::error!("writing the status update log failed: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
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
                        backoff.reset();
                    } else {
                        let delay = backoff.next(Failure::Other, rand::random());
                        tracing::warn!(
                            "the master acknowledged status updates up to {} of {last}; retrying in {delay:?}",
                            resp.acked_seq
                        );
                        tokio::time::sleep(delay).await;
                    }
                }
                Err(e) => match retry::classify(&e) {
                    Failure::UnknownAgent => self.register().await,
                    failure => {
                        self.note_failure(failure);
                        let delay = backoff.next(failure, rand::random()).max(retry::retry_after(&e));
                        tracing::warn!("cannot send status updates: {e}; retrying in {delay:?}");
                        tokio::time::sleep(delay).await;
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_containerizer::ContainerizerConfig;
    use capstan_model::spec::HealthCheckType;
    use std::path::Path;

    /// An agent whose master does not exist and whose update queue is in memory, to drive its
    /// pieces directly (no loop runs). `None`, said loudly, where cgroups cannot be found.
    fn agent(dir: &Path) -> Option<Arc<Agent>> {
        let containerizer = match Containerizer::new(ContainerizerConfig::default()) {
            Ok(c) => c,
            Err(e) => {
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    format!("\n!!!!! SKIPPED: no containerizer here ({e}) !!!!!\n").as_bytes(),
                );
                assert_ne!(std::env::var("CAPSTAN_REQUIRE_PRIVILEGED_TESTS").as_deref(), Ok("1"), "{e}");
                return None;
            }
        };
        let info = AgentInfo {
            id: AgentId(7),
            hostname: "test".into(),
            address: "http://127.0.0.1:1".into(),
            capacity: Capacity::default(),
            attributes: BTreeMap::new(),
            version: "test".into(),
        };
        let config = AgentConfig::new("http://127.0.0.1:1", dir);
        Some(Arc::new(Agent::new(config, info, containerizer, dir.join("sandboxes"), UpdateQueue::default())))
    }

    fn reports(agent: &Agent) -> Vec<(TaskId, Report)> {
        agent.updates.batch().unwrap().into_iter().map(|u| (u.task, u.report)).collect()
    }

    #[test]
    fn answers_of_a_master_with_an_older_epoch_are_refused_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let Some(agent) = agent(dir.path()) else { return };
        assert!(agent.accept_epoch(1_000), "the first epoch seen is followed");
        assert!(agent.accept_epoch(1_000), "the same master again");
        assert!(agent.accept_epoch(2_000), "a newer leader");
        assert!(!agent.accept_epoch(1_000), "the deposed leader is ignored");
        assert_eq!(checkpoint::read_master_epoch(dir.path()), 2_000);
        drop(agent);
        // A restarted agent still knows the newest epoch it saw.
        let Some(again) = self::agent(dir.path()) else { return };
        assert!(!again.accept_epoch(1_999));
        assert!(again.accept_epoch(2_000));
    }

    #[test]
    fn task_lists_name_every_task_and_the_running_ones_sorted() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut tasks = HashMap::new();
        tasks.insert(TaskId(30), Local::running(tx.clone(), 0));
        tasks.insert(TaskId(10), Local::ended(1_000, false)); // ended, end not yet acknowledged
        tasks.insert(TaskId(20), Local::running(tx, 0));
        tasks.insert(TaskId(5), Local::ended(2_000, true)); // ended and acknowledged, not collected
        assert_eq!(
            task_lists(&tasks),
            TaskLists {
                known: vec![TaskId(5), TaskId(10), TaskId(20), TaskId(30)],
                running: vec![TaskId(20), TaskId(30)]
            }
        );
        assert_eq!(task_lists(&HashMap::new()), TaskLists::default());
    }

    #[test]
    fn registration_and_heartbeats_carry_known_and_running_tasks_as_of_the_newest_update() {
        let dir = tempfile::tempdir().unwrap();
        let Some(agent) = agent(dir.path()) else { return };
        let empty = agent.heartbeat_request();
        assert_eq!((empty.as_of_seq, empty.known_tasks.len(), empty.running_tasks.len()), (0, 0, 0));

        // As `launch` does: in the table first, then its first update.
        let _stops = agent.track(TaskId(2), 0);
        agent.updates.push(TaskId(2), Report::Starting);
        agent.tasks.lock().insert(TaskId(1), Local::ended(1_000, false));
        agent.updates.push(TaskId(1), Report::Exited { exit: TaskExit::Killed { by: "test".into() } });

        let heartbeat = agent.heartbeat_request();
        assert_eq!(heartbeat.agent, AgentId(7));
        assert_eq!(heartbeat.as_of_seq, 2);
        assert_eq!(heartbeat.as_of_seq, agent.updates.last_seq());
        assert_eq!(heartbeat.known_tasks, [TaskId(1), TaskId(2)]);
        assert_eq!(heartbeat.running_tasks, [TaskId(2)]);
        let register = agent.register_request();
        assert_eq!(register.known_tasks, [TaskId(1), TaskId(2)]);
        assert_eq!(register.running_tasks, [TaskId(2)]);
        assert_eq!(register.info.id, AgentId(7));
    }

    #[test]
    fn the_heartbeat_interval_is_what_the_master_said_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let Some(agent) = agent(dir.path()) else { return };
        assert_eq!(agent.heartbeat_interval(), retry::HEARTBEAT_DEFAULT);
        agent.set_heartbeat_interval(250);
        assert_eq!(agent.heartbeat_interval(), Duration::from_millis(250));
        agent.set_heartbeat_interval(0);
        assert_eq!(agent.heartbeat_interval(), retry::HEARTBEAT_MIN);
    }

    #[test]
    fn stop_orders_stop_running_tasks_with_their_reason_and_ignore_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let Some(agent) = agent(dir.path()) else { return };
        let mut running = agent.track(TaskId(1), 0);
        let mut other = agent.track(TaskId(4), 0);
        agent.tasks.lock().insert(TaskId(2), Local::ended(1_000, false));
        let order = |task: u64, reason: &str| StopOrder { task: TaskId(task), reason: reason.into() };
        let asked = agent.apply_stop_orders(&[
            order(1, "stray task: unknown to the master for 5m"),
            order(2, "already ended"),
            order(3, "never ran here"),
        ]);
        assert_eq!(asked, 1);
        match running.try_recv() {
            Ok(Stop::By(by)) => assert_eq!(by, "stray task: unknown to the master for 5m"),
            other => panic!("expected Stop::By, got {other:?}"),
        }
        assert!(other.try_recv().is_err(), "a task no order names is left alone");
        assert!(reports(&agent).is_empty(), "the watcher reports the end, not the order");
        // Orders come again with every answer of the long poll: asked again, nothing breaks.
        assert_eq!(agent.apply_stop_orders(&[order(1, "again")]), 1);
        assert_eq!(agent.apply_stop_orders(&[]), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_check_while_frozen_spares_the_task_until_a_new_run_of_failures_after_the_unfreeze() {
        let dir = tempfile::tempdir().unwrap();
        let Some(agent) = agent(dir.path()) else { return };
        let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let check = HealthCheckSpec {
            check_type: HealthCheckType::Tcp,
            port: Some("main".into()),
            path: None,
            command: None,
            interval: DurationMs(200),
            timeout: DurationMs(200),
            // Long: no failure counts before the unfreeze starts the checker again without it.
            grace_period: DurationMs(60_000),
            consecutive_failures: 2,
        };
        let target = CheckTarget {
            host: std::net::Ipv4Addr::LOCALHOST.into(),
            ports: BTreeMap::from([("main".to_string(), closed_port)]),
            sandbox: dir.path().into(),
            user: "nobody".into(),
            env: vec![],
            allow_root: false,
            cgroup: vec![],
        };
        let task = TaskId(9);
        let mut stops = agent.track(task, 0);
        {
            let mut tasks = agent.tasks.lock();
            let l = tasks.get_mut(&task).unwrap();
            l.started = true;
            l.health_check = Some((check, target));
        }
        agent.start_health_check(task);
        assert_eq!(agent.tasks.lock()[&task].checker_generation, 1);

        agent.set_frozen(true);
        assert!(agent.is_frozen());
        // What the checker sends after a run of failures; here without waiting for one.
        agent.on_health_event(task, 1, HealthEvent::Unhealthy { reason: "tcp connect failed".into() });
        assert!(stops.try_recv().is_err(), "frozen: a failed health check does not stop the task");
        assert!(agent.tasks.lock()[&task].unhealthy_spared);
        assert!(matches!(
            reports(&agent).as_slice(),
            [(t, Report::Health { healthy: false, reason })] if *t == task && reason == "tcp connect failed"
        ));
        agent.set_frozen(true); // the same orders again change nothing
        assert_eq!(agent.tasks.lock()[&task].checker_generation, 1);

        agent.set_frozen(false);
        assert!(!agent.is_frozen());
        assert_eq!(agent.tasks.lock()[&task].checker_generation, 2, "a fresh checker");
        assert!(!agent.tasks.lock()[&task].unhealthy_spared);
        // The old checker's streak no longer counts...
        agent.on_health_event(task, 1, HealthEvent::Unhealthy { reason: "stale".into() });
        assert!(stops.try_recv().is_err(), "an event of the replaced checker stops nothing");
        // ...a new run of failures (two checks 200 ms apart, no grace period) does.
        let stop = tokio::time::timeout(Duration::from_secs(5), stops.recv()).await.expect("stopped").unwrap();
        match stop {
            Stop::Because(TaskExit::HealthCheckFailed { reason }) => {
                assert!(reason.contains(&format!("127.0.0.1:{closed_port}")), "{reason}");
                assert!(reason.contains("(2 checks in a row)"), "{reason}");
            }
            other => panic!("expected a health-check stop, got {other:?}"),
        }
        let checker = agent.tasks.lock().get_mut(&task).and_then(|l| l.checker.take());
        if let Some(c) = checker {
            c.abort();
        }
    }

    #[test]
    fn a_healthy_check_clears_a_spared_task() {
        let dir = tempfile::tempdir().unwrap();
        let Some(agent) = agent(dir.path()) else { return };
        let task = TaskId(3);
        let mut stops = agent.track(task, 0);
        agent.tasks.lock().get_mut(&task).unwrap().checker_generation = 1;
        agent.frozen.store(true, Ordering::SeqCst);
        agent.on_health_event(task, 1, HealthEvent::Unhealthy { reason: "down".into() });
        assert!(agent.tasks.lock()[&task].unhealthy_spared);
        agent.on_health_event(task, 1, HealthEvent::Healthy { detail: "up".into() });
        assert!(!agent.tasks.lock()[&task].unhealthy_spared, "healthy again: nothing to check again");
        // Not frozen: unhealthy stops the task at once.
        agent.frozen.store(false, Ordering::SeqCst);
        agent.on_health_event(task, 1, HealthEvent::Unhealthy { reason: "down again".into() });
        assert!(matches!(stops.try_recv(), Ok(Stop::Because(TaskExit::HealthCheckFailed { .. }))));
    }
}
