//! Command health checks: runs `/bin/sh -c COMMAND` as the task's user in its sandbox and in its
//! cgroup, with a timeout, and says in words how it went. The agent's health checker (`capstan-agent`'s
//! `health` module) calls [`run_command_check`]; it lives here because this crate is the only
//! place in Capstan that spawns processes.
//!
//! The command runs in its own process group with stdin on `/dev/null` and stdout/stderr captured
//! (the first [`OUTPUT_KEPT_BYTES`] bytes of each are kept for the message). Its environment is
//! exactly the given one plus a default `PATH` and `HOME` (the working directory), `USER` and
//! `LOGNAME`, as for the task itself. Privileges are dropped in the child with setgroups → setgid
//! → setuid, each checked; a failure means the command does not run, never that it runs as root.
//! Root (uid 0) is refused unless `allow_root`. When the agent itself is not root and the user is
//! the agent's own user, there is nothing to drop and the command runs as is.
//!
//! **Limits.** Before it drops privileges, the child joins the task's own cgroup in every
//! hierarchy the task is in (each v1 controller's directory, or the one v2 directory), by writing
//! `0` (this process) to each `cgroup.procs`. So the check's memory, processes and CPU count
//! against the task's limits (a check that allocates past the task's memory limit is OOM-killed
//! like the task would be), and the check dies with the task: the supervisor's cgroup kill at
//! the task's end catches whatever a check left behind, `setsid -f` children included. A check
//! that cannot join (the task ended, its cgroup is gone) does not run: it never runs unconfined.
//!
//! Whatever the outcome, the whole process group gets SIGKILL once the shell has exited or the
//! timeout passed; the shell is always reaped. The shell is a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`, kept across exec), so a descendant that left the group with
//! `setsid` is re-parented to it and stays its descendant while it lives: on a timeout, every
//! descendant found in the task's cgroup is killed before the shell is. If the future is
//! dropped (the checker was stopped) the group is killed too, and tokio reaps the shell.

use nix::sys::signal::{killpg, Signal};
use nix::unistd::{Gid, Pid, Uid, User};
use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// How many bytes of stdout and of stderr are kept for [`CheckOutcome::detail`].
pub const OUTPUT_KEPT_BYTES: usize = 512;

/// How long to wait for the output pipes to close once the process group is dead (a process
/// that escaped the group with `setsid` may hold them open).
const OUTPUT_DRAIN: Duration = Duration::from_millis(200);

/// Rounds of "find the shell's descendants in the cgroup, SIGKILL them" on a timeout; a round
/// finds the processes forked while the previous one killed (they are re-parented to the shell).
const DESCENDANT_KILL_ROUNDS_MAX: usize = 16;

/// Parent links followed from a process up to the shell before giving up (deeper trees are
/// caught by the cgroup kill at the task's end).
const ANCESTRY_DEPTH_MAX: usize = 64;

/// How a command check went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckOutcome {
    /// True when the command ran and exited with status 0.
    pub ok: bool,
    /// In words, always starting with `command `: `command exited with code 0`, `command exited
    /// with code 1: <first line of stderr (or stdout)>`, `command was killed by SIGSEGV`,
    /// `command timed out after 2s`, `command not run: user "x" does not exist on this host`.
    pub detail: String,
}

impl CheckOutcome {
    fn failed(detail: String) -> Self {
        CheckOutcome { ok: false, detail }
    }
}

/// Who the command runs as.
struct Identity {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
    /// False when the agent already is this (non-root) user.
    drop_privileges: bool,
}

