//! The agent's side: launching supervisors, finding them again after a restart, waiting for and
//! stopping tasks.

use crate::cgroups::{CgroupMode, Hierarchies, TaskCgroup};
use crate::records::{
    now_ms, read_json, try_lock_sandbox, write_json_atomic, ExitRecord, KillRequest, LaunchSpec, ProcessIdentity,
    SupervisorConfig, Usage, EXIT_FILE, KILL_FILE, LAUNCH_FILE, LOCK_FILE, SUPERVISOR_CONFIG_FILE, SUPERVISOR_FILE,
    SUPERVISOR_LOG_FILE, TASK_FILE,
};
use crate::sandbox::{self, GidsExhausted, SANDBOX_GID_FIRST, SANDBOX_GID_LAST, WORK_DIR};
use capstan_model::{TaskExit, TaskId};
use nix::unistd::User;
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::pipe;

/// How often a handle without a pipe (after `attach`) looks for `task.json`.
const START_POLL: Duration = Duration::from_millis(20);
/// How long the agent waits for leftover processes to die when it cleans up after a lost supervisor.
const LOST_KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent waits for a supervisor that holds the sandbox's lock to record itself in
/// `supervisor.json` (it does so right after taking the lock).
const RECORD_WAIT: Duration = Duration::from_secs(5);

/// How the containerizer places and supervises tasks.
#[derive(Clone, Debug)]
pub struct ContainerizerConfig {
    /// Relative cgroup path under which each task gets `<root>/<task_id>` (in every hierarchy).
    pub cgroup_root: String,
    /// Refuse user "root" / uid 0 unless true.
    pub allow_root: bool,
    /// Program and leading arguments of the supervisor; the sandbox path is appended.
    pub supervisor_cmd: Vec<OsString>,
}

impl Default for ContainerizerConfig {
    /// `capstan` root, no root tasks, and `[current_exe, "supervise"]`.
    fn default() -> Self {
        let exe = std::env::current_exe().map(PathBuf::into_os_string).unwrap_or_else(|_| "capstan".into());
        ContainerizerConfig {
            cgroup_root: "capstan".into(),
            allow_root: false,
            supervisor_cmd: vec![exe, "supervise".into()],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerizerError {
    #[error("{0}")]
    Cgroups(String),
    #[error("invalid containerizer config: {0}")]
    Config(String),
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("refusing to run a task as `{user}` (uid 0): set allow_root to permit root tasks")]
    RootRefused { user: String },
    #[error("sandbox {0} was already used by a launch")]
    SandboxInUse(PathBuf),
    #[error("{0} holds no {LAUNCH_FILE}: nothing to relaunch")]
    NotLaunched(PathBuf),
    #[error(
        "user `{user}` cannot reach its sandbox {sandbox}: {blocker} is mode {mode:o} and not open to it; \
         give the agent a --data-dir that task users can traverse (e.g. /var/lib/capstan/agent), or chmod o+x {blocker}"
    )]
    SandboxUnreachable { user: String, sandbox: PathBuf, blocker: PathBuf, mode: u32 },
    #[error("{0}")]
    GidsExhausted(GidsExhausted),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{0} holds no {LAUNCH_FILE}: nothing was launched there")]
    NotLaunched(PathBuf),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LaunchError {
    let what = what.into();
    move |source| LaunchError::Io { what, source }
}

/// Launches and re-attaches task supervisors.
#[derive(Clone, Debug)]
pub struct Containerizer {
    config: ContainerizerConfig,
    hierarchies: Hierarchies,
    /// Held from choosing a sandbox's group id until the sandbox directory has it, so that two
    /// launches of this agent never choose the same one.
    allocating: std::sync::Arc<std::sync::Mutex<()>>,
}

/// What `attach` found.
// Returned once per sandbox and matched at once; boxing the handle would only cost callers.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Attached {
    Running(TaskHandle),
    Exited(ExitRecord),
    /// `launch.json` is there but no supervisor ever ran the task, and none is starting: the
    /// launching agent died before (or while) it spawned the supervisor. Nothing ran and no end is
    /// recorded; [`Containerizer::relaunch`] starts it.
    NotStarted,
}

