//! Drain and maintenance: an agent taken out of service without breaking any job's SLA, and
//! windows of planned maintenance that the scheduler keeps long-running work away from.
//!
//! A drain is independent of liveness (a draining agent can become unreachable and come back):
//! it is the `drain` field of [`Agent`](crate::Agent), and a draining agent is not schedulable.
//! Which task moves next is decided here, by [`ClusterState::drain_plan`], a pure function of the
//! state; the master's drain loop submits its moves as [`Command::DrainMoves`], and `apply`
//! checks each move against the job's `min_healthy` again before it stops the task, so that two
//! plans computed from the same view can never take a job below its share together.
//! `docs/maintenance.md` is the operator's side of all this.

use crate::command::Command;
use crate::state::{Applied, ClusterState, Job, Rejection, Task};
use capstan_model::{AgentId, Desired, JobKey, JobSpec, JobType, TaskId, TaskState, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// A new long-running (service, system) task is not placed on an agent whose maintenance window
/// starts within this long: it would have to move again soon.
pub const MAINTENANCE_HORIZON_MS: u64 = 30 * 60 * 1000;
/// The longest maintenance window.
pub const MAINTENANCE_DURATION_MAX_MS: u64 = 30 * 24 * 3600 * 1000;
/// Windows kept at most (ended windows are dropped whenever one is scheduled or cancelled).
pub const MAINTENANCE_WINDOWS_MAX: usize = 1_000;
/// Agents named by one window at most.
pub const MAINTENANCE_AGENTS_MAX: usize = 10_000;
/// Tasks one drain step stops at most (across all draining agents).
pub const DRAIN_MOVES_PER_STEP_MAX: usize = 256;

/// An agent being taken out of service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// Who asked (`user@host`).
    pub by: String,
    pub since: Timestamp,
    /// When nothing that had to leave was left on it (`MarkDrained`).
    pub drained_at: Option<Timestamp>,
}

/// Planned maintenance of some agents: from `start`, for `duration_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceWindow {
    pub id: u64,
    pub agents: Vec<AgentId>,
    pub start: Timestamp,
    pub duration_ms: u64,
    pub by: String,
    pub created_at: Timestamp,
}

impl MaintenanceWindow {
    pub fn end(&self) -> Timestamp {
        self.start.plus_ms(self.duration_ms)
    }

    /// Where the window stands at `now`, as the scheduler sees it.
    pub fn phase(&self, now: Timestamp) -> MaintenancePhase {
        if now >= self.end() {
            MaintenancePhase::Ended
        } else if now >= self.start {
            MaintenancePhase::Active
        } else if self.start.0 - now.0 <= MAINTENANCE_HORIZON_MS {
            MaintenancePhase::Soon
        } else {
            MaintenancePhase::Later
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MaintenancePhase {
    /// Underway: no new task of any kind goes there.
    Active,
    /// Starts within [`MAINTENANCE_HORIZON_MS`]: no new long-running (service, system) task.
    Soon,
    /// Further away: the scheduler does not care yet.
    Later,
    Ended,
}

impl MaintenancePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            MaintenancePhase::Active => "active",
            MaintenancePhase::Soon => "starting soon",
            MaintenancePhase::Later => "scheduled",
            MaintenancePhase::Ended => "ended",
        }
    }

    /// Whether a new task of this type may be placed on an agent in this phase.
    pub fn allows(self, job_type: JobType) -> bool {
        match self {
            MaintenancePhase::Active => false,
            MaintenancePhase::Soon => !long_running(job_type),
            MaintenancePhase::Later | MaintenancePhase::Ended => true,
        }
    }
}

/// Service and system tasks run until stopped; batch and cron tasks end by themselves.
pub fn long_running(job_type: JobType) -> bool {
    matches!(job_type, JobType::Service | JobType::System)
}

