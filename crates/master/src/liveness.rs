//! Agent liveness: who is heard from, who is unreachable, and the slow, guarded path from
//! unreachable to removed (its tasks replaced elsewhere).
//!
//! Marking an agent unreachable is immediate and cheap (its tasks are kept, shown UNREACHABLE and
//! nothing new is placed there). Replacing its tasks is the destructive step, and it is guarded:
//! it waits for each job's `replace_after`, goes at most at `--agent-removal-rate`, and stops
//! entirely while the mass-loss breaker is tripped, while the cluster is frozen, and while a
//! master that just started (or just stalled) gives agents time to call in.

use crate::core::{now, Core};
use crate::events::Events;
use capstan_model::{AgentId, TaskId, Timestamp};
use capstan_state::{ClusterState, Command};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// The mass-loss breaker, when tripped.
#[derive(Clone, Debug, PartialEq)]
pub struct Trip {
    pub reason: String,
    pub since: Timestamp,
}

/// What the master knows of agent liveness beyond the replicated state: when it last heard from
/// each agent (by its own monotonic clock), the breaker, the removal rate's budget. Nothing here
/// is durable on purpose: a master that starts gives every agent a fresh re-registration period.
pub struct Liveness {
    pub config: LivenessConfig,
    inner: Mutex<Inner>,
}

struct Inner {
    last_seen: HashMap<AgentId, Instant>,
    last_seen_wall: HashMap<AgentId, Timestamp>,
    /// Until then, nothing is concluded about agents.
    reregistration_until: Instant,
    /// Agents marked unreachable, and when, within the breaker window.
    marks: VecDeque<(Instant, AgentId)>,
    /// Marks before this do not count towards tripping (set when an operator resets it).
    counted_from: Instant,
    breaker: Option<Trip>,
    /// Removal budget (token bucket): up to `removal_rate.count`, refilled over `removal_rate.per`.
    tokens: f64,
    refilled_at: Instant,
    last_tick: Instant,
}

/// A tick's decisions, for the loop to carry out.
#[derive(Debug, Default, PartialEq)]
pub struct Decisions {
    pub unreachable: Vec<AgentId>,
    pub remove: Vec<AgentId>,
    pub tripped: Option<Trip>,
    pub reset: Option<String>,
    pub stalled: Option<Duration>,
}

impl Liveness {
    pub fn new(config: LivenessConfig) -> Liveness {
        Liveness::new_at(config, Instant::now())
    }

    /// As if started at `now` (tests drive the clock).
    pub fn new_at(config: LivenessConfig, now: Instant) -> Liveness {
        Liveness {
            inner: Mutex::new(Inner {
                last_seen: HashMap::new(),
                last_seen_wall: HashMap::new(),
                reregistration_until: now + config.reregistration_period,
                marks: VecDeque::new(),
                counted_from: now,
                breaker: None,
                tokens: f64::from(config.removal_rate.count),
                refilled_at: now,
                last_tick: now,
            }),
            config,
        }
    }

    /// The agent called in (registration, heartbeat).
    pub fn seen(&self, agent: AgentId) {
        self.seen_at(agent, Instant::now());
    }

    pub fn seen_at(&self, agent: AgentId, at: Instant) {
        let mut inner = self.inner.lock();
        inner.last_seen.insert(agent, at);
        inner.last_seen_wall.insert(agent, now());
    }

    pub fn last_seen(&self, agent: AgentId) -> Option<Timestamp> {
        self.inner.lock().last_seen_wall.get(&agent).copied()
    }

    /// Whether this master still waits for agents to call in before judging them.
    pub fn reregistering(&self) -> bool {
        Instant::now() < self.inner.lock().reregistration_until
    }

    /// Until when (wall clock) the re-registration period lasts, if it does.
    pub fn reregistration_until(&self) -> Option<Timestamp> {
        let until = self.inner.lock().reregistration_until;
        let left = until.checked_duration_since(Instant::now())?;
        Some(now().plus_ms(left.as_millis() as u64))
    }

    pub fn breaker(&self) -> Option<Trip> {
        self.inner.lock().breaker.clone()
    }

    /// An operator resets the breaker: removals resume (at the removal rate); agents already
    /// unreachable do not trip it again, new losses do.
    pub fn reset_breaker(&self) -> Option<Trip> {
        let mut inner = self.inner.lock();
        inner.counted_from = Instant::now();
        inner.marks.clear();
        inner.breaker.take()
    }

