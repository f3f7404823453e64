//! Cluster state: the typed commands that change it, the one deterministic `apply`, queries for
//! the API and the scheduler, and the versioned encoding of commands and snapshots. Pure: no I/O.

pub mod agent;
pub mod backup;
pub mod codec;
pub mod command;
pub mod cron;
pub mod drain;
pub mod state;
pub mod updates;
pub mod work;

pub use agent::{Agent, AgentInfo, Liveness, Stray};
pub use codec::{decode_command, decode_snapshot, encode_command, encode_snapshot, CodecError};
pub use command::{Command, Freeze, Placement, Preemption, Quota, Report, SchedulerSettings, Stamped, StatusUpdate};
pub use cron::{CronRun, CronRunResult, CronRuns, CronStarted};
pub use drain::{Drain, DrainPlan, DrainProgress, DrainSafety, MaintenancePhase, MaintenanceWindow};
pub use state::{Applied, ClusterState, Job, QueueKey, Rejection, Task, TaskEventRecord};
pub use updates::{JobUpdates, Update, UpdateAction, UpdateState};