/// Healthy RUNNING instances a job keeps during drains: `ceil(min_healthy × instances)`; a job
/// without `min_healthy` keeps all but one (one instance down at a time).
pub fn required_healthy(spec: &JobSpec) -> u32 {
    match spec.min_healthy {
        Some(share) => share_of(share, spec.instances),
        None => spec.instances.saturating_sub(1),
    }
}

/// `ceil(share × n)`, forgiving the rounding of binary fractions (`0.66 × 3` is 2, `0.5 × 4` is 2).
pub fn share_of(share: f64, n: u32) -> u32 {
    let x = share.clamp(0.0, 1.0) * f64::from(n);
    ((x - 1e-9).ceil().max(0.0) as u32).min(n)
}

/// Whether a task counts toward its job's SLA: RUNNING, wanted, and healthy (with a health check,
/// its last report said healthy; without one, running is enough).
pub fn serves(task: &Task, job: &Job) -> bool {
    task.state == TaskState::Running
        && task.desired == Desired::Run
        && match job.spec.health_check {
            Some(_) => task.healthy == Some(true),
            None => task.healthy != Some(false),
        }
}

/// A job whose SLA holds a move back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub job: JobKey,
    /// Its tasks on the agent that wait.
    pub waiting: u32,
    pub healthy: u32,
    pub needed: u32,
    pub instances: u32,
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "job {}'s SLA: {} of {} instances healthy, {} must stay healthy",
            self.job, self.healthy, self.instances, self.needed
        )
    }
}

/// Where the drain of one agent stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainProgress {
    /// Service tasks still wanted there (to be moved).
    pub to_move: u32,
    /// Tasks stopping there (moves under way, or stopped for other reasons).
    pub stopping: u32,
    /// Batch and cron tasks running there: left to finish.
    pub batch_running: u32,
    /// System tasks there: they belong to the host and stay.
    pub system: u32,
    /// Jobs whose SLA holds a move back now.
    pub blocked: Vec<Blocked>,
    /// Why nothing moves at all now (the cluster is frozen, the agent does not answer).
    pub waiting: Option<String>,
}

impl DrainProgress {
    /// Nothing that must leave is left: the agent may be marked drained.
    pub fn done(&self) -> bool {
        self.to_move == 0 && self.stopping == 0 && self.batch_running == 0
    }

    /// One line for people: `3 tasks left; blocked by job www/prod/api's SLA: …`.
    pub fn describe(&self) -> String {
        if self.done() {
            return if self.system > 0 {
                format!("drained ({} system task(s) stay)", self.system)
            } else {
                "drained".into()
            };
        }
        let left = self.to_move + self.stopping + self.batch_running;
        let mut parts = vec![format!("{left} task(s) left")];
        if self.stopping > 0 {
            parts.push(format!("{} stopping", self.stopping));
        }
        if self.batch_running > 0 {
            parts.push(format!("{} batch task(s) left to finish", self.batch_running));
        }
        if let Some(w) = &self.waiting {
            parts.push(format!("waiting: {w}"));
        }
        for b in &self.blocked {
            parts.push(format!("blocked by {b}"));
        }
        parts.join("; ")
    }
}

/// What the drain does next: tasks to stop now (their instances start elsewhere), and where each
/// draining agent stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainPlan {
    pub moves: Vec<TaskId>,
    pub agents: BTreeMap<AgentId, DrainProgress>,
}

/// Whether an agent can be drained now, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainSafety {
    pub agent: AgentId,
    pub safe: bool,
    /// Healthy service tasks it holds (the ones that would go down with it).
    pub serving: u32,
    pub why: Option<String>,
}

