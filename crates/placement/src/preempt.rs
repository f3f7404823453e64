//! Preemption: a production task that fits nowhere may stop lower-priority, non-production tasks
//! on one agent. Production tasks are never victims.
//!
//! Room that is already on its way counts before any new victim is chosen: tasks stopping on the
//! agent (earlier passes' victims, tasks killed by users) and victims chosen earlier in this pass,
//! minus what earlier preemptors of this pass were promised there. Without that, every pass that
//! runs while the victims stop (and the scheduler runs one whenever anything changes) would pick
//! more victims for the same preemptor.

use crate::constraints::{JobSpread, Verdict};
use crate::{free_after, Tentative};
use capstan_model::spec::Constraint;
use capstan_model::{AgentId, Demand, Desired, TaskId};
use capstan_state::{Agent, ClusterState, Preemption, Task};
use std::collections::{BTreeSet, HashMap};

/// Where a production task will go once room is released, and the victims to stop for it (none
/// when tasks already stopping there make enough room).
pub(crate) struct Found {
    pub(crate) agent: AgentId,
    pub(crate) victims: Vec<Preemption>,
}

/// The cheapest set of victims on one agent that makes room for `task`: fewest victims, then
/// lowest priorities. `None` when no agent can be freed enough.
#[allow(clippy::too_many_arguments)]
pub(crate) fn find(
    state: &ClusterState,
    agents: &[&Agent],
    tentative: &HashMap<AgentId, Tentative>,
    promised: &HashMap<AgentId, Demand>,
    task: &Task,
    constraints: &[Constraint],
    spread: &JobSpread,
    already: &BTreeSet<TaskId>,
) -> Option<Found> {
    let job = state.jobs.get(&task.job)?;
    let priority = job.spec.priority;
    let demand = job.spec_for(task.job_version).task.demand();
    let mut best: Option<((usize, i64), AgentId, Vec<TaskId>)> = None;
    for agent in agents {
        if let Verdict::Refused(_) = spread.check(constraints, agent) {
            continue;
        }
        let mut free = free_after(agent, tentative.get(&agent.info.id));
        let mut need = demand;
        if let Some(p) = promised.get(&agent.info.id) {
            add(&mut need, p);
        }
        let mut candidates: Vec<(i32, &Task)> = Vec::new();
        for t in agent.tasks.iter().filter_map(|id| state.tasks.get(id)) {
            let Some(j) = state.jobs.get(&t.job) else { continue };
            if !t.state.holds_resources() {
                continue;
            }
            if t.desired == Desired::Stop || already.contains(&t.id) {
                // Being released already.
                add(&mut free, &j.spec_for(t.job_version).task.demand());
            } else if !j.spec.production && j.spec.priority < priority {
                candidates.push((j.spec.priority, t));
            }
        }
        if candidates.is_empty() && !fits(&free, &need) {
            continue;
        }
        candidates.sort_by_key(|(p, t)| (*p, std::cmp::Reverse(t.seq)));
        let mut victims = Vec::new();
        let mut cost = 0i64;
        for (p, t) in candidates {
            if fits(&free, &need) {
                break;
            }
            add(&mut free, &state.jobs[&t.job].spec_for(t.job_version).task.demand());
            victims.push(t.id);
            cost += i64::from(p);
        }
        if !fits(&free, &need) {
            continue;
        }
        let key = (victims.len(), cost);
        if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
            best = Some((key, agent.info.id, victims));
        }
    }
    best.map(|(_, agent, victims)| Found {
        agent,
        victims: victims.into_iter().map(|victim| Preemption { victim, by: task.id }).collect(),
    })
}

fn add(to: &mut Demand, d: &Demand) {
    to.cpus_milli = to.cpus_milli.saturating_add(d.cpus_milli);
    to.mem_bytes = to.mem_bytes.saturating_add(d.mem_bytes);
    to.disk_bytes = to.disk_bytes.saturating_add(d.disk_bytes);
    to.ports = to.ports.saturating_add(d.ports);
}

fn fits(free: &Demand, d: &Demand) -> bool {
    free.cpus_milli >= d.cpus_milli
        && free.mem_bytes >= d.mem_bytes
        && free.disk_bytes >= d.disk_bytes
        && free.ports >= d.ports
}
