//! The cluster state and the one function that changes it.

use crate::agent::{Agent, AgentInfo, Liveness, Stray};
use crate::command::{Command, Freeze, Placement, Quota, Report, SchedulerSettings, Stamped, StatusUpdate};
use capstan_model::lifecycle::{self, Context, Effect, Event, Outcome, RestartPolicy};
use capstan_model::spec::ReplaceAfter;
use capstan_model::{derive_id, AgentId, Desired, JobKey, JobSpec, JobType, TaskExit, TaskId, TaskState, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

mod system;
pub use system::{agent_matches, DROPPED_INSTANCES_KEPT_MAX};

/// How many state changes a task remembers (the first one and the most recent ones).
pub const TASK_EVENTS_MAX: usize = 12;
/// Ended tasks kept per instance, for `task list` and debugging; older ones are forgotten.
pub const ENDED_TASKS_PER_INSTANCE_MAX: usize = 4;
/// Instances a `KillJobSlice` stops at most: a kill of a large job is one durable step per slice,
/// each short enough that the writer, the API and agents are served between them.
pub const KILL_SLICE_INSTANCES: u32 = 1_000;
/// Instances whose tasks one `ForgetJobSlice` forgets at most (each keeps at most
/// `ENDED_TASKS_PER_INSTANCE_MAX` + 1 tasks). A killed job with no more instances than this is
/// forgotten at once, by the command that ended its last task.
pub const FORGET_SLICE_INSTANCES: u32 = 1_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub spec: Arc<JobSpec>,
    /// The job's key, shared by its tasks.
    pub key: Arc<JobKey>,
    /// Creation order among jobs.
    pub ord: u64,
    pub version: u32,
    pub created_at: Timestamp,
    /// Set when the job was killed: its tasks are stopping and it goes away when they all ended.
    pub killed: Option<String>,
    /// Batch: instances that are over for good, and whether they succeeded.
    pub done: BTreeMap<u32, bool>,
    pub finished_at: Option<Timestamp>,
    /// The task of each instance: the live (or latest) one; kept, not derived, because a copy
    /// taken back when its agent returns is older than the replacement it displaced.
    pub current: BTreeMap<u32, TaskId>,
    /// System jobs: the instance on each matching agent (instance → agent). An instance whose
    /// agent was removed or stopped matching leaves this map (its task ended) and is not replaced.
    pub pinned: BTreeMap<u32, AgentId>,
    /// System jobs: the number of the next instance (numbers are never reused).
    pub next_instance: u32,
    /// Cron jobs: their runs and the latest fire time handled; `None` for other types.
    pub cron: Option<crate::cron::CronRuns>,
    /// Rolling updates: older versions' specs, the update in progress and past ones.
    pub updates: crate::updates::JobUpdates,
    // --- derived from tasks
    /// All tasks of the job still remembered, per instance, oldest first.
    #[serde(skip)]
    pub history: BTreeMap<u32, Vec<TaskId>>,
    /// System jobs: `pinned` the other way round (agent → instance).
    #[serde(skip)]
    pub pinned_by_agent: BTreeMap<AgentId, u32>,
    /// How many of the tasks in `history` are not terminal: a killed job is forgotten when this
    /// reaches 0, without rescanning its tasks (a scan per ended task was quadratic).
    #[serde(skip)]
    pub live_tasks: u32,
}