impl ClusterState {
    /// The next step of every drain: which tasks may stop now without taking any job below its
    /// `min_healthy` share (each job spends its own budget, shared by all draining agents; a
    /// blocked job holds back nothing but itself), at most `max_moves` of them.
    ///
    /// Rules: a service task that does not serve (starting, unhealthy) moves at once, since its
    /// job loses nothing; a serving one moves only while its job has more healthy instances
    /// than [`required_healthy`]; batch and cron tasks are left to finish; system tasks stay.
    /// Nothing moves while the cluster is frozen or from an agent that does not answer.
    pub fn drain_plan(&self, max_moves: usize) -> DrainPlan {
        let mut plan = DrainPlan::default();
        // Healthy instances each job can still lose: computed once, spent by every agent.
        let mut budget: HashMap<&JobKey, (u32, u32)> = HashMap::new();
        for (id, agent) in self.agents.iter().filter(|(_, a)| a.drain.is_some()) {
            let mut p = DrainProgress::default();
            let movable = self.frozen.is_none() && agent.liveness == crate::Liveness::Active;
            if let Some(f) = &self.frozen {
                p.waiting =
                    Some(format!("the cluster is frozen ({}): nothing is moved until it is unfrozen", f.reason));
            } else if agent.liveness != crate::Liveness::Active {
                p.waiting = Some(format!(
                    "the agent is {}: its tasks are left to the liveness rules (replace_after)",
                    agent.liveness.as_str()
                ));
            }
            let mut blocked: BTreeMap<JobKey, Blocked> = BTreeMap::new();
            for t in self.tasks_on(*id) {
                let Some(job) = self.jobs.get(&t.job) else { continue };
                if job.spec.job_type == JobType::System {
                    p.system += 1;
                    continue;
                }
                if t.desired == Desired::Stop {
                    p.stopping += 1;
                    continue;
                }
                if !long_running(job.spec.job_type) {
                    p.batch_running += 1;
                    continue;
                }
                p.to_move += 1;
                if !movable || plan.moves.len() >= max_moves {
                    continue;
                }
                if !serves(t, job) {
                    plan.moves.push(t.id);
                    continue;
                }
                let (healthy, spent) = budget.entry(&job.spec.job).or_insert_with(|| (self.healthy_instances(job), 0));
                let needed = required_healthy(&job.spec);
                if *healthy > needed + *spent {
                    *spent += 1;
                    plan.moves.push(t.id);
                } else {
                    let b = blocked.entry(job.spec.job.clone()).or_insert_with(|| Blocked {
                        job: job.spec.job.clone(),
                        waiting: 0,
                        healthy: *healthy - *spent,
                        needed,
                        instances: job.spec.instances,
                    });
                    b.waiting += 1;
                }
            }
            p.blocked = blocked.into_values().collect();
            plan.agents.insert(*id, p);
        }
        plan
    }

    /// Where one agent's drain stands; `None` when it is not draining.
    pub fn drain_progress(&self, agent: AgentId) -> Option<DrainProgress> {
        self.agents.get(&agent)?.drain.as_ref()?;
        self.drain_plan(DRAIN_MOVES_PER_STEP_MAX).agents.remove(&agent)
    }

    /// The job's instances that serve now (see [`serves`]).
    pub fn healthy_instances(&self, job: &Job) -> u32 {
        job.current.values().filter_map(|id| self.tasks.get(id)).filter(|t| serves(t, job)).count() as u32
    }

    /// The nearest maintenance phase of each agent named by a window that matters at `now`
    /// (active, or starting within the horizon). Usually empty, so cheap to ask once per pass.
    pub fn maintenance_phases(&self, now: Timestamp) -> HashMap<AgentId, MaintenancePhase> {
        let mut out: HashMap<AgentId, MaintenancePhase> = HashMap::new();
        for w in self.maintenance.values() {
            let phase = w.phase(now);
            if !matches!(phase, MaintenancePhase::Active | MaintenancePhase::Soon) {
                continue;
            }
            for a in &w.agents {
                let e = out.entry(*a).or_insert(phase);
                *e = (*e).min(phase);
            }
        }
        out
    }

