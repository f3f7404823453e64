//! The task lifecycle: one exhaustive `match` over (state, event) that returns the new state and
//! the effects the caller must run. The caller runs effects in the order they are listed
//! (`Release` before `Replace`, so that a replacement may reuse what was released).
//!
//! An event that makes no sense in a state (a report for a task that already ended, say) is
//! `Illegal`: the state is unchanged and the caller counts it; it is never a panic.

use crate::exit::TaskExit;
use crate::ids::AgentId;
use crate::spec::JobType;
use crate::task::{Desired, TaskState, Timestamp};

/// Something that happened to a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The scheduler placed it on an agent.
    Assign { agent: AgentId },
    /// The agent reports it is launching the task.
    Starting,
    /// The agent reports the task's process runs.
    Running { pid: u32 },
    /// The agent reports the task's process ended.
    Exited(TaskExit),
    /// Someone asked Capstan to stop it; `by` is said in the reason ("user request", "job killed").
    Kill { by: String },
    /// Its agent is gone and the task with it: the agent says it no longer has the task, or it
    /// stayed unreachable past the job's `replace_after` (then the task is replaced elsewhere).
    AgentLost,
    /// Its agent stopped answering heartbeats.
    AgentUnreachable,
    /// Its agent answers again and still has the task. For a LOST task this takes the copy back
    /// (its replacement had not started); the caller decides when that is right.
    AgentBack,
}

impl Event {
    /// A short name for tables and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Assign { .. } => "assign",
            Event::Starting => "starting",
            Event::Running { .. } => "running",
            Event::Exited(e) if e.is_success() => "exited(0)",
            Event::Exited(_) => "exited(failure)",
            Event::Kill { .. } => "kill",
            Event::AgentLost => "agent_lost",
            Event::AgentUnreachable => "agent_unreachable",
            Event::AgentBack => "agent_back",
        }
    }
}

/// What the caller must do after a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Send the launch order to the task's agent.
    Launch,
    /// Tell the task's agent to stop it (SIGTERM, then SIGKILL after the task's kill grace).
    Kill,
    /// Give back what the task held on its agent.
    Release,
    /// Hold the task's resources on its agent again (a LOST copy taken back).
    Reserve,
    /// Start a new task for the same instance, not before `delay_ms`; `failures` is the instance's
    /// count of consecutive failures so far (it drives the backoff and `max_failures`).
    Replace { delay_ms: u64, failures: u32 },
    /// The instance is over for good (batch): it succeeded, or it failed past `max_failures`.
    InstanceDone { success: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The event changed the task.
    Applied,
    /// The event repeats what is already known (a duplicate report); nothing to do.
    Ignored,
    /// The event makes no sense in this state; nothing changed; count it.
    Illegal,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub state: TaskState,
    pub desired: Desired,
    pub effects: Vec<Effect>,
    /// The task's new reason, in words, when it changes.
    pub reason: Option<String>,
    pub outcome: Outcome,
}

/// How ended tasks of a job are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    pub job_type: JobType,
    /// Batch: retries of a failed instance before it is FAILED for good.
    pub max_failures: u32,
}

/// What the lifecycle needs to know beyond state and event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context<'a> {
    pub now: Timestamp,
    /// Why Capstan asked for the task to stop, if it did: the end of a killed task names it (the
    /// agent's own report only says it was told to stop).
    pub kill_reason: Option<&'a str>,
    /// When the task was last seen entering RUNNING.
    pub running_since: Option<Timestamp>,
    /// Consecutive failures of this instance before this task.
    pub failures: u32,
    pub policy: RestartPolicy,
}

/// A run at least this long resets a service instance's failure count: it was healthy, not flapping.
pub const STABLE_RUN_MS: u64 = 5 * 60 * 1000;
pub const BACKOFF_FIRST_MS: u64 = 1_000;
pub const BACKOFF_MAX_MS: u64 = 60_000;

/// Delay before the n-th consecutive restart of a flapping instance: 1 s, 2 s, 4 s … 60 s.
pub fn backoff_ms(failures: u32) -> u64 {
    if failures == 0 {
        return 0;
    }
    let shift = (failures - 1).min(16);
    (BACKOFF_FIRST_MS << shift).min(BACKOFF_MAX_MS)
}

