//! System jobs (`type = "system"`): one instance on every active agent that matches the job's
//! constraints. Each instance is pinned to its agent (`Job::pinned`): it is created when the job
//! is created or when a matching agent registers (or comes back, or starts matching), and it is
//! dropped — its task stopped or lost, never replaced elsewhere — when its agent is removed or no
//! longer matches. The job's instance count is the number of pinned instances.

use super::{Applied, ClusterState, Job};
use crate::agent::{AgentInfo, Liveness};
use capstan_model::lifecycle::Event;
use capstan_model::spec::Constraint;
use capstan_model::{derive_id, AgentId, JobKey, JobSpec, JobType, TaskId, Timestamp};

/// Dropped instances whose ended tasks are kept per system job, for `task list`; older ones are
/// forgotten, so agents coming and going do not grow the state without end.
pub const DROPPED_INSTANCES_KEPT_MAX: usize = 16;

/// Whether an agent with these attributes matches the job's constraints. Only the forms that
/// choose agents (value, not, in) apply; the decoder refuses the others for system jobs.
pub fn agent_matches(spec: &JobSpec, agent: &AgentInfo) -> bool {
    let attrs = &agent.attributes;
    spec.constraint.iter().filter_map(|c| c.kind()).all(|c| match c {
        Constraint::Equals { attribute, value } => attrs.get(attribute).is_some_and(|v| v == value),
        Constraint::NotEquals { attribute, value } => attrs.get(attribute).is_none_or(|v| v != value),
        Constraint::In { attribute, values } => attrs.get(attribute).is_some_and(|v| values.contains(v)),
        Constraint::Limit { .. } | Constraint::DistinctHosts | Constraint::Spread { .. } => true,
    })
}

impl Job {
    pub fn is_system(&self) -> bool {
        self.spec.job_type == JobType::System
    }

    /// How many instances the job has now: the spec's count, or for a system job the matching
    /// agents it has an instance on.
    pub fn instance_count(&self) -> u32 {
        if self.is_system() {
            self.pinned.len() as u32
        } else {
            self.spec.instances
        }
    }

    /// Whether the instance is one the job still wants (a dropped system instance is not).
    pub fn wants_instance(&self, instance: u32) -> bool {
        if self.is_system() {
            self.pinned.contains_key(&instance)
        } else {
            instance < self.spec.instances
        }
    }

    /// The agent a system job's instance belongs to.
    pub fn pinned_agent(&self, instance: u32) -> Option<AgentId> {
        self.pinned.get(&instance).copied()
    }

    /// The instance a system job has on an agent.
    pub fn instance_on(&self, agent: AgentId) -> Option<u32> {
        self.pinned_by_agent.get(&agent).copied()
    }

    pub(crate) fn rebuild_pinned_by_agent(&mut self) {
        self.pinned_by_agent = self.pinned.iter().map(|(i, a)| (*a, *i)).collect();
    }
}

impl ClusterState {
    /// Active agents that match a system job's constraints, in id order.
    pub fn matching_agents<'a>(&'a self, spec: &'a JobSpec) -> impl Iterator<Item = AgentId> + 'a {
        self.agents
            .values()
            .filter(|a| a.liveness == Liveness::Active && agent_matches(spec, &a.info))
            .map(|a| a.info.id)
    }

    /// The system jobs that may still grow or shrink (not being killed), in key order.
    fn live_system_jobs(&self) -> Vec<JobKey> {
        self.jobs.values().filter(|j| j.is_system() && j.killed.is_none()).map(|j| (*j.key).clone()).collect()
    }

    /// A new system job: an instance on every matching active agent, ids derived from `seed`.
    pub(super) fn system_job_created(&mut self, job: &JobKey, seed: u64, at: Timestamp, out: &mut Applied) {
        let spec = self.jobs[job].spec.clone();
        let agents: Vec<AgentId> = self.matching_agents(&spec).collect();
        let mut next = seed;
        for agent in agents {
            next = derive_id(next);
            let id = self.add_system_instance(job, agent, next, at, out);
            out.created.push(id);
        }
    }

    /// An agent registered, came back or changed its attributes: every system job gets an
    /// instance there if the agent is active and matches; an instance on an agent that no longer
    /// matches is dropped (not while frozen: that waits for the unfreeze).
    pub(super) fn system_agent_changed(&mut self, agent: AgentId, at: Timestamp, out: &mut Applied) {
        for key in self.live_system_jobs() {
            self.system_sync(&key, agent, at, out);
        }
    }

