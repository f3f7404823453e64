//! capstan-containerizer: the only place in Capstan that spawns task processes.
//!
//! Every task runs under its own supervisor process (`capstan supervise SANDBOX`, see
//! [`supervise_main`]) in its own session, so the task outlives a restart or `kill -9` of the
//! agent. The agent and the supervisor share only the sandbox directory (see [`records`] for the
//! files) and, while the launching agent lives, a pipe that wakes it up.
//!
//! Architecture invariants: the supervisor is single-threaded and never uses tokio; every record
//! file is written atomically; a process is identified by pid *and* start time (or held by a
//! pidfd), never by pid alone; a failed privilege drop fails the launch, it never runs as root.

pub mod cgroups;
mod handle;
pub mod records;
mod supervisor;

pub use cgroups::{CgroupLimits, CgroupMode, TaskCgroup};
pub use handle::{
    AttachError, Attached, Containerizer, ContainerizerConfig, ContainerizerError, LaunchError, TaskHandle,
};
pub use records::{ExitRecord, LaunchSpec, ProcessIdentity, Usage};
pub use supervisor::supervise_main;
