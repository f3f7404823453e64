//! The per-task supervisor process (`capstan supervise SANDBOX`): starts the task in its cgroup as
//! its user, copies its output into rotated log files, reaps, enforces stops, and records the end
//! in `exit.json`.
//!
//! Single-threaded on purpose (it forks): no tokio, no threads. One `poll` loop waits on a
//! signalfd (SIGCHLD, SIGTERM, SIGINT are blocked and read from it, so there are no signal
//! handlers) and on the task's stdout and stderr pipes, whose bytes go to `stdout` / `stderr` in
//! the sandbox's root-only `logs/` (see [`crate::logs`]; the task never holds the files). When the main process has exited, everything left in the
//! cgroup is killed; then the pipes, whose writers are all gone, are read to EOF, and only then is
//! `exit.json` written — so the task's last words are in the files when the record appears. The
//! pipes give back-pressure: a task that writes faster than the disk takes blocks in `write`
//! until the supervisor catches up, never longer.
//!
//! Protocol with a live agent: the supervisor's stdout is a pipe to the agent; it writes one line
//! `started PID` once the task runs (after `task.json` is on disk) and `exited` after `exit.json`
//! is on disk. The files are the truth; the lines only wake the agent. Write errors (agent gone)
//! are ignored.
//!
//! One supervisor per sandbox: its first action is an exclusive `flock` of `supervisor.lock`
//! (close-on-exec, closed in the task's child before exec), held until it exits. A supervisor
//! that finds the lock taken, or `exit.json` already there, exits at once and runs nothing. So a
//! relaunch after an agent crash (see `Containerizer::relaunch`) cannot run the task twice, even
//! racing a supervisor the crashed agent had just spawned.
//!
//! The task's process (see [`crate::sandbox`] for the layout): a mount namespace of its own, with
//! every mount made private first (nothing propagates to the host), `SANDBOX/work/tmp`
//! bind-mounted on `/tmp` and `/var/tmp`, and a tmpfs of its own on `/dev/shm`; working directory, `$HOME` and `$CAPSTAN_SANDBOX` `SANDBOX/work`;
//! primary group the sandbox's group (from `launch.json`), supplementary groups its user's and
//! that one. Every directory is opened by the supervisor before the fork, without following
//! links, and the child uses the descriptors. When the task has ended, the sandbox's group goes
//! back to root (before `exit.json`), which frees the group id.

