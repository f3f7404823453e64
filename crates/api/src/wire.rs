//! Wire types of the public API (`/v1/...`) and of the agent protocol (`/v1/agent/...`).

use capstan_model::{AgentId, Desired, JobKey, TaskExit, TaskId, TaskSpec, TaskState, Timestamp};
use capstan_state::{AgentInfo, StatusUpdate};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `{"error": {"code": "...", "message": "...", "details": [...]}}` on every 4xx/5xx.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable, for scripts: `invalid_job`, `job_exists`, `not_found`, `bad_request`, `unavailable`, `internal`.
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub details: Vec<serde_json::Value>,
}

/// Renders a timestamp as RFC 3339 with milliseconds (UTC).
pub fn rfc3339(t: Timestamp) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(t.0)).to_string()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreatedJob {
    pub job: JobKey,
    pub tasks: Vec<TaskId>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobView {
    pub job: JobKey,
    #[serde(rename = "type")]
    pub job_type: String,
    /// `running` (every instance runs), `deploying` (some are not running yet), `finished`,
    /// `failed` (batch: an instance failed for good), `killing`.
    pub status: String,
    pub instances: u32,
    pub version: u32,
    pub created_at: String,
    pub finished_at: Option<String>,
    /// Batch: how long the job took from creation to its last instance.
    pub duration_ms: Option<u64>,
    /// Tasks of the current instances, by state.
    pub tasks: BTreeMap<String, u64>,
    /// Why instances wait, when they do ("no agent has room: …").
    pub pending_reasons: Vec<String>,
    pub spec: capstan_model::JobSpec,
    /// Cron jobs: the schedule, the next fire time and the latest runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<CronView>,
    /// The rolling update in progress, if any (`GET /v1/jobs/{key}/update` has the history too).
    #[serde(default)]
    pub update: Option<UpdateView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskEventView {
    pub at: String,
    pub state: TaskState,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskView {
    pub id: TaskId,
    pub job: JobKey,
    pub instance: u32,
    pub state: TaskState,
    pub desired: Desired,
    pub agent_id: Option<AgentId>,
    pub host: Option<String>,
    pub ports: BTreeMap<String, u16>,
    pub pid: Option<u32>,
    /// `healthy` or `unhealthy` while it runs with a health check; absent otherwise.
    pub health: Option<String>,
    pub reason: String,
    pub exit: Option<TaskExit>,
    /// The latest resource usage its agent reported (kept in the master's memory only).
    pub usage: Option<TaskUsage>,
    /// Consecutive failures of the instance before this task.
    pub failures: u32,
    pub created_at: String,
    /// Set while the task waits out a restart backoff.
    pub not_before: Option<String>,
    pub events: Vec<TaskEventView>,
    /// The job version whose spec this task runs.
    #[serde(default)]
    pub version: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResourcesView {
    pub cpus: f64,
    pub mem: capstan_model::ByteSize,
    pub disk: capstan_model::ByteSize,
    pub ports: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentView {
    pub id: AgentId,
    pub hostname: String,
    pub address: String,
    pub version: String,
    pub registered_at: String,
    pub attributes: BTreeMap<String, String>,
    pub capacity: ResourcesView,
    pub used: ResourcesView,
    pub tasks: usize,
    /// `active`, `unreachable`, `removed`, or `reregistering` (a master that just started has not
    /// heard from it yet).
    #[serde(default)]
    pub liveness: String,
    /// When this master last heard from it (RFC 3339), if it has since it started.
    #[serde(default)]
    pub last_seen: Option<String>,
    /// When it was marked unreachable (RFC 3339), while it is unreachable or removed.
    #[serde(default)]
    pub unreachable_since: Option<String>,
    /// Set while it is draining or drained (`capstan agent drain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainView>,
    /// The maintenance window that keeps work off it now, in words (`active until …`,
    /// `starts at …`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<String>,
}

// ---- agent protocol

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub info: AgentInfo,
    /// Tasks this agent has (running or ended but not yet reported); the master treats its tasks
    /// that the agent no longer has as lost.
    pub known_tasks: Vec<TaskId>,
    /// The subset of `known_tasks` whose process still runs (not ended).
    #[serde(default)]
    pub running_tasks: Vec<TaskId>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// Changes every time a master starts; orders versions are only comparable within one.
    pub master_epoch: u64,
    /// The highest status-update sequence number the master applied from this agent.
    pub last_update_seq: u64,
    /// How often the agent must send a heartbeat.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
}

fn default_heartbeat_interval_ms() -> u64 {
    5_000
}

/// `POST /v1/agent/{id}/heartbeat`: the agent is alive, and what it has, for periodic
/// reconciliation. The master answers 404 when it does not know the agent (register again) and
/// 503 with `Retry-After` when it sheds load.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub agent: AgentId,
    /// Every task the agent has (running, or ended and not yet collected).
    pub known_tasks: Vec<TaskId>,
    /// The subset of `known_tasks` whose process still runs.
    pub running_tasks: Vec<TaskId>,
    /// The sequence number of the agent's newest status update when it took these lists: the
    /// master does not reconcile against lists older than what it already applied.
    pub as_of_seq: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub master_epoch: u64,
    pub heartbeat_interval_ms: u64,
}

/// What an agent must run. The list is complete: it names every task that holds resources on
/// the agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Orders {
    pub master_epoch: u64,
    pub version: u64,
    pub tasks: Vec<Order>,
    /// Tasks that run on the agent but that the master does not want there (unknown to it past
    /// the grace period, or the surplus copy of an instance): stop them.
    #[serde(default)]
    pub stop: Vec<StopOrder>,
    /// The cluster is frozen: the agent takes no destructive action of its own (health-check kills).
    #[serde(default)]
    pub frozen: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopOrder {
    pub task: TaskId,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Order {
    pub task: TaskId,
    pub job: JobKey,
    pub instance: u32,
    pub desired: Desired,
    pub spec: TaskSpec,
    pub ports: BTreeMap<String, u16>,
    /// The job's health check (it lives on the job spec, not the task spec); the agent runs it
    /// while the task runs and kills the task when it fails.
    #[serde(default)]
    pub health_check: Option<capstan_model::spec::HealthCheckSpec>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpdatesRequest {
    pub agent: AgentId,
    pub updates: Vec<StatusUpdate>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpdatesResponse {
    /// Every update up to this sequence number is durable on the master.
    pub acked_seq: u64,
}

/// Resource usage of one task, as its agent measured it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskUsage {
    pub task: TaskId,
    pub cpu_seconds: f64,
    /// Time the task wanted cpu but its CFS quota held it back.
    pub throttled_seconds: f64,
    pub nr_throttled: u64,
    pub mem_bytes: u64,
    pub mem_peak_bytes: u64,
    pub disk_bytes: u64,
    /// When the agent measured it (RFC 3339).
    pub at: String,
}

/// Periodic usage from one agent: not durable, not ordered; the newest wins.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UsageReport {
    pub agent: AgentId,
    pub tasks: Vec<TaskUsage>,
}

/// A role's production quota and what its production jobs hold (`GET /v1/quotas`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuotaView {
    pub role: String,
    pub quota: ResourcesView,
    pub used: ResourcesView,
}

/// Body of `PUT /v1/quotas/{role}`: `{"cpus": 10, "mem": "64GiB", "disk": "1TiB"}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaRequest {
    pub cpus: f64,
    pub mem: capstan_model::ByteSize,
    pub disk: capstan_model::ByteSize,
}

/// `GET`/`PUT /v1/scheduler`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerView {
    /// At most this many placements per second; null for unlimited.
    pub max_placements_per_second: Option<u32>,
    /// Tasks waiting for a place (read only).
    #[serde(default)]
    pub pending_tasks: u64,
}

// ---- operator controls

/// `POST /v1/admin/freeze`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeRequest {
    pub reason: String,
    /// Who pressed it (the CLI sends `user@host`).
    pub by: String,
}

