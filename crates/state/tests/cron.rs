//! Cron jobs in the state: runs, the two collision policies, freeze, fire times already handled,
//! the bounded history, and replay (every state reached here survives encode → decode).

mod common;

use capstan_model::spec::CronCollisionPolicy;
use capstan_model::{AgentId, JobKey, JobSpec, JobType, TaskExit, TaskId, TaskState, Timestamp};
use capstan_state::cron::CRON_RUNS_KEPT;
use capstan_state::{Applied, Command, CronRun, CronRunResult, Freeze, Rejection, Report};
use common::{JobShape, TestCluster, MIB};

const AGENT: AgentId = AgentId(1);
const JOB: &str = "ops/prod/report";

/// The shared test cluster, plus the seed of the next cron run.
struct Cluster {
    c: TestCluster,
    seed: u64,
}

impl std::ops::Deref for Cluster {
    type Target = TestCluster;
    fn deref(&self) -> &TestCluster {
        &self.c
    }
}

impl std::ops::DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut TestCluster {
        &mut self.c
    }
}

impl Cluster {
    fn new() -> Cluster {
        let mut c = Cluster { c: TestCluster::empty(), seed: 7 };
        c.register(AGENT, 4000, 4096 * MIB, 4096 * MIB, 31000);
        c
    }

    fn create(&mut self, instances: u32, policy: Option<CronCollisionPolicy>, max_failures: u32) {
        let applied = self.apply(Command::CreateJob { spec: cron_spec(instances, policy, max_failures), seed: 1 });
        assert!(applied.created.is_empty(), "a cron job has no tasks before its first run");
    }

    /// A fire time `ms` after now (stamped now).
    fn fire(&mut self, scheduled_at: u64, missed: u32) -> Applied {
        self.try_fire(scheduled_at, missed).unwrap_or_else(|e| panic!("refused: {e}"))
    }

    fn try_fire(&mut self, scheduled_at: u64, missed: u32) -> Result<Applied, Rejection> {
        self.seed += 1;
        let seed = self.seed;
        self.try_apply(Command::StartCronRun {
            job: key(),
            scheduled_at: Some(Timestamp(scheduled_at)),
            missed,
            seed,
            by: "schedule".into(),
        })
    }

    fn start_by_hand(&mut self) -> Applied {
        self.seed += 1;
        let seed = self.seed;
        self.apply(Command::StartCronRun {
            job: key(),
            scheduled_at: None,
            missed: 0,
            seed,
            by: "started by alice".into(),
        })
    }

    fn report(&mut self, task: TaskId, report: Report) {
        self.report_from(AGENT, task, report);
    }

    fn run(&mut self, task: TaskId) {
        self.place_on(task, AGENT);
        self.report(task, Report::Starting);
        self.report(task, Report::Running { pid: 4242 });
    }

    fn exit(&mut self, task: TaskId, code: i32) {
        self.report(task, Report::Exited { exit: TaskExit::Exited { code } });
    }

    fn state_of(&self, task: TaskId) -> TaskState {
        self.state.tasks[&task].state
    }

    fn runs(&self) -> &[CronRun] {
        &self.state.jobs[&key()].cron.as_ref().unwrap().runs
    }

    fn last_run(&self) -> &CronRun {
        self.runs().last().unwrap()
    }

    fn live_tasks(&self) -> Vec<TaskId> {
        self.state.tasks.values().filter(|t| !t.state.is_terminal()).map(|t| t.id).collect()
    }
}

fn key() -> JobKey {
    JOB.parse().unwrap()
}

fn cron_spec(instances: u32, policy: Option<CronCollisionPolicy>, max_failures: u32) -> JobSpec {
    let mut spec = JobShape { job_type: JobType::Cron, ..JobShape::batch(instances, max_failures) }.spec(JOB);
    spec.cron = Some("* * * * *".into());
    spec.cron_collision_policy = policy;
    spec
}

#[test]
fn a_run_creates_the_instances_and_succeeds_when_all_exit_0() {
    let mut c = Cluster::new();
    c.create(2, None, 0);
    let applied = c.fire(1_060_000, 0);
    assert_eq!(applied.created.len(), 2);
    let started = applied.cron.unwrap();
    assert_eq!((started.number, started.result), (1, CronRunResult::Running));
    let run = c.last_run().clone();
    assert_eq!(run.tasks, applied.created);
    assert_eq!(run.scheduled_at, Some(Timestamp(1_060_000)));
    for t in applied.created.clone() {
        c.run(t);
    }
    c.exit(applied.created[0], 0);
    assert_eq!(c.last_run().result, CronRunResult::Running, "one instance still runs");
    c.exit(applied.created[1], 0);
    let run = c.last_run();
    assert_eq!(run.result, CronRunResult::Succeeded, "{run:?}");
    assert_eq!(run.ended_at, Some(Timestamp(c.now_ms)));
    assert_eq!(c.state.jobs[&key()].cron.as_ref().unwrap().last_fire, Timestamp(1_060_000));
}