use crate::cgroups::{CgroupLimits, Hierarchies, TaskCgroup};
use crate::logs::{LogPump, RotatingLog};
use crate::records::{
    now_ms, read_json, try_lock_sandbox, write_json_atomic, ExitRecord, KillRequest, LaunchSpec, ProcessIdentity,
    SupervisorConfig, Usage, EXIT_FILE, KILL_FILE, LAUNCH_FILE, LOCK_FILE, STDERR_FILE, STDOUT_FILE,
    SUPERVISOR_CONFIG_FILE, SUPERVISOR_FILE, TASK_FILE,
};
use crate::sandbox::{open_dir_at, open_dir_nofollow, release_gid, LOGS_DIR, TMP_DIR, WORK_DIR};
use capstan_model::TaskExit;
use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{self, SigHandler, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{self, ForkResult, Gid, Pid, Uid, User};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long to wait for a cgroup to empty after SIGKILL before giving up on it.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound of one `poll`: the loop re-checks its children at least this often.
const IDLE_WAKEUP: Duration = Duration::from_secs(5);
/// How long the output pipes may stay open after every process of the task's cgroup is gone
/// (only a process outside the cgroup, handed the pipe, could hold them).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes per read from an output pipe.
const PIPE_READ_BYTES: usize = 64 << 10;
/// Reads per pipe per turn of the loop (1 MiB), so that one stream cannot starve the rest.
const READS_PER_TURN: usize = 16;
/// `by` of [`TaskExit::Killed`] when nobody wrote `kill.json`.
const DEFAULT_KILLED_BY: &str = "stop requested (SIGTERM to the supervisor)";
/// Exit code of a supervisor that found the sandbox locked by another one (and ran nothing).
pub const EXIT_SANDBOX_BUSY: i32 = 75;

/// Runs the supervisor for `sandbox` (which holds `launch.json`) and returns the process exit
/// code. Call it from a fresh process before any thread is started.
pub fn supervise_main(sandbox: &Path) -> i32 {
    // Descriptors the launcher leaked without CLOEXEC (a test harness, a jobserver) must not
    // reach the task or keep the launcher's pipes open: keep only stdin, stdout and stderr.
    // SAFETY: nothing in this process owns a descriptor above 2 yet.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    // First: own the sandbox, for the whole life of this process. Another supervisor of the same
    // launch (an agent that crashed while starting one, then relaunched it after its restart)
    // holds it, or ran the task to its end already: then this one runs nothing.
    let lock = match try_lock_sandbox(sandbox) {
        Ok(Some(lock)) => lock,
        Ok(None) => {
            eprintln!("capstan supervisor: another supervisor holds {LOCK_FILE}; it runs the task, not this one");
            return EXIT_SANDBOX_BUSY;
        }
        Err(e) => {
            eprintln!("capstan supervisor: cannot lock {LOCK_FILE}: {e}");
            return 1;
        }
    };
    if sandbox.join(EXIT_FILE).exists() {
        eprintln!("capstan supervisor: {EXIT_FILE} exists: the task's end is recorded already; not running it again");
        return 0;
    }
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
    // Blocked signals stay pending until read here; one that came before this still shows.
    let signals = match SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("capstan supervisor: signalfd: {e}");
            return 1;
        }
    };

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
    // An agent that waited in vain for the record above gave this launch up as lost (and wrote
    // its end): the task must not start after all.
    if sandbox.join(EXIT_FILE).exists() {
        eprintln!("capstan supervisor: {EXIT_FILE} appeared before the task started; not running it");
        return 0;
    }

    let mut cgroup = None;
    let record = match start_task(sandbox, &mut cgroup, lock.as_raw_fd()) {
        Err(message) => {
            eprintln!("capstan supervisor: launch failed: {message}");
            ExitRecord { exit: TaskExit::LaunchFailed { message }, usage: Usage::default(), ended_at_ms: now_ms() }
        }
        Ok((task, spec, mut output)) => {
            notify(&format!("started {task}"));
            let cgroup = cgroup.as_ref().expect("a started task has a cgroup");
            watch(Pid::from_raw(task as i32), &spec, cgroup, sandbox, &signals, &mut output)
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
    // Every process of the task is gone: nobody needs the sandbox's group any more.
    if let Err(e) = release_gid(sandbox) {
        eprintln!("capstan supervisor: cannot give the sandbox back to group root (its group id stays taken): {e}");
    }
    if let Err(e) = write_json_atomic(&sandbox.join(EXIT_FILE), &record) {
        eprintln!("capstan supervisor: cannot write {EXIT_FILE}: {e}");
        return 1;
    }
    notify("exited");
    drop(lock); // only now: exit.json is on disk
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
    /// `SANDBOX/work`, opened without following links: the task's working directory.
    work: OwnedFd,
    /// `SANDBOX/work/tmp`'s path and `(device, inode)`, when the task gets a private `/tmp` (the
    /// agent is root). Opened again by path in the new mount namespace (a descriptor from the
    /// old one cannot be bind-mounted there) and checked to be the same directory.
    private_tmp: Option<PrivateTmp>,
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
    /// Write ends of the output pipes; the parent closes its copies right after the fork.
    stdout: OwnedFd,
    stderr: OwnedFd,
    devnull: File,
}

/// What the child mounts for a private `/tmp`. Each directory is opened again by path in the new
/// mount namespace (a descriptor from the old one cannot be bind-mounted there) and must be the
/// very directory `(device, inode)` the supervisor checked before the fork.
struct PrivateTmp {
    /// `SANDBOX/work/tmp`, mounted on `/tmp`.
    tmp: (CString, (u64, u64)),
    /// `SANDBOX/work`, the working directory (entered again in the new namespace, or its path
    /// would not resolve there).
    work: (CString, (u64, u64)),
    /// The real path of `SANDBOX/work` when it lies under `/tmp` (a data directory in `/tmp`, as
    /// in tests): the work directory is mounted again at that path inside the new `/tmp`, so
    /// that `$CAPSTAN_SANDBOX` and the working directory keep their names.
    work_under_tmp: Option<CString>,
}

/// The task's stdout and stderr, from their pipes into the sandbox's log files.
struct Output {
    pumps: [LogPump; 2],
    buf: Box<[u8]>,
}

impl Output {
    fn any_open(&self) -> bool {
        self.pumps.iter().any(LogPump::is_open)
    }

    /// Moves what the pipes hold now (a bounded amount) into the files.
    fn pump(&mut self) {
        for pump in &mut self.pumps {
            pump.pump(&mut self.buf, READS_PER_TURN);
        }
    }

    /// After every process of the task is gone: reads the pipes to EOF (bounded by `timeout`)
    /// and syncs the files.
    fn drain(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.pump();
            if !self.any_open() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                eprintln!(
                    "capstan supervisor: the task's output pipes are still open {timeout:?} after its processes were \
                     killed (held by a process outside its cgroup?); not waiting any longer"
                );
                break;
            }
            wait_ready(None, self, deadline - now);
        }
        for pump in &self.pumps {
            pump.sync();
        }
    }
}

