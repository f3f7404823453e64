//! Rolling updates told through commands: a simulated agent runs what is placed, stops what is
//! killed and reports health per version; the updater's part (send an `UpdateStep` when
//! `step_needed`) runs every 100 ms of simulated time. Every step is encoded, decoded and
//! snapshotted on the way, as in narratives.rs.

mod common;

use capstan_model::spec::{HealthCheckSpec, HealthCheckType, UpdateSpec};
use capstan_model::{AgentId, DurationMs, JobKey, JobSpec, TaskExit, TaskState, Timestamp};
use capstan_state::updates::{step_needed, UpdateAction, UpdateState};
use capstan_state::{decode_command, encode_command, Command, Freeze, Placement, Rejection, Report, StatusUpdate};
use common::{stamped, JobShape, TestCluster, MIB};
use std::collections::BTreeMap;

const AGENT: AgentId = AgentId(1);
const JOB: &str = "www/prod/hello";
const TICK_MS: u64 = 100;

struct Sim {
    c: TestCluster,
    /// Whether tasks of a version pass their health check.
    healthy: BTreeMap<u32, bool>,
    /// The most instances seen down at once (not running, or not healthy).
    max_down: usize,
    /// The agent reports a failed health check and the task's end in the same tick (the updater
    /// never sees the unhealthy task, only its replacement).
    fail_at_once: bool,
}

impl std::ops::Deref for Sim {
    type Target = TestCluster;
    fn deref(&self) -> &TestCluster {
        &self.c
    }
}

impl std::ops::DerefMut for Sim {
    fn deref_mut(&mut self) -> &mut TestCluster {
        &mut self.c
    }
}

impl Sim {
    fn new() -> Sim {
        let mut s = Sim { c: TestCluster::empty(), healthy: BTreeMap::new(), max_down: 0, fail_at_once: false };
        s.register(AGENT, 16_000, 16_384 * MIB, 16_384 * MIB, 31000);
        s
    }

    fn report(&mut self, task: capstan_model::TaskId, report: Report) {
        self.report_from(AGENT, task, report);
    }

    fn job(&self) -> &capstan_state::Job {
        &self.state.jobs[&key()]
    }

    /// One tick: the agent does what it was told, then the updater steps when a step is due.
    fn tick(&mut self) {
        self.now_ms += TICK_MS;
        let tasks: Vec<_> = self.state.tasks.values().cloned().collect();
        for t in tasks {
            match t.state {
                TaskState::Pending if t.not_before.0 <= self.now_ms && t.desired == capstan_model::Desired::Run => {
                    let p = Placement { task: t.id, agent: AGENT, ports: vec![] };
                    self.apply(Command::Place { placements: vec![p] });
                }
                TaskState::Assigned => {
                    self.report(t.id, Report::Starting);
                    self.report(t.id, Report::Running { pid: 100 });
                }
                TaskState::Running if t.healthy.is_none() => {
                    let healthy = *self.healthy.get(&t.job_version).unwrap_or(&true);
                    self.report(t.id, Report::Health { healthy, reason: String::new() });
                    if !healthy && self.fail_at_once {
                        let exit = TaskExit::HealthCheckFailed { reason: "check failed".into() };
                        self.report(t.id, Report::Exited { exit });
                    }
                }
                TaskState::Running if t.healthy == Some(false) => {
                    // The agent kills a task whose check failed.
                    let exit = TaskExit::HealthCheckFailed { reason: "check failed".into() };
                    self.report(t.id, Report::Exited { exit });
                }
                TaskState::Killing => {
                    let by = t.kill_reason.clone().unwrap_or_default();
                    self.report(t.id, Report::Exited { exit: TaskExit::Killed { by } });
                }
                _ => {}
            }
        }
        if let Some(job) = self.c.state.jobs.get(&key()) {
            let down = (0..job.spec.instances)
                .filter(|i| {
                    let t = job.current.get(i).and_then(|id| self.c.state.tasks.get(id));
                    !t.is_some_and(|t| t.state == TaskState::Running && t.healthy == Some(true))
                })
                .count();
            self.max_down = self.max_down.max(down);
            if step_needed(&self.c.state, job, Timestamp(self.c.now_ms + 1)) {
                self.apply(Command::UpdateStep { job: key() });
            }
        }
    }