/// `POST /v1/admin/unfreeze`, `POST /v1/admin/breaker/reset`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorRequest {
    pub by: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FreezeView {
    pub reason: String,
    pub by: String,
    /// RFC 3339.
    pub since: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BreakerView {
    pub tripped: bool,
    /// Why it tripped, in words.
    pub reason: Option<String>,
    /// RFC 3339.
    pub since: Option<String>,
    /// Share of agents that may become unreachable within `window_ms` before it trips.
    pub threshold: f64,
    pub window_ms: u64,
    /// The attribute whose values are fault domains (a whole domain lost trips it too).
    pub fault_domain: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LivenessSettingsView {
    pub heartbeat_interval_ms: u64,
    pub agent_timeout_ms: u64,
    /// e.g. `1/10s`.
    pub agent_removal_rate: String,
    pub reregistration_period_ms: u64,
    pub stray_grace_ms: u64,
}

/// `GET /v1/admin/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminStatus {
    pub frozen: Option<FreezeView>,
    pub breaker: BreakerView,
    /// Until then (RFC 3339) the master waits for agents to re-register before concluding
    /// anything about them; `None` once it is over.
    pub reregistration_until: Option<String>,
    /// Agents by liveness (`active`, `unreachable`, `removed`, `reregistering`).
    pub agents: BTreeMap<String, u64>,
    pub removals_total: u64,
    pub tasks_replaced_total: u64,
    /// Tasks that run on agents without the master wanting them there.
    pub stray_tasks: u64,
    pub settings: LivenessSettingsView,
}

/// One thing that happened to the cluster (not to one task): an agent unreachable, removed or
/// back, the breaker, a freeze, a stray task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    pub seq: u64,
    /// RFC 3339.
    pub at: String,
    /// e.g. `agent_unreachable`, `agent_removed`, `agent_back`, `breaker_tripped`, `breaker_reset`,
    /// `frozen`, `unfrozen`, `stray_task`, `stray_task_stopped`, `master_stalled`.
    pub kind: String,
    pub message: String,
}

