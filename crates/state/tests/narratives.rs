//! Stories of a task's life, told through commands, each checking what a person would look at:
//! task states and reasons, replacements, finished jobs, counters.

mod common;

use capstan_model::{AgentId, JobKey, TaskExit, TaskId, TaskState, Timestamp};
use capstan_state::{Applied, Command, Placement, Rejection, Report, StatusUpdate, Task};
use common::{agent_info, JobShape, TestCluster, MIB};
use std::collections::BTreeMap;

const AGENT: AgentId = AgentId(1);

type Cluster = TestCluster;

impl Cluster {
    /// One agent with 4 cpus, 4 GiB, 4 GiB of disk and ports 31000-31009.
    fn new() -> Cluster {
        let mut c = Cluster::empty();
        c.register(AGENT, 4000, 4096 * MIB, 4096 * MIB, 31000);
        c
    }

    fn wait(&mut self, ms: u64) {
        self.now_ms += ms;
    }

    fn create(&mut self, key: &str, shape: JobShape) -> Vec<TaskId> {
        self.apply(Command::CreateJob { spec: shape.spec(key), seed: 42 }).created
    }

    /// Places a pending task on the agent with the lowest free ports; the placement must take.
    fn place(&mut self, task: TaskId) {
        self.place_on(task, AGENT);
        assert_eq!(self.task(task).state, TaskState::Assigned);
    }

    /// The agent reports on a task, with its next sequence number.
    fn report(&mut self, task: TaskId, report: Report) -> Applied {
        self.report_from(AGENT, task, report)
    }

    fn run(&mut self, task: TaskId) {
        self.place(task);
        self.report(task, Report::Starting);
        self.report(task, Report::Running { pid: 4242 });
        assert_eq!(self.task(task).state, TaskState::Running);
    }

    fn exit(&mut self, task: TaskId, exit: TaskExit) {
        self.report(task, Report::Exited { exit });
    }

    fn task(&self, id: TaskId) -> &Task {
        self.state.tasks.get(&id).unwrap_or_else(|| panic!("no task {id}"))
    }
}

fn key(job: &str) -> JobKey {
    job.parse().unwrap()
}

#[test]
fn a_service_task_that_exits_is_replaced() {
    let mut c = Cluster::new();
    let old = c.create("www/prod/hello", JobShape::service(1))[0];
    c.run(old);
    c.exit(old, TaskExit::Exited { code: 0 });
    let exited_at = c.now_ms;

    assert_eq!(c.task(old).state, TaskState::Finished);
    assert_eq!(c.task(old).reason(), "exited with code 0");
    let new = c.current("www/prod/hello", 0);
    assert_ne!(new, old, "a replacement is a new task");
    let t = c.task(new);
    assert_eq!((t.instance, t.state), (0, TaskState::Pending));
    assert!(t.not_before > Timestamp(exited_at), "restarts back off: {:?} vs {exited_at}", t.not_before);
    assert_eq!(t.not_before, Timestamp(exited_at + 1_000));
    assert_eq!(t.failures, 1);
    assert!(c.state.pending.contains(&new));
    assert!(c.state.agents[&AGENT].tasks.is_empty(), "the old task released what it held");
    assert_eq!(c.state.jobs[&key("www/prod/hello")].history[&0], vec![old, new]);
}

#[test]
fn a_batch_job_whose_tasks_exit_0_is_finished() {
    let mut c = Cluster::new();
    let tasks = c.create("etl/prod/nightly", JobShape::batch(2, 3));
    for t in &tasks {
        c.run(*t);
    }
    c.exit(tasks[0], TaskExit::Exited { code: 0 });
    assert_eq!(c.state.jobs[&key("etl/prod/nightly")].finished_at, None, "one instance still runs");
    c.exit(tasks[1], TaskExit::Exited { code: 0 });

    let job = &c.state.jobs[&key("etl/prod/nightly")];
    assert_eq!(job.finished_at, Some(Timestamp(c.now_ms)));
    assert_eq!(job.done, BTreeMap::from([(0, true), (1, true)]));
    assert!(tasks.iter().all(|t| c.task(*t).state == TaskState::Finished));
    assert!(c.state.pending.is_empty(), "a finished batch instance is not restarted");
    assert_eq!(job.current, BTreeMap::from([(0, tasks[0]), (1, tasks[1])]));
}