#[test]
fn a_failed_instance_is_retried_then_the_run_fails() {
    let mut c = Cluster::new();
    c.create(1, None, 1);
    let first = c.fire(1_060_000, 0).created[0];
    c.run(first);
    c.exit(first, 3);
    assert_eq!(c.last_run().result, CronRunResult::Running, "retried once");
    let retry = c.state.jobs[&key()].current[&0];
    assert_ne!(retry, first);
    c.now_ms += 10_000; // past the retry's backoff
    c.run(retry);
    c.exit(retry, 3);
    assert_eq!(c.last_run().result, CronRunResult::Failed);
    assert!(c.last_run().reason.contains("instance(s) 0 failed"), "{:?}", c.last_run());
}

#[test]
fn kill_existing_kills_the_live_run_and_starts_the_next_only_after_it_ended() {
    let mut c = Cluster::new();
    c.create(2, None, 0); // KILL_EXISTING by default
    let first = c.fire(1_060_000, 0).created;
    for t in first.clone() {
        c.run(t);
    }
    let applied = c.fire(1_120_000, 0);
    let started = applied.cron.unwrap();
    assert_eq!(started.result, CronRunResult::Waiting);
    assert_eq!(started.killing, Some(1));
    assert!(applied.created.is_empty(), "no overlap: the new run waits");
    for t in &first {
        assert_eq!(c.state_of(*t), TaskState::Killing);
        assert!(c.state.tasks[t].reason().contains("run 2 of the cron job started (KILL_EXISTING)"));
    }
    c.report(first[0], Report::Exited { exit: TaskExit::Killed { by: "stop order".into() } });
    assert_eq!(c.live_tasks(), vec![first[1]], "still waiting for the other instance");
    assert_eq!(c.last_run().result, CronRunResult::Waiting);
    c.report(first[1], Report::Exited { exit: TaskExit::Killed { by: "stop order".into() } });
    let runs = c.runs();
    assert_eq!(runs[0].result, CronRunResult::Killed, "{runs:?}");
    assert!(runs[0].reason.contains("run 2"), "{runs:?}");
    assert_eq!(runs[1].result, CronRunResult::Running, "{runs:?}");
    assert_eq!(runs[1].tasks.len(), 2);
    assert_eq!(c.live_tasks().len(), 2);
    assert!(runs[1].tasks.iter().all(|t| !first.contains(t)));
}

#[test]
fn kill_existing_on_tasks_not_yet_started_starts_the_new_run_at_once() {
    let mut c = Cluster::new();
    c.create(1, None, 0);
    let first = c.fire(1_060_000, 0).created[0];
    assert_eq!(c.state_of(first), TaskState::Pending);
    let applied = c.fire(1_120_000, 0);
    assert_eq!(applied.cron.unwrap().result, CronRunResult::Running);
    assert_eq!(applied.created.len(), 1);
    assert_eq!(c.state_of(first), TaskState::Killed);
    assert_eq!(c.runs()[0].result, CronRunResult::Killed);
}

#[test]
fn cancel_new_skips_the_new_run_and_says_why() {
    let mut c = Cluster::new();
    c.create(1, Some(CronCollisionPolicy::CancelNew), 0);
    let first = c.fire(1_060_000, 0).created[0];
    c.run(first);
    let applied = c.fire(1_120_000, 0);
    let started = applied.cron.unwrap();
    assert_eq!(started.result, CronRunResult::Skipped);
    assert!(started.reason.contains("run 1 is still running"), "{}", started.reason);
    assert!(applied.created.is_empty());
    assert_eq!(c.state_of(first), TaskState::Running, "the running run is left alone");
    assert_eq!(c.last_run().result, CronRunResult::Skipped);
    assert_eq!(c.last_run().ended_at, Some(Timestamp(c.now_ms)));
    // Once the first run ended, the next fire time runs.
    c.exit(first, 0);
    assert_eq!(c.runs()[0].result, CronRunResult::Succeeded);
    let applied = c.fire(1_180_000, 0);
    assert_eq!(applied.cron.unwrap().result, CronRunResult::Running);
    assert_eq!(applied.created.len(), 1);
}