    /// Whether maintenance lets a new task of this type go to `agent` at `now`.
    pub fn maintenance_allows(&self, agent: AgentId, job_type: JobType, now: Timestamp) -> bool {
        self.maintenance.values().filter(|w| w.agents.contains(&agent)).all(|w| w.phase(now).allows(job_type))
    }

    /// Agents that can be drained now, all together, without any service job falling below its
    /// SLA: a job with `min_healthy` keeps its share, a job without keeps `default_share` of
    /// its instances. Agents already draining count as gone. Agents are taken greedily, those
    /// holding the fewest healthy service tasks first; each verdict assumes the safe agents
    /// before it go too. Agents that are not active, or already draining, are listed unsafe with
    /// the reason.
    pub fn safe_to_drain(&self, default_share: f64) -> Vec<DrainSafety> {
        let needed = |job: &Job| match job.spec.min_healthy {
            Some(share) => share_of(share, job.spec.instances),
            None => share_of(default_share, job.spec.instances),
        };
        // Healthy tasks per job on one agent.
        let serving_on = |agent: AgentId| -> BTreeMap<&JobKey, u32> {
            let mut m: BTreeMap<&JobKey, u32> = BTreeMap::new();
            for t in self.tasks_on(agent) {
                let Some(job) = self.jobs.get(&t.job) else { continue };
                if job.spec.job_type == JobType::Service && job.killed.is_none() && serves(t, job) {
                    *m.entry(&job.spec.job).or_default() += 1;
                }
            }
            m
        };
        let mut lost: BTreeMap<&JobKey, u32> = BTreeMap::new();
        let mut out = Vec::new();
        let mut candidates = Vec::new();
        for (id, a) in &self.agents {
            let serving = serving_on(*id);
            let n: u32 = serving.values().sum();
            if let Some(d) = &a.drain {
                for (job, k) in serving {
                    *lost.entry(job).or_default() += k;
                }
                let what = if d.drained_at.is_some() { "drained" } else { "draining" };
                out.push(DrainSafety { agent: *id, safe: false, serving: n, why: Some(format!("already {what}")) });
            } else if a.liveness != crate::Liveness::Active {
                let why = format!("it is {}", a.liveness.as_str());
                out.push(DrainSafety { agent: *id, safe: false, serving: n, why: Some(why) });
            } else {
                candidates.push((n, *id, serving));
            }
        }
        candidates.sort_by_key(|(n, id, _)| (*n, *id));
        for (n, id, serving) in candidates {
            let mut why = None;
            for (job_key, k) in &serving {
                let job = &self.jobs[*job_key];
                let healthy = self.healthy_instances(job);
                let gone = lost.get(job_key).copied().unwrap_or(0);
                let left = healthy.saturating_sub(gone + k);
                let need = needed(job);
                if left < need {
                    let with =
                        if gone > 0 { " (with the agents drained or listed safe before it gone too)" } else { "" };
                    why = Some(format!(
                        "job {job_key} would keep {left} of {} instances healthy{with}; it needs {need}",
                        job.spec.instances
                    ));
                    break;
                }
            }
            if why.is_none() {
                for (job, k) in serving {
                    *lost.entry(job).or_default() += k;
                }
            }
            out.push(DrainSafety { agent: id, safe: why.is_none(), serving: n, why });
        }
        out
    }

