//! Harness of the end-to-end tests: a real one-host cluster on a temporary data directory, its own
//! port range and its own cgroup root, with helpers over the HTTP API, the CLI and `/proc`. Either
//! one `capstan dev` process (master + agent, [`Cluster::start`]) or a `capstan master` and a
//! `capstan agent` as two processes that can be killed and started on their own
//! ([`Cluster::start_split`]). Dropping a [`Cluster`] leaves nothing behind: its daemons, every
//! supervisor and task process of this cluster, and its cgroups are gone afterwards.
//!
//! Tasks run as real processes under real cgroups, so these tests need root. Without it they say
//! loudly that they skip — unless `CAPSTAN_REQUIRE_PRIVILEGED_TESTS=1` (CI), where they fail.
//! Set `CAPSTAN_KEEP_TEST_DATA=1` to keep the data directory of a failed test for inspection.
#![allow(dead_code)] // each test file uses a different subset

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Debug;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(50);
/// Generous bound for things that normally take well under a second.
pub const SOON: Duration = Duration::from_secs(15);

/// The `capstan` binary under test: the CLI crate's own, or the hostile-input suite's copy of the
/// same program (`crates/hostile`, which includes this harness).
pub const CAPSTAN: &str = match (option_env!("CARGO_BIN_EXE_capstan"), option_env!("CARGO_BIN_EXE_capstan-under-test"))
{
    (Some(path), _) | (None, Some(path)) => path,
    (None, None) => panic!("the test harness needs a capstan binary of the package under test"),
};

// ---------------------------------------------------------------------------------------------
// Privilege check

/// True when this test may run (root, cgroups, python3 for the tasks). Otherwise it says loudly
/// why it skips — or, with `CAPSTAN_REQUIRE_PRIVILEGED_TESTS=1` (CI), fails.
pub fn privileged(test: &str) -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("it must run as root (tasks run as other users, in real cgroups)".to_string())
    } else if !Path::new("/sys/fs/cgroup").is_dir() {
        Some("/sys/fs/cgroup is not mounted".to_string())
    } else if !["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"].iter().any(|p| Path::new(p).exists()) {
        Some("the tasks need python3 in the default PATH (/usr/local/bin, /usr/bin or /bin)".to_string())
    } else {
        None
    };
    let Some(why) = why else { return true };
    if std::env::var("CAPSTAN_REQUIRE_PRIVILEGED_TESTS").as_deref() == Ok("1") {
        panic!("{test}: {why}, and CAPSTAN_REQUIRE_PRIVILEGED_TESTS=1 forbids skipping");
    }
    eprintln!("\n!!!!! SKIPPED {test}: {why} !!!!!\n");
    false
}

// ---------------------------------------------------------------------------------------------
// Polling

/// Polls `check` every [`POLL`] until it returns `Ok`, and returns that value. `Err(observed)`
/// means "not yet"; the last observation is in the panic message when `timeout` passes.
pub fn wait_until<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        let last = match check() {
            Ok(v) => return v,
            Err(observed) => observed,
        };
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting until {what}; last observed: {last}");
        }
        std::thread::sleep(POLL);
    }
}

/// Asserts that `check` keeps returning `Ok` for all of `period` (polling every [`POLL`]).
pub fn holds_for(period: Duration, what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    while start.elapsed() < period {
        if let Err(observed) = check() {
            panic!("expected {what} to hold for {period:?}, but after {:?}: {observed}", start.elapsed());
        }
        std::thread::sleep(POLL);
    }
}

/// `Ok(())` when `cond`, else `Err` with the observed value.
pub fn ensure<T: Debug>(cond: bool, observed: T) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(format!("{observed:?}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// True while `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match proc_stat(pid) {
        Some((state, _)) => !matches!(state, 'Z' | 'X'),
        None => false,
    }
}

/// (state, start time in clock ticks) from `/proc/PID/stat`.
pub fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.first()?.chars().next()?, fields.get(19)?.parse().ok()?))
}

/// The real uid of a process (`Uid:` of `/proc/PID/status`).
pub fn proc_uid(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| panic!("pid {pid}: {e}"));
    let line = status.lines().find(|l| l.starts_with("Uid:")).expect("a Uid line");
    line.split_whitespace().nth(1).and_then(|u| u.parse().ok()).expect("a numeric uid")
}

/// A process's environment (`/proc/PID/environ`).
pub fn proc_environ(pid: u32) -> BTreeMap<String, String> {
    let bytes = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_else(|e| panic!("pid {pid}: {e}"));
    bytes
        .split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

pub fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
}

/// `{"pid": .., "start_time_ticks": ..}` as supervisors write `supervisor.json` and `task.json`.
pub fn read_identity(path: &Path) -> Option<(u32, u64)> {
    let v: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    Some((v["pid"].as_u64()? as u32, v["start_time_ticks"].as_u64()?))
}

/// The status code of `GET http://127.0.0.1:PORT/`.
pub fn http_status(port: u16) -> Result<u16, String> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(3))
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    client
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("GET http://127.0.0.1:{port}/: {e}"))
}

