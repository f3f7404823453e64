//! Harness of the agent's integration tests: a real master (`capstan_master::start`) and a real
//! agent (`capstan_agent::start`) in this test process, on a temporary data directory, with their
//! own port block and their own cgroup root; tasks run under real supervisors
//! (`capstan-agent-test-supervisor`) in real cgroups. Dropping a [`Cluster`] kills every
//! supervisor and task process it started and removes its cgroups.
//!
//! Tasks run as real processes under real cgroups, so these tests need root. Without it they say
//! loudly that they skip — unless `CAPSTAN_REQUIRE_PRIVILEGED_TESTS=1` (CI), where they fail.
#![allow(dead_code)] // each test file uses a different subset

use capstan_agent::{AgentConfig, AgentHandle};
use capstan_api::{Client, TaskView};
use capstan_master::liveness::LivenessConfig;
use capstan_model::TaskId;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const POLL: Duration = Duration::from_millis(50);
pub const SOON: Duration = Duration::from_secs(20);
pub const SUPERVISOR: &str = env!("CARGO_BIN_EXE_capstan-agent-test-supervisor");

/// True when this test may run (root and cgroups). Otherwise it says loudly why it skips — or,
/// with `CAPSTAN_REQUIRE_PRIVILEGED_TESTS=1` (CI), fails.
pub fn privileged(test: &str) -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        "it must run as root (tasks run as other users, in real cgroups)"
    } else if !Path::new("/sys/fs/cgroup").is_dir() {
        "/sys/fs/cgroup is not mounted"
    } else {
        return true;
    };
    if std::env::var("CAPSTAN_REQUIRE_PRIVILEGED_TESTS").as_deref() == Ok("1") {
        panic!("{test}: {why}, and CAPSTAN_REQUIRE_PRIVILEGED_TESTS=1 forbids skipping");
    }
    let _ =
        std::io::Write::write_all(&mut std::io::stderr(), format!("\n!!!!! SKIPPED {test}: {why} !!!!!\n").as_bytes());
    false
}

/// Polls `check` until it returns `Ok`; panics with the last observation after `timeout`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(observed) => observed,
        };
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting until {what}; last observed: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A block of 100 ports in 40000-49999, different for each cluster of this test process and
/// randomly placed against other test processes.
fn port_block() -> (u16, u16) {
    static BASE: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = *BASE.get_or_init(|| rand::random::<u32>() % 100);
    let block = (base + NEXT.fetch_add(1, Ordering::Relaxed)) % 100;
    let lo = 40000 + block * 100;
    (lo as u16, (lo + 99) as u16)
}

pub struct Cluster {
    dir: tempfile::TempDir,
    pub agent_dir: PathBuf,
    pub cgroup_root: String,
    pub ports: (u16, u16),
    pub master: capstan_master::MasterHandle,
    pub agent: Option<AgentHandle>,
    pub client: Client,
}

/// A real master on `127.0.0.1` with its state in `data_dir`. The caller aborts its server and
/// scheduler when done (a [`Cluster`] does so for its own master).
pub async fn start_master(data_dir: PathBuf, liveness: LivenessConfig) -> capstan_master::MasterHandle {
    liveness.check().expect("valid liveness settings");
    capstan_master::start(capstan_master::MasterConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        data_dir,
        store_url: None,
        allow_root_tasks: false,
        liveness,
        ha: Default::default(),
        backup: Default::default(),
        jobs: Default::default(),
        net: Default::default(),
    })
    .await
    .expect("master starts")
}

impl Cluster {
    /// A master and an agent (usage every 200 ms; `tune` adjusts the agent's settings).
    pub async fn start(tune: impl FnOnce(&mut AgentConfig)) -> Cluster {
        Cluster::start_with(LivenessConfig::default(), tune).await
    }

    /// [`Cluster::start`] with the master's liveness settings (heartbeat interval, timeouts).
    pub async fn start_with(liveness: LivenessConfig, tune: impl FnOnce(&mut AgentConfig)) -> Cluster {
        let dir = tempfile::Builder::new().prefix("capstan-agent-test-").tempdir().expect("temporary directory");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let master = start_master(dir.path().join("master"), liveness).await;
        let client = Client::new(&master.url());
        let mut c = Cluster {
            agent_dir: dir.path().join("agent"),
            dir,
            cgroup_root: format!("capstan-agent-test-{:016x}", rand::random::<u64>()),
            ports: port_block(),
            master,
            agent: None,
            client,
        };
        c.start_agent(tune).await.expect("agent starts");
        c
    }

    pub fn agent_config(&self) -> AgentConfig {
        AgentConfig {
            resources: Some(format!("ports={}-{}", self.ports.0, self.ports.1)),
            cgroup_root: self.cgroup_root.clone(),
            supervisor_cmd: Some(vec![SUPERVISOR.into()]),
            usage_interval: Duration::from_millis(200),
            disk_check_interval: Duration::from_millis(200),
            ..AgentConfig::new(self.master.url(), &self.agent_dir)
        }
    }

