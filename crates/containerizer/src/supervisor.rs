//! The per-task supervisor process (`capstan supervise SANDBOX`): starts the task in its cgroup as
//! its user, reaps, enforces stops, and records the end in `exit.json`.
//!
//! Single-threaded on purpose (it forks): no tokio, no threads. Signals are blocked and taken with
//! `sigtimedwait`, so there are no signal handlers.
//!
//! Protocol with a live agent: the supervisor's stdout is a pipe to the agent; it writes one line
//! `started PID` once the task runs (after `task.json` is on disk) and `exited` after `exit.json`
//! is on disk. The files are the truth; the lines only wake the agent. Write errors (agent gone)
//! are ignored.

use crate::cgroups::{CgroupLimits, Hierarchies, TaskCgroup};
use crate::records::{
    now_ms, read_json, write_json_atomic, ExitRecord, KillRequest, LaunchSpec, ProcessIdentity, SupervisorConfig,
    Usage, EXIT_FILE, KILL_FILE, LAUNCH_FILE, STDERR_FILE, STDOUT_FILE, SUPERVISOR_CONFIG_FILE, SUPERVISOR_FILE,
    TASK_FILE,
};
use capstan_model::TaskExit;
use nix::sys::signal::{self, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{self, ForkResult, Gid, Pid, Uid, User};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long to wait for a cgroup to empty after SIGKILL before giving up on it.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound of one `sigtimedwait`: the loop re-checks its children at least this often.
const IDLE_WAKEUP: Duration = Duration::from_secs(5);
/// `by` of [`TaskExit::Killed`] when nobody wrote `kill.json`.
const DEFAULT_KILLED_BY: &str = "stop requested (SIGTERM to the supervisor)";

/// Runs the supervisor for `sandbox` (which holds `launch.json`) and returns the process exit
/// code. Call it from a fresh process before any thread is started.
pub fn supervise_main(sandbox: &Path) -> i32 {
    // Descriptors the launcher leaked without CLOEXEC (a test harness, a jobserver) must not
    // reach the task or keep the launcher's pipes open: keep only stdin, stdout and stderr.
    // SAFETY: nothing in this process owns a descriptor above 2 yet.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    // Own session: a signal to the agent's process group or session never reaches the task.
    let _ = unistd::setsid(); // EPERM when the launcher already made us a session leader.
                              // SAFETY: plain prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    // SAFETY: setting dispositions to SIG_IGN installs no handler code.
    unsafe {
        let _ = signal::signal(Signal::SIGPIPE, SigHandler::SigIgn);
        let _ = signal::signal(Signal::SIGHUP, SigHandler::SigIgn);
    }
    let mask = handled_signals();
    if let Err(e) = mask.thread_block() {
        eprintln!("capstan supervisor: cannot block signals: {e}");
        return 1;
    }

    let me = match ProcessIdentity::of(std::process::id()) {
        Ok(me) => me,
        Err(e) => {
            eprintln!("capstan supervisor: cannot read my own /proc entry: {e}");
            return 1;
        }
    };
    if let Err(e) = write_json_atomic(&sandbox.join(SUPERVISOR_FILE), &me) {
        eprintln!("capstan supervisor: cannot write {SUPERVISOR_FILE}: {e}");
        return 1;
    }

    let mut cgroup = None;
    let record = match start_task(sandbox, &mut cgroup) {
        Err(message) => {
            eprintln!("capstan supervisor: launch failed: {message}");
            ExitRecord { exit: TaskExit::LaunchFailed { message }, usage: Usage::default(), ended_at_ms: now_ms() }
        }
        Ok((task, spec)) => {
            notify(&format!("started {task}"));
            let cgroup = cgroup.as_ref().expect("a started task has a cgroup");
            watch(Pid::from_raw(task as i32), &spec, cgroup, sandbox, &mask)
        }
    };
    if let Some(cgroup) = &cgroup {
        if !cgroup.kill_all(KILL_TIMEOUT, &mut || {
            while let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) = waitpid(None, Some(WaitPidFlag::WNOHANG))
            {
            }
        }) {
            eprintln!("capstan supervisor: cgroup {} did not empty", cgroup.rel.display());
        }
        if let Err(e) = cgroup.remove() {
            eprintln!("capstan supervisor: {e}");
        }
    }
    if let Err(e) = write_json_atomic(&sandbox.join(EXIT_FILE), &record) {
        eprintln!("capstan supervisor: cannot write {EXIT_FILE}: {e}");
        return 1;
    }
    notify("exited");
    0
}

