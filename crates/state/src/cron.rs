//! Cron jobs in the state: the runs of a `type = "cron"` job, the collision policy, and the record
//! of the latest fire time handled (so that a restarted master knows which fire times it missed).
//!
//! A run is like a batch job: `instances` tasks, each retried up to `max_failures` times; the run
//! is over when none of its tasks is live any more. At most one run's tasks exist at a time. When
//! a run starts while the previous one is still live:
//! - `KILL_EXISTING` (default): the previous run's tasks are killed; the new run *waits* until
//!   they all ended, then its tasks are created (so two runs never overlap). While the cluster is
//!   frozen nothing may be killed: the new run is skipped instead, and says why.
//! - `CANCEL_NEW`: the new run is skipped, recorded as such.
//!
//! The master's cron loop computes fire times (wall clock, croner) and sends
//! [`Command::StartCronRun`](crate::Command::StartCronRun); `capstan job start` sends the same
//! command without a fire time. Everything here is deterministic: time is the command's stamp,
//! task ids come from the command's seed.

use crate::state::{Applied, ClusterState, Rejection};
use capstan_model::lifecycle::Event;
use capstan_model::spec::CronCollisionPolicy;
use capstan_model::{derive_id, JobKey, JobType, TaskId, Timestamp};
use serde::{Deserialize, Serialize};

/// Runs remembered per cron job (started, skipped or waiting); older ones are forgotten.
pub const CRON_RUNS_KEPT: usize = 20;
/// Failed instances a failed run's reason names; the others are counted ("and N more").
pub const FAILED_INSTANCES_NAMED_MAX: usize = 20;

/// The cron part of a job: primary state, serialized with the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CronRuns {
    /// The latest fire time handled (run, skipped, or counted as missed); the next fire time is
    /// looked for after it. Starts at the job's creation.
    pub last_fire: Timestamp,
    /// The number of the latest run (the first run is 1).
    pub last_number: u32,
    /// The run whose tasks are the job's current tasks (live or ended), if any.
    pub active: Option<u32>,
    /// A run waiting for the active run's tasks to stop (`KILL_EXISTING`), with the seed of its
    /// task ids.
    pub waiting: Option<(u32, u64)>,
    /// The latest runs, oldest first, at most [`CRON_RUNS_KEPT`].
    pub runs: Vec<CronRun>,
}

/// One run of a cron job, or one fire time that did not get a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CronRun {
    pub number: u32,
    /// The fire time it is for; `None`: started by hand (`capstan job start`).
    pub scheduled_at: Option<Timestamp>,
    /// Who or what asked for it (`schedule`, or the user's words).
    pub by: String,
    /// Fire times that passed without a run of their own (master down, or stalled), collapsed
    /// into this one.
    pub missed: u32,
    /// When the command was applied.
    pub requested_at: Timestamp,
    /// When its tasks were created; `None` while waiting, or when skipped.
    pub started_at: Option<Timestamp>,
    /// When its last task ended (or when it was skipped).
    pub ended_at: Option<Timestamp>,
    pub result: CronRunResult,
    /// Why it is in that state, in words.
    pub reason: String,
    /// Its tasks, in instance order (replacements after failures are not listed).
    pub tasks: Vec<TaskId>,
    /// Set when another run (or a job kill) stopped it: ended, it is `Killed`.
    pub killed_by: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CronRunResult {
    /// Waiting for the previous run's tasks to stop (`KILL_EXISTING`).
    Waiting,
    Running,
    /// Every instance exited 0.
    Succeeded,
    /// An instance failed for good (after `max_failures` retries).
    Failed,
    /// Stopped by the next run (`KILL_EXISTING`) or a job kill.
    Killed,
    /// Never ran: the previous run was still live (`CANCEL_NEW`, or frozen), or it was superseded
    /// while waiting.
    Skipped,
}

impl CronRunResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CronRunResult::Waiting => "WAITING",
            CronRunResult::Running => "RUNNING",
            CronRunResult::Succeeded => "SUCCEEDED",
            CronRunResult::Failed => "FAILED",
            CronRunResult::Killed => "KILLED",
            CronRunResult::Skipped => "SKIPPED",
        }
    }
}

/// What a `StartCronRun` did, for the shell (events, the API's answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CronStarted {
    pub number: u32,
    /// `Running` (tasks created), `Waiting` (previous run being killed) or `Skipped`.
    pub result: CronRunResult,
    pub reason: String,
    /// The previous run, when this one kills it.
    pub killing: Option<u32>,
    /// A waiting run this one replaced (it is skipped).
    pub superseded: Option<u32>,
}

impl CronRuns {
    pub fn new(created_at: Timestamp) -> CronRuns {
        CronRuns { last_fire: created_at, last_number: 0, active: None, waiting: None, runs: Vec::new() }
    }