impl Containerizer {
    /// Detects the cgroup layout (see [`Containerizer::mode`]) and checks the config.
    pub fn new(config: ContainerizerConfig) -> Result<Self, ContainerizerError> {
        let root = Path::new(&config.cgroup_root);
        if config.cgroup_root.is_empty()
            || root.is_absolute()
            || root.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(ContainerizerError::Config(format!(
                "cgroup_root `{}` must be a relative path without `..`",
                config.cgroup_root
            )));
        }
        if config.supervisor_cmd.is_empty() {
            return Err(ContainerizerError::Config("supervisor_cmd is empty".into()));
        }
        let hierarchies = Hierarchies::discover().map_err(ContainerizerError::Cgroups)?;
        Ok(Containerizer { config, hierarchies, allocating: Default::default() })
    }

    /// Legacy (v1), Hybrid (v1 used; an empty v2 tree exists) or Unified (v2).
    pub fn mode(&self) -> CgroupMode {
        self.hierarchies.mode
    }

    /// Where a task's cgroup lives (it exists only while the task runs).
    pub fn task_cgroup(&self, task_id: TaskId) -> TaskCgroup {
        self.hierarchies.task_cgroup(&self.config.cgroup_root, task_id)
    }

    /// Current usage of a running task's cgroup (zeroes when it is gone).
    pub fn read_usage(&self, task_id: TaskId) -> Usage {
        self.task_cgroup(task_id).usage()
    }

    /// Lays out the sandbox (see [`crate::sandbox`]: root's, entered only by a group id chosen
    /// here for this task), writes `launch.json` (with that group id) and starts the supervisor
    /// in its own session. Returns without waiting for the task; an unknown user or a cgroup
    /// failure arrives later as `TaskExit::LaunchFailed` (see [`TaskHandle::started`]).
    pub fn launch(&self, sandbox: &Path, spec: &LaunchSpec) -> Result<TaskHandle, LaunchError> {
        let user = self.check_user(spec)?;
        if let Some(parent) = sandbox.parent() {
            fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
        }
        if sandbox.join(SUPERVISOR_FILE).exists() || sandbox.join(EXIT_FILE).exists() {
            return Err(LaunchError::SandboxInUse(sandbox.to_path_buf()));
        }
        if let Some(user) = &user {
            check_reachable(sandbox, user)?;
        }
        let sandbox_gid = self.prepare_sandbox(sandbox, user.as_ref())?;
        let spec = LaunchSpec { sandbox_gid, ..spec.clone() };
        // The config first: a sandbox with launch.json always has it (see `relaunch`).
        self.write_supervisor_config(sandbox)?;
        write_json_atomic(&sandbox.join(LAUNCH_FILE), &spec).map_err(io_err(format!("writing {LAUNCH_FILE}")))?;
        // An agent that dies from here until the supervisor has recorded itself leaves a sandbox
        // that `attach` finds `NotStarted` (or running, if the supervisor got that far).
        self.spawn_supervisor(sandbox, spec.task_id)
    }

    /// Starts a supervisor for the `launch.json` already in `sandbox`: the launch of a task that
    /// [`Containerizer::attach`] found [`Attached::NotStarted`]. It neither rewrites the sandbox
    /// nor refuses a used one: the supervisor itself runs nothing if another one holds the
    /// sandbox or the task's end is recorded, and the handle then follows that one (or returns
    /// the record).
    pub fn relaunch(&self, sandbox: &Path) -> Result<TaskHandle, LaunchError> {
        let spec: LaunchSpec = read_json(&sandbox.join(LAUNCH_FILE))
            .map_err(io_err(format!("reading {}", sandbox.join(LAUNCH_FILE).display())))?
            .ok_or_else(|| LaunchError::NotLaunched(sandbox.to_path_buf()))?;
        let user = self.check_user(&spec)?;
        // Written before launch.json by this version; a sandbox of an older one may lack it.
        if !sandbox.join(SUPERVISOR_CONFIG_FILE).exists() {
            self.write_supervisor_config(sandbox)?;
        }
        if !sandbox::has_current_layout(sandbox) {
            // Launched by an agent of the previous sandbox layout, and nothing ran: lay it out
            // as this version does (the directory becomes root's before anything is made in it).
            let sandbox_gid = self.prepare_sandbox(sandbox, user.as_ref())?;
            let work = sandbox.join(WORK_DIR).display().to_string();
            let old = sandbox.display().to_string();
            let mut spec = LaunchSpec { sandbox_gid, ..spec.clone() };
            for (k, v) in &mut spec.env {
                if k == "CAPSTAN_SANDBOX" && *v == old {
                    v.clone_from(&work);
                }
            }
            write_json_atomic(&sandbox.join(LAUNCH_FILE), &spec).map_err(io_err(format!("rewriting {LAUNCH_FILE}")))?;
        }
        self.spawn_supervisor(sandbox, spec.task_id)
    }

    /// Chooses the sandbox's group id (when the agent is root and the user exists) and lays the
    /// sandbox out (see [`crate::sandbox`]); returns the group id.
    fn prepare_sandbox(&self, sandbox: &Path, user: Option<&User>) -> Result<Option<u32>, LaunchError> {
        let preparing = io_err(format!("preparing sandbox {}", sandbox.display()));
        let owner = user.map(|u| (u.uid, u.gid));
        if !nix::unistd::geteuid().is_root() || user.is_none() {
            return sandbox::prepare(sandbox, owner, None).map(|()| None).map_err(preparing);
        }
        let _one_at_a_time = self.allocating.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let gid = match sandbox::allocate_gid(sandbox, &(SANDBOX_GID_FIRST..=SANDBOX_GID_LAST)) {
            Ok(gid) => gid,
            Err(e) => {
                return Err(match e.into_inner().map(|inner| inner.downcast::<GidsExhausted>()) {
                    Some(Ok(exhausted)) => LaunchError::GidsExhausted(*exhausted),
                    Some(Err(other)) => LaunchError::Io {
                        what: format!("choosing a group id for {}", sandbox.display()),
                        source: io::Error::other(other),
                    },
                    None => LaunchError::Io {
                        what: format!("choosing a group id for {}", sandbox.display()),
                        source: io::Error::other("unknown error"),
                    },
                });
            }
        };
        sandbox::prepare(sandbox, owner, Some(nix::unistd::Gid::from_raw(gid))).map_err(preparing)?;
        Ok(Some(gid))
    }

    /// The task's user, if it exists; refuses root unless allowed.
    fn check_user(&self, spec: &LaunchSpec) -> Result<Option<User>, LaunchError> {
        let user = User::from_name(&spec.user).ok().flatten();
        let is_root = spec.user == "root" || user.as_ref().is_some_and(|u| u.uid.is_root());
        if is_root && !self.config.allow_root {
            return Err(LaunchError::RootRefused { user: spec.user.clone() });
        }
        Ok(user)
    }

    fn write_supervisor_config(&self, sandbox: &Path) -> Result<(), LaunchError> {
        let supervisor_config =
            SupervisorConfig { cgroup_root: self.config.cgroup_root.clone(), allow_root: self.config.allow_root };
        write_json_atomic(&sandbox.join(SUPERVISOR_CONFIG_FILE), &supervisor_config)
            .map_err(io_err(format!("writing {SUPERVISOR_CONFIG_FILE}")))
    }

    /// Starts the supervisor of `sandbox` in its own session, its stdout a pipe to the handle.
    fn spawn_supervisor(&self, sandbox: &Path, task_id: TaskId) -> Result<TaskHandle, LaunchError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(sandbox.join(SUPERVISOR_LOG_FILE))
            .map_err(io_err(format!("opening {SUPERVISOR_LOG_FILE}")))?;
        let (events_read, events_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| LaunchError::Io { what: "pipe".into(), source: e.into() })?;
        let mut command = Command::new(&self.config.supervisor_cmd[0]);
        command
            .args(&self.config.supervisor_cmd[1..])
            .arg(sandbox)
            .current_dir(sandbox)
            .stdin(Stdio::null())
            .stdout(Stdio::from(events_write))
            .stderr(Stdio::from(log));
        // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid()?;
                Ok(())
            });
        }
        let child = command.spawn().map_err(io_err(format!("spawning supervisor {:?}", self.config.supervisor_cmd)))?;
        drop(command); // closes our copy of the pipe's write end
        let pid = child.id();
        // Our own unreaped child: the pid cannot be reused before we read its start time.
        let identity = ProcessIdentity::of(pid).map_err(io_err(format!("reading /proc/{pid}/stat")))?;
        let pidfd = pidfd_open(pid).map_err(io_err(format!("pidfd_open({pid})")))?;
        Ok(TaskHandle::new(sandbox, identity, pidfd, true, Some(events_read), self.task_cgroup(task_id)))
    }

    /// Finds the supervisor of `sandbox` again (after an agent restart): by pid and start time
    /// from `supervisor.json`, then held by a pidfd. A supervisor that vanished without writing
    /// `exit.json` yields `TaskExit::SupervisorLost`, after killing what is left in its cgroup.
    ///
    /// No `supervisor.json` yet: if nobody holds the sandbox's lock, no supervisor lives and none
    /// ever ran the task ([`Attached::NotStarted`]). If one holds it, a supervisor is starting:
    /// waits (up to 5 s) for it to record itself; if the lock is released without a record, it
    /// is `NotStarted` after all; if it is still held, the launch is given up as lost (the
    /// supervisor runs nothing once `exit.json` exists).
    pub fn attach(&self, sandbox: &Path) -> Result<Attached, AttachError> {
        let read_err = |file: &str| {
            let what = format!("reading {}", sandbox.join(file).display());
            move |source| AttachError::Io { what, source }
        };
        let spec: LaunchSpec = read_json(&sandbox.join(LAUNCH_FILE))
            .map_err(read_err(LAUNCH_FILE))?
            .ok_or_else(|| AttachError::NotLaunched(sandbox.to_path_buf()))?;
        let cgroup = self.task_cgroup(spec.task_id);
        let deadline = Instant::now() + RECORD_WAIT;
        loop {
            if let Some(record) = read_json(&sandbox.join(EXIT_FILE)).map_err(read_err(EXIT_FILE))? {
                return Ok(Attached::Exited(record));
            }
            let recorded: Option<ProcessIdentity> =
                read_json(&sandbox.join(SUPERVISOR_FILE)).map_err(read_err(SUPERVISOR_FILE))?;
            if let Some((identity, pidfd)) = recorded.and_then(hold_if_alive) {
                let is_child = parent_pid(identity.pid) == Some(std::process::id());
                return Ok(Attached::Running(TaskHandle::new(sandbox, identity, pidfd, is_child, None, cgroup)));
            }
            let lock = try_lock_sandbox(sandbox).map_err(read_err(LOCK_FILE))?;
            if lock.is_none() {
                // A supervisor holds the sandbox and has not recorded itself (yet).
                if Instant::now() >= deadline {
                    let message = format!(
                        "a supervisor holds {LOCK_FILE} but did not record itself within {RECORD_WAIT:?}; \
                         launch given up"
                    );
                    return Ok(Attached::Exited(supervisor_lost(sandbox, &cgroup, message)));
                }
                std::thread::sleep(START_POLL);
                continue;
            }
            drop(lock);
            // No supervisor lives. One may have come and gone between the reads above and the
            // lock: then look again.
            let exited = sandbox.join(EXIT_FILE).exists();
            let recorded_now: Option<ProcessIdentity> =
                read_json(&sandbox.join(SUPERVISOR_FILE)).map_err(read_err(SUPERVISOR_FILE))?;
            if exited || recorded_now != recorded {
                continue;
            }
            return Ok(match recorded {
                Some(identity) => Attached::Exited(supervisor_lost(
                    sandbox,
                    &cgroup,
                    format!("supervisor pid {} is gone and left no exit record", identity.pid),
                )),
                None => Attached::NotStarted,
            });
        }
    }
}

