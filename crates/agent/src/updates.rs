//! Outgoing status updates: numbered, queued in order, sent in batches, dropped only once the
//! master acknowledged them. (Kept in memory; the master's last applied sequence number is learnt
//! at registration so numbering continues after an agent restart.)

use capstan_model::{TaskId, Timestamp};
use capstan_state::{Report, StatusUpdate};
use parking_lot::Mutex;
use std::collections::VecDeque;
use tokio::sync::Notify;

/// Updates sent in one request at most.
pub const BATCH_MAX: usize = 1000;
/// Updates held at most; beyond this the oldest `Running` reports are the first to be merged
/// away (a later report about the same task supersedes them).
pub const QUEUE_MAX: usize = 100_000;

#[derive(Default)]
pub struct UpdateQueue {
    inner: Mutex<Inner>,
    pub ready: Notify,
}

#[derive(Default)]
struct Inner {
    next_seq: u64,
    queue: VecDeque<StatusUpdate>,
}

pub fn now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
    )
}

impl UpdateQueue {
    /// Numbering continues after `seq` (what the master has already applied).
    pub fn continue_after(&self, seq: u64) {
        let mut inner = self.inner.lock();
        if inner.next_seq <= seq {
            inner.next_seq = seq + 1;
            // Renumber anything queued but not yet acknowledged, keeping order.
            let mut n = seq + 1;
            for u in inner.queue.iter_mut() {
                u.seq = n;
                n += 1;
            }
            inner.next_seq = n;
        }
    }

    pub fn push(&self, task: TaskId, report: Report) {
        let mut inner = self.inner.lock();
        if inner.next_seq == 0 {
            inner.next_seq = 1;
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.queue.push_back(StatusUpdate { seq, task, report, at: now() });
        if inner.queue.len() > QUEUE_MAX {
            tracing::warn!("status update queue over {QUEUE_MAX}; the master is not taking updates");
        }
        drop(inner);
        self.ready.notify_one();
    }

    /// The oldest updates not yet acknowledged, up to `BATCH_MAX`.
    pub fn batch(&self) -> Vec<StatusUpdate> {
        self.inner.lock().queue.iter().take(BATCH_MAX).cloned().collect()
    }

    /// Drops everything up to `seq`; returns what was dropped.
    pub fn ack(&self, seq: u64) -> Vec<StatusUpdate> {
        let mut inner = self.inner.lock();
        let mut acked = vec![];
        while inner.queue.front().is_some_and(|u| u.seq <= seq) {
            acked.push(inner.queue.pop_front().expect("checked"));
        }
        acked
    }

    pub fn len(&self) -> usize {
        self.inner.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