fn handled_signals() -> SigSet {
    let mut mask = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        mask.add(s);
    }
    mask
}

/// One line to the agent, if it still listens.
fn notify(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{line}\n").as_bytes());
    let _ = out.flush();
}

/// Everything the forked child needs, prepared before the fork.
struct ChildPlan {
    argv: Vec<CString>,
    envp: Vec<CString>,
    sandbox: CString,
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
    stdout: File,
    stderr: File,
    devnull: File,
}

/// Resolves the user, prepares files, forks, places the child in its cgroup and lets it exec.
/// Returns the task pid, or the reason it could not start.
fn start_task(sandbox: &Path, cgroup_slot: &mut Option<TaskCgroup>) -> Result<(u32, LaunchSpec), String> {
    let spec: LaunchSpec = read_json(&sandbox.join(LAUNCH_FILE))
        .map_err(|e| format!("reading {LAUNCH_FILE}: {e}"))?
        .ok_or_else(|| format!("{LAUNCH_FILE} is missing in {}", sandbox.display()))?;
    let config: SupervisorConfig = read_json(&sandbox.join(SUPERVISOR_CONFIG_FILE))
        .map_err(|e| format!("reading {SUPERVISOR_CONFIG_FILE}: {e}"))?
        .ok_or_else(|| format!("{SUPERVISOR_CONFIG_FILE} is missing in {}", sandbox.display()))?;
    let plan = plan_child(sandbox, &spec, &config)?;

    let hierarchies = Hierarchies::discover()?;
    let cgroup = hierarchies.task_cgroup(&config.cgroup_root, spec.task_id);
    let limits = CgroupLimits::new(spec.cpus_milli, spec.mem_bytes, spec.pids_max);

    let (go_read, go_write) = unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let (err_read, err_write) = unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: this process is single-threaded (see the module header), so the child may run
    // arbitrary code until exec.
    let child = match unsafe { unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop((go_write, err_read));
            exec_child(&plan, go_read, err_write)
        }
        ForkResult::Parent { child } => child,
    };
    drop((go_read, err_write));
    *cgroup_slot = Some(cgroup.clone());

    let fail = |message: String| {
        let _ = signal::kill(child, Signal::SIGKILL);
        let _ = waitpid(child, None);
        Err(message)
    };
    if let Err(e) = cgroup.setup(child.as_raw() as u32, &limits) {
        return fail(format!("cgroup setup failed: {e}"));
    }
    if let Err(e) = unistd::write(&go_write, b"g") {
        return fail(format!("cannot release the task process: {e}"));
    }
    drop(go_write);
    // The error pipe closes on a successful exec (CLOEXEC); anything written is the reason.
    let mut reason = String::new();
    let _ = File::from(err_read).read_to_string(&mut reason);
    if !reason.is_empty() {
        return fail(reason);
    }

    let pid = child.as_raw() as u32;
    match ProcessIdentity::of(pid) {
        Ok(identity) => {
            if let Err(e) = write_json_atomic(&sandbox.join(TASK_FILE), &identity) {
                eprintln!("capstan supervisor: cannot write {TASK_FILE}: {e}");
            }
        }
        // Already exited (and a zombie at most): still a started task; the wait loop records it.
        Err(e) => eprintln!("capstan supervisor: task {pid} vanished before {TASK_FILE}: {e}"),
    }
    Ok((pid, spec))
}