/// A pidfd of the process `identity`, if it is alive.
fn hold_if_alive(identity: ProcessIdentity) -> Option<(ProcessIdentity, OwnedFd)> {
    let pidfd = pidfd_open(identity.pid).ok()?;
    // Checked after the pidfd is held: if it matches now, the pidfd is that process.
    identity.is_alive().then_some((identity, pidfd))
}

/// Kills whatever is left of the task, removes its cgroup and records `SupervisorLost` — unless
/// the supervisor's own record appeared meanwhile, which then wins.
fn supervisor_lost(sandbox: &Path, cgroup: &TaskCgroup, message: String) -> ExitRecord {
    if let Ok(Some(record)) = read_json::<ExitRecord>(&sandbox.join(EXIT_FILE)) {
        return record;
    }
    let left = cgroup.procs();
    let emptied = cgroup.kill_all(LOST_KILL_TIMEOUT, &mut || {});
    let usage = cgroup.evidence().usage;
    if emptied {
        let _ = cgroup.remove();
    }
    let message =
        if left.is_empty() { message } else { format!("{message}; killed {} leftover task process(es)", left.len()) };
    let record = ExitRecord { exit: TaskExit::SupervisorLost { message }, usage, ended_at_ms: now_ms() };
    if emptied {
        if let Err(e) = sandbox::release_gid(sandbox) {
            tracing::warn!(sandbox = %sandbox.display(), "cannot give the sandbox back to group root: {e}");
        }
    }
    if let Err(e) = write_json_atomic(&sandbox.join(EXIT_FILE), &record) {
        tracing::warn!(sandbox = %sandbox.display(), "cannot write {EXIT_FILE}: {e}");
    }
    record
}