/// Runs `/bin/sh -c command` as `user` in `cwd` with exactly `env` (see the module doc), inside
/// the cgroup directories `cgroup` (the task's: [`crate::TaskCgroup::dirs`]), waits at most
/// `timeout`, and reports whether it exited with 0. Never panics and never returns an error:
/// every problem (unknown user, root refused, cgroup gone, spawn failure, timeout) is a failed
/// outcome. `cgroup` empty means no cgroup to join: only tests that have no task pass that; the
/// agent always passes the task's.
pub async fn run_command_check(
    command: &str,
    user: &str,
    cwd: &Path,
    env: &[(String, String)],
    timeout: Duration,
    allow_root: bool,
    cgroup: &[PathBuf],
) -> CheckOutcome {
    let mut identity = match lookup(user, allow_root).await {
        Ok(identity) => identity,
        Err(why) => return CheckOutcome::failed(format!("command not run: {why}")),
    };
    // Only the task's own group enters its sandbox (see crate::sandbox): the check has it as the
    // task does, as its primary group.
    if let Some(gid) = crate::sandbox::task_gid_of_work_dir(cwd).filter(|_| identity.drop_privileges) {
        identity.groups.push(gid);
        identity.gid = gid;
    }
    let Ok(cwd_c) = CString::new(cwd.as_os_str().as_bytes()) else {
        return CheckOutcome::failed("command not run: the sandbox path contains NUL".into());
    };
    let join = match cgroup_procs_files(cgroup) {
        Ok(join) => join,
        Err(why) => return CheckOutcome::failed(format!("command not run: {why}")),
    };

    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .env_clear()
        .envs(env.iter().filter(|(k, _)| !matches!(k.as_str(), "HOME" | "USER" | "LOGNAME")).cloned())
        .env("HOME", cwd)
        .env("USER", user)
        .env("LOGNAME", user)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if !env.iter().any(|(k, _)| k == "PATH") {
        cmd.env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    }
    let Identity { uid, gid, groups, drop_privileges } = identity;
    let groups: Vec<libc::gid_t> = groups.iter().map(|g| g.as_raw()).collect();
    // SAFETY: the closure only makes raw syscalls (open, write, close, prctl, setgroups, setgid,
    // setuid, getuid, geteuid, getgid, chdir) on data prepared before the fork; it allocates
    // nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            // First, while still root: into the task's cgroup, or not at all.
            for file in &join {
                join_cgroup(file)?;
            }
            // Orphans of the check are re-parented to the shell (see the module doc).
            if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if drop_privileges {
                // In this order, each checked: a failure aborts the spawn, never a fallback to root.
                if libc::setgroups(groups.len() as _, groups.as_ptr()) != 0
                    || libc::setgid(gid.as_raw()) != 0
                    || libc::setuid(uid.as_raw()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getuid() != uid.as_raw() || libc::geteuid() != uid.as_raw() || libc::getgid() != gid.as_raw() {
                    return Err(std::io::Error::from_raw_os_error(libc::EPERM));
                }
            }
            // After the drop, so the user must be able to enter the directory.
            if libc::chdir(cwd_c.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return CheckOutcome::failed(format!("command not run as \"{user}\" in {}: {e}", cwd.display())),
    };
    let Some(pid) = child.id() else {
        return CheckOutcome::failed("command not run: the shell vanished at once".into());
    };
    // The shell leads its own group: its pid is the group id while it is unreaped.
    let mut group = GroupGuard { pgid: Pid::from_raw(pid as i32), armed: true };
    let stdout = child.stdout.take().map(|s| tokio::spawn(read_capped(s)));
    let stderr = child.stderr.take().map(|s| tokio::spawn(read_capped(s)));

    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => {
            // Reaped: anything it left in its group goes now.
            group.kill();
            group.armed = false;
            status
        }
        Err(_) => {
            // The shell still lives, so whatever it started is still its descendant.
            kill_descendants(pid as i32, cgroup);
            group.kill();
            let _ = child.wait().await;
            group.armed = false;
            abort(stdout);
            abort(stderr);
            return CheckOutcome::failed(format!("command timed out after {}", format_duration(timeout)));
        }
    };
    let stdout = collect(stdout).await;
    let stderr = collect(stderr).await;
    let status = match status {
        Ok(status) => status,
        Err(e) => return CheckOutcome::failed(format!("command status unknown: waiting for the shell: {e}")),
    };
    let output = first_line(&stderr).or_else(|| first_line(&stdout));
    let with_output = |what: String| match &output {
        Some(line) => format!("{what}: {line}"),
        None => what,
    };
    match (status.code(), status.signal()) {
        (Some(code), _) => {
            CheckOutcome { ok: code == 0, detail: with_output(format!("command exited with code {code}")) }
        }
        (None, Some(signal)) => {
            let name = Signal::try_from(signal).map(|s| s.as_str().to_owned()).unwrap_or_else(|_| signal.to_string());
            CheckOutcome::failed(with_output(format!("command was killed by {name}")))
        }
        (None, None) => CheckOutcome::failed(format!("command ended with {status}")),
    }
}

/// The `cgroup.procs` file of every directory of the task's cgroup that exists (a v1 hierarchy
/// the task's cgroup was not created in has none), as C strings for the child. Err when `dirs`
/// names directories but none exists: the task's cgroup is gone.
fn cgroup_procs_files(dirs: &[PathBuf]) -> Result<Vec<CString>, String> {
    let existing: Vec<&PathBuf> = dirs.iter().filter(|d| d.is_dir()).collect();
    if existing.is_empty() && !dirs.is_empty() {
        return Err(format!(
            "the task's cgroup ({}) is gone: the task has ended",
            dirs.first().map(|d| d.display().to_string()).unwrap_or_default()
        ));
    }
    existing
        .into_iter()
        .map(|d| {
            CString::new(d.join("cgroup.procs").as_os_str().as_bytes())
                .map_err(|_| format!("the cgroup path {} contains NUL", d.display()))
        })
        .collect()
}