#[test]
fn while_frozen_kill_existing_skips_instead_of_killing() {
    let mut c = Cluster::new();
    c.create(1, None, 0);
    let first = c.fire(1_060_000, 0).created[0];
    c.run(first);
    c.apply(Command::SetFreeze {
        freeze: Some(Freeze { reason: "incident 42".into(), by: "alice".into(), at: Timestamp(0) }),
    });
    let started = c.fire(1_120_000, 0).cron.unwrap();
    assert_eq!(started.result, CronRunResult::Skipped);
    assert!(started.reason.contains("frozen (incident 42)"), "{}", started.reason);
    assert_eq!(c.state_of(first), TaskState::Running, "nothing is killed while frozen");
    // A run with nothing to kill still starts while frozen.
    c.exit(first, 0);
    let applied = c.fire(1_180_000, 0);
    assert_eq!(applied.cron.unwrap().result, CronRunResult::Running);
}

#[test]
fn a_fire_time_is_handled_once_and_missed_ones_are_recorded() {
    let mut c = Cluster::new();
    c.create(1, None, 0);
    // Created at about 1_000_002: a fire time before it is refused, as is one already handled.
    assert!(matches!(c.try_fire(999_000, 0), Err(Rejection::Invalid(_))));
    c.fire(1_300_000, 4);
    assert_eq!(c.last_run().missed, 4);
    assert!(matches!(c.try_fire(1_300_000, 0), Err(Rejection::Invalid(_))));
    assert!(matches!(c.try_fire(1_240_000, 0), Err(Rejection::Invalid(_))));
    assert_eq!(c.runs().len(), 1, "a refused command changed nothing");
    // A run by hand does not move the fire-time mark.
    c.start_by_hand();
    assert_eq!(c.state.jobs[&key()].cron.as_ref().unwrap().last_fire, Timestamp(1_300_000));
    assert_eq!(c.last_run().scheduled_at, None);
    assert_eq!(c.last_run().by, "started by alice");
}

#[test]
fn a_newer_run_supersedes_one_still_waiting() {
    let mut c = Cluster::new();
    c.create(1, None, 0);
    let first = c.fire(1_060_000, 0).created[0];
    c.run(first);
    assert_eq!(c.fire(1_120_000, 0).cron.unwrap().result, CronRunResult::Waiting);
    let third = c.fire(1_180_000, 0).cron.unwrap();
    assert_eq!((third.result, third.superseded), (CronRunResult::Waiting, Some(2)));
    assert_eq!(c.runs()[1].result, CronRunResult::Skipped);
    c.report(first, Report::Exited { exit: TaskExit::Killed { by: "stop order".into() } });
    assert_eq!(c.runs()[2].result, CronRunResult::Running);
    assert_eq!(c.live_tasks().len(), 1, "one run at a time");
}

#[test]
fn start_applies_only_to_cron_jobs() {
    let mut c = Cluster::new();
    c.apply(Command::CreateJob { spec: JobShape::batch(1, 0).spec(JOB), seed: 3 });
    let err = c
        .try_apply(Command::StartCronRun { job: key(), scheduled_at: None, missed: 0, seed: 1, by: "x".into() })
        .unwrap_err();
    assert!(matches!(err, Rejection::Invalid(ref m) if m.contains("only cron jobs")), "{err}");
    let err = c
        .try_apply(Command::StartCronRun {
            job: "a/b/c".parse().unwrap(),
            scheduled_at: None,
            missed: 0,
            seed: 1,
            by: "x".into(),
        })
        .unwrap_err();
    assert!(matches!(err, Rejection::NoSuchJob(_)));
}

#[test]
fn killing_the_job_kills_the_run_and_the_job_goes_away() {
    let mut c = Cluster::new();
    c.create(1, None, 0);
    let first = c.fire(1_060_000, 0).created[0];
    c.run(first);
    c.apply(Command::KillJob { job: key(), by: "job killed by user request".into() });
    assert!(matches!(c.try_fire(1_120_000, 0), Err(Rejection::JobKilled(_))));
    assert_eq!(c.last_run().result, CronRunResult::Running);
    c.report(first, Report::Exited { exit: TaskExit::Killed { by: "stop order".into() } });
    assert!(!c.state.jobs.contains_key(&key()));
    assert!(c.state.tasks.is_empty());
}

#[test]
fn the_history_is_bounded() {
    let mut c = Cluster::new();
    c.create(1, Some(CronCollisionPolicy::CancelNew), 0);
    let first = c.fire(1_060_000, 0).created[0];
    c.run(first);
    for i in 0..(CRON_RUNS_KEPT as u64 + 10) {
        c.fire(1_120_000 + i * 60_000, 0);
    }
    let runs = c.runs();
    assert_eq!(runs.len(), CRON_RUNS_KEPT);
    assert_eq!(runs[0].number, 1, "the active run is kept");
    assert_eq!(runs.last().unwrap().number, CRON_RUNS_KEPT as u32 + 11);
}
