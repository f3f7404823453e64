//! The scheduler loop: computes a plan over a read view of the state (pure, in
//! `capstan-placement`), submits it as one `Place` command, and sleeps until something changes or
//! the next restart backoff ends.

use crate::core::{now, Core};
use capstan_model::TaskId;
use capstan_state::Command;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tasks placed per pass at most (one `Place` command).
pub const PLACEMENTS_PER_PASS_MAX: usize = 10_000;
/// Even with nothing to do, look again this often (a safety net; wake-ups do the real work).
const IDLE_RECHECK: Duration = Duration::from_secs(5);

/// Why tasks could not be placed in the last pass; shown in job status. In memory only.
pub type Unplaced = Arc<Mutex<HashMap<TaskId, String>>>;

pub async fn run(core: Arc<Core>, unplaced: Unplaced) {
    loop {
        let notified = core.pending_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let at = now();
        let started = Instant::now();
        let (plan, became_placeable) = {
            let state = core.state.read();
            let plan = capstan_placement::plan(&state, at, rand::random(), PLACEMENTS_PER_PASS_MAX);
            let since: Vec<u64> = plan
                .placements
                .iter()
                .filter_map(|p| state.tasks.get(&p.task))
                .map(|t| t.created_at.max(t.not_before).0)
                .collect();
            (plan, since)
        };
        core.metrics.scheduler_pass_seconds.observe(started.elapsed().as_secs_f64());
        {
            let mut u = unplaced.lock();
            u.clear();
            for x in &plan.unplaced {
                u.insert(x.task, x.why.clone());
            }
        }
        let placed = plan.placements.len();
        if placed > 0 {
            match core.submit(Command::Place { placements: plan.placements }).await {
                Ok(applied) => {
                    let done = now().0;
                    core.metrics
                        .placements
                        .inc_by((placed as u64).saturating_sub(u64::from(applied.placements_refused)));
                    for since in became_placeable {
                        core.metrics.placement_latency_seconds.observe(done.saturating_sub(since) as f64 / 1000.0);
                    }
                }
                Err(e) => {
                    tracing::warn!("placement plan not applied: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            if placed == PLACEMENTS_PER_PASS_MAX {
                continue;
            }
        }
        let wait = match plan.next_wakeup {
            Some(t) => Duration::from_millis(t.0.saturating_sub(now().0)).min(IDLE_RECHECK),
            None => IDLE_RECHECK,
        };
        let _ = tokio::time::timeout(wait, notified).await;
    }
}