/// The agent's hold on one supervisor. `Send`; move it into a tokio task and call
/// [`TaskHandle::started`] then [`TaskHandle::wait`].
#[derive(Debug)]
pub struct TaskHandle {
    sandbox: PathBuf,
    supervisor: ProcessIdentity,
    pidfd: OwnedFd,
    /// The supervisor is our child: reap it (in `wait`, or by a thread on drop).
    is_child: bool,
    reaped: bool,
    exit_watch: Option<AsyncFd<OwnedFd>>,
    events: Events,
    task_pid: Option<u32>,
    cgroup: TaskCgroup,
    record: Option<ExitRecord>,
}

#[derive(Debug)]
enum Events {
    Raw(OwnedFd),
    Open(BufReader<pipe::Receiver>),
    Closed,
}

impl TaskHandle {
    fn new(
        sandbox: &Path,
        supervisor: ProcessIdentity,
        pidfd: OwnedFd,
        is_child: bool,
        events: Option<OwnedFd>,
        cgroup: TaskCgroup,
    ) -> Self {
        TaskHandle {
            sandbox: sandbox.to_path_buf(),
            supervisor,
            pidfd,
            is_child,
            reaped: false,
            exit_watch: None,
            events: events.map_or(Events::Closed, Events::Raw),
            task_pid: None,
            cgroup,
            record: None,
        }
    }

