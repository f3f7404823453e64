//! How the agent retries calls to the master: what a failure means ([`classify`]) and how long to
//! wait before the next attempt ([`Backoff`], [`heartbeat_retry`], [`reregistration_delay`]).
//!
//! Pure: randomness comes in as an argument (`random`, uniform in `[0, 1)`), so the delays are
//! tested exactly; the loops in `lib.rs` and `heartbeat.rs` pass `rand::random()`.
//!
//! Load shedding. A master that sheds load answers 503 (with `Retry-After: SECONDS`) or 429. A
//! shed answer gets a backoff of its own, never shorter than the master's `Retry-After`
//! ([`retry_after`]): it starts at [`SHED_MIN`] (one second, the smallest `Retry-After` there
//! is), doubles while the master keeps shedding, and adds up to 100 %
//! random jitter, so that the agents a master turned away do not come back in step. Its ceiling
//! ([`SHED_BASE_MAX`] × 2) stays below the master's default agent timeout (30 s), so a master that
//! sheds heartbeats for a while does not make every agent unreachable by itself.

use capstan_api::ApiError;
use std::time::Duration;

/// The first retry after a failure that is not load shedding.
pub const RETRY_MIN: Duration = Duration::from_millis(100);
/// The longest retry after a failure that is not load shedding.
pub const RETRY_MAX: Duration = Duration::from_secs(5);
/// The first retry after the master shed load (503, 429): the smallest `Retry-After`.
pub const SHED_MIN: Duration = Duration::from_secs(1);
/// The longest shed backoff before jitter; with jitter a retry waits at most twice this.
pub const SHED_BASE_MAX: Duration = Duration::from_secs(8);
/// Heartbeat intervals the master may set, at least and at most (a zero would spin, an hour would
/// make the agent unreachable).
pub const HEARTBEAT_MIN: Duration = Duration::from_millis(50);
pub const HEARTBEAT_MAX: Duration = Duration::from_secs(300);
/// The heartbeat interval until the master says otherwise (the API's default too).
pub const HEARTBEAT_DEFAULT: Duration = Duration::from_secs(5);

/// The message of the master's answer to a route it does not have (its fallback).
const NO_ROUTE_MESSAGE: &str = "no such route";

/// What a failed call to the master means for the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// 404 from a route the master serves: it does not know this agent. Register again.
    UnknownAgent,
    /// 404 from the master's fallback: this master does not serve the route at all (an older
    /// master during a rolling upgrade). Registering again would not help.
    NoRoute,
    /// 503 or 429: the master sheds load. Wait at least a second, with jitter.
    Shed,
    /// No master answered, the call timed out, or the master failed (5xx): an outage.
    Outage,
    /// Anything else: a refusal (4xx) or an answer the agent cannot read.
    Other,
}

impl Failure {
    /// True for failures that say the master is down or overloaded (not that it refused this
    /// agent): after them, a re-registration waits a random part of the heartbeat interval.
    pub fn is_outage(self) -> bool {
        matches!(self, Failure::Shed | Failure::Outage)
    }
}

pub fn classify(e: &ApiError) -> Failure {
    match e {
        ApiError::Api { status: 404, code, message, .. } => {
            if code == "not_found" && message == NO_ROUTE_MESSAGE {
                Failure::NoRoute
            } else {
                Failure::UnknownAgent
            }
        }
        ApiError::Api { status: 503 | 429, .. } => Failure::Shed,
        ApiError::Api { status, .. } if *status >= 500 => Failure::Outage,
        ApiError::Api { .. } | ApiError::Protocol { .. } => Failure::Other,
        ApiError::Unreachable { .. } => Failure::Outage,
    }
}

/// The wait the master asked for with `Retry-After`, if it did (zero otherwise).
pub fn retry_after(e: &ApiError) -> Duration {
    match e {
        ApiError::Api { retry_after_secs: Some(secs), .. } => Duration::from_secs((*secs).min(300)),
        _ => Duration::ZERO,
    }
}

/// Jittered exponential backoff over a streak of failures; [`Backoff::reset`] after a success.
#[derive(Clone, Debug, Default)]
pub struct Backoff {
    /// Failures in a row so far.
    failures: u32,
}

