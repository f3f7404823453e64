//! Every command's cost is linear in what it touches: the largest job `capstan_model` allows
//! (`INSTANCES_MAX`) is created, placed, run, killed and forgotten, and the work `apply` counts
//! (`capstan_state::work`: tasks and instances visited, index entries changed) stays within a
//! constant per task touched. A rescan of the job per ended task — the quadratic kill that stopped
//! a master for half an hour — shows up here as a count in the billions, not as a slow test.

mod common;

use capstan_model::decode::INSTANCES_MAX;
use capstan_model::{AgentId, JobKey, JobType, TaskExit, TaskId, TaskState, Timestamp};
use capstan_state::state::{FORGET_SLICE_INSTANCES, KILL_SLICE_INSTANCES};
use capstan_state::{work, Applied, ClusterState, Command, Placement, Report, Stamped, StatusUpdate};
use common::{agent_info, JobShape, MIB};

/// Units of work allowed per task a phase touches (a task is created, placed, stopped or ended
/// once per phase; each of those is a handful of index operations).
const UNITS_PER_TASK_MAX: u64 = 16;
/// Agents the job is spread over.
const AGENTS: u64 = 100;

struct Big {
    state: ClusterState,
    now_ms: u64,
    seq: std::collections::BTreeMap<AgentId, u64>,
}

impl Big {
    fn new() -> Big {
        let mut b = Big { state: ClusterState::default(), now_ms: 1_000_000, seq: Default::default() };
        let per_agent = u64::from(INSTANCES_MAX) / AGENTS + 1;
        for id in 1..=AGENTS {
            let info = agent_info(id, (per_agent * 250) as u32, per_agent * 64 * MIB, 0, vec![]);
            b.apply(Command::RegisterAgent { info });
        }
        b
    }

    /// Applies without the round trip through the codec (too slow at this size; the other state
    /// tests check it), and returns what it did and the units of work it counted.
    fn apply(&mut self, command: Command) -> (Applied, u64) {
        self.now_ms += 1;
        let before = work::units();
        let applied = self
            .state
            .apply(&Stamped { at: Timestamp(self.now_ms), command })
            .unwrap_or_else(|e| panic!("refused: {e}"));
        (applied, work::units() - before)
    }

    fn key(name: &str) -> JobKey {
        name.parse().unwrap()
    }

    /// Places every pending task of the job, a thousand per command, round-robin over the agents.
    fn place_all(&mut self, tasks: &[TaskId]) -> u64 {
        let mut units = 0;
        for (n, chunk) in tasks.chunks(1_000).enumerate() {
            let placements = chunk
                .iter()
                .enumerate()
                .map(|(i, t)| Placement {
                    task: *t,
                    agent: AgentId(((n * 1_000 + i) as u64 % AGENTS) + 1),
                    ports: vec![],
                })
                .collect();
            let (applied, u) = self.apply(Command::Place { placements });
            assert_eq!(applied.placements_refused, 0);
            units += u;
        }
        units
    }

    /// Every agent reports `report(task)` for each of its tasks in `tasks`, a thousand per command.
    fn report_all(&mut self, tasks: &[TaskId], report: impl Fn(TaskId) -> Report) -> u64 {
        let mut units = 0;
        let mut by_agent: std::collections::BTreeMap<AgentId, Vec<TaskId>> = Default::default();
        for t in tasks {
            if let Some(a) = self.state.tasks.get(t).and_then(|t| t.agent) {
                by_agent.entry(a).or_default().push(*t);
            }
        }
        for (agent, ids) in by_agent {
            for chunk in ids.chunks(1_000) {
                let updates = chunk
                    .iter()
                    .map(|t| {
                        let seq = self.seq.entry(agent).or_insert(0);
                        *seq += 1;
                        StatusUpdate { seq: *seq, task: *t, report: report(*t), at: Timestamp(self.now_ms) }
                    })
                    .collect();
                units += self.apply(Command::AgentUpdates { agent, updates }).1;
            }
        }
        units
    }

    /// Kills the job slice after slice, as the master's DELETE and reaper loop do; each slice
    /// touches at most `KILL_SLICE_INSTANCES` instances, and counts at most that much work.
    fn kill_in_slices(&mut self, job: &JobKey) -> u64 {
        let mut units = 0;
        let mut from = Some(0);
        while let Some(from_instance) = from {
            let (applied, u) = self.apply(Command::KillJobSlice {
                job: job.clone(),
                by: "test".into(),
                from_instance,
                instances_max: KILL_SLICE_INSTANCES,
            });
            assert!(
                u <= UNITS_PER_TASK_MAX * u64::from(KILL_SLICE_INSTANCES),
                "one kill slice counted {u} units of work"
            );
            units += u;
            from = applied.kill_next;
        }
        units
    }

    /// Forgets the (over) job slice after slice, as the reaper loop does.
    fn forget_in_slices(&mut self, job: &JobKey) -> u64 {
        let mut units = 0;
        while self.state.jobs.contains_key(job) {
            let (_, u) =
                self.apply(Command::ForgetJobSlice { job: job.clone(), instances_max: FORGET_SLICE_INSTANCES });
            assert!(
                u <= UNITS_PER_TASK_MAX * u64::from(FORGET_SLICE_INSTANCES),
                "one forget slice counted {u} units of work"
            );
            units += u;
        }
        units
    }
}

fn within_bound(what: &str, units: u64, tasks: u64) {
    assert!(
        units <= UNITS_PER_TASK_MAX * tasks,
        "{what}: {units} units of work for {tasks} tasks touched (at most {UNITS_PER_TASK_MAX} per task)"
    );
}