#[test]
fn a_failing_batch_task_is_retried_max_failures_times() {
    let mut c = Cluster::new();
    let mut task = c.create("etl/prod/flaky", JobShape::batch(1, 2))[0];
    let mut runs = 0;
    loop {
        runs += 1;
        c.run(task);
        c.exit(task, TaskExit::Exited { code: 3 });
        assert_eq!(c.task(task).state, TaskState::Failed);
        assert_eq!(c.task(task).reason(), "exited with code 3");
        let next = c.current("etl/prod/flaky", 0);
        if next == task {
            break;
        }
        assert!(runs < 10, "never gave up");
        let t = c.task(next);
        assert_eq!((t.state, t.failures), (TaskState::Pending, runs));
        c.wait(t.not_before.since(Timestamp(c.now_ms)));
        task = next;
    }
    assert_eq!(runs, 3, "max_failures = 2: the first run and two retries");
    let job = &c.state.jobs[&key("etl/prod/flaky")];
    assert_eq!(job.done, BTreeMap::from([(0, false)]), "the instance is done, as a failure");
    assert!(job.finished_at.is_some());
    assert_eq!(job.history[&0].len(), 3);
    assert!(c.state.pending.is_empty());
}

#[test]
fn a_killed_job_goes_away_once_its_tasks_ended() {
    let mut c = Cluster::new();
    let tasks = c.create("www/prod/doomed", JobShape::service(3));
    c.run(tasks[0]);
    c.place(tasks[1]);
    // tasks[2] is never placed.
    c.apply(Command::KillJob { job: key("www/prod/doomed"), by: "user request".into() });

    assert_eq!(c.task(tasks[0]).state, TaskState::Killing);
    assert_eq!(c.task(tasks[0]).reason(), "killing: user request");
    assert_eq!(c.task(tasks[1]).state, TaskState::Killing);
    assert_eq!(c.task(tasks[2]).state, TaskState::Killed, "an unplaced task ends at once");
    assert!(c.state.pending.is_empty());
    assert!(c.state.jobs.contains_key(&key("www/prod/doomed")), "it waits for its tasks");
    assert_eq!(c.state.agents[&AGENT].tasks.len(), 2, "killing tasks still hold their resources");

    c.exit(tasks[0], TaskExit::Killed { by: "user request".into() });
    assert_eq!(c.task(tasks[0]).state, TaskState::Killed);
    assert_eq!(c.task(tasks[0]).reason(), "killed: user request");
    assert!(c.state.jobs.contains_key(&key("www/prod/doomed")));
    // Creating it again is refused while it is being killed.
    let again = c.try_apply(Command::CreateJob { spec: JobShape::service(1).spec("www/prod/doomed"), seed: 1 });
    assert_eq!(again.unwrap_err(), Rejection::JobExists(key("www/prod/doomed")));

    c.exit(tasks[1], TaskExit::Killed { by: "user request".into() });
    assert!(!c.state.jobs.contains_key(&key("www/prod/doomed")), "the job is gone");
    assert!(c.state.tasks.is_empty(), "and its tasks with it");
    let agent = &c.state.agents[&AGENT];
    assert!(agent.tasks.is_empty() && agent.used_ports.is_empty());
    assert_eq!(agent.used, Default::default());
    assert_eq!(c.state.counters.illegal_transitions, 0);
}

#[test]
fn a_killed_service_task_is_restarted_once_it_ended() {
    let mut c = Cluster::new();
    let old = c.create("www/prod/hello", JobShape::service(2))[0];
    c.run(old);
    c.apply(Command::KillTask { task: old, by: "restart".into() });
    assert_eq!(c.task(old).state, TaskState::Killing);
    assert_eq!(c.current("www/prod/hello", 0), old, "no replacement while the old one still runs");

    c.exit(old, TaskExit::Killed { by: "restart".into() });
    let killed_at = c.now_ms;
    assert_eq!(c.task(old).state, TaskState::Killed);
    let new = c.current("www/prod/hello", 0);
    assert_ne!(new, old);
    let t = c.task(new);
    assert_eq!((t.instance, t.state, t.failures), (0, TaskState::Pending, 0));
    assert_eq!(t.not_before, Timestamp(killed_at), "a restart on request does not back off");

    // Killing a task that never got a place restarts it at once.
    let unplaced = c.current("www/prod/hello", 1);
    c.apply(Command::KillTask { task: unplaced, by: "restart".into() });
    assert_eq!(c.task(unplaced).state, TaskState::Killed);
    let fresh = c.current("www/prod/hello", 1);
    assert_ne!(fresh, unplaced);
    assert_eq!(c.task(fresh).state, TaskState::Pending);
}