    pub fn run(&self, number: u32) -> Option<&CronRun> {
        self.runs.iter().rev().find(|r| r.number == number)
    }

    fn run_mut(&mut self, number: u32) -> Option<&mut CronRun> {
        self.runs.iter_mut().rev().find(|r| r.number == number)
    }

    fn push(&mut self, run: CronRun) {
        if self.runs.len() >= CRON_RUNS_KEPT {
            // Forget the oldest run that is over; the active and waiting ones stay.
            let (active, waiting) = (self.active, self.waiting.map(|w| w.0));
            if let Some(i) = self.runs.iter().position(|r| Some(r.number) != active && Some(r.number) != waiting) {
                self.runs.remove(i);
            }
        }
        self.runs.push(run);
    }
}

/// The fields of a `Command::StartCronRun`.
pub(crate) struct RunRequest<'a> {
    pub job: &'a JobKey,
    pub scheduled_at: Option<Timestamp>,
    pub missed: u32,
    pub seed: u64,
    pub by: &'a str,
}

impl ClusterState {
    /// `Command::StartCronRun`: a fire time (or `job start`) of a cron job.
    pub(crate) fn start_cron_run(
        &mut self,
        req: RunRequest<'_>,
        at: Timestamp,
        out: &mut Applied,
    ) -> Result<(), Rejection> {
        let RunRequest { job, scheduled_at, missed, seed, by } = req;
        let frozen = self.frozen.as_ref().map(|f| f.reason.clone());
        let j = self.jobs.get_mut(job).ok_or_else(|| Rejection::NoSuchJob(job.clone()))?;
        if j.killed.is_some() {
            return Err(Rejection::JobKilled(job.clone()));
        }
        if j.spec.job_type != JobType::Cron {
            return Err(Rejection::Invalid(format!(
                "job {job} is a {} job; only cron jobs are started on demand",
                j.spec.job_type.as_str()
            )));
        }
        let policy = j.spec.cron_collision_policy.unwrap_or_default();
        let cron = j.cron.as_mut().expect("a cron job has its runs");
        if let Some(s) = scheduled_at {
            if s <= cron.last_fire {
                return Err(Rejection::Invalid(format!(
                    "fire time {} of {job} was already handled (latest {})",
                    s.0, cron.last_fire.0
                )));
            }
            cron.last_fire = s;
        }
        // Is the active run still live?
        let live: Vec<TaskId> = j
            .current
            .values()
            .copied()
            .filter(|id| self.tasks.get(id).is_some_and(|t| !t.state.is_terminal()))
            .collect();
        let active = cron.active.filter(|_| !live.is_empty());
        cron.last_number += 1;
        let number = cron.last_number;
        let mut run = CronRun {
            number,
            scheduled_at,
            by: by.to_string(),
            missed,
            requested_at: at,
            started_at: None,
            ended_at: None,
            result: CronRunResult::Running,
            reason: String::new(),
            tasks: Vec::new(),
            killed_by: None,
        };
        let mut started = CronStarted {
            number,
            result: CronRunResult::Running,
            reason: String::new(),
            killing: None,
            superseded: None,
        };
        // A run that waited for the active one to stop is replaced by this newer one.
        if let Some((w, _)) = cron.waiting.take() {
            if let Some(r) = cron.run_mut(w) {
                r.result = CronRunResult::Skipped;
                r.ended_at = Some(at);
                r.reason = format!("superseded by run {number} before it could start");
            }
            started.superseded = Some(w);
        }
        let skip = |run: &mut CronRun, started: &mut CronStarted, reason: String| {
            run.result = CronRunResult::Skipped;
            run.ended_at = Some(at);
            run.reason = reason.clone();
            started.result = CronRunResult::Skipped;
            started.reason = reason;
        };
        match (active, policy) {
            (None, _) => {
                cron.push(run);
                self.create_cron_run_tasks(job, number, seed, at, out);
                let reason = self.jobs[job].cron.as_ref().and_then(|c| c.run(number)).map(|r| r.reason.clone());
                started.reason = reason.unwrap_or_default();
            }
            (Some(prev), CronCollisionPolicy::CancelNew) => {
                skip(
                    &mut run,
                    &mut started,
                    format!("run {prev} is still running (cron_collision_policy = CANCEL_NEW)"),
                );
                cron.push(run);
            }
            (Some(prev), CronCollisionPolicy::KillExisting) => {
                if let Some(why) = frozen {
                    skip(
                        &mut run,
                        &mut started,
                        format!(
                            "run {prev} is still running and the cluster is frozen ({why}): KILL_EXISTING cannot stop it"
                        ),
                    );
                    cron.push(run);
                } else {
                    let kill_reason = format!("run {number} of the cron job started (KILL_EXISTING)");
                    if let Some(p) = cron.run_mut(prev) {
                        p.killed_by = Some(kill_reason.clone());
                    }
                    run.result = CronRunResult::Waiting;
                    run.reason = format!("waiting for run {prev} to stop (KILL_EXISTING)");
                    started.result = CronRunResult::Waiting;
                    started.reason = run.reason.clone();
                    started.killing = Some(prev);
                    cron.waiting = Some((number, seed));
                    cron.push(run);
                    for id in live {
                        self.step(id, &Event::Kill { by: kill_reason.clone() }, at, out);
                    }
                    // Tasks that had not started yet end at once; the waiting run may start now
                    // (the kills above already ran the end-of-run check when the last one ended).
                    if let Some(r) = self.jobs[job].cron.as_ref().and_then(|c| c.run(number)) {
                        if r.result == CronRunResult::Running {
                            started.result = CronRunResult::Running;
                            started.reason = r.reason.clone();
                        }
                    }
                }
            }
        }
        out.cron = Some(started);
        Ok(())
    }