    /// One look at the cluster: which agents to mark unreachable, which to remove, whether the
    /// breaker trips or resets. Pure apart from the clock and this struct; the caller logs the
    /// commands and events.
    pub fn tick(&self, state: &ClusterState, frozen: bool, at: Instant) -> Decisions {
        let mut d = Decisions::default();
        let c = &self.config;
        let mut inner = self.inner.lock();
        // A master that did not run for a while (paused, swapped out, its VM frozen) cannot tell
        // anything about agents from that time: the time it was stopped does not count against
        // them. Stopped past the agent timeout, it gives them a full re-registration period and
        // trips the breaker: its view of liveness is stale.
        let gap = at.saturating_duration_since(inner.last_tick);
        inner.last_tick = at;
        let stall = gap.saturating_sub(TICK * 2);
        if stall > c.heartbeat_interval {
            for seen in inner.last_seen.values_mut() {
                *seen += stall;
            }
            if gap > c.agent_timeout {
                inner.reregistration_until = inner.reregistration_until.max(at + c.reregistration_period);
                d.stalled = Some(gap);
                if inner.breaker.is_none() {
                    let trip = Trip {
                        reason: format!(
                            "this master was stalled for {}, longer than the agent timeout ({}): its view of agent \
                             liveness is stale; nothing is removed until agents have called in again",
                            humantime::format_duration(Duration::from_millis(gap.as_millis() as u64)),
                            humantime::format_duration(c.agent_timeout)
                        ),
                        since: now(),
                    };
                    inner.breaker = Some(trip.clone());
                    d.tripped = Some(trip);
                }
            }
        }
        let reregistering = at < inner.reregistration_until;
        // Start of this master's knowledge for agents it has not heard from.
        let default_seen = inner.reregistration_until.checked_sub(c.reregistration_period).unwrap_or(at);
        if !reregistering {
            for a in state.agents.values().filter(|a| a.liveness == capstan_state::Liveness::Active) {
                let seen = inner.last_seen.get(&a.info.id).copied().unwrap_or(default_seen);
                if at.saturating_duration_since(seen) > c.agent_timeout {
                    d.unreachable.push(a.info.id);
                }
            }
        }
        let counted_from = inner.counted_from;
        for id in &d.unreachable {
            inner.marks.push_back((at.max(counted_from), *id));
        }
        while inner.marks.front().is_some_and(|(t, _)| at.saturating_duration_since(*t) > c.breaker_window) {
            inner.marks.pop_front();
        }
        // The breaker: a share of all agents lost within the window, or a whole fault domain.
        let total = state.agents.len();
        let unreachable_now: BTreeSet<AgentId> = state
            .agents
            .values()
            .filter(|a| a.liveness != capstan_state::Liveness::Active)
            .map(|a| a.info.id)
            .chain(d.unreachable.iter().copied())
            .collect();
        if inner.breaker.is_none() && total > 0 {
            let recent: BTreeSet<AgentId> = inner.marks.iter().map(|(_, id)| *id).collect();
            let share = recent.len() as f64 / total as f64;
            // One agent lost is never a mass loss, however small the cluster.
            let reason = if recent.len() >= 2 && share > c.breaker_threshold {
                Some(format!(
                    "{} of {total} agents ({:.0}%) became unreachable within {}, more than the {:.0}% threshold",
                    recent.len(),
                    share * 100.0,
                    humantime::format_duration(c.breaker_window),
                    c.breaker_threshold * 100.0
                ))
            } else {
                lost_domain(state, &c.fault_domain, &unreachable_now, &recent)
                    .map(|v| format!("every agent of {}={v} became unreachable", c.fault_domain))
            };
            if let Some(reason) = reason {
                let trip = Trip { reason, since: now() };
                inner.breaker = Some(trip.clone());
                d.tripped = Some(trip);
            }
        } else if inner.breaker.is_some() && !reregistering && d.tripped.is_none() {
            // Agents came back: below the threshold and no fault domain wholly gone.
            let share = if total == 0 { 0.0 } else { unreachable_now.len() as f64 / total as f64 };
            let empty = BTreeSet::new();
            if share <= c.breaker_threshold && lost_domain(state, &c.fault_domain, &unreachable_now, &empty).is_none() {
                inner.breaker = None;
                inner.counted_from = at;
                inner.marks.clear();
                d.reset = Some(format!(
                    "agents are back: {} of {total} unreachable, within the {:.0}% threshold",
                    unreachable_now.len(),
                    c.breaker_threshold * 100.0
                ));
            }
        }
        // Removals: the destructive step, rate limited, and only when nothing says wait.
        let per_token = c.removal_rate.per.as_secs_f64() / f64::from(c.removal_rate.count);
        let refill = at.saturating_duration_since(inner.refilled_at).as_secs_f64() / per_token;
        inner.tokens = (inner.tokens + refill).min(f64::from(c.removal_rate.count));
        inner.refilled_at = at;
        if inner.breaker.is_none() && !frozen && !reregistering {
            // The wall-clock time of `at` (the state's times are wall-clock).
            let real = Instant::now();
            let wall = if at >= real {
                now().plus_ms(at.duration_since(real).as_millis() as u64)
            } else {
                Timestamp(now().0.saturating_sub(real.duration_since(at).as_millis() as u64))
            };
            let mut candidates: Vec<(Timestamp, AgentId)> = state
                .agents
                .values()
                .filter_map(|a| match a.liveness {
                    capstan_state::Liveness::Unreachable { since } => Some((since, a.info.id)),
                    _ => None,
                })
                .filter(|(_, id)| state.due_for_replacement(*id, wall).next().is_some())
                .collect();
            candidates.sort();
            for (_, id) in candidates {
                if inner.tokens < 1.0 {
                    break;
                }
                inner.tokens -= 1.0;
                d.remove.push(id);
            }
        }
        d
    }
}

