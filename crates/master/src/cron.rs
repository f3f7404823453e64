//! The cron loop: finds the cron jobs whose next fire time has come (wall clock, croner) and sends
//! one `StartCronRun` per job and fire time; the state applies the collision policy. Also the
//! cron part of the API's job view.
//!
//! Missed fire times: the state keeps the latest fire time handled per job (`CronRuns::last_fire`).
//! Each tick looks at the fire times after it up to now; however many there are, the job gets
//! **one** run, for the latest of them, and the others are recorded as missed on that run. Fire
//! times that fell before this loop started (the master was down) are all missed, the one that is
//! run too: a restart across one fire time gives one run with `missed = 1`; across five, one run
//! with `missed = 5`. In normal operation the loop sees each fire time within a tick, so `missed`
//! is 0.

use crate::core::{now, Core};
use crate::events::Events;
use capstan_api::wire::{rfc3339, CronRunView, CronStartedView, CronView};
use capstan_model::spec::CronCollisionPolicy;
use capstan_model::{CronSchedule, JobKey, JobSpec, TaskId, Timestamp};
use capstan_state::{ClusterState, Command, CronRunResult, CronStarted, Job};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How often the loop looks for due fire times: fire times are at least a second apart, so a run
/// starts at most this late.
pub const TICK: Duration = Duration::from_millis(200);

/// A job's parsed schedule and its next fire time, kept between ticks so that a tick costs one
/// lookup per cron job while nothing is due.
struct Cached {
    spec: Arc<JobSpec>,
    schedule: Option<CronSchedule>,
    /// `(last_fire, the first fire time after it)`.
    next: Option<(Timestamp, Option<Timestamp>)>,
}

/// A run the loop must start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueRun {
    pub job: JobKey,
    pub scheduled_at: Timestamp,
    pub missed: u32,
}

#[derive(Default)]
pub struct Schedules {
    cache: HashMap<JobKey, Cached>,
}

impl Schedules {
    /// The runs due at `now`; `started`: when this loop started (earlier fire times were missed).
    pub fn due(&mut self, state: &ClusterState, started: Timestamp, now: Timestamp) -> Vec<DueRun> {
        self.cache.retain(|k, _| state.jobs.get(k).is_some_and(|j| j.cron.is_some()));
        let mut out = Vec::new();
        for j in state.jobs.values() {
            let Some(runs) = &j.cron else { continue };
            if j.killed.is_some() {
                continue;
            }
            let cached = self.cache.entry(j.spec.job.clone()).or_insert_with(|| parse(&j.spec));
            if !Arc::ptr_eq(&cached.spec, &j.spec) {
                *cached = parse(&j.spec);
            }
            let Some(schedule) = &cached.schedule else { continue };
            let next = match cached.next {
                Some((after, next)) if after == runs.last_fire => next,
                _ => {
                    let next = schedule.next_after(runs.last_fire);
                    cached.next = Some((runs.last_fire, next));
                    next
                }
            };
            if next.is_none_or(|t| t > now) {
                continue;
            }
            let Some(due) = schedule.due(runs.last_fire, now) else { continue };
            let missed = due.count - 1 + u32::from(due.latest <= started);
            out.push(DueRun { job: j.spec.job.clone(), scheduled_at: due.latest, missed });
        }
        out
    }
}

fn parse(spec: &Arc<JobSpec>) -> Cached {
    let schedule =
        spec.cron.as_deref().and_then(|expr| match CronSchedule::parse(expr, spec.cron_timezone.as_deref()) {
            Ok(s) => Some(s),
            Err(problems) => {
                // Validated when the job was created; a newer version of Capstan may read it otherwise.
                tracing::error!(job = %spec.job, "cron schedule no longer valid: {problems:?}");
                None
            }
        });
    Cached { spec: spec.clone(), schedule, next: None }
}

pub async fn run(core: Arc<Core>, events: Arc<Events>) {
    let started = now();
    let mut schedules = Schedules::default();
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let due = {
            let state = core.state.read();
            schedules.due(&state, started, now())
        };
        for d in due {
            let command = Command::StartCronRun {
                job: d.job.clone(),
                scheduled_at: Some(d.scheduled_at),
                missed: d.missed,
                seed: rand::random(),
                by: "schedule".into(),
            };
            match core.submit(command).await {
                Ok(applied) => {
                    if let Some(started) = &applied.cron {
                        record_event(&events, &d.job, started, Some(d.scheduled_at), d.missed);
                    }
                }
                Err(e) => tracing::warn!(job = %d.job, "cannot start the cron run: {e}"),
            }
        }
    }
}

/// The cluster event that says what a run request did.
pub fn record_event(
    events: &Events,
    job: &JobKey,
    started: &CronStarted,
    scheduled_at: Option<Timestamp>,
    missed: u32,
) {
    let what = match scheduled_at {
        Some(t) => format!("run {} (fire time {})", started.number, rfc3339(t)),
        None => format!("run {} (started by hand)", started.number),
    };
    if missed > 0 {
        events.add(
            "cron_runs_missed",
            format!("cron job {job}: {missed} fire time(s) passed without a run; {what} runs once for them"),
        );
    }
    if let Some(w) = started.superseded {
        events
            .add("cron_run_skipped", format!("cron job {job}: run {w} skipped: superseded by run {}", started.number));
    }
    match started.result {
        CronRunResult::Skipped => {
            events.add("cron_run_skipped", format!("cron job {job}: {what} skipped: {}", started.reason))
        }
        CronRunResult::Waiting => events.add(
            "cron_run_killing_previous",
            format!(
                "cron job {job}: {what} waits while run {} is killed (KILL_EXISTING)",
                started.killing.unwrap_or(0)
            ),
        ),
        _ => events.add("cron_run_started", format!("cron job {job}: {what} started: {}", started.reason)),
    }
}