fn plan_child(sandbox: &Path, spec: &LaunchSpec, config: &SupervisorConfig) -> Result<ChildPlan, String> {
    let user = User::from_name(&spec.user)
        .map_err(|e| format!("looking up user `{}`: {e}", spec.user))?
        .ok_or_else(|| format!("user `{}` does not exist on this host", spec.user))?;
    if user.uid.is_root() && !config.allow_root {
        return Err(format!(
            "refusing to run the task as `{}` (uid 0): root tasks are not allowed on this agent",
            spec.user
        ));
    }
    let name = CString::new(spec.user.as_bytes()).map_err(|_| "user name contains NUL".to_owned())?;
    let groups =
        unistd::getgrouplist(&name, user.gid).map_err(|e| format!("supplementary groups of `{}`: {e}", spec.user))?;

    let open_output = |file: &str| -> Result<File, String> {
        let path = sandbox.join(file);
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        unistd::fchown(&f, Some(user.uid), Some(user.gid)).map_err(|e| format!("chown {}: {e}", path.display()))?;
        Ok(f)
    };
    let stdout = open_output(STDOUT_FILE)?;
    let stderr = open_output(STDERR_FILE)?;
    let devnull = File::open("/dev/null").map_err(|e| format!("opening /dev/null: {e}"))?;

    let cstring = |s: String| CString::new(s).map_err(|_| "command or environment contains NUL".to_owned());
    let argv = vec![cstring("/bin/sh".into())?, cstring("-c".into())?, cstring(spec.command.clone())?];
    let sandbox_str = sandbox.to_string_lossy().into_owned();
    let mut env: Vec<(String, String)> =
        spec.env.iter().filter(|(k, _)| !matches!(k.as_str(), "HOME" | "USER" | "LOGNAME")).cloned().collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()));
    }
    env.push(("HOME".into(), sandbox_str.clone()));
    env.push(("USER".into(), spec.user.clone()));
    env.push(("LOGNAME".into(), spec.user.clone()));
    let envp = env.into_iter().map(|(k, v)| cstring(format!("{k}={v}"))).collect::<Result<_, _>>()?;

    Ok(ChildPlan {
        argv,
        envp,
        sandbox: CString::new(sandbox.as_os_str().as_bytes()).map_err(|_| "sandbox path contains NUL")?,
        uid: user.uid,
        gid: user.gid,
        groups,
        stdout,
        stderr,
        devnull,
    })
}

/// In the forked child: wait to be placed in the cgroup, then set up and exec. Never returns.
fn exec_child(plan: &ChildPlan, go: OwnedFd, err: OwnedFd) -> ! {
    let fail = |what: &str, e: nix::Error| -> ! {
        let _ = unistd::write(&err, format!("{what}: {e}").as_bytes());
        // SAFETY: _exit skips the parent's atexit handlers and buffered streams, as a fork child must.
        unsafe { libc::_exit(127) }
    };
    let mut byte = [0u8; 1];
    match unistd::read(&go, &mut byte) {
        Ok(1) => {}
        // The supervisor gave up (cgroup failure) and will kill us.
        _ => unsafe { libc::_exit(127) },
    }
    if let Err(e) = unistd::setsid() {
        fail("setsid", e);
    }
    if let Err(e) = SigSet::empty().thread_set_mask() {
        fail("resetting the signal mask", e);
    }
    // Ignored dispositions survive exec; the task gets the defaults.
    for s in [Signal::SIGPIPE, Signal::SIGHUP] {
        // SAFETY: SIG_DFL installs no handler code.
        if let Err(e) = unsafe { signal::signal(s, SigHandler::SigDfl) } {
            fail("resetting signal dispositions", e);
        }
    }
    for (from, to) in [(&plan.devnull, 0), (&plan.stdout, 1), (&plan.stderr, 2)] {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        if unsafe { libc::dup2(from.as_raw_fd(), to) } < 0 {
            fail("redirecting standard streams", nix::Error::last());
        }
    }
    if let Err(e) = unistd::chdir(plan.sandbox.as_c_str()) {
        fail("chdir to the sandbox", e);
    }
    // Privileges go in this order; any failure ends the launch, never a fallback to root.
    if let Err(e) = unistd::setgroups(&plan.groups) {
        fail("setgroups", e);
    }
    if let Err(e) = unistd::setgid(plan.gid) {
        fail("setgid", e);
    }
    if let Err(e) = unistd::setuid(plan.uid) {
        fail("setuid", e);
    }
    if unistd::getuid() != plan.uid || unistd::geteuid() != plan.uid {
        fail("dropping privileges", nix::Error::EPERM);
    }
    let Err(e) = unistd::execve(&plan.argv[0], &plan.argv, &plan.envp);
    fail("exec /bin/sh", e)
}

/// Reaps every exited child without blocking (we are their subreaper) and keeps the main
/// process's status. Returns false once there are no children left.
fn reap(task: Pid, status: &mut Option<WaitStatus>) -> bool {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return true,
            Err(nix::Error::ECHILD) => return false,
            Ok(st @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _))) if pid == task => {
                *status = Some(st)
            }
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(e) => {
                eprintln!("capstan supervisor: waitpid: {e}");
                return true;
            }
        }
    }
}

