//! The drain loop: every tick, asks the state which tasks of draining agents may stop now
//! (`ClusterState::drain_plan`, pure, in `capstan-state`), submits them as one `DrainMoves`
//! command (whose `apply` checks each against its job's `min_healthy` again and stops it; the
//! service instance starts again elsewhere, since a draining agent is not schedulable), marks
//! agents with nothing left `MarkDrained`, and says what it does and what holds it back as
//! events. While the cluster is frozen it moves nothing and says why, once.

use crate::core::Core;
use crate::events::Events;
use capstan_model::AgentId;
use capstan_state::drain::DRAIN_MOVES_PER_STEP_MAX;
use capstan_state::Command;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How often the drain loop looks; a move waits at most this long after the previous one's
/// replacement became healthy.
pub const TICK: Duration = Duration::from_millis(250);

/// What the loop last said about an agent, so that a blocked drain is one event, not one per tick.
#[derive(Default)]
struct Said {
    by_agent: HashMap<AgentId, String>,
}

pub async fn run(core: Arc<Core>, events: Arc<Events>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut said = Said::default();
    loop {
        interval.tick().await;
        step(&core, &events, &mut said).await;
    }
}

async fn step(core: &Core, events: &Events, said: &mut Said) {
    let (plan, to_mark, described) = {
        let state = core.state.read();
        if !state.agents.values().any(|a| a.drain.is_some()) {
            said.by_agent.clear();
            return;
        }
        let plan = state.drain_plan(DRAIN_MOVES_PER_STEP_MAX);
        let to_mark: Vec<AgentId> = plan
            .agents
            .iter()
            .filter(|(id, p)| p.done() && state.agents[id].drain.as_ref().is_some_and(|d| d.drained_at.is_none()))
            .map(|(id, _)| *id)
            .collect();
        let described: HashMap<_, _> = plan
            .moves
            .iter()
            .filter_map(|id| state.tasks.get(id))
            .map(|t| (t.id, (t.job.to_string(), t.instance, t.agent)))
            .collect();
        (plan, to_mark, described)
    };
    said.by_agent.retain(|a, _| plan.agents.contains_key(a));
    for (agent, p) in &plan.agents {
        let line = match (&p.waiting, p.blocked.is_empty()) {
            (Some(w), _) if p.to_move > 0 => format!("waiting: {w}"),
            (_, false) => {
                let jobs: Vec<String> = p.blocked.iter().map(|b| b.to_string()).collect();
                format!("blocked by {}", jobs.join("; "))
            }
            _ => String::new(),
        };
        if said.by_agent.get(agent) != Some(&line) {
            if !line.is_empty() {
                events.add("drain_blocked", format!("drain of agent {agent}: {line}"));
            }
            said.by_agent.insert(*agent, line);
        }
    }
    if !plan.moves.is_empty() {
        match core.submit(Command::DrainMoves { moves: plan.moves }).await {
            Ok(applied) => {
                for task in applied.moved {
                    let Some((job, instance, agent)) = described.get(&task) else { continue };
                    let agent = agent.map(|a| a.to_string()).unwrap_or_default();
                    events.add(
                        "drain_move",
                        format!(
                            "task {task} (job {job}, instance {instance}) stopped to move off draining agent {agent}; \
                             its replacement goes elsewhere"
                        ),
                    );
                }
            }
            Err(e) => tracing::debug!("drain moves not applied: {e}"),
        }
    }
    for agent in to_mark {
        match core.submit(Command::MarkDrained { agent }).await {
            Ok(_) => {
                events.add("agent_drained", format!("agent {agent} is drained: nothing that had to leave is left"))
            }
            Err(e) => tracing::debug!("agent {agent} not marked drained: {e}"),
        }
    }
}
