//! Cluster events: what happened to agents and to the cluster as a whole (an agent unreachable or
//! back, a removal, the breaker, a freeze, a stray task), kept in a bounded ring in memory and read
//! by long poll (`GET /v1/events`). Memory is bounded whatever readers do: a reader that falls
//! behind learns how many events it missed instead of holding them.

use crate::core::now;
use capstan_api::wire::EventView;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::Notify;

/// Events kept; older ones are dropped.
pub const EVENTS_KEPT: usize = 10_000;
/// Events returned by one read at most.
pub const EVENTS_PER_PAGE: usize = 1_000;

#[derive(Default)]
pub struct Events {
    ring: Mutex<Ring>,
    added: Notify,
}

#[derive(Default)]
struct Ring {
    events: VecDeque<EventView>,
    /// The sequence number of the newest event (0: none yet).
    last: u64,
}

impl Events {
    pub fn add(&self, kind: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(kind, "{message}");
        let mut ring = self.ring.lock();
        ring.last += 1;
        let seq = ring.last;
        if ring.events.len() >= EVENTS_KEPT {
            ring.events.pop_front();
        }
        ring.events.push_back(EventView { seq, at: capstan_api::wire::rfc3339(now()), kind: kind.into(), message });
        drop(ring);
        self.added.notify_waiters();
    }

    /// Events after `after` (oldest first), how many of those are no longer kept, and the
    /// sequence number to read on from.
    pub fn read(&self, after: u64) -> (Vec<EventView>, u64, u64) {
        let ring = self.ring.lock();
        let first_kept = ring.events.front().map(|e| e.seq).unwrap_or(ring.last + 1);
        let missed = first_kept.saturating_sub(after + 1).min(ring.last.saturating_sub(after));
        let events: Vec<EventView> =
            ring.events.iter().filter(|e| e.seq > after).take(EVENTS_PER_PAGE).cloned().collect();
        let next = events.last().map(|e| e.seq).unwrap_or(ring.last.max(after).min(ring.last));
        (events, missed, next)
    }

    /// Like `read`, waiting up to `wait` for an event when there is none after `after`.
    pub async fn wait_read(&self, after: u64, wait: Duration) -> (Vec<EventView>, u64, u64) {
        let notified = self.added.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let page = self.read(after);
        if !page.0.is_empty() || wait.is_zero() {
            return page;
        }
        let _ = tokio::time::timeout(wait, notified).await;
        self.read(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_get_what_is_kept_and_learn_what_they_missed() {
        let ev = Events::default();
        for i in 0..EVENTS_KEPT + 5 {
            ev.add("test", format!("event {i}"));
        }
        let (events, missed, next) = ev.read(0);
        assert_eq!(missed, 5, "the five oldest were dropped");
        assert_eq!(events.len(), EVENTS_PER_PAGE);
        assert_eq!(events[0].seq, 6);
        assert_eq!(next, events.last().unwrap().seq);
        let (events, missed, _) = ev.read((EVENTS_KEPT + 3) as u64);
        assert_eq!((events.len(), missed), (2, 0));
        let (events, missed, next) = ev.read((EVENTS_KEPT + 5) as u64);
        assert_eq!((events.len(), missed, next), (0, 0, (EVENTS_KEPT + 5) as u64));
    }

    #[test]
    fn a_reader_ahead_of_the_ring_reads_nothing() {
        let ev = Events::default();
        ev.add("a", "one");
        let (events, missed, next) = ev.read(100);
        assert!(events.is_empty());
        assert_eq!(missed, 0);
        assert_eq!(next, 1, "next points at the newest event, so a reader that was ahead starts again from there");
    }
}