    /// Ticks until `done`, at most `limit_ms` of simulated time.
    fn until(&mut self, limit_ms: u64, what: &str, done: impl Fn(&Sim) -> bool) {
        let end = self.now_ms + limit_ms;
        while !done(self) {
            assert!(self.now_ms < end, "not {what} after {limit_ms} ms: {:#?}", self.job().updates);
            self.tick();
        }
    }

    fn all_up(&self, version: u32) -> bool {
        let job = self.job();
        (0..job.spec.instances).all(|i| {
            let t = &self.state.tasks[&job.current[&i]];
            t.job_version == version && t.state == TaskState::Running && t.healthy == Some(true)
        })
    }

    /// Task ids of the current instances.
    fn current(&self) -> Vec<capstan_model::TaskId> {
        self.job().current.values().copied().collect()
    }

    fn update_state(&self) -> Option<UpdateState> {
        self.job().updates.active.as_ref().map(|u| u.state)
    }

    fn last_ended(&self) -> &capstan_state::Update {
        self.job().updates.history.last().expect("an ended update")
    }
}

fn key() -> JobKey {
    JOB.parse().unwrap()
}

/// 6 instances with a command health check; `[update]` batch_size 2, watch 1 s.
fn spec(command: &str) -> JobSpec {
    let mut s = JobShape { ports: 0, ..JobShape::service(6) }.spec(JOB);
    s.task.command = command.into();
    s.health_check = Some(HealthCheckSpec {
        check_type: HealthCheckType::Command,
        port: None,
        path: None,
        command: Some("test -f ready".into()),
        interval: DurationMs(1000),
        timeout: DurationMs(1000),
        grace_period: DurationMs(0),
        consecutive_failures: 1,
    });
    s.update = Some(UpdateSpec {
        batch_size: 2,
        watch: DurationMs(1000),
        max_per_instance_failures: 0,
        max_total_failures: 0,
        rollback_on_failure: true,
        canaries: 0,
        auto_promote: false,
    });
    s
}

fn started() -> Sim {
    let mut s = Sim::new();
    s.apply(Command::CreateJob { spec: spec("v1"), seed: 7 });
    s.until(5_000, "running", |s| s.all_up(1));
    s.max_down = 0;
    s
}

fn start_update(s: &mut Sim, spec: JobSpec) {
    s.apply(Command::StartUpdate { spec, by: "ops@host".into(), seed: 9 });
}

#[test]
fn an_update_rolls_in_batches_of_two() {
    let mut s = started();
    let before = s.current();
    start_update(&mut s, spec("v2"));
    assert_eq!(s.job().version, 2);
    assert_eq!(s.update_state(), Some(UpdateState::Rolling));
    s.until(30_000, "updated", |s| s.update_state().is_none());
    let u = s.last_ended();
    assert_eq!(u.state, UpdateState::Succeeded, "{u:#?}");
    assert_eq!((u.from_version, u.to_version, u.batches, u.by.as_str()), (1, 2, 3, "ops@host"));
    assert_eq!(u.done.len(), 6);
    assert!(s.all_up(2));
    assert!(s.max_down <= 2, "at most a batch down at once, saw {}", s.max_down);
    assert!(s.max_down >= 1);
    assert!(s.current().iter().all(|t| !before.contains(t)), "every instance has a new task");
    let old = &s.state.tasks[&before[0]];
    assert_eq!(old.state, TaskState::Killed);
    assert!(old.reason().contains("updating to version 2"), "{}", old.reason());
    assert!(s.job().updates.specs.is_empty(), "the old spec is forgotten once nothing runs it");
}

