//! The master's core: the in-memory state, and the one writer that logs commands to the store
//! before they are applied and acknowledged (group commit: one durable write per batch).
//!
//! Order of work for a batch: take the state's write lock; apply each command (a refused one
//! changes nothing and is answered at once); append the accepted ones to the store in one call;
//! release the lock; answer; wake whoever waits on what changed. If the store write fails, the
//! in-memory state is rebuilt from the store, so nothing unacknowledged stays visible, and every
//! command of the batch is answered with an error.

use crate::metrics::Metrics;
use capstan_model::{AgentId, Timestamp};
use capstan_state::{
    decode_command, decode_snapshot, encode_command, encode_snapshot, Applied, ClusterState, Command, Rejection,
    Stamped,
};
use capstan_store::{LogEntry, Snapshot, Store};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Notify};

/// Commands waiting for the writer; callers wait when it is full (back-pressure).
pub const COMMAND_QUEUE_MAX: usize = 4096;
/// Commands applied and written in one batch at most.
pub const BATCH_MAX: usize = 512;
/// Log entries after which the writer installs a snapshot and the store drops the log before it.
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("the store could not write: {0}; nothing was changed")]
    Store(String),
    #[error("this master's term is over (it stepped down, or it is stopping); nothing was changed")]
    Closed,
}

struct Request {
    command: Command,
    reply: oneshot::Sender<Result<Applied, CoreError>>,
}

/// What the writer thread takes: a command, or a whole state to install (a restore).
// Commands are nearly all of the traffic: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Work {
    Command(Request),
    Restore(Restore),
}

/// Install `state` in place of the current one; refused when the cluster has jobs, unless `force`.
struct Restore {
    state: Box<ClusterState>,
    force: bool,
    reply: oneshot::Sender<Result<u64, CoreError>>,
}

pub struct Core {
    pub state: RwLock<ClusterState>,
    /// `None` once the term is over ([`Core::close`]): the writer ends when the last sender goes.
    queue: Mutex<Option<mpsc::Sender<Work>>>,
    /// Woken when tasks may have become placeable.
    pub pending_changed: Notify,
    agent_notify: Mutex<HashMap<AgentId, Arc<Notify>>>,
    /// The epoch of this leadership term (`Command::BeginTerm`): orders versions are only
    /// comparable within one term, and agents ignore a master whose epoch is older than one they
    /// have seen.
    pub epoch: u64,
    pub metrics: Arc<Metrics>,
    /// After a failed store write: reload the state from the store and go on (the embedded
    /// store), or end the term so that a new one loads it (etcd: the write's outcome may be
    /// unknown, or this master may have lost its leadership).
    reload_on_store_failure: bool,
    /// The term is over: nothing more is written or answered from this core.
    closed: AtomicBool,
    /// Why the term must end (a failed write, a restore); the leadership loop waits on `term_over`.
    end_reason: Mutex<Option<String>>,
    pub term_over: Notify,
    /// How far this term's kills of large jobs got (`crate::reaper`).
    pub kills: crate::reaper::Kills,
}

pub fn now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
    )
}

/// Rebuilds the state from the store: newest snapshot, then every later command.
pub fn load_state(store: &dyn Store) -> anyhow::Result<ClusterState> {
    let started = Instant::now();
    let state = replay(store)?;
    tracing::info!(
        jobs = state.jobs.len(),
        tasks = state.tasks.len(),
        agents = state.agents.len(),
        index = state.index,
        epoch = state.epoch,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "state loaded from {}",
        store.describe()
    );
    Ok(state)
}

fn replay(store: &dyn Store) -> anyhow::Result<ClusterState> {
    let loaded = store.load()?;
    let mut state = match &loaded.snapshot {
        Some(s) => {
            let mut state = decode_snapshot(&s.data).map_err(|e| anyhow::anyhow!("{} ({})", e, store.describe()))?;
            state.index = s.index;
            state
        }
        None => ClusterState::default(),
    };
    for entry in &loaded.entries {
        apply_entry(&mut state, entry, store)?;
    }
    Ok(state)
}

