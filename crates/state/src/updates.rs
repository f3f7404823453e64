//! Rolling updates (pure): the update record a job carries, and what `StartUpdate`, `UpdateStep`
//! and `UpdateControl` do to the state. The master's updater loop only decides *when* to send an
//! `UpdateStep` (`step_needed`); what the step does is decided here, from the state and the
//! command's stamped time, so a replay (or a master restarted mid-update) gives the same update.
//! docs/updates.md describes the behaviour.

use crate::state::{Applied, ClusterState, Job, Rejection, Task};
use capstan_model::lifecycle::Event;
use capstan_model::spec::UpdateSpec;
use capstan_model::{DurationMs, JobKey, JobSpec, JobType, TaskId, TaskState, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Ended updates remembered per job (the newest ones).
pub const UPDATE_HISTORY_MAX: usize = 16;
/// Events remembered per update (the first one and the newest ones).
pub const UPDATE_EVENTS_MAX: usize = 32;

/// What an update does when the job file has no `[update]` table.
pub const DEFAULT_UPDATE: UpdateSpec = UpdateSpec {
    batch_size: 1,
    watch: DurationMs(10_000),
    max_per_instance_failures: 0,
    max_total_failures: 0,
    rollback_on_failure: true,
    canaries: 0,
    auto_promote: false,
};

/// A job's update bookkeeping; primary state (serialized).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobUpdates {
    /// Specs of versions other than the job's own (`Job::spec`) that tasks may still use.
    pub specs: BTreeMap<u32, Arc<JobSpec>>,
    /// The highest version this job ever had: a new version is always above it, even after a
    /// rollback went back to an older one.
    pub latest_version: u32,
    /// The update in progress.
    pub active: Option<Update>,
    /// Ended updates, oldest first, at most [`UPDATE_HISTORY_MAX`].
    pub history: Vec<Update>,
    /// Updates started so far (`Update::id`).
    pub count: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    /// Replacing instances batch by batch.
    Rolling,
    /// The canaries are done; waiting for `capstan job update promote`.
    AwaitingPromote,
    /// Putting the old version back, batch by batch.
    RollingBack,
    Succeeded,
    /// Past its failure limits with `rollback_on_failure = false`: stopped where it was.
    Failed,
    /// Stopped by an operator where it was; instances already updated keep the new version.
    Aborted,
    RolledBack,
}

impl UpdateState {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateState::Rolling => "rolling",
            UpdateState::AwaitingPromote => "awaiting_promote",
            UpdateState::RollingBack => "rolling_back",
            UpdateState::Succeeded => "succeeded",
            UpdateState::Failed => "failed",
            UpdateState::Aborted => "aborted",
            UpdateState::RolledBack => "rolled_back",
        }
    }

    pub fn is_over(self) -> bool {
        matches!(self, UpdateState::Succeeded | UpdateState::Failed | UpdateState::Aborted | UpdateState::RolledBack)
    }
}

/// One instance of the batch in flight.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// The target-version task being watched (once it exists).
    pub task: Option<TaskId>,
    /// Since when it has been RUNNING and healthy without a break (as steps saw it).
    pub ok_since: Option<Timestamp>,
    /// The last task of this instance counted as a failure (each task counts once).
    pub failed_task: Option<TaskId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateEvent {
    pub at: Timestamp,
    pub text: String,
}

/// One update of one job, from `from_version` to `to_version`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Update {
    pub id: u32,
    pub from_version: u32,
    pub to_version: u32,
    pub by: String,
    pub started_at: Timestamp,
    pub ended_at: Option<Timestamp>,
    pub settings: UpdateSpec,
    pub state: UpdateState,
    /// Who paused it; no new batch starts while set.
    pub paused: Option<String>,
    /// The canaries were promoted (by an operator, or `auto_promote`).
    pub promoted: bool,
    /// Instances still to move to the target version, in order.
    pub todo: Vec<u32>,
    /// The batch in flight.
    pub batch: BTreeMap<u32, InFlight>,
    /// Instances moved and watched.
    pub done: Vec<u32>,
    /// Instances given up on (failed more than `max_per_instance_failures` times).
    pub failed: Vec<u32>,
    /// Failures per instance.
    pub failures: BTreeMap<u32, u32>,
    /// Batches started (canaries count as one).
    pub batches: u32,
    /// Instances the update replaces in all (forward).
    pub total: u32,
    /// Instances added or removed by a change of `instances`.
    pub added: Vec<u32>,
    pub removed: Vec<u32>,
    /// Where it stands, in words (what it waits for, why it ended).
    pub message: String,
    pub events: Vec<UpdateEvent>,
}