/// `GET /v1/events?after=SEQ&wait_ms=N`: events after `after`, oldest first, waiting up to
/// `wait_ms` for one when there is none yet. The master keeps a bounded number of events; a
/// reader that fell behind learns how many it missed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventsPage {
    pub events: Vec<EventView>,
    /// Pass as `after` to read on.
    pub next: u64,
    /// Events after `after` that are no longer kept.
    pub missed: u64,
}

/// The header every mutating API response carries while the cluster is frozen.
pub const FROZEN_HEADER: &str = "capstan-frozen";

/// A cron job's schedule and runs (`JobView::cron`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CronView {
    /// The expression as written.
    pub schedule: String,
    /// The schedule in words.
    pub description: String,
    pub timezone: String,
    /// `KILL_EXISTING` or `CANCEL_NEW`.
    pub collision_policy: String,
    /// RFC 3339; absent when the schedule never fires again.
    pub next_run_at: Option<String>,
    /// The latest fire time handled (run, skipped or missed); RFC 3339.
    pub last_fire_at: String,
    /// The latest runs, newest first (a bounded history).
    pub runs: Vec<CronRunView>,
}

/// One run of a cron job, or one fire time that did not get to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CronRunView {
    pub number: u32,
    /// `WAITING` (for the previous run to stop), `RUNNING`, `SUCCEEDED`, `FAILED`, `KILLED`,
    /// `SKIPPED`.
    pub result: String,
    /// Why, in words.
    pub reason: String,
    /// The fire time it is for (RFC 3339); absent when started by hand.
    pub scheduled_at: Option<String>,
    /// `schedule`, or who started it by hand.
    pub by: String,
    /// Earlier fire times that passed without a run (the master was down) and were collapsed into
    /// this one.
    pub missed: u32,
    pub requested_at: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// From its start (or, skipped, from its request) to its end.
    pub duration_ms: Option<u64>,
    pub tasks: Vec<TaskId>,
}

/// The answer to `POST /v1/jobs/{role}/{env}/{name}/start`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CronStartedView {
    pub job: JobKey,
    /// The run's number.
    pub run: u32,
    /// `RUNNING` (its tasks are created), `WAITING` (the previous run is being killed first,
    /// `KILL_EXISTING`) or `SKIPPED` (`CANCEL_NEW`, or the cluster is frozen).
    pub result: String,
    pub reason: String,
    pub tasks: Vec<TaskId>,
}

// ---- drain and maintenance

