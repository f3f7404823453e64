//! A follower's warm copy of the state (etcd): loaded once, then kept up to date by watching the
//! store's log, so that a follower that becomes the leader reads only the few entries it has not
//! seen instead of the whole state — the failover time then does not grow with the cluster.
//!
//! The copy is built by exactly what a load does (`core::apply_entry` on the log's entries after
//! a snapshot), so it equals what `load_state` would read at the same index. Whenever anything is
//! doubtful (a snapshot covering unseen entries, a watch error, a gap), it is thrown away and
//! loaded again; at promotion the new leader catches up with `entries_after`, or loads the store
//! when that fails. A copy is only ever a shortcut to the store's contents, never a source.

use crate::core::{apply_entry, load_state};
use capstan_state::ClusterState;
use capstan_store::{EtcdStore, LogWatchEvent};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the follower's thread waits for log events before it looks whether it must stop.
const POLL: Duration = Duration::from_millis(100);

pub struct Standby {
    copy: Arc<Mutex<Option<ClusterState>>>,
    stop: Arc<AtomicBool>,
    /// The index of the copy (0: none yet), for `GET /v1/leader`.
    pub index: Arc<AtomicU64>,
}

impl Standby {
    /// Starts following the store's log on a thread of its own; `index` shows how far it is.
    pub fn start(store: Arc<EtcdStore>, index: Arc<AtomicU64>) -> Standby {
        let standby = Standby { copy: Arc::new(Mutex::new(None)), stop: Arc::new(AtomicBool::new(false)), index };
        let (copy, stop, index) = (standby.copy.clone(), standby.stop.clone(), standby.index.clone());
        let spawned = std::thread::Builder::new()
            .name("capstan-standby".into())
            .spawn(move || follow(store.as_ref(), &copy, &stop, &index));
        if let Err(e) = spawned {
            tracing::warn!("cannot start the standby thread ({e}); a new leader will load the whole state");
        }
        standby
    }

    /// Stops following and returns the copy, caught up with the store; or the state loaded from
    /// the store when there is no usable copy.
    pub fn take_caught_up(self, store: &EtcdStore) -> anyhow::Result<ClusterState> {
        self.stop.store(true, Ordering::SeqCst);
        let copy = self.copy.lock().take();
        self.index.store(0, Ordering::SeqCst);
        let started = Instant::now();
        if let Some(mut state) = copy {
            let from = state.index;
            match store.entries_after(from).map_err(anyhow::Error::from).and_then(|entries| {
                entries.iter().try_for_each(|e| apply_entry(&mut state, e, store))?;
                Ok(entries.len())
            }) {
                Ok(caught_up) => {
                    tracing::info!(
                        index = state.index,
                        caught_up,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "the state is the standby copy at index {from}, caught up with the log"
                    );
                    return Ok(state);
                }
                Err(e) => tracing::info!("the standby copy cannot be caught up ({e:#}); loading the store"),
            }
        }
        load_state(store)
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Loads, then applies what the watch reports, until told to stop; on any doubt, loads again.
fn follow(store: &EtcdStore, copy: &Mutex<Option<ClusterState>>, stop: &AtomicBool, index: &AtomicU64) {
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Ordering::SeqCst) {
        let state = match load_state(store) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("standby: cannot load the state yet: {e:#}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let from = state.index;
        index.store(from, Ordering::SeqCst);
        *copy.lock() = Some(state);
        let watch = store.watch_log(from);
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            match watch.recv_timeout(POLL) {
                Ok(None) => {}
                Ok(Some(LogWatchEvent::Entries(entries))) => {
                    let mut guard = copy.lock();
                    let Some(state) = guard.as_mut() else { return }; // taken: this master leads
                    if let Err(e) = entries.iter().try_for_each(|e| apply_entry(state, e, store)) {
                        tracing::warn!("standby: {e:#}; loading the state again");
                        *guard = None;
                        break;
                    }
                    index.store(state.index, Ordering::SeqCst);
                }
                Ok(Some(LogWatchEvent::SnapshotInstalled { index: at })) => {
                    tracing::debug!("standby: a snapshot at {at} covers unseen entries; loading again");
                    *copy.lock() = None;
                    break;
                }
                Err(e) => {
                    tracing::debug!("standby: the log watch ended ({e}); loading again");
                    *copy.lock() = None;
                    std::thread::sleep(backoff);
                    break;
                }
            }
        }
        index.store(0, Ordering::SeqCst);
    }
}