impl Update {
    /// The version instances are being moved to.
    pub fn target(&self) -> u32 {
        if self.state == UpdateState::RollingBack || self.state == UpdateState::RolledBack {
            self.from_version
        } else {
            self.to_version
        }
    }

    /// Instances in the first batch: the canaries.
    fn canaries(&self) -> u32 {
        self.settings.canaries
    }

    fn note(&mut self, at: Timestamp, text: String) {
        if self.events.len() >= UPDATE_EVENTS_MAX {
            self.events.remove(1);
        }
        self.events.push(UpdateEvent { at, text });
    }
}

/// Operator actions on an update in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateAction {
    Promote,
    Pause,
    Resume,
    Abort,
    Rollback,
}

impl UpdateAction {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateAction::Promote => "promote",
            UpdateAction::Pause => "pause",
            UpdateAction::Resume => "resume",
            UpdateAction::Abort => "abort",
            UpdateAction::Rollback => "rollback",
        }
    }
}

impl std::str::FromStr for UpdateAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "promote" => UpdateAction::Promote,
            "pause" => UpdateAction::Pause,
            "resume" => UpdateAction::Resume,
            "abort" => UpdateAction::Abort,
            "rollback" => UpdateAction::Rollback,
            other => {
                return Err(format!("no update action \"{other}\"; use promote, pause, resume, abort or rollback"))
            }
        })
    }
}

/// The parts of a spec that an instance's task is made of: a change here replaces the instance.
/// Everything else (instances, priority, placement policy, replace_after, update settings…)
/// applies to the job at once, without restarting anything.
pub fn instance_spec_differs(a: &JobSpec, b: &JobSpec) -> bool {
    a.task != b.task || a.health_check != b.health_check || a.constraint != b.constraint
}

impl Job {
    /// The spec of a version of this job; the job's own for an unknown version.
    pub fn spec_for(&self, version: u32) -> &Arc<JobSpec> {
        if version == self.version {
            return &self.spec;
        }
        self.updates.specs.get(&version).unwrap_or(&self.spec)
    }
}

/// A task counts as up when it runs, is to run, and is healthy (`Some(true)` when its job has a
/// health check, not `Some(false)` otherwise).
fn up(t: &Task, spec: &JobSpec) -> bool {
    t.state == TaskState::Running
        && t.desired == capstan_model::Desired::Run
        && if spec.health_check.is_some() { t.healthy == Some(true) } else { t.healthy != Some(false) }
}

/// What a step of the update decides, before anything changes.
struct Plan {
    update: Update,
    /// Instances to move to the target version now (kill and start anew).
    replace: Vec<u32>,
    /// Start the rollback (with this reason).
    rollback: Option<String>,
    /// End the update.
    end: Option<(UpdateState, String)>,
}

