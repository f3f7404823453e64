//! Backup and restore on the master: `GET /v1/admin/backup` (the backup file of the state now),
//! `POST /v1/admin/restore?dry_run=&force=&source=` (a backup file as the raw body: checked from
//! end to end before anything changes), `GET /v1/admin/dump` (the state as canonical JSON), and
//! the periodic backups loop (`--backup-dir`, `--backup-interval`, `--backup-keep`).
//! The file format and its checks are `capstan_state::backup`; docs/backup.md has the rules.

use crate::core::{now, Core};
use crate::http::{ApiFailure, AppState};
use anyhow::Context as _;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use capstan_api::wire::{BackupInfo, RestoreView};
use capstan_state::backup::{self, Inspected, Restored};
use serde::Deserialize;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

/// The largest backup a restore accepts (2 GiB).
pub const RESTORE_BODY_MAX_BYTES: usize = 2 << 30;
/// Periodic backup files are named `{PREFIX}{UTC time}{SUFFIX}`, so that names sort by time.
pub const FILE_PREFIX: &str = "capstan-backup-";
pub const FILE_SUFFIX: &str = ".backup";
/// The answer header with the log index a backup or dump is as of.
pub const INDEX_HEADER: &str = "x-capstan-index";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/backup", get(get_backup))
        .route("/v1/admin/dump", get(get_dump))
        .route("/v1/admin/restore", post(restore).layer(DefaultBodyLimit::max(RESTORE_BODY_MAX_BYTES)))
}