impl Backoff {
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// How long to wait after one more failure of the streak. Most failures: 100 ms doubling up
    /// to 5 s, ±25 % jitter. Load shedding: 1 s doubling up to 8 s, plus 0..100 % jitter (see the
    /// module doc for why this is not the master's `Retry-After`).
    pub fn next(&mut self, failure: Failure, random: f64) -> Duration {
        let doublings = self.failures.min(16);
        self.failures = self.failures.saturating_add(1);
        let random = random.clamp(0.0, 1.0);
        if failure == Failure::Shed {
            let base = SHED_MIN.saturating_mul(1 << doublings).min(SHED_BASE_MAX);
            base + base.mul_f64(random)
        } else {
            let base = RETRY_MIN.saturating_mul(1 << doublings).min(RETRY_MAX);
            base.mul_f64(0.75 + 0.5 * random).clamp(RETRY_MIN, RETRY_MAX)
        }
    }
}

/// The wait before the next heartbeat after a failed one: about the interval (±25 % jitter),
/// never less than the shed backoff when the master sheds load — a heartbeat is never retried
/// sooner than it would have been sent anyway.
pub fn heartbeat_retry(interval: Duration, failure: Failure, backoff: &mut Backoff, random: f64) -> Duration {
    let at_interval = interval.mul_f64(0.75 + 0.5 * random.clamp(0.0, 1.0));
    let backed_off = backoff.next(failure, random);
    if failure == Failure::Shed {
        at_interval.max(backed_off)
    } else {
        at_interval
    }
}

/// The wait before the first attempt of a re-registration that follows an outage: a random part
/// of the heartbeat interval, so that the agents of a cluster do not all register in the instant
/// their master comes back.
pub fn reregistration_delay(interval: Duration, random: f64) -> Duration {
    interval.mul_f64(random.clamp(0.0, 1.0))
}