/// The step the update of `job` would take at `at`, on a copy. `None`: no update.
fn plan_step(state: &ClusterState, job: &Job, at: Timestamp) -> Option<Plan> {
    let mut u = job.updates.active.clone()?;
    let mut plan = Plan { update: u.clone(), replace: vec![], rollback: None, end: None };
    if job.killed.is_some() {
        plan.end = Some((UpdateState::Aborted, "the job was killed".into()));
        return Some(plan);
    }
    let target = u.target();
    let target_spec = job.spec_for(target).clone();
    let watch_ms = u.settings.watch.0;
    let back = u.state == UpdateState::RollingBack;
    // 1. Watch the batch in flight.
    let instances: Vec<u32> = u.batch.keys().copied().collect();
    for i in instances {
        let cur = job.current.get(&i).and_then(|id| state.tasks.get(id));
        let p = u.batch.get_mut(&i).expect("listed");
        let Some(cur) = cur.filter(|t| t.job_version == target) else {
            // The old task is still stopping.
            p.ok_since = None;
            continue;
        };
        if p.task != Some(cur.id) {
            p.task = Some(cur.id);
            p.ok_since = None;
        }
        // Failures of the instance on the target version: the lifecycle counts them on each
        // replacement task (`failures`, 0 for the first task of the version), so one that ended
        // and was replaced between two steps is counted too; plus the current task if it is bad.
        let bad = cur.state.is_terminal() || (cur.state == TaskState::Running && cur.healthy == Some(false));
        let seen = cur.failures + u32::from(bad);
        let counted = u.failures.get(&i).copied().unwrap_or(0);
        if seen > counted {
            u.failures.insert(i, seen);
            let why = if bad && !cur.state.is_terminal() {
                "unhealthy".to_string()
            } else if bad {
                cur.reason().to_string()
            } else {
                format!("task {} restarts it", cur.id)
            };
            u.note(at, format!("instance {i}: failed on version {target} ({why}); {seen} failure(s)"));
            if !back && seen > u.settings.max_per_instance_failures {
                u.batch.remove(&i);
                u.failed.push(i);
                continue;
            }
        }
        let p = u.batch.get_mut(&i).expect("listed");
        if bad {
            p.ok_since = None;
            p.failed_task = Some(cur.id);
            continue;
        }
        if up(cur, &target_spec) {
            let since = *p.ok_since.get_or_insert(at);
            if at.since(since) >= watch_ms {
                u.batch.remove(&i);
                u.done.push(i);
                u.note(at, format!("instance {i}: task {} up on version {target} for {}", cur.id, u.settings.watch));
            }
        } else {
            p.ok_since = None;
        }
    }
    // 2. Failure limits (going forward only: a rollback goes on until the old version is back).
    let frozen = state.frozen.is_some();
    if !back && u.failed.len() as u32 > u.settings.max_total_failures {
        let why = format!(
            "{} instance(s) failed ({}), more than max_total_failures = {}",
            u.failed.len(),
            u.failed.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", "),
            u.settings.max_total_failures
        );
        if !u.settings.rollback_on_failure {
            plan.update = u;
            plan.end = Some((UpdateState::Failed, why));
            return Some(plan);
        }
        if frozen {
            u.message = format!("{why}; the rollback waits: the cluster is frozen");
        } else {
            plan.update = u;
            plan.rollback = Some(format!("{why}; rolling back"));
            return Some(plan);
        }
        plan.update = u;
        return Some(plan);
    }
    // 3. The batch is over: the next one, a promotion wait, or the end.
    if u.batch.is_empty() {
        if u.todo.is_empty() {
            let (end, text) = if back {
                (UpdateState::RolledBack, format!("rolled back: every instance is on version {target} again"))
            } else if u.failed.is_empty() {
                (UpdateState::Succeeded, format!("every instance is on version {target}"))
            } else {
                (UpdateState::Succeeded, format!("done; instance(s) {:?} failed within max_total_failures", u.failed))
            };
            plan.update = u;
            plan.end = Some((end, text));
            return Some(plan);
        }
        let canary_phase_over = !back && u.canaries() > 0 && u.batches == 1;
        if u.state == UpdateState::Rolling && canary_phase_over && !u.promoted && !u.settings.auto_promote {
            u.state = UpdateState::AwaitingPromote;
            u.message = format!("{} canary instance(s) are up on version {target}; waiting for promote", u.canaries());
            u.note(at, "canaries up; waiting for `capstan job update promote`".into());
        } else if u.state == UpdateState::AwaitingPromote {
            // waits
        } else if let Some(by) = u.paused.clone() {
            u.message = format!("paused by {by}");
        } else if frozen {
            u.message = "waiting: the cluster is frozen; no instance is replaced until it is unfrozen".into();
        } else {
            let n = if !back && u.canaries() > 0 && u.batches == 0 { u.canaries() } else { u.settings.batch_size };
            let n = (n.max(1) as usize).min(u.todo.len());
            let batch: Vec<u32> = u.todo.drain(..n).collect();
            u.batches += 1;
            for i in &batch {
                u.batch.insert(*i, InFlight::default());
            }
            let what = if !back && u.canaries() > 0 && u.batches == 1 { "canary batch" } else { "batch" };
            u.note(at, format!("{what} {}: replacing instance(s) {batch:?} with version {target}", u.batches));
            u.message = format!("{what} {}: instance(s) {batch:?} to version {target}", u.batches);
            plan.replace = batch;
        }
    } else {
        let what = if back { "rolling back" } else { "rolling" };
        let batch: Vec<u32> = u.batch.keys().copied().collect();
        u.message = format!("{what}: batch {} (instance(s) {batch:?}) to version {target}", u.batches);
    }
    plan.update = u;
    Some(plan)
}