/// Waits for the task's main process, handling stop requests, then gathers the evidence.
fn watch(task: Pid, spec: &LaunchSpec, cgroup: &TaskCgroup, sandbox: &Path, mask: &SigSet) -> ExitRecord {
    let mut status: Option<WaitStatus> = None;
    let mut killed_by: Option<StopCause> = None;
    let mut hard_kill_at: Option<Instant> = None;
    loop {
        let has_children = reap(task, &mut status);
        if status.is_some() || !has_children {
            break;
        }
        let now = Instant::now();
        if let Some(at) = hard_kill_at {
            if now >= at {
                let _ = signal::killpg(task, Signal::SIGKILL);
                cgroup.kill_all(KILL_TIMEOUT, &mut || {
                    reap(task, &mut status);
                });
                hard_kill_at = None;
                continue;
            }
        }
        let timeout = hard_kill_at.map_or(IDLE_WAKEUP, |at| at.saturating_duration_since(now));
        match wait_signal(mask, timeout) {
            Some(libc::SIGTERM | libc::SIGINT) if killed_by.is_none() => {
                let request = read_json::<KillRequest>(&sandbox.join(KILL_FILE)).ok().flatten();
                killed_by = Some(match request {
                    Some(KillRequest { exit: Some(exit), .. }) => StopCause::Because(exit),
                    Some(KillRequest { by, exit: None }) => StopCause::By(by),
                    None => StopCause::By(DEFAULT_KILLED_BY.to_owned()),
                });
                let _ = signal::killpg(task, Signal::SIGTERM);
                let _ = signal::killpg(task, Signal::SIGCONT);
                hard_kill_at = Some(Instant::now() + Duration::from_millis(spec.kill_grace_ms));
            }
            _ => {}
        }
    }
    // The main process is gone: whatever it left behind goes too, before the evidence is read.
    let _ = signal::killpg(task, Signal::SIGKILL);
    cgroup.kill_all(KILL_TIMEOUT, &mut || {
        reap(task, &mut status);
    });
    let evidence = cgroup.evidence();
    let exit = decide_exit(status, killed_by, evidence.oom_kills, spec.mem_bytes);
    ExitRecord { exit, usage: evidence.usage, ended_at_ms: now_ms() }
}

/// Why a stop was requested.
enum StopCause {
    /// Someone asked (`TaskExit::Killed { by }`).
    By(String),
    /// The agent stopped it for a reason that is the task's end (over disk, failed health check).
    Because(TaskExit),
}

/// A requested stop wins; then an OOM kill explains any unsuccessful end; then the status.
fn decide_exit(status: Option<WaitStatus>, killed_by: Option<StopCause>, oom_kills: u64, mem_bytes: u64) -> TaskExit {
    let by_status = match status {
        Some(WaitStatus::Exited(_, code)) => TaskExit::Exited { code },
        Some(WaitStatus::Signaled(_, signal, _)) => TaskExit::Signaled { signal: signal as i32 },
        other => TaskExit::SupervisorLost { message: format!("the task's exit status was lost ({other:?})") },
    };
    match killed_by {
        Some(StopCause::By(by)) => TaskExit::Killed { by },
        Some(StopCause::Because(exit)) => exit,
        None if oom_kills > 0 && !by_status.is_success() => TaskExit::OutOfMemory { limit_bytes: mem_bytes },
        None => by_status,
    }
}

/// `sigtimedwait` for the blocked signals; `None` on timeout or interruption.
fn wait_signal(mask: &SigSet, timeout: Duration) -> Option<i32> {
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: valid sigset and timespec pointers; a null siginfo is allowed.
    let signal = unsafe { libc::sigtimedwait(mask.as_ref(), std::ptr::null_mut(), &ts) };
    (signal > 0).then_some(signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons_are_decided_in_order() {
        let pid = Pid::from_raw(1);
        let killed = decide_exit(
            Some(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(StopCause::By("user".into())),
            1,
            10,
        );
        assert_eq!(killed, TaskExit::Killed { by: "user".into() });
        let oom = decide_exit(Some(WaitStatus::Signaled(pid, Signal::SIGKILL, false)), None, 1, 10);
        assert_eq!(oom, TaskExit::OutOfMemory { limit_bytes: 10 });
        let oom_child_but_success = decide_exit(Some(WaitStatus::Exited(pid, 0)), None, 1, 10);
        assert_eq!(oom_child_but_success, TaskExit::Exited { code: 0 });
        assert_eq!(decide_exit(Some(WaitStatus::Exited(pid, 3)), None, 0, 10), TaskExit::Exited { code: 3 });
    }
}
