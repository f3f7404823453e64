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
pub const PLACEMENTS_PER_PASS_MAX: usize = 4_000;
/// Even with nothing to do, look again this often (a safety net; wake-ups do the real work).
const IDLE_RECHECK: Duration = Duration::from_secs(5);

/// Why tasks could not be placed in the last pass; shown in job status. In memory only.
#[derive(Default)]
pub struct UnplacedReasons {
    pub tasks: HashMap<TaskId, String>,
    /// Jobs none of whose tasks fit: their tasks were not searched one by one.
    pub jobs: HashMap<capstan_model::JobKey, String>,
}

pub type Unplaced = Arc<Mutex<UnplacedReasons>>;

/// The operator's ceiling on placements per second, as a token bucket holding at most one
/// second's worth.
struct RateLimit {
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    /// How many tasks this pass may place; `None` means unlimited.
    fn allowance(&mut self, per_second: Option<u32>) -> Option<usize> {
        let rate = f64::from(per_second?);
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate.max(1.0));
        self.last = now;
        Some(self.tokens.floor() as usize)
    }

    fn spend(&mut self, n: usize) {
        self.tokens = (self.tokens - n as f64).max(0.0);
    }
}

pub async fn run(core: Arc<Core>, unplaced: Unplaced) {
    let mut rate = RateLimit { tokens: 0.0, last: Instant::now() };
    loop {
        let notified = core.pending_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let per_second = core.state.read().scheduler.max_placements_per_second;
        let limit = match rate.allowance(per_second) {
            None => PLACEMENTS_PER_PASS_MAX,
            Some(0) => {
                // Wait for the next token.
                let wait = Duration::from_secs_f64(1.0 / f64::from(per_second.unwrap_or(1).max(1)));
                tokio::time::sleep(wait.min(IDLE_RECHECK)).await;
                continue;
            }
            Some(n) => n.min(PLACEMENTS_PER_PASS_MAX),
        };
        let at = now();
        let started = Instant::now();
        // Planning is CPU work under the state's read lock: off the async workers, and short
        // (a bounded number of searches per pass), so the writer and the API do not wait long.
        let planner = core.clone();
        let planned = tokio::task::spawn_blocking(move || {
            let state = planner.state.read();
            let plan = capstan_placement::plan(&state, at, rand::random(), limit);
            let since: Vec<u64> = plan
                .placements
                .iter()
                .filter_map(|p| state.tasks.get(&p.task))
                .map(|t| t.created_at.max(t.not_before).0)
                .collect();
            (plan, since)
        })
        .await;
        let Ok((plan, became_placeable)) = planned else {
            tracing::error!("the placement pass panicked; retrying");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        core.metrics.scheduler_pass_seconds.observe(started.elapsed().as_secs_f64());
        {
            let mut u = unplaced.lock();
            u.tasks.clear();
            u.jobs.clear();
            for x in &plan.unplaced {
                u.tasks.insert(x.task, x.why.clone());
            }
            u.jobs.extend(plan.unplaced_jobs.iter().cloned());
        }
        if !plan.preemptions.is_empty() {
            let n = plan.preemptions.len();
            match core.submit(Command::Preempt { preemptions: plan.preemptions }).await {
                Ok(_) => tracing::info!("preempting {n} lower-priority tasks for production work"),
                Err(e) => tracing::warn!("preemptions not applied: {e}"),
            }
        }
        let placed = plan.placements.len();
        rate.spend(placed);
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
            if placed == limit || plan.more {
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
