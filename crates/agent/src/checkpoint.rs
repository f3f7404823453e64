//! What the agent keeps across restarts and how it reads it back: its identity (`agent.json`,
//! versioned), the update log (see [`crate::updates`]) and the sandboxes the containerizer writes.
//!
//! Reading is strict: a file that is unreadable, damaged or from a newer format stops the start
//! with a [`CheckpointError`] that names the file, says what is wrong and points the operator at
//! `--recover=cleanup` ([`cleanup`]), which kills whatever the sandboxes still run and starts
//! clean. The agent never guesses what runs on its host.

use crate::updates::{LogError, UpdateQueue};
use capstan_containerizer::{Containerizer, ExitRecord, LaunchSpec, ProcessIdentity};
use capstan_model::{AgentId, TaskId};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `agent.json`'s format; a file without `format_version` is version 1 (and is rewritten with it).
pub const IDENTITY_FORMAT_VERSION: u32 = 1;
pub const IDENTITY_FILE: &str = "agent.json";
pub const UPDATE_LOG_FILE: &str = "updates.log";
pub const SANDBOXES_DIR: &str = "sandboxes";
/// `DATA/sandboxes`: tasks pass through it to their own sandbox (each sandbox admits only its
/// task's group, see `capstan_containerizer::sandbox`), but only root may list it.
pub const SANDBOXES_DIR_MODE: u32 = 0o711;
/// Written into a sandbox once the master acknowledged the task's end.
pub const REPORTED_MARKER: &str = "reported";
/// How long cleanup waits for a task's cgroup to empty.
const CLEANUP_KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// How the agent treats what it finds in its data directory on start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecoverMode {
    /// Re-attach to every task in the sandboxes; refuse to start on a damaged checkpoint.
    #[default]
    Reattach,
    /// Kill every task found, report nothing for them, move the sandboxes aside, reset the update
    /// log and start clean (same agent id when `agent.json` is readable).
    Cleanup,
}

impl std::str::FromStr for RecoverMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reattach" => Ok(RecoverMode::Reattach),
            "cleanup" => Ok(RecoverMode::Cleanup),
            other => Err(format!("`{other}`: use reattach or cleanup")),
        }
    }
}

impl std::fmt::Display for RecoverMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecoverMode::Reattach => "reattach",
            RecoverMode::Cleanup => "cleanup",
        })
    }
}

/// A checkpoint file the agent cannot trust.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot recover the agent's state: {}: {problem}.\nThe agent refuses to guess what runs on this host. \
     To start anyway, run it again with --recover=cleanup: that kills every task and supervisor found in \
     the sandboxes, moves the sandboxes aside to DATA/sandboxes.cleanup-<time>/, resets the status \
     update log and starts clean. When agent.json is readable the agent keeps its id and the master \
     marks those tasks LOST when it registers again; when it is not, the agent starts under a new id \
     and the master keeps the old agent's tasks until it learns that agent is gone.",
    file.display()
)]
pub struct CheckpointError {
    pub file: PathBuf,
    pub problem: String,
}

impl CheckpointError {
    fn new(file: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        CheckpointError { file: file.into(), problem: problem.into() }
    }
}

impl From<LogError> for CheckpointError {
    fn from(e: LogError) -> Self {
        let file = e.path().to_path_buf();
        let problem = match &e {
            LogError::Io { source, .. } => format!("unreadable ({source})"),
            LogError::Corrupt { offset, detail, .. } => {
                format!("damaged record at byte {offset} ({detail}) with more records after it")
            }
            LogError::BadMagic { .. } => "not a Capstan update log (bad magic)".into(),
            LogError::NewerVersion { offset, found, .. } => format!(
                "record at byte {offset} has format version {found}, newer than the {} this agent reads",
                crate::updates::RECORD_VERSION
            ),
        };
        CheckpointError { file, problem }
    }
}

/// `agent.json`.
#[derive(Serialize, Deserialize)]
struct Identity {
    format_version: u32,
    id: AgentId,
}

