//! Commands: every change to cluster state is one of these, written to the log before it is
//! acknowledged and applied by `apply`. They carry everything apply needs (time, seeds), so that
//! replaying the log rebuilds exactly the same state.

use crate::agent::AgentInfo;
use capstan_model::{AgentId, JobKey, JobSpec, TaskExit, TaskId, Timestamp};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

// CreateJob carries a whole spec; commands are short-lived and few at a time, so the size
// difference costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// An agent (re-)registers with what it offers.
    RegisterAgent { info: AgentInfo },
    /// What an agent has, after it (re-)registered or when a heartbeat shows the master and the
    /// agent disagree; makes the agent active. `known`: every task it has (running or ended and
    /// not yet reported); `running`: those whose process runs. Tasks the master has starting or
    /// running there that the agent does not know are lost; tasks that run there without the
    /// master wanting them become strays. `as_of_seq`: the agent's newest status update when it
    /// took the lists; lists older than what the master applied are not compared (`None`: a
    /// registration, always compared).
    AgentReconcile { agent: AgentId, known: Vec<TaskId>, running: Vec<TaskId>, as_of_seq: Option<u64> },
    /// Agents not heard from within the agent timeout: marked unreachable (cheap, not destructive).
    AgentsUnreachable { agents: Vec<AgentId> },
    /// One (rate-limited) removal step of an unreachable agent: its tasks whose job's
    /// `replace_after` has passed are LOST and replaced elsewhere.
    RemoveAgent { agent: AgentId },
    /// The big red button: `Some` stops every destructive action cluster-wide; `None` resumes.
    SetFreeze { freeze: Option<Freeze> },
    /// A new job; its tasks get ids derived from `seed`.
    CreateJob { spec: JobSpec, seed: u64 },
    /// Stop every task of the job in one command; the job disappears once they all ended (see
    /// `KillJobSlice`, which masters send now: a kill of a large job in bounded steps).
    KillJob { job: JobKey, by: String },
    /// Stop one task; a service instance gets a fresh task (a restart), a batch instance ends.
    KillTask { task: TaskId, by: String },
    /// A plan from the scheduler; each placement is re-checked against the state before it takes.
    Place { placements: Vec<Placement> },
    /// Stop lower-priority tasks so that a production task can run (from the scheduler's plan).
    Preempt { preemptions: Vec<Preemption> },
    /// Sets (or with `None` removes) the production quota of a role.
    SetQuota { role: String, quota: Option<Quota> },
    /// Operator settings of the scheduler.
    SetSchedulerSettings { settings: SchedulerSettings },
    /// Status updates from one agent, in the order the agent produced them.
    AgentUpdates { agent: AgentId, updates: Vec<StatusUpdate> },
    /// A run of a cron job: for the fire time `scheduled_at` (from the master's cron loop, which
    /// collapsed `missed` earlier fire times into it), or `None`: by hand (`capstan job start`).
    /// Applies the job's collision policy; the run's task ids derive from `seed`.
    StartCronRun { job: JobKey, scheduled_at: Option<Timestamp>, missed: u32, seed: u64, by: String },
    /// Take an agent out of service: nothing new is placed there and the drain loop moves its
    /// service tasks away within each job's `min_healthy`. Repeating it changes nothing.
    DrainAgent { agent: AgentId, by: String },
    /// The agent takes new tasks again.
    UndrainAgent { agent: AgentId, by: String },
    /// One step of the drain loop: stop these tasks of draining agents so that their instances
    /// start elsewhere; each is checked again against its job's `min_healthy` (and dropped if it
    /// no longer may move). Refused while frozen.
    DrainMoves { moves: Vec<TaskId> },
    /// Nothing that must leave the draining agent is left on it; refused otherwise.
    MarkDrained { agent: AgentId },
    /// Planned maintenance: the scheduler keeps new long-running tasks off these agents from
    /// `crate::drain::MAINTENANCE_HORIZON_MS` before `start`, and every new task during it.
    ScheduleMaintenance { agents: Vec<AgentId>, start: Timestamp, duration_ms: u64, by: String },
    /// Drop a maintenance window.
    CancelMaintenance { id: u64, by: String },
    /// A rolling update of a service job to `spec` (a new version), asked by `by`; new instances'
    /// tasks get ids derived from `seed`.
    StartUpdate { spec: JobSpec, by: String, seed: u64 },
    /// One step of a job's update at the stamped time: watch the batch in flight, start the next
    /// batch, roll back or end (sent by the master's updater loop when it would change something).
    UpdateStep { job: JobKey },
    /// An operator's promote, pause, resume, abort or rollback of a job's update.
    UpdateControl { job: JobKey, action: crate::updates::UpdateAction, by: String },
    /// A master became the leader: its term's epoch, greater than every earlier one. The first
    /// command of every term; a master whose `BeginTerm` is not durable does not lead.
    BeginTerm { epoch: u64 },
    /// Stop the next slice of a job's tasks: marks the job killed (its tasks are no longer
    /// replaced or placed) and stops the current task of at most `instances_max` instances, those
    /// from `from_instance` on. A kill of a large job is many of these, each its own durable step,
    /// so the writer serves other commands between slices: `DELETE /v1/jobs/…` sends the first,
    /// the master's reaper loop the next ones (from `Applied::kill_next`) until none is left, also
    /// after a restart or a failover (from instance 0 again; tasks already stopping are skipped).
    /// Added in format 5; masters before it sent `KillJob`, which stops every task at once.
    KillJobSlice { job: JobKey, by: String, from_instance: u32, instances_max: u32 },
    /// Forget the ended tasks of at most `instances_max` instances of a job that is over (killed,
    /// or a finished batch job, with no live task), and the job itself with the last of them.
    /// Sent by the master's reaper loop (killed jobs at once, finished batch jobs after their
    /// retention period). Added in format 5.
    ForgetJobSlice { job: JobKey, instances_max: u32 },
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::RegisterAgent { .. } => "register_agent",
            Command::AgentReconcile { .. } => "agent_reconcile",
            Command::AgentsUnreachable { .. } => "agents_unreachable",
            Command::RemoveAgent { .. } => "remove_agent",
            Command::SetFreeze { .. } => "set_freeze",
            Command::CreateJob { .. } => "create_job",
            Command::KillJob { .. } => "kill_job",
            Command::KillTask { .. } => "kill_task",
            Command::Place { .. } => "place",
            Command::Preempt { .. } => "preempt",
            Command::SetQuota { .. } => "set_quota",
            Command::SetSchedulerSettings { .. } => "set_scheduler_settings",
            Command::AgentUpdates { .. } => "agent_updates",
            Command::StartCronRun { .. } => "start_cron_run",
            Command::DrainAgent { .. } => "drain_agent",
            Command::UndrainAgent { .. } => "undrain_agent",
            Command::DrainMoves { .. } => "drain_moves",
            Command::MarkDrained { .. } => "mark_drained",
            Command::ScheduleMaintenance { .. } => "schedule_maintenance",
            Command::CancelMaintenance { .. } => "cancel_maintenance",
            Command::StartUpdate { .. } => "start_update",
            Command::UpdateStep { .. } => "update_step",
            Command::UpdateControl { .. } => "update_control",
            Command::BeginTerm { .. } => "begin_term",
            Command::KillJobSlice { .. } => "kill_job_slice",
            Command::ForgetJobSlice { .. } => "forget_job_slice",
        }
    }
}