/// Runs the `capstan` binary with exactly these arguments (no `--addr` added).
pub fn capstan_raw(args: &[&str]) -> Output {
    Command::new(CAPSTAN).args(args).env_remove("CAPSTAN_ADDR").stdin(Stdio::null()).output().expect("running capstan")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Cgroups

/// Every directory that is (or would be) this cgroup root: one per v1 hierarchy, the unified
/// tree, or the v2 root.
pub fn cgroup_dirs(root: &str) -> Vec<PathBuf> {
    let mut dirs = vec![];
    let base = Path::new("/sys/fs/cgroup");
    if base.join(root).is_dir() {
        dirs.push(base.join(root));
    }
    if let Ok(entries) = std::fs::read_dir(base) {
        for e in entries.flatten() {
            let d = e.path().join(root);
            if d.is_dir() && !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    dirs
}

/// `dir` and every cgroup below it, children after their parents.
fn cgroup_tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = std::fs::read_dir(&out[i]) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

pub fn cgroup_pids(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The task cgroups (`ROOT/<task-id>`) that exist in any hierarchy.
pub fn task_cgroups(root: &str, task_id: &str) -> Vec<PathBuf> {
    cgroup_dirs(root).into_iter().map(|d| d.join(task_id)).filter(|d| d.is_dir()).collect()
}

/// Every process in the task's cgroups (all hierarchies, nested groups included), sorted.
pub fn task_cgroup_pids(root: &str, task_id: &str) -> Vec<u32> {
    let mut pids: Vec<u32> =
        task_cgroups(root, task_id).iter().flat_map(|d| cgroup_tree(d)).flat_map(|d| cgroup_pids(&d)).collect();
    pids.sort();
    pids.dedup();
    pids
}

// ---------------------------------------------------------------------------------------------
// The cluster

/// A port block of 100 ports in 20000-29999, different for each cluster of this test process
/// and randomly placed against other test processes.
fn port_block() -> (u16, u16) {
    static BASE: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = *BASE.get_or_init(|| rand::random::<u32>() % 100);
    let block = (base + NEXT.fetch_add(1, Ordering::Relaxed)) % 100;
    let lo = 20000 + block * 100;
    (lo as u16, (lo + 99) as u16)
}

/// A `capstan dev` cluster is a [`Cluster`] started with [`Cluster::start`].
pub type DevCluster = Cluster;

/// How the cluster's daemons run.
#[derive(Clone, Debug)]
enum Mode {
    /// One `capstan dev` process; `resources` go before the port range in `--resources`, and
    /// `flags` after the others.
    Dev { resources: String, flags: Vec<String> },
    /// `capstan master` on a fixed address (so that a restarted master has the same URL) and
    /// `capstan agent` with these flags on top of the ones every agent start gets.
    Split { master_bind: String, agent_flags: Vec<String>, master_flags: Vec<String>, agent_prefix: Vec<String> },
}

/// How to start a split cluster beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct SplitOptions {
    /// The master's address (default `127.0.0.1`); its port is picked for the cluster.
    pub master_host: Option<String>,
    /// Flags of every start of the master (e.g. `--agent-timeout 2s`).
    pub master_flags: Vec<String>,
    /// Flags of every start of the agent.
    pub agent_flags: Vec<String>,
    /// A command the agent runs under (e.g. `ip netns exec NAME`).
    pub agent_prefix: Vec<String>,
}

/// A daemon that did not come up: how it exited and what it said on standard error.
#[derive(Debug)]
pub struct StartFailure {
    pub status: Option<ExitStatus>,
    pub stderr: String,
}

pub struct Cluster {
    /// The test's name (its thread's name), for messages.
    pub name: String,
    dir: Option<tempfile::TempDir>,
    pub data_dir: PathBuf,
    pub cgroup_root: String,
    pub ports: (u16, u16),
    /// Everything the daemons printed, over all their starts (lines tagged with who said it).
    pub log: PathBuf,
    /// The master's URL.
    pub url: String,
    /// The agent's own API (split clusters; changes with every agent start).
    pub agent_url: Option<String>,
    mode: Mode,
    dev: Option<Child>,
    master: Option<Child>,
    agent: Option<Child>,
    extra_agents: Vec<Child>,
    starts: u32,
    http: reqwest::blocking::Client,
    /// Several masters on one etcd ([`Cluster::start_ha`]); empty otherwise.
    pub ha: Vec<HaMaster>,
    pub etcd: Option<capstan_store::EtcdProcess>,
}

/// One of several masters of an HA cluster: a fixed address and data directory.
pub struct HaMaster {
    pub bind: String,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl HaMaster {
    pub fn url(&self) -> String {
        format!("http://{}", self.bind)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Cluster {
    /// A `capstan dev` cluster whose data directory the tasks' users can reach
    /// (`$TMPDIR/capstan-e2e-*/data`, the temporary directory made world-traversable).
    pub fn start() -> Cluster {
        Self::start_with_private_parent(false)
    }

    /// With `private`, the data directory's parent is 0700 (as root's `$HOME`, where `capstan dev`
    /// keeps its data by default, is).
    pub fn start_with_private_parent(private: bool) -> Cluster {
        let mut c = Self::new(private, Mode::Dev { resources: String::new(), flags: vec![] });
        c.spawn_all();
        c
    }

    /// A `capstan dev` cluster with `--resources RESOURCES,ports=…` (`""`: only the ports) and
    /// more flags of `capstan dev` (e.g. `--attributes rack=r1`).
    pub fn start_with(resources: &str, flags: &[&str]) -> Cluster {
        let mode = Mode::Dev { resources: resources.to_string(), flags: flags.iter().map(|s| s.to_string()).collect() };
        let mut c = Self::new(false, mode);
        c.spawn_all();
        c
    }

    /// `capstan master --data-dir DATA/master --bind 127.0.0.1:PORT` (a free port picked now and
    /// kept for every start of the master) and `capstan agent --master URL --data-dir DATA/agent`
    /// as two processes; returns once the agent has registered.
    pub fn start_split() -> Cluster {
        Self::start_split_with(&[])
    }

    /// [`start_split`](Self::start_split) with flags that every start of the agent gets (e.g.
    /// `--usage-interval 200ms`).
    pub fn start_split_with(agent_flags: &[&str]) -> Cluster {
        Self::start_split_opts(SplitOptions {
            agent_flags: agent_flags.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
    }

    /// A split cluster started as `opts` says.
    pub fn start_split_opts(opts: SplitOptions) -> Cluster {
        let host = opts.master_host.unwrap_or_else(|| "127.0.0.1".into());
        let port = std::net::TcpListener::bind(format!("{host}:0"))
            .and_then(|l| l.local_addr())
            .expect("a free port for the master")
            .port();
        let mode = Mode::Split {
            master_bind: format!("{host}:{port}"),
            agent_flags: opts.agent_flags,
            master_flags: opts.master_flags,
            agent_prefix: opts.agent_prefix,
        };
        let mut c = Self::new(false, mode);
        c.spawn_all();
        c
    }

    /// Split clusters: one more agent, as its own process on this host (not under the agent
    /// prefix), with its data in `DATA/NAME` and `flags`; returns its API URL once the master
    /// lists it. It is killed with the cluster.
    pub fn start_extra_agent(&mut self, name: &str, flags: &[&str]) -> String {
        let Mode::Split { master_bind, .. } = self.mode.clone() else { panic!("not a split cluster") };
        let mut args: Vec<OsString> = vec!["agent".into(), "--master".into(), format!("http://{master_bind}").into()];
        args.extend(["--data-dir".into(), self.data_dir.join(name).into()]);
        args.extend(["--bind", "127.0.0.1:0", "--resources"].map(OsString::from));
        args.push(format!("ports={}-{}", self.ports.0 + 50, self.ports.1 + 50).into());
        args.extend(["--cgroup-root".into(), self.cgroup_root.clone().into()]);
        args.extend(flags.iter().map(OsString::from));
        let (child, first) = match self.spawn_daemon(name, &[], &args) {
            Ok(started) => started,
            Err(f) => {
                panic!("capstan agent {name} did not start ({:?}): {}\n{}", f.status, f.stderr, self.log_tail(60))
            }
        };
        self.extra_agents.push(child);
        let api = first.split_whitespace().find(|w| w.starts_with("http://")).expect("the agent's API URL").to_string();
        wait_until(SOON, "the extra agent is registered", || {
            let agents = self.request("GET", "/v1/agents", None)?;
            let registered = agents.1.as_array().is_some_and(|a| a.iter().any(|x| x["address"] == api.as_str()));
            ensure(registered, agents)
        });
        api
    }

    fn new(private: bool, mode: Mode) -> Cluster {
        let name = std::thread::current().name().unwrap_or("test").to_string();
        let dir = tempfile::Builder::new().prefix("capstan-e2e-").tempdir().expect("temporary directory");
        use std::os::unix::fs::PermissionsExt;
        let mode_bits = if private { 0o700 } else { 0o755 };
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode_bits)).expect("chmod");
        let data_dir = dir.path().join("data");
        let log = dir.path().join("daemons.log");
        let cgroup_root = format!("capstan-test-{:016x}", rand::random::<u64>());
        Cluster {
            name,
            dir: Some(dir),
            data_dir,
            cgroup_root,
            ports: port_block(),
            log,
            url: String::new(),
            agent_url: None,
            mode,
            dev: None,
            master: None,
            agent: None,
            extra_agents: Vec::new(),
            ha: Vec::new(),
            etcd: None,
            starts: 0,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .no_proxy()
                .build()
                .expect("HTTP client"),
        }
    }

    fn is_split(&self) -> bool {
        matches!(self.mode, Mode::Split { .. })
    }

    /// Starts whatever of the cluster's daemons does not run.
    fn spawn_all(&mut self) {
        match self.mode {
            Mode::Dev { .. } => self.spawn_dev(),
            Mode::Split { .. } if !self.ha.is_empty() => {
                for i in 0..self.ha.len() {
                    if self.ha[i].child.is_none() {
                        self.start_ha_master(i);
                    }
                }
                self.wait_leader(SOON, 0);
                if self.agent.is_none() {
                    self.start_agent(&[]);
                }
            }
            Mode::Split { .. } => {
                if self.master.is_none() {
                    self.start_master();
                }
                if self.agent.is_none() {
                    self.start_agent(&[]);
                }
            }
        }
    }

    /// Spawns `capstan ARGS` (its output going to the log, tagged `what`) and waits for its first
    /// line of standard output. `Err` when it exits before printing one.
    fn spawn_daemon(
        &mut self,
        what: &str,
        prefix: &[String],
        args: &[OsString],
    ) -> Result<(Child, String), StartFailure> {
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        writeln!(log, "===== start #{} of the cluster's daemons: capstan {what} =====", self.starts).expect("log file");
        let mut cmd = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(CAPSTAN);
                c
            }
            None => Command::new(CAPSTAN),
        };
        cmd.args(args)
            .env("NO_COLOR", "1")
            .env("CAPSTAN_LOG", std::env::var("CAPSTAN_LOG").unwrap_or_else(|_| "info".into()))
            .env_remove("CAPSTAN_ADDR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // If this test's thread dies without dropping the cluster, the daemon goes with it (its
        // supervisors and tasks do not: they are meant to outlive it).
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning capstan {what}: {e}"));
        let (tx, rx) = mpsc::channel::<String>();
        let stderr_text = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        drain(stdout, log.try_clone().expect("log file"), format!("{what} out"), Some(tx), None);
        let stderr_done = drain(stderr, log, format!("{what} err"), None, Some(stderr_text.clone()));
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => Ok((child, line)),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Its standard output closed without a line: it exits (or exited).
                let deadline = Instant::now() + SOON;
                let status = loop {
                    match child.try_wait() {
                        Ok(Some(s)) => break Some(s),
                        Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                        _ => {
                            let _ = child.kill();
                            break child.wait().ok();
                        }
                    }
                };
                let deadline = Instant::now() + Duration::from_secs(5);
                while !stderr_done.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let stderr = stderr_text.lock().unwrap().clone();
                Err(StartFailure { status, stderr })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let status = child.wait().ok();
                panic!(
                    "capstan {what} did not print its first line within 30 s (status {status:?});\n{}",
                    self.log_tail(60)
                );
            }
        }
    }

    fn spawn_dev(&mut self) {
        assert!(self.dev.is_none(), "the dev process already runs");
        let Mode::Dev { resources, flags } = self.mode.clone() else { panic!("not a dev cluster") };
        let mut args: Vec<OsString> = vec!["dev".into(), "--data-dir".into(), self.data_dir.clone().into()];
        args.extend(["--bind", "127.0.0.1:0", "--resources"].map(OsString::from));
        let ports = format!("ports={}-{}", self.ports.0, self.ports.1);
        args.push(if resources.is_empty() { ports } else { format!("{resources},{ports}") }.into());
        args.extend(["--cgroup-root".into(), self.cgroup_root.clone().into()]);
        args.extend(flags.iter().map(OsString::from));
        let (child, first) = match self.spawn_daemon("dev", &[], &args) {
            Ok(started) => started,
            Err(f) => panic!("capstan dev did not start ({:?}): {}\n{}", f.status, f.stderr, self.log_tail(60)),
        };
        self.dev = Some(child);
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in the first line of capstan dev: {first:?}"));
        assert!(
            first.starts_with("capstan dev cluster serving at http://127.0.0.1:"),
            "unexpected first line: {first:?}"
        );
        self.url = url.to_string();
        self.wait_master_serves();
    }

    fn wait_master_serves(&self) {
        wait_until(SOON, "the master answers /v1/health", || match self.request("GET", "/v1/health", None) {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        });
    }

    /// `n` masters on one etcd (started by the test, in `DATA/etcd`), each `capstan master
    /// --store etcd://… --bind 127.0.0.1:PORT --data-dir DATA/master-I` with `master_flags`, and one
    /// agent given every master's URL; returns once a master leads (`self.url` is the leader's)
    /// and the agent is registered.
    pub fn start_ha(n: usize, master_flags: &[&str]) -> Cluster {
        let mode = Mode::Split {
            master_bind: String::new(),
            agent_flags: vec![],
            master_flags: master_flags.iter().map(|s| s.to_string()).collect(),
            agent_prefix: vec![],
        };
        let mut c = Self::new(false, mode);
        std::fs::create_dir_all(&c.data_dir).expect("data directory");
        c.etcd = Some(capstan_store::EtcdProcess::start(&c.data_dir.join("etcd")).expect("starting etcd"));
        for i in 0..n {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port for a master")
                .port();
            c.ha.push(HaMaster {
                bind: format!("127.0.0.1:{port}"),
                dir: c.data_dir.join(format!("master-{i}")),
                child: None,
            });
        }
        c.spawn_all();
        c
    }

    /// Every master's URL, comma-separated (the agent's and the CLI's `--master`/`--addr`).
    pub fn masters_arg(&self) -> String {
        self.ha.iter().map(HaMaster::url).collect::<Vec<_>>().join(",")
    }

    /// HA clusters: starts master `i` (again) on its address and data directory.
    pub fn start_ha_master(&mut self, i: usize) {
        let Mode::Split { master_flags, .. } = self.mode.clone() else { panic!("not a split cluster") };
        let etcd = self.etcd.as_ref().expect("an HA cluster has etcd").url();
        let (bind, dir) = (self.ha[i].bind.clone(), self.ha[i].dir.clone());
        let mut args: Vec<OsString> = vec!["master".into(), "--data-dir".into(), dir.into()];
        args.extend(["--bind".into(), bind.clone().into(), "--store".into(), etcd.into()]);
        args.extend(master_flags.iter().map(OsString::from));
        let deadline = Instant::now() + SOON;
        let (child, _first) = loop {
            match self.spawn_daemon(&format!("master-{i}"), &[], &args) {
                Ok(started) => break started,
                Err(f) if f.stderr.contains("cannot listen") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(f) => {
                    panic!("capstan master {i} did not start ({:?}): {}\n{}", f.status, f.stderr, self.log_tail(60))
                }
            }
        };
        self.ha[i].child = Some(child);
    }

    /// HA clusters: whether master `i` still runs (it did not exit).
    pub fn ha_master_runs(&mut self, i: usize) -> bool {
        self.ha[i].child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// HA clusters: `kill -9` of master `i`.
    pub fn kill9_ha_master(&mut self, i: usize) {
        kill_child(self.ha[i].child.take());
    }

    /// HA clusters: `GET /v1/leader` of master `i`.
    pub fn leader_view(&self, i: usize) -> Result<Value, String> {
        let url = format!("{}/v1/leader", self.ha[i].url());
        let resp = self.http.get(&url).timeout(Duration::from_secs(2)).send().map_err(|e| format!("{url}: {e}"))?;
        resp.json::<Value>().map_err(|e| format!("{url}: {e}"))
    }

    /// HA clusters: waits until a running master says it leads with an epoch above `above`, and
    /// every other running master names it; points `self.url` at it. Returns (index, epoch).
    pub fn wait_leader(&mut self, timeout: Duration, above: u64) -> (usize, u64) {
        self.wait_leader_among(timeout, above, &[])
    }

    /// [`wait_leader`](Self::wait_leader), not asking the masters in `skip` (paused ones).
    pub fn wait_leader_among(&mut self, timeout: Duration, above: u64, skip: &[usize]) -> (usize, u64) {
        let found = wait_until(timeout, &format!("one master leads with an epoch above {above}"), || {
            let running: Vec<usize> =
                (0..self.ha.len()).filter(|i| self.ha[*i].child.is_some() && !skip.contains(i)).collect();
            let views: Vec<(usize, Value)> =
                running.iter().map(|i| Ok((*i, self.leader_view(*i)?))).collect::<Result<_, String>>()?;
            let leaders: Vec<&(usize, Value)> = views.iter().filter(|(_, v)| v["role"] == "leader").collect();
            let [(i, v)] = leaders.as_slice() else { return Err(format!("{views:?}")) };
            let epoch = v["epoch"].as_u64().unwrap_or(0);
            let url = self.ha[*i].url();
            let followed = views.iter().all(|(_, v)| v["leader"] == url.as_str());
            ensure(epoch > above && followed, &views).map(|_| (*i, epoch))
        });
        self.url = self.ha[found.0].url();
        found
    }

    /// The master's data directory (`DATA/master`).
    pub fn master_dir(&self) -> PathBuf {
        self.data_dir.join("master")
    }

    /// The agent's data directory (`DATA/agent`).
    pub fn agent_dir(&self) -> PathBuf {
        self.data_dir.join("agent")
    }

    /// Split clusters: starts the master on its data directory and its fixed address (retrying
    /// while the address is still taken by the one just killed) and waits until it serves.
    pub fn start_master(&mut self) {
        let Mode::Split { master_bind, master_flags, .. } = self.mode.clone() else {
            panic!("start_master: not a split cluster")
        };
        assert!(self.master.is_none(), "the master already runs");
        let mut args: Vec<OsString> = vec!["master".into(), "--data-dir".into(), self.master_dir().into()];
        args.extend(["--bind".into(), master_bind.clone().into()]);
        args.extend(master_flags.iter().map(OsString::from));
        let deadline = Instant::now() + SOON;
        let (child, first) = loop {
            match self.spawn_daemon("master", &[], &args) {
                Ok(started) => break started,
                Err(f) if f.stderr.contains("cannot listen") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(f) => panic!("capstan master did not start ({:?}): {}\n{}", f.status, f.stderr, self.log_tail(60)),
            }
        };
        self.master = Some(child);
        let want = format!("capstan master serving at http://{master_bind}");
        assert!(first.starts_with(&want), "unexpected first line of capstan master: {first:?} (expected {want:?})");
        self.url = format!("http://{master_bind}");
        self.wait_master_serves();
    }

    /// The arguments of `capstan agent` for this cluster, then `extra`.
    fn agent_args(&self, extra: &[&str]) -> Vec<OsString> {
        let Mode::Split { master_bind, agent_flags, .. } = &self.mode else { panic!("not a split cluster") };
        let masters = if self.ha.is_empty() { format!("http://{master_bind}") } else { self.masters_arg() };
        let mut args: Vec<OsString> = vec!["agent".into(), "--master".into(), masters.into()];
        args.extend(["--data-dir".into(), self.agent_dir().into()]);
        if !agent_flags.iter().any(|f| f == "--bind") {
            args.extend(["--bind", "127.0.0.1:0"].map(OsString::from));
        }
        args.push("--resources".into());
        args.push(format!("ports={}-{}", self.ports.0, self.ports.1).into());
        args.extend(["--cgroup-root".into(), self.cgroup_root.clone().into()]);
        args.extend(agent_flags.iter().map(OsString::from));
        args.extend(extra.iter().map(OsString::from));
        args
    }

    fn agent_prefix(&self) -> Vec<String> {
        match &self.mode {
            Mode::Split { agent_prefix, .. } => agent_prefix.clone(),
            Mode::Dev { .. } => vec![],
        }
    }

    /// Split clusters: starts the agent on its data directory with the cluster's flags and
    /// `extra`, and waits until the master lists it as registered (when the master runs).
    pub fn start_agent(&mut self, extra: &[&str]) {
        assert!(self.agent.is_none(), "the agent already runs");
        let args = self.agent_args(extra);
        let prefix = self.agent_prefix();
        let (child, first) = match self.spawn_daemon("agent", &prefix, &args) {
            Ok(started) => started,
            Err(f) => panic!("capstan agent did not start ({:?}): {}\n{}", f.status, f.stderr, self.log_tail(60)),
        };
        self.agent = Some(child);
        assert!(
            first.starts_with("capstan agent ") && first.contains(" running; API at http://"),
            "unexpected first line of capstan agent: {first:?}"
        );
        let api = first.split_whitespace().find(|w| w.starts_with("http://")).expect("the agent's API URL");
        self.agent_url = Some(api.to_string());
        if self.master.is_some() || self.ha.iter().any(|m| m.child.is_some()) {
            wait_until(SOON, "the agent is registered with its new address", || {
                let agents = self.request("GET", "/v1/agents", None)?;
                let registered = agents.1.as_array().is_some_and(|a| a.iter().any(|x| x["address"] == api));
                ensure(registered, agents)
            });
        }
    }

    /// Split clusters: starts the agent with `extra` and expects it to refuse to start: returns
    /// how it exited and its standard error. Panics if it comes up.
    pub fn agent_fails_to_start(&mut self, extra: &[&str]) -> StartFailure {
        assert!(self.agent.is_none(), "the agent already runs");
        let args = self.agent_args(extra);
        let prefix = self.agent_prefix();
        match self.spawn_daemon("agent", &prefix, &args) {
            Ok((mut child, first)) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the agent started although it should have refused: {first:?}\n{}", self.log_tail(40));
            }
            Err(f) => f,
        }
    }

    /// Split clusters: `kill -9` of the agent process; supervisors and tasks keep running.
    pub fn kill9_agent(&mut self) {
        kill_child(self.agent.take());
    }

    /// Split clusters: `kill -9` of the master process.
    pub fn kill9_master(&mut self) {
        kill_child(self.master.take());
    }

    /// SIGKILLs every daemon of the cluster; supervisors and tasks keep running.
    pub fn kill9(&mut self) {
        kill_child(self.dev.take());
        kill_child(self.agent.take());
        kill_child(self.master.take());
        for m in &mut self.ha {
            kill_child(m.child.take());
        }
        for child in std::mem::take(&mut self.extra_agents) {
            kill_child(Some(child));
        }
    }

    /// `kill -9` of every daemon, then new ones on the same data directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn_all();
    }

    /// Starts the daemons again after [`kill9`](Self::kill9).
    pub fn start_again(&mut self) {
        self.spawn_all();
    }

    /// The value of the sample `name` (labels exactly as written, e.g. `capstan_tasks{state="RUNNING"}`)
    /// in the master's `/metrics`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let m = self.metrics();
        m.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
    }

    /// Starts recording every state the master shows for the tasks of `job` (polling every
    /// [`POLL`] on a thread of its own, until [`StateRecorder::stop`]).
    pub fn record_states(&self, job: &str) -> StateRecorder {
        StateRecorder::start(self.url.clone(), job)
    }

    pub fn sandboxes(&self) -> PathBuf {
        self.data_dir.join("agent").join("sandboxes")
    }

    pub fn sandbox(&self, task_id: &str) -> PathBuf {
        self.sandboxes().join(task_id)
    }

    /// The task's own directory in its sandbox (its cwd, `$HOME` and `$CAPSTAN_SANDBOX`).
    pub fn work(&self, task_id: &str) -> PathBuf {
        self.sandbox(task_id).join("work")
    }

    /// One of the task's log files (`stdout`, `stderr`, `stdout.1`, …), root's alone.
    pub fn log_file(&self, task_id: &str, name: &str) -> PathBuf {
        self.sandbox(task_id).join("logs").join(name)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "----- last {} lines of {} -----\n{}\n-----",
            all.len() - from,
            self.log.display(),
            all[from..].join("\n")
        )
    }

    // ---- CLI

    /// Runs `capstan ARGS --addr URL`.
    pub fn capstan(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--addr", &self.url]);
        capstan_raw(&all)
    }

    /// Runs `capstan ARGS --addr URL`, asserts success and returns standard output.
    pub fn capstan_ok(&self, args: &[&str]) -> String {
        let out = self.capstan(args);
        assert!(
            out.status.success(),
            "capstan {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Writes a file into the test's directory (for job files) and returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.as_ref().expect("exists").path().join(name);
        std::fs::write(&path, contents).expect("writing a test file");
        path
    }

    // ---- HTTP API

    /// One request; `Err` when the master cannot be reached. The body as JSON, or as a JSON
    /// string when it is not JSON.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Value), String> {
        let method: reqwest::Method = method.parse().expect("an HTTP method");
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let resp = req.send().map_err(|e| format!("{method} {path}: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().map_err(|e| format!("{method} {path}: reading the body: {e}"))?;
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(text(&bytes)));
        Ok((status, value))
    }

    /// `GET path`, which must answer 200.
    pub fn get(&self, path: &str) -> Value {
        match self.request("GET", path, None) {
            Ok((200, v)) => v,
            other => panic!("GET {path}: expected 200, got {other:?}"),
        }
    }

    /// Creates a job from its JSON spec (must answer 201) and returns its task ids.
    pub fn create_job(&self, spec: &Value) -> Vec<String> {
        match self.request("POST", "/v1/jobs", Some(&spec.to_string())) {
            Ok((201, v)) => v["tasks"]
                .as_array()
                .unwrap_or_else(|| panic!("no tasks in {v}"))
                .iter()
                .map(|t| t.as_str().expect("task ids are strings").to_string())
                .collect(),
            other => panic!("POST /v1/jobs {spec}: expected 201, got {other:?}"),
        }
    }

    /// The job, or `None` when the master does not know it (404).
    pub fn job(&self, key: &str) -> Result<Option<Value>, String> {
        match self.request("GET", &format!("/v1/jobs/{key}"), None)? {
            (200, v) => Ok(Some(v)),
            (404, _) => Ok(None),
            other => Err(format!("GET /v1/jobs/{key}: {other:?}")),
        }
    }

    /// Every task of `job` the master knows, current and ended, oldest first per instance.
    pub fn tasks_of(&self, job: &str) -> Result<Vec<Value>, String> {
        match self.request("GET", "/v1/tasks", None)? {
            (200, Value::Array(all)) => Ok(all.into_iter().filter(|t| t["job"] == job).collect()),
            other => Err(format!("GET /v1/tasks: {other:?}")),
        }
    }

    /// One task; `Ok(None)` on 404.
    pub fn task(&self, id: &str) -> Result<Option<Value>, String> {
        match self.request("GET", &format!("/v1/tasks/{id}"), None)? {
            (200, v) => Ok(Some(v)),
            (404, _) => Ok(None),
            other => Err(format!("GET /v1/tasks/{id}: {other:?}")),
        }
    }

    /// The messages of the cluster events of `kind` (`GET /v1/events`), oldest first.
    pub fn events_of(&self, kind: &str) -> Vec<String> {
        let page = self.get("/v1/events?after=0");
        page["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["kind"] == kind)
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    pub fn metrics(&self) -> String {
        match self.request("GET", "/metrics", None) {
            Ok((200, Value::String(s))) => s,
            other => panic!("GET /metrics: {other:?}"),
        }
    }

    // ---- waiting for tasks

    /// Waits until `job` has exactly `n` RUNNING tasks with a pid (and no other task wanting to
    /// run), and returns them by instance.
    pub fn wait_running(&self, job: &str, n: usize, timeout: Duration) -> Vec<Value> {
        wait_until(timeout, &format!("{n} tasks of {job} are RUNNING"), || {
            let tasks = self.tasks_of(job)?;
            let running: Vec<Value> =
                tasks.iter().filter(|t| t["state"] == "RUNNING" && t["pid"].is_u64()).cloned().collect();
            let active = tasks.iter().filter(|t| !is_terminal(t)).count();
            if running.len() == n && active == n {
                let mut running = running;
                running.sort_by_key(|t| t["instance"].as_u64());
                Ok(running)
            } else {
                Err(summary(&tasks))
            }
        })
    }

    /// Waits until `job` has a task for `instance` other than `old` that is RUNNING with a pid,
    /// and returns it.
    pub fn wait_replacement(&self, job: &str, instance: u64, old: &str, timeout: Duration) -> Value {
        wait_until(timeout, &format!("a new task for instance {instance} of {job} is RUNNING"), || {
            let tasks = self.tasks_of(job)?;
            tasks
                .iter()
                .find(|t| t["instance"] == instance && t["id"] != old && t["state"] == "RUNNING" && t["pid"].is_u64())
                .cloned()
                .ok_or_else(|| summary(&tasks))
        })
    }

    /// Waits until task `id` is in `state` and returns it.
    pub fn wait_task_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        wait_until(timeout, &format!("task {id} is {state}"), || match self.task(id)? {
            Some(t) if t["state"] == state => Ok(t),
            Some(t) => Err(format!("{} ({})", t["state"], t["reason"])),
            None => Err("404: the master does not know it".into()),
        })
    }

    // ---- cleanup

    fn print_debug_info(&self) {
        eprintln!("\n===== {}: the test failed; what the cluster said =====", self.name);
        eprintln!(
            "data directory: {}, cgroup root: {}, ports {}-{}",
            self.data_dir.display(),
            self.cgroup_root,
            self.ports.0,
            self.ports.1
        );
        eprintln!("{}", self.log_tail(80));
        if let Ok(entries) = std::fs::read_dir(self.sandboxes()) {
            for e in entries.flatten() {
                let p = e.path();
                let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_else(|_| "(none)".into());
                let tail = |s: String| {
                    s.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
                };
                eprintln!(
                    "--- sandbox {}\n task.json: {}\n exit.json: {}\n supervisor.log (tail):\n{}\n stderr (tail):\n{}",
                    p.display(),
                    read("task.json").trim(),
                    read("exit.json").trim(),
                    tail(read("supervisor.log")),
                    tail(read("stderr")),
                );
            }
        }
        eprintln!("===== end of {} =====\n", self.name);
    }

    /// Kills everything of this cluster and removes its cgroups. Touches only processes of this
    /// cluster: recorded in its sandboxes, listed in its cgroups, or with its (unique) data
    /// directory on their command line (a supervisor that has not yet recorded itself).
    fn cleanup(&mut self) {
        self.kill9();
        let roots = cgroup_dirs(&self.cgroup_root);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Rounds until one finds nothing alive: a supervisor may be starting a task right now.
        loop {
            let mut pids = self.own_command_lines();
            if let Ok(entries) = std::fs::read_dir(self.sandboxes()) {
                for e in entries.flatten() {
                    for f in ["supervisor.json", "task.json"] {
                        if let Some((pid, ticks)) = read_identity(&e.path().join(f)) {
                            if proc_stat(pid).is_some_and(|(_, t)| t == ticks) {
                                pids.push(pid);
                            }
                        }
                    }
                }
            }
            let roots = cgroup_dirs(&self.cgroup_root);
            pids.extend(roots.iter().flat_map(|r| cgroup_tree(r)).flat_map(|d| cgroup_pids(&d)));
            pids.retain(|p| pid_alive(*p));
            pids.sort();
            pids.dedup();
            if pids.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("{}: processes {pids:?} of this cluster would not die", self.name);
                break;
            }
            pids.into_iter().for_each(sigkill);
            std::thread::sleep(Duration::from_millis(20));
        }
        for root in roots.into_iter().chain(cgroup_dirs(&self.cgroup_root)) {
            for dir in cgroup_tree(&root).into_iter().rev() {
                let deadline = Instant::now() + Duration::from_secs(5);
                while let Err(e) = std::fs::remove_dir(&dir) {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        break;
                    }
                    if Instant::now() > deadline {
                        eprintln!("{}: cannot remove cgroup {}: {e}", self.name, dir.display());
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Processes whose command line names this cluster's data directory: supervisors
    /// (`capstan supervise DATA/agent/sandboxes/ID`) and a dev process forked but not yet exec'd.
    fn own_command_lines(&self) -> Vec<u32> {
        let needle = self.data_dir.as_os_str().as_encoded_bytes().to_vec();
        let me = std::process::id();
        let Ok(entries) = std::fs::read_dir("/proc") else { return vec![] };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| *pid != me)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle.as_slice()))
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed {
            self.print_debug_info();
        }
        self.cleanup();
        if failed && std::env::var("CAPSTAN_KEEP_TEST_DATA").as_deref() == Ok("1") {
            if let Some(dir) = self.dir.take() {
                eprintln!("{}: keeping {}", self.name, dir.keep().display());
            }
        }
    }
}

/// SIGKILLs a daemon and reaps it.
fn kill_child(child: Option<Child>) {
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// At most this much of a daemon's standard error is kept for [`StartFailure`].
const STDERR_KEEP: usize = 256 * 1024;

/// Copies a pipe into the log, line by line; the first line also goes to `first`, and the lines
/// (up to [`STDERR_KEEP`] bytes) to `keep`. The thread ends at the pipe's end.
fn drain(
    pipe: impl Read + Send + 'static,
    mut log: std::fs::File,
    tag: String,
    first: Option<mpsc::Sender<String>>,
    keep: Option<Arc<Mutex<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut first = first;
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(log, "[{tag}] {line}");
            if let Some(keep) = &keep {
                let mut kept = keep.lock().unwrap();
                if kept.len() < STDERR_KEEP {
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
            if let Some(tx) = first.take() {
                let _ = tx.send(line);
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Recording what the master shows over time

/// A thread that polls `GET /v1/tasks?job=KEY` every [`POLL`] and records, per task, every
/// state the master showed (consecutive repeats collapsed), and the polls that failed.
pub struct StateRecorder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Recorded>>,
}

/// What a [`StateRecorder`] saw.
#[derive(Debug, Default, Clone)]
pub struct Recorded {
    /// Task id → the states seen, in order, without consecutive repeats.
    pub states: BTreeMap<String, Vec<String>>,
    /// Successful polls.
    pub polls: usize,
    /// Polls that failed (master unreachable, bad answer).
    pub failed_polls: usize,
}

impl Recorded {
    /// `(task id, states)` of every task that was ever seen in `state`.
    pub fn tasks_seen_in(&self, state: &str) -> Vec<(&String, &Vec<String>)> {
        self.states.iter().filter(|(_, s)| s.iter().any(|x| x == state)).collect()
    }
}

impl StateRecorder {
    pub fn start(url: String, job: &str) -> StateRecorder {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let path = format!("{url}/v1/tasks?job={job}");
        let thread = std::thread::spawn(move || {
            let http = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(2))
                .no_proxy()
                .build()
                .expect("HTTP client");
            let mut seen = Recorded::default();
            while !flag.load(Ordering::Relaxed) {
                let tasks = http.get(&path).send().ok().and_then(|r| r.json::<Value>().ok());
                match tasks {
                    Some(Value::Array(tasks)) => {
                        seen.polls += 1;
                        for t in tasks {
                            let (Some(id), Some(state)) = (t["id"].as_str(), t["state"].as_str()) else { continue };
                            let states = seen.states.entry(id.to_string()).or_default();
                            if states.last().map(String::as_str) != Some(state) {
                                states.push(state.to_string());
                            }
                        }
                    }
                    _ => seen.failed_polls += 1,
                }
                std::thread::sleep(POLL);
            }
            seen
        });
        StateRecorder { stop, thread: Some(thread) }
    }

    /// Stops polling and returns what was seen.
    pub fn stop(mut self) -> Recorded {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("running").join().expect("the recorder thread")
    }
}

impl Drop for StateRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Jobs and tasks as JSON

/// A job spec with small resources; adjust the returned JSON as needed.
pub fn job_spec(key: &str, job_type: &str, instances: u32, command: &str) -> Value {
    json!({
        "job": key,
        "type": job_type,
        "instances": instances,
        "task": {
            "command": command,
            "user": "nobody",
            "cpus": 0.05,
            "mem": "32MiB",
            "disk": "32MiB",
            "kill_grace": "2s",
        }
    })
}

/// A service of `instances` Python HTTP servers, each on its own port `http`.
pub fn http_service(key: &str, instances: u32) -> Value {
    let mut spec = job_spec(key, "service", instances, "exec python3 -m http.server $PORT_HTTP --bind 127.0.0.1");
    spec["task"]["ports"] = json!(["http"]);
    spec
}

pub fn is_terminal(t: &Value) -> bool {
    matches!(t["state"].as_str(), Some("FINISHED" | "FAILED" | "KILLED" | "LOST"))
}

pub fn task_id(t: &Value) -> String {
    t["id"].as_str().expect("task id").to_string()
}

pub fn task_pid(t: &Value) -> u32 {
    t["pid"].as_u64().unwrap_or_else(|| panic!("task without pid: {t}")) as u32
}

pub fn task_port(t: &Value, name: &str) -> u16 {
    t["ports"][name].as_u64().unwrap_or_else(|| panic!("task without port {name}: {t}")) as u16
}

/// `id instance STATE (reason)` per task: what a polling failure shows.
pub fn summary(tasks: &[Value]) -> String {
    let lines: Vec<String> = tasks
        .iter()
        .map(|t| format!("{} #{} {} pid={} ({})", t["id"], t["instance"], t["state"], t["pid"], t["reason"]))
        .collect();
    format!("[{}]", lines.join("; "))
}