/// Whether an `UpdateStep` for `job` at `at` would change anything: the updater loop asks this
/// under the read lock and only then sends the command.
pub fn step_needed(state: &ClusterState, job: &Job, at: Timestamp) -> bool {
    match plan_step(state, job, at) {
        None => false,
        Some(p) => {
            !p.replace.is_empty()
                || p.rollback.is_some()
                || p.end.is_some()
                || Some(&p.update) != job.updates.active.as_ref()
        }
    }
}

impl ClusterState {
    /// `StartUpdate`: the job moves to `spec` as a new version. Instances whose task spec is
    /// unchanged keep their task (and take the new version); new instances start at once; surplus
    /// instances stop; the others are replaced batch by batch by `UpdateStep`s.
    pub(crate) fn start_update(
        &mut self,
        spec: &JobSpec,
        by: &str,
        seed: u64,
        at: Timestamp,
        out: &mut Applied,
    ) -> Result<(), Rejection> {
        let job = self.jobs.get(&spec.job).ok_or_else(|| Rejection::NoSuchJob(spec.job.clone()))?;
        if job.killed.is_some() {
            return Err(Rejection::JobKilled(spec.job.clone()));
        }
        if job.spec.job_type != JobType::Service || spec.job_type != JobType::Service {
            return Err(Rejection::Invalid(format!(
                "only service jobs can be updated in place ({} is {}, the new spec {}); kill the job and create it again",
                spec.job,
                job.spec.job_type.as_str(),
                spec.job_type.as_str()
            )));
        }
        if let Some(u) = &job.updates.active {
            return Err(Rejection::Conflict(format!(
                "update {} of {} (version {} to {}) is {}; wait for it, or abort or roll it back first",
                u.id,
                spec.job,
                u.from_version,
                u.to_version,
                u.state.as_str()
            )));
        }
        let old_n = job.spec.instances;
        if spec.instances < old_n {
            self.refuse_if_frozen()?;
        }
        if spec.production {
            self.check_update_quota(&spec.job, spec)?;
        }
        let from = job.version;
        let to = job.updates.latest_version.max(job.version) + 1;
        let key = spec.job.clone();
        let j = self.jobs.get_mut(&key).expect("checked");
        let old_spec = j.spec.clone();
        j.updates.specs.insert(from, old_spec);
        j.spec = Arc::new(spec.clone());
        j.version = to;
        j.updates.latest_version = to;
        j.updates.count += 1;
        let id = j.updates.count;
        let settings = spec.update.clone().unwrap_or(DEFAULT_UPDATE);
        let (todo, adopted) = self.instances_to_move(&key, to);
        let (added, removed) = self.resize(&key, old_n, spec.instances, to, seed, at, out);
        let mut u = Update {
            id,
            from_version: from,
            to_version: to,
            by: by.to_string(),
            started_at: at,
            ended_at: None,
            settings,
            state: UpdateState::Rolling,
            paused: None,
            promoted: false,
            total: todo.len() as u32,
            todo,
            batch: BTreeMap::new(),
            done: vec![],
            failed: vec![],
            failures: BTreeMap::new(),
            batches: 0,
            added,
            removed,
            message: String::new(),
            events: vec![],
        };
        u.note(
            at,
            format!(
                "update {id} by {by}: version {from} to {to}; {} instance(s) to replace, {adopted} unchanged, {} added, {} removed",
                u.total,
                u.added.len(),
                u.removed.len()
            ),
        );
        let j = self.jobs.get_mut(&key).expect("checked");
        if u.todo.is_empty() {
            u.message = format!(
                "no instance's task changed: nothing replaced ({} added, {} removed)",
                u.added.len(),
                u.removed.len()
            );
            u.state = UpdateState::Succeeded;
            u.ended_at = Some(at);
            push_history(&mut j.updates, u);
            self.prune_specs(&key);
        } else {
            u.message = "starting".into();
            j.updates.active = Some(u);
        }
        Ok(())
    }