fn exited_killed(_: TaskId) -> Report {
    Report::Exited { exit: TaskExit::Killed { by: "test".into() } }
}

/// A service of the largest size: created, placed, running, killed in slices, each task's end
/// reported, forgotten in slices. Every phase stays linear.
#[test]
fn the_largest_service_is_created_killed_and_forgotten_in_linear_work() {
    let mut b = Big::new();
    let key = Big::key("big/prod/service");
    let n = u64::from(INSTANCES_MAX);
    let spec = JobShape { ports: 0, ..JobShape::service(INSTANCES_MAX) }.spec("big/prod/service");
    let (created, create_units) = b.apply(Command::CreateJob { spec, seed: 7 });
    assert_eq!(created.created.len() as u64, n);
    within_bound("create", create_units, n);
    let tasks = created.created.clone();
    within_bound("place", b.place_all(&tasks), n);
    within_bound("run", b.report_all(&tasks, |_| Report::Running { pid: 1 }), n);
    within_bound("kill", b.kill_in_slices(&key), n);
    assert!(b.state.tasks.values().all(|t| t.state == TaskState::Killing), "every task is stopping");
    within_bound("the tasks end", b.report_all(&tasks, exited_killed), n);
    let job = &b.state.jobs[&key];
    assert!(job.is_over(), "killed, nothing live");
    within_bound("forget", b.forget_in_slices(&key), n);
    assert!(b.state.tasks.is_empty() && b.state.jobs.is_empty());
    assert!(b.state.agents.values().all(|a| a.tasks.is_empty()), "every reservation released");
}

/// The old single `KillJob` is still replayed from older logs: linear too, and the job it leaves
/// (too large to forget in the command that ended its last task) is forgotten in slices.
#[test]
fn a_single_kill_job_of_the_largest_batch_job_is_linear() {
    let mut b = Big::new();
    let key = Big::key("big/prod/batch");
    let n = u64::from(INSTANCES_MAX);
    let spec = JobShape { ports: 0, ..JobShape::batch(INSTANCES_MAX, 0) }.spec("big/prod/batch");
    let (created, _) = b.apply(Command::CreateJob { spec, seed: 9 });
    let tasks = created.created.clone();
    b.place_all(&tasks);
    b.report_all(&tasks, |_| Report::Running { pid: 1 });
    let (_, kill_units) = b.apply(Command::KillJob { job: key.clone(), by: "test".into() });
    within_bound("one KillJob", kill_units, n);
    within_bound("the tasks end", b.report_all(&tasks, exited_killed), n);
    assert!(b.state.jobs.contains_key(&key), "too large to forget with its last task: left to the slices");
    within_bound("forget", b.forget_in_slices(&key), n);
    assert!(b.state.tasks.is_empty());
}

/// A cron run of the largest size, killed: the end of each task used to look at every instance
/// of the run to see whether the run was over (a scan per ended task).
#[test]
fn killing_the_largest_cron_run_is_linear() {
    let mut b = Big::new();
    let key = Big::key("big/prod/cron");
    let n = u64::from(INSTANCES_MAX);
    let mut spec =
        JobShape { job_type: JobType::Cron, ports: 0, ..JobShape::batch(INSTANCES_MAX, 0) }.spec("big/prod/cron");
    spec.cron = Some("0 0 * * *".into());
    b.apply(Command::CreateJob { spec, seed: 11 });
    let (started, run_units) =
        b.apply(Command::StartCronRun { job: key.clone(), scheduled_at: None, missed: 0, seed: 12, by: "test".into() });
    let tasks = started.created.clone();
    assert_eq!(tasks.len() as u64, n);
    within_bound("start the run", run_units, n);
    b.place_all(&tasks);
    b.report_all(&tasks, |_| Report::Running { pid: 1 });
    within_bound("kill", b.kill_in_slices(&key), n);
    within_bound("the tasks end", b.report_all(&tasks, exited_killed), n);
    within_bound("forget", b.forget_in_slices(&key), n);
    assert!(b.state.tasks.is_empty());
}

/// A finished batch job of the largest size is forgotten in slices (its retention is the
/// master's decision; `apply` only refuses to forget a job that is not over).
#[test]
fn the_largest_finished_batch_job_is_forgotten_in_slices() {
    let mut b = Big::new();
    let key = Big::key("big/prod/done");
    let n = u64::from(INSTANCES_MAX);
    let spec = JobShape { ports: 0, ..JobShape::batch(INSTANCES_MAX, 0) }.spec("big/prod/done");
    let (created, _) = b.apply(Command::CreateJob { spec, seed: 13 });
    let tasks = created.created.clone();
    b.place_all(&tasks);
    b.report_all(&tasks, |_| Report::Running { pid: 1 });
    b.now_ms += 1;
    let refused = b.state.apply(&Stamped {
        at: Timestamp(b.now_ms),
        command: Command::ForgetJobSlice { job: key.clone(), instances_max: FORGET_SLICE_INSTANCES },
    });
    assert!(matches!(refused, Err(capstan_state::Rejection::Conflict(_))), "running: {refused:?}");
    let finished = |_| Report::Exited { exit: TaskExit::Exited { code: 0 } };
    within_bound("the tasks finish", b.report_all(&tasks, finished), n);
    assert!(b.state.jobs[&key].finished_at.is_some());
    within_bound("forget", b.forget_in_slices(&key), n);
    assert!(b.state.tasks.is_empty() && b.state.jobs.is_empty());
}