    /// Starts an agent on the cluster's data directory (after [`Cluster::stop_agent`]).
    pub async fn start_agent(&mut self, tune: impl FnOnce(&mut AgentConfig)) -> anyhow::Result<()> {
        assert!(self.agent.is_none(), "an agent already runs");
        let mut config = self.agent_config();
        tune(&mut config);
        self.agent = Some(capstan_agent::start(config).await?);
        Ok(())
    }

    /// Stops the agent's loops and watchers, as a restart of its process would (tasks go on).
    pub fn stop_agent(&mut self) {
        if let Some(a) = self.agent.take() {
            a.stop();
        }
    }

    /// The cluster's temporary directory (the master's and the agent's data directories are in it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn sandboxes(&self) -> PathBuf {
        self.agent_dir.join("sandboxes")
    }

    pub fn sandbox(&self, task: TaskId) -> PathBuf {
        self.sandboxes().join(task.to_string())
    }

    pub async fn create_job(&self, spec: serde_json::Value) -> Vec<TaskId> {
        self.client.create_job(&spec).await.unwrap_or_else(|e| panic!("creating {spec}: {e}")).tasks
    }

    /// Waits until `check` accepts the task's view.
    pub async fn wait_task(
        &self,
        task: TaskId,
        what: &str,
        timeout: Duration,
        check: impl Fn(&TaskView) -> bool,
    ) -> TaskView {
        wait_until(timeout, &format!("task {task}: {what}"), || async {
            match self.client.task(task).await {
                Ok(t) if check(&t) => Ok(t),
                Ok(t) => Err(format!("{:?} ({}) usage {:?}", t.state, t.reason, t.usage)),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }

    pub async fn wait_state(&self, task: TaskId, state: &str, timeout: Duration) -> TaskView {
        let want = state.to_string();
        self.wait_task(task, &format!("is {state}"), timeout, move |t| {
            serde_json::to_value(t.state).ok().and_then(|v| v.as_str().map(str::to_string)).as_deref()
                == Some(want.as_str())
        })
        .await
    }

    /// Every cgroup directory of this cluster's root, children before parents.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let mut roots = vec![];
        let base = Path::new("/sys/fs/cgroup");
        for candidate in std::iter::once(base.to_path_buf())
            .chain(std::fs::read_dir(base).into_iter().flatten().flatten().map(|e| e.path()))
        {
            let d = candidate.join(&self.cgroup_root);
            if d.is_dir() && !roots.contains(&d) {
                roots.push(d);
            }
        }
        let mut all = vec![];
        for root in roots {
            let mut tree = vec![root];
            let mut i = 0;
            while i < tree.len() {
                for e in std::fs::read_dir(&tree[i]).into_iter().flatten().flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        tree.push(e.path());
                    }
                }
                i += 1;
            }
            all.extend(tree.into_iter().rev());
        }
        all
    }

    /// Live processes of this cluster: supervisors and tasks recorded in any sandbox (also those
    /// moved aside by cleanup), members of its cgroups, and processes naming its directory.
    pub fn processes(&self) -> Vec<u32> {
        let mut pids = vec![];
        let mut sandbox_dirs = vec![self.sandboxes()];
        for e in std::fs::read_dir(&self.agent_dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("sandboxes.cleanup-") {
                sandbox_dirs.push(e.path().join("sandboxes"));
            }
        }
        for dir in sandbox_dirs {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                for f in ["supervisor.json", "task.json"] {
                    let id = std::fs::read(e.path().join(f))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<capstan_containerizer::ProcessIdentity>(&b).ok());
                    if let Some(id) = id.filter(|p| p.is_alive()) {
                        pids.push(id.pid);
                    }
                }
            }
        }
        for d in self.cgroup_dirs() {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        let needle = self.dir.path().as_os_str().as_encoded_bytes().to_vec();
        let me = std::process::id();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if pid != me
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle.as_slice()))
            {
                pids.push(pid);
            }
        }
        pids.retain(|p| pid_alive(*p));
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    fn cleanup(&mut self) {
        self.stop_agent();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.processes();
            if pids.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("processes {pids:?} of this cluster would not die");
                break;
            }
            for p in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), nix::sys::signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for dir in self.cgroup_dirs() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Err(e) = std::fs::remove_dir(&dir) {
                if e.kind() == std::io::ErrorKind::NotFound || Instant::now() > deadline {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        eprintln!("cannot remove cgroup {}: {e}", dir.display());
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.cleanup();
        self.master.stop();
    }
}

/// True while `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = text.rfind(')').and_then(|i| text[i + 1..].split_whitespace().next().map(str::to_string));
    !matches!(state.as_deref(), Some("Z" | "X") | None)
}

/// A job with small resources; adjust the returned JSON as needed.
pub fn job_spec(key: &str, job_type: &str, command: &str) -> serde_json::Value {
    serde_json::json!({
        "job": key,
        "type": job_type,
        "instances": 1,
        "task": {
            "command": command,
            "user": "nobody",
            "cpus": 0.2,
            "mem": "64MiB",
            "disk": "64MiB",
            "kill_grace": "1s",
        }
    })
}