impl Job {
    /// Nothing of the job runs or will run again: it was killed, or it is a finished batch job,
    /// and none of its tasks is live. Only such a job may be forgotten.
    pub fn is_over(&self) -> bool {
        self.live_tasks == 0
            && (self.killed.is_some() || (self.spec.job_type == JobType::Batch && self.finished_at.is_some()))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEventRecord {
    pub at: Timestamp,
    pub state: TaskState,
    /// Boxed: 8 bytes less than a `String` per event, times a few events per task.
    pub reason: Box<str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    /// Creation order across the cluster.
    pub seq: u64,
    /// Shared with the job (and its other tasks): one key in memory per job, not per task.
    pub job: Arc<JobKey>,
    pub instance: u32,
    pub job_version: u32,
    pub state: TaskState,
    pub desired: Desired,
    pub agent: Option<AgentId>,
    pub ports: Vec<u16>,
    pub pid: Option<u32>,
    pub exit: Option<TaskExit>,
    /// Consecutive failures of this instance before this task.
    pub failures: u32,
    /// Not to be placed before this time (restart backoff).
    pub not_before: Timestamp,
    pub created_at: Timestamp,
    pub running_since: Option<Timestamp>,
    /// Killed by `KillTask` on a service: start a fresh task for the instance once this one ended.
    pub restart_when_stopped: bool,
    /// The last health report while it runs: `None` before the first (or without a check).
    pub healthy: Option<bool>,
    /// Why Capstan stopped it (user request, job killed, preempted by …): its end says so.
    pub kill_reason: Option<String>,
    pub events: Vec<TaskEventRecord>,
}

impl Task {
    /// Why the task is in its state, in words: the reason of its latest event.
    pub fn reason(&self) -> &str {
        self.events.last().map(|e| &*e.reason).unwrap_or("")
    }

    fn record(&mut self, at: Timestamp, reason: String) {
        let rec = TaskEventRecord { at, state: self.state, reason: reason.into_boxed_str() };
        if self.events.len() >= TASK_EVENTS_MAX {
            // Keep the first event (creation), drop the oldest after it.
            self.events.remove(1);
        }
        self.events.push(rec);
    }
}

/// Counters of things that happened and are worth a metric; part of the state so that replay
/// yields the same numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub illegal_transitions: u64,
    pub duplicate_updates: u64,
    pub updates_for_unknown_tasks: u64,
    pub placements_refused: u64,
    /// Removal steps of unreachable agents.
    pub agent_removals: u64,
    /// Tasks replaced elsewhere because their agent stayed unreachable.
    pub tasks_replaced_unreachable: u64,
    /// LOST copies taken back when their agent returned before their replacement started.
    pub tasks_taken_back: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The log index of the last command applied.
    pub index: u64,
    pub jobs: BTreeMap<JobKey, Job>,
    pub tasks: BTreeMap<TaskId, Task>,
    /// Creation counter: orders tasks by creation for rebuilding per-instance history.
    pub task_seq: u64,
    /// Job creation counter (`Job::ord`).
    pub job_seq: u64,
    pub agents: BTreeMap<AgentId, Agent>,
    pub counters: Counters,
    /// Production quotas per role; a role without one is not limited.
    pub quotas: BTreeMap<String, Quota>,
    pub scheduler: SchedulerSettings,
    /// Set while the cluster is frozen: no kills, replacements, preemptions or removals.
    pub frozen: Option<Freeze>,
    /// Planned maintenance windows, by id (`crate::drain`).
    pub maintenance: BTreeMap<u64, crate::drain::MaintenanceWindow>,
    /// The id of the newest maintenance window.
    pub maintenance_seq: u64,
    /// The epoch of the newest leadership term (`BeginTerm`): agents ignore a master whose epoch
    /// is older than one they have seen. Milliseconds since the Unix epoch when the term began,
    /// or one more than the previous term's when the clock is behind; 0 before the first term.
    pub epoch: u64,
    /// Set when this state was installed from a backup (`capstan admin restore`): when, and from
    /// which backup. Added in snapshot format version 4.
    pub restored: Option<crate::backup::Restored>,
    // --- derived
    /// Tasks waiting for a place, by id.
    #[serde(skip)]
    pub pending: BTreeSet<TaskId>,
    /// The same tasks in the order the scheduler takes them: highest priority, then oldest.
    #[serde(skip)]
    pub queue: BTreeSet<QueueKey>,
    /// Tasks by state (index: `TaskState::ALL` order), kept up to date so reading it is free.
    #[serde(skip)]
    pub counts: [u64; 10],
}

/// A pending task's place in the scheduling queue: `(-priority, job order, task creation seq, id)`:
/// highest priority first, then by job, so that a job's pending tasks are next to each other and
/// the scheduler can skip a job that fits nowhere in one step.
pub type QueueKey = (i64, u64, u64, TaskId);

fn state_index(s: TaskState) -> usize {
    TaskState::ALL.iter().position(|x| *x == s).expect("every state is in ALL")
}

/// Why a command was refused; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("job {0} already exists")]
    JobExists(JobKey),
    #[error("no job {0}")]
    NoSuchJob(JobKey),
    #[error("no task {0}")]
    NoSuchTask(TaskId),
    #[error("no agent {0}")]
    NoSuchAgent(AgentId),
    #[error("job {0} is being killed")]
    JobKilled(JobKey),
    #[error("{0}")]
    OverQuota(String),
    #[error("the cluster is frozen ({0}); destructive actions wait for `capstan admin unfreeze`")]
    Frozen(String),
    #[error("invalid command: {0}")]
    Invalid(String),
    /// The command does not fit what is going on (an update in progress, say).
    #[error("{0}")]
    Conflict(String),
}

/// `Ok` unless frozen (a free function for callers that hold a mutable borrow of another field).
pub(crate) fn unfrozen(frozen: &Option<Freeze>) -> Result<(), Rejection> {
    match frozen {
        Some(f) => Err(Rejection::Frozen(f.reason.clone())),
        None => Ok(()),
    }
}

/// What applying a command changed, for the shell: whom to wake up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Agents whose orders changed.
    pub agents_touched: BTreeSet<AgentId>,
    /// New tasks were created or became pending.
    pub new_pending: bool,
    /// Tasks created by this command (CreateJob), in instance order.
    pub created: Vec<TaskId>,
    /// Placements that no longer fit and were dropped (Place).
    pub placements_refused: u32,
    /// Tasks that became strays (AgentReconcile), with why.
    pub strays_found: Vec<(TaskId, String)>,
    /// The agent was not active and is now (AgentReconcile).
    pub agent_back: bool,
    /// Tasks replaced elsewhere (RemoveAgent).
    pub replaced: Vec<TaskId>,
    /// LOST copies taken back (AgentReconcile).
    pub taken_back: Vec<TaskId>,
    /// What a StartCronRun did.
    pub cron: Option<crate::cron::CronStarted>,
    /// KillJobSlice: the instance the next slice starts from; `None` when this one reached the
    /// job's last instance (or the job is gone).
    pub kill_next: Option<u32>,
    /// KillJob, KillJobSlice, ForgetJobSlice: the job is forgotten (nothing of it is left).
    pub job_forgotten: bool,
    /// Tasks stopped to move off draining agents (DrainMoves).
    pub moved: Vec<TaskId>,
    /// The id of the window scheduled (ScheduleMaintenance).
    pub maintenance_id: Option<u64>,
}

