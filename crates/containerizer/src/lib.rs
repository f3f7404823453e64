//! capstan-containerizer: the only place in Capstan that spawns task processes.
//!
//! Every task runs under its own supervisor process (`capstan supervise SANDBOX`, see
//! [`supervise_main`]) in its own session, so the task outlives a restart or `kill -9` of the
//! agent. The agent and the supervisor share only the sandbox directory (see [`sandbox`] for its
//! layout and [`records`] for the files) and, while the launching agent lives, a pipe that wakes
//! it up.
//!
//! Architecture invariants: the supervisor is single-threaded and never uses tokio; every record
//! file is written atomically; a process is identified by pid *and* start time (or held by a
//! pidfd), never by pid alone; a failed privilege drop fails the launch, it never runs as root;
//! root never opens, creates, renames or chowns a name in a directory the task can write, and
//! reads logs only through [`sandbox::LogDir`].

pub mod cgroups;
pub mod check;
mod disk;
mod handle;
pub mod logs;
pub mod records;
pub mod sandbox;
mod supervisor;
mod volume;

pub use cgroups::{CgroupLimits, CgroupMode, TaskCgroup};
pub use disk::{disk_usage_bytes, project_id, set_project_id, ProjectQuotas, DISK_USAGE_MAX_DEPTH};
pub use handle::{
    AttachError, Attached, Containerizer, ContainerizerConfig, ContainerizerError, LaunchError, TaskHandle,
};
pub use records::{
    read_regular_file, ExitRecord, LaunchSpec, ProcessIdentity, Usage, DEFAULT_LOG_KEEP, DEFAULT_LOG_MAX_BYTES,
    MAX_LOG_KEEP, STDERR_FILE, STDOUT_FILE,
};
pub use sandbox::{
    logs_dir, work_dir, GidsExhausted, LogDir, LOGS_DIR, SANDBOX_GID_FIRST, SANDBOX_GID_LAST, TMP_DIR, WORK_DIR,
};
pub use supervisor::{supervise_main, EXIT_SANDBOX_BUSY};
pub use volume::{
    is_mount_point, mount_points_below, unmount, LoopVolumes, VOLUMES_DIR_MODE, VOLUME_FS_TYPE, VOLUME_IMAGE_MODE,
    VOLUME_MIN_BYTES,
};