/// The lifecycle. Exhaustive by construction: no wildcard arm, so a new state or event does not
/// compile until every pair is decided.
pub fn transition(state: TaskState, desired: Desired, event: &Event, cx: &Context<'_>) -> Transition {
    use Desired::*;
    use TaskState::*;
    let same = |outcome| Transition { state, desired, effects: vec![], reason: None, outcome };
    let to = |state, desired, effects: Vec<Effect>, reason: String| Transition {
        state,
        desired,
        effects,
        reason: Some(reason),
        outcome: Outcome::Applied,
    };
    match (state, event) {
        // --- placement
        (Pending, Event::Assign { agent }) => match desired {
            Run => to(Assigned, Run, vec![Effect::Launch], format!("assigned to agent {agent}")),
            Stop => same(Outcome::Illegal),
        },
        (Assigned | Starting | Running | Killing | Unreachable, Event::Assign { .. }) => same(Outcome::Illegal),
        (Finished | Failed | Killed | Lost, Event::Assign { .. }) => same(Outcome::Illegal),

        // --- reports from the agent
        (Assigned, Event::Starting) => to(Starting, desired, vec![], "launching".into()),
        // An unreachable agent's reports wait for its return (`AgentBack`), except its exits.
        (Starting | Running | Killing | Unreachable, Event::Starting) => same(Outcome::Ignored),
        (Pending | Finished | Failed | Killed | Lost, Event::Starting) => same(Outcome::Illegal),

        (Assigned | Starting, Event::Running { pid }) => to(Running, desired, vec![], format!("running as pid {pid}")),
        (Running | Killing | Unreachable, Event::Running { .. }) => same(Outcome::Ignored),
        (Pending | Finished | Failed | Killed | Lost, Event::Running { .. }) => same(Outcome::Illegal),

        (Killing, Event::Exited(exit)) => {
            let reason = match (cx.kill_reason, exit) {
                (Some(why), _) => format!("killed: {why}"),
                (None, TaskExit::Killed { by }) => format!("killed: {by}"),
                (None, other) => format!("killed while stopping ({other})"),
            };
            to(Killed, Stop, vec![Effect::Release], reason)
        }
        (Assigned | Starting | Running | Unreachable, Event::Exited(exit)) => match desired {
            Stop => {
                let reason = cx.kill_reason.map_or_else(|| exit.to_string(), |why| format!("killed: {why}"));
                to(Killed, Stop, vec![Effect::Release], reason)
            }
            Run => ended_by_itself(exit, cx),
        },
        (Pending | Finished | Failed | Killed | Lost, Event::Exited(_)) => same(Outcome::Illegal),

        // --- orders
        (Pending, Event::Kill { by }) => to(Killed, Stop, vec![], format!("killed: {by} (before it was placed)")),
        (Assigned | Starting | Running, Event::Kill { by }) => {
            to(Killing, Stop, vec![Effect::Kill], format!("killing: {by}"))
        }
        (Unreachable, Event::Kill { by }) => match desired {
            Run => to(Unreachable, Stop, vec![], format!("to be killed once its agent answers: {by}")),
            Stop => same(Outcome::Ignored),
        },
        (Killing | Finished | Failed | Killed | Lost, Event::Kill { .. }) => same(Outcome::Ignored),

        // --- the agent is gone
        (Assigned | Starting | Running, Event::AgentLost) => match desired {
            Run => {
                let mut effects = vec![Effect::Release];
                effects.push(Effect::Replace { delay_ms: 0, failures: cx.failures });
                to(Lost, Run, effects, "lost with its agent".into())
            }
            Stop => to(Lost, Stop, vec![Effect::Release], "lost with its agent".into()),
        },
        (Killing, Event::AgentLost) => {
            to(Lost, Stop, vec![Effect::Release], "lost with its agent while stopping".into())
        }
        (Unreachable, Event::AgentLost) => match desired {
            Run => to(
                Lost,
                Run,
                vec![Effect::Release, Effect::Replace { delay_ms: 0, failures: cx.failures }],
                "lost: its agent stayed unreachable past the job's replace_after; replaced elsewhere".into(),
            ),
            Stop => {
                to(Lost, Stop, vec![Effect::Release], "lost: its agent stayed unreachable while it was to stop".into())
            }
        },
        (Pending | Finished | Failed | Killed | Lost, Event::AgentLost) => same(Outcome::Illegal),

        // --- the agent stops answering, and comes back
        (Assigned | Starting | Running | Killing, Event::AgentUnreachable) => {
            to(Unreachable, desired, vec![], "its agent stopped answering; the task probably still runs there".into())
        }
        (Unreachable, Event::AgentUnreachable) => same(Outcome::Ignored),
        (Pending | Finished | Failed | Killed | Lost, Event::AgentUnreachable) => same(Outcome::Illegal),

        (Unreachable, Event::AgentBack) => match desired {
            // Without a start seen, the launch may not have happened: the order is sent again and
            // the agent (which knows the task) reports what it sees.
            Run if cx.running_since.is_some() => to(Running, Run, vec![], "its agent answers again".into()),
            Run => to(Assigned, Run, vec![Effect::Launch], "its agent answers again".into()),
            Stop => {
                let why = cx.kill_reason.unwrap_or("stop requested while its agent was unreachable");
                to(Killing, Stop, vec![Effect::Kill], format!("killing: {why}"))
            }
        },
        (Lost, Event::AgentBack) => match desired {
            Run => to(
                Running,
                Run,
                vec![Effect::Reserve],
                "taken back: its agent returned with it running before its replacement started".into(),
            ),
            Stop => same(Outcome::Illegal),
        },
        (Assigned | Starting | Running | Killing, Event::AgentBack) => same(Outcome::Ignored),
        (Pending | Finished | Failed | Killed, Event::AgentBack) => same(Outcome::Illegal),
    }
}