impl ClusterState {
    /// The one way to change the state. Deterministic: the same commands in the same order give the
    /// same state. A refused command changes nothing.
    pub fn apply(&mut self, stamped: &Stamped) -> Result<Applied, Rejection> {
        let at = stamped.at;
        let mut out = Applied::default();
        match &stamped.command {
            Command::RegisterAgent { info } => {
                if info.hostname.is_empty() {
                    return Err(Rejection::Invalid("an agent must have a hostname".into()));
                }
                // Overlapping port ranges would count ports twice; keep them merged.
                let info_n = AgentInfo { capacity: info.capacity.clone().normalized(), ..info.clone() };
                match self.agents.get_mut(&info.id) {
                    Some(agent) => {
                        agent.info = info_n.clone();
                        agent.registered_at = at;
                        agent.orders_version += 1;
                    }
                    None => {
                        self.agents.insert(info.id, Agent::new(info_n.clone(), at));
                    }
                }
                out.agents_touched.insert(info.id);
                out.new_pending = true;
                self.system_agent_changed(info.id, at, &mut out);
            }
            Command::AgentReconcile { agent, known, running, as_of_seq } => {
                self.reconcile_agent(*agent, known, running, *as_of_seq, at, &mut out)?;
            }
            Command::AgentsUnreachable { agents } => {
                for id in agents {
                    let Some(a) = self.agents.get_mut(id) else { continue };
                    if a.liveness != Liveness::Active {
                        continue;
                    }
                    a.liveness = Liveness::Unreachable { since: at };
                    let tasks: Vec<TaskId> = a.tasks.iter().copied().collect();
                    for t in tasks {
                        self.step(t, &Event::AgentUnreachable, at, &mut out);
                    }
                }
            }
            Command::RemoveAgent { agent } => {
                self.refuse_if_frozen()?;
                self.remove_agent(*agent, at, &mut out)?;
            }
            Command::BeginTerm { epoch } => {
                if *epoch <= self.epoch {
                    return Err(Rejection::Conflict(format!(
                        "a term with epoch {epoch} cannot begin: epoch {} began already",
                        self.epoch
                    )));
                }
                self.epoch = *epoch;
            }
            Command::SetFreeze { freeze } => {
                self.frozen = freeze.as_ref().map(|f| Freeze { at, ..f.clone() });
                if self.frozen.is_none() {
                    self.system_unfrozen(at, &mut out);
                }
                // Agents learn it with their orders (no health-check kills while frozen).
                for a in self.agents.values_mut() {
                    a.orders_version += 1;
                    out.agents_touched.insert(a.info.id);
                }
            }
            Command::CreateJob { spec, seed } => {
                if let Some(old) = self.jobs.get(&spec.job) {
                    // A killed job with no live task is gone for its users; only its forgetting
                    // (in slices) is not done yet. A new job under its key finishes it now.
                    if !(old.killed.is_some() && old.is_over()) {
                        return Err(Rejection::JobExists(spec.job.clone()));
                    }
                }
                if self.jobs.get(&spec.job).is_some_and(|old| old.killed.is_some() && old.is_over()) {
                    self.forget_instances(&spec.job, u32::MAX);
                }
                if spec.production {
                    let instances = match spec.job_type {
                        JobType::System => self.matching_agents(spec).count() as u32,
                        _ => spec.instances,
                    };
                    self.check_quota(&spec.job.role, &spec.task.demand(), instances)?;
                }
                let spec = Arc::new(spec.clone());
                self.job_seq += 1;
                self.jobs.insert(
                    spec.job.clone(),
                    Job {
                        spec: spec.clone(),
                        key: Arc::new(spec.job.clone()),
                        ord: self.job_seq,
                        version: 1,
                        created_at: at,
                        killed: None,
                        done: BTreeMap::new(),
                        finished_at: None,
                        current: BTreeMap::new(),
                        pinned: BTreeMap::new(),
                        next_instance: 0,
                        cron: (spec.job_type == JobType::Cron).then(|| crate::cron::CronRuns::new(at)),
                        updates: Default::default(),
                        history: BTreeMap::new(),
                        live_tasks: 0,
                        pinned_by_agent: BTreeMap::new(),
                    },
                );
                // A cron job's tasks are created by its runs (StartCronRun), not now.
                let instances = if spec.job_type == JobType::Cron { 0 } else { spec.instances };
                let mut next = *seed;
                for instance in 0..instances {
                    next = derive_id(next);
                    let id = self.fresh_id(next);
                    self.create_task(id, &spec.job, instance, 1, 0, at, at);
                    out.created.push(id);
                }
                if spec.job_type == JobType::System {
                    self.system_job_created(&spec.job, *seed, at, &mut out);
                }
                out.new_pending = true;
            }
            Command::KillJob { job, by } => {
                self.refuse_if_frozen()?;
                let j = self.jobs.get_mut(job).ok_or_else(|| Rejection::NoSuchJob(job.clone()))?;
                if j.killed.is_none() {
                    j.killed = Some(by.clone());
                }
                let ids: Vec<TaskId> = j.current.values().copied().collect();
                crate::work::add(ids.len() as u64);
                for id in ids {
                    self.step(id, &Event::Kill { by: by.clone() }, at, &mut out);
                }
                self.forget_job_if_over(job);
                out.job_forgotten = !self.jobs.contains_key(job);
            }
            Command::KillJobSlice { job, by, from_instance, instances_max } => {
                self.refuse_if_frozen()?;
                if *instances_max == 0 {
                    return Err(Rejection::Invalid("a kill slice must stop at least one instance".into()));
                }
                let j = self.jobs.get_mut(job).ok_or_else(|| Rejection::NoSuchJob(job.clone()))?;
                if j.killed.is_none() {
                    j.killed = Some(by.clone());
                }
                let mut range = j.current.range(from_instance..);
                let ids: Vec<TaskId> = range.by_ref().take(*instances_max as usize).map(|(_, id)| *id).collect();
                out.kill_next = range.next().map(|(i, _)| *i);
                crate::work::add(ids.len() as u64);
                for id in ids {
                    self.step(id, &Event::Kill { by: by.clone() }, at, &mut out);
                }
                self.forget_job_if_over(job);
                if !self.jobs.contains_key(job) {
                    out.kill_next = None;
                    out.job_forgotten = true;
                }
            }
            Command::ForgetJobSlice { job, instances_max } => {
                if *instances_max == 0 {
                    return Err(Rejection::Invalid("a forget slice must forget at least one instance".into()));
                }
                let j = self.jobs.get(job).ok_or_else(|| Rejection::NoSuchJob(job.clone()))?;
                if !j.is_over() {
                    return Err(Rejection::Conflict(format!(
                        "job {job} cannot be forgotten: {}",
                        if j.live_tasks > 0 {
                            format!("{} of its tasks have not ended", j.live_tasks)
                        } else {
                            "it was not killed and is not a finished batch job".to_string()
                        }
                    )));
                }
                out.job_forgotten = self.forget_instances(job, *instances_max);
            }
            Command::KillTask { task, by } => {
                self.refuse_if_frozen()?;
                if !self.tasks.contains_key(task) {
                    return Err(Rejection::NoSuchTask(*task));
                }
                self.kill_task(*task, by, at, &mut out);
            }
            Command::Preempt { preemptions } => {
                self.refuse_if_frozen()?;
                for p in preemptions {
                    let (Some(victim), Some(by)) = (self.tasks.get(&p.victim), self.tasks.get(&p.by)) else { continue };
                    let (Some(vj), Some(bj)) = (self.jobs.get(&victim.job), self.jobs.get(&by.job)) else { continue };
                    // Re-checked here, as placements are: never a production victim, never an equal or higher priority.
                    if vj.spec.production || !bj.spec.production || vj.spec.priority >= bj.spec.priority {
                        continue;
                    }
                    if !victim.state.holds_resources() || victim.desired != Desired::Run {
                        continue;
                    }
                    let reason = format!(
                        "preempted by task {} of job {} (production, priority {})",
                        p.by, by.job, bj.spec.priority
                    );
                    self.kill_task(p.victim, &reason, at, &mut out);
                }
            }
            Command::SetQuota { role, quota } => match quota {
                Some(q) => {
                    self.quotas.insert(role.clone(), *q);
                }
                None => {
                    self.quotas.remove(role);
                }
            },
            Command::SetSchedulerSettings { settings } => self.scheduler = *settings,
            Command::Place { placements } => {
                for p in placements {
                    if self.place(p, at) {
                        self.step(p.task, &Event::Assign { agent: p.agent }, at, &mut out);
                    } else {
                        out.placements_refused += 1;
                        self.counters.placements_refused += 1;
                    }
                }
            }
            Command::AgentUpdates { agent, updates } => {
                if !self.agents.contains_key(agent) {
                    return Err(Rejection::NoSuchAgent(*agent));
                }
                for u in updates {
                    self.agent_update(*agent, u, at, &mut out);
                }
            }
            Command::StartCronRun { job, scheduled_at, missed, seed, by } => {
                let req =
                    crate::cron::RunRequest { job, scheduled_at: *scheduled_at, missed: *missed, seed: *seed, by };
                self.start_cron_run(req, at, &mut out)?;
            }
            Command::DrainAgent { .. }
            | Command::UndrainAgent { .. }
            | Command::DrainMoves { .. }
            | Command::MarkDrained { .. }
            | Command::ScheduleMaintenance { .. }
            | Command::CancelMaintenance { .. } => self.apply_drain(&stamped.command, at, &mut out)?,
            Command::StartUpdate { spec, by, seed } => self.start_update(spec, by, *seed, at, &mut out)?,
            Command::UpdateStep { job } => self.update_step(job, at, &mut out)?,
            Command::UpdateControl { job, action, by } => self.update_control(job, *action, by, at, &mut out)?,
        }
        Ok(out)
    }