/// Where an agent's drain stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrainView {
    /// `draining` or `drained`.
    pub status: String,
    pub by: String,
    pub since: String,
    pub drained_at: Option<String>,
    /// Tasks that must still leave (service tasks to move, tasks stopping, batch tasks running).
    pub tasks_left: u32,
    /// Of those, tasks stopping now.
    pub stopping: u32,
    /// Of those, batch and cron tasks left to finish.
    pub batch_running: u32,
    /// Jobs whose SLA holds a move back now, each in words.
    pub blocked_by: Vec<String>,
    /// Why nothing moves at all (frozen cluster, unreachable agent).
    pub waiting: Option<String>,
    /// All of it in one line.
    pub progress: String,
}

/// `POST /v1/admin/maintenance`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MaintenanceRequest {
    pub agents: Vec<AgentId>,
    /// RFC 3339.
    pub start: String,
    pub duration_ms: u64,
    pub by: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaintenanceView {
    pub id: u64,
    pub agents: Vec<AgentId>,
    pub start: String,
    pub end: String,
    pub duration_ms: u64,
    /// `scheduled`, `starting soon` (new long-running tasks already avoid it), `active`, `ended`.
    pub phase: String,
    pub by: String,
    pub created_at: String,
}

/// `GET /v1/admin/sla/safe-to-drain?percent=P`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SafeToDrainView {
    /// The share (in percent) of its instances a job without `min_healthy` keeps healthy.
    pub percent: f64,
    /// Agents that can be drained now, all together.
    pub safe: Vec<AgentSafetyView>,
    /// The others, each with why not.
    pub not_safe: Vec<AgentSafetyView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentSafetyView {
    pub agent: AgentId,
    pub hostname: String,
    /// Healthy service tasks on it (they would go down with it).
    pub serving_tasks: u32,
    pub reason: Option<String>,
}

// ---- rolling updates

/// `POST /v1/jobs/{key}/update`: the job's new spec (as a job file reads, in JSON) and who asks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpdateRequest {
    pub spec: serde_json::Value,
    pub by: String,
}

/// A job's update in progress and its past ones (`GET /v1/jobs/{key}/update`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobUpdatesView {
    pub job: JobKey,
    /// The job's version now.
    pub version: u32,
    pub active: Option<UpdateView>,
    /// Ended updates, newest first.
    pub history: Vec<UpdateView>,
}

/// One update: who, when, from which version to which, where it stands or how it ended.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpdateView {
    pub id: u32,
    pub job: JobKey,
    pub from_version: u32,
    pub to_version: u32,
    pub by: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub duration_ms: Option<u64>,
    /// `rolling`, `awaiting_promote`, `rolling_back`, `succeeded`, `failed`, `aborted`, `rolled_back`.
    pub state: String,
    pub paused_by: Option<String>,
    /// Where it stands, in words.
    pub message: String,
    pub batch_size: u32,
    pub canaries: u32,
    pub watch_ms: u64,
    pub max_per_instance_failures: u32,
    pub max_total_failures: u32,
    pub rollback_on_failure: bool,
    pub auto_promote: bool,
    /// Batches started, and how many there will be in all at this pace.
    pub batches: u32,
    pub batches_total: u32,
    /// Instances the update replaces in all.
    pub total: u32,
    /// The batch in flight, instance by instance.
    pub batch: Vec<UpdateInstanceView>,
    pub todo: Vec<u32>,
    pub done: Vec<u32>,
    pub failed: Vec<u32>,
    /// Failures per instance (instance as a string key in JSON).
    pub failures: BTreeMap<u32, u32>,
    pub added: Vec<u32>,
    pub removed: Vec<u32>,
    pub events: Vec<UpdateEventView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpdateInstanceView {
    pub instance: u32,
    /// The instance's task now (the old one while it stops, then the new one).
    pub task: Option<TaskId>,
    pub state: Option<TaskState>,
    pub health: Option<String>,
    pub version: Option<u32>,
    /// How long the new task has been up (running and healthy), of `watch_ms`.
    pub up_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpdateEventView {
    pub at: String,
    pub text: String,
}

/// Header on a follower's answers: the leader's URL, or `none` while no master leads.
pub const LEADER_HEADER: &str = "capstan-leader";

/// `GET /v1/leader`, answered by every master: its role and who leads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaderView {
    /// `leader`, `follower`, or `starting` (campaigning or loading the state).
    pub role: String,
    /// This master's URL (`--advertise`).
    pub me: String,
    /// The leader's URL, when one is known.
    pub leader: Option<String>,
    /// The leader's term epoch (`0` while it loads the state, or unknown).
    pub epoch: u64,
    /// The log index of this master's state: the leader's, or a follower's standby copy (etcd;
    /// `0` without one). A follower close to the leader takes over without reading the store.
    #[serde(default)]
    pub index: u64,
    /// Where the state lives (`embedded store at …`, `etcd at …`).
    pub store: String,
    /// When this master's role last changed (RFC 3339).
    pub since: String,
}

