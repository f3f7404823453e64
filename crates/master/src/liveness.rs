//! Agent liveness: who is heard from, who is unreachable, and the slow, guarded path from
//! unreachable to removed (its tasks replaced elsewhere).
//!
//! Marking an agent unreachable is immediate and cheap (its tasks are kept, shown UNREACHABLE and
//! nothing new is placed there). Replacing its tasks is the destructive step, and it is guarded:
//! it waits for each job's `replace_after`, goes at most at `--agent-removal-rate`, and stops
//! entirely while the mass-loss breaker is tripped, while the cluster is frozen, and while a
//! master that just started (or just stalled) gives agents time to call in.

use std::time::Duration;

/// At most `count` agent removals per `per`: `1/10s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemovalRate {
    pub count: u32,
    pub per: Duration,
}

impl std::str::FromStr for RemovalRate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("\"{s}\" is not a rate; write COUNT/DURATION, e.g. \"1/10s\" or \"5/1m\"");
        let (count, per) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per = humantime::parse_duration(per.trim()).map_err(|_| bad())?;
        if count == 0 || per.is_zero() {
            return Err(format!("\"{s}\": both the count and the duration must be above zero"));
        }
        Ok(RemovalRate { count, per })
    }
}

impl std::fmt::Display for RemovalRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.count, humantime::format_duration(self.per))
    }
}

/// The settings of agent liveness; every one is a flag of `capstan master` and `capstan dev`.
#[derive(Clone, Debug, PartialEq)]
pub struct LivenessConfig {
    /// How often agents send a heartbeat (they are told when they register). Default 5 s.
    pub heartbeat_interval: Duration,
    /// An agent not heard from for this long is marked unreachable. Default 30 s.
    pub agent_timeout: Duration,
    /// At most this many agent removals (its due tasks replaced elsewhere). Default 1/10s.
    pub removal_rate: RemovalRate,
    /// The breaker trips when more than this share of agents became unreachable within
    /// `breaker_window`. Default 0.3.
    pub breaker_threshold: f64,
    /// Default 60 s.
    pub breaker_window: Duration,
    /// The attribute whose values are fault domains; all agents of one domain (at least two)
    /// unreachable trips the breaker too. Default `rack`.
    pub fault_domain: String,
    /// After the master starts (or finds it stalled), it waits this long for agents to call in
    /// before it concludes anything about them. Default: the agent timeout.
    pub reregistration_period: Duration,
    /// A task that runs on an agent but that the master does not know is stopped only after this
    /// long (and never while frozen or during the re-registration period). Default 5 min.
    pub stray_grace: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            heartbeat_interval: Duration::from_secs(5),
            agent_timeout: Duration::from_secs(30),
            removal_rate: RemovalRate { count: 1, per: Duration::from_secs(10) },
            breaker_threshold: 0.3,
            breaker_window: Duration::from_secs(60),
            fault_domain: "rack".into(),
            reregistration_period: Duration::from_secs(30),
            stray_grace: Duration::from_secs(300),
        }
    }
}

impl LivenessConfig {
    /// Refuses settings that cannot work together, saying which.
    pub fn check(&self) -> Result<(), String> {
        if self.heartbeat_interval.is_zero() {
            return Err("--heartbeat-interval must be above zero".into());
        }
        if self.agent_timeout < self.heartbeat_interval * 2 {
            return Err(format!(
                "--agent-timeout ({}) must be at least twice --heartbeat-interval ({}), or every late heartbeat \
                 makes an agent unreachable",
                humantime::format_duration(self.agent_timeout),
                humantime::format_duration(self.heartbeat_interval)
            ));
        }
        if !(self.breaker_threshold > 0.0 && self.breaker_threshold <= 1.0) {
            return Err(format!("--breaker-threshold {} must be a share in (0, 1]", self.breaker_threshold));
        }
        if self.fault_domain.trim().is_empty() {
            return Err("--fault-domain must name an attribute".into());
        }
        Ok(())
    }
}
