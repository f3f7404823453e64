//! System tasks: each instance of a system job belongs to one agent (`Job::pinned`), so it is
//! placed there or nowhere; preemption, for a production system job, looks at that agent only.

use crate::Refusals;
use capstan_model::AgentId;
use capstan_state::{Agent, ClusterState, Job, Task};
use std::collections::HashMap;

/// `None`: not a system task (any agent will do). `Some(slot)`: the task may go only to
/// `agents[slot]`, or nowhere when its agent is not among the active ones.
pub(crate) fn pinned_slot(
    agents: &[&Agent],
    index: &mut Option<HashMap<AgentId, usize>>,
    job: &Job,
    task: &Task,
) -> Option<Option<usize>> {
    if !job.is_system() {
        return None;
    }
    let Some(agent) = job.pinned_agent(task.instance) else { return Some(None) };
    let index = index.get_or_insert_with(|| agents.iter().enumerate().map(|(i, a)| (a.info.id, i)).collect());
    Some(index.get(&agent).copied())
}

/// Why a system task is not placed on its agent, in words.
pub(crate) fn explain(state: &ClusterState, job: &Job, task: &Task, agent: Option<&Agent>, r: &Refusals) -> String {
    let Some(agent) = agent else {
        return match job.pinned_agent(task.instance).and_then(|id| state.agents.get(&id)) {
            Some(a) => format!(
                "its agent {} ({}) is {}: it waits for the agent to come back",
                a.info.hostname,
                a.info.id,
                a.liveness.as_str()
            ),
            None => "its agent is gone".into(),
        };
    };
    let host = &agent.info.hostname;
    let lacks: Vec<&str> =
        ["cpus", "mem", "disk", "ports"].iter().zip(r.resources).filter(|(_, c)| *c > 0).map(|(w, _)| *w).collect();
    if !lacks.is_empty() {
        return format!("does not fit on its agent {host}: not enough {} free", lacks.join(", "));
    }
    match r.constraints.keys().next() {
        Some(what) => format!("its agent {host} fails {what}"),
        None => format!("not placed on its agent {host} in this pass"),
    }
}