    /// After an unfreeze: the drops that waited, on every agent.
    pub(super) fn system_unfrozen(&mut self, at: Timestamp, out: &mut Applied) {
        let agents: Vec<AgentId> = self.agents.keys().copied().collect();
        for key in self.live_system_jobs() {
            for agent in &agents {
                self.system_sync(&key, *agent, at, out);
            }
        }
    }

    fn system_sync(&mut self, key: &JobKey, agent: AgentId, at: Timestamp, out: &mut Applied) {
        let Some(a) = self.agents.get(&agent) else { return };
        let job = &self.jobs[key];
        let matches = agent_matches(&job.spec, &a.info);
        let active = a.liveness == Liveness::Active;
        match job.instance_on(agent) {
            None if matches && active => {
                let seed = derive_id(agent.0 ^ job.ord.rotate_left(32) ^ u64::from(job.next_instance));
                self.add_system_instance(key, agent, seed, at, out);
            }
            Some(instance) if !matches && self.frozen.is_none() => {
                self.drop_system_instance(key, instance, "its agent no longer matches the job's constraints", at, out);
            }
            _ => {}
        }
    }

    fn add_system_instance(
        &mut self,
        key: &JobKey,
        agent: AgentId,
        seed: u64,
        at: Timestamp,
        out: &mut Applied,
    ) -> TaskId {
        let job = self.jobs.get_mut(key).expect("exists");
        let instance = job.next_instance;
        job.next_instance += 1;
        job.pinned.insert(instance, agent);
        job.pinned_by_agent.insert(agent, instance);
        let version = job.version;
        let id = self.fresh_id(seed);
        self.create_task(id, key, instance, version, 0, at, at);
        out.new_pending = true;
        id
    }

    /// Drops an instance from its system job: its task is stopped with `why` and not replaced.
    fn drop_system_instance(&mut self, key: &JobKey, instance: u32, why: &str, at: Timestamp, out: &mut Applied) {
        self.unpin(key, instance);
        if let Some(id) = self.jobs[key].current.get(&instance).copied() {
            self.step(id, &Event::Kill { by: why.to_string() }, at, out);
        }
        self.forget_dropped_instances(key);
    }

    fn unpin(&mut self, key: &JobKey, instance: u32) {
        let job = self.jobs.get_mut(key).expect("exists");
        if let Some(agent) = job.pinned.remove(&instance) {
            job.pinned_by_agent.remove(&agent);
        }
    }

    /// `RemoveAgent` is about to end this task (its agent stayed unreachable past the job's
    /// `replace_after`): if it is a system instance, the instance is dropped from its job so that
    /// nothing replaces it. True when it was one.
    pub(super) fn system_task_lost_with_agent(&mut self, task: TaskId) -> bool {
        let Some(t) = self.tasks.get(&task) else { return false };
        let (key, instance) = (t.job.clone(), t.instance);
        let Some(job) = self.jobs.get(&key) else { return false };
        if !job.is_system() || job.current.get(&instance) != Some(&task) {
            return false;
        }
        self.unpin(&key, instance);
        true
    }

    /// The agent is removed: instances still pinned to it (their task never got there) are
    /// dropped; the job stops counting the agent.
    pub(super) fn system_agent_removed(&mut self, agent: AgentId, at: Timestamp, out: &mut Applied) {
        for key in self.live_system_jobs() {
            if let Some(instance) = self.jobs[&key].instance_on(agent) {
                self.drop_system_instance(&key, instance, "its agent was removed", at, out);
            }
        }
    }

    /// Keeps the ended tasks of at most `DROPPED_INSTANCES_KEPT_MAX` dropped instances per job
    /// (the most recent ones); an instance whose task has not ended yet is kept.
    fn forget_dropped_instances(&mut self, key: &JobKey) {
        let job = &self.jobs[key];
        let dropped: Vec<u32> = job.current.keys().copied().filter(|i| !job.pinned.contains_key(i)).collect();
        if dropped.len() <= DROPPED_INSTANCES_KEPT_MAX {
            return;
        }
        let excess = dropped.len() - DROPPED_INSTANCES_KEPT_MAX;
        for instance in dropped.into_iter().take(excess) {
            let job = &self.jobs[key];
            let ids: Vec<TaskId> = job.history.get(&instance).cloned().unwrap_or_default();
            if ids.iter().any(|id| self.tasks.get(id).is_some_and(|t| !t.state.is_terminal())) {
                continue;
            }
            let job = self.jobs.get_mut(key).expect("exists");
            job.current.remove(&instance);
            job.history.remove(&instance);
            for id in ids {
                if let Some(t) = self.tasks.remove(&id) {
                    self.counts[super::state_index(t.state)] -= 1;
                }
            }
        }
    }
}
