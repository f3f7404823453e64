//! Backup and restore on the master: `GET /v1/admin/backup` (the backup file of the state now),
//! `POST /v1/admin/restore?dry_run=&force=&source=` (a backup file as the raw body: streamed to a
//! file in the data directory and checked as it arrives, refused from its first bytes when they
//! are not a backup's, one restore at a time; checked from end to end before anything changes), `GET /v1/admin/dump` (the state as canonical JSON), and
//! the periodic backups loop (`--backup-dir`, `--backup-interval`, `--backup-keep`).
//! The file format and its checks are `capstan_state::backup`; docs/backup.md has the rules.

use crate::core::{now, Core};
use crate::http::{ApiFailure, AppState};
use anyhow::Context as _;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use capstan_api::wire::{BackupInfo, RestoreView};
use capstan_state::backup::{self, BackupError, BackupHeader, Inspected, Restored};
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

/// The file a restore's body is written to while it arrives, in the master's data directory.
pub const RESTORE_UPLOAD_FILE: &str = "restore.upload";
/// The longest JSON header a backup may have (real ones are a few hundred bytes).
pub const BACKUP_HEADER_BYTES_MAX: usize = 64 * 1024;

fn bad_backup(e: BackupError) -> ApiFailure {
    ApiFailure::new(StatusCode::BAD_REQUEST, "bad_backup", format!("{e}; nothing was changed"))
}

/// Checks a backup file as its bytes arrive (layout: `capstan_state::backup`), so that what is not
/// a backup is refused from its first bytes, and memory does not grow with the file: only its
/// head (envelope and header, bounded) is kept; checksums are computed on the way.
pub struct ArrivingBackup {
    max_bytes: u64,
    received: u64,
    /// The bytes before the state: envelope, header length and checksum, header.
    head: Vec<u8>,
    /// Once the head is complete: the header, where the state starts, the whole file's length.
    header: Option<(BackupHeader, u64, u64)>,
    /// CRC-32 of bytes 4..8 and 12.. (the envelope's), and of the state (the header's).
    crc: crc32fast::Hasher,
    state_crc: crc32fast::Hasher,
    /// The state's first two bytes (its format version).
    state_version: Vec<u8>,
}

impl ArrivingBackup {
    pub fn new(max_bytes: u64) -> ArrivingBackup {
        ArrivingBackup {
            max_bytes,
            received: 0,
            head: Vec::new(),
            header: None,
            crc: crc32fast::Hasher::new(),
            state_crc: crc32fast::Hasher::new(),
            state_version: Vec::new(),
        }
    }