/// Applies one logged command to `state` as a replay does (the next entry of the log, or an
/// error naming it).
pub fn apply_entry(state: &mut ClusterState, entry: &LogEntry, store: &dyn Store) -> anyhow::Result<()> {
    if entry.index != state.index + 1 {
        anyhow::bail!(
            "log entry {} follows index {} ({}): the log has a gap",
            entry.index,
            state.index,
            store.describe()
        );
    }
    let stamped = decode_command(&entry.data)
        .map_err(|e| anyhow::anyhow!("log entry {}: {e} ({})", entry.index, store.describe()))?;
    if let Err(e) = state.apply(&stamped) {
        anyhow::bail!(
            "log entry {} ({}) was accepted when it was written but is refused on replay ({e}); \
             the log and this version of Capstan disagree, refusing to start",
            entry.index,
            stamped.command.name()
        );
    }
    state.index = entry.index;
    Ok(())
}

impl Core {
    /// Starts the writer thread of a term with `epoch` (see [`Core::next_epoch`]) over `state`
    /// (as [`load_state`] read it); the caller's first command is `BeginTerm { epoch }`.
    pub fn start(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        state: ClusterState,
        epoch: u64,
        reload_on_store_failure: bool,
    ) -> Arc<Core> {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE_MAX);
        let core = Arc::new(Core {
            state: RwLock::new(state),
            queue: Mutex::new(Some(tx)),
            pending_changed: Notify::new(),
            agent_notify: Mutex::new(HashMap::new()),
            epoch,
            metrics,
            reload_on_store_failure,
            closed: AtomicBool::new(false),
            end_reason: Mutex::new(None),
            term_over: Notify::new(),
            kills: Default::default(),
        });
        let writer = core.clone();
        std::thread::Builder::new()
            .name("capstan-writer".into())
            .spawn(move || writer.run_writer(store, rx))
            .expect("spawning the writer thread");
        core
    }

    /// The epoch of a new term over `state`: now, or one more than the last term's when the
    /// clock is behind it, so that epochs only grow.
    pub fn next_epoch(state: &ClusterState) -> u64 {
        now().0.max(state.epoch + 1)
    }

    /// Submits a command and waits until it is durable and applied (or refused).
    pub async fn submit(&self, command: Command) -> Result<Applied, CoreError> {
        let Some(queue) = self.queue.lock().clone() else {
            return Err(CoreError::Closed);
        };
        let (reply, rx) = oneshot::channel();
        self.metrics.command_queue.inc();
        let sent = queue.send(Work::Command(Request { command, reply })).await;
        drop(queue);
        if sent.is_err() {
            self.metrics.command_queue.dec();
            return Err(CoreError::Closed);
        }
        rx.await.unwrap_or(Err(CoreError::Closed))
    }

    /// Replaces the whole state with `state` (validated by the caller): the writer installs it in
    /// the store as a snapshot at the index after the last one, then in memory. Returns that index.
    /// A cluster with jobs is only replaced with `force` (checked by the writer, so no job created
    /// meanwhile is lost unnoticed); on any refusal or failure nothing changes.
    pub async fn restore(&self, state: ClusterState, force: bool) -> Result<u64, CoreError> {
        let (reply, rx) = oneshot::channel();
        let work = Work::Restore(Restore { state: Box::new(state), force, reply });
        let Some(queue) = self.queue.lock().clone() else {
            return Err(CoreError::Closed);
        };
        queue.send(work).await.map_err(|_| CoreError::Closed)?;
        rx.await.unwrap_or(Err(CoreError::Closed))
    }

    /// Asks for a new leadership term: the state is loaded again from the store, agents get a
    /// re-registration period and a new epoch (after a restore, for instance).
    pub fn request_new_term(&self, reason: &str) {
        tracing::info!("a new term is requested: {reason}");
        self.end_term(reason.to_string());
    }

    /// Marks the term over (the first reason wins) and wakes the leadership loop and every agent
    /// waiting for its orders (they find the core closed and go to the next leader).
    fn end_term(&self, reason: String) {
        self.end_reason.lock().get_or_insert(reason);
        self.closed.store(true, Ordering::SeqCst);
        self.term_over.notify_waiters();
        self.term_over.notify_one();
        for n in self.agent_notify.lock().values() {
            n.notify_waiters();
        }
    }

    /// Why the term ended, once it has.
    pub fn end_reason(&self) -> Option<String> {
        self.end_reason.lock().clone()
    }

    /// The term is over: answer nothing more from this core.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Ends the term: new submissions are refused, the writer ends once the queued ones are
    /// answered, and waiting agents are woken (they find the core closed).
    pub fn close(&self, reason: &str) {
        self.end_term(reason.to_string());
        self.queue.lock().take();
        self.pending_changed.notify_one();
    }

    /// The notifier of one agent's orders.
    pub fn agent_notify(&self, agent: AgentId) -> Arc<Notify> {
        self.agent_notify.lock().entry(agent).or_default().clone()
    }

    fn run_writer(self: Arc<Core>, store: Arc<dyn Store>, mut rx: mpsc::Receiver<Work>) {
        let mut since_snapshot: u64 = 0;
        let snapshotting = Arc::new(AtomicBool::new(false));
        // A restore that ended the previous batch waits here for its turn.
        let mut next: Option<Work> = None;
        while let Some(work) = next.take().or_else(|| rx.blocking_recv()) {
            let first = match work {
                Work::Command(r) if self.is_closed() => {
                    self.metrics.command_queue.dec();
                    let _ = r.reply.send(Err(CoreError::Closed));
                    continue;
                }
                Work::Restore(r) if self.is_closed() => {
                    let _ = r.reply.send(Err(CoreError::Closed));
                    continue;
                }
                Work::Command(r) => r,
                Work::Restore(r) => {
                    self.install_restore(store.as_ref(), r);
                    continue;
                }
            };
            let mut batch = vec![first];
            while batch.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(Work::Command(r)) => batch.push(r),
                    Ok(restore) => {
                        next = Some(restore);
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.metrics.command_queue.dec_by(batch.len() as i64);
            let mut replies = Vec::with_capacity(batch.len());
            let mut entries = Vec::with_capacity(batch.len());
            let mut state = self.state.write();
            let at = now();
            for req in batch {
                let stamped = Stamped { at, command: req.command };
                match state.apply(&stamped) {
                    Ok(applied) => {
                        state.index += 1;
                        entries.push(LogEntry { index: state.index, data: encode_command(&stamped) });
                        replies.push((req.reply, Ok(applied)));
                    }
                    Err(rejection) => {
                        let _ = req.reply.send(Err(CoreError::Rejected(rejection)));
                    }
                }
            }
            if entries.is_empty() {
                continue;
            }
            let write_started = Instant::now();
            let written = store.append(&entries);
            self.metrics.store_write_seconds.observe(write_started.elapsed().as_secs_f64());
            if let Err(e) = written {
                let message = e.to_string();
                if !self.reload_on_store_failure {
                    // The state holds commands that may not be durable: nobody reads it again.
                    self.end_term(format!("a store write failed: {message}"));
                    drop(state);
                    tracing::error!("store append failed: {message}; this term ends and a new one loads the store");
                    for (reply, _) in replies {
                        let _ = reply.send(Err(CoreError::Store(message.clone())));
                    }
                    while let Ok(work) = rx.try_recv() {
                        match work {
                            Work::Command(req) => {
                                self.metrics.command_queue.dec();
                                let _ = req.reply.send(Err(CoreError::Store(message.clone())));
                            }
                            Work::Restore(r) => {
                                let _ = r.reply.send(Err(CoreError::Store(message.clone())));
                            }
                        }
                    }
                    rx.close();
                    continue;
                }
                tracing::error!("store append failed: {e}; reloading state from the store");
                // Orders versions are derived and restart at 0 on reload; keep them above what
                // agents have already seen so their waits do not stall.
                let floor = state.agents.values().map(|a| a.orders_version).max().unwrap_or(0) + 1;
                match load_state(store.as_ref()) {
                    Ok(reloaded) => {
                        *state = reloaded;
                        for a in state.agents.values_mut() {
                            a.orders_version = floor;
                        }
                    }
                    Err(e) => {
                        tracing::error!("cannot reload state after a failed write: {e:#}; stopping the master");
                        std::process::exit(70);
                    }
                }
                drop(state);
                for (reply, _) in replies {
                    let _ = reply.send(Err(CoreError::Store(message.clone())));
                }
                continue;
            }
            since_snapshot += entries.len() as u64;
            // The snapshot is encoded under the lock (a consistent state at one index) and written
            // by its own thread, so neither the API nor the next batch waits for the disk. One at
            // a time; the log keeps everything until a snapshot is installed.
            if since_snapshot >= SNAPSHOT_EVERY_ENTRIES && !snapshotting.load(Ordering::Acquire) {
                since_snapshot = 0;
                let snapshot = Snapshot { index: state.index, data: encode_snapshot(&state) };
                snapshotting.store(true, Ordering::Release);
                let (store, flag) = (store.clone(), snapshotting.clone());
                let spawned = std::thread::Builder::new().name("capstan-snapshot".into()).spawn(move || {
                    let started = Instant::now();
                    match store.install_snapshot(&snapshot) {
                        Ok(()) => tracing::info!(
                            index = snapshot.index,
                            bytes = snapshot.data.len(),
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "snapshot installed"
                        ),
                        Err(e) => tracing::warn!("snapshot failed (the log keeps everything): {e}"),
                    }
                    flag.store(false, Ordering::Release);
                });
                if let Err(e) = spawned {
                    tracing::warn!("cannot start the snapshot thread: {e}");
                    snapshotting.store(false, Ordering::Release);
                }
            }
            drop(state);
            let mut wake_scheduler = false;
            let mut touched = std::collections::BTreeSet::new();
            for (reply, result) in replies {
                if let Ok(applied) = &result {
                    wake_scheduler |= applied.new_pending || !applied.agents_touched.is_empty();
                    touched.extend(applied.agents_touched.iter().copied());
                }
                let _ = reply.send(result);
            }
            if wake_scheduler {
                self.pending_changed.notify_one();
            }
            let notifiers = self.agent_notify.lock();
            for agent in touched {
                if let Some(n) = notifiers.get(&agent) {
                    n.notify_waiters();
                }
            }
        }
    }

    /// The writer's part of a restore: the store first, then memory. Only this thread appends
    /// to the store or changes the state, so the store's last index and the jobs checked here
    /// cannot change before the install; the write lock is held only to swap the state.
    fn install_restore(&self, store: &dyn Store, r: Restore) {
        let jobs = self.state.read().jobs.len();
        if !r.force && jobs > 0 {
            let _ = r.reply.send(Err(CoreError::Rejected(Rejection::Conflict(format!(
                "the cluster has {jobs} job(s) and a restore replaces the whole state; \
                 restore with --force to replace them; nothing was changed"
            )))));
            return;
        }
        let mut restored = *r.state;
        // Epochs only grow, whatever the backup's age: agents ignore older ones.
        restored.epoch = restored.epoch.max(self.state.read().epoch);
        let installed = store.last_index().and_then(|last| {
            restored.index = last + 1;
            store.install_snapshot(&Snapshot { index: restored.index, data: encode_snapshot(&restored) })
        });
        if let Err(e) = installed {
            tracing::error!("restore: {} could not install the state: {e}; nothing was changed", store.describe());
            let _ = r.reply.send(Err(CoreError::Store(e.to_string())));
            return;
        }
        let index = restored.index;
        {
            let mut state = self.state.write();
            // As after a reload: orders versions stay above what agents have seen.
            let floor = state.agents.values().map(|a| a.orders_version).max().unwrap_or(0) + 1;
            for a in restored.agents.values_mut() {
                a.orders_version = floor;
            }
            *state = restored;
        }
        tracing::info!(index, "restore: the state from the backup is installed in {}", store.describe());
        let _ = r.reply.send(Ok(index));
        self.pending_changed.notify_one();
        for n in self.agent_notify.lock().values() {
            n.notify_waiters();
        }
    }

    /// Waits for `timeout`, until a command changed anything for this agent, or until the term
    /// ends (also when it ended before the wait began: a long poll on a past term would hold the
    /// agent away from the new leader for its whole timeout).
    pub async fn wait_agent(&self, agent: AgentId, timeout: Duration, is_ready: impl Fn(&ClusterState) -> bool) {
        let notify = self.agent_notify(agent);
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_closed() || is_ready(&self.state.read()) {
            return;
        }
        let _ = tokio::time::timeout(timeout, notified).await;
    }
}
