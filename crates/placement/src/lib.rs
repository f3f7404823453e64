//! Placement: which agent each pending task goes to. A pure function of (cluster state, now, seed):
//! feasibility (resources and ports actually free, constraints) → ranking (bin-pack, spread,
//! fault-domain spread) → selection, with reservations made during one pass so a plan never
//! over-commits an agent. The master's `apply` re-checks every placement against the latest state
//! before it commits it.
//!
//! Cost: agents are visited in a seeded random order and the search stops after
//! `CANDIDATES` feasible agents, so placing a task costs about the same on 100 or 10,000 agents
//! while the cluster has room; only a task that fits almost nowhere looks at every agent.

mod constraints;
mod preempt;
mod system;

use capstan_model::spec::{Constraint, PlacementPolicy};
use capstan_model::{derive_id, AgentId, Demand, JobKey, TaskId, Timestamp};
use capstan_state::{Agent, ClusterState, Placement};
use constraints::{JobSpread, Verdict};
use std::collections::{BTreeSet, HashMap};

pub use capstan_state::Preemption;

/// Feasible agents looked at before choosing the best of them.
pub const CANDIDATES: usize = 16;
/// Production tasks that may look for victims in one pass (preemption scans many agents).
pub const PREEMPTION_SEARCHES_PER_PASS: usize = 64;

/// A task that could not be placed in this pass, and why, in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplaced {
    pub task: TaskId,
    pub why: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub placements: Vec<Placement>,
    /// Lower-priority tasks to stop so that production tasks can run; the preemptors are placed
    /// in a later pass, once the victims' resources are released.
    pub preemptions: Vec<Preemption>,
    pub unplaced: Vec<Unplaced>,
    /// Jobs none of whose tasks fit in this pass, and why: their remaining tasks were not
    /// searched again (and are not listed one by one in `unplaced`).
    pub unplaced_jobs: Vec<(JobKey, String)>,
    /// Room held on an agent for a production task whose victims are stopping: later (lower
    /// priority) tasks of the pass may not take it.
    pub held: Vec<(AgentId, TaskId)>,
    /// The pass stopped at its limit with pending tasks not looked at: plan again soon.
    pub more: bool,
    /// The earliest time a task in backoff becomes placeable, if any is waiting.
    pub next_wakeup: Option<Timestamp>,
}

/// What one pass has reserved on top of the state, per agent.
#[derive(Default, Clone)]
pub(crate) struct Tentative {
    pub(crate) used: Demand,
    pub(crate) ports: BTreeSet<u16>,
}

/// What is left on `agent` after this pass's reservations `t`. The state keeps an agent's port
/// ranges merged, so its count of free ports is exact.
pub(crate) fn free_after(agent: &Agent, t: Option<&Tentative>) -> Demand {
    let f = agent.free();
    match t {
        None => f,
        Some(t) => Demand {
            cpus_milli: f.cpus_milli.saturating_sub(t.used.cpus_milli),
            mem_bytes: f.mem_bytes.saturating_sub(t.used.mem_bytes),
            disk_bytes: f.disk_bytes.saturating_sub(t.used.disk_bytes),
            ports: f.ports.saturating_sub(t.used.ports),
        },
    }
}

/// Why agents were turned down for one task, counted, to explain an unplaceable task.
#[derive(Default)]
struct Refusals {
    resources: [u32; 4],
    /// Agents in (or soon in) a maintenance window.
    maintenance: u32,
    constraints: HashMap<String, u32>,
}