/// A command as it is logged: stamped with the time the master accepted it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stamped {
    pub at: Timestamp,
    pub command: Command,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub task: TaskId,
    pub agent: AgentId,
    /// One port per name in the task spec, in the spec's order.
    pub ports: Vec<u16>,
}

/// One change an agent saw; `seq` grows by one per update of that agent, which lets the master
/// drop duplicates of an at-least-once delivery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusUpdate {
    pub seq: u64,
    pub task: TaskId,
    pub report: Report,
    /// The agent's clock when it saw the change.
    pub at: Timestamp,
}

/// Tagged by `kind` in JSON; read back field by field from the stored (postcard) form, which cannot
/// read serde's tagged enums (see `capstan_model::TaskExit`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", tag = "kind", rename_all = "snake_case")]
pub enum Report {
    Starting,
    Running {
        pid: u32,
    },
    Exited {
        exit: TaskExit,
    },
    /// The task's health check passed, or failed `consecutive_failures` times in a row.
    Health {
        healthy: bool,
        reason: String,
    },
}

impl Serialize for Report {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Report::serialize(self, s)
    }
}

impl<'de> Deserialize<'de> for Report {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            Report::deserialize(d)
        } else {
            d.deserialize_struct("Report", &["kind", "field1", "field2"], CompactReport)
        }
    }
}

/// `kind`, then the variant's fields in order: the derived tagged form as postcard writes it.
struct CompactReport;

impl<'de> Visitor<'de> for CompactReport {
    type Value = Report;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a status report: kind, then its fields")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Report, A::Error> {
        fn next<'de, A: SeqAccess<'de>, T: Deserialize<'de>>(seq: &mut A, i: usize) -> Result<T, A::Error> {
            seq.next_element()?.ok_or_else(|| de::Error::invalid_length(i, &CompactReport))
        }
        let kind: String = next(&mut seq, 0)?;
        Ok(match kind.as_str() {
            "starting" => Report::Starting,
            "running" => Report::Running { pid: next(&mut seq, 1)? },
            "exited" => Report::Exited { exit: next(&mut seq, 1)? },
            "health" => Report::Health { healthy: next(&mut seq, 1)?, reason: next(&mut seq, 2)? },
            other => return Err(de::Error::unknown_variant(other, &["starting", "running", "exited", "health"])),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preemption {
    pub victim: TaskId,
    /// The production task that needs the room.
    pub by: TaskId,
}

/// What the production jobs of one role may hold at most, in total.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub cpus_milli: u64,
    pub mem_bytes: u64,
    pub disk_bytes: u64,
}

/// Who froze the cluster, why, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freeze {
    pub reason: String,
    pub by: String,
    pub at: Timestamp,
}

/// Levers an operator pulls at run time; kept in the state so they survive restarts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerSettings {
    /// At most this many placements per second; `None` is unlimited.
    pub max_placements_per_second: Option<u32>,
}

#[cfg(test)]
mod report_codec_tests {
    use super::*;
    use capstan_model::{TaskId, Timestamp};

    /// Every report kind, with every field, reads back from the logged form: a master restarted
    /// after a health report must be able to replay it.
    #[test]
    fn every_report_kind_reads_back_from_the_log() {
        let reports = vec![
            Report::Starting,
            Report::Running { pid: 42 },
            Report::Exited { exit: TaskExit::Exited { code: 3 } },
            Report::Health { healthy: false, reason: "GET /health: 503".into() },
            Report::Health { healthy: true, reason: String::new() },
        ];
        let updates: Vec<StatusUpdate> = reports
            .into_iter()
            .enumerate()
            .map(|(i, report)| StatusUpdate { seq: i as u64 + 1, task: TaskId(7), report, at: Timestamp(1) })
            .collect();
        let c = Stamped { at: Timestamp(5), command: Command::AgentUpdates { agent: AgentId(1), updates } };
        assert_eq!(crate::decode_command(&crate::encode_command(&c)).unwrap(), c);
    }
}
