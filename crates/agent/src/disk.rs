//! How this agent holds tasks to their `disk`: chosen at start (`--disk-enforcement`), said in
//! the agent attribute [`crate::DISK_ENFORCEMENT_ATTRIBUTE`], applied per launch by
//! `Agent::limit_disk`, undone by the sandbox garbage collection.
//!
//! - `project-quota`: the sandbox directory's project quota (the file system refuses writes
//!   past the limit with `EDQUOT`); needs quota support in the kernel and the file system.
//! - `loop-volume`: a size-limited ext4 volume per task mounted on its work directory (writes
//!   past it fail with `ENOSPC`); see [`capstan_containerizer::LoopVolumes`]. Costs a `mkfs` and
//!   a mount per launch; needs root, `mkfs.ext4` and loop devices.
//! - `check-and-kill`: the sandbox is measured every `disk_check_interval` and a task over its
//!   limit is killed. It also runs under `loop-volume`, as a backstop (the logs are outside the
//!   volume but count).
//! - `auto` (the default): project quotas where the sandboxes' file system has them, else
//!   check-and-kill.

use capstan_containerizer::{LoopVolumes, ProjectQuotas};
use std::path::Path;
use std::time::Duration;

/// Below the data directory: the images of the per-task volumes.
pub const VOLUMES_DIR: &str = "volumes";

/// `--disk-enforcement`: what the operator asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskEnforcement {
    /// Project quotas where available, else check-and-kill.
    #[default]
    Auto,
    /// Project quotas, or the agent does not start.
    ProjectQuota,
    /// A size-limited loop-mounted volume per task, or the agent does not start.
    LoopVolume,
    /// Measure and kill only.
    CheckAndKill,
}

impl std::str::FromStr for DiskEnforcement {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DiskEnforcement::Auto),
            "project-quota" => Ok(DiskEnforcement::ProjectQuota),
            "loop-volume" => Ok(DiskEnforcement::LoopVolume),
            "check-and-kill" => Ok(DiskEnforcement::CheckAndKill),
            other => Err(format!("`{other}`: use auto, project-quota, loop-volume or check-and-kill")),
        }
    }
}

impl std::fmt::Display for DiskEnforcement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskEnforcement::Auto => "auto",
            DiskEnforcement::ProjectQuota => "project-quota",
            DiskEnforcement::LoopVolume => "loop-volume",
            DiskEnforcement::CheckAndKill => "check-and-kill",
        })
    }
}

/// What enforces the disk limits of this agent's tasks (the check-and-kill runs in every case
/// for tasks that no project quota holds).
pub(crate) enum Enforcer {
    Quotas(ProjectQuotas),
    Volumes,
    CheckAndKill,
}

impl Enforcer {
    /// The value of the agent attribute `disk_enforcement`.
    pub(crate) fn attribute(&self) -> &'static str {
        match self {
            Enforcer::Quotas(_) => "project_quota",
            Enforcer::Volumes => "loop_volume",
            Enforcer::CheckAndKill => "check_and_kill",
        }
    }
}

/// Picks the enforcement `mode` asks for on this host, saying so in the log; an explicit mode
/// this host cannot do is an error that says why.
pub(crate) fn choose(
    mode: DiskEnforcement,
    sandboxes: &Path,
    volumes: &Path,
    check_interval: Duration,
) -> anyhow::Result<Enforcer> {
    let quotas = || ProjectQuotas::detect(sandboxes);
    let enforcer = match mode {
        DiskEnforcement::Auto => match quotas() {
            Ok(q) => Enforcer::Quotas(q),
            Err(why) => {
                tracing::warn!(
                    "disk limits enforced by check-and-kill every {check_interval:?} (a task may write past its \
                     disk until the next check): no project quotas: {why}; --disk-enforcement=loop-volume makes \
                     writes past the limit fail instead"
                );
                return Ok(Enforcer::CheckAndKill);
            }
        },
        DiskEnforcement::ProjectQuota => Enforcer::Quotas(quotas().map_err(|why| {
            anyhow::anyhow!(
                "--disk-enforcement=project-quota: the file system of {} has no project quotas: {why}; mount it \
                 with prjquota, or use --disk-enforcement=loop-volume or auto",
                sandboxes.display()
            )
        })?),
        DiskEnforcement::LoopVolume => {
            LoopVolumes::open(volumes).map_err(|why| {
                anyhow::anyhow!(
                    "--disk-enforcement=loop-volume: cannot keep per-task volumes in {}: {why}",
                    volumes.display()
                )
            })?;
            Enforcer::Volumes
        }
        DiskEnforcement::CheckAndKill => Enforcer::CheckAndKill,
    };
    match &enforcer {
        Enforcer::Quotas(_) => tracing::info!(
            "disk limits enforced by project quotas on the file system of {} (writes past a task's disk fail)",
            sandboxes.display()
        ),
        Enforcer::Volumes => tracing::info!(
            "disk limits enforced by a loop-mounted ext4 volume per task, images in {} (writes past a task's \
             disk fail); check-and-kill every {check_interval:?} as a backstop",
            volumes.display()
        ),
        Enforcer::CheckAndKill => tracing::warn!(
            "disk limits enforced by check-and-kill every {check_interval:?} (a task may write past its disk \
             until the next check), as --disk-enforcement=check-and-kill asks"
        ),
    }
    Ok(enforcer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_back_what_they_print() {
        for m in [
            DiskEnforcement::Auto,
            DiskEnforcement::ProjectQuota,
            DiskEnforcement::LoopVolume,
            DiskEnforcement::CheckAndKill,
        ] {
            assert_eq!(m.to_string().parse::<DiskEnforcement>(), Ok(m));
        }
        assert!("loop".parse::<DiskEnforcement>().unwrap_err().contains("loop-volume"));
    }
}