/// How often the liveness loop looks.
pub const TICK: Duration = Duration::from_millis(250);

/// A fault domain (a value of the attribute) with at least two agents, all unreachable now, at
/// least one of them within the window (`recent`; empty: any).
fn lost_domain(
    state: &ClusterState,
    attribute: &str,
    unreachable: &BTreeSet<AgentId>,
    recent: &BTreeSet<AgentId>,
) -> Option<String> {
    let mut domains: BTreeMap<&str, (usize, usize, bool)> = BTreeMap::new();
    for a in state.agents.values() {
        let Some(v) = a.info.attributes.get(attribute) else { continue };
        let e = domains.entry(v.as_str()).or_default();
        e.0 += 1;
        if unreachable.contains(&a.info.id) {
            e.1 += 1;
        }
        if recent.is_empty() || recent.contains(&a.info.id) {
            e.2 = true;
        }
    }
    domains.into_iter().find(|(_, (n, lost, recent))| *n >= 2 && lost == n && *recent).map(|(v, _)| v.to_string())
}

/// The liveness loop: every tick, mark, remove, trip or reset, and say so in events.
pub async fn run(core: Arc<Core>, liveness: Arc<Liveness>, events: Arc<Events>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Strays whose stop the agent has been woken for: orders do not change when a grace period
    // ends, so the agent's long poll is woken to fetch the stop order now, once per stray.
    let mut woken: HashSet<(AgentId, TaskId)> = HashSet::new();
    loop {
        interval.tick().await;
        let due_strays: Vec<(AgentId, TaskId)> = {
            let state = core.state.read();
            if state.frozen.is_some() || liveness.reregistering() {
                vec![]
            } else {
                let grace = liveness.config.stray_grace.as_millis() as u64;
                let t = now();
                state
                    .agents
                    .values()
                    .flat_map(|a| {
                        a.strays
                            .iter()
                            .filter(move |(_, s)| s.stop_now || s.since.plus_ms(grace) <= t)
                            .map(move |(task, _)| (a.info.id, *task))
                    })
                    .collect()
            }
        };
        woken.retain(|k| due_strays.contains(k));
        for key in due_strays {
            if woken.insert(key) {
                core.agent_notify(key.0).notify_waiters();
            }
        }
        let d = {
            let state = core.state.read();
            liveness.tick(&state, state.frozen.is_some(), Instant::now())
        };
        core.metrics.breaker_tripped.set(i64::from(liveness.breaker().is_some()));
        if let Some(gap) = d.stalled {
            events.add(
                "master_stalled",
                format!(
                    "this master did not run for {}; agents get {} to call in again",
                    humantime::format_duration(Duration::from_millis(gap.as_millis() as u64)),
                    humantime::format_duration(liveness.config.reregistration_period)
                ),
            );
        }
        if let Some(trip) = &d.tripped {
            events.add("breaker_tripped", format!("removals stopped: {}", trip.reason));
        }
        if let Some(why) = &d.reset {
            events.add("breaker_reset", format!("removals resume: {why}"));
        }
        if !d.unreachable.is_empty() {
            let n = d.unreachable.len();
            match core.submit(Command::AgentsUnreachable { agents: d.unreachable.clone() }).await {
                Ok(_) => {
                    let shown: Vec<String> = d.unreachable.iter().take(10).map(|a| a.to_string()).collect();
                    let more = if n > 10 { format!(" and {} more", n - 10) } else { String::new() };
                    events.add(
                        "agent_unreachable",
                        format!(
                            "{n} agent(s) not heard from for over {}: {}{more}; their tasks are kept, shown UNREACHABLE",
                            humantime::format_duration(liveness.config.agent_timeout),
                            shown.join(", ")
                        ),
                    );
                }
                Err(e) => tracing::warn!("cannot mark {n} agents unreachable: {e}"),
            }
        }
        for agent in d.remove {
            match core.submit(Command::RemoveAgent { agent }).await {
                Ok(applied) => {
                    let removed = core.state.read().agents.get(&agent).map(|a| a.liveness.as_str()).unwrap_or("gone");
                    events.add(
                        "agent_removed",
                        format!(
                            "agent {agent}: {} task(s) replaced elsewhere (its job's replace_after passed); agent is {removed}",
                            applied.replaced.len()
                        ),
                    );
                }
                Err(e) => tracing::warn!("cannot remove agent {agent}: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_model::Capacity;
    use capstan_state::{AgentInfo, Stamped};

    fn config() -> LivenessConfig {
        LivenessConfig {
            heartbeat_interval: Duration::from_secs(1),
            agent_timeout: Duration::from_secs(3),
            removal_rate: "1/10s".parse().unwrap(),
            breaker_threshold: 0.3,
            breaker_window: Duration::from_secs(60),
            fault_domain: "rack".into(),
            reregistration_period: Duration::from_secs(3),
            stray_grace: Duration::from_secs(300),
        }
    }

    fn cluster(agents: u64, rack: impl Fn(u64) -> String) -> ClusterState {
        let mut s = ClusterState::default();
        for id in 1..=agents {
            let info = AgentInfo {
                id: AgentId(id),
                hostname: format!("h{id}"),
                address: String::new(),
                capacity: Capacity { cpus_milli: 1000, mem_bytes: 1 << 30, disk_bytes: 1 << 30, ports: vec![] },
                attributes: [("rack".to_string(), rack(id))].into(),
                version: String::new(),
            };
            s.apply(&Stamped { at: now(), command: Command::RegisterAgent { info } }).unwrap();
        }
        s
    }

    fn mark(s: &mut ClusterState, agents: &[AgentId]) {
        s.apply(&Stamped { at: now(), command: Command::AgentsUnreachable { agents: agents.to_vec() } }).unwrap();
    }

    #[test]
    fn rates_parse_and_refuse_nonsense() {
        assert_eq!("1/10s".parse::<RemovalRate>().unwrap(), RemovalRate { count: 1, per: Duration::from_secs(10) });
        assert_eq!("5/1m".parse::<RemovalRate>().unwrap().to_string(), "5/1m");
        for bad in ["", "1", "0/1s", "1/0s", "x/1s", "1/soon"] {
            assert!(bad.parse::<RemovalRate>().is_err(), "{bad:?} accepted");
        }
        let mut c = config();
        c.agent_timeout = Duration::from_secs(1);
        assert!(c.check().unwrap_err().contains("--agent-timeout"));
    }

    /// Drives the clock in 200 ms steps from the start, with heartbeats from `alive`, until
    /// `stop` says so; marks what the tick marks, as the loop would.
    fn drive(
        l: &Liveness,
        s: &mut ClusterState,
        t0: Instant,
        steps: u32,
        alive: impl Fn(AgentId) -> bool,
        mut stop: impl FnMut(&Decisions, &ClusterState) -> bool,
    ) -> Option<(Decisions, Instant)> {
        for i in 1..=steps {
            let at = t0 + Duration::from_millis(200 * u64::from(i));
            let ids: Vec<AgentId> = s.agents.keys().copied().collect();
            for id in ids.into_iter().filter(|id| alive(*id)) {
                l.seen_at(id, at);
            }
            let d = l.tick(s, false, at);
            if !d.unreachable.is_empty() {
                mark(s, &d.unreachable);
            }
            if stop(&d, s) {
                return Some((d, at));
            }
        }
        None
    }

    #[test]
    fn nothing_is_concluded_during_the_reregistration_period() {
        let t0 = Instant::now();
        let l = Liveness::new_at(config(), t0);
        let mut s = cluster(10, |i| format!("r{i}"));
        // Only agent 1 calls in: the others are marked only once the period (3 s) and then the
        // timeout (3 s, counted from the period's start) have passed.
        let (d, at) = drive(&l, &mut s, t0, 50, |id| id == AgentId(1), |d, _| !d.unreachable.is_empty())
            .expect("silent agents are marked unreachable");
        assert_eq!(d.unreachable.len(), 9);
        assert!(!d.unreachable.contains(&AgentId(1)));
        assert!(at >= t0 + Duration::from_secs(3), "marked during the re-registration period");
    }

    #[test]
    fn a_mass_loss_trips_the_breaker_and_stops_removals_until_agents_return() {
        let t0 = Instant::now();
        let l = Liveness::new_at(config(), t0);
        let mut s = cluster(10, |i| format!("r{i}"));
        let lost: Vec<AgentId> = (1..=4).map(AgentId).collect();
        let (d, at) = drive(&l, &mut s, t0, 60, |id| id.0 > 4, |d, _| d.tripped.is_some())
            .expect("4 of 10 within the window trips a 30% breaker");
        let trip = d.tripped.unwrap();
        assert!(trip.reason.contains("4 of 10"), "{}", trip.reason);
        assert_eq!(s.agents.values().filter(|a| a.liveness != capstan_state::Liveness::Active).count(), 4);
        assert!(l.tick(&s, false, at + Duration::from_millis(200)).remove.is_empty());
        // They come back: the breaker resets by itself.
        for id in &lost {
            s.apply(&Stamped {
                at: now(),
                command: Command::AgentReconcile { agent: *id, known: vec![], running: vec![], as_of_seq: None },
            })
            .unwrap();
            l.seen_at(*id, at + Duration::from_millis(300));
        }
        let d = l.tick(&s, false, at + Duration::from_millis(400));
        assert!(d.reset.is_some(), "{d:?}");
        assert!(l.breaker().is_none());
    }

    #[test]
    fn removals_go_at_the_configured_rate() {
        let t0 = Instant::now();
        let mut c = config();
        c.breaker_threshold = 1.0;
        let l = Liveness::new_at(c, t0);
        let mut s = cluster(4, |i| format!("r{i}"));
        // One task per agent, with replace_after 1 s.
        let spec: capstan_model::JobSpec = capstan_model::parse_toml(
            "job = \"a/b/c\"\ninstances = 4\nreplace_after = \"1s\"\n[task]\ncommand = \"x\"\nuser = \"nobody\"\ncpus = 0.1\nmem = \"8MiB\"\ndisk = \"1MiB\"\n",
            &capstan_model::ValidationPolicy::default(),
        )
        .unwrap();
        let created = s.apply(&Stamped { at: now(), command: Command::CreateJob { spec, seed: 1 } }).unwrap().created;
        let placements = created
            .iter()
            .zip(1..)
            .map(|(t, a)| capstan_state::Placement { task: *t, agent: AgentId(a), ports: vec![] })
            .collect();
        s.apply(&Stamped { at: now(), command: Command::Place { placements } }).unwrap();
        let mut removals = vec![];
        drive(
            &l,
            &mut s,
            t0,
            200,
            |_| false,
            |d, _| {
                removals.extend(d.remove.iter().copied());
                false
            },
        );
        // Removals are decided but not applied here, so the same agents stay candidates; what
        // counts is the pace: 1 per 10 s, starting with a full bucket of 1.
        assert!(!removals.is_empty());
        assert!(removals.len() <= 1 + 40 / 10, "{} removals in 40 s at 1/10s", removals.len());
    }

    #[test]
    fn a_whole_fault_domain_lost_trips_the_breaker() {
        let t0 = Instant::now();
        let l = Liveness::new_at(config(), t0);
        // 20 agents over 10 racks: losing one rack is 10% of agents (< 30%).
        let mut s = cluster(20, |i| format!("r{}", (i - 1) / 2));
        let (d, _) = drive(&l, &mut s, t0, 60, |id| id.0 > 2, |d, _| d.tripped.is_some())
            .expect("losing every agent of rack r0 trips the breaker");
        let reason = d.tripped.unwrap().reason;
        assert!(reason.contains("rack=r0"), "{reason}");
    }

    #[test]
    fn a_stalled_master_trips_the_breaker_and_does_not_blame_agents() {
        let t0 = Instant::now();
        let l = Liveness::new_at(config(), t0);
        let mut s = cluster(5, |i| format!("r{i}"));
        drive(&l, &mut s, t0, 30, |_| true, |_, _| false);
        let last = t0 + Duration::from_millis(200 * 30);
        // Nothing ran for 10 s (SIGSTOP): the agents' silence is the master's own.
        let d = l.tick(&s, false, last + Duration::from_secs(10));
        assert!(d.stalled.is_some());
        assert!(d.tripped.as_ref().is_some_and(|t| t.reason.contains("stalled")), "{d:?}");
        assert!(d.unreachable.is_empty(), "{d:?}");
        let d = l.tick(&s, false, last + Duration::from_millis(10_200));
        assert!(d.unreachable.is_empty(), "agents get a new re-registration period: {d:?}");
    }
}