    /// Destructive commands are refused while the cluster is frozen, saying why it is.
    pub(crate) fn refuse_if_frozen(&self) -> Result<(), Rejection> {
        unfrozen(&self.frozen)
    }

    /// Stops one task; a live service instance gets a fresh task once this one ended.
    pub(crate) fn kill_task(&mut self, task: TaskId, by: &str, at: Timestamp, out: &mut Applied) {
        let Some(t) = self.tasks.get(&task) else { return };
        let restart = !t.state.is_terminal()
            && self
                .jobs
                .get(&t.job)
                .is_some_and(|j| j.killed.is_none() && matches!(j.spec.job_type, JobType::Service | JobType::System));
        self.step(task, &Event::Kill { by: by.to_string() }, at, out);
        // Gone when it was the last live task of a killed job (forgotten with the job).
        let Some(t) = self.tasks.get_mut(&task) else { return };
        if restart {
            t.restart_when_stopped = true;
            if t.state.is_terminal() {
                self.restart_instance(task, 0, 0, at, out);
            }
        }
    }

    /// `AgentReconcile`: the agent is active again; what it has is compared with what the master
    /// has there (see the command's documentation).
    fn reconcile_agent(
        &mut self,
        agent: AgentId,
        known: &[TaskId],
        running: &[TaskId],
        as_of_seq: Option<u64>,
        at: Timestamp,
        out: &mut Applied,
    ) -> Result<(), Rejection> {
        let a = self.agents.get_mut(&agent).ok_or(Rejection::NoSuchAgent(agent))?;
        let was = a.liveness;
        if was != Liveness::Active {
            a.liveness = Liveness::Active;
            a.orders_version += 1;
            out.agents_touched.insert(agent);
            out.agent_back = true;
            out.new_pending = true;
            self.system_agent_changed(agent, at, out);
        }
        let a = self.agents.get_mut(&agent).expect("checked above");
        let stale = as_of_seq.is_some_and(|seq| a.last_update_seq > seq);
        let known: BTreeSet<TaskId> = known.iter().copied().collect();
        let running: BTreeSet<TaskId> = running.iter().copied().collect();
        // Its unreachable tasks: back if it still has them, lost (and replaced) if not.
        let held: Vec<TaskId> = a.tasks.iter().copied().collect();
        for id in &held {
            let Some(t) = self.tasks.get(id) else { continue };
            let has = known.contains(id);
            match t.state {
                TaskState::Unreachable if has => self.step(*id, &Event::AgentBack, at, out),
                TaskState::Unreachable if !stale => self.step(*id, &Event::AgentLost, at, out),
                TaskState::Starting | TaskState::Running | TaskState::Killing if !has && !stale => {
                    self.step(*id, &Event::AgentLost, at, out)
                }
                _ => {}
            }
        }
        if stale {
            return Ok(());
        }
        // Strays: running there without the master wanting them.
        let a = self.agents.get_mut(&agent).expect("checked above");
        a.strays.retain(|id, _| running.contains(id));
        for id in running {
            let here = self.tasks.get(&id).is_some_and(|t| t.agent == Some(agent) && t.state.holds_resources());
            if here || self.agents[&agent].strays.contains_key(&id) {
                continue;
            }
            let stray = match self.tasks.get(&id) {
                None => Some(Stray {
                    since: at,
                    stop_now: false,
                    reason: "unknown to the master: stopped once the stray grace period has passed".into(),
                }),
                Some(t) if t.agent != Some(agent) => Some(Stray {
                    since: at,
                    stop_now: false,
                    reason: "the master has it on another agent: stopped once the stray grace period has passed".into(),
                }),
                Some(t) => self.returning_copy(id, t.state, at, out),
            };
            if let Some(stray) = stray {
                out.strays_found.push((id, stray.reason.clone()));
                let a = self.agents.get_mut(&agent).expect("checked above");
                a.strays.insert(id, stray);
                a.orders_version += 1;
                out.agents_touched.insert(agent);
            }
        }
        Ok(())
    }