/// Reads `agent.json`: `Ok(None)` when there is none (a new agent).
pub fn read_identity(data_dir: &Path) -> Result<Option<AgentId>, CheckpointError> {
    let path = data_dir.join(IDENTITY_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CheckpointError::new(&path, format!("unreadable ({e})"))),
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| CheckpointError::new(&path, format!("not valid JSON ({e}); the file is damaged")))?;
    let version = match value.get("format_version") {
        None => 1,
        Some(v) => v
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| CheckpointError::new(&path, format!("format_version {v} is not a number")))?,
    };
    if version > IDENTITY_FORMAT_VERSION {
        return Err(CheckpointError::new(
            &path,
            format!(
                "format_version {version} is newer than the {IDENTITY_FORMAT_VERSION} this agent reads \
                 (written by a newer Capstan?)"
            ),
        ));
    }
    let id = value
        .get("id")
        .cloned()
        .ok_or_else(|| "no `id`".to_string())
        .and_then(|v| serde_json::from_value::<AgentId>(v).map_err(|e| format!("bad `id`: {e}")))
        .map_err(|e| CheckpointError::new(&path, e))?;
    if value.get("format_version").is_none() {
        tracing::info!("{}: no format_version; reading it as version 1 and rewriting it", path.display());
        write_identity(data_dir, id).map_err(|e| CheckpointError::new(&path, format!("cannot rewrite it ({e})")))?;
    }
    Ok(Some(id))
}

/// Writes `agent.json` atomically.
pub fn write_identity(data_dir: &Path, id: AgentId) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(&Identity { format_version: IDENTITY_FORMAT_VERSION, id })?;
    write_atomic(&data_dir.join(IDENTITY_FILE), &bytes)
}

/// The newest master epoch this agent has seen: orders from a master with an older epoch come
/// from a deposed leader and are ignored, across agent restarts too.
pub const MASTER_EPOCH_FILE: &str = "master-epoch";

/// Reads the newest master epoch seen (0 when none was recorded or the file is unreadable: the
/// next master answer records one again).
pub fn read_master_epoch(data_dir: &Path) -> u64 {
    fs::read_to_string(data_dir.join(MASTER_EPOCH_FILE)).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

pub fn write_master_epoch(data_dir: &Path, epoch: u64) -> io::Result<()> {
    write_atomic(&data_dir.join(MASTER_EPOCH_FILE), format!("{epoch}\n").as_bytes())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    // Root's alone, like every file of the agent's.
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads a sandbox's record: never through a link, only a regular file (a sandbox of the previous
/// layout belongs to its task's user).
fn read_checked<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, CheckpointError> {
    match capstan_containerizer::read_regular_file(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| CheckpointError::new(path, format!("damaged or from a newer format ({e})"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CheckpointError::new(path, format!("unreadable ({e})"))),
    }
}

/// The task sandboxes under `sandboxes` (directories named by a task id).
pub fn task_sandboxes(sandboxes: &Path) -> Vec<(TaskId, PathBuf)> {
    let Ok(dir) = fs::read_dir(sandboxes) else { return vec![] };
    let mut out: Vec<(TaskId, PathBuf)> = dir
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<TaskId>().ok()?, e.path())))
        .collect();
    out.sort();
    out
}

/// Checks every file of a sandbox the agent would read to re-attach (`launch.json`,
/// `supervisor.json`, `task.json`, `exit.json`) before anything acts on any of them. Sandboxes
/// whose end the master already has (`reported`) are not read again, so not checked.
pub fn check_sandboxes(sandboxes: &Path) -> Result<(), CheckpointError> {
    for (task, dir) in task_sandboxes(sandboxes) {
        if dir.join(REPORTED_MARKER).exists() {
            continue;
        }
        if let Some(spec) = read_checked::<LaunchSpec>(&dir.join("launch.json"))? {
            if spec.task_id != task {
                return Err(CheckpointError::new(
                    dir.join("launch.json"),
                    format!("names task {} but lies in the sandbox of task {task}", spec.task_id),
                ));
            }
        }
        read_checked::<ProcessIdentity>(&dir.join("supervisor.json"))?;
        read_checked::<ProcessIdentity>(&dir.join("task.json"))?;
        read_checked::<ExitRecord>(&dir.join("exit.json"))?;
    }
    Ok(())
}

