//! Drain and maintenance through commands: which tasks the drain plan stops and which it holds
//! back for the job's `min_healthy`, what `apply` re-checks, freeze, undrain, maintenance
//! windows and placement, and `safe_to_drain`.

mod common;

use capstan_model::{AgentId, JobKey, JobType, TaskExit, TaskId, TaskState, Timestamp};
use capstan_state::drain::{required_healthy, share_of, MAINTENANCE_HORIZON_MS};
use capstan_state::{Command, Freeze, Placement, Rejection, Report};
use common::{JobShape, TestCluster, MIB};

const A: AgentId = AgentId(1);
const B: AgentId = AgentId(2);
const C: AgentId = AgentId(3);

type Cluster = TestCluster;

impl Cluster {
    /// Three agents with 4 cpus, 4 GiB and ports 31000-31009 each.
    fn new() -> Cluster {
        let mut c = Cluster::empty();
        for id in [A, B, C] {
            c.register(id, 4000, 4096 * MIB, 4096 * MIB, 31000);
        }
        c
    }

    fn now(&self) -> Timestamp {
        Timestamp(self.now_ms)
    }

    /// A service job with `min_healthy`, its instances placed on `agents` in order and RUNNING.
    fn service(&mut self, key: &str, min_healthy: Option<f64>, agents: &[AgentId]) -> Vec<TaskId> {
        let mut spec = JobShape::service(agents.len() as u32).spec(key);
        spec.min_healthy = min_healthy;
        let tasks = self.apply(Command::CreateJob { spec, seed: self.now_ms }).created;
        for (t, a) in tasks.iter().zip(agents) {
            self.run_on(*t, *a);
        }
        tasks
    }

    fn run_on(&mut self, task: TaskId, agent: AgentId) {
        self.place_on(task, agent);
        self.report(agent, task, Report::Starting);
        self.report(agent, task, Report::Running { pid: 4242 });
        assert_eq!(self.state.tasks[&task].state, TaskState::Running);
    }

    fn report(&mut self, agent: AgentId, task: TaskId, report: Report) {
        self.report_from(agent, task, report);
    }

    /// The agent reports the task ended (as it does after a stop order).
    fn ended(&mut self, task: TaskId) {
        let agent = self.state.tasks[&task].agent.unwrap();
        self.report(agent, task, Report::Exited { exit: TaskExit::Killed { by: "stop order".into() } });
    }

    fn drain(&mut self, agent: AgentId) {
        self.apply(Command::DrainAgent { agent, by: "ops@test".into() });
    }

    /// One step of the drain loop: plan, then apply the moves; returns the tasks stopped.
    fn drain_step(&mut self) -> Vec<TaskId> {
        let plan = self.state.drain_plan(256);
        if plan.moves.is_empty() {
            return vec![];
        }
        self.apply(Command::DrainMoves { moves: plan.moves }).moved
    }
}

#[test]
fn the_share_to_keep_is_rounded_up_and_defaults_to_one_down_at_a_time() {
    assert_eq!(share_of(0.66, 3), 2);
    assert_eq!(share_of(0.5, 4), 2);
    assert_eq!(share_of(0.51, 4), 3);
    assert_eq!(share_of(1.0, 3), 3);
    assert_eq!(share_of(0.0, 3), 0);
    assert_eq!(share_of(0.1, 1), 1);
    let mut spec = JobShape::service(5).spec("a/b/c");
    assert_eq!(required_healthy(&spec), 4, "no min_healthy: one instance down at a time");
    spec.min_healthy = Some(0.4);
    assert_eq!(required_healthy(&spec), 2);
    spec.instances = 1;
    spec.min_healthy = None;
    assert_eq!(required_healthy(&spec), 0, "a singleton may go down to move");
}

#[test]
fn a_draining_agent_takes_nothing_new() {
    let mut c = Cluster::new();
    c.drain(A);
    assert!(!c.state.agents[&A].schedulable());
    let t = c.apply(Command::CreateJob { spec: JobShape::service(1).spec("www/prod/x"), seed: 1 }).created[0];
    let applied = c.apply(Command::Place { placements: vec![Placement { task: t, agent: A, ports: vec![31000] }] });
    assert_eq!(applied.placements_refused, 1, "the plan applier refuses a draining agent");
    c.apply(Command::UndrainAgent { agent: A, by: "ops@test".into() });
    assert!(c.state.agents[&A].schedulable());
    let applied = c.apply(Command::Place { placements: vec![Placement { task: t, agent: A, ports: vec![31000] }] });
    assert_eq!(applied.placements_refused, 0);
}