#[test]
fn a_killed_batch_task_ends_its_instance() {
    let mut c = Cluster::new();
    let task = c.create("etl/prod/once", JobShape::batch(1, 3))[0];
    c.run(task);
    c.apply(Command::KillTask { task, by: "user request".into() });
    c.exit(task, TaskExit::Killed { by: "user request".into() });
    let job = &c.state.jobs[&key("etl/prod/once")];
    assert_eq!(job.current[&0], task, "not restarted");
    assert_eq!(job.done, BTreeMap::from([(0, false)]));
    assert!(job.finished_at.is_some());
}

#[test]
fn duplicate_updates_are_counted_and_not_applied_twice() {
    let mut c = Cluster::new();
    let task = c.create("www/prod/hello", JobShape::service(1))[0];
    c.run(task);
    let seq = c.seq[&AGENT];
    let before = c.state.clone();

    // The last update again (an at-least-once redelivery), then an older one carrying an exit.
    let again = StatusUpdate { seq, task, report: Report::Running { pid: 4242 }, at: Timestamp(c.now_ms) };
    let stale = StatusUpdate {
        seq: seq - 1,
        task,
        report: Report::Exited { exit: TaskExit::Exited { code: 1 } },
        at: Timestamp(c.now_ms),
    };
    c.apply(Command::AgentUpdates { agent: AGENT, updates: vec![again, stale] });

    assert_eq!(c.state.counters.duplicate_updates, 2);
    assert_eq!(c.task(task), before.tasks.get(&task).unwrap(), "the task did not change");
    assert_eq!(c.task(task).state, TaskState::Running);
    assert_eq!(c.state.agents[&AGENT].last_update_seq, seq);
    assert_eq!(c.state.tasks.len(), 1, "no replacement was created");
}

#[test]
fn updates_for_unknown_tasks_are_counted() {
    let mut c = Cluster::new();
    let task = c.create("www/prod/hello", JobShape::service(1))[0];
    c.report(TaskId(0xdead), Report::Running { pid: 1 });
    assert_eq!(c.state.counters.updates_for_unknown_tasks, 1);
    // A task that exists but is not on this agent (it has no place yet) is unknown to the agent.
    c.report(task, Report::Starting);
    assert_eq!(c.state.counters.updates_for_unknown_tasks, 2);
    assert_eq!(c.task(task).state, TaskState::Pending);
    // And updates from an agent that never registered are refused as a whole.
    let update = StatusUpdate { seq: 1, task, report: Report::Starting, at: Timestamp(c.now_ms) };
    let err = c.try_apply(Command::AgentUpdates { agent: AgentId(9), updates: vec![update] }).unwrap_err();
    assert_eq!(err, Rejection::NoSuchAgent(AgentId(9)));
}

#[test]
fn illegal_transitions_are_counted_and_change_nothing() {
    let mut c = Cluster::new();
    let task = c.create("etl/prod/once", JobShape::batch(1, 0))[0];
    c.run(task);
    c.exit(task, TaskExit::Exited { code: 0 });
    assert_eq!(c.task(task).state, TaskState::Finished);
    let before = c.task(task).clone();

    c.report(task, Report::Running { pid: 7 });
    c.report(task, Report::Exited { exit: TaskExit::Exited { code: 1 } });
    assert_eq!(c.state.counters.illegal_transitions, 2);
    assert_eq!(c.task(task), &before);
    let job = &c.state.jobs[&key("etl/prod/once")];
    assert_eq!(job.done, BTreeMap::from([(0, true)]), "a late failure report does not undo success");
}

#[test]
fn refused_commands_say_why() {
    let mut c = Cluster::new();
    let err = c.try_apply(Command::KillTask { task: TaskId(1), by: "x".into() }).unwrap_err();
    assert_eq!(err, Rejection::NoSuchTask(TaskId(1)));
    let err = c.try_apply(Command::KillJob { job: key("a/b/c"), by: "x".into() }).unwrap_err();
    assert_eq!(err.to_string(), "no job a/b/c");
    let mut nameless = agent_info(2, 1000, MIB, MIB, vec![]);
    nameless.hostname.clear();
    let err = c.try_apply(Command::RegisterAgent { info: nameless }).unwrap_err();
    assert!(matches!(err, Rejection::Invalid(_)), "{err}");
}