    /// `UpdateStep`: one step of the job's update at `at` (see `plan_step`).
    pub(crate) fn update_step(&mut self, key: &JobKey, at: Timestamp, out: &mut Applied) -> Result<(), Rejection> {
        let job = self.jobs.get(key).ok_or_else(|| Rejection::NoSuchJob(key.clone()))?;
        if !step_needed(self, job, at) {
            return Err(Rejection::Invalid(format!("the update of {key} has nothing to do now")));
        }
        let plan = plan_step(self, job, at).expect("step_needed");
        let target = plan.update.target();
        self.jobs.get_mut(key).expect("exists").updates.active = Some(plan.update);
        if let Some((end, why)) = plan.end {
            self.end_update(key, end, why, at);
            return Ok(());
        }
        if let Some(why) = plan.rollback {
            self.start_rollback(key, why, at, out);
            return Ok(());
        }
        for i in plan.replace {
            self.move_instance(key, i, target, at, out);
        }
        Ok(())
    }

    /// `UpdateControl`: promote, pause, resume, abort or roll back the job's update.
    pub(crate) fn update_control(
        &mut self,
        key: &JobKey,
        action: UpdateAction,
        by: &str,
        at: Timestamp,
        out: &mut Applied,
    ) -> Result<(), Rejection> {
        let job = self.jobs.get_mut(key).ok_or_else(|| Rejection::NoSuchJob(key.clone()))?;
        let Some(u) = job.updates.active.as_mut() else {
            return Err(Rejection::Conflict(format!("{key} has no update in progress")));
        };
        let refuse = |u: &Update| {
            Err(Rejection::Conflict(format!(
                "update {} of {key} is {}{}: cannot {}",
                u.id,
                u.state.as_str(),
                if u.paused.is_some() { " (paused)" } else { "" },
                action.as_str()
            )))
        };
        match action {
            UpdateAction::Promote => {
                if u.state != UpdateState::AwaitingPromote {
                    return refuse(u);
                }
                u.state = UpdateState::Rolling;
                u.promoted = true;
                u.message = format!("promoted by {by}");
                u.note(at, format!("promoted by {by}"));
            }
            UpdateAction::Pause => {
                if u.paused.is_some() {
                    return refuse(u);
                }
                u.paused = Some(by.to_string());
                u.message = format!("paused by {by}");
                u.note(at, format!("paused by {by}: no new batch starts"));
            }
            UpdateAction::Resume => {
                if u.paused.is_none() {
                    return refuse(u);
                }
                u.paused = None;
                u.message = format!("resumed by {by}");
                u.note(at, format!("resumed by {by}"));
            }
            UpdateAction::Abort => {
                self.end_update(key, UpdateState::Aborted, format!("aborted by {by}"), at);
            }
            UpdateAction::Rollback => {
                if u.state == UpdateState::RollingBack {
                    return refuse(u);
                }
                crate::state::unfrozen(&self.frozen)?;
                u.paused = None;
                self.start_rollback(key, format!("rollback asked by {by}"), at, out);
            }
        }
        Ok(())
    }

