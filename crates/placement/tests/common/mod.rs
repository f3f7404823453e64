//! Shared by the placement tests: builders for agents and jobs, a cluster driven through the real
//! `ClusterState::apply`, and a naive reference of what "fits" means (resources, distinct free ports,
//! constraints) written without looking at the placer's own code.

#![allow(dead_code)] // each test file uses a different part

use capstan_model::spec::{Constraint, ConstraintSpec, PlacementPolicy};
use capstan_model::{
    AgentId, ByteSize, Capacity, JobKey, JobSpec, JobType, PortRange, TaskExit, TaskId, TaskSpec, TaskState, Timestamp,
};
use capstan_placement::Plan;
use capstan_state::{Applied, ClusterState, Command, Placement, Preemption, Report, Stamped, StatusUpdate};
use std::collections::{BTreeMap, BTreeSet};

pub const MIB: u64 = 1 << 20;

pub fn agent_info(
    id: u64,
    cpus_milli: u32,
    mem_bytes: u64,
    disk_bytes: u64,
    ports: Vec<PortRange>,
    attributes: &[(&str, &str)],
) -> capstan_state::AgentInfo {
    capstan_state::AgentInfo {
        id: AgentId(id),
        hostname: format!("host-{id}"),
        address: format!("http://10.0.{}.{}:5051", id / 250, id % 250),
        capacity: Capacity { cpus_milli, mem_bytes, disk_bytes, ports },
        attributes: attributes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        version: "test".into(),
    }
}

/// A job as the tests describe it; `spec` turns it into a `JobSpec`.
#[derive(Clone, Debug)]
pub struct JobShape {
    pub job_type: JobType,
    pub instances: u32,
    pub cpus_milli: u32,
    pub mem_bytes: u64,
    pub disk_bytes: u64,
    pub ports: u32,
    pub priority: i32,
    pub production: bool,
    pub placement: PlacementPolicy,
    pub constraints: Vec<ConstraintSpec>,
}

impl JobShape {
    pub fn service(instances: u32, cpus_milli: u32, mem_bytes: u64) -> JobShape {
        JobShape {
            job_type: JobType::Service,
            instances,
            cpus_milli,
            mem_bytes,
            disk_bytes: 0,
            ports: 0,
            priority: 0,
            production: false,
            placement: PlacementPolicy::Binpack,
            constraints: vec![],
        }
    }

    pub fn spec(&self, key: &str) -> JobSpec {
        JobSpec {
            job: key.parse::<JobKey>().expect("test job keys are valid"),
            job_type: self.job_type,
            instances: self.instances,
            max_failures: 2,
            priority: self.priority,
            production: self.production,
            placement: self.placement,
            cron: None,
            cron_timezone: None,
            cron_collision_policy: None,
            replace_after: None,
            min_healthy: None,
            task: TaskSpec {
                command: "sleep 1000".into(),
                user: "nobody".into(),
                cpus_milli: self.cpus_milli,
                mem: ByteSize(self.mem_bytes),
                disk: ByteSize(self.disk_bytes),
                ports: (0..self.ports).map(|i| format!("p{i}")).collect(),
                env: BTreeMap::new(),
                kill_grace: TaskSpec::DEFAULT_KILL_GRACE,
            },
            health_check: None,
            update: None,
            constraint: self.constraints.clone(),
        }
    }
}

pub fn equals(attribute: &str, value: &str) -> ConstraintSpec {
    ConstraintSpec { attribute: Some(attribute.into()), value: Some(value.into()), ..Default::default() }
}
pub fn not_equals(attribute: &str, value: &str) -> ConstraintSpec {
    ConstraintSpec { attribute: Some(attribute.into()), not: Some(value.into()), ..Default::default() }
}
pub fn in_set(attribute: &str, values: &[&str]) -> ConstraintSpec {
    ConstraintSpec {
        attribute: Some(attribute.into()),
        in_set: Some(values.iter().map(|v| v.to_string()).collect()),
        ..Default::default()
    }
}
pub fn limit(attribute: &str, n: u32) -> ConstraintSpec {
    ConstraintSpec { attribute: Some(attribute.into()), limit: Some(n), ..Default::default() }
}
pub fn distinct_hosts() -> ConstraintSpec {
    ConstraintSpec { distinct_hosts: Some(true), ..Default::default() }
}
pub fn spread(attribute: &str) -> ConstraintSpec {
    ConstraintSpec { spread: Some(attribute.into()), ..Default::default() }
}