    pub fn supervisor_pid(&self) -> u32 {
        self.supervisor.pid
    }

    pub fn sandbox(&self) -> &Path {
        &self.sandbox
    }

    /// Current usage of the task's cgroup.
    pub fn usage(&self) -> Usage {
        self.cgroup.usage()
    }

    /// The task's pid once it runs, or the exit record when it never started (or is already
    /// over without having been seen running).
    pub async fn started(&mut self) -> Result<u32, ExitRecord> {
        if let Some(pid) = self.task_pid {
            return Ok(pid);
        }
        // A live launch: the supervisor writes `started PID` or, on failure, `exited`.
        if let Some(line) = self.next_event().await {
            if let Some(pid) = line.strip_prefix("started ").and_then(|p| p.trim().parse().ok()) {
                self.task_pid = Some(pid);
                return Ok(pid);
            }
        }
        // After attach (or if the pipe broke): the files.
        loop {
            if let Ok(Some(task)) = read_json::<ProcessIdentity>(&self.sandbox.join(TASK_FILE)) {
                self.task_pid = Some(task.pid);
                return Ok(task.pid);
            }
            if !self.supervisor.is_alive() || self.sandbox.join(EXIT_FILE).exists() {
                if !self.sandbox.join(EXIT_FILE).exists() && self.adopt_lock_holder().await {
                    continue;
                }
                let record = self.wait().await;
                if let Ok(Some(task)) = read_json::<ProcessIdentity>(&self.sandbox.join(TASK_FILE)) {
                    self.task_pid = Some(task.pid);
                    return Ok(task.pid);
                }
                return Err(record);
            }
            tokio::time::sleep(START_POLL).await;
        }
    }