/// The answer of `POST /v1/jobs/{key}/start`.
pub fn started_view(job: &JobKey, started: &CronStarted, tasks: Vec<TaskId>) -> CronStartedView {
    CronStartedView {
        job: job.clone(),
        run: started.number,
        result: started.result.as_str().into(),
        reason: started.reason.clone(),
        tasks,
    }
}

/// The job's status word when it is a cron job: `killing`, `running` (a run's tasks are live),
/// `waiting` (a run waits for the previous one to be killed) or `scheduled` (idle until the next
/// fire time).
pub fn status(state: &ClusterState, j: &Job) -> Option<&'static str> {
    let runs = j.cron.as_ref()?;
    let live = j.current.values().any(|id| state.tasks.get(id).is_some_and(|t| !t.state.is_terminal()));
    Some(if j.killed.is_some() {
        "killing"
    } else if runs.waiting.is_some() {
        "waiting"
    } else if live {
        "running"
    } else {
        "scheduled"
    })
}

/// The cron part of a job's view; `now` for the next fire time.
pub fn view(j: &Job, now: Timestamp) -> Option<CronView> {
    let runs = j.cron.as_ref()?;
    let spec = &j.spec;
    let schedule = spec.cron.as_deref().and_then(|e| CronSchedule::parse(e, spec.cron_timezone.as_deref()).ok());
    let next = schedule.as_ref().and_then(|s| s.next_after(runs.last_fire.max(now)));
    Some(CronView {
        schedule: spec.cron.clone().unwrap_or_default(),
        description: schedule.as_ref().map(|s| s.describe()).unwrap_or_default(),
        timezone: spec.cron_timezone.clone().unwrap_or_else(|| capstan_model::cron::DEFAULT_TIMEZONE.into()),
        collision_policy: match spec.cron_collision_policy.unwrap_or_default() {
            CronCollisionPolicy::KillExisting => "KILL_EXISTING",
            CronCollisionPolicy::CancelNew => "CANCEL_NEW",
        }
        .into(),
        next_run_at: next.map(rfc3339),
        last_fire_at: rfc3339(runs.last_fire),
        runs: runs
            .runs
            .iter()
            .rev()
            .map(|r| CronRunView {
                number: r.number,
                result: r.result.as_str().into(),
                reason: r.reason.clone(),
                scheduled_at: r.scheduled_at.map(rfc3339),
                by: r.by.clone(),
                missed: r.missed,
                requested_at: rfc3339(r.requested_at),
                started_at: r.started_at.map(rfc3339),
                ended_at: r.ended_at.map(rfc3339),
                duration_ms: r.ended_at.map(|e| e.since(r.started_at.unwrap_or(r.requested_at))),
                tasks: r.tasks.clone(),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_model::JobType;
    use capstan_state::Stamped;

    const MINUTE: u64 = 60_000;
    /// 2024-01-01T00:00:00Z.
    const T0: u64 = 1_704_067_200_000;

    fn state_with_cron_job(created_at: u64) -> ClusterState {
        let text = r#"
            job = "ops/prod/tick"
            type = "cron"
            cron = "* * * * *"
            [task]
            command = "true"
            user = "nobody"
            cpus = 0.1
            mem = "16MiB"
            disk = "1MiB"
        "#;
        let spec = capstan_model::parse_toml(text, &Default::default()).unwrap();
        assert_eq!(spec.job_type, JobType::Cron);
        let mut state = ClusterState::default();
        state.apply(&Stamped { at: Timestamp(created_at), command: Command::CreateJob { spec, seed: 1 } }).unwrap();
        state
    }

    #[test]
    fn a_fire_time_in_normal_operation_is_due_once_and_on_time() {
        let state = state_with_cron_job(T0 + 5_000);
        let mut s = Schedules::default();
        let started = Timestamp(T0);
        assert!(s.due(&state, started, Timestamp(T0 + MINUTE - 1)).is_empty());
        let due = s.due(&state, started, Timestamp(T0 + MINUTE + 150));
        assert_eq!(
            due,
            vec![DueRun { job: "ops/prod/tick".parse().unwrap(), scheduled_at: Timestamp(T0 + MINUTE), missed: 0 }]
        );
    }

    #[test]
    fn fire_times_passed_while_no_master_ran_are_one_run_with_the_count() {
        let state = state_with_cron_job(T0 + 5_000);
        let mut s = Schedules::default();
        // This master started at 3m30s: the fire times at 1m, 2m and 3m were missed.
        let started = Timestamp(T0 + 3 * MINUTE + 30_000);
        let due = s.due(&state, started, Timestamp(T0 + 3 * MINUTE + 30_200));
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].scheduled_at, due[0].missed), (Timestamp(T0 + 3 * MINUTE), 3));
        // Only one fire time missed: still one run, missed = 1.
        let started = Timestamp(T0 + MINUTE + 30_000);
        let due = s.due(&state, started, Timestamp(T0 + MINUTE + 30_200));
        assert_eq!((due[0].scheduled_at, due[0].missed), (Timestamp(T0 + MINUTE), 1));
    }
}
