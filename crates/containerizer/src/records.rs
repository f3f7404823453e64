//! The files a supervisor and the agent share in a sandbox: launch spec, identities, exit record.
//!
//! Every file is JSON and written atomically (temporary file, fsync, rename, fsync of the
//! directory), so a reader sees either the old state or the new one, never half a file. Every
//! file is root's alone (mode 0600; the spec holds the job's environment) in the root-owned
//! sandbox directory (see [`crate::sandbox`]); none is created or read through a symbolic link,
//! which also keeps sandboxes of the previous layout (owned by the task's user) from pointing the
//! agent at another file.

use capstan_model::{TaskExit, TaskId};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `launch.json`: the [`LaunchSpec`], written by `Containerizer::launch`.
pub const LAUNCH_FILE: &str = "launch.json";
/// `supervisor-config.json`: the parts of `ContainerizerConfig` the supervisor needs.
pub const SUPERVISOR_CONFIG_FILE: &str = "supervisor-config.json";
/// `supervisor.json`: the supervisor's [`ProcessIdentity`], written by the supervisor first thing.
pub const SUPERVISOR_FILE: &str = "supervisor.json";
/// `task.json`: the task's [`ProcessIdentity`], written once the task process runs.
pub const TASK_FILE: &str = "task.json";
/// `exit.json`: the [`ExitRecord`], written by the supervisor before it exits.
pub const EXIT_FILE: &str = "exit.json";
/// `kill.json`: who asked for a stop ([`KillRequest`]), written before the supervisor gets SIGTERM.
pub const KILL_FILE: &str = "kill.json";
/// The task's standard output, appended to by the supervisor and rotated at
/// [`LaunchSpec::log_max_bytes`] into `stdout.1` (newest) … `stdout.N` (see [`crate::logs`]).
pub const STDOUT_FILE: &str = "stdout";
/// The task's standard error, rotated like [`STDOUT_FILE`].
pub const STDERR_FILE: &str = "stderr";
/// `log_max_bytes` when the launch spec says 0 or nothing: 10 MiB.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 10 << 20;
/// `log_keep` when the launch spec says 0 or nothing.
pub const DEFAULT_LOG_KEEP: u32 = 3;
/// Upper bound of `log_keep` (a rotation renames that many files).
pub const MAX_LOG_KEEP: u32 = 100;
/// The supervisor's own diagnostics (its stderr).
pub const SUPERVISOR_LOG_FILE: &str = "supervisor.log";
/// `supervisor.lock`: locked (`flock`, exclusive) by the sandbox's supervisor as its first action
/// and for its whole life, so that at most one supervisor ever runs a sandbox's task, and so that
/// the agent can tell "no supervisor lives" from "a supervisor is starting" (see
/// [`try_lock_sandbox`]).
pub const LOCK_FILE: &str = "supervisor.lock";

/// What to run, as the agent decided it. Written as `SANDBOX/launch.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub task_id: TaskId,
    /// Run as `/bin/sh -c COMMAND` with the sandbox as working directory.
    pub command: String,
    /// Unix user name; the task runs as this user.
    pub user: String,
    /// The agent's variables (`CAPSTAN_*`, `PORT_*`); the supervisor adds `PATH` (if absent),
    /// and sets `HOME` (= sandbox), `USER` and `LOGNAME`.
    pub env: Vec<(String, String)>,
    /// CPU share in thousandths of a CPU; 0 means no quota (minimal shares).
    pub cpus_milli: u32,
    /// Memory limit without swap; 0 means no limit.
    pub mem_bytes: u64,
    pub pids_max: Option<u64>,
    /// On kill: SIGTERM to the task's process group, wait this long, then SIGKILL the cgroup.
    pub kill_grace_ms: u64,
    /// Size at which `stdout` and `stderr` are each rotated; 0 (or absent) means
    /// [`DEFAULT_LOG_MAX_BYTES`]. A live file never exceeds it.
    #[serde(default)]
    pub log_max_bytes: u64,
    /// Rotated files kept per stream (`stdout.1` newest … `stdout.N`); 0 (or absent) means
    /// [`DEFAULT_LOG_KEEP`]; at most [`MAX_LOG_KEEP`].
    #[serde(default)]
    pub log_keep: u32,
    /// The group the task runs with (primary and supplementary), which alone may enter the
    /// sandbox (see [`crate::sandbox`]); chosen by `Containerizer::launch`. `None` in a spec of
    /// the previous sandbox layout, and when the agent is not root (then nothing is separated).
    #[serde(default)]
    pub sandbox_gid: Option<u32>,
}