/// A cluster with a clock, driven only through `apply`, with agents that number their updates.
pub struct Cluster {
    pub state: ClusterState,
    pub now_ms: u64,
    seq: BTreeMap<AgentId, u64>,
    next_job_seed: u64,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster::new()
    }
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster { state: ClusterState::default(), now_ms: 1_000_000, seq: BTreeMap::new(), next_job_seed: 7 }
    }

    pub fn now(&self) -> Timestamp {
        Timestamp(self.now_ms)
    }

    /// Applies one command one millisecond after the last; it must be accepted.
    pub fn apply(&mut self, command: Command) -> Applied {
        self.now_ms += 1;
        let stamped = Stamped { at: Timestamp(self.now_ms), command };
        self.state.apply(&stamped).unwrap_or_else(|e| panic!("refused {:?}: {e}", stamped.command.name()))
    }

    pub fn register(&mut self, info: capstan_state::AgentInfo) {
        self.apply(Command::RegisterAgent { info });
    }

    pub fn create(&mut self, key: &str, shape: &JobShape) -> Vec<TaskId> {
        self.next_job_seed += 1;
        self.apply(Command::CreateJob { spec: shape.spec(key), seed: self.next_job_seed }).created
    }

    pub fn place(&mut self, placements: Vec<Placement>) -> Applied {
        self.apply(Command::Place { placements })
    }

    pub fn preempt(&mut self, preemptions: Vec<Preemption>) -> Applied {
        self.apply(Command::Preempt { preemptions })
    }

    /// The task's agent reports on it, with its next sequence number.
    pub fn report(&mut self, task: TaskId, report: Report) -> Applied {
        let agent = self.state.tasks[&task].agent.expect("reports come for placed tasks");
        let seq = self.seq.entry(agent).or_insert(0);
        *seq += 1;
        let update = StatusUpdate { seq: *seq, task, report, at: Timestamp(self.now_ms) };
        self.apply(Command::AgentUpdates { agent, updates: vec![update] })
    }

    pub fn start(&mut self, task: TaskId) {
        self.report(task, Report::Starting);
        self.report(task, Report::Running { pid: 4242 });
        assert_eq!(self.state.tasks[&task].state, TaskState::Running);
    }

    /// Every KILLING task's agent reports it stopped.
    pub fn finish_kills(&mut self) {
        let killing: Vec<TaskId> =
            self.state.tasks.values().filter(|t| t.state == TaskState::Killing).map(|t| t.id).collect();
        for id in killing {
            let by = "preempted".to_string();
            self.report(id, Report::Exited { exit: TaskExit::Killed { by } });
        }
    }

    pub fn tasks_in(&self, state: TaskState) -> Vec<TaskId> {
        self.state.tasks.values().filter(|t| t.state == state).map(|t| t.id).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The naive reference.

/// What is held on every agent, and where every job's live instances are, recomputed from the tasks
/// (not from the state's derived fields), plus whatever a plan adds.
#[derive(Clone, Debug, Default)]
pub struct Held {
    /// cpus, mem, disk, ports held per agent.
    pub used: BTreeMap<AgentId, [u64; 3]>,
    pub ports: BTreeMap<AgentId, Vec<u16>>,
    /// Ports promised, by count, to production tasks the plan holds room for (not yet chosen).
    pub promised_ports: BTreeMap<AgentId, u64>,
    pub per_agent: BTreeMap<(JobKey, AgentId), u32>,
    pub per_value: BTreeMap<(JobKey, String, String), u32>,
}

impl Held {
    pub fn of(state: &ClusterState) -> Held {
        let mut h = Held::default();
        for t in state.tasks.values() {
            if t.state.holds_resources() {
                let agent = t.agent.expect("a task holding resources has an agent");
                h.add(state, t.id, agent, &t.ports);
            }
        }
        h
    }

    pub fn add(&mut self, state: &ClusterState, task: TaskId, agent: AgentId, ports: &[u16]) {
        let t = &state.tasks[&task];
        let job = &state.jobs[&t.job];
        let d = job.spec.task.demand();
        let u = self.used.entry(agent).or_default();
        u[0] += u64::from(d.cpus_milli);
        u[1] += d.mem_bytes;
        u[2] += d.disk_bytes;
        self.ports.entry(agent).or_default().extend_from_slice(ports);
        *self.per_agent.entry(((*t.job).clone(), agent)).or_default() += 1;
        if let Some(a) = state.agents.get(&agent) {
            for (k, v) in &a.info.attributes {
                *self.per_value.entry(((*t.job).clone(), k.clone(), v.clone())).or_default() += 1;
            }
        }
    }

    /// Room a plan holds on `agent` for `task`: its whole demand, its ports by count.
    pub fn hold(&mut self, state: &ClusterState, task: TaskId, agent: AgentId) {
        self.add(state, task, agent, &[]);
        let t = &state.tasks[&task];
        let ports = state.jobs[&t.job].spec.task.demand().ports;
        *self.promised_ports.entry(agent).or_default() += u64::from(ports);
    }

    pub fn with_plan(state: &ClusterState, plan: &[Placement]) -> Held {
        let mut h = Held::of(state);
        for p in plan {
            h.add(state, p.task, p.agent, &p.ports);
        }
        h
    }

    /// Why `task` could not go on `agent` now, or `Ok` when it could.
    pub fn fits(&self, state: &ClusterState, task: TaskId, agent: AgentId) -> Result<(), String> {
        let t = &state.tasks[&task];
        let job = &state.jobs[&t.job];
        let a = &state.agents[&agent];
        if job.spec.job_type == JobType::System && job.pinned.get(&t.instance) != Some(&agent) {
            return Err("not its agent (system job)".into());
        }
        let d = job.spec.task.demand();
        let cap = &a.info.capacity;
        let used = self.used.get(&agent).copied().unwrap_or_default();
        if used[0] + u64::from(d.cpus_milli) > u64::from(cap.cpus_milli) {
            return Err("cpus".into());
        }
        if used[1] + d.mem_bytes > cap.mem_bytes {
            return Err("mem".into());
        }
        if used[2] + d.disk_bytes > cap.disk_bytes {
            return Err("disk".into());
        }
        let all: BTreeSet<u16> = cap.ports.iter().flat_map(|r| r.first..=r.last).collect();
        let taken: BTreeSet<u16> = self.ports.get(&agent).into_iter().flatten().copied().collect();
        let promised = self.promised_ports.get(&agent).copied().unwrap_or_default();
        if (all.difference(&taken).count() as u64).saturating_sub(promised) < u64::from(d.ports) {
            return Err("ports".into());
        }
        let attrs = &a.info.attributes;
        for c in job.spec.constraint.iter().filter_map(|c| c.kind()) {
            let ok = match c {
                Constraint::Equals { attribute, value } => attrs.get(attribute).is_some_and(|v| v == value),
                Constraint::NotEquals { attribute, value } => attrs.get(attribute).is_none_or(|v| v != value),
                Constraint::In { attribute, values } => attrs.get(attribute).is_some_and(|v| values.contains(v)),
                Constraint::Limit { attribute, limit } => attrs.get(attribute).is_some_and(|v| {
                    let key = ((*t.job).clone(), attribute.to_string(), v.clone());
                    self.per_value.get(&key).copied().unwrap_or(0) < limit
                }),
                Constraint::DistinctHosts => self.per_agent.get(&((*t.job).clone(), agent)).copied().unwrap_or(0) == 0,
                Constraint::Spread { attribute } => attrs.contains_key(attribute),
            };
            if !ok {
                return Err(format!("constraint {c}"));
            }
        }
        Ok(())
    }

    /// The first agent `task` would fit on now, if any.
    pub fn fits_somewhere(&self, state: &ClusterState, task: TaskId) -> Option<AgentId> {
        state.agents.keys().copied().find(|a| self.fits(state, task, *a).is_ok())
    }
}

/// Nothing over-committed: what every agent holds (recomputed from the tasks) is within its
/// capacity, no port is held twice or outside the agent's ranges, and the state's own bookkeeping
/// agrees with the recomputation.
pub fn check_no_overcommit(state: &ClusterState) -> Result<(), String> {
    let held = Held::of(state);
    for (id, a) in &state.agents {
        let cap = &a.info.capacity;
        let used = held.used.get(id).copied().unwrap_or_default();
        if used[0] > u64::from(cap.cpus_milli) || used[1] > cap.mem_bytes || used[2] > cap.disk_bytes {
            return Err(format!("agent {id} over-committed: {used:?} of {cap:?}"));
        }
        let ports = held.ports.get(id).cloned().unwrap_or_default();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        if distinct.len() != ports.len() {
            return Err(format!("agent {id} hands out a port twice: {ports:?}"));
        }
        if let Some(p) = ports.iter().find(|p| !cap.ports.iter().any(|r| r.contains(**p))) {
            return Err(format!("agent {id} hands out port {p} outside its ranges {:?}", cap.ports));
        }
        if a.used_ports != distinct {
            return Err(format!("agent {id}: state says ports {:?}, tasks hold {distinct:?}", a.used_ports));
        }
        let u = [u64::from(a.used.cpus_milli), a.used.mem_bytes, a.used.disk_bytes];
        if u != used {
            return Err(format!("agent {id}: state says used {u:?}, tasks hold {used:?}"));
        }
    }
    Ok(())
}

/// Every live task's agent satisfies its job's constraints.
pub fn check_constraints(state: &ClusterState) -> Result<(), String> {
    let held = Held::of(state);
    for t in state.tasks.values().filter(|t| t.state.holds_resources()) {
        let agent = &state.agents[&t.agent.expect("placed")];
        let attrs = &agent.info.attributes;
        let job = &state.jobs[&t.job];
        for c in job.spec.constraint.iter().filter_map(|c| c.kind()) {
            let ok = match c {
                Constraint::Equals { attribute, value } => attrs.get(attribute).is_some_and(|v| v == value),
                Constraint::NotEquals { attribute, value } => attrs.get(attribute).is_none_or(|v| v != value),
                Constraint::In { attribute, values } => attrs.get(attribute).is_some_and(|v| values.contains(v)),
                Constraint::Limit { attribute, limit } => attrs
                    .get(attribute)
                    .is_some_and(|v| held.per_value[&((*t.job).clone(), attribute.to_string(), v.clone())] <= limit),
                Constraint::DistinctHosts => held.per_agent[&((*t.job).clone(), agent.info.id)] <= 1,
                Constraint::Spread { attribute } => attrs.contains_key(attribute),
            };
            if !ok {
                return Err(format!("task {} of {} on agent {} ({attrs:?}) breaks `{c}`", t.id, t.job, agent.info.id));
            }
        }
    }
    Ok(())
}

/// Every job has exactly `instances` current tasks, and at most one live (not ended) task per instance.
pub fn check_counts(state: &ClusterState) -> Result<(), String> {
    for (key, job) in &state.jobs {
        if job.current.len() as u32 != job.instance_count() {
            return Err(format!(
                "job {key} has {} current tasks for {} instances",
                job.current.len(),
                job.instance_count()
            ));
        }
        let mut live: BTreeMap<u32, u32> = BTreeMap::new();
        for t in state.tasks.values().filter(|t| *t.job == *key && !t.state.is_terminal()) {
            *live.entry(t.instance).or_default() += 1;
            if job.current.get(&t.instance) != Some(&t.id) {
                return Err(format!("live task {} of {key} is not its instance's current task", t.id));
            }
        }
        if let Some((i, n)) = live.iter().find(|(_, n)| **n > 1) {
            return Err(format!("job {key} instance {i} has {n} live tasks"));
        }
    }
    Ok(())
}

/// The plan is well formed: it names only pending tasks whose backoff passed, each at most once,
/// on known agents.
pub fn check_plan_names(state: &ClusterState, plan: &Plan, now: Timestamp) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    let named = plan.placements.iter().map(|p| p.task).chain(plan.unplaced.iter().map(|u| u.task));
    for id in named {
        if !seen.insert(id) {
            return Err(format!("task {id} named twice in the plan"));
        }
        let t = state.tasks.get(&id).ok_or(format!("plan names unknown task {id}"))?;
        if t.state != TaskState::Pending || t.not_before > now {
            return Err(format!(
                "plan names task {id} in {} with not_before {:?} (now {now:?})",
                t.state, t.not_before
            ));
        }
    }
    for p in &plan.placements {
        if !state.agents.contains_key(&p.agent) {
            return Err(format!("placement on unknown agent {}", p.agent));
        }
    }
    // Tasks of a job that fits nowhere are skipped, backoff or not: waking up for them is pointless
    // until something changes (which wakes the scheduler anyway).
    let waiting = state
        .pending
        .iter()
        .filter_map(|id| state.tasks.get(id))
        .filter(|t| !plan.unplaced_jobs.iter().any(|(j, _)| *j == *t.job))
        .map(|t| t.not_before)
        .filter(|nb| *nb > now)
        .min();
    if let Some(w) = plan.next_wakeup {
        let real = w > now && state.pending.iter().filter_map(|id| state.tasks.get(id)).any(|t| t.not_before == w);
        if !real {
            return Err(format!("next_wakeup {w:?} is no pending task's backoff"));
        }
    }
    if let (false, Some(x)) = (plan.more, waiting) {
        if plan.next_wakeup.is_none_or(|w| w > x) {
            return Err(format!("next_wakeup {:?}, expected at most {x:?}", plan.next_wakeup));
        }
    }
    Ok(())
}
