//! Job and task specifications: the one set of types behind job files (TOML) and the API (JSON).
//!
//! These are *validated* values: `crate::decode` builds them from text and refuses anything
//! invalid, so code that holds a `JobSpec` can trust every field. They serialize to JSON in the same
//! shape as a job file, and are stored (postcard) in the same shape.

use crate::ids::JobKey;
use crate::resources::{ByteSize, Demand};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobType {
    /// Long-running: every instance is kept running; a task that ends is replaced.
    Service,
    /// Runs to completion: an instance that exits 0 is done; failures are retried `max_failures` times.
    Batch,
    /// Runs a batch on a schedule (`cron`).
    Cron,
    /// One instance on every eligible agent.
    System,
}

impl JobType {
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Service => "service",
            JobType::Batch => "batch",
            JobType::Cron => "cron",
            JobType::System => "system",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementPolicy {
    /// Fill the fullest agent that fits first (fewer, fuller hosts).
    #[default]
    Binpack,
    /// Prefer the emptiest agent (more, emptier hosts).
    Spread,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CronCollisionPolicy {
    #[default]
    KillExisting,
    CancelNew,
}

/// A duration kept in milliseconds; text form `"10s"`, `"5m"`, `"1h30m"`, `"250ms"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct DurationMs(pub u64);

impl DurationMs {
    pub fn from_secs(s: u64) -> Self {
        DurationMs(s * 1000)
    }
    pub fn as_std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0)
    }
}

impl std::str::FromStr for DurationMs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| format!("\"{s}\" is not a duration ({e}); write e.g. \"10s\", \"5m\", \"250ms\""))?;
        u64::try_from(d.as_millis()).map(DurationMs).map_err(|_| format!("\"{s}\" is too long"))
    }
}

impl std::fmt::Display for DurationMs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = std::time::Duration::from_millis(self.0);
        write!(f, "{}", humantime::format_duration(d))
    }
}

impl From<DurationMs> for String {
    fn from(d: DurationMs) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for DurationMs {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// What to do with the tasks of an agent that stopped answering.
/// What happens to a job's tasks on an unreachable agent: replaced elsewhere once the agent has
/// been unreachable this long, or never (singletons: better down than twice). Text form `"5m"` or
/// `"never"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum ReplaceAfter {
    After(DurationMs),
    Never,
}

impl ReplaceAfter {
    /// For jobs that do not say.
    pub const DEFAULT: ReplaceAfter = ReplaceAfter::After(DurationMs(5 * 60 * 1000));

    /// Milliseconds after the agent became unreachable; `None` for never.
    pub fn ms(self) -> Option<u64> {
        match self {
            ReplaceAfter::After(d) => Some(d.0),
            ReplaceAfter::Never => None,
        }
    }
}

impl From<ReplaceAfter> for String {
    fn from(r: ReplaceAfter) -> String {
        match r {
            ReplaceAfter::After(d) => d.to_string(),
            ReplaceAfter::Never => "never".into(),
        }
    }
}

impl TryFrom<String> for ReplaceAfter {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.trim() == "never" {
            Ok(ReplaceAfter::Never)
        } else {
            s.parse::<DurationMs>().map(ReplaceAfter::After)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub job: JobKey,
    #[serde(rename = "type")]
    pub job_type: JobType,
    pub instances: u32,
    /// Batch: how many times a failed instance is retried before the instance is FAILED.
    pub max_failures: u32,
    /// Higher places first.
    pub priority: i32,
    pub production: bool,
    pub placement: PlacementPolicy,
    pub cron: Option<String>,
    pub cron_timezone: Option<String>,
    pub cron_collision_policy: Option<CronCollisionPolicy>,
    /// Tasks on an unreachable agent; `None`: [`ReplaceAfter::DEFAULT`].
    pub replace_after: Option<ReplaceAfter>,
    pub min_healthy: Option<f64>,
    pub task: TaskSpec,
    pub health_check: Option<HealthCheckSpec>,
    pub update: Option<UpdateSpec>,
    pub constraint: Vec<ConstraintSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Run with `/bin/sh -c` in the task's sandbox.
    pub command: String,
    /// The Unix user the task runs as; never root unless the operator allows it.
    pub user: String,
    /// Millicpus: `cpus = 0.25` is 250. Serialized as `cpus` (a number of cpus), the job file's
    /// key, so that a spec as JSON is a valid API body.
    #[serde(rename = "cpus", with = "cpus_as_number")]
    pub cpus_milli: u32,
    pub mem: ByteSize,
    pub disk: ByteSize,
    /// Names of the ports the task needs; each gets a port from its agent's range as `PORT_<NAME>`.
    pub ports: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// SIGTERM, then SIGKILL after this long.
    pub kill_grace: DurationMs,
}

impl TaskSpec {
    pub const DEFAULT_KILL_GRACE: DurationMs = DurationMs(10_000);