impl LaunchSpec {
    /// `log_max_bytes` with its default applied.
    pub fn log_max_bytes_effective(&self) -> u64 {
        if self.log_max_bytes == 0 {
            DEFAULT_LOG_MAX_BYTES
        } else {
            self.log_max_bytes
        }
    }

    /// `log_keep` with its default and bound applied.
    pub fn log_keep_effective(&self) -> u32 {
        if self.log_keep == 0 {
            DEFAULT_LOG_KEEP
        } else {
            self.log_keep.min(MAX_LOG_KEEP)
        }
    }
}

/// The supervisor's share of the containerizer configuration (`supervisor-config.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SupervisorConfig {
    pub cgroup_root: String,
    pub allow_root: bool,
}

/// A process, identified by pid and start time (clock ticks since boot, `/proc/PID/stat` field
/// 22), so that a recycled pid is never mistaken for the process recorded earlier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: u32,
    pub start_time_ticks: u64,
}

impl ProcessIdentity {
    /// The identity of a running (or zombie) process.
    pub fn of(pid: u32) -> io::Result<Self> {
        let stat = read_proc_stat(pid)?;
        Ok(ProcessIdentity { pid, start_time_ticks: stat.start_time_ticks })
    }

    /// True while this very process exists and has not exited (a zombie counts as exited).
    pub fn is_alive(&self) -> bool {
        match read_proc_stat(self.pid) {
            Ok(stat) => stat.start_time_ticks == self.start_time_ticks && !matches!(stat.state, 'Z' | 'X'),
            Err(_) => false,
        }
    }
}

pub(crate) struct ProcStat {
    pub state: char,
    pub start_time_ticks: u64,
}

pub(crate) fn read_proc_stat(pid: u32) -> io::Result<ProcStat> {
    parse_proc_stat(&fs::read_to_string(format!("/proc/{pid}/stat"))?)
}

/// Parses `/proc/PID/stat`; the command name may contain spaces and parentheses, so the fields
/// are counted from the last `)`.
pub(crate) fn parse_proc_stat(text: &str) -> io::Result<ProcStat> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/PID/stat");
    let rest = &text[text.rfind(')').ok_or_else(bad)? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); start time is field 22.
    let state = fields.first().and_then(|s| s.chars().next()).ok_or_else(bad)?;
    let start_time_ticks = fields.get(19).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    Ok(ProcStat { state, start_time_ticks })
}

/// Resource usage of a task's cgroup. Zero means "could not be read" as well as zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// CPU time of all the task's processes (v1 `cpuacct.usage`, v2 `cpu.stat usage_usec`).
    pub cpu_usage_ns: u64,
    /// Highest memory use so far (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`).
    pub mem_peak_bytes: u64,
    /// Time spent throttled by the CPU quota (v1 `cpu.stat throttled_time`, v2 `throttled_usec`).
    pub throttled_ns: u64,
    /// Periods in which the quota throttled the task (`cpu.stat nr_throttled`).
    pub nr_throttled: u64,
    /// Memory in use now (v1 `memory.usage_in_bytes`, v2 `memory.current`); absent in records
    /// written before it existed.
    #[serde(default)]
    pub mem_bytes: u64,
}

/// How a task ended, written as `SANDBOX/exit.json` by its supervisor before the supervisor exits
/// (or by the agent when the supervisor vanished without writing it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub exit: TaskExit,
    pub usage: Usage,
    /// Wall-clock milliseconds since the Unix epoch.
    pub ended_at_ms: u64,
}

/// Who asked for a stop (`kill.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KillRequest {
    pub by: String,
    /// The end to record instead of `Killed { by }` (over disk quota, failed health check).
    #[serde(default)]
    pub exit: Option<TaskExit>,
}

/// Mode of every record file: the launch spec holds the job's environment.
pub(crate) const RECORD_MODE: u32 = 0o600;

