//! Shared helpers of the containerizer's integration tests: privilege check, fixtures, polling.
#![allow(dead_code)] // each test file uses a different subset

use capstan_containerizer::{Containerizer, ContainerizerConfig, LaunchSpec};
use capstan_model::TaskId;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// True when this test may run (root, cgroups mounted). Otherwise it says loudly why it skips —
/// or, with `CAPSTAN_REQUIRE_PRIVILEGED_TESTS=1` (CI), fails.
pub fn privileged(test: &str) -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("it must run as root")
    } else if !Path::new("/sys/fs/cgroup").is_dir() {
        Some("/sys/fs/cgroup is not mounted")
    } else {
        None
    };
    let Some(why) = why else { return true };
    if std::env::var("CAPSTAN_REQUIRE_PRIVILEGED_TESTS").as_deref() == Ok("1") {
        panic!("{test}: {why}, and CAPSTAN_REQUIRE_PRIVILEGED_TESTS=1 forbids skipping");
    }
    // Straight to fd 2: libtest would capture (and hide) an `eprintln!` of a passing test.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("\n!!!!! SKIPPED {test}: {why} (real processes, users and cgroups) !!!!!\n").as_bytes(),
    );
    false
}

pub const CGROUP_ROOT: &str = "capstan-test";

pub fn containerizer(allow_root: bool) -> Containerizer {
    Containerizer::new(ContainerizerConfig {
        cgroup_root: CGROUP_ROOT.into(),
        allow_root,
        supervisor_cmd: vec![env!("CARGO_BIN_EXE_capstan-supervisor").into()],
    })
    .expect("containerizer")
}

/// Unique across tests and concurrent test processes.
pub fn unique_task_id() -> TaskId {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    TaskId((u64::from(std::process::id()) << 40) ^ (u64::from(nanos) << 8) ^ NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A sandbox path whose parent the task user can traverse (a tempdir itself is 0700).
pub struct Sandbox {
    _parent: tempfile::TempDir,
    pub path: PathBuf,
}

impl Sandbox {
    /// A log file of the task (`stdout`, `stderr`, `stdout.1`, …): in the root-only `logs/`.
    pub fn log(&self, name: &str) -> PathBuf {
        self.path.join(capstan_containerizer::LOGS_DIR).join(name)
    }

    /// The task's own directory: its working directory and `$HOME`.
    pub fn work(&self) -> PathBuf {
        self.path.join(capstan_containerizer::WORK_DIR)
    }
}

pub fn sandbox() -> Sandbox {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = parent.path().join("sandbox");
    Sandbox { _parent: parent, path }
}

pub fn spec(command: &str) -> LaunchSpec {
    LaunchSpec {
        task_id: unique_task_id(),
        command: command.into(),
        user: "nobody".into(),
        env: vec![("CAPSTAN_TASK".into(), "hello".into())],
        cpus_milli: 200,
        mem_bytes: 128 << 20,
        pids_max: Some(64),
        kill_grace_ms: 300,
        log_max_bytes: 0,
        log_keep: 0,
        sandbox_gid: None,
    }
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("<{}: {e}>", path.display()))
}

pub fn alive(pid: i32) -> bool {
    // A zombie has exited: only a live process counts.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat.rsplit(')').next().and_then(|r| r.trim().chars().next()), Some('Z' | 'X')),
        Err(_) => false,
    }
}