    /// Takes the next bytes of the file; refuses as soon as they show it cannot be a backup.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), ApiFailure> {
        let start = self.received;
        self.received += chunk.len() as u64;
        if self.received > self.max_bytes {
            return Err(ApiFailure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "the body has more than {} bytes, the most a restore takes; nothing was changed",
                    self.max_bytes
                ),
            ));
        }
        // The envelope's checksum covers the version (bytes 4..8) and the payload (12..).
        for (from, to) in [(4u64, 8u64), (12, u64::MAX)] {
            let (a, b) = (from.max(start), to.min(self.received));
            if a < b {
                self.crc.update(&chunk[(a - start) as usize..(b - start) as usize]);
            }
        }
        let mut rest = chunk;
        if self.header.is_none() {
            // Up to the header's length field first; then (below) up to the end of the header.
            let want = self.head_len().unwrap_or(16);
            let take = rest.len().min(want.saturating_sub(self.head.len()));
            self.head.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            self.check_head()?;
            // The header's length may just have become known: take the rest of the head.
            if self.header.is_none() && !rest.is_empty() {
                if let Some(want) = self.head_len() {
                    let take = rest.len().min(want - self.head.len());
                    self.head.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    self.check_head()?;
                }
            }
        }
        if let Some((header, _, expected)) = &self.header {
            if self.received > *expected {
                return Err(bad_backup(BackupError::Inconsistent {
                    detail: format!(
                        "more bytes arrived than the {expected} the header says were written (bytes after the end)"
                    ),
                }));
            }
            self.state_crc.update(rest);
            if self.state_version.len() < 2 {
                let take = rest.len().min(2 - self.state_version.len());
                self.state_version.extend_from_slice(&rest[..take]);
                if self.state_version.len() == 2 {
                    let found = u16::from_le_bytes([self.state_version[0], self.state_version[1]]);
                    if found != header.snapshot_format_version {
                        return Err(bad_backup(BackupError::Inconsistent {
                            detail: format!(
                                "the header says snapshot format version {}, the state itself {:?}",
                                header.snapshot_format_version,
                                Some(found)
                            ),
                        }));
                    }
                }
            }
        }
        Ok(())
    }

    /// The length of the head, once its length field arrived.
    fn head_len(&self) -> Option<usize> {
        let len = u32::from_le_bytes(self.head.get(12..16)?.try_into().ok()?) as usize;
        Some(backup::ENVELOPE_BYTES + 8 + len)
    }

    /// Checks what the head holds so far, in the order `backup::inspect` does where it can.
    fn check_head(&mut self) -> Result<(), ApiFailure> {
        let h = &self.head;
        if h.len() >= 4 && h[..4] != backup::MAGIC {
            return Err(bad_backup(BackupError::NotABackup {
                detail: format!("it starts with {:02x?}, not the magic {:02x?} (\"CPSN\")", &h[..4], backup::MAGIC),
            }));
        }
        if h.len() < 16 {
            return Ok(());
        }
        let version = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        if version == 0 {
            return Err(bad_backup(BackupError::NotABackup {
                detail: "backup format version 0 was never written".into(),
            }));
        }
        if version > backup::BACKUP_FORMAT_VERSION {
            return Err(bad_backup(BackupError::TooNew { found: version, supported: backup::BACKUP_FORMAT_VERSION }));
        }
        let header_len = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes")) as usize;
        if header_len > BACKUP_HEADER_BYTES_MAX {
            return Err(bad_backup(BackupError::Header {
                detail: format!(
                    "it says it is {header_len} bytes, more than the {BACKUP_HEADER_BYTES_MAX} a header may have"
                ),
            }));
        }
        let state_at = backup::ENVELOPE_BYTES + 8 + header_len;
        if h.len() < state_at {
            return Ok(());
        }
        let header_json = &h[backup::ENVELOPE_BYTES + 8..state_at];
        let stored = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes"));
        let computed = crc32fast::hash(header_json);
        if computed != stored {
            return Err(bad_backup(BackupError::Header {
                detail: format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"),
            }));
        }
        let header: BackupHeader = serde_json::from_slice(header_json)
            .map_err(|e| bad_backup(BackupError::Header { detail: e.to_string() }))?;
        if header.backup_format_version != version {
            return Err(bad_backup(BackupError::Inconsistent {
                detail: format!(
                    "the envelope says backup format version {version}, the header {}",
                    header.backup_format_version
                ),
            }));
        }
        if header.snapshot_format_version > capstan_state::codec::SNAPSHOT_FORMAT_VERSION {
            return Err(bad_backup(BackupError::State(capstan_state::codec::CodecError::TooNew {
                what: "a state snapshot",
                found: header.snapshot_format_version,
                supported: capstan_state::codec::SNAPSHOT_FORMAT_VERSION,
            })));
        }
        let expected = state_at as u64 + header.state_bytes;
        if expected > self.max_bytes {
            return Err(ApiFailure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "the backup says it is {expected} bytes; a restore takes at most {}; nothing was changed",
                    self.max_bytes
                ),
            ));
        }
        self.header = Some((header, state_at as u64, expected));
        Ok(())
    }

    /// The body ended: every check that needs the whole file but not its decoding.
    pub fn finish(self) -> Result<(), ApiFailure> {
        let found = self.received;
        let Some((header, _, expected)) = self.header else {
            // The file ended within its head (small): the full check names the problem.
            return match backup::inspect(&self.head) {
                Err(e) => Err(bad_backup(e)),
                Ok(_) => Ok(()),
            };
        };
        let stored = u32::from_le_bytes(self.head[8..12].try_into().expect("4 bytes"));
        let computed = self.crc.finalize();
        if found < expected {
            return Err(bad_backup(BackupError::Truncated { found, expected }));
        }
        if stored != computed {
            return Err(bad_backup(BackupError::Checksum { stored, computed, bytes: found - 8 }));
        }
        let state_crc32 = self.state_crc.finalize();
        if state_crc32 != header.state_crc32 {
            return Err(bad_backup(BackupError::Inconsistent {
                detail: format!(
                    "the state's checksum is {state_crc32:#010x}, the header says {:#010x}",
                    header.state_crc32
                ),
            }));
        }
        Ok(())
    }
}