/// Writes `value` as JSON to `path` atomically: temporary file, fsync, rename, fsync directory.
/// The temporary file is created new (`O_EXCL`, which never follows a link), mode 0600.
pub(crate) fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let create = || fs::OpenOptions::new().write(true).create_new(true).mode(RECORD_MODE).open(&tmp);
    let mut file = match create() {
        Ok(file) => file,
        // Left by a crash of an earlier process with the same pid (or planted): replace it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(&tmp)?;
            create()?
        }
        Err(e) => return Err(e),
    };
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads a whole file that must be a regular file and not a symbolic link (a sandbox's records:
/// one of the previous layout lies in a directory its task could write).
pub fn read_regular_file(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(io::ErrorKind::InvalidData, format!("{} is a symbolic link", path.display()))
            } else {
                e
            }
        })?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is not a regular file", path.display())));
    }
    let mut bytes = vec![];
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Reads a JSON file (see [`read_regular_file`]); `Ok(None)` when it does not exist.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match read_regular_file(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens (creating it) `SANDBOX/supervisor.lock`, close-on-exec, and tries to lock it exclusively
/// without blocking. `Ok(Some(fd))` holds the lock until the descriptor is closed; `Ok(None)`:
/// another open of the file holds it (a supervisor of this sandbox is alive).
pub(crate) fn try_lock_sandbox(sandbox: &Path) -> io::Result<Option<OwnedFd>> {
    // std opens every file with O_CLOEXEC: a process this one execs never inherits the lock.
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(RECORD_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(sandbox.join(LOCK_FILE))?;
    let fd = OwnedFd::from(file);
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(fd));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(None),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        let stat = parse_proc_stat(line).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.start_time_ticks, 987654);
    }

    #[test]
    fn own_identity_is_alive_and_a_wrong_start_time_is_not() {
        let me = ProcessIdentity::of(std::process::id()).unwrap();
        assert!(me.is_alive());
        let other = ProcessIdentity { start_time_ticks: me.start_time_ticks + 1, ..me };
        assert!(!other.is_alive());
    }

    #[test]
    fn the_sandbox_lock_is_exclusive_and_released_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let held = try_lock_sandbox(dir.path()).unwrap().expect("free at first");
        assert!(try_lock_sandbox(dir.path()).unwrap().is_none(), "a second open cannot take it");
        drop(held);
        assert!(try_lock_sandbox(dir.path()).unwrap().is_some(), "free again once closed");
    }

    #[test]
    fn records_are_never_read_or_written_through_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere.json");
        let usage = Usage { cpu_usage_ns: 1, ..Usage::default() };
        write_json_atomic(&elsewhere, &usage).unwrap();
        assert_eq!(fs::metadata(&elsewhere).unwrap().permissions().mode() & 0o777, RECORD_MODE);
        let link = dir.path().join("exit.json");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let e = read_json::<Usage>(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // A link planted where the temporary file goes is replaced, not followed.
        let planted = dir.path().join(format!("kill.json.tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&elsewhere, &planted).unwrap();
        write_json_atomic(&dir.path().join("kill.json"), &Usage::default()).unwrap();
        assert_eq!(read_json::<Usage>(&elsewhere).unwrap(), Some(usage), "the link's target is untouched");
    }

    #[test]
    fn atomic_json_round_trips_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        assert!(read_json::<Usage>(&path).unwrap().is_none());
        let usage = Usage { cpu_usage_ns: 1, mem_peak_bytes: 2, throttled_ns: 3, nr_throttled: 4, mem_bytes: 5 };
        write_json_atomic(&path, &usage).unwrap();
        assert_eq!(read_json::<Usage>(&path).unwrap(), Some(usage));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn records_from_before_the_log_and_memory_fields_still_read() {
        let usage: Usage =
            serde_json::from_str(r#"{"cpu_usage_ns":1,"mem_peak_bytes":2,"throttled_ns":3,"nr_throttled":4}"#).unwrap();
        assert_eq!(usage.mem_bytes, 0);
        let spec: LaunchSpec = serde_json::from_str(
            r#"{"task_id":"00000000000000ab","command":"true","user":"nobody","env":[],"cpus_milli":0,
                "mem_bytes":0,"pids_max":null,"kill_grace_ms":0}"#,
        )
        .unwrap();
        assert_eq!((spec.log_max_bytes, spec.log_keep), (0, 0));
        assert_eq!(spec.log_max_bytes_effective(), DEFAULT_LOG_MAX_BYTES);
        assert_eq!(spec.log_keep_effective(), DEFAULT_LOG_KEEP);
        assert_eq!(spec.sandbox_gid, None, "a spec of the previous sandbox layout");
        let spec = LaunchSpec { log_max_bytes: 5, log_keep: 1000, ..spec };
        assert_eq!((spec.log_max_bytes_effective(), spec.log_keep_effective()), (5, MAX_LOG_KEEP));
    }
}