/// The case: 2 of 3 instances on the draining agent, min_healthy 0.66 → one at a time.
#[test]
fn two_of_three_instances_move_one_at_a_time() {
    let mut c = Cluster::new();
    let job = "www/prod/api";
    c.service(job, Some(0.66), &[A, A, B]);
    c.drain(A);
    let progress = c.state.drain_progress(A).unwrap();
    assert_eq!((progress.to_move, progress.done()), (2, false));

    let first = c.drain_step();
    assert_eq!(first.len(), 1, "only one may go: 3 healthy, 2 must stay");
    assert_eq!(c.state.tasks[&first[0]].state, TaskState::Killing);
    assert!(c.drain_step().is_empty(), "the second waits while the first is away");
    let p = c.state.drain_progress(A).unwrap();
    assert_eq!(p.blocked.len(), 1, "{p:?}");
    assert!(
        p.describe().contains("blocked by job www/prod/api's SLA: 2 of 3 instances healthy, 2 must stay healthy"),
        "{}",
        p.describe()
    );

    // The stopped task ends; its instance gets a new task, placed elsewhere, and runs.
    c.ended(first[0]);
    let instance = c.state.tasks[&first[0]].instance;
    let replacement = c.current(job, instance);
    assert_ne!(replacement, first[0]);
    assert_eq!(c.state.tasks[&replacement].state, TaskState::Pending);
    assert!(c.drain_step().is_empty(), "still 2 healthy until the replacement runs");
    c.run_on(replacement, C);

    let second = c.drain_step();
    assert_eq!(second.len(), 1);
    assert_ne!(second[0], first[0]);
    c.ended(second[0]);
    let replacement = c.current(job, c.state.tasks[&second[0]].instance);
    c.run_on(replacement, C);

    let p = c.state.drain_progress(A).unwrap();
    assert!(p.done(), "{p:?}");
    c.apply(Command::MarkDrained { agent: A });
    assert!(c.state.agents[&A].drain.as_ref().unwrap().drained_at.is_some());
}

#[test]
fn apply_checks_the_budget_again_so_two_plans_cannot_break_the_sla() {
    let mut c = Cluster::new();
    let tasks = c.service("www/prod/api", Some(0.66), &[A, A, B]);
    c.drain(A);
    // Both tasks on A in one command (as two plans from one view would be): only one stops.
    let applied = c.apply(Command::DrainMoves { moves: vec![tasks[0], tasks[1]] });
    assert_eq!(applied.moved, vec![tasks[0]]);
    assert_eq!(c.state.tasks[&tasks[1]].state, TaskState::Running);
    // A task on an agent that is not draining is never moved.
    let applied = c.apply(Command::DrainMoves { moves: vec![tasks[2]] });
    assert!(applied.moved.is_empty());
}

#[test]
fn each_job_spends_its_own_budget_and_a_blocked_job_holds_back_no_other() {
    let mut c = Cluster::new();
    // Held back: min_healthy 1.0 never lets an instance go.
    c.service("www/prod/pinned", Some(1.0), &[A, B]);
    // Free: no min_healthy, three instances, one down at a time.
    c.service("www/prod/free", None, &[A, A, B]);
    c.drain(A);
    let moved = c.drain_step();
    assert_eq!(moved.len(), 1, "one of free's two, none of pinned's");
    assert_eq!(&*c.state.tasks[&moved[0]].job, &"www/prod/free".parse::<JobKey>().unwrap());
    let p = c.state.drain_progress(A).unwrap();
    let blocked: Vec<String> = p.blocked.iter().map(|b| b.job.to_string()).collect();
    assert_eq!(blocked, ["www/prod/free", "www/prod/pinned"]);
}

#[test]
fn tasks_that_do_not_serve_move_at_once_batch_tasks_are_left_to_finish() {
    let mut c = Cluster::new();
    let mut spec = JobShape::service(2).spec("www/prod/slow");
    spec.min_healthy = Some(1.0);
    let tasks = c.apply(Command::CreateJob { spec, seed: 7 }).created;
    // Assigned to A but not running: it serves nobody, so it moves whatever the SLA.
    c.apply(Command::Place { placements: vec![Placement { task: tasks[0], agent: A, ports: vec![31000] }] });
    let batch = c.apply(Command::CreateJob { spec: JobShape::batch(1, 0).spec("etl/prod/nightly"), seed: 8 }).created;
    c.run_on(batch[0], A);
    c.drain(A);
    assert_eq!(c.drain_step(), vec![tasks[0]]);
    let p = c.state.drain_progress(A).unwrap();
    assert_eq!((p.batch_running, p.done()), (1, false), "{p:?}");
    assert!(c.try_apply(Command::MarkDrained { agent: A }).is_err(), "not drained while the batch task runs");
    c.ended(tasks[0]);
    c.report(A, batch[0], Report::Exited { exit: TaskExit::Exited { code: 0 } });
    assert!(c.state.drain_progress(A).unwrap().done());
}

#[test]
fn nothing_moves_while_frozen_and_the_progress_says_so() {
    let mut c = Cluster::new();
    let tasks = c.service("www/prod/api", None, &[A, B, C]);
    c.drain(A);
    let freeze = Freeze { reason: "INC-1".into(), by: "ops".into(), at: c.now() };
    c.apply(Command::SetFreeze { freeze: Some(freeze) });
    let plan = c.state.drain_plan(256);
    assert!(plan.moves.is_empty());
    assert!(plan.agents[&A].describe().contains("frozen"), "{}", plan.agents[&A].describe());
    let refused = c.try_apply(Command::DrainMoves { moves: vec![tasks[0]] });
    assert!(matches!(refused, Err(Rejection::Frozen(_))), "{refused:?}");
    c.apply(Command::SetFreeze { freeze: None });
    assert_eq!(c.drain_step(), vec![tasks[0]]);
}