/// A task that Capstan wanted running ended by itself.
fn ended_by_itself(exit: &TaskExit, cx: &Context<'_>) -> Transition {
    let success = exit.is_success();
    let state = if success { TaskState::Finished } else { TaskState::Failed };
    let mut effects = vec![Effect::Release];
    let reason = exit.to_string();
    match cx.policy.job_type {
        crate::spec::JobType::Batch | crate::spec::JobType::Cron => {
            if success {
                effects.push(Effect::InstanceDone { success: true });
            } else if cx.failures < cx.policy.max_failures {
                let failures = cx.failures + 1;
                effects.push(Effect::Replace { delay_ms: backoff_ms(failures), failures });
            } else {
                effects.push(Effect::InstanceDone { success: false });
            }
        }
        crate::spec::JobType::Service | crate::spec::JobType::System => {
            let ran_ms = cx.running_since.map(|t| cx.now.since(t)).unwrap_or(0);
            let failures = if ran_ms >= STABLE_RUN_MS { 1 } else { cx.failures + 1 };
            effects.push(Effect::Replace { delay_ms: backoff_ms(failures), failures });
        }
    }
    Transition { state, desired: Desired::Run, effects, reason: Some(reason), outcome: Outcome::Applied }
}

/// Every event kind, with representative payloads, for the matrix test and documentation.
pub fn sample_events() -> Vec<Event> {
    vec![
        Event::Assign { agent: AgentId(1) },
        Event::Starting,
        Event::Running { pid: 42 },
        Event::Exited(TaskExit::Exited { code: 0 }),
        Event::Exited(TaskExit::Exited { code: 3 }),
        Event::Kill { by: "user request".into() },
        Event::AgentLost,
        Event::AgentUnreachable,
        Event::AgentBack,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::JobType;
    use std::fmt::Write;

    fn cx(job_type: JobType, failures: u32) -> Context<'static> {
        Context {
            kill_reason: None,
            now: Timestamp(10_000),
            running_since: Some(Timestamp(9_000)),
            failures,
            policy: RestartPolicy { job_type, max_failures: 2 },
        }
    }

    fn effects_text(effects: &[Effect]) -> String {
        effects
            .iter()
            .map(|e| match e {
                Effect::Launch => "launch".to_string(),
                Effect::Kill => "kill".to_string(),
                Effect::Release => "release".to_string(),
                Effect::Reserve => "reserve".to_string(),
                Effect::Replace { delay_ms, failures } => format!("replace({delay_ms}ms,f={failures})"),
                Effect::InstanceDone { success } => format!("done({success})"),
            })
            .collect::<Vec<_>>()
            .join("+")
    }

    /// The whole state × event matrix, for both desired states and both job kinds, in one snapshot.
    #[test]
    fn matrix() {
        let mut out = String::new();
        for job_type in [JobType::Service, JobType::Batch] {
            for desired in [Desired::Run, Desired::Stop] {
                writeln!(out, "## {} tasks, desired {desired:?}", job_type.as_str()).unwrap();
                for state in TaskState::ALL {
                    for event in sample_events() {
                        let t = transition(state, desired, &event, &cx(job_type, 0));
                        let cell = match t.outcome {
                            Outcome::Illegal => "illegal".to_string(),
                            Outcome::Ignored => "ignored".to_string(),
                            Outcome::Applied => format!(
                                "{} ({:?}) {} | {}",
                                t.state,
                                t.desired,
                                effects_text(&t.effects),
                                t.reason.unwrap_or_default()
                            ),
                        };
                        writeln!(out, "{:<9} + {:<16} -> {cell}", state.as_str(), event.name()).unwrap();
                    }
                }
            }
        }
        insta::assert_snapshot!(out);
    }

    #[test]
    fn a_service_task_that_exits_is_replaced() {
        let t = transition(
            TaskState::Running,
            Desired::Run,
            &Event::Exited(TaskExit::Exited { code: 0 }),
            &cx(JobType::Service, 0),
        );
        assert_eq!(t.state, TaskState::Finished);
        assert_eq!(t.effects, vec![Effect::Release, Effect::Replace { delay_ms: 1_000, failures: 1 }]);
    }

    #[test]
    fn a_flapping_service_backs_off_longer_each_time() {
        let mut failures = 0;
        let mut delays = vec![];
        for _ in 0..8 {
            let t = transition(
                TaskState::Running,
                Desired::Run,
                &Event::Exited(TaskExit::Exited { code: 1 }),
                &cx(JobType::Service, failures),
            );
            match t.effects[1] {
                Effect::Replace { delay_ms, failures: f } => {
                    delays.push(delay_ms);
                    failures = f;
                }
                ref other => panic!("expected replace, got {other:?}"),
            }
        }
        assert_eq!(delays, vec![1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000]);
    }

    #[test]
    fn a_service_that_ran_long_restarts_quickly_again() {
        let mut c = cx(JobType::Service, 6);
        c.running_since = Some(Timestamp(0));
        c.now = Timestamp(STABLE_RUN_MS + 1);
        let t = transition(TaskState::Running, Desired::Run, &Event::Exited(TaskExit::Signaled { signal: 9 }), &c);
        assert_eq!(t.effects[1], Effect::Replace { delay_ms: 1_000, failures: 1 });
        assert_eq!(t.reason.as_deref(), Some("killed by signal 9 (SIGKILL)"));
    }

    #[test]
    fn a_batch_task_that_exits_0_is_finished() {
        let t = transition(
            TaskState::Running,
            Desired::Run,
            &Event::Exited(TaskExit::Exited { code: 0 }),
            &cx(JobType::Batch, 0),
        );
        assert_eq!(t.state, TaskState::Finished);
        assert_eq!(t.effects, vec![Effect::Release, Effect::InstanceDone { success: true }]);
    }

    #[test]
    fn a_failing_batch_task_is_retried_max_failures_times() {
        let exit = Event::Exited(TaskExit::Exited { code: 3 });
        let mut runs = 0;
        let mut failures = 0;
        loop {
            runs += 1;
            let t = transition(TaskState::Running, Desired::Run, &exit, &cx(JobType::Batch, failures));
            assert_eq!(t.state, TaskState::Failed);
            assert_eq!(t.reason.as_deref(), Some("exited with code 3"));
            match t.effects[1] {
                Effect::Replace { failures: f, .. } => failures = f,
                Effect::InstanceDone { success: false } => break,
                ref other => panic!("{other:?}"),
            }
        }
        // max_failures = 2: the first run and two retries.
        assert_eq!(runs, 3);
    }

    #[test]
    fn a_killed_task_ends_killed() {
        let c = cx(JobType::Service, 0);
        let t = transition(TaskState::Running, Desired::Run, &Event::Kill { by: "user request".into() }, &c);
        assert_eq!((t.state, t.desired), (TaskState::Killing, Desired::Stop));
        assert_eq!(t.effects, vec![Effect::Kill]);
        let t = transition(t.state, t.desired, &Event::Exited(TaskExit::Killed { by: "user request".into() }), &c);
        assert_eq!(t.state, TaskState::Killed);
        assert_eq!(t.effects, vec![Effect::Release], "a killed task is not replaced by its lifecycle");
        assert_eq!(t.reason.as_deref(), Some("killed: user request"));
    }

    #[test]
    fn a_killed_task_ends_with_the_reason_it_was_stopped_for_not_the_agents_words() {
        let mut c = cx(JobType::Service, 0);
        c.kill_reason = Some("preempted by task 00000000000000ab");
        let agent_says = Event::Exited(TaskExit::Killed { by: "the master ordered it stopped".into() });
        let t = transition(TaskState::Killing, Desired::Stop, &agent_says, &c);
        assert_eq!(t.reason.as_deref(), Some("killed: preempted by task 00000000000000ab"));
        // Ended on its own just as the stop was decided: still a kill, with its cause.
        let t = transition(TaskState::Running, Desired::Stop, &Event::Exited(TaskExit::Exited { code: 0 }), &c);
        assert_eq!(
            (t.state, t.reason.as_deref()),
            (TaskState::Killed, Some("killed: preempted by task 00000000000000ab"))
        );
    }

    #[test]
    fn illegal_transitions_change_nothing() {
        let c = cx(JobType::Service, 0);
        let t = transition(TaskState::Finished, Desired::Run, &Event::Running { pid: 1 }, &c);
        assert_eq!(t.outcome, Outcome::Illegal);
        assert_eq!(t.state, TaskState::Finished);
        assert!(t.effects.is_empty());
    }
}
