//! The Capstan agent: registers with the master, follows its orders (what must run here), runs
//! tasks through the containerizer, reports what happens to them, and serves their logs.
//!
//! Loops, each a tokio task: `orders` (long-polls the master and reconciles what runs here with
//! what must), `send_updates` (status updates in batches, retried until acknowledged), and one
//! watcher per task (waits for its supervisor and turns what it sees into updates).

pub mod http;
pub mod resources;
pub mod updates;

use anyhow::Context as _;
use capstan_api::{ApiError, Client, Order, RegisterRequest};
use capstan_containerizer::{Attached, Containerizer, ContainerizerConfig, LaunchSpec};
use capstan_model::{AgentId, Capacity, Desired, TaskExit, TaskId};
use capstan_state::{AgentInfo, Report};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
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
}

/// Kept in the data directory: who this agent is, across restarts.
#[derive(Serialize, Deserialize)]
struct Identity {
    id: AgentId,
}

/// What the agent knows of one task it runs or ran.
struct Local {
    kill: mpsc::UnboundedSender<String>,
    ended: bool,
}

pub struct Agent {
    pub id: AgentId,
    pub info: AgentInfo,
    client: Client,
    containerizer: Containerizer,
    sandboxes: PathBuf,
    tasks: Mutex<HashMap<TaskId, Local>>,
    pub updates: UpdateQueue,
    epoch: Mutex<u64>,
}

pub struct AgentHandle {
    pub agent: Arc<Agent>,
    pub addr: SocketAddr,
}

const POLL_WAIT: Duration = Duration::from_secs(30);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

