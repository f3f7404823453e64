//! Heartbeats: every heartbeat interval (as the master said in its latest RegisterResponse or
//! HeartbeatResponse) the agent tells the master that it lives and which tasks it has and runs,
//! with `as_of_seq`, the newest status update it had created when it took those lists.
//!
//! - 404 from the heartbeat route: the master does not know this agent; register again.
//! - 404 from the master's fallback (a master without heartbeats, during a rolling upgrade),
//!   unreachable, failing, or shedding load (503, 429): keep trying about every interval (±25 %
//!   jitter), after load shedding never sooner than the shed backoff (`retry::heartbeat_retry`).
//!   A streak of failures is logged once at warn, and its end once at info.
//!
//! The master's epoch in a HeartbeatResponse is not acted on here: a new master run is noticed by
//! the orders loop, whose long poll answers at once for a new epoch and registers again.

use crate::retry::{self, Backoff, Failure};
use crate::Agent;
use std::sync::Arc;

pub(crate) async fn heartbeat_loop(agent: Arc<Agent>) {
    let mut backoff = Backoff::default();
    // The registration that came before told the master everything a heartbeat would.
    let mut wait = agent.heartbeat_interval();
    loop {
        tokio::time::sleep(wait).await;
        let request = agent.heartbeat_request();
        match agent.client.heartbeat(&request).await {
            Ok(response) => {
                agent.set_heartbeat_interval(response.heartbeat_interval_ms);
                if backoff.failures() > 0 {
                    tracing::info!("heartbeats reach the master again");
                }
                backoff.reset();
                wait = agent.heartbeat_interval();
            }
            Err(e) => match retry::classify(&e) {
                Failure::UnknownAgent => {
                    tracing::info!("the master does not know this agent (heartbeat answered 404); registering again");
                    agent.register().await;
                    backoff.reset();
                    wait = agent.heartbeat_interval();
                }
                failure => {
                    agent.note_failure(failure);
                    let interval = agent.heartbeat_interval();
                    if backoff.failures() == 0 {
                        tracing::warn!(
                            "cannot send a heartbeat to the master: {e}; retrying about every {interval:?} \
                             (logged once until it works again)"
                        );
                    }
                    wait = retry::heartbeat_retry(interval, failure, &mut backoff, rand::random())
                        .max(retry::retry_after(&e));
                }
            },
        }
    }
}
