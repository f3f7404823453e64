//! Capstan's domain model: identifiers, resources, job and task specifications with their
//! validation, task state and its lifecycle. Pure: no I/O, no clock, no randomness.

pub mod cron;
pub mod decode;
pub mod exit;
pub mod ids;
pub mod lifecycle;
pub mod resources;
pub mod spec;
pub mod task;

pub use cron::CronSchedule;
pub use decode::{parse_json, parse_toml, Problem, Problems, ValidationPolicy};
pub use exit::TaskExit;
pub use ids::{derive_id, AgentId, JobKey, TaskId};
pub use resources::{ByteSize, Capacity, Demand, PortRange};
pub use spec::{DurationMs, JobSpec, JobType, TaskSpec};
pub use task::{Desired, TaskState, Timestamp};