    /// Instances not on version `target`: those whose task spec differs are returned (to replace,
    /// in instance order); the others take the version in place (no restart). Also returns how
    /// many took it in place.
    fn instances_to_move(&mut self, key: &JobKey, target: u32) -> (Vec<u32>, usize) {
        let job = &self.jobs[key];
        let target_spec = job.spec_for(target).clone();
        let n = target_spec.instances;
        let mut todo = vec![];
        let mut adopt = vec![];
        for (&i, id) in job.current.range(..n) {
            let Some(t) = self.tasks.get(id) else { continue };
            if t.job_version == target {
                continue;
            }
            if instance_spec_differs(job.spec_for(t.job_version), &target_spec) {
                todo.push(i);
            } else {
                adopt.push(*id);
            }
        }
        let adopted = adopt.len();
        for id in adopt {
            if let Some(t) = self.tasks.get_mut(&id) {
                t.job_version = target;
            }
        }
        (todo, adopted)
    }

    /// A change of `instances`: new instances start at once on `version`; surplus ones stop (their
    /// tasks are not replaced, the restart rule skips instances past the count).
    #[allow(clippy::too_many_arguments)]
    fn resize(
        &mut self,
        key: &JobKey,
        old_n: u32,
        new_n: u32,
        version: u32,
        seed: u64,
        at: Timestamp,
        out: &mut Applied,
    ) -> (Vec<u32>, Vec<u32>) {
        let mut added = vec![];
        let mut removed = vec![];
        let mut next = seed;
        for i in old_n..new_n {
            if self.jobs[key].current.get(&i).and_then(|id| self.tasks.get(id)).is_some_and(|t| !t.state.is_terminal())
            {
                continue;
            }
            next = capstan_model::derive_id(next);
            let id = self.fresh_id(next);
            self.create_task(id, key, i, version, 0, at, at);
            out.created.push(id);
            out.new_pending = true;
            added.push(i);
        }
        let surplus: Vec<(u32, TaskId)> = self.jobs[key].current.range(new_n..).map(|(i, id)| (*i, *id)).collect();
        for (i, id) in surplus {
            let live = self.tasks.get(&id).is_some_and(|t| !t.state.is_terminal());
            if live {
                let by = format!("instance {i} removed: the job now has {new_n} instances");
                self.step(id, &Event::Kill { by }, at, out);
                removed.push(i);
            }
            self.jobs.get_mut(key).expect("exists").current.remove(&i);
        }
        (added, removed)
    }

    /// Moves one instance to `version`: its task stops ("updating to version N") and a task of
    /// that version starts once it ended (at once if it was not running).
    fn move_instance(&mut self, key: &JobKey, i: u32, version: u32, at: Timestamp, out: &mut Applied) {
        let Some(&id) = self.jobs[key].current.get(&i) else {
            // No task (removed): start one.
            let id = self.fresh_id(capstan_model::derive_id(u64::from(i) ^ at.0 ^ self.task_seq));
            self.create_task(id, key, i, version, 0, at, at);
            out.new_pending = true;
            return;
        };
        let Some(t) = self.tasks.get(&id) else { return };
        if t.job_version == version && !t.state.is_terminal() {
            return;
        }
        if t.state.is_terminal() {
            self.restart_instance(id, 0, 0, at, out);
            return;
        }
        let verb = if version < t.job_version { "rolling back" } else { "updating" };
        let by = format!("{verb} to version {version}");
        self.step(id, &Event::Kill { by }, at, out);
        let Some(t) = self.tasks.get_mut(&id) else { return };
        t.restart_when_stopped = true;
        if t.state.is_terminal() {
            self.restart_instance(id, 0, 0, at, out);
        }
    }

    /// The version a new task of instance `i` gets: the update's target while the instance is in
    /// its batch in flight, else `previous` (the version of the task it replaces).
    pub(crate) fn version_for_restart(&self, job: &Job, i: u32, previous: u32) -> u32 {
        match &job.updates.active {
            Some(u) if u.batch.contains_key(&i) => u.target(),
            _ => previous,
        }
    }