/// The upload file; removed when dropped, however the restore ends.
struct Upload(PathBuf);

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Streams the body to `RESTORE_UPLOAD_FILE` (0600) in the data directory, checking it as it
/// arrives, then reads the file (only once every checksum matched) and inspects it whole.
async fn receive_backup(app: &AppState, body: Body) -> Result<Inspected, ApiFailure> {
    use futures::StreamExt as _;
    use tokio::io::AsyncWriteExt as _;
    let path = app.data_dir.join(RESTORE_UPLOAD_FILE);
    let _ = std::fs::create_dir_all(&app.data_dir);
    let _ = std::fs::remove_file(&path);
    let upload = Upload(path.clone());
    let unwritable = |e: std::io::Error| {
        ApiFailure::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "unavailable",
            format!("cannot write the restore upload {}: {e}; nothing was changed", path.display()),
        )
    };
    let mut file =
        tokio::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).await.map_err(unwritable)?;
    let mut arriving = ArrivingBackup::new(RESTORE_BODY_MAX_BYTES as u64);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiFailure::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the backup could not be received whole: {e}; nothing was changed"),
            )
        })?;
        arriving.feed(&chunk)?;
        file.write_all(&chunk).await.map_err(unwritable)?;
    }
    arriving.finish()?;
    file.flush().await.map_err(unwritable)?;
    drop(file);
    let checked = tokio::task::spawn_blocking(move || {
        let bytes = std::fs::read(&upload.0)?;
        drop(upload);
        Ok::<_, std::io::Error>(backup::inspect(&bytes))
    })
    .await
    .map_err(internal)?
    .map_err(unwritable)?;
    checked.map_err(bad_backup)
}

async fn restore(
    State(app): State<AppState>,
    Query(q): Query<RestoreQuery>,
    body: Body,
) -> Result<Json<RestoreView>, ApiFailure> {
    // One at a time: a second restore is refused at once, before its body is read.
    let Ok(_one) = app.admission.restores.try_acquire() else {
        return Err(ApiFailure::new(
            StatusCode::CONFLICT,
            "restore_in_progress",
            "another restore is in progress on this master; wait until it is answered, then try again; nothing was \
             changed",
        ));
    };
    let mut inspected = receive_backup(&app, body).await?;
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

    /// What a streamed check says of `bytes` fed in `chunk`-byte pieces: Ok, or the message.
    fn streamed(bytes: &[u8], chunk: usize) -> Result<(), String> {
        let mut a = ArrivingBackup::new(1 << 30);
        let message = |f: ApiFailure| f.message().to_string();
        for piece in bytes.chunks(chunk.max(1)) {
            a.feed(piece).map_err(message)?;
        }
        a.finish().map_err(message)
    }

    #[test]
    fn a_backup_checked_as_it_arrives_agrees_with_the_whole_check() {
        let state = capstan_state::ClusterState { index: 7, ..Default::default() };
        let good = backup::encode(&state, capstan_model::Timestamp(1), "t");
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let mut future = good.clone();
        future[4] = 9;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("good", good.clone()),
            ("truncated", good[..good.len() - 1].to_vec()),
            ("cut in the header", good[..30].to_vec()),
            ("trailing", [good.clone(), vec![0]].concat()),
            ("flipped", flipped),
            ("future", future),
            ("not a backup", b"{\"jobs\": {}}".to_vec()),
            ("empty", vec![]),
        ];
        for (what, bytes) in cases {
            let whole = backup::inspect(&bytes).map(|_| ());
            for chunk in [1, 3, 16, 4096, bytes.len()] {
                let got = streamed(&bytes, chunk);
                assert_eq!(got.is_ok(), whole.is_ok(), "{what} in pieces of {chunk}: {got:?} vs {whole:?}");
            }
        }
    }

    #[test]
    fn what_is_not_a_backup_is_refused_from_its_first_bytes() {
        let mut a = ArrivingBackup::new(1 << 30);
        assert!(a.feed(b"GARB").is_err(), "four bytes that are not the magic are enough");
        let mut a = ArrivingBackup::new(1 << 30);
        let mut head = backup::MAGIC.to_vec();
        head.extend_from_slice(&2u32.to_le_bytes());
        head.extend_from_slice(&[0; 8]);
        assert!(a.feed(&head).is_err(), "a newer backup format is refused before its body");
        // A header that claims more than the limit is refused before the state arrives.
        let state = capstan_state::ClusterState { index: 1, ..Default::default() };
        let good = backup::encode(&state, capstan_model::Timestamp(1), "t");
        let mut a = ArrivingBackup::new(good.len() as u64 - 1);
        let head_len = 20 + u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize;
        assert!(a.feed(&good[..head_len]).is_err(), "a backup larger than the limit is refused from its header");
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