// ---- agents that stop answering

const OTHER: AgentId = AgentId(2);

impl Cluster {
    fn with_second_agent() -> Cluster {
        let mut c = Cluster::new();
        c.register(OTHER, 4000, 4096 * MIB, 4096 * MIB, 32000);
        c
    }

    fn service_with(
        &mut self,
        key: &str,
        instances: u32,
        replace_after: capstan_model::spec::ReplaceAfter,
    ) -> Vec<TaskId> {
        let mut spec = JobShape::service(instances).spec(key);
        spec.replace_after = Some(replace_after);
        self.apply(Command::CreateJob { spec, seed: 7 }).created
    }

    fn place_on_other(&mut self, task: TaskId) {
        self.place_on(task, OTHER);
    }

    fn report_from_other(&mut self, task: TaskId, report: Report) {
        self.report_from(OTHER, task, report);
    }

    fn reconcile(&mut self, agent: AgentId, running: &[TaskId]) -> Applied {
        let as_of_seq = Some(*self.seq.get(&agent).unwrap_or(&0));
        self.apply(Command::AgentReconcile { agent, known: running.to_vec(), running: running.to_vec(), as_of_seq })
    }
}

fn after(ms: u64) -> capstan_model::spec::ReplaceAfter {
    capstan_model::spec::ReplaceAfter::After(capstan_model::spec::DurationMs(ms))
}

#[test]
fn an_unreachable_agent_keeps_its_tasks_and_gets_them_back_when_it_answers() {
    let mut c = Cluster::with_second_agent();
    let tasks = c.service_with("www/prod/web", 2, after(60_000));
    for t in &tasks {
        c.run(*t);
    }
    c.apply(Command::AgentsUnreachable { agents: vec![AGENT] });
    for t in &tasks {
        assert_eq!(c.task(*t).state, TaskState::Unreachable);
        assert!(c.task(*t).reason().contains("stopped answering"), "{}", c.task(*t).reason());
    }
    assert!(c.state.pending.is_empty(), "nothing is replaced just because an agent is unreachable");
    assert_eq!(c.state.agents[&AGENT].used.cpus_milli, 500, "its tasks keep their resources");
    // Back before replace_after: the same tasks run on, nothing new was created.
    let applied = c.reconcile(AGENT, &tasks);
    assert!(applied.agent_back);
    for t in &tasks {
        assert_eq!(c.task(*t).state, TaskState::Running);
    }
    assert_eq!(c.state.tasks.len(), 2);
    assert_eq!(c.state.counters.tasks_replaced_unreachable, 0);
}

#[test]
fn nothing_is_placed_on_an_unreachable_agent() {
    let mut c = Cluster::new();
    let tasks = c.create("www/prod/web", JobShape::service(1));
    c.apply(Command::AgentsUnreachable { agents: vec![AGENT] });
    let applied =
        c.apply(Command::Place { placements: vec![Placement { task: tasks[0], agent: AGENT, ports: vec![31000] }] });
    assert_eq!(applied.placements_refused, 1);
    assert_eq!(c.task(tasks[0]).state, TaskState::Pending);
}