    fn start_rollback(&mut self, key: &JobKey, why: String, at: Timestamp, out: &mut Applied) {
        let j = self.jobs.get_mut(key).expect("exists");
        let mut u = j.updates.active.take().expect("active update");
        let from = u.from_version;
        // The job's spec is the old one again; the new one stays known for tasks that still run it.
        let new_spec = j.spec.clone();
        let old_spec = j.updates.specs.get(&from).cloned().unwrap_or_else(|| new_spec.clone());
        j.updates.specs.insert(j.version, new_spec.clone());
        j.spec = old_spec.clone();
        j.version = from;
        u.state = UpdateState::RollingBack;
        u.paused = None;
        u.note(at, why.clone());
        u.message = why;
        // The batch in flight goes back first, as the rollback's first batch (it is down anyway,
        // and an instance whose old task is still stopping must be counted in it); then the rest.
        // Instances given up on are down too: they go back in that batch.
        let mut in_flight: Vec<u32> = u.batch.keys().chain(u.failed.iter()).copied().collect();
        in_flight.sort_unstable();
        in_flight.dedup();
        u.batch = in_flight.iter().map(|i| (*i, InFlight::default())).collect();
        u.batches = u32::from(!in_flight.is_empty());
        u.todo.clear();
        u.done.clear();
        j.updates.active = Some(u);
        let (added, removed) = self.resize(key, new_spec.instances, old_spec.instances, from, at.0, at, out);
        let (todo, _) = self.instances_to_move(key, from);
        let j = self.jobs.get_mut(key).expect("exists");
        let u = j.updates.active.as_mut().expect("active");
        u.todo = todo.into_iter().filter(|i| !in_flight.contains(i)).collect();
        if !added.is_empty() || !removed.is_empty() {
            u.note(at, format!("rollback: instance(s) {added:?} added back, {removed:?} removed"));
        }
        if in_flight.is_empty() {
            // Starts the first rollback batch at once.
            let _ = self.update_step(key, at, out);
        } else {
            u.note(at, format!("batch 1: putting instance(s) {in_flight:?} back on version {from}"));
            for i in in_flight {
                self.move_instance(key, i, from, at, out);
            }
        }
    }

    fn end_update(&mut self, key: &JobKey, end: UpdateState, why: String, at: Timestamp) {
        let j = self.jobs.get_mut(key).expect("exists");
        let Some(mut u) = j.updates.active.take() else { return };
        u.state = end;
        u.ended_at = Some(at);
        u.note(at, format!("{}: {why}", end.as_str()));
        u.message = why;
        push_history(&mut j.updates, u);
        self.prune_specs(key);
    }

    /// Forgets specs of versions that no live task of the job uses (and no update needs).
    fn prune_specs(&mut self, key: &JobKey) {
        let Some(j) = self.jobs.get(key) else { return };
        let mut keep: BTreeSet<u32> =
            self.tasks_of(j).filter(|t| !t.state.is_terminal()).map(|t| t.job_version).collect();
        if let Some(u) = &j.updates.active {
            keep.insert(u.from_version);
            keep.insert(u.to_version);
        }
        let version = j.version;
        let j = self.jobs.get_mut(key).expect("exists");
        j.updates.specs.retain(|v, _| *v != version && keep.contains(v));
    }

    /// The production quota of the job's role with the job at `spec` instead of its current spec.
    fn check_update_quota(&self, key: &JobKey, spec: &JobSpec) -> Result<(), Rejection> {
        if !self.quotas.contains_key(&key.role) {
            return Ok(());
        }
        self.clone_light_without(key).check_quota(&key.role, &spec.task.demand(), spec.instances)
    }

    fn clone_light_without(&self, key: &JobKey) -> ClusterState {
        let mut s = ClusterState { quotas: self.quotas.clone(), ..Default::default() };
        for (k, j) in &self.jobs {
            if k != key && j.spec.production && j.spec.job.role == key.role {
                s.jobs.insert(k.clone(), j.clone());
            }
        }
        s
    }
}

fn push_history(updates: &mut JobUpdates, u: Update) {
    if updates.history.len() >= UPDATE_HISTORY_MAX {
        updates.history.remove(0);
    }
    updates.history.push(u);
}