#[test]
fn a_version_that_fails_its_health_check_rolls_back_after_the_first_batch() {
    let mut s = started();
    s.healthy.insert(2, false);
    start_update(&mut s, spec("v2"));
    s.until(30_000, "rolled back", |s| s.update_state().is_none());
    let u = s.last_ended();
    assert_eq!(u.state, UpdateState::RolledBack, "{u:#?}");
    assert!(!u.failed.is_empty() && u.failed.iter().all(|i| *i < 2), "the first batch's failure stops it: {u:#?}");
    assert_eq!((u.batches, u.done.len()), (1, 2), "the first batch went back in one batch: {u:#?}");
    assert_eq!(s.job().version, 1);
    s.until(5_000, "all up", |s| s.all_up(1));
    assert!(s.max_down <= 2, "saw {} down", s.max_down);
    // No instance outside the first batch was touched.
    let touched: Vec<u32> = s.state.tasks.values().filter(|t| t.job_version == 2).map(|t| t.instance).collect();
    assert!(touched.iter().all(|i| *i < 2), "{touched:?}");
}

#[test]
fn a_failure_between_two_steps_still_counts() {
    let mut s = started();
    s.healthy.insert(2, false);
    s.fail_at_once = true;
    start_update(&mut s, spec("v2"));
    s.until(30_000, "rolled back", |s| s.update_state().is_none());
    assert_eq!(s.last_ended().state, UpdateState::RolledBack, "{:#?}", s.last_ended());
    s.until(5_000, "all up", |s| s.all_up(1));
}

#[test]
fn without_rollback_a_failed_update_stops_where_it_is() {
    let mut s = started();
    s.healthy.insert(2, false);
    let mut v2 = spec("v2");
    v2.update.as_mut().unwrap().rollback_on_failure = false;
    start_update(&mut s, v2);
    s.until(30_000, "failed", |s| s.update_state().is_none());
    assert_eq!(s.last_ended().state, UpdateState::Failed);
    assert_eq!(s.job().version, 2);
}

#[test]
fn canaries_wait_for_promote_and_abort_leaves_the_others_alone() {
    let mut s = started();
    let before = s.current();
    let mut v2 = spec("v2");
    v2.update.as_mut().unwrap().canaries = 1;
    start_update(&mut s, v2.clone());
    s.until(10_000, "awaiting promote", |s| s.update_state() == Some(UpdateState::AwaitingPromote));
    for _ in 0..30 {
        s.tick();
    }
    assert_eq!(s.update_state(), Some(UpdateState::AwaitingPromote), "it waits");
    let now = s.current();
    assert_eq!(now[1..], before[1..], "only the canary was replaced");
    assert_ne!(now[0], before[0]);
    s.apply(Command::UpdateControl { job: key(), action: UpdateAction::Abort, by: "ops@host".into() });
    assert_eq!(s.last_ended().state, UpdateState::Aborted);
    for _ in 0..30 {
        s.tick();
    }
    assert_eq!(s.current()[1..], before[1..], "abort replaced nothing more");

    // Promote on another update goes on with batches of 2.
    let mut s = started();
    start_update(&mut s, v2);
    s.until(10_000, "awaiting promote", |s| s.update_state() == Some(UpdateState::AwaitingPromote));
    let err = s.try_apply(Command::UpdateControl { job: key(), action: UpdateAction::Resume, by: "x".into() });
    assert!(matches!(err, Err(Rejection::Conflict(_))), "{err:?}");
    s.apply(Command::UpdateControl { job: key(), action: UpdateAction::Promote, by: "ops@host".into() });
    s.until(30_000, "updated", |s| s.update_state().is_none());
    let u = s.last_ended();
    assert_eq!((u.state, u.batches), (UpdateState::Succeeded, 4), "1 canary + 5 in batches of 2: {u:#?}");
}

