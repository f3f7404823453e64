//! Placement: which agent each pending task goes to. A pure function of (cluster state, now, seed):
//! feasibility (resources and ports actually free) → ranking (bin-pack: the agent left fullest)
//! → selection, with reservations made during one pass so a plan never over-commits an agent.
//! The master's `apply` re-checks every placement against the latest state before it commits it.

use capstan_model::{AgentId, Demand, TaskId, Timestamp};
use capstan_state::{Agent, ClusterState, Placement};
use std::collections::{BTreeMap, BTreeSet};

/// A task that could not be placed in this pass, and why, in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplaced {
    pub task: TaskId,
    pub why: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub placements: Vec<Placement>,
    pub unplaced: Vec<Unplaced>,
    /// The earliest time a task in backoff becomes placeable, if any is waiting.
    pub next_wakeup: Option<Timestamp>,
}

/// What one pass has reserved on top of the state, per agent.
#[derive(Default)]
struct Tentative {
    used: Demand,
    ports: BTreeSet<u16>,
}

/// Places up to `limit` pending tasks whose backoff has passed, highest priority first.
pub fn plan(state: &ClusterState, now: Timestamp, seed: u64, limit: usize) -> Plan {
    let mut out = Plan::default();
    let mut queue: Vec<(i32, u64, TaskId, Demand)> = Vec::new();
    for id in &state.pending {
        let Some(task) = state.tasks.get(id) else { continue };
        let Some(job) = state.jobs.get(&task.job) else { continue };
        if task.not_before > now {
            out.next_wakeup = Some(out.next_wakeup.map_or(task.not_before, |w| w.min(task.not_before)));
            continue;
        }
        queue.push((job.spec.priority, task.seq, *id, job.spec.task.demand()));
    }
    queue.sort_by_key(|(priority, seq, _, _)| (-(*priority as i64), *seq));
    let mut tentative: BTreeMap<AgentId, Tentative> = BTreeMap::new();
    for (_, _, task, demand) in queue.into_iter().take(limit) {
        match best_agent(state, &tentative, &demand) {
            Ok(agent) => {
                let t = tentative.entry(agent.info.id).or_default();
                let ports = choose_ports(agent, &t.ports, demand.ports, seed ^ task.0);
                t.used.cpus_milli += demand.cpus_milli;
                t.used.mem_bytes += demand.mem_bytes;
                t.used.disk_bytes += demand.disk_bytes;
                t.used.ports += demand.ports;
                t.ports.extend(ports.iter().copied());
                out.placements.push(Placement { task, agent: agent.info.id, ports });
            }
            Err(why) => out.unplaced.push(Unplaced { task, why }),
        }
    }
    out
}

fn free_after(agent: &Agent, t: Option<&Tentative>) -> Demand {
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

/// Bin-pack: among agents where the task fits, the one with the least left afterwards (cpus and
/// memory as shares of the agent). Ties go to the lower agent id, so the plan is deterministic.
fn best_agent<'a>(
    state: &'a ClusterState,
    tentative: &BTreeMap<AgentId, Tentative>,
    d: &Demand,
) -> Result<&'a Agent, String> {
    if state.agents.is_empty() {
        return Err("no agents are registered".into());
    }
    let mut best: Option<(u64, &Agent)> = None;
    let mut lacking = [0u32; 4];
    for agent in state.agents.values() {
        let free = free_after(agent, tentative.get(&agent.info.id));
        let fails = [
            free.cpus_milli < d.cpus_milli,
            free.mem_bytes < d.mem_bytes,
            free.disk_bytes < d.disk_bytes,
            free.ports < d.ports,
        ];
        if fails.iter().any(|f| *f) {
            for (i, f) in fails.iter().enumerate() {
                lacking[i] += u32::from(*f);
            }
            continue;
        }
        let cap = &agent.info.capacity;
        // Leftover shares in parts per million; smaller is a tighter fit.
        let left_cpu = u64::from(free.cpus_milli - d.cpus_milli) * 1_000_000 / u64::from(cap.cpus_milli.max(1));
        let left_mem = (free.mem_bytes - d.mem_bytes) as u128 * 1_000_000 / u128::from(cap.mem_bytes.max(1));
        let score = left_cpu + left_mem as u64;
        if best.is_none_or(|(s, _)| score < s) {
            best = Some((score, agent));
        }
    }
    best.map(|(_, a)| a).ok_or_else(|| {
        let n = state.agents.len();
        let parts: Vec<String> = ["cpus", "mem", "disk", "ports"]
            .iter()
            .zip(lacking)
            .filter(|(_, c)| *c > 0)
            .map(|(what, c)| format!("{c} lack {what}"))
            .collect();
        format!("no agent has room: of {n} agents, {}", parts.join(", "))
    })
}

/// Picks `count` free ports from the agent's ranges, starting at a seed-chosen offset so that a
/// port just released is not handed out again at once.
fn choose_ports(agent: &Agent, taken_now: &BTreeSet<u16>, count: u32, seed: u64) -> Vec<u16> {
    let ranges = &agent.info.capacity.ports;
    let total: u32 = ranges.iter().map(|r| r.len()).sum();
    if count == 0 || total == 0 {
        return vec![];
    }
    let start = (capstan_model::derive_id(seed) % u64::from(total)) as u32;
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