#[test]
fn a_removal_replaces_only_tasks_whose_replace_after_passed_and_never_singletons() {
    let mut c = Cluster::with_second_agent();
    let fast = c.service_with("www/prod/fast", 1, after(10_000));
    let slow = c.service_with("www/prod/slow", 1, after(600_000));
    let single = c.service_with("www/prod/single", 1, capstan_model::spec::ReplaceAfter::Never);
    for t in fast.iter().chain(&slow).chain(&single) {
        c.run(*t);
    }
    c.apply(Command::AgentsUnreachable { agents: vec![AGENT] });
    let due: Vec<TaskId> = c.state.due_for_replacement(AGENT, Timestamp(c.now_ms)).collect();
    assert!(due.is_empty(), "nothing is due at once");
    c.wait(10_000);
    let due: Vec<TaskId> = c.state.due_for_replacement(AGENT, Timestamp(c.now_ms + 1)).collect();
    assert_eq!(due, fast);
    let applied = c.apply(Command::RemoveAgent { agent: AGENT });
    assert_eq!(applied.replaced, fast);
    assert_eq!(c.task(fast[0]).state, TaskState::Lost);
    assert!(c.task(fast[0]).reason().contains("replace_after"), "{}", c.task(fast[0]).reason());
    let replacement = c.current("www/prod/fast", 0);
    assert_ne!(replacement, fast[0]);
    assert_eq!(c.task(replacement).state, TaskState::Pending);
    assert_eq!(c.task(slow[0]).state, TaskState::Unreachable);
    assert_eq!(c.task(single[0]).state, TaskState::Unreachable);
    assert!(
        matches!(c.state.agents[&AGENT].liveness, capstan_state::Liveness::Unreachable { .. }),
        "the slow job's task may still be replaced: the agent is not removed yet"
    );
    c.wait(600_000);
    let applied = c.apply(Command::RemoveAgent { agent: AGENT });
    assert_eq!(applied.replaced, slow);
    assert_eq!(c.task(single[0]).state, TaskState::Unreachable, "never means never");
    assert!(matches!(c.state.agents[&AGENT].liveness, capstan_state::Liveness::Removed { .. }));
    assert_eq!(c.state.counters.agent_removals, 2);
    assert_eq!(c.state.counters.tasks_replaced_unreachable, 2);
}

#[test]
fn a_returning_copy_is_surplus_when_its_replacement_runs() {
    let mut c = Cluster::with_second_agent();
    let old = c.service_with("www/prod/web", 1, after(1_000))[0];
    c.run(old);
    c.apply(Command::AgentsUnreachable { agents: vec![AGENT] });
    c.wait(1_000);
    c.apply(Command::RemoveAgent { agent: AGENT });
    let replacement = c.current("www/prod/web", 0);
    c.place_on_other(replacement);
    c.report_from_other(replacement, Report::Running { pid: 7 });
    // The agent comes back, its copy still running.
    let applied = c.reconcile(AGENT, &[old]);
    assert!(applied.agent_back);
    assert_eq!(applied.strays_found.len(), 1);
    let stray = &c.state.agents[&AGENT].strays[&old];
    assert!(stray.stop_now, "the master knows this copy: no grace period");
    assert!(stray.reason.contains("surplus copy"), "{}", stray.reason);
    assert_eq!(c.current("www/prod/web", 0), replacement, "the running replacement stays");
    assert_eq!(c.task(replacement).state, TaskState::Running);
    // Its end clears it.
    c.report(old, Report::Exited { exit: TaskExit::Killed { by: "stop order".into() } });
    assert!(c.state.agents[&AGENT].strays.is_empty());
}

#[test]
fn a_returning_copy_is_taken_back_when_its_replacement_has_not_started() {
    let mut c = Cluster::with_second_agent();
    let old = c.service_with("www/prod/web", 1, after(1_000))[0];
    c.run(old);
    c.apply(Command::AgentsUnreachable { agents: vec![AGENT] });
    c.wait(1_000);
    c.apply(Command::RemoveAgent { agent: AGENT });
    let replacement = c.current("www/prod/web", 0);
    c.place_on_other(replacement);
    assert_eq!(c.task(replacement).state, TaskState::Assigned);
    let applied = c.reconcile(AGENT, &[old]);
    assert_eq!(applied.taken_back, vec![old]);
    assert!(applied.strays_found.is_empty());
    assert_eq!(c.task(old).state, TaskState::Running);
    assert_eq!(c.current("www/prod/web", 0), old);
    assert_eq!(c.task(replacement).state, TaskState::Killing, "the replacement stops");
    assert!(c.state.agents[&AGENT].tasks.contains(&old), "the copy holds its resources again");
    // The stopped replacement does not start yet another task.
    c.report_from_other(replacement, Report::Exited { exit: TaskExit::Killed { by: "stop".into() } });
    assert_eq!(c.task(replacement).state, TaskState::Killed);
    assert_eq!(c.current("www/prod/web", 0), old);
    assert!(c.state.pending.is_empty());
    assert_eq!(c.state.counters.tasks_taken_back, 1);
}