    pub fn demand(&self) -> Demand {
        Demand {
            cpus_milli: self.cpus_milli,
            mem_bytes: self.mem.0,
            disk_bytes: self.disk.0,
            ports: self.ports.len() as u32,
        }
    }

    /// `http` → `PORT_HTTP`.
    pub fn port_env_name(port: &str) -> String {
        format!("PORT_{}", port.to_ascii_uppercase())
    }
}

/// Millicpus in, cpus out (`250` ↔ `0.25`); exact for every value `cpus_to_milli` returns.
mod cpus_as_number {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(milli: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(crate::resources::milli_to_cpus(*milli))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let cpus = f64::deserialize(d)?;
        crate::resources::cpus_to_milli(cpus).map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckType {
    Http,
    Tcp,
    Command,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheckSpec {
    #[serde(rename = "type")]
    pub check_type: HealthCheckType,
    pub port: Option<String>,
    pub path: Option<String>,
    pub command: Option<String>,
    pub interval: DurationMs,
    pub timeout: DurationMs,
    pub grace_period: DurationMs,
    pub consecutive_failures: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateSpec {
    pub batch_size: u32,
    pub watch: DurationMs,
    pub max_per_instance_failures: u32,
    pub max_total_failures: u32,
    pub rollback_on_failure: bool,
    pub canaries: u32,
    pub auto_promote: bool,
}

/// One `[[constraint]]` entry, in the shape of the job file. `decode` guarantees exactly one form.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConstraintSpec {
    pub attribute: Option<String>,
    pub value: Option<String>,
    pub not: Option<String>,
    #[serde(rename = "in")]
    pub in_set: Option<Vec<String>>,
    pub limit: Option<u32>,
    pub distinct_hosts: Option<bool>,
    pub spread: Option<String>,
}

/// A constraint in its checked form: exactly one of these per `[[constraint]]` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Constraint<'a> {
    /// The agent's attribute has this value.
    Equals { attribute: &'a str, value: &'a str },
    /// The agent's attribute is absent or has another value.
    NotEquals { attribute: &'a str, value: &'a str },
    /// The agent's attribute is one of these.
    In { attribute: &'a str, values: &'a [String] },
    /// At most `limit` live instances of the job per value of the attribute (Aurora's `rack: limit:1`).
    Limit { attribute: &'a str, limit: u32 },
    /// At most one live instance of the job per agent.
    DistinctHosts,
    /// Instances spread evenly over the values of the attribute.
    Spread { attribute: &'a str },
}

impl ConstraintSpec {
    /// The one form this entry takes; `None` only for an entry the decoder would have refused.
    pub fn kind(&self) -> Option<Constraint<'_>> {
        match (&self.attribute, &self.value, &self.not, &self.in_set, self.limit, self.distinct_hosts, &self.spread) {
            (Some(a), Some(v), None, None, None, None, None) => Some(Constraint::Equals { attribute: a, value: v }),
            (Some(a), None, Some(v), None, None, None, None) => Some(Constraint::NotEquals { attribute: a, value: v }),
            (Some(a), None, None, Some(vs), None, None, None) => Some(Constraint::In { attribute: a, values: vs }),
            (Some(a), None, None, None, Some(l), None, None) => Some(Constraint::Limit { attribute: a, limit: l }),
            (None, None, None, None, None, Some(true), None) => Some(Constraint::DistinctHosts),
            (None, None, None, None, None, None, Some(a)) => Some(Constraint::Spread { attribute: a }),
            _ => None,
        }
    }
}

impl std::fmt::Display for Constraint<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Constraint::Equals { attribute, value } => write!(f, "{attribute} = {value}"),
            Constraint::NotEquals { attribute, value } => write!(f, "{attribute} != {value}"),
            Constraint::In { attribute, values } => write!(f, "{attribute} in [{}]", values.join(", ")),
            Constraint::Limit { attribute, limit } => write!(f, "at most {limit} per {attribute}"),
            Constraint::DistinctHosts => write!(f, "one per host"),
            Constraint::Spread { attribute } => write!(f, "spread over {attribute}"),
        }
    }
}