    /// `apply` for the drain and maintenance commands.
    pub(crate) fn apply_drain(&mut self, command: &Command, at: Timestamp, out: &mut Applied) -> Result<(), Rejection> {
        match command {
            Command::DrainAgent { agent, by } => {
                let a = self.agents.get_mut(agent).ok_or(Rejection::NoSuchAgent(*agent))?;
                if a.drain.is_none() {
                    a.drain = Some(Drain { by: by.clone(), since: at, drained_at: None });
                }
            }
            Command::UndrainAgent { agent, .. } => {
                let a = self.agents.get_mut(agent).ok_or(Rejection::NoSuchAgent(*agent))?;
                if a.drain.take().is_some() {
                    out.new_pending = true;
                }
            }
            Command::DrainMoves { moves } => {
                self.refuse_if_frozen()?;
                for id in moves.iter().take(DRAIN_MOVES_PER_STEP_MAX) {
                    // Checked again here, one after the other: each stop counts for the next.
                    let Some(by) = self.may_move(*id) else { continue };
                    self.kill_task(*id, &by, at, out);
                    out.moved.push(*id);
                }
            }
            Command::MarkDrained { agent } => {
                let progress = self.drain_progress(*agent).ok_or_else(|| {
                    Rejection::Invalid(format!("agent {agent} is not draining: nothing to mark drained"))
                })?;
                if !progress.done() {
                    return Err(Rejection::Invalid(format!(
                        "agent {agent} is not drained yet: {}",
                        progress.describe()
                    )));
                }
                let d = self.agents.get_mut(agent).and_then(|a| a.drain.as_mut()).expect("checked above");
                d.drained_at.get_or_insert(at);
            }
            Command::ScheduleMaintenance { agents, start, duration_ms, by } => {
                if agents.is_empty() || agents.len() > MAINTENANCE_AGENTS_MAX {
                    return Err(Rejection::Invalid(format!(
                        "a maintenance window names 1 to {MAINTENANCE_AGENTS_MAX} agents, not {}",
                        agents.len()
                    )));
                }
                if let Some(a) = agents.iter().find(|a| !self.agents.contains_key(a)) {
                    return Err(Rejection::NoSuchAgent(*a));
                }
                if *duration_ms == 0 || *duration_ms > MAINTENANCE_DURATION_MAX_MS {
                    return Err(Rejection::Invalid(format!(
                        "a maintenance window lasts from 1 ms to {} days",
                        MAINTENANCE_DURATION_MAX_MS / 86_400_000
                    )));
                }
                if start.plus_ms(*duration_ms) <= at {
                    return Err(Rejection::Invalid("the maintenance window would end before now".into()));
                }
                self.maintenance.retain(|_, w| w.end() > at);
                if self.maintenance.len() >= MAINTENANCE_WINDOWS_MAX {
                    return Err(Rejection::Invalid(format!(
                        "{MAINTENANCE_WINDOWS_MAX} maintenance windows are scheduled already; cancel some first"
                    )));
                }
                self.maintenance_seq += 1;
                let mut agents = agents.clone();
                agents.sort();
                agents.dedup();
                let id = self.maintenance_seq;
                let w = MaintenanceWindow {
                    id,
                    agents,
                    start: *start,
                    duration_ms: *duration_ms,
                    by: by.clone(),
                    created_at: at,
                };
                self.maintenance.insert(id, w);
                out.maintenance_id = Some(id);
            }
            Command::CancelMaintenance { id, .. } => {
                if self.maintenance.remove(id).is_none() {
                    return Err(Rejection::Invalid(format!("no maintenance window {id}")));
                }
                self.maintenance.retain(|_, w| w.end() > at);
                out.new_pending = true;
            }
            other => unreachable!("apply_drain called with {}", other.name()),
        }
        Ok(())
    }

    /// Whether the drain may stop this task now, and the reason to give it: a wanted service task
    /// on a draining agent whose job keeps its SLA without it.
    fn may_move(&self, id: TaskId) -> Option<String> {
        let t = self.tasks.get(&id)?;
        let agent = self.agents.get(&t.agent?)?;
        let drain = agent.drain.as_ref()?;
        let job = self.jobs.get(&t.job)?;
        if !t.state.holds_resources()
            || t.desired != Desired::Run
            || job.killed.is_some()
            || job.spec.job_type != JobType::Service
            || agent.liveness != crate::Liveness::Active
        {
            return None;
        }
        if serves(t, job) && self.healthy_instances(job) <= required_healthy(&job.spec) {
            return None;
        }
        Some(format!("moved off agent {} (drained by {})", agent.info.id, drain.by))
    }
}