// ---- backup and restore (`/v1/admin/backup`, `/v1/admin/restore`, `/v1/admin/dump`)

/// What a backup file says about itself, after it passed every check (`capstan admin backup
/// inspect`, and the answer of a restore).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupInfo {
    pub backup_format_version: u32,
    /// When it was taken: RFC 3339, UTC.
    pub created_at: String,
    pub created_at_ms: u64,
    /// The Capstan that wrote it.
    pub capstan_version: String,
    /// The log index its state is as of, in the store it was taken from.
    pub store_index: u64,
    pub snapshot_format_version: u16,
    pub jobs: u64,
    pub tasks: u64,
    pub agents: u64,
    /// Size of the whole file and its checksum (CRC-32, 8 hex digits).
    pub file_bytes: u64,
    pub checksum: String,
    /// When the state in it had itself been restored from a backup.
    pub restored_from: Option<String>,
}

/// The answer of `POST /v1/admin/restore`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreView {
    /// True: everything was checked and nothing changed.
    pub dry_run: bool,
    /// The log index the state was installed at (none for a dry run).
    pub index: Option<u64>,
    pub backup: BackupInfo,
    /// What the cluster held before (and, with a dry run, still holds).
    pub replaced_jobs: u64,
    pub replaced_tasks: u64,
    pub replaced_agents: u64,
}

/// A list page's answer header: the cursor to pass as `next=` for the following page (absent on
/// the last page). List routes (`/v1/tasks`, `/v1/jobs`) answer one page with `?limit=N`
/// (default 1,000 when only `next` is given, at most 5,000), and the whole list without either.
pub const NEXT_HEADER: &str = "x-capstan-next";

/// An agent's address as the master may use it: `http://HOST:PORT` and nothing more (no user,
/// path, query or fragment). The master calls agents only at this base, on routes it builds itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentAddress {
    /// `http://HOST:PORT`, IPv6 hosts in brackets.
    pub base: String,
}

/// Checks an agent's registered address; the error says what is wrong and what to use instead.
pub fn parse_agent_address(text: &str) -> Result<AgentAddress, String> {
    let hint = "use http://HOST:PORT (the agent's --advertise)";
    let url = reqwest::Url::parse(text).map_err(|e| format!("agent address {text:?} is not a URL ({e}); {hint}"))?;
    if url.scheme() != "http" {
        return Err(format!("agent address {text:?} has scheme {:?}, not http; {hint}", url.scheme()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("agent address {text:?} carries a user or password; {hint}"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!("agent address {text:?} has a path, query or fragment; {hint}"));
    }
    let (Some(host), Some(port)) = (url.host(), url.port_or_known_default()) else {
        return Err(format!("agent address {text:?} has no host or port; {hint}"));
    };
    Ok(AgentAddress { base: format!("http://{host}:{port}") })
}

#[cfg(test)]
mod agent_address_tests {
    use super::parse_agent_address;

    #[test]
    fn only_plain_http_host_port_is_an_agent_address() {
        for (text, base) in [
            ("http://10.0.0.1:7071", "http://10.0.0.1:7071"),
            ("http://host-1.example:7071/", "http://host-1.example:7071"),
            ("http://[::1]:7071", "http://[::1]:7071"),
            ("http://h", "http://h:80"),
        ] {
            assert_eq!(parse_agent_address(text).unwrap().base, base, "{text}");
        }
        for text in [
            "https://h:1",
            "file:///etc/passwd",
            "http://u:p@h:1",
            "http://h:1/admin",
            "http://h:1/?x=1",
            "http://h:1#f",
            "h:1",
            "",
            "gopher://h:70",
        ] {
            let e = parse_agent_address(text).unwrap_err();
            assert!(e.contains("http://HOST:PORT"), "{text}: {e}");
        }
    }
}