/// Waits until a signal or task output is ready, or `timeout` passes.
fn wait_ready(signals: Option<&SignalFd>, output: &Output, timeout: Duration) {
    let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(3);
    fds.extend(signals.map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN)));
    fds.extend(output.pumps.iter().filter_map(LogPump::fd).map(|fd| PollFd::new(fd, PollFlags::POLLIN)));
    // Rounded up, so that a deadline less than a millisecond away is not a busy loop.
    let millis = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
    match poll(&mut fds, PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX)) {
        Ok(_) | Err(nix::Error::EINTR) => {}
        Err(e) => {
            eprintln!("capstan supervisor: poll: {e}");
            // Not a busy loop if poll keeps failing; the loop re-checks its children anyway.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Reads every pending signal; true if one of them asks for a stop. (SIGCHLD needs no action:
/// the loop reaps on every turn.)
fn stop_requested(signals: &SignalFd) -> bool {
    let mut stop = false;
    while let Ok(Some(info)) = signals.read_signal() {
        stop |= matches!(info.ssi_signo as i32, libc::SIGTERM | libc::SIGINT);
    }
    stop
}

/// Resolves the user, prepares files, forks, places the child in its cgroup and lets it exec.
/// Returns the task pid, or the reason it could not start. `lock` (the sandbox lock) is closed
/// in the child, so that the task never holds it.
fn start_task(
    sandbox: &Path,
    cgroup_slot: &mut Option<TaskCgroup>,
    lock: RawFd,
) -> Result<(u32, LaunchSpec, Output), String> {
    let spec: LaunchSpec = read_json(&sandbox.join(LAUNCH_FILE))
        .map_err(|e| format!("reading {LAUNCH_FILE}: {e}"))?
        .ok_or_else(|| format!("{LAUNCH_FILE} is missing in {}", sandbox.display()))?;
    let config: SupervisorConfig = read_json(&sandbox.join(SUPERVISOR_CONFIG_FILE))
        .map_err(|e| format!("reading {SUPERVISOR_CONFIG_FILE}: {e}"))?
        .ok_or_else(|| format!("{SUPERVISOR_CONFIG_FILE} is missing in {}", sandbox.display()))?;
    let (plan, output) = plan_child(sandbox, &spec, &config)?;

    let hierarchies = Hierarchies::discover()?;
    let cgroup = hierarchies.task_cgroup(&config.cgroup_root, spec.task_id);
    let limits = CgroupLimits::new(spec.cpus_milli, spec.mem_bytes, spec.pids_max);

    let (go_read, go_write) = unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let (err_read, err_write) = unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: this process is single-threaded (see the module header), so the child may run
    // arbitrary code until exec.
    let child = match unsafe { unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            // Close-on-exec already; closed at once so that not even this child (which may
            // outlive a dead supervisor while it waits on `go`) keeps the lock. Closing a copy
            // does not release the supervisor's lock.
            // SAFETY: a descriptor this child owns a copy of and never uses.
            unsafe { libc::close(lock) };
            drop((go_write, err_read));
            exec_child(&plan, go_read, err_write)
        }
        ForkResult::Parent { child } => child,
    };
    // Our copies of the output pipes' write ends must go, or the pipes never reach EOF.
    drop((go_read, err_write, plan));
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
    Ok((pid, spec, output))
}

fn plan_child(sandbox: &Path, spec: &LaunchSpec, config: &SupervisorConfig) -> Result<(ChildPlan, Output), String> {
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
    let mut groups =
        unistd::getgrouplist(&name, user.gid).map_err(|e| format!("supplementary groups of `{}`: {e}", spec.user))?;
    // The sandbox's group: the task's primary group, and a supplementary one too, so that a
    // set-group-id program it runs still enters its sandbox.
    let gid = match spec.sandbox_gid {
        Some(gid) => {
            groups.push(Gid::from_raw(gid));
            Gid::from_raw(gid)
        }
        None => user.gid,
    };

    let opening = |what: &str| {
        let shown = sandbox.join(what);
        move |e: std::io::Error| {
            format!(
                "opening {}: {e} (a sandbox prepared by this version of the agent has it as a directory)",
                shown.display()
            )
        }
    };
    let sandbox_dir = open_dir_nofollow(sandbox).map_err(opening(""))?;
    let logs = Arc::new(open_dir_at(sandbox_dir.as_fd(), LOGS_DIR).map_err(opening(LOGS_DIR))?);
    let work = open_dir_at(sandbox_dir.as_fd(), WORK_DIR).map_err(opening(WORK_DIR))?;
    let private_tmp = match spec.sandbox_gid {
        Some(_) => {
            let tmp = open_dir_at(work.as_fd(), TMP_DIR).map_err(opening(&format!("{WORK_DIR}/{TMP_DIR}")))?;
            let stat = nix::sys::stat::fstat(&tmp).map_err(|e| format!("stat of {WORK_DIR}/{TMP_DIR}: {e}"))?;
            if stat.st_uid != user.uid.as_raw() {
                return Err(format!(
                    "{} is not the task user's directory (owner uid {}); not mounting it on /tmp",
                    sandbox.join(WORK_DIR).join(TMP_DIR).display(),
                    stat.st_uid
                ));
            }
            let c_path = |p: &Path| {
                CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| "the sandbox's path contains NUL".to_owned())
            };
            let work_path = sandbox.join(WORK_DIR);
            let work_under_tmp = match std::fs::canonicalize(&work_path) {
                Ok(real) if real.starts_with("/tmp") => Some(c_path(&real)?),
                _ => None,
            };
            let work_stat =
                nix::sys::stat::fstat(&work).map_err(|e| format!("stat of {}: {e}", work_path.display()))?;
            Some(PrivateTmp {
                tmp: (c_path(&work_path.join(TMP_DIR))?, (stat.st_dev, stat.st_ino)),
                work: (c_path(&work_path)?, (work_stat.st_dev, work_stat.st_ino)),
                work_under_tmp,
            })
        }
        None => None,
    };

    // Only the supervisor has the files; the task has the write ends of the pipes.
    let logs_path = sandbox.join(LOGS_DIR);
    let output_pipe = |file: &str| -> Result<(LogPump, OwnedFd), String> {
        let log = RotatingLog::open(
            logs.clone(),
            &logs_path,
            file,
            spec.log_max_bytes_effective(),
            spec.log_keep_effective(),
        )
        .map_err(|e| format!("opening {}: {e}", logs_path.join(file).display()))?;
        let (read_end, write_end) =
            unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe for {file}: {e}"))?;
        let pump = LogPump::new(read_end, log).map_err(|e| format!("pipe for {file}: {e}"))?;
        Ok((pump, write_end))
    };
    let (stdout_pump, stdout) = output_pipe(STDOUT_FILE)?;
    let (stderr_pump, stderr) = output_pipe(STDERR_FILE)?;
    let output = Output { pumps: [stdout_pump, stderr_pump], buf: vec![0; PIPE_READ_BYTES].into_boxed_slice() };
    let devnull = File::open("/dev/null").map_err(|e| format!("opening /dev/null: {e}"))?;

    let cstring = |s: String| CString::new(s).map_err(|_| "command or environment contains NUL".to_owned());
    let argv = vec![cstring("/bin/sh".into())?, cstring("-c".into())?, cstring(spec.command.clone())?];
    let home = sandbox.join(WORK_DIR).to_string_lossy().into_owned();
    let mut env: Vec<(String, String)> =
        spec.env.iter().filter(|(k, _)| !matches!(k.as_str(), "HOME" | "USER" | "LOGNAME")).cloned().collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()));
    }
    env.push(("HOME".into(), home));
    env.push(("USER".into(), spec.user.clone()));
    env.push(("LOGNAME".into(), spec.user.clone()));
    let envp = env.into_iter().map(|(k, v)| cstring(format!("{k}={v}"))).collect::<Result<_, _>>()?;

    let plan = ChildPlan { argv, envp, work, private_tmp, uid: user.uid, gid, groups, stdout, stderr, devnull };
    Ok((plan, output))
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
    // dup2 clears close-on-exec on the copies, so the task keeps exactly these three.
    for (from, to) in [(plan.devnull.as_raw_fd(), 0), (plan.stdout.as_raw_fd(), 1), (plan.stderr.as_raw_fd(), 2)] {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        if unsafe { libc::dup2(from, to) } < 0 {
            fail("redirecting standard streams", nix::Error::last());
        }
    }
    let mut work_here = None;
    if let Some(private) = &plan.private_tmp {
        // A mount namespace of its own; private propagation first, so that the bind mount (and
        // anything the task could mount) never reaches the host's namespace.
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS) {
            fail("unshare(CLONE_NEWNS) for a private /tmp", e);
        }
        let none: Option<&str> = None;
        if let Err(e) = nix::mount::mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none) {
            fail("making the task's mounts private", e);
        }
        // Both opened before /tmp is covered: the work directory may lie under it.
        let tmp = open_checked(&private.tmp).unwrap_or_else(|(what, e)| fail(what, e));
        let work = open_checked(&private.work).unwrap_or_else(|(what, e)| fail(what, e));
        if let Err(e) = bind(&tmp, "/tmp") {
            fail("mounting the sandbox's tmp on /tmp", e);
        }
        // The other places every user may write files in: /var/tmp is the same directory, and
        // /dev/shm a tmpfs of the task's own (its pages are charged to the task's memory cgroup).
        if Path::new("/var/tmp").is_dir() {
            if let Err(e) = bind(&tmp, "/var/tmp") {
                fail("mounting the sandbox's tmp on /var/tmp", e);
            }
        }
        if Path::new("/dev/shm").is_dir() {
            let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
            if let Err(e) = nix::mount::mount(Some("tmpfs"), "/dev/shm", Some("tmpfs"), flags, Some("mode=1777")) {
                fail("mounting a private /dev/shm", e);
            }
        }
        if let Some(path) = &private.work_under_tmp {
            // Made by root inside the task's /tmp (so the task cannot remove them while mounted).
            let path = Path::new(std::ffi::OsStr::from_bytes(path.as_bytes()));
            if let Err(e) = std::fs::create_dir_all(path) {
                fail(
                    "making the sandbox's path inside the private /tmp",
                    nix::Error::from_raw(e.raw_os_error().unwrap_or(0)),
                );
            }
            if let Err(e) = bind(&work, path) {
                fail("mounting the sandbox's work directory inside the private /tmp", e);
            }
            // Entered by its path, so that the working directory is the one mounted there.
            if let Err(e) = unistd::chdir(path) {
                fail("chdir to the sandbox's work directory", e);
            }
        } else {
            work_here = Some(work);
        }
    }
    if plan.private_tmp.is_none() || work_here.is_some() {
        if let Err(e) = unistd::fchdir(work_here.as_ref().unwrap_or(&plan.work)) {
            fail("chdir to the sandbox's work directory", e);
        }
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

/// In the child, in its new mount namespace: opens `path` (a directory, not a link) and checks it
/// is the directory `(device, inode)` seen before the fork.
fn open_checked((path, identity): &(CString, (u64, u64))) -> Result<OwnedFd, (&'static str, nix::Error)> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::open(path.as_c_str(), flags, nix::sys::stat::Mode::empty())
        .map_err(|e| ("opening a sandbox directory to mount", e))?;
    match nix::sys::stat::fstat(&fd) {
        Ok(stat) if (stat.st_dev, stat.st_ino) == *identity => Ok(fd),
        Ok(_) => Err(("a sandbox directory changed before it was mounted", nix::Error::EXDEV)),
        Err(e) => Err(("stat of a sandbox directory to mount", e)),
    }
}

/// Bind-mounts the directory held by `source` on `target`.
fn bind(source: &OwnedFd, target: impl AsRef<Path>) -> nix::Result<()> {
    let source = format!("/proc/self/fd/{}", source.as_raw_fd());
    let none: Option<&str> = None;
    nix::mount::mount(Some(source.as_str()), target.as_ref(), none, MsFlags::MS_BIND, none)
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

/// Waits for the task's main process while copying its output and handling stop requests; then
/// kills what is left, drains the output and gathers the evidence.
fn watch(
    task: Pid,
    spec: &LaunchSpec,
    cgroup: &TaskCgroup,
    sandbox: &Path,
    signals: &SignalFd,
    output: &mut Output,
) -> ExitRecord {
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
        wait_ready(Some(signals), output, timeout);
        output.pump();
        // Read the signals first: they are drained even when a stop is already under way.
        if stop_requested(signals) && killed_by.is_none() {
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
    }
    // The main process is gone: whatever it left behind goes too, before the evidence is read.
    let _ = signal::killpg(task, Signal::SIGKILL);
    cgroup.kill_all(KILL_TIMEOUT, &mut || {
        reap(task, &mut status);
    });
    // Every writer is gone now: what the pipes hold is the rest of the output.
    output.drain(DRAIN_TIMEOUT);
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