/// Moves the calling process into the cgroup of `procs_file` (`cgroup.procs`); writing `0`
/// means "the writer", on v1 and v2 alike. Runs in the forked child: raw syscalls only.
fn join_cgroup(procs_file: &CString) -> std::io::Result<()> {
    // SAFETY: a NUL-terminated path; the descriptor is ours and closed on every path.
    unsafe {
        let fd = libc::open(procs_file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        if written != 1 {
            return Err(error);
        }
    }
    Ok(())
}

/// SIGKILLs every process in the cgroup directories `cgroup` that descends from `shell` (not
/// the shell itself), in rounds until a round finds none (at most
/// [`DESCENDANT_KILL_ROUNDS_MAX`]).
fn kill_descendants(shell: i32, cgroup: &[PathBuf]) {
    for _ in 0..DESCENDANT_KILL_ROUNDS_MAX {
        let found = descendants_in(shell, cgroup);
        if found.is_empty() {
            return;
        }
        for pid in found {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// The processes in `cgroup` whose chain of parents reaches `ancestor`.
fn descendants_in(ancestor: i32, cgroup: &[PathBuf]) -> Vec<i32> {
    let mut members: Vec<i32> = cgroup
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<i32>>())
        .collect();
    members.sort_unstable();
    members.dedup();
    let parents: HashMap<i32, i32> = members.iter().filter_map(|&p| parent_of(p).map(|pp| (p, pp))).collect();
    members
        .into_iter()
        .filter(|&pid| {
            let mut at = pid;
            for _ in 0..ANCESTRY_DEPTH_MAX {
                let parent = match parents.get(&at) {
                    Some(&parent) => parent,
                    // Not in the cgroup (the shell is, but its parent, the agent, is not).
                    None => match parent_of(at) {
                        Some(parent) => parent,
                        None => return false,
                    },
                };
                if parent == ancestor {
                    return pid != ancestor;
                }
                if parent <= 1 {
                    return false;
                }
                at = parent;
            }
            false
        })
        .collect()
}

/// The parent pid of `pid` from `/proc/PID/stat` (the field after the `)` that ends the name).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Looks up `user` (NSS may block, so on the blocking pool) and decides whether to drop.
async fn lookup(user: &str, allow_root: bool) -> Result<Identity, String> {
    let name = user.to_owned();
    let found = tokio::task::spawn_blocking(move || -> Result<(User, Vec<Gid>), String> {
        let user = User::from_name(&name)
            .map_err(|e| format!("looking up user \"{name}\": {e}"))?
            .ok_or_else(|| format!("user \"{name}\" does not exist on this host"))?;
        let c_name = CString::new(name.as_bytes()).map_err(|_| "the user name contains NUL".to_owned())?;
        let groups = nix::unistd::getgrouplist(&c_name, user.gid)
            .map_err(|e| format!("supplementary groups of \"{name}\": {e}"))?;
        Ok((user, groups))
    })
    .await
    .map_err(|e| format!("looking up user \"{user}\": {e}"))??;
    let (found, groups) = found;
    if found.uid.is_root() && !allow_root {
        return Err(format!("refusing to run it as \"{user}\" (uid 0): root tasks are not allowed on this agent"));
    }
    let me = nix::unistd::geteuid();
    let drop_privileges = me.is_root() || me != found.uid;
    Ok(Identity { uid: found.uid, gid: found.gid, groups, drop_privileges })
}

/// Kills the command's process group with SIGKILL when dropped while armed (the check was
/// stopped mid-way). Disarmed once the shell is reaped, after which its pid may be reused.
struct GroupGuard {
    pgid: Pid,
    armed: bool,
}

impl GroupGuard {
    fn kill(&self) {
        // ESRCH: the group is already empty.
        let _ = killpg(self.pgid, Signal::SIGKILL);
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.kill();
        }
    }
}

/// Reads a pipe to its end, keeping the first [`OUTPUT_KEPT_BYTES`] bytes (reading on, so a
/// chatty command never blocks on a full pipe).
async fn read_capped(mut pipe: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = OUTPUT_KEPT_BYTES.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

async fn collect(reader: Option<tokio::task::JoinHandle<Vec<u8>>>) -> Vec<u8> {
    let Some(mut reader) = reader else { return Vec::new() };
    match tokio::time::timeout(OUTPUT_DRAIN, &mut reader).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => Vec::new(),
        Err(_) => {
            reader.abort();
            Vec::new()
        }
    }
}

fn abort(reader: Option<tokio::task::JoinHandle<Vec<u8>>>) {
    if let Some(reader) = reader {
        reader.abort();
    }
}

/// The first non-empty line, trimmed, lossily decoded.
fn first_line(bytes: &[u8]) -> Option<String> {
    String::from_utf8_lossy(bytes).lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_owned)
}

/// `2s`, `1500ms`: whole seconds when exact.
fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn first_line_skips_blank_lines() {
        assert_eq!(first_line(b"\n\n  oops: it broke  \nmore"), Some("oops: it broke".into()));
        assert_eq!(first_line(b" \n"), None);
    }
}
