//! The reaper loop: finishes, in bounded steps, what must not be one huge command. It stops the
//! tasks of killed jobs one slice after the other (`KillJobSlice`, `KILL_SLICE_INSTANCES`
//! instances each), forgets killed jobs whose tasks all ended and finished batch jobs past their
//! retention period (`ForgetJobSlice`, `FORGET_SLICE_INSTANCES` instances each). Every slice is
//! its own command, durable before the next is sent, so the writer serves the API, agents and the
//! scheduler between slices, and a master that stops mid-way leaves a consistent state: the job
//! is killed (nothing of it is placed or replaced), some tasks stop and others not yet, and the
//! next term's reaper walks the job again from its first instance (stopped tasks are skipped).
//! docs/jobs.md has the rules.

use crate::core::{now, Core, CoreError};
use capstan_model::{JobKey, JobType};
use capstan_state::state::{FORGET_SLICE_INSTANCES, KILL_SLICE_INSTANCES};
use capstan_state::{Applied, Command, Rejection};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How often the loop looks for work when nobody woke it.
pub const TICK: Duration = Duration::from_millis(500);
/// How long a finished batch job (and its ended tasks) is kept before it is forgotten, unless
/// the operator sets `capstan master --batch-retention`.
pub const BATCH_RETENTION_DEFAULT: Duration = Duration::from_secs(24 * 3600);

/// The operator's settings for the life of jobs: how long finished batch jobs are kept (the
/// reaper) and how close a cron job's runs may be (checked at submission).
#[derive(Clone, Debug)]
pub struct JobSettings {
    /// Finished batch jobs are forgotten this long after they finished.
    pub batch_retention: Duration,
    /// Cron schedules whose runs come closer than this are refused.
    pub cron_interval_min: Duration,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            batch_retention: BATCH_RETENTION_DEFAULT,
            cron_interval_min: Duration::from_millis(capstan_model::cron::CRON_INTERVAL_MIN_DEFAULT_MS),
        }
    }
}

/// How far this term's kills got, per job: the instance the next slice starts from, or `None`
/// once every instance was walked. Lives with the term's core: a new term starts over.
#[derive(Default)]
pub struct Kills {
    progress: Mutex<HashMap<JobKey, Option<u32>>>,
    /// Woken when a kill has slices left.
    pub wake: Notify,
}

impl Kills {
    fn record(&self, job: &JobKey, applied: &Applied) {
        let mut progress = self.progress.lock();
        if applied.job_forgotten {
            progress.remove(job);
        } else {
            progress.insert(job.clone(), applied.kill_next);
        }
        drop(progress);
        if applied.kill_next.is_some() {
            self.wake.notify_one();
        }
    }

    /// Where this term's kill of `job` goes on: `Some(from)`, or `None` when it walked every
    /// instance already.
    fn next(&self, job: &JobKey) -> Option<u32> {
        match self.progress.lock().get(job) {
            Some(next) => *next,
            None => Some(0),
        }
    }
}

/// Kills a job: marks it killed and stops its first slice of tasks, durably; the reaper stops the
/// rest. What `DELETE /v1/jobs/…` sends.
pub async fn kill_job(core: &Core, job: &JobKey, by: &str) -> Result<Applied, CoreError> {
    let applied = core
        .submit(Command::KillJobSlice {
            job: job.clone(),
            by: by.to_string(),
            from_instance: 0,
            instances_max: KILL_SLICE_INSTANCES,
        })
        .await?;
    core.kills.record(job, &applied);
    Ok(applied)
}

/// What one look at the state found to do.
#[derive(Debug, Default, PartialEq, Eq)]
struct Work {
    /// Killed jobs with instances left to walk: (job, who killed it, from which instance).
    kills: Vec<(JobKey, String, u32)>,
    /// Jobs that are over and may be forgotten now.
    forgets: Vec<JobKey>,
}

fn find_work(core: &Core, retention: Duration, now_ms: u64) -> Work {
    let state = core.state.read();
    let mut work = Work::default();
    core.kills.progress.lock().retain(|k, _| state.jobs.get(k).is_some_and(|j| j.killed.is_some()));
    for j in state.jobs.values() {
        if let Some(by) = &j.killed {
            if j.live_tasks > 0 {
                if let Some(from) = core.kills.next(&j.key) {
                    work.kills.push(((*j.key).clone(), by.clone(), from));
                }
            } else {
                work.forgets.push((*j.key).clone());
            }
        } else if j.spec.job_type == JobType::Batch
            && j.is_over()
            && j.finished_at.is_some_and(|t| t.plus_ms(retention.as_millis() as u64).0 <= now_ms)
        {
            work.forgets.push((*j.key).clone());
        }
    }
    work
}

pub async fn run(core: Arc<Core>, config: JobSettings) {
    let mut frozen_said = false;
    loop {
        let wake = core.kills.wake.notified();
        let work = find_work(&core, config.batch_retention, now().0);
        for (job, by, mut from) in work.kills {
            loop {
                let command = Command::KillJobSlice {
                    job: job.clone(),
                    by: by.clone(),
                    from_instance: from,
                    instances_max: KILL_SLICE_INSTANCES,
                };
                match core.submit(command).await {
                    Ok(applied) => {
                        core.kills.record(&job, &applied);
                        frozen_said = false;
                        match applied.kill_next {
                            Some(next) => from = next,
                            None => break,
                        }
                    }
                    Err(e) => {
                        refused(&job, "stop the next tasks of", &e, &mut frozen_said);
                        break;
                    }
                }
            }
        }
        for job in work.forgets {
            loop {
                match core
                    .submit(Command::ForgetJobSlice { job: job.clone(), instances_max: FORGET_SLICE_INSTANCES })
                    .await
                {
                    Ok(applied) if applied.job_forgotten => {
                        tracing::info!(job = %job, "job forgotten");
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        refused(&job, "forget", &e, &mut frozen_said);
                        break;
                    }
                }
            }
        }
        if core.is_closed() {
            return;
        }
        let _ = tokio::time::timeout(TICK, wake).await;
    }
}

/// A refused slice is tried again at the next tick; a freeze is said once, not every tick.
fn refused(job: &JobKey, what: &str, e: &CoreError, frozen_said: &mut bool) {
    match e {
        CoreError::Rejected(Rejection::Frozen(_)) if *frozen_said => {}
        CoreError::Rejected(Rejection::Frozen(reason)) => {
            *frozen_said = true;
            tracing::info!(job = %job, "the kill waits for the cluster to be unfrozen ({reason})");
        }
        // The job went away meanwhile (forgotten, or killed and replaced): nothing left to do.
        CoreError::Rejected(Rejection::NoSuchJob(_)) => {}
        CoreError::Closed => {}
        e => tracing::warn!(job = %job, "cannot {what} job {job}: {e}; trying again"),
    }
}