    /// A task the master has ended (on this agent) runs there: the copy of an instance that was
    /// replaced while its agent was unreachable, say. The rule, documented in
    /// docs/operations.md: if the instance's replacement is RUNNING (and not unhealthy), the
    /// returning copy is surplus and stops; otherwise the replacement stops and the returning
    /// copy is taken back (it keeps serving). Nothing is stopped or taken back while frozen: the
    /// copy is recorded, and stopped after the freeze.
    fn returning_copy(&mut self, id: TaskId, state: TaskState, at: Timestamp, out: &mut Applied) -> Option<Stray> {
        let t = &self.tasks[&id];
        let stop = |reason: String| Some(Stray { since: at, stop_now: true, reason });
        let Some(job) = self.jobs.get(&t.job) else {
            return stop("its job is gone".into());
        };
        if job.killed.is_some() {
            return stop("its job was killed".into());
        }
        let Some(&current) = job.current.get(&t.instance) else {
            return stop(format!("the master has it as {state}"));
        };
        if state != TaskState::Lost || current == id || t.desired != Desired::Run {
            return stop(format!("the master has it as {state}"));
        }
        let r = &self.tasks[&current];
        let replacement_serves =
            matches!(r.state, TaskState::Running) && r.healthy != Some(false) || r.state.is_terminal();
        let agent = t.agent.and_then(|a| self.agents.get(&a));
        let fits = agent.is_some_and(|a| {
            a.fits(&job.spec_for(t.job_version).task.demand()) && t.ports.iter().all(|p| !a.used_ports.contains(p))
        });
        if replacement_serves || self.frozen.is_some() || !fits {
            return stop(format!(
                "surplus copy of instance {}: task {current} replaced it while its agent was unreachable",
                t.instance
            ));
        }
        // Take the returning copy back, then stop the replacement (no longer the instance's task,
        // so stopping it starts nothing new).
        let (job_key, instance) = (t.job.clone(), t.instance);
        self.jobs.get_mut(&job_key).expect("exists").current.insert(instance, id);
        self.step(id, &Event::AgentBack, at, out);
        let by = format!("surplus: task {id} of instance {instance} came back with its agent before this one started");
        self.step(current, &Event::Kill { by }, at, out);
        self.counters.tasks_taken_back += 1;
        out.taken_back.push(id);
        None
    }

    /// `RemoveAgent`: replaces the unreachable agent's tasks whose job's `replace_after` passed
    /// (and ends those that were to stop anyway); the agent is removed once nothing it holds may
    /// be replaced later.
    fn remove_agent(&mut self, agent: AgentId, at: Timestamp, out: &mut Applied) -> Result<(), Rejection> {
        let a = self.agents.get(&agent).ok_or(Rejection::NoSuchAgent(agent))?;
        let since = match a.liveness {
            Liveness::Unreachable { since } => since,
            other => {
                return Err(Rejection::Invalid(format!("agent {agent} is {}, not unreachable", other.as_str())));
            }
        };
        let due: Vec<TaskId> = self.due_for_replacement(agent, at).collect();
        for id in &due {
            let dropped = self.system_task_lost_with_agent(*id);
            let replaced = !dropped && self.tasks.get(id).is_some_and(|t| t.desired == Desired::Run);
            self.step(*id, &Event::AgentLost, at, out);
            if replaced {
                self.counters.tasks_replaced_unreachable += 1;
                out.replaced.push(*id);
            }
        }
        self.counters.agent_removals += 1;
        let later = self.tasks_on(agent).any(|t| {
            t.state == TaskState::Unreachable
                && self
                    .jobs
                    .get(&t.job)
                    .is_some_and(|j| j.spec.replace_after.unwrap_or(ReplaceAfter::DEFAULT).ms().is_some())
        });
        if !later {
            let a = self.agents.get_mut(&agent).expect("checked above");
            a.liveness = Liveness::Removed { since, at };
            self.system_agent_removed(agent, at, out);
        }
        Ok(())
    }