#[test]
fn a_change_of_instances_alone_restarts_nothing() {
    let mut s = started();
    let before = s.current();
    let mut more = spec("v1");
    more.instances = 8;
    start_update(&mut s, more);
    assert_eq!(s.update_state(), None, "nothing to roll");
    assert_eq!(s.last_ended().state, UpdateState::Succeeded);
    assert_eq!(s.last_ended().added, vec![6, 7]);
    assert_eq!(s.current()[..6], before[..], "the six kept their tasks");
    s.until(5_000, "8 up", |s| s.all_up(2));

    let mut fewer = spec("v1");
    fewer.instances = 4;
    start_update(&mut s, fewer);
    assert_eq!(s.last_ended().removed, vec![4, 5, 6, 7]);
    assert_eq!(s.current(), before[..4]);
    s.until(5_000, "4 up", |s| s.all_up(3));
    assert_eq!(s.job().version, 3);
}

#[test]
fn pause_holds_the_next_batch_and_resume_goes_on() {
    let mut s = started();
    start_update(&mut s, spec("v2"));
    s.apply(Command::UpdateControl { job: key(), action: UpdateAction::Pause, by: "ops@host".into() });
    for _ in 0..50 {
        s.tick();
    }
    let u = s.job().updates.active.clone().unwrap();
    assert_eq!((u.batches, u.done.len()), (0, 0), "paused before the first batch: {u:#?}");
    s.apply(Command::UpdateControl { job: key(), action: UpdateAction::Resume, by: "ops@host".into() });
    s.until(30_000, "updated", |s| s.update_state().is_none());
    assert_eq!(s.last_ended().state, UpdateState::Succeeded);
}

#[test]
fn an_update_kills_nothing_while_the_cluster_is_frozen() {
    let mut s = started();
    let before = s.current();
    let freeze = Freeze { reason: "maintenance".into(), by: "ops".into(), at: Timestamp(0) };
    s.apply(Command::SetFreeze { freeze: Some(freeze) });
    start_update(&mut s, spec("v2"));
    for _ in 0..30 {
        s.tick();
    }
    assert_eq!(s.current(), before);
    assert!(s.job().updates.active.as_ref().unwrap().message.contains("frozen"));
    s.apply(Command::SetFreeze { freeze: None });
    s.until(30_000, "updated", |s| s.update_state().is_none());
    assert_eq!(s.last_ended().state, UpdateState::Succeeded);
}

#[test]
fn an_operator_rollback_puts_the_old_version_back() {
    let mut s = started();
    start_update(&mut s, spec("v2"));
    s.until(10_000, "first batch done", |s| s.job().updates.active.as_ref().is_some_and(|u| u.done.len() == 2));
    s.apply(Command::UpdateControl { job: key(), action: UpdateAction::Rollback, by: "ops@host".into() });
    assert_eq!(s.update_state(), Some(UpdateState::RollingBack));
    s.until(30_000, "rolled back", |s| s.update_state().is_none());
    assert_eq!(s.last_ended().state, UpdateState::RolledBack);
    s.until(5_000, "all up", |s| s.all_up(1));
    assert!(s.max_down <= 2);
    // A second update gets a version above every earlier one.
    start_update(&mut s, spec("v3"));
    assert_eq!(s.job().version, 3);
    let err = s.try_apply(Command::StartUpdate { spec: spec("v4"), by: "x".into(), seed: 1 });
    assert!(matches!(err, Err(Rejection::Conflict(_))), "one update at a time: {err:?}");
}

/// Health reports are logged too: they must read back (a postcard struct is read with exactly as
/// many fields as it names, and `Health` has two after its kind).
#[test]
fn every_kind_of_report_reads_back_from_the_log() {
    let u = |report| Command::AgentUpdates {
        agent: AGENT,
        updates: vec![StatusUpdate { seq: 1, task: capstan_model::TaskId(1), report, at: Timestamp(1) }],
    };
    for r in [
        Report::Starting,
        Report::Running { pid: 1 },
        Report::Health { healthy: false, reason: "check failed".into() },
        Report::Exited { exit: TaskExit::Killed { by: "x".into() } },
    ] {
        let c = stamped(1, u(r));
        assert_eq!(decode_command(&encode_command(&c)).unwrap(), c);
    }
}