impl Refusals {
    fn explain(&self, agents: usize, registered: usize) -> String {
        if registered == 0 {
            return "no agents are registered".into();
        }
        if agents == 0 {
            return format!(
                "no agent is active: all {registered} registered agents are unreachable, removed or drained"
            );
        }
        let mut parts: Vec<String> = ["cpus", "mem", "disk", "ports"]
            .iter()
            .zip(self.resources)
            .filter(|(_, c)| *c > 0)
            .map(|(what, c)| format!("{c} lack {what}"))
            .collect();
        if self.maintenance > 0 {
            parts.push(format!("{} in or near maintenance", self.maintenance));
        }
        let mut cs: Vec<(&String, &u32)> = self.constraints.iter().collect();
        cs.sort();
        parts.extend(cs.into_iter().map(|(what, c)| format!("{c} fail {what}")));
        format!("no agent can take it: of {agents} agents, {}", parts.join(", "))
    }
}

/// Pending tasks looked at in one pass at most, per task it may search a place for: tasks of
/// jobs already known not to fit, or still in backoff, are skipped cheaply, but not without end.
pub const SCAN_PER_SEARCH: usize = 20;

/// Searches a place for up to `limit` pending tasks whose backoff has passed, highest priority
/// first (the state keeps them in that order: no sorting here).
pub fn plan(state: &ClusterState, now: Timestamp, seed: u64, limit: usize) -> Plan {
    let mut out = Plan::default();
    let mut searched = 0usize;
    let scan_max = limit.saturating_mul(SCAN_PER_SEARCH).max(limit);

    let agents: Vec<&Agent> = state.agents.values().filter(|a| a.schedulable()).collect();
    // Agents in or near a maintenance window (usually none): what they may not take is per task.
    let maintenance = state.maintenance_phases(now);
    // One random order per pass; each task starts at a different place in it.
    let mut order: Vec<usize> = (0..agents.len()).collect();
    // Where each active agent is in `agents`, for system tasks (pinned to their agent); built on
    // first use.
    let mut agent_index: Option<HashMap<AgentId, usize>> = None;
    let mut rng = seed;
    for i in (1..order.len()).rev() {
        rng = derive_id(rng);
        order.swap(i, (rng % (i as u64 + 1)) as usize);
    }
    let mut tentative: HashMap<AgentId, Tentative> = HashMap::new();
    let mut spreads: HashMap<JobKey, JobSpread> = HashMap::new();
    // A job none of whose tasks fit in this pass: its other tasks will not fit either.
    let mut hopeless: HashMap<JobKey, String> = HashMap::new();
    let mut preemption_searches = 0;
    // Room on an agent that production tasks of this pass will take once it is released.
    let mut promised: HashMap<AgentId, Demand> = HashMap::new();

    let mut cursor: std::ops::Bound<capstan_state::QueueKey> = std::ops::Bound::Unbounded;
    let mut scanned = 0usize;
    while let Some(key) = state.queue.range((cursor, std::ops::Bound::Unbounded)).next().copied() {
        if searched >= limit || scanned >= scan_max {
            out.more = true;
            break;
        }
        scanned += 1;
        cursor = std::ops::Bound::Excluded(key);
        let (neg_priority, job_ord, _, task_id) = key;
        let Some(task) = state.tasks.get(&task_id) else { continue };
        if task.not_before > now {
            out.next_wakeup = Some(out.next_wakeup.map_or(task.not_before, |w| w.min(task.not_before)));
            continue;
        }
        if hopeless.contains_key(&task.job) {
            // Skip the rest of this job's pending tasks in one step.
            cursor = std::ops::Bound::Excluded((neg_priority, job_ord, u64::MAX, TaskId(u64::MAX)));
            continue;
        }
        let Some(job) = state.jobs.get(&task.job) else { continue };
        if job.killed.is_some() {
            // Being killed in slices: its pending tasks are about to stop, never placed (apply
            // refuses them too). Skip the rest of the job in one step.
            cursor = std::ops::Bound::Excluded((neg_priority, job_ord, u64::MAX, TaskId(u64::MAX)));
            continue;
        }
        searched += 1;
        // The task's own version: during a rolling update, a job runs two.
        let spec = job.spec_for(task.job_version);
        let demand = spec.task.demand();
        let cons: Vec<Constraint> = spec.constraint.iter().filter_map(|c| c.kind()).collect();
        let spread = if cons.is_empty() {
            None
        } else {
            Some(spreads.entry((*task.job).clone()).or_insert_with(|| JobSpread::of(state, job)) as &mut JobSpread)
        };
        rng = derive_id(rng ^ task_id.0);
        let start = if agents.is_empty() { 0 } else { (rng % agents.len() as u64) as usize };
        // A system task looks at its own agent only (none if that agent is not active).
        let pinned = system::pinned_slot(&agents, &mut agent_index, job, task);
        let span = match pinned {
            Some(slot) => usize::from(slot.is_some()),
            None => agents.len(),
        };
        let mut refusals = Refusals::default();
        let mut best: Option<((u64, u64), usize)> = None;
        let mut found = 0;
        for k in 0..span {
            let idx = match pinned {
                Some(Some(idx)) => idx,
                _ => order[(start + k) % agents.len()],
            };
            let agent = agents[idx];
            if maintenance.get(&agent.info.id).is_some_and(|phase| !phase.allows(spec.job_type)) {
                refusals.maintenance += 1;
                continue;
            }
            let mut free = free_after(agent, tentative.get(&agent.info.id));
            // Room promised to a production task (victims still stopping) is not for others.
            if let Some(p) = promised.get(&agent.info.id) {
                free.cpus_milli = free.cpus_milli.saturating_sub(p.cpus_milli);
                free.mem_bytes = free.mem_bytes.saturating_sub(p.mem_bytes);
                free.disk_bytes = free.disk_bytes.saturating_sub(p.disk_bytes);
                free.ports = free.ports.saturating_sub(p.ports);
            }
            let lacks = [
                free.cpus_milli < demand.cpus_milli,
                free.mem_bytes < demand.mem_bytes,
                free.disk_bytes < demand.disk_bytes,
                free.ports < demand.ports,
            ];
            if lacks.iter().any(|l| *l) {
                for (i, l) in lacks.iter().enumerate() {
                    refusals.resources[i] += u32::from(*l);
                }
                continue;
            }
            let mut spread_rank = 0;
            if let Some(s) = spread.as_deref() {
                match s.check(&cons, agent) {
                    Verdict::Refused(what) => {
                        *refusals.constraints.entry(what).or_default() += 1;
                        continue;
                    }
                    Verdict::Ok { spread_rank: r } => spread_rank = r,
                }
            }
            let score = (spread_rank, fit_score(agent, &free, &demand, spec.placement));
            if best.is_none_or(|(s, _)| score < s) {
                best = Some((score, idx));
            }
            found += 1;
            if found >= CANDIDATES {
                break;
            }
        }
        match best {
            Some((_, idx)) => {
                let agent = agents[idx];
                let t = tentative.entry(agent.info.id).or_default();
                let ports = choose_ports(agent, &t.ports, demand.ports, rng);
                t.used.cpus_milli += demand.cpus_milli;
                t.used.mem_bytes += demand.mem_bytes;
                t.used.disk_bytes += demand.disk_bytes;
                t.used.ports += demand.ports;
                t.ports.extend(ports.iter().copied());
                if let Some(s) = spread {
                    s.add(agent);
                }
                out.placements.push(Placement { task: task_id, agent: agent.info.id, ports });
            }
            None => {
                let why = match pinned {
                    Some(slot) => system::explain(state, job, task, slot.map(|i| agents[i]), &refusals),
                    None => refusals.explain(agents.len(), state.agents.len()),
                };
                // Only its own agent may be freed for a system task.
                let pinned_agent: Vec<&Agent> = pinned.flatten().map(|i| agents[i]).into_iter().collect();
                let candidates: &[&Agent] = if pinned.is_some() { &pinned_agent } else { &agents };
                if spec.production && state.frozen.is_none() && preemption_searches < PREEMPTION_SEARCHES_PER_PASS {
                    preemption_searches += 1;
                    let already: BTreeSet<TaskId> = out.preemptions.iter().map(|p| p.victim).collect();
                    // Sibling-aware: the pass's own placements and promises count against the
                    // job's constraints (one per host, per-value limits).
                    let spread: &mut JobSpread = match spread {
                        Some(s) => s,
                        None => spreads.entry((*task.job).clone()).or_insert_with(|| JobSpread::of(state, job)),
                    };
                    let eligible: Vec<&Agent> = candidates
                        .iter()
                        .copied()
                        .filter(|a| maintenance.get(&a.info.id).is_none_or(|p| p.allows(spec.job_type)))
                        .collect();
                    let candidates: &[&Agent] = &eligible;
                    let found = preempt::find(state, candidates, &tentative, &promised, task, &cons, spread, &already);
                    if let Some(found) = found {
                        if let Some(agent) = state.agents.get(&found.agent) {
                            spread.add(agent);
                        }
                        let why = if found.victims.is_empty() {
                            format!("{why}; waiting for tasks stopping on agent {} to release room", found.agent)
                        } else {
                            format!("{why}; preempting lower-priority tasks on agent {}", found.agent)
                        };
                        out.held.push((found.agent, task_id));
                        let p = promised.entry(found.agent).or_default();
                        p.cpus_milli = p.cpus_milli.saturating_add(demand.cpus_milli);
                        p.mem_bytes = p.mem_bytes.saturating_add(demand.mem_bytes);
                        p.disk_bytes = p.disk_bytes.saturating_add(demand.disk_bytes);
                        p.ports = p.ports.saturating_add(demand.ports);
                        out.preemptions.extend(found.victims);
                        out.unplaced.push(Unplaced { task: task_id, why });
                        continue;
                    }
                }
                // Tasks of one job are alike: if this one fits nowhere, neither do its siblings
                // (not so for a system job: each of its tasks has an agent of its own).
                if pinned.is_none() {
                    hopeless.insert((*task.job).clone(), why.clone());
                }
                out.unplaced.push(Unplaced { task: task_id, why });
            }
        }
    }
    out.unplaced_jobs = hopeless.into_iter().collect();
    out.unplaced_jobs.sort();
    out
}