    /// Tasks on an unreachable agent that a removal at `now` would end: those to stop anyway, and
    /// those whose job's `replace_after` has passed since the agent became unreachable.
    pub fn due_for_replacement(&self, agent: AgentId, now: Timestamp) -> impl Iterator<Item = TaskId> + '_ {
        let since = self.agents.get(&agent).and_then(|a| match a.liveness {
            Liveness::Unreachable { since } => Some(since),
            _ => None,
        });
        self.tasks_on(agent)
            .filter(move |t| {
                let Some(since) = since else { return false };
                if t.state != TaskState::Unreachable {
                    return false;
                }
                if t.desired == Desired::Stop {
                    return true;
                }
                let after = self.jobs.get(&t.job).map(|j| j.spec.replace_after.unwrap_or(ReplaceAfter::DEFAULT));
                after.and_then(|r| r.ms()).is_some_and(|ms| since.plus_ms(ms) <= now)
            })
            .map(|t| t.id)
    }

    /// Whether an `AgentReconcile` with these lists would change anything: heartbeats are
    /// compared under the read lock and logged only when they do.
    pub fn reconcile_needed(&self, agent: AgentId, known: &[TaskId], running: &[TaskId], as_of_seq: u64) -> bool {
        let Some(a) = self.agents.get(&agent) else { return false };
        if a.liveness != Liveness::Active {
            return true;
        }
        if a.last_update_seq > as_of_seq {
            return false;
        }
        let known: BTreeSet<TaskId> = known.iter().copied().collect();
        let running_set: BTreeSet<TaskId> = running.iter().copied().collect();
        let missing = self.tasks_on(agent).any(|t| {
            matches!(t.state, TaskState::Starting | TaskState::Running | TaskState::Killing | TaskState::Unreachable)
                && !known.contains(&t.id)
        });
        let new_strays = running.iter().any(|id| {
            !a.strays.contains_key(id)
                && !self.tasks.get(id).is_some_and(|t| t.agent == Some(agent) && t.state.holds_resources())
        });
        let gone_strays = a.strays.keys().any(|id| !running_set.contains(id));
        missing || new_strays || gone_strays
    }

    /// What the production jobs of a role hold now (all their instances, placed or not).
    pub fn production_usage(&self, role: &str) -> Quota {
        let mut q = Quota::default();
        for j in self.jobs.values().filter(|j| j.spec.production && j.spec.job.role == role && j.killed.is_none()) {
            let d = j.spec.task.demand();
            let n = u64::from(j.instance_count());
            q.cpus_milli += u64::from(d.cpus_milli) * n;
            q.mem_bytes += d.mem_bytes * n;
            q.disk_bytes += d.disk_bytes * n;
        }
        q
    }

    pub(crate) fn check_quota(
        &self,
        role: &str,
        demand: &capstan_model::Demand,
        instances: u32,
    ) -> Result<(), Rejection> {
        let Some(quota) = self.quotas.get(role) else { return Ok(()) };
        let used = self.production_usage(role);
        let n = u64::from(instances);
        let want = Quota {
            cpus_milli: u64::from(demand.cpus_milli) * n,
            mem_bytes: demand.mem_bytes * n,
            disk_bytes: demand.disk_bytes * n,
        };
        let mut over = Vec::new();
        let cpus = |m: u64| format!("{}", m as f64 / 1000.0);
        let size = |b: u64| capstan_model::ByteSize(b).human();
        if used.cpus_milli + want.cpus_milli > quota.cpus_milli {
            over.push(format!(
                "cpus: {} in use + {} asked > {} quota",
                cpus(used.cpus_milli),
                cpus(want.cpus_milli),
                cpus(quota.cpus_milli)
            ));
        }
        if used.mem_bytes + want.mem_bytes > quota.mem_bytes {
            over.push(format!(
                "mem: {} in use + {} asked > {} quota",
                size(used.mem_bytes),
                size(want.mem_bytes),
                size(quota.mem_bytes)
            ));
        }
        if used.disk_bytes + want.disk_bytes > quota.disk_bytes {
            over.push(format!(
                "disk: {} in use + {} asked > {} quota",
                size(used.disk_bytes),
                size(want.disk_bytes),
                size(quota.disk_bytes)
            ));
        }
        if over.is_empty() {
            Ok(())
        } else {
            Err(Rejection::OverQuota(format!("role {role} is over its production quota: {}", over.join("; "))))
        }
    }

    pub(crate) fn fresh_id(&self, mut candidate: u64) -> TaskId {
        crate::work::add(1);
        while self.tasks.contains_key(&TaskId(candidate)) {
            crate::work::add(1);
            candidate = derive_id(candidate);
        }
        TaskId(candidate)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn create_task(
        &mut self,
        id: TaskId,
        job: &JobKey,
        instance: u32,
        version: u32,
        failures: u32,
        at: Timestamp,
        not_before: Timestamp,
    ) {
        let j = self.jobs.get_mut(job).expect("job of a new task exists");
        self.task_seq += 1;
        let mut task = Task {
            id,
            seq: self.task_seq,
            job: j.key.clone(),
            instance,
            job_version: version,
            state: TaskState::Pending,
            desired: Desired::Run,
            agent: None,
            ports: Vec::new(),
            pid: None,
            exit: None,
            failures,
            not_before,
            created_at: at,
            running_since: None,
            restart_when_stopped: false,
            healthy: None,
            kill_reason: None,
            events: Vec::new(),
        };
        let reason = if not_before > at {
            format!("waiting {} ms before restarting (failed {failures} times in a row)", not_before.since(at))
        } else {
            "waiting for a place".to_string()
        };
        task.record(at, reason);
        j.current.insert(instance, id);
        let history = j.history.entry(instance).or_default();
        history.push(id);
        let forgotten: Vec<TaskId> = if history.len() > ENDED_TASKS_PER_INSTANCE_MAX + 1 {
            history.drain(..history.len() - ENDED_TASKS_PER_INSTANCE_MAX - 1).collect()
        } else {
            vec![]
        };
        j.live_tasks += 1;
        let (priority, ord) = (j.spec.priority, j.ord);
        crate::work::add(1 + forgotten.len() as u64);
        for old in forgotten {
            if let Some(t) = self.tasks.remove(&old) {
                self.counts[state_index(t.state)] -= 1;
                if !t.state.is_terminal() {
                    j.live_tasks -= 1;
                }
            }
        }
        self.queue.insert((-i64::from(priority), ord, task.seq, id));
        self.tasks.insert(id, task);
        self.pending.insert(id);
        self.counts[state_index(TaskState::Pending)] += 1;
    }

    /// Checks a placement against the current state and reserves it. False: nothing changed.
    fn place(&mut self, p: &Placement, at: Timestamp) -> bool {
        let Some(task) = self.tasks.get(&p.task) else {
            return false;
        };
        if task.state != TaskState::Pending || task.desired != Desired::Run {
            return false;
        }
        let Some(job) = self.jobs.get(&task.job) else {
            return false;
        };
        // A job being killed in slices may still have pending tasks: they are stopped, not placed.
        if job.killed.is_some() {
            return false;
        }
        // A system job's instance runs on its own agent and nowhere else.
        if job.is_system() && job.pinned_agent(task.instance) != Some(p.agent) {
            return false;
        }
        if !self.maintenance_allows(p.agent, job.spec.job_type, at) {
            return false;
        }
        let Some(agent) = self.agents.get_mut(&p.agent) else {
            return false;
        };
        if !agent.schedulable() {
            return false;
        }
        let spec = &job.spec_for(task.job_version).task;
        let demand = spec.demand();
        if p.ports.len() != spec.ports.len() || !agent.fits(&demand) {
            return false;
        }
        let distinct: BTreeSet<u16> = p.ports.iter().copied().collect();
        if distinct.len() != p.ports.len()
            || p.ports.iter().any(|port| {
                agent.used_ports.contains(port) || !agent.info.capacity.ports.iter().any(|r| r.contains(*port))
            })
        {
            return false;
        }
        agent.reserve(p.task, &demand, &p.ports);
        let task = self.tasks.get_mut(&p.task).expect("checked above");
        task.agent = Some(p.agent);
        task.ports = p.ports.clone();
        true
    }

    fn agent_update(&mut self, agent: AgentId, u: &StatusUpdate, at: Timestamp, out: &mut Applied) {
        let a = self.agents.get_mut(&agent).expect("checked by caller");
        if u.seq <= a.last_update_seq {
            self.counters.duplicate_updates += 1;
            return;
        }
        a.last_update_seq = u.seq;
        if matches!(u.report, Report::Exited { .. }) && a.strays.remove(&u.task).is_some() {
            return;
        }
        let Some(task) = self.tasks.get_mut(&u.task) else {
            self.counters.updates_for_unknown_tasks += 1;
            return;
        };
        if task.agent != Some(agent) {
            self.counters.updates_for_unknown_tasks += 1;
            return;
        }
        let event = match &u.report {
            Report::Starting => Event::Starting,
            Report::Running { pid } => {
                if task.state.holds_resources() {
                    task.pid = Some(*pid);
                }
                Event::Running { pid: *pid }
            }
            Report::Exited { exit } => Event::Exited(exit.clone()),
            Report::Health { healthy, reason } => {
                // Health is observed state beside the lifecycle: it does not move the task.
                if task.state == TaskState::Running && task.healthy != Some(*healthy) {
                    task.healthy = Some(*healthy);
                    let what = if *healthy { "healthy" } else { "unhealthy" };
                    let reason = if reason.is_empty() { what.to_string() } else { format!("{what}: {reason}") };
                    task.record(at, reason);
                }
                return;
            }
        };
        self.step(u.task, &event, at, out);
    }

    /// Runs one lifecycle transition on a task and carries out its effects, in order.
    pub(crate) fn step(&mut self, id: TaskId, event: &Event, at: Timestamp, out: &mut Applied) {
        crate::work::add(1);
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        let Some(job) = self.jobs.get(&task.job) else {
            return;
        };
        let cx = Context {
            kill_reason: task.kill_reason.as_deref(),
            now: at,
            running_since: task.running_since,
            failures: task.failures,
            policy: RestartPolicy { job_type: job.spec.job_type, max_failures: job.spec.max_failures },
        };
        let t = lifecycle::transition(task.state, task.desired, event, &cx);
        match t.outcome {
            Outcome::Illegal => {
                self.counters.illegal_transitions += 1;
                return;
            }
            Outcome::Ignored => return,
            Outcome::Applied => {}
        }
        let demand = job.spec_for(task.job_version).task.demand();
        let job_key = task.job.clone();
        let task = self.tasks.get_mut(&id).expect("exists");
        let desired_changed = task.desired != t.desired;
        let (old_state, seq, priority, ord) = (task.state, task.seq, job.spec.priority, job.ord);
        task.state = t.state;
        task.desired = t.desired;
        if t.state == TaskState::Running && task.running_since.is_none() {
            task.running_since = Some(at);
        }
        if let Event::Exited(exit) = event {
            task.exit = Some(exit.clone());
        }
        if t.state.is_terminal() {
            task.pid = None;
        }
        if let Event::Kill { by } = event {
            task.kill_reason = Some(by.clone());
        }
        if let Some(reason) = t.reason {
            task.record(at, reason);
        }
        if old_state != t.state {
            self.counts[state_index(old_state)] -= 1;
            self.counts[state_index(t.state)] += 1;
            if old_state.is_terminal() != t.state.is_terminal() {
                if let Some(j) = self.jobs.get_mut(&*task.job) {
                    if t.state.is_terminal() {
                        j.live_tasks -= 1;
                    } else {
                        j.live_tasks += 1;
                    }
                }
            }
        }
        if t.state != TaskState::Pending && self.pending.remove(&id) {
            self.queue.remove(&(-i64::from(priority), ord, seq, id));
        }
        let agent_id = task.agent;
        let ports = task.ports.clone();
        let restart_when_stopped = task.restart_when_stopped;
        if desired_changed {
            if let Some(a) = agent_id.and_then(|a| self.agents.get_mut(&a)) {
                a.orders_version += 1;
                out.agents_touched.insert(a.info.id);
            }
        }
        for effect in &t.effects {
            match effect {
                Effect::Launch => {
                    if let Some(a) = agent_id.and_then(|a| self.agents.get_mut(&a)) {
                        a.orders_version += 1;
                        out.agents_touched.insert(a.info.id);
                    }
                }
                Effect::Kill => {} // the agent sees desired = Stop in its orders (above)
                Effect::Release => {
                    if let Some(a) = agent_id.and_then(|a| self.agents.get_mut(&a)) {
                        a.release(id, &demand, &ports);
                        a.orders_version += 1;
                        out.agents_touched.insert(a.info.id);
                    }
                }
                Effect::Reserve => {
                    if let Some(a) = agent_id.and_then(|a| self.agents.get_mut(&a)) {
                        a.reserve(id, &demand, &ports);
                        a.orders_version += 1;
                        out.agents_touched.insert(a.info.id);
                    }
                }
                Effect::Replace { delay_ms, failures } => {
                    self.restart_instance(id, *delay_ms, *failures, at, out);
                }
                Effect::InstanceDone { success } => {
                    let task = &self.tasks[&id];
                    let instance = task.instance;
                    let j = self.jobs.get_mut(&job_key).expect("exists");
                    j.done.insert(instance, *success);
                    if j.done.len() as u32 == j.spec.instances && j.finished_at.is_none() {
                        j.finished_at = Some(at);
                    }
                }
            }
        }
        if t.state.is_terminal() && restart_when_stopped {
            self.restart_instance(id, 0, 0, at, out);
        } else if t.state == TaskState::Killed {
            // A batch instance stopped on request is over, as a failure.
            let instance = self.tasks[&id].instance;
            if let Some(j) = self.jobs.get_mut(&job_key) {
                if j.killed.is_none() && matches!(j.spec.job_type, JobType::Batch | JobType::Cron) {
                    j.done.insert(instance, false);
                    if j.done.len() as u32 == j.spec.instances && j.finished_at.is_none() {
                        j.finished_at = Some(at);
                    }
                }
            }
        }
        if t.state.is_terminal() {
            self.cron_task_ended(&job_key, at, out);
            self.forget_job_if_over(&job_key);
        }
    }

    /// Starts a fresh task for the instance of `old`, unless the job is gone or being killed, or
    /// the instance already moved on.
    pub(crate) fn restart_instance(
        &mut self,
        old: TaskId,
        delay_ms: u64,
        failures: u32,
        at: Timestamp,
        out: &mut Applied,
    ) {
        let task = &self.tasks[&old];
        let (job_key, instance) = (task.job.clone(), task.instance);
        let Some(job) = self.jobs.get(&job_key) else {
            return;
        };
        if job.killed.is_some() || job.current.get(&instance) != Some(&old) || !job.wants_instance(instance) {
            return;
        }
        let version = self.version_for_restart(job, instance, task.job_version);
        let id = self.fresh_id(derive_id(old.0));
        self.create_task(id, &job_key, instance, version, failures, at, at.plus_ms(delay_ms));
        out.new_pending = true;
    }

    /// A killed job whose tasks all ended is forgotten: at once when it has at most
    /// [`FORGET_SLICE_INSTANCES`] instances, otherwise by `ForgetJobSlice` commands (the reaper
    /// loop), so that the command that ended its last task does not also forget 100,000.
    fn forget_job_if_over(&mut self, job: &JobKey) {
        let Some(j) = self.jobs.get(job) else { return };
        if j.killed.is_none() || !j.is_over() {
            return;
        }
        if j.history.len() <= FORGET_SLICE_INSTANCES as usize {
            self.forget_instances(job, FORGET_SLICE_INSTANCES);
        }
    }

    /// Forgets the tasks of at most `instances_max` instances of a job that is over (highest
    /// instance first), and the job itself once none is left. True: the job is gone.
    fn forget_instances(&mut self, job: &JobKey, instances_max: u32) -> bool {
        let Some(j) = self.jobs.get_mut(job) else { return true };
        debug_assert!(j.is_over(), "only a job that is over is forgotten");
        let (priority, ord) = (j.spec.priority, j.ord);
        for _ in 0..instances_max {
            let Some((_, ids)) = j.history.pop_last() else { break };
            crate::work::add(1 + ids.len() as u64);
            for id in ids {
                if let Some(t) = self.tasks.remove(&id) {
                    self.counts[state_index(t.state)] -= 1;
                    if self.pending.remove(&id) {
                        self.queue.remove(&(-i64::from(priority), ord, t.seq, id));
                    }
                }
            }
        }
        if j.history.is_empty() {
            self.jobs.remove(job);
            return true;
        }
        false
    }

    /// Recomputes everything marked "derived" from the primary records (after loading a snapshot).
    pub fn rebuild_derived(&mut self) {
        self.pending.clear();
        self.queue.clear();
        self.counts = [0; 10];
        for agent in self.agents.values_mut() {
            agent.used = Default::default();
            agent.used_ports.clear();
            agent.tasks.clear();
        }
        for job in self.jobs.values_mut() {
            job.history.clear();
            job.live_tasks = 0;
            job.rebuild_pinned_by_agent();
        }
        // One key in memory per job: tasks read from a snapshot each had their own copy.
        for t in self.tasks.values_mut() {
            if let Some(j) = self.jobs.get(&*t.job) {
                if !Arc::ptr_eq(&t.job, &j.key) {
                    t.job = j.key.clone();
                }
            }
        }
        let mut ids: Vec<&Task> = self.tasks.values().collect();
        ids.sort_by_key(|t| t.seq);
        for t in ids {
            self.counts[state_index(t.state)] += 1;
            if let Some(job) = self.jobs.get_mut(&t.job) {
                job.history.entry(t.instance).or_default().push(t.id);
                if !t.state.is_terminal() {
                    job.live_tasks += 1;
                }
                if t.state == TaskState::Pending {
                    self.pending.insert(t.id);
                    self.queue.insert((-i64::from(job.spec.priority), job.ord, t.seq, t.id));
                }
                if t.state.holds_resources() {
                    if let Some(a) = t.agent.and_then(|a| self.agents.get_mut(&a)) {
                        a.reserve(t.id, &job.spec_for(t.job_version).task.demand(), &t.ports);
                    }
                }
            }
        }
    }

    // ---- queries

    /// What one agent must run: the tasks that hold resources on it, with their desired state.
    pub fn tasks_on(&self, agent: AgentId) -> impl Iterator<Item = &Task> {
        self.agents.get(&agent).into_iter().flat_map(move |a| a.tasks.iter().filter_map(|id| self.tasks.get(id)))
    }

    pub fn job_of(&self, task: &Task) -> Option<&Job> {
        self.jobs.get(&task.job)
    }

    pub fn tasks_of<'a>(&'a self, job: &'a Job) -> impl Iterator<Item = &'a Task> + 'a {
        job.history.values().flatten().filter_map(|id| self.tasks.get(id))
    }

    /// Counts of tasks by state across the cluster.
    pub fn task_counts(&self) -> BTreeMap<TaskState, u64> {
        TaskState::ALL.iter().zip(self.counts).filter(|(_, n)| *n > 0).map(|(s, n)| (*s, n)).collect()
    }
}