fn load_identity(data_dir: &Path) -> anyhow::Result<AgentId> {
    let path = data_dir.join("agent.json");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let id: Identity = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is unreadable; move it away to start as a new agent", path.display()))?;
            Ok(id.id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = AgentId(rand::random());
            let tmp = data_dir.join("agent.json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(&Identity { id })?)?;
            std::fs::rename(&tmp, &path)?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Jittered exponential backoff: the next delay after `d`.
fn backoff(d: Duration) -> Duration {
    let next = (d * 2).min(RETRY_MAX);
    let jitter = rand::random::<f64>() * 0.5 + 0.75;
    next.mul_f64(jitter).max(RETRY_MIN)
}

pub async fn start(config: AgentConfig) -> anyhow::Result<AgentHandle> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create the data directory {}", config.data_dir.display()))?;
    let id = load_identity(&config.data_dir)?;
    let sandboxes = config.data_dir.join("sandboxes");
    std::fs::create_dir_all(&sandboxes)?;
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
        updates: UpdateQueue::default(),
        epoch: Mutex::new(0),
    });
    agent.recover();
    let router = http::router(agent.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("agent HTTP server stopped: {e}");
        }
    });
    agent.register().await;
    tokio::spawn(agent.clone().follow_orders());
    tokio::spawn(agent.clone().send_updates());
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

    /// Finds the tasks that were running before this agent (re)started and watches them again.
    fn recover(self: &Arc<Self>) {
        let Ok(dir) = std::fs::read_dir(&self.sandboxes) else { return };
        for entry in dir.flatten() {
            let Some(task) = entry.file_name().to_str().and_then(|n| n.parse::<TaskId>().ok()) else { continue };
            let sandbox = entry.path();
            if sandbox.join("reported").exists() {
                // Over, and the master has its end: remember it so it is never launched again.
                let (kill, _) = mpsc::unbounded_channel();
                self.tasks.lock().insert(task, Local { kill, ended: true });
                continue;
            }
            match self.containerizer.attach(&sandbox) {
                Ok(Attached::Running(handle)) => {
                    tracing::info!(%task, "re-attached to a running task");
                    self.watch(task, handle);
                }
                Ok(Attached::Exited(record)) => {
                    tracing::info!(%task, "task ended while the agent was away: {}", record.exit);
                    let (kill, _) = mpsc::unbounded_channel();
                    self.tasks.lock().insert(task, Local { kill, ended: true });
                    self.updates.push(task, Report::Exited { exit: record.exit });
                }
                Err(e) => tracing::warn!(%task, "cannot re-attach to {}: {e}", sandbox.display()),
            }
        }
    }

    /// Registers (again) with the master, until it answers.
    async fn register(&self) {
        let mut delay = RETRY_MIN;
        loop {
            let known: Vec<TaskId> = self.tasks.lock().keys().copied().collect();
            match self.client.register(&RegisterRequest { info: self.info.clone(), known_tasks: known }).await {
                Ok(resp) => {
                    *self.epoch.lock() = resp.master_epoch;
                    self.updates.continue_after(resp.last_update_seq);
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
            let known = self.tasks.lock().get(&order.task).map(|l| (l.ended, l.kill.clone()));
            match (order.desired, known) {
                (Desired::Run, None) => self.launch(order),
                (Desired::Stop, Some((false, kill))) => {
                    let _ = kill.send("killed on the master's order".into());
                }
                (Desired::Stop, None) => {
                    let (kill, _) = mpsc::unbounded_channel();
                    self.tasks.lock().insert(order.task, Local { kill, ended: true });
                    self.updates.push(
                        order.task,
                        Report::Exited { exit: TaskExit::Killed { by: "stopped before it started".into() } },
                    );
                }
                (Desired::Run, Some(_)) | (Desired::Stop, Some((true, _))) => {}
            }
        }
    }

    fn launch(self: &Arc<Self>, order: Order) {
        let task = order.task;
        let sandbox = self.sandbox(task);
        let mut env: Vec<(String, String)> = order.spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.push(("CAPSTAN_TASK_ID".into(), task.to_string()));
        env.push(("CAPSTAN_JOB".into(), order.job.to_string()));
        env.push(("CAPSTAN_INSTANCE".into(), order.instance.to_string()));
        env.push(("CAPSTAN_SANDBOX".into(), sandbox.display().to_string()));
        for (name, port) in &order.ports {
            env.push((capstan_model::TaskSpec::port_env_name(name), port.to_string()));
        }
        let spec = LaunchSpec {
            task_id: task,
            command: order.spec.command.clone(),
            user: order.spec.user.clone(),
            env,
            cpus_milli: order.spec.cpus_milli,
            mem_bytes: order.spec.mem.0,
            pids_max: None,
            kill_grace_ms: order.spec.kill_grace.0,
        };
        self.updates.push(task, Report::Starting);
        match self.containerizer.launch(&sandbox, &spec) {
            Ok(handle) => self.watch(task, handle),
            Err(e) => {
                tracing::warn!(%task, "launch failed: {e}");
                let (kill, _) = mpsc::unbounded_channel();
                self.tasks.lock().insert(task, Local { kill, ended: true });
                self.updates.push(task, Report::Exited { exit: TaskExit::LaunchFailed { message: e.to_string() } });
            }
        }
    }

    /// Watches one task until it ends, reporting what it sees and passing on kill requests.
    fn watch(self: &Arc<Self>, task: TaskId, mut handle: capstan_containerizer::TaskHandle) {
        let (kill_tx, mut kill_rx) = mpsc::unbounded_channel::<String>();
        self.tasks.lock().insert(task, Local { kill: kill_tx, ended: false });
        let agent = self.clone();
        tokio::spawn(async move {
            let mut killed = false;
            let record = loop {
                tokio::select! {
                    started = handle.started() => match started {
                        Ok(pid) => {
                            agent.updates.push(task, Report::Running { pid });
                            break None;
                        }
                        Err(record) => break Some(record),
                    },
                    Some(by) = kill_rx.recv(), if !killed => {
                        killed = true;
                        if let Err(e) = handle.kill_by(&by) {
                            tracing::warn!(%task, "cannot signal the supervisor: {e}");
                        }
                    }
                }
            };
            let record = match record {
                Some(r) => r,
                None => loop {
                    tokio::select! {
                        r = handle.wait() => break r,
                        Some(by) = kill_rx.recv(), if !killed => {
                            killed = true;
                            if let Err(e) = handle.kill_by(&by) {
                                tracing::warn!(%task, "cannot signal the supervisor: {e}");
                            }
                        }
                    }
                },
            };
            if let Some(l) = agent.tasks.lock().get_mut(&task) {
                l.ended = true;
            }
            agent.updates.push(task, Report::Exited { exit: record.exit });
        });
    }

    /// Sends queued status updates in batches until each is acknowledged.
    async fn send_updates(self: Arc<Self>) {
        let mut delay = RETRY_MIN;
        loop {
            let notified = self.updates.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let batch = self.updates.batch();
            if batch.is_empty() {
                notified.await;
                continue;
            }
            let req = capstan_api::UpdatesRequest { agent: self.id, updates: batch };
            match self.client.send_updates(&req).await {
                Ok(resp) => {
                    delay = RETRY_MIN;
                    for u in self.updates.ack(resp.acked_seq) {
                        if matches!(u.report, Report::Exited { .. }) {
                            // The master has the end of this task: recovery need not report it again.
                            let _ = std::fs::write(self.sandbox(u.task).join("reported"), b"");
                        }
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