/// `--recover=cleanup`: kills every supervisor and task found in the sandboxes (and empties and
/// removes their cgroups), moves the sandboxes to `DATA/sandboxes.cleanup-<time>/` (with the old
/// update log and a damaged `agent.json`), resets the update log and keeps the agent id when
/// `agent.json` is readable. Returns the agent id.
pub fn cleanup(data_dir: &Path, containerizer: &Containerizer) -> anyhow::Result<AgentId> {
    use anyhow::Context as _;
    let sandboxes = data_dir.join(SANDBOXES_DIR);
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string().replace(':', "");
    let aside = data_dir.join(format!("sandboxes.cleanup-{stamp}"));
    let mut killed = 0;
    for (task, dir) in task_sandboxes(&sandboxes) {
        // The supervisor first, so that it cannot record anything more; then the task's group and
        // whatever is left in its cgroup.
        for file in ["supervisor.json", "task.json"] {
            let identity = capstan_containerizer::read_regular_file(&dir.join(file))
                .ok()
                .and_then(|b| serde_json::from_slice::<ProcessIdentity>(&b).ok())
                .filter(|p| p.is_alive());
            if let Some(p) = identity {
                let pid = nix::unistd::Pid::from_raw(p.pid as i32);
                if file == "task.json" {
                    let _ = nix::sys::signal::killpg(pid, nix::sys::signal::SIGKILL);
                }
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
                killed += 1;
            }
        }
        let cgroup = containerizer.task_cgroup(task);
        if !cgroup.kill_all(CLEANUP_KILL_TIMEOUT, &mut || {}) {
            tracing::error!(%task, "cleanup: processes in the task's cgroup would not die");
        } else if let Err(e) = cgroup.remove() {
            tracing::warn!(%task, "cleanup: cannot remove the task's cgroup: {e}");
        }
    }
    fs::create_dir_all(&aside).with_context(|| format!("cannot create {}", aside.display()))?;
    if sandboxes.exists() {
        let moved = aside.join(SANDBOXES_DIR);
        fs::rename(&sandboxes, &moved)
            .with_context(|| format!("cannot move {} to {}", sandboxes.display(), moved.display()))?;
    }
    let log = data_dir.join(UPDATE_LOG_FILE);
    let last_seq = UpdateQueue::salvage_last_seq(&log);
    if log.exists() {
        fs::rename(&log, aside.join(UPDATE_LOG_FILE)).with_context(|| format!("cannot move {}", log.display()))?;
    }
    UpdateQueue::reset(&log, last_seq)?;
    let id = match read_identity(data_dir) {
        Ok(Some(id)) => id,
        Ok(None) => AgentId(rand::random()),
        Err(e) => {
            tracing::warn!("cleanup: {}: {}; starting as a new agent", e.file.display(), e.problem);
            let _ = fs::rename(&e.file, aside.join(IDENTITY_FILE));
            AgentId(rand::random())
        }
    };
    write_identity(data_dir, id).context("cannot write agent.json")?;
    fs::create_dir_all(&sandboxes)?;
    tracing::warn!(
        "--recover=cleanup: killed {killed} process(es), moved the sandboxes to {}, reset the update log; \
         starting clean as agent {id}",
        aside.display()
    );
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_without_a_version_is_version_1_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(IDENTITY_FILE), r#"{"id":"00000000000000ab"}"#).unwrap();
        assert_eq!(read_identity(dir.path()).unwrap(), Some(AgentId(0xab)));
        let v: serde_json::Value = serde_json::from_slice(&fs::read(dir.path().join(IDENTITY_FILE)).unwrap()).unwrap();
        assert_eq!(v["format_version"], 1);
        assert_eq!(read_identity(dir.path()).unwrap(), Some(AgentId(0xab)));
    }

    #[test]
    fn newer_or_damaged_identity_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(IDENTITY_FILE);
        fs::write(&path, r#"{"format_version":2,"agent":"x"}"#).unwrap();
        let e = read_identity(dir.path()).unwrap_err();
        assert!(e.problem.contains("newer"), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert!(e.to_string().contains("--recover=cleanup"), "{e}");
        fs::write(&path, "{\"id\": \"0000").unwrap();
        assert!(read_identity(dir.path()).unwrap_err().problem.contains("damaged"));
    }

    #[test]
    fn damaged_sandbox_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = dir.path().join(TaskId(7).to_string());
        fs::create_dir_all(&sandbox).unwrap();
        fs::write(sandbox.join("exit.json"), "{\"exit\":").unwrap();
        let e = check_sandboxes(dir.path()).unwrap_err();
        assert_eq!(e.file, sandbox.join("exit.json"));
        // Once reported, the sandbox is not read again.
        fs::write(sandbox.join(REPORTED_MARKER), "").unwrap();
        check_sandboxes(dir.path()).unwrap();
    }
}
