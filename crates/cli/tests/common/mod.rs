//! Harness of the end-to-end tests: a real `capstan dev` process (master + agent) on a temporary
//! data directory, its own port range and its own cgroup root, with helpers over the HTTP API, the
//! CLI and `/proc`. Dropping a [`DevCluster`] leaves nothing behind: the dev process, every
//! supervisor and task process of this cluster, and its cgroups are gone afterwards.
//!
//! Tasks run as real processes under real cgroups, so these tests need root. Without it they say
//! loudly that they skip — unless `CAPSTAN_REQUIRE_PRIVILEGED_TESTS=1` (CI), where they fail.
//! Set `CAPSTAN_KEEP_TEST_DATA=1` to keep the data directory of a failed test for inspection.
#![allow(dead_code)] // each test file uses a different subset

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(50);
/// Generous bound for things that normally take well under a second.
pub const SOON: Duration = Duration::from_secs(15);

pub const CAPSTAN: &str = env!("CARGO_BIN_EXE_capstan");

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

fn cgroup_pids(dir: &Path) -> Vec<u32> {
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

pub struct DevCluster {
    /// The test's name (its thread's name), for messages.
    pub name: String,
    dir: Option<tempfile::TempDir>,
    pub data_dir: PathBuf,
    pub cgroup_root: String,
    pub ports: (u16, u16),
    /// Everything the dev process printed, over all its starts.
    pub log: PathBuf,
    pub url: String,
    child: Option<Child>,
    starts: u32,
    http: reqwest::blocking::Client,
}

impl DevCluster {
    /// A cluster whose data directory the tasks' users can reach (`$TMPDIR/capstan-e2e-*/data`,
    /// the temporary directory made world-traversable).
    pub fn start() -> DevCluster {
        Self::start_with_private_parent(false)
    }

    /// With `private`, the data directory's parent is 0700 (as root's `$HOME`, where `capstan dev`
    /// keeps its data by default, is).
    pub fn start_with_private_parent(private: bool) -> DevCluster {
        let name = std::thread::current().name().unwrap_or("test").to_string();
        let dir = tempfile::Builder::new().prefix("capstan-e2e-").tempdir().expect("temporary directory");
        use std::os::unix::fs::PermissionsExt;
        let mode = if private { 0o700 } else { 0o755 };
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).expect("chmod");
        let data_dir = dir.path().join("data");
        let log = dir.path().join("dev.log");
        let cgroup_root = format!("capstan-test-{:016x}", rand::random::<u64>());
        let mut c = DevCluster {
            name,
            dir: Some(dir),
            data_dir,
            cgroup_root,
            ports: port_block(),
            log,
            url: String::new(),
            child: None,
            starts: 0,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .no_proxy()
                .build()
                .expect("HTTP client"),
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the dev process already runs");
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        writeln!(log, "===== start #{} of capstan dev =====", self.starts).expect("log file");
        let mut cmd = Command::new(CAPSTAN);
        cmd.arg("dev")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--bind", "127.0.0.1:0"])
            .arg("--resources")
            .arg(format!("ports={}-{}", self.ports.0, self.ports.1))
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .env("NO_COLOR", "1")
            .env("CAPSTAN_LOG", std::env::var("CAPSTAN_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // If this test process dies without dropping the cluster, the dev process goes with it
        // (its supervisors and tasks do not: they are meant to outlive it).
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().expect("spawning capstan dev");
        let (tx, rx) = mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        drain(stdout, log.try_clone().expect("log file"), "out", Some(tx));
        drain(stderr, log, "err", None);
        self.child = Some(child);
        let first = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(e) => {
                let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                panic!("capstan dev did not print its address ({e}; exit status {status:?});\n{}", self.log_tail(60));
            }
        };
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in the first line of capstan dev: {first:?}"));
        assert!(
            first.starts_with("capstan dev cluster serving at http://127.0.0.1:"),
            "unexpected first line: {first:?}"
        );
        self.url = url.to_string();
        wait_until(SOON, "the master answers /v1/health", || match self.request("GET", "/v1/health", None) {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        });
    }

    /// SIGKILLs the dev process (master and agent); supervisors and tasks keep running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `kill -9` of the dev process, then a new one on the same data directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Starts the dev process again after [`kill9`](Self::kill9).
    pub fn start_again(&mut self) {
        self.spawn();
    }

    pub fn sandboxes(&self) -> PathBuf {
        self.data_dir.join("agent").join("sandboxes")
    }

    pub fn sandbox(&self, task_id: &str) -> PathBuf {
        self.sandboxes().join(task_id)
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

impl Drop for DevCluster {
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

/// Copies a pipe into the log, line by line; the first line also goes to `first`.
fn drain(
    pipe: impl Read + Send + 'static,
    mut log: std::fs::File,
    tag: &'static str,
    first: Option<mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        let mut first = first;
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(log, "[{tag}] {line}");
            if let Some(tx) = first.take() {
                let _ = tx.send(line);
            }
        }
    });
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