#[test]
fn an_unknown_running_task_is_a_stray_that_waits_for_the_grace_period() {
    let mut c = Cluster::new();
    let unknown = TaskId(0xabcdef);
    let applied = c.reconcile(AGENT, &[unknown]);
    assert_eq!(applied.strays_found.len(), 1);
    let stray = &c.state.agents[&AGENT].strays[&unknown];
    assert!(!stray.stop_now, "unknown is not the same as dead");
    assert!(c.state.reconcile_needed(AGENT, &[], &[], 0), "a stray that stopped is to be forgotten");
    assert!(!c.state.reconcile_needed(AGENT, &[unknown], &[unknown], 0), "nothing new");
    c.reconcile(AGENT, &[]);
    assert!(c.state.agents[&AGENT].strays.is_empty());
}

#[test]
fn a_stale_list_loses_nothing() {
    let mut c = Cluster::new();
    let t = c.create("www/prod/web", JobShape::service(1))[0];
    c.run(t);
    // A list taken before the agent's last two updates does not say the task is gone.
    let seq = c.seq[&AGENT];
    c.apply(Command::AgentReconcile { agent: AGENT, known: vec![], running: vec![], as_of_seq: Some(seq - 2) });
    assert_eq!(c.task(t).state, TaskState::Running);
    assert!(!c.state.reconcile_needed(AGENT, &[], &[], seq - 1));
    // A current one does.
    assert!(c.state.reconcile_needed(AGENT, &[], &[], seq));
    c.apply(Command::AgentReconcile { agent: AGENT, known: vec![], running: vec![], as_of_seq: Some(seq) });
    assert_eq!(c.task(t).state, TaskState::Lost);
}

#[test]
fn a_frozen_cluster_refuses_every_destructive_command() {
    let mut c = Cluster::with_second_agent();
    let t = c.service_with("www/prod/web", 1, after(1_000))[0];
    c.run(t);
    let freeze = capstan_state::Freeze { reason: "incident 42".into(), by: "ops@host".into(), at: Timestamp(0) };
    c.apply(Command::SetFreeze { freeze: Some(freeze) });
    assert_eq!(c.state.frozen.as_ref().unwrap().at, Timestamp(c.now_ms), "stamped when applied");
    let refused = c.try_apply(Command::KillTask { task: t, by: "user".into() }).unwrap_err();
    assert!(matches!(refused, Rejection::Frozen(ref r) if r == "incident 42"), "{refused}");
    assert!(c.try_apply(Command::KillJob { job: key("www/prod/web"), by: "user".into() }).is_err());
    c.apply(Command::AgentsUnreachable { agents: vec![AGENT] });
    assert_eq!(c.task(t).state, TaskState::Unreachable, "marking unreachable is not destructive");
    c.wait(5_000);
    assert!(matches!(c.try_apply(Command::RemoveAgent { agent: AGENT }), Err(Rejection::Frozen(_))));
    assert_eq!(c.task(t).state, TaskState::Unreachable);
    c.apply(Command::SetFreeze { freeze: None });
    c.apply(Command::RemoveAgent { agent: AGENT });
    assert_eq!(c.task(t).state, TaskState::Lost);
}

#[test]
fn a_killed_job_waits_for_the_task_of_an_instance_an_update_removed() {
    let mut c = Cluster::new();
    let spec = JobShape::service(3).spec("www/prod/web");
    let tasks = c.apply(Command::CreateJob { spec: spec.clone(), seed: 5 }).created;
    c.run(tasks[2]);
    // Down to one instance: instance 2's task is stopping.
    let mut smaller = spec;
    smaller.instances = 1;
    c.apply(Command::StartUpdate { spec: smaller, by: "test".into(), seed: 9 });
    assert_eq!(c.task(tasks[2]).state, TaskState::Killing);
    c.apply(Command::KillJob { job: key("www/prod/web"), by: "test".into() });
    assert!(c.state.jobs.contains_key(&key("www/prod/web")), "the job stays while a task of it still runs");
    assert!(c.state.agents[&AGENT].tasks.contains(&tasks[2]), "the stopping task keeps its resources");
    c.exit(tasks[2], TaskExit::Killed { by: "stop".into() });
    assert!(!c.state.jobs.contains_key(&key("www/prod/web")), "gone once its last task ended");
    assert!(c.state.agents[&AGENT].used_ports.is_empty());
}