    /// The next line from the supervisor; `None` when there is no pipe or it closed.
    async fn next_event(&mut self) -> Option<String> {
        if let Events::Raw(_) = self.events {
            let Events::Raw(fd) = std::mem::replace(&mut self.events, Events::Closed) else { unreachable!() };
            match pipe::Receiver::from_owned_fd(fd) {
                Ok(receiver) => self.events = Events::Open(BufReader::new(receiver)),
                Err(e) => tracing::warn!("supervisor pipe unusable: {e}"),
            }
        }
        let Events::Open(reader) = &mut self.events else { return None };
        let mut line = String::new();
        match reader.read_line(&mut line).await {
            Ok(n) if n > 0 => Some(line.trim_end().to_owned()),
            _ => {
                self.events = Events::Closed;
                None
            }
        }
    }

    /// Completes when the supervisor has recorded the end (`exit.json`) and exited. A
    /// supervisor that died without a record yields `SupervisorLost`.
    pub async fn wait(&mut self) -> ExitRecord {
        if let Some(record) = &self.record {
            return record.clone();
        }
        let record = loop {
            self.supervisor_exited().await;
            self.reap();
            match read_json::<ExitRecord>(&self.sandbox.join(EXIT_FILE)) {
                Ok(Some(record)) => break record,
                Ok(None) => {
                    if self.adopt_lock_holder().await {
                        continue;
                    }
                    break supervisor_lost(
                        &self.sandbox,
                        &self.cgroup,
                        format!("supervisor pid {} exited without an exit record", self.supervisor.pid),
                    );
                }
                Err(e) => break supervisor_lost(&self.sandbox, &self.cgroup, format!("unreadable {EXIT_FILE}: {e}")),
            }
        };
        self.record = Some(record.clone());
        record
    }