/// Smaller is better. Bin-pack: the least left afterwards (cpus and memory as shares of the
/// agent, parts per million); spread: the most left.
fn fit_score(agent: &Agent, free: &Demand, d: &Demand, policy: PlacementPolicy) -> u64 {
    let cap = &agent.info.capacity;
    let left_cpu = u64::from(free.cpus_milli - d.cpus_milli) * 1_000_000 / u64::from(cap.cpus_milli.max(1));
    let left_mem = ((free.mem_bytes - d.mem_bytes) as u128 * 1_000_000 / u128::from(cap.mem_bytes.max(1))) as u64;
    let left = left_cpu + left_mem;
    match policy {
        PlacementPolicy::Binpack => left,
        PlacementPolicy::Spread => 2_000_000 - left.min(2_000_000),
    }
}

/// Picks `count` free ports from the agent's ranges, starting at a seed-chosen offset so that a
/// port just released is not handed out again at once.
fn choose_ports(agent: &Agent, taken_now: &BTreeSet<u16>, count: u32, seed: u64) -> Vec<u16> {
    let ranges = &agent.info.capacity.ports;
    let total: u32 = ranges.iter().map(|r| r.len()).sum();
    if count == 0 || total == 0 {
        return vec![];
    }
    let start = (derive_id(seed) % u64::from(total)) as u32;
    let nth = |mut i: u32| -> u16 {
        for r in ranges {
            if i < r.len() {
                return r.first + i as u16;
            }
            i -= r.len();
        }
        unreachable!("index within total")
    };
    let mut out = Vec::with_capacity(count as usize);
    for k in 0..total {
        let port = nth((start + k) % total);
        if !agent.used_ports.contains(&port) && !taken_now.contains(&port) && !out.contains(&port) {
            out.push(port);
            if out.len() == count as usize {
                break;
            }
        }
    }
    out
}