#[test]
fn an_unhealthy_instance_elsewhere_uses_up_the_budget() {
    let mut c = Cluster::new();
    let tasks = c.service("www/prod/api", Some(0.66), &[A, B, C]);
    c.drain(A);
    c.report(B, tasks[1], Report::Health { healthy: false, reason: "503".into() });
    assert!(c.drain_step().is_empty(), "2 healthy of 3, 2 must stay: the task on A waits");
    c.report(B, tasks[1], Report::Health { healthy: true, reason: String::new() });
    assert_eq!(c.drain_step(), vec![tasks[0]]);
}

#[test]
fn maintenance_keeps_long_running_tasks_off_before_and_every_task_during_the_window() {
    let mut c = Cluster::new();
    let start = c.now().plus_ms(MAINTENANCE_HORIZON_MS + 60_000);
    let id = c
        .apply(Command::ScheduleMaintenance { agents: vec![A], start, duration_ms: 3_600_000, by: "ops".into() })
        .maintenance_id
        .unwrap();
    assert!(c.state.maintenance_allows(A, JobType::Service, c.now()), "too far away to matter yet");
    c.now_ms += 120_000;
    assert!(!c.state.maintenance_allows(A, JobType::Service, c.now()), "within the horizon");
    assert!(c.state.maintenance_allows(A, JobType::Batch, c.now()), "batch work ends before the window");
    let svc = c.apply(Command::CreateJob { spec: JobShape::service(1).spec("www/prod/x"), seed: 1 }).created[0];
    let applied = c.apply(Command::Place { placements: vec![Placement { task: svc, agent: A, ports: vec![31000] }] });
    assert_eq!(applied.placements_refused, 1, "the plan applier re-checks maintenance");
    c.now_ms = start.0 + 1;
    assert!(!c.state.maintenance_allows(A, JobType::Batch, c.now()), "during the window, nothing new");
    assert!(c.state.maintenance_allows(B, JobType::Service, c.now()), "other agents are not concerned");
    c.apply(Command::CancelMaintenance { id, by: "ops".into() });
    assert!(c.state.maintenance_allows(A, JobType::Service, c.now()));
    // Refusals: unknown agent, ended window, no agents.
    let now = c.now();
    assert!(c
        .try_apply(Command::ScheduleMaintenance {
            agents: vec![AgentId(99)],
            start: now,
            duration_ms: 1,
            by: "o".into()
        })
        .is_err());
    assert!(c
        .try_apply(Command::ScheduleMaintenance {
            agents: vec![A],
            start: Timestamp(now.0 - 10_000),
            duration_ms: 5_000,
            by: "o".into()
        })
        .is_err());
    assert!(c
        .try_apply(Command::ScheduleMaintenance { agents: vec![], start: now, duration_ms: 1, by: "o".into() })
        .is_err());
}

#[test]
fn safe_to_drain_lists_agents_that_can_go_together() {
    let mut c = Cluster::new();
    // api: 3 instances, A holds 2, B holds 1; min_healthy 0.66 → 2 must stay: neither A (would
    // leave 1) is safe; B is safe alone; C holds nothing of it.
    c.service("www/prod/api", Some(0.66), &[A, A, B]);
    // web: no min_healthy, percent 50 → 1 of 2 must stay: one of B and C, not both.
    c.service("www/prod/web", None, &[B, C]);
    let verdicts = c.state.safe_to_drain(0.5);
    let safe: Vec<AgentId> = verdicts.iter().filter(|v| v.safe).map(|v| v.agent).collect();
    // C holds one healthy task, B two: C is looked at first and taken, then B would take web to 0.
    assert_eq!(safe, vec![C], "{verdicts:?}");
    let why_a = verdicts.iter().find(|v| v.agent == A).unwrap().why.clone().unwrap();
    assert!(why_a.contains("www/prod/api would keep 1 of 3"), "{why_a}");
    let why_b = verdicts.iter().find(|v| v.agent == B).unwrap().why.clone().unwrap();
    assert!(why_b.contains("www/prod/web would keep 0 of 2"), "{why_b}");
    // With a lower bar for jobs without min_healthy, B can go with C (web may go to 0).
    let safe: Vec<AgentId> = c.state.safe_to_drain(0.0).iter().filter(|v| v.safe).map(|v| v.agent).collect();
    assert_eq!(safe, vec![C, B]);
    // A draining agent counts as gone already.
    c.drain(B);
    let verdicts = c.state.safe_to_drain(0.0);
    assert_eq!(verdicts.iter().find(|v| v.agent == B).unwrap().why.as_deref(), Some("already draining"));
    assert!(!verdicts.iter().find(|v| v.agent == A).unwrap().safe);
}