    /// Reaps our supervisor once it exited (the pidfd is readable, or `is_alive` said so):
    /// does not block. ECHILD if a drop-thread of an earlier handle got there first.
    fn reap(&mut self) {
        if self.is_child && !self.reaped {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.supervisor.pid as i32), None);
            self.reaped = true;
        }
    }

    /// Our supervisor is gone without an exit record. If it lost the sandbox's lock to another
    /// supervisor of the same launch (one that an agent spawned just before it crashed, see
    /// [`Containerizer::relaunch`]), that one runs the task: hold it instead, once it recorded
    /// itself (waiting up to 5 s). True if adopted; false if no supervisor holds the sandbox.
    async fn adopt_lock_holder(&mut self) -> bool {
        self.reap();
        let deadline = Instant::now() + RECORD_WAIT;
        loop {
            let recorded = read_json::<ProcessIdentity>(&self.sandbox.join(SUPERVISOR_FILE)).ok().flatten();
            if let Some((identity, pidfd)) =
                recorded.filter(|identity| *identity != self.supervisor).and_then(hold_if_alive)
            {
                tracing::info!(
                    sandbox = %self.sandbox.display(),
                    "supervisor {} found the sandbox taken; following supervisor {} instead",
                    self.supervisor.pid,
                    identity.pid
                );
                self.is_child = parent_pid(identity.pid) == Some(std::process::id());
                self.reaped = false;
                self.supervisor = identity;
                self.pidfd = pidfd;
                self.exit_watch = None;
                self.events = Events::Closed;
                // A stop asked of the one that gave up would otherwise be lost.
                if self.sandbox.join(KILL_FILE).exists() {
                    if let Err(e) = self.signal(libc::SIGTERM) {
                        tracing::warn!("cannot pass the stop request on to supervisor {}: {e}", identity.pid);
                    }
                }
                return true;
            }
            match try_lock_sandbox(&self.sandbox) {
                Ok(Some(_free)) => return false,
                Ok(None) if Instant::now() < deadline => tokio::time::sleep(START_POLL).await,
                Ok(None) => return false,
                Err(e) => {
                    tracing::warn!(sandbox = %self.sandbox.display(), "cannot probe {LOCK_FILE}: {e}");
                    return false;
                }
            }
        }
    }

    async fn supervisor_exited(&mut self) {
        if self.exit_watch.is_none() {
            let registered = self.pidfd.try_clone().and_then(|fd| {
                // SAFETY: the AsyncFd owns this duplicate, which stays open and unchanged until
                // the AsyncFd is dropped.
                unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)
            });
            match registered {
                Ok(watch) => self.exit_watch = Some(watch),
                Err(e) => {
                    tracing::warn!("cannot watch the supervisor's pidfd ({e}); polling instead");
                    while self.supervisor.is_alive() {
                        tokio::time::sleep(START_POLL).await;
                    }
                    return;
                }
            }
        }
        let watch = self.exit_watch.as_ref().expect("set above");
        // A pidfd becomes readable, for good, when the process exits.
        let _ = watch.readable().await;
    }

    /// Graceful stop: records who asked ("stop requested") and sends SIGTERM to the supervisor,
    /// which signals the task's group, waits `kill_grace_ms` and SIGKILLs the whole cgroup.
    pub fn kill(&self) -> io::Result<()> {
        self.kill_by("stop requested")
    }

    /// [`TaskHandle::kill`] with the reason that ends up in `TaskExit::Killed { by }`.
    pub fn kill_by(&self, by: &str) -> io::Result<()> {
        self.stop(KillRequest { by: by.to_owned(), exit: None })
    }

    /// Graceful stop that records `exit` as the task's end (e.g. `OverDisk`, `HealthCheckFailed`)
    /// instead of `Killed`.
    pub fn kill_because(&self, exit: capstan_model::TaskExit) -> io::Result<()> {
        self.stop(KillRequest { by: exit.to_string(), exit: Some(exit) })
    }

    fn stop(&self, request: KillRequest) -> io::Result<()> {
        if !self.sandbox.join(KILL_FILE).exists() {
            write_json_atomic(&self.sandbox.join(KILL_FILE), &request)?;
        }
        self.signal(libc::SIGTERM)
    }

    /// Sends `signal` to the supervisor (no error if it is gone).
    fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with a pidfd we own; signals exactly that process.
        let rc = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), signal, std::ptr::null::<()>(), 0)
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Drop for TaskHandle {
    /// A dropped handle of a supervisor we spawned must still not leave a zombie: a small thread
    /// waits for it. (The supervisor keeps running; `attach` finds it again.)
    fn drop(&mut self) {
        if self.is_child && !self.reaped {
            let pid = nix::unistd::Pid::from_raw(self.supervisor.pid as i32);
            let spawned = std::thread::Builder::new().name(format!("reap-supervisor-{pid}")).spawn(move || {
                let _ = nix::sys::wait::waitpid(pid, None);
            });
            if let Err(e) = spawned {
                tracing::warn!("cannot start a thread to reap supervisor {pid}: {e}");
            }
        }
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success the kernel returns a new fd that we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn parent_pid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok())
}

/// The task runs as `user` with its sandbox as working directory and `$CAPSTAN_SANDBOX`: every
/// directory above the sandbox must let that user through (execute permission), or the task can
/// start (the supervisor enters the sandbox before it drops privileges) but not use its own path.
fn check_reachable(sandbox: &Path, user: &User) -> Result<(), LaunchError> {
    use std::os::unix::fs::MetadataExt;
    if user.uid.is_root() {
        return Ok(());
    }
    let groups: Vec<u32> = std::ffi::CString::new(user.name.clone())
        .ok()
        .and_then(|name| nix::unistd::getgrouplist(&name, user.gid).ok())
        .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|| vec![user.gid.as_raw()]);
    for dir in sandbox.ancestors().skip(1) {
        let Ok(meta) = fs::metadata(dir) else { continue };
        let mode = meta.mode();
        let allowed = if meta.uid() == user.uid.as_raw() {
            mode & 0o100 != 0
        } else if groups.contains(&meta.gid()) {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !allowed {
            return Err(LaunchError::SandboxUnreachable {
                user: user.name.clone(),
                sandbox: sandbox.to_path_buf(),
                blocker: dir.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
    }
    Ok(())
}