    /// Creates the tasks of run `number` (all instances) and makes it the active run.
    fn create_cron_run_tasks(&mut self, job: &JobKey, number: u32, seed: u64, at: Timestamp, out: &mut Applied) {
        let j = self.jobs.get_mut(job).expect("exists");
        j.done.clear();
        j.finished_at = None;
        let instances = j.spec.instances;
        let version = j.version;
        let mut next = seed;
        let mut ids = Vec::with_capacity(instances as usize);
        for instance in 0..instances {
            next = derive_id(next);
            let id = self.fresh_id(next);
            self.create_task(id, job, instance, version, 0, at, at);
            ids.push(id);
        }
        let cron = self.jobs.get_mut(job).and_then(|j| j.cron.as_mut()).expect("a cron job has its runs");
        cron.active = Some(number);
        let run = cron.run_mut(number).expect("pushed before its tasks are created");
        run.started_at = Some(at);
        run.result = CronRunResult::Running;
        run.reason = format!("{instances} task(s) started");
        run.tasks = ids.clone();
        out.created.extend(ids);
        out.new_pending = true;
    }

    /// After a task of `job` ended: closes the active run once none of its tasks is live, and
    /// starts the run that waited for it.
    pub(crate) fn cron_task_ended(&mut self, job: &JobKey, at: Timestamp, out: &mut Applied) {
        let Some(j) = self.jobs.get(job) else { return };
        if j.spec.job_type != JobType::Cron {
            return;
        }
        // Counted, not scanned (a scan of the run per ended task was quadratic): every live task
        // of the job, so a run ends only when nothing of it is left, a copy stopping beside its
        // replacement included.
        if j.live_tasks > 0 {
            return;
        }
        let all_ok = j.done.len() as u32 == j.spec.instances && j.done.values().all(|ok| *ok);
        // Once per run; the reason names the first few (it is shown on every read of the job).
        crate::work::add(j.done.len() as u64);
        let failed_count = j.done.values().filter(|ok| !**ok).count();
        let failed: Vec<u32> =
            j.done.iter().filter(|(_, ok)| !**ok).map(|(i, _)| *i).take(FAILED_INSTANCES_NAMED_MAX).collect();
        let job_killed = j.killed.clone();
        let j = self.jobs.get_mut(job).expect("exists");
        let Some(cron) = j.cron.as_mut() else { return };
        if let Some(number) = cron.active {
            if let Some(run) = cron.run_mut(number) {
                if run.ended_at.is_none() {
                    run.ended_at = Some(at);
                    let killed_by = run.killed_by.clone().or(job_killed.clone());
                    (run.result, run.reason) = match killed_by {
                        Some(by) => (CronRunResult::Killed, format!("killed: {by}")),
                        None if all_ok => (CronRunResult::Succeeded, "every instance exited 0".to_string()),
                        None => (
                            CronRunResult::Failed,
                            format!(
                                "instance(s) {}{} failed",
                                failed.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", "),
                                match failed_count - failed.len() {
                                    0 => String::new(),
                                    more => format!(" and {more} more"),
                                }
                            ),
                        ),
                    };
                }
            }
        }
        if job_killed.is_some() {
            if let Some((w, _)) = cron.waiting.take() {
                if let Some(r) = cron.run_mut(w) {
                    r.result = CronRunResult::Skipped;
                    r.ended_at = Some(at);
                    r.reason = "the job was killed before it could start".into();
                }
            }
            return;
        }
        if let Some((number, seed)) = cron.waiting.take() {
            self.create_cron_run_tasks(job, number, seed, at, out);
        }
    }
}