/// The backup file of `core`'s state now: encoded under the read lock, so it is the state as of
/// one log index.
pub fn take_backup(core: &Core) -> (u64, Vec<u8>) {
    let state = core.state.read();
    (state.index, backup::encode(&state, now(), env!("CARGO_PKG_VERSION")))
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// What an inspected backup says about itself, as the API and the CLI show it.
pub fn backup_info(b: &Inspected) -> BackupInfo {
    let h = &b.header;
    BackupInfo {
        backup_format_version: h.backup_format_version,
        created_at: rfc3339(h.created_at.0),
        created_at_ms: h.created_at.0,
        capstan_version: h.capstan_version.clone(),
        store_index: h.store_index,
        snapshot_format_version: h.snapshot_format_version,
        jobs: h.jobs,
        tasks: h.tasks,
        agents: h.agents,
        file_bytes: b.file_bytes,
        checksum: format!("{:08x}", b.file_crc32),
        restored_from: b.state.restored.as_ref().map(|r| {
            format!(
                "{} (taken {} at index {}, checksum {:08x}), restored {}",
                r.source,
                rfc3339(r.backup_created_at.0),
                r.backup_index,
                r.backup_crc32,
                rfc3339(r.at.0)
            )
        }),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiFailure {
    ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

async fn get_backup(State(app): State<AppState>) -> Result<Response, ApiFailure> {
    let core = app.core.clone();
    let (index, bytes) = tokio::task::spawn_blocking(move || take_backup(&core)).await.map_err(internal)?;
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(INDEX_HEADER, index)
        .body(Body::from(bytes))
        .map_err(internal)
}

async fn get_dump(State(app): State<AppState>) -> Result<Response, ApiFailure> {
    let core = app.core.clone();
    let (index, text) = tokio::task::spawn_blocking(move || {
        let state = core.state.read();
        (state.index, backup::dump(&state))
    })
    .await
    .map_err(internal)?;
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(INDEX_HEADER, index)
        .body(Body::from(text))
        .map_err(internal)
}

#[derive(Deserialize)]
struct RestoreQuery {
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    force: bool,
    /// What the operator calls the backup (its file name), kept in the restored state.
    #[serde(default)]
    source: Option<String>,
}

async fn restore(
    State(app): State<AppState>,
    Query(q): Query<RestoreQuery>,
    body: Bytes,
) -> Result<Json<RestoreView>, ApiFailure> {
    let checked = tokio::task::spawn_blocking(move || backup::inspect(&body)).await.map_err(internal)?;
    let mut inspected = checked
        .map_err(|e| ApiFailure::new(StatusCode::BAD_REQUEST, "bad_backup", format!("{e}; nothing was changed")))?;
    let info = backup_info(&inspected);
    let (jobs, tasks, agents) = {
        let s = app.core.state.read();
        (s.jobs.len() as u64, s.tasks.len() as u64, s.agents.len() as u64)
    };
    let mut view = RestoreView {
        dry_run: q.dry_run,
        index: None,
        backup: info,
        replaced_jobs: jobs,
        replaced_tasks: tasks,
        replaced_agents: agents,
    };
    if q.dry_run {
        // The same refusal the real run would give, so a dry run answers for it.
        if jobs > 0 && !q.force {
            return Err(ApiFailure::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "the cluster has {jobs} job(s) and a restore replaces the whole state; restore with --force \
                     to replace them; nothing was changed (dry run)"
                ),
            ));
        }
        return Ok(Json(view));
    }
    let source = q.source.filter(|s| !s.trim().is_empty()).unwrap_or_else(|| "a backup".to_string());
    inspected.state.restored = Some(Restored {
        at: now(),
        source: source.clone(),
        backup_created_at: inspected.header.created_at,
        backup_index: inspected.header.store_index,
        backup_crc32: inspected.file_crc32,
    });
    let index = app.core.restore(inspected.state, q.force).await?;
    tracing::warn!(index, source = %source, "the state was restored from a backup");
    app.core.request_new_term(&format!("restored from backup {source}"));
    view.index = Some(index);
    Ok(Json(view))
}

// ---- periodic backups

/// Periodic backups: off without a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupSchedule {
    pub dir: Option<PathBuf>,
    pub interval: Duration,
    /// Files kept; older ones are deleted after each new one.
    pub keep: usize,
}

impl Default for BackupSchedule {
    fn default() -> Self {
        BackupSchedule { dir: None, interval: Duration::from_secs(3600), keep: 24 }
    }
}

impl BackupSchedule {
    /// Checks the settings as a whole; an error names the flag.
    pub fn check(&self) -> Result<(), String> {
        if self.interval.is_zero() {
            return Err("--backup-interval must be longer than 0s".into());
        }
        if self.keep == 0 {
            return Err("--backup-keep must be at least 1".into());
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` so that `path` is either absent, the old file, or all of `bytes`:
/// a temporary file next to it, fsync, rename, fsync of the directory.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().with_context(|| format!("{} is not a file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new().write(true).create(true).truncate(true),
            0o600,
        )
        .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync the directory {}", dir.display()))?;
    Ok(())
}

/// `capstan-backup-20250102T030405.678Z.backup` for a backup taken at `ms`.
pub fn file_name(ms: u64) -> String {
    let stamp: String = rfc3339(ms).chars().filter(|c| *c != '-' && *c != ':').collect();
    format!("{FILE_PREFIX}{stamp}{FILE_SUFFIX}")
}

/// Deletes the oldest periodic backups in `dir` beyond `keep` (by name, which is by time);
/// returns what it deleted. Other files are left alone.
pub fn prune(dir: &Path, keep: usize) -> anyhow::Result<Vec<PathBuf>> {
    let mut ours: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(FILE_PREFIX) && name.ends_with(FILE_SUFFIX)
        })
        .map(|e| e.path())
        .collect();
    ours.sort();
    let extra = ours.len().saturating_sub(keep);
    let old: Vec<PathBuf> = ours.into_iter().take(extra).collect();
    for path in &old {
        std::fs::remove_file(path).with_context(|| format!("cannot delete the old backup {}", path.display()))?;
    }
    Ok(old)
}

/// One periodic backup into `dir`, then pruning to `keep`; returns the new file.
pub fn backup_once(core: &Core, dir: &Path, keep: usize) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the backup directory {}", dir.display()))?;
    // Backups hold every job's environment: only the master's user may read them.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("cannot make the backup directory {} private (0700)", dir.display()))?;
    let (_, bytes) = take_backup(core);
    let path = dir.join(file_name(now().0));
    write_file_atomically(&path, &bytes)?;
    prune(dir, keep)?;
    Ok(path)
}

/// Takes a backup every interval while `is_leader()` says so (only the leader backs up).
pub async fn run(core: Arc<Core>, schedule: BackupSchedule, is_leader: Arc<dyn Fn() -> bool + Send + Sync>) {
    let Some(dir) = schedule.dir.clone() else { return };
    tracing::info!(
        "periodic backups every {} into {}, keeping {}",
        humantime::format_duration(schedule.interval),
        dir.display(),
        schedule.keep
    );
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + schedule.interval, schedule.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !is_leader() {
            continue;
        }
        let (core, dir) = (core.clone(), dir.clone());
        let keep = schedule.keep;
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || backup_once(&core, &dir, keep)).await {
            Ok(Ok(path)) => tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "periodic backup written to {}",
                path.display()
            ),
            Ok(Err(e)) => tracing::error!("periodic backup failed: {e:#}"),
            Err(e) => tracing::error!("periodic backup failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_is_a_store_envelope() {
        // The state crate frames backups itself (it may not depend on the store); the layouts
        // must stay the same.
        let bytes = backup::encode(&Default::default(), capstan_model::Timestamp(1), "t");
        let v = backup::BACKUP_FORMAT_VERSION;
        let decoded = capstan_store::envelope::decode(&bytes, v, || "a backup".into()).unwrap();
        assert_eq!((decoded.version, decoded.payload.len()), (v, bytes.len() - backup::ENVELOPE_BYTES));
    }

    #[test]
    fn file_names_sort_by_time() {
        let a = file_name(1_700_000_000_000);
        assert_eq!(a, "capstan-backup-20231114T221320.000Z.backup");
        let b = file_name(1_700_000_000_001);
        let c = file_name(1_800_000_000_000);
        assert!(a < b && b < c);
    }

    #[test]
    fn prune_keeps_the_newest_and_leaves_other_files() {
        let dir = tempfile::tempdir().unwrap();
        for ms in [3, 1, 4, 2, 5] {
            std::fs::write(dir.path().join(file_name(1_700_000_000_000 + ms)), b"x").unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
        let deleted = prune(dir.path(), 2).unwrap();
        assert_eq!(deleted.len(), 3);
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        left.sort();
        assert_eq!(left, vec![file_name(1_700_000_000_004), file_name(1_700_000_000_005), "notes.txt".to_string()]);
    }

    #[test]
    fn atomic_writes_leave_no_temporary_file_and_replace_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.backup");
        write_file_atomically(&path, b"first").unwrap();
        write_file_atomically(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let err = write_file_atomically(&dir.path().join("no/such/dir/b"), b"x").unwrap_err();
        assert!(format!("{err:#}").contains("no/such/dir"), "{err:#}");
    }

    #[test]
    fn schedule_defaults_and_checks() {
        let d = BackupSchedule::default();
        assert_eq!((d.dir, d.interval, d.keep), (None, Duration::from_secs(3600), 24));
        let bad = BackupSchedule { keep: 0, ..Default::default() };
        assert!(bad.check().unwrap_err().contains("--backup-keep"));
        let bad = BackupSchedule { interval: Duration::ZERO, ..Default::default() };
        assert!(bad.check().unwrap_err().contains("--backup-interval"));
    }
}
