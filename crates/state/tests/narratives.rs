//! Stories of a task's life, told through commands, each checking what a person would look at:
//! task states and reasons, replacements, finished jobs, counters.

mod common;

use capstan_model::{AgentId, JobKey, PortRange, TaskExit, TaskId, TaskState, Timestamp};
use capstan_state::{
    decode_command, decode_snapshot, encode_command, encode_snapshot, Applied, ClusterState, Command, Placement,
    Rejection, Report, StatusUpdate, Task,
};
use common::{agent_info, stamped, JobShape, MIB};
use std::collections::BTreeMap;

const AGENT: AgentId = AgentId(1);

/// A cluster with a clock and an agent that numbers its updates, as a real agent does.
struct Cluster {
    state: ClusterState,
    now_ms: u64,
    seq: BTreeMap<AgentId, u64>,
}

impl Cluster {
    /// One agent with 4 cpus, 4 GiB, 4 GiB of disk and ports 31000-31009.
    fn new() -> Cluster {
        let mut c = Cluster { state: ClusterState::default(), now_ms: 1_000_000, seq: BTreeMap::new() };
        let ports = vec![PortRange { first: 31000, last: 31009 }];
        c.apply(Command::RegisterAgent { info: agent_info(AGENT.0, 4000, 4096 * MIB, 4096 * MIB, ports) });
        c
    }

    /// Applies at the current time, one millisecond later than the last command; it must be accepted.
    fn apply(&mut self, command: Command) -> Applied {
        self.try_apply(command).unwrap_or_else(|e| panic!("refused: {e}"))
    }

    fn try_apply(&mut self, command: Command) -> Result<Applied, Rejection> {
        self.now_ms += 1;
        let c = stamped(self.now_ms, command);
        assert_eq!(decode_command(&encode_command(&c)).unwrap(), c);
        let result = self.state.apply(&c);
        // A snapshot taken now reads back as this state (derived fields rebuilt).
        let back = decode_snapshot(&encode_snapshot(&self.state)).unwrap();
        assert_eq!(encode_snapshot(&back), encode_snapshot(&self.state));
        assert_eq!(back.pending, self.state.pending);
        result
    }

    fn wait(&mut self, ms: u64) {
        self.now_ms += ms;
    }

    fn create(&mut self, key: &str, shape: JobShape) -> Vec<TaskId> {
        self.apply(Command::CreateJob { spec: shape.spec(key), seed: 42 }).created
    }

    /// Places a pending task on the agent with the lowest free ports; the placement must take.
    fn place(&mut self, task: TaskId) {
        let n = self.state.jobs[&self.task(task).job].spec.task.ports.len();
        let used = &self.state.agents[&AGENT].used_ports;
        let ports: Vec<u16> = (31000..=31009).filter(|p| !used.contains(p)).take(n).collect();
        let applied = self.apply(Command::Place { placements: vec![Placement { task, agent: AGENT, ports }] });
        assert_eq!(applied.placements_refused, 0, "placing {task}");
        assert_eq!(self.task(task).state, TaskState::Assigned);
    }

    /// The agent reports on a task, with its next sequence number.
    fn report(&mut self, task: TaskId, report: Report) -> Applied {
        let seq = self.seq.entry(AGENT).or_insert(0);
        *seq += 1;
        let update = StatusUpdate { seq: *seq, task, report, at: Timestamp(self.now_ms) };
        self.apply(Command::AgentUpdates { agent: AGENT, updates: vec![update] })
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

    fn current(&self, job: &str, instance: u32) -> TaskId {
        self.state.jobs[&key(job)].current[&instance]
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