/// The heartbeat interval the master asked for, within [`HEARTBEAT_MIN`]..=[`HEARTBEAT_MAX`].
pub fn heartbeat_interval(ms: u64) -> Duration {
    Duration::from_millis(ms).clamp(HEARTBEAT_MIN, HEARTBEAT_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, code: &str, message: &str) -> ApiError {
        ApiError::Api { status, code: code.into(), message: message.into(), details: vec![], retry_after_secs: None }
    }

    #[test]
    fn failures_are_classified_by_what_the_agent_must_do() {
        assert_eq!(classify(&api(404, "unknown_agent", "agent 1 is not registered")), Failure::UnknownAgent);
        assert_eq!(classify(&api(404, "not_found", "agent 1: no such agent")), Failure::UnknownAgent);
        assert_eq!(classify(&api(404, "not_found", "no such route")), Failure::NoRoute);
        assert_eq!(classify(&api(503, "overloaded", "shedding load")), Failure::Shed);
        assert_eq!(classify(&api(429, "http", "429 Too Many Requests")), Failure::Shed);
        assert_eq!(classify(&api(500, "internal", "boom")), Failure::Outage);
        assert_eq!(classify(&api(502, "http", "bad gateway")), Failure::Outage);
        assert_eq!(classify(&api(400, "bad_request", "invalid request body")), Failure::Other);
        assert_eq!(
            classify(&ApiError::Unreachable { addrs: "http://m:1".into(), detail: "refused".into() }),
            Failure::Outage
        );
        assert_eq!(classify(&ApiError::Protocol { url: "u".into(), detail: "eof".into() }), Failure::Other);
        assert!(Failure::Shed.is_outage() && Failure::Outage.is_outage());
        assert!(!Failure::UnknownAgent.is_outage() && !Failure::Other.is_outage() && !Failure::NoRoute.is_outage());
    }

    #[test]
    fn ordinary_failures_back_off_from_100ms_to_5s_with_quarter_jitter() {
        let mut b = Backoff::default();
        let low: Vec<Duration> = (0..8).map(|_| b.next(Failure::Outage, 0.0)).collect();
        let ms = |v: &[Duration]| v.iter().map(|d| d.as_millis() as u64).collect::<Vec<_>>();
        // The lowest jitter (×0.75) never goes below the first delay.
        assert_eq!(ms(&low), [100, 150, 300, 600, 1200, 2400, 3750, 3750]);
        let mut b = Backoff::default();
        let high: Vec<Duration> = (0..8).map(|_| b.next(Failure::Other, 0.999_999)).collect();
        assert_eq!(ms(&high), [124, 249, 499, 999, 1999, 3999, 5000, 5000]);
        assert_eq!(b.failures(), 8);
        b.reset();
        assert_eq!(b.next(Failure::Outage, 0.5), RETRY_MIN);
    }

    #[test]
    fn shed_load_waits_at_least_a_second_doubling_with_jitter_up_to_16s() {
        let mut b = Backoff::default();
        let low: Vec<u64> = (0..6).map(|_| b.next(Failure::Shed, 0.0).as_millis() as u64).collect();
        assert_eq!(low, [1000, 2000, 4000, 8000, 8000, 8000]);
        let mut b = Backoff::default();
        let high: Vec<u64> = (0..6).map(|_| b.next(Failure::Shed, 0.5).as_millis() as u64).collect();
        assert_eq!(high, [1500, 3000, 6000, 12000, 12000, 12000]);
        // Even after many ordinary failures, a shed answer never waits less than a second, and
        // the longest wait stays below the master's default agent timeout.
        let mut b = Backoff::default();
        for _ in 0..100 {
            b.next(Failure::Outage, 0.3);
        }
        let d = b.next(Failure::Shed, 1.0);
        assert_eq!(d, SHED_BASE_MAX * 2);
        assert!(d < Duration::from_secs(30));
        let mut b = Backoff::default();
        assert!(b.next(Failure::Shed, 0.0) >= SHED_MIN);
    }

    #[test]
    fn failed_heartbeats_are_retried_at_the_interval_and_never_sooner_than_a_shed_backoff() {
        let interval = Duration::from_secs(5);
        let mut b = Backoff::default();
        assert_eq!(heartbeat_retry(interval, Failure::Outage, &mut b, 0.0), Duration::from_millis(3750));
        assert_eq!(heartbeat_retry(interval, Failure::Outage, &mut b, 0.5), interval);
        assert_eq!(heartbeat_retry(interval, Failure::Other, &mut b, 1.0), Duration::from_millis(6250));
        // Shedding: the interval while the shed backoff is shorter, the backoff once it is longer.
        let mut b = Backoff::default();
        let waits: Vec<u64> =
            (0..5).map(|_| heartbeat_retry(interval, Failure::Shed, &mut b, 0.5).as_millis() as u64).collect();
        assert_eq!(waits, [5000, 5000, 6000, 12000, 12000]);
        // A short interval (tests, small clusters) still waits at least the shed backoff.
        let mut b = Backoff::default();
        assert_eq!(heartbeat_retry(Duration::from_millis(200), Failure::Shed, &mut b, 0.0), SHED_MIN);
    }

    #[test]
    fn reregistration_after_an_outage_is_spread_over_one_interval() {
        let interval = Duration::from_secs(5);
        assert_eq!(reregistration_delay(interval, 0.0), Duration::ZERO);
        assert_eq!(reregistration_delay(interval, 0.5), Duration::from_millis(2500));
        assert!(reregistration_delay(interval, 0.999_999) < interval);
        assert_eq!(reregistration_delay(interval, 7.0), interval, "random is clamped");
        // Spread: 1000 agents with evenly spread random numbers land in 1000 different
        // milliseconds of a 5 s interval.
        let mut at: Vec<u128> =
            (0..1000).map(|i| reregistration_delay(interval, i as f64 / 1000.0).as_millis()).collect();
        at.dedup();
        assert_eq!(at.len(), 1000);
    }

    #[test]
    fn heartbeat_intervals_are_bounded() {
        assert_eq!(heartbeat_interval(5_000), Duration::from_secs(5));
        assert_eq!(heartbeat_interval(0), HEARTBEAT_MIN);
        assert_eq!(heartbeat_interval(u64::MAX), HEARTBEAT_MAX);
        assert_eq!(heartbeat_interval(200), Duration::from_millis(200));
    }

    #[test]
    fn the_masters_retry_after_is_a_floor() {
        let mut e = api(503, "overloaded", "busy");
        assert_eq!(retry_after(&e), Duration::ZERO);
        if let ApiError::Api { retry_after_secs, .. } = &mut e {
            *retry_after_secs = Some(7);
        }
        assert_eq!(retry_after(&e), Duration::from_secs(7));
        let mut b = Backoff::default();
        assert!(b.next(classify(&e), 0.0).max(retry_after(&e)) >= Duration::from_secs(7));
        assert_eq!(retry_after(&ApiError::Unreachable { addrs: String::new(), detail: String::new() }), Duration::ZERO);
    }
}
