//! The embedded backend: the whole store in one redb file, `DIR/state.redb`.
//!
//! Tables (every value wrapped in an [`envelope`](crate::envelope)):
//! - `meta`: `"store_format_version"` → u32 LE; `"snapshot"` → snapshot header (index, data
//!   length, chunk count, CRC-32 of the whole data).
//! - `log`: index (u64) → command bytes.
//! - `snapshot_chunks`: (snapshot index u64, chunk number u32) → up to
//!   [`SNAPSHOT_CHUNK_BYTES`] of snapshot data.
//!
//! Each `append` and `install_snapshot` is one redb write transaction, committed with
//! `Durability::Immediate` (one fdatasync), so each is atomic and durable.
//!
//! Crash recovery and `quick_repair`: redb after an unclean shutdown either walks the file's trees
//! to rebuild its allocator (quick repair off) or reads the allocator state saved by the last
//! commit (quick repair on: two-phase commit, each commit slower). Measured on the 2-core dev VM,
//! same disk as /work, `cargo run --release -p capstan-store --example store_bench DIR`
//! (1,000,000 entries of 60 bytes in batches of 1,000; a 100 MiB snapshot at index 500,000; one
//! more batch then `abort()`; reopen; three runs):
//!
//! | quick_repair | append 1M entries      | reopen after the crash | reopen + load (100 MiB + 500k entries) |
//! |--------------|------------------------|------------------------|----------------------------------------|
//! | off          | 1.2–1.6 s (631–843 commits/s) | 51–57 ms (514 MiB file) | 232–254 ms                    |
//! | on           | 1.9–2.4 s (413–519 commits/s) | < 1 ms (362 MiB file)   | 239–307 ms                    |
//!
//! Default: **off**. Commit rate is what limits throughput, and the repair walk of a file holding a
//! 100 MiB snapshot plus 500k entries costs ~55 ms, far inside the 10 s restart budget. Turn it on
//! with [`EmbeddedConfig::quick_repair`] if a store ever grows to where the walk matters.
//!
//! After an I/O error (full disk) redb refuses every further operation on that handle, so the
//! store drops the handle and reopens the file (redb repairs to the last commit); if that fails
//! too it retries on the next call. Nothing committed is lost, and the failed batch is absent.

use std::ops::Bound;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle, WriteTransaction,
};

use crate::envelope;
use crate::{Loaded, LogEntry, Snapshot, Store, StoreError, SNAPSHOT_CHUNK_BYTES};

/// The file, inside the directory given to [`EmbeddedStore::open`], that holds the store.
pub const STORE_FILE_NAME: &str = "state.redb";

/// Layout of the whole file (tables and keys). Bump with a migration when it changes.
pub(crate) const STORE_FORMAT_VERSION: u32 = 1;
/// Format of a log entry's payload (the command bytes as given).
pub(crate) const LOG_ENTRY_VERSION: u32 = 1;
/// Format of the snapshot header payload.
pub(crate) const SNAPSHOT_HEADER_VERSION: u32 = 1;
/// Format of a snapshot chunk's payload (raw data bytes).
pub(crate) const SNAPSHOT_CHUNK_VERSION: u32 = 1;
/// Format of the store format version record itself (a u32 LE).
pub(crate) const FORMAT_RECORD_VERSION: u32 = 1;

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
pub(crate) const CHUNKS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("snapshot_chunks");
pub(crate) const KEY_FORMAT: &str = "store_format_version";
pub(crate) const KEY_SNAPSHOT: &str = "snapshot";

const SNAPSHOT_HEADER_BYTES: usize = 8 + 8 + 4 + 4;

/// Tunables of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Save redb's allocator state with each commit so a reopen after a crash is instant instead
    /// of walking the file's trees. Default: off, for the higher commit rate (see the module docs
    /// for the measurements).
    pub quick_repair: bool,
    /// redb's page cache. The master keeps its whole state in memory and reads the store only
    /// when it starts, so a small cache is enough; it counts in the master's memory per task.
    pub cache_size_bytes: usize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self { quick_repair: false, cache_size_bytes: 32 << 20 }
    }
}

/// A [`Store`] in one redb file, `DIR/state.redb`.
pub struct EmbeddedStore {
    path: PathBuf,
    config: EmbeddedConfig,
    /// `None` after an I/O error closed the handle and the reopen failed; the next call retries.
    db: RwLock<Option<Database>>,
    /// Set when an operation hit an I/O error: redb refuses further use of that handle.
    needs_reopen: AtomicBool,
}

/// The snapshot header kept in `meta["snapshot"]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SnapshotHeader {
    index: u64,
    data_bytes: u64,
    chunk_count: u32,
    data_crc32: u32,
}

impl SnapshotHeader {
    fn encode(&self) -> [u8; SNAPSHOT_HEADER_BYTES] {
        let mut out = [0u8; SNAPSHOT_HEADER_BYTES];
        out[0..8].copy_from_slice(&self.index.to_le_bytes());
        out[8..16].copy_from_slice(&self.data_bytes.to_le_bytes());
        out[16..20].copy_from_slice(&self.chunk_count.to_le_bytes());
        out[20..24].copy_from_slice(&self.data_crc32.to_le_bytes());
        out
    }

    fn decode(payload: &[u8], what: impl FnOnce() -> String) -> Result<Self, StoreError> {
        if payload.len() != SNAPSHOT_HEADER_BYTES {
            return Err(StoreError::Corrupt {
                what: what(),
                detail: format!("snapshot header is {} bytes, expected {SNAPSHOT_HEADER_BYTES}", payload.len()),
            });
        }
        let u64_at = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8"));
        let u32_at = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().expect("4"));
        Ok(Self { index: u64_at(0), data_bytes: u64_at(8), chunk_count: u32_at(16), data_crc32: u32_at(20) })
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir`, file `dir/state.redb`, with the default
    /// [`EmbeddedConfig`].
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, EmbeddedConfig::default())
    }

    /// Opens (creating if needed) the store in `dir` with `config`.
    pub fn open_with(dir: &Path, config: EmbeddedConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| StoreError::Io { what: format!("store directory {}", dir.display()), source })?;
        let path = dir.join(STORE_FILE_NAME);
        owner_only(dir, &path)?;
        let db = open_database(&path, &config)?;
        let store = Self { path, config, db: RwLock::new(Some(db)), needs_reopen: AtomicBool::new(false) };
        store.with_db(|db| store.check_format(db))?;
        Ok(store)
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file_name(&self) -> String {
        format!("store file {}", self.path.display())
    }

    /// Maps a redb error, noting whether it disabled the handle.
    fn redb_err(&self, context: &str, error: impl Into<redb::Error>) -> StoreError {
        let error = error.into();
        if matches!(error, redb::Error::Io(_) | redb::Error::PreviousIo) {
            self.needs_reopen.store(true, Ordering::Release);
        }
        map_redb_error(&self.path, context, error)
    }

    /// Runs `op` on the open database, reopening first if an earlier I/O error closed it, and
    /// closing + reopening afterwards if `op` hit one.
    fn with_db<T>(&self, op: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        if self.needs_reopen.load(Ordering::Acquire) {
            self.reopen()?;
        }
        let result = {
            let guard = self.db.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            match guard.as_ref() {
                Some(db) => op(db),
                None => Err(StoreError::Backend(format!(
                    "{} is closed after an earlier I/O error and could not be reopened; \
                     free disk space or fix the file system, then retry",
                    self.file_name()
                ))),
            }
        };
        if result.is_err() && self.needs_reopen.load(Ordering::Acquire) {
            // Best effort now; if it fails, the next call tries again.
            if let Err(error) = self.reopen() {
                tracing::warn!(%error, "reopening the store after an I/O error failed");
            }
        }
        result
    }

    /// Closes the handle and opens the file again (redb recovers to the last commit).
    fn reopen(&self) -> Result<(), StoreError> {
        let mut guard = self.db.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !self.needs_reopen.load(Ordering::Acquire) {
            return Ok(()); // another thread already did it
        }
        // Drop the failed handle first: it holds the file lock.
        drop(guard.take());
        let db = open_database(&self.path, &self.config)?;
        *guard = Some(db);
        self.needs_reopen.store(false, Ordering::Release);
        tracing::info!(path = %self.path.display(), "reopened the store after an I/O error");
        Ok(())
    }

    fn begin_write(&self, db: &Database) -> Result<WriteTransaction, StoreError> {
        let mut txn = db.begin_write().map_err(|e| self.redb_err("starting a write", e))?;
        txn.set_quick_repair(self.config.quick_repair);
        Ok(txn)
    }

    /// Creates the tables and format record in a new file; checks the format of an existing one.
    fn check_format(&self, db: &Database) -> Result<(), StoreError> {
        let what = || format!("store format version record in {}", self.path.display());
        let found = {
            let txn = db.begin_read().map_err(|e| self.redb_err("starting a read", e))?;
            let tables: Vec<String> = txn
                .list_tables()
                .map_err(|e| self.redb_err("listing tables", e))?
                .map(|t| t.name().to_string())
                .collect();
            if tables.is_empty() {
                None
            } else if !tables.iter().any(|t| t == META.name()) {
                return Err(StoreError::Corrupt {
                    what: self.file_name(),
                    detail: format!(
                        "it is a redb database but has no `meta` table (tables: {tables:?}); \
                         it was not written by capstan"
                    ),
                });
            } else {
                let meta = txn.open_table(META).map_err(|e| self.redb_err("opening meta", e))?;
                let record = meta
                    .get(KEY_FORMAT)
                    .map_err(|e| self.redb_err("reading the format version", e))?
                    .ok_or_else(|| StoreError::Corrupt {
                        what: self.file_name(),
                        detail: "the store format version record is missing".to_string(),
                    })?;
                let decoded = envelope::decode(record.value(), FORMAT_RECORD_VERSION, what)?;
                let bytes: [u8; 4] = decoded.payload.try_into().map_err(|_| StoreError::Corrupt {
                    what: what(),
                    detail: format!("expected 4 bytes, found {}", decoded.payload.len()),
                })?;
                Some(u32::from_le_bytes(bytes))
            }
        };
        match found {
            None => {
                let txn = self.begin_write(db)?;
                {
                    let mut meta = txn.open_table(META).map_err(|e| self.redb_err("creating meta", e))?;
                    let record = envelope::encode(FORMAT_RECORD_VERSION, &STORE_FORMAT_VERSION.to_le_bytes());
                    meta.insert(KEY_FORMAT, record.as_slice())
                        .map_err(|e| self.redb_err("writing the format version", e))?;
                    txn.open_table(LOG).map_err(|e| self.redb_err("creating log", e))?;
                    txn.open_table(CHUNKS).map_err(|e| self.redb_err("creating snapshot_chunks", e))?;
                }
                txn.commit().map_err(|e| self.redb_err("creating the store", e))?;
                Ok(())
            }
            Some(version) if version > STORE_FORMAT_VERSION => Err(StoreError::UnsupportedFormat {
                found: version,
                supported: STORE_FORMAT_VERSION,
                what: self.file_name(),
            }),
            // Migrations from older layouts go here when there are any.
            Some(version) if version == STORE_FORMAT_VERSION => Ok(()),
            Some(version) => Err(StoreError::Corrupt {
                what: self.file_name(),
                detail: format!("store format version {version} was never written by capstan"),
            }),
        }
    }

    fn read_snapshot_header(
        &self,
        meta: &impl ReadableTable<&'static str, &'static [u8]>,
    ) -> Result<Option<SnapshotHeader>, StoreError> {
        let Some(record) = meta.get(KEY_SNAPSHOT).map_err(|e| self.redb_err("reading the snapshot header", e))? else {
            return Ok(None);
        };
        let what = || format!("snapshot header in {}", self.path.display());
        let decoded = envelope::decode(record.value(), SNAPSHOT_HEADER_VERSION, what)?;
        SnapshotHeader::decode(decoded.payload, what).map(Some)
    }

    fn last_log_index(&self, log: &impl ReadableTable<u64, &'static [u8]>) -> Result<Option<u64>, StoreError> {
        Ok(log.last().map_err(|e| self.redb_err("reading the last log entry", e))?.map(|(key, _)| key.value()))
    }
}

impl Store for EmbeddedStore {
    fn append(&self, entries: &[LogEntry]) -> Result<(), StoreError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        for pair in entries.windows(2) {
            if pair[1].index != pair[0].index.wrapping_add(1) {
                return Err(StoreError::OutOfOrder { expected: pair[0].index.wrapping_add(1), found: pair[1].index });
            }
        }
        self.with_db(|db| {
            let txn = self.begin_write(db)?;
            {
                let mut log = txn.open_table(LOG).map_err(|e| self.redb_err("opening log", e))?;
                let last = match self.last_log_index(&log)? {
                    Some(last) => last,
                    None => {
                        let meta = txn.open_table(META).map_err(|e| self.redb_err("opening meta", e))?;
                        self.read_snapshot_header(&meta)?.map_or(0, |h| h.index)
                    }
                };
                if first.index != last + 1 {
                    drop(log);
                    txn.abort().map_err(|e| self.redb_err("aborting a write", e))?;
                    return Err(StoreError::OutOfOrder { expected: last + 1, found: first.index });
                }
                let mut record = Vec::new();
                for entry in entries {
                    record.clear();
                    envelope::encode_into(&mut record, LOG_ENTRY_VERSION, &entry.data);
                    log.insert(entry.index, record.as_slice()).map_err(|e| self.redb_err("writing a log entry", e))?;
                }
            }
            txn.commit().map_err(|e| self.redb_err("committing an append", e))
        })
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        self.with_db(|db| {
            // One read transaction: a consistent view even while others write.
            let txn = db.begin_read().map_err(|e| self.redb_err("starting a read", e))?;
            let meta = txn.open_table(META).map_err(|e| self.redb_err("opening meta", e))?;
            let header = self.read_snapshot_header(&meta)?;
            let snapshot = match header {
                None => None,
                Some(header) => {
                    let chunks = txn.open_table(CHUNKS).map_err(|e| self.redb_err("opening snapshot_chunks", e))?;
                    Some(self.read_snapshot(&chunks, header)?)
                }
            };
            let log = txn.open_table(LOG).map_err(|e| self.redb_err("opening log", e))?;
            let after = snapshot.as_ref().map_or(0, |s| s.index);
            let capacity = log.len().map_err(|e| self.redb_err("counting log entries", e))?;
            let mut entries = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
            let rows = log.iter().map_err(|e| self.redb_err("reading the log", e))?;
            for (expected, item) in (after + 1..).zip(rows) {
                let (key, value) = item.map_err(|e| self.redb_err("reading the log", e))?;
                let index = key.value();
                if index != expected {
                    return Err(StoreError::Corrupt {
                        what: format!("log in {}", self.path.display()),
                        detail: if index < expected {
                            format!(
                                "entry {index} is covered by the snapshot at index {after} \
                                 but was not dropped"
                            )
                        } else {
                            format!("entries {expected}..{index} are missing")
                        },
                    });
                }
                let decoded = envelope::decode(value.value(), LOG_ENTRY_VERSION, || {
                    format!("log entry {index} in {}", self.path.display())
                })?;
                entries.push(LogEntry { index, data: decoded.payload.to_vec() });
            }
            Ok(Loaded { snapshot, entries })
        })
    }

    fn install_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let data_bytes = snapshot.data.len();
        let chunk_count = u32::try_from(data_bytes.div_ceil(SNAPSHOT_CHUNK_BYTES))
            .map_err(|_| StoreError::Backend(format!("snapshot of {data_bytes} bytes is too large")))?;
        let header = SnapshotHeader {
            index: snapshot.index,
            data_bytes: data_bytes as u64,
            chunk_count,
            data_crc32: crc32fast::hash(&snapshot.data),
        };
        self.with_db(|db| {
            let txn = self.begin_write(db)?;
            {
                let mut meta = txn.open_table(META).map_err(|e| self.redb_err("opening meta", e))?;
                let old = self.read_snapshot_header(&meta)?;
                if let Some(old) = old {
                    if snapshot.index < old.index {
                        drop(meta);
                        txn.abort().map_err(|e| self.redb_err("aborting a write", e))?;
                        return Err(StoreError::StaleSnapshot { offered: snapshot.index, installed: old.index });
                    }
                }
                let mut chunks = txn.open_table(CHUNKS).map_err(|e| self.redb_err("opening snapshot_chunks", e))?;
                if let Some(old) = old {
                    chunks
                        .retain_in((old.index, 0)..=(old.index, u32::MAX), |_, _| false)
                        .map_err(|e| self.redb_err("dropping the old snapshot", e))?;
                }
                let mut record = Vec::with_capacity(envelope::HEADER_BYTES + SNAPSHOT_CHUNK_BYTES);
                for (number, chunk) in snapshot.data.chunks(SNAPSHOT_CHUNK_BYTES).enumerate() {
                    record.clear();
                    envelope::encode_into(&mut record, SNAPSHOT_CHUNK_VERSION, chunk);
                    chunks
                        .insert((snapshot.index, number as u32), record.as_slice())
                        .map_err(|e| self.redb_err("writing a snapshot chunk", e))?;
                }
                let record = envelope::encode(SNAPSHOT_HEADER_VERSION, &header.encode());
                meta.insert(KEY_SNAPSHOT, record.as_slice())
                    .map_err(|e| self.redb_err("writing the snapshot header", e))?;
                let mut log = txn.open_table(LOG).map_err(|e| self.redb_err("opening log", e))?;
                log.retain_in(..=snapshot.index, |_, _| false)
                    .map_err(|e| self.redb_err("dropping covered log entries", e))?;
            }
            txn.commit().map_err(|e| self.redb_err("committing a snapshot", e))
        })
    }

    fn last_index(&self) -> Result<u64, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| self.redb_err("starting a read", e))?;
            let log = txn.open_table(LOG).map_err(|e| self.redb_err("opening log", e))?;
            if let Some(last) = self.last_log_index(&log)? {
                return Ok(last);
            }
            let meta = txn.open_table(META).map_err(|e| self.redb_err("opening meta", e))?;
            Ok(self.read_snapshot_header(&meta)?.map_or(0, |h| h.index))
        })
    }

    fn describe(&self) -> String {
        format!("embedded store at {}", self.path.display())
    }
}

impl EmbeddedStore {
    fn read_snapshot(
        &self,
        chunks: &impl ReadableTable<(u64, u32), &'static [u8]>,
        header: SnapshotHeader,
    ) -> Result<Snapshot, StoreError> {
        let what = || format!("snapshot at index {} in {}", header.index, self.path.display());
        let data_bytes = usize::try_from(header.data_bytes).map_err(|_| StoreError::Corrupt {
            what: what(),
            detail: format!("length {} does not fit in memory", header.data_bytes),
        })?;
        let mut data = Vec::with_capacity(data_bytes);
        let mut expected_chunk = 0u32;
        let range = chunks
            .range((Bound::Included((header.index, 0)), Bound::Included((header.index, u32::MAX))))
            .map_err(|e| self.redb_err("reading snapshot chunks", e))?;
        for item in range {
            let (key, value) = item.map_err(|e| self.redb_err("reading a snapshot chunk", e))?;
            let (_, number) = key.value();
            let chunk_what = || {
                format!("snapshot chunk {number} of the snapshot at index {} in {}", header.index, self.path.display())
            };
            if number != expected_chunk {
                return Err(StoreError::Corrupt {
                    what: what(),
                    detail: format!("chunk {expected_chunk} is missing (found chunk {number})"),
                });
            }
            let decoded = envelope::decode(value.value(), SNAPSHOT_CHUNK_VERSION, chunk_what)?;
            data.extend_from_slice(decoded.payload);
            expected_chunk += 1;
        }
        if expected_chunk != header.chunk_count || data.len() != data_bytes {
            return Err(StoreError::Corrupt {
                what: what(),
                detail: format!(
                    "expected {} chunks / {} bytes, found {expected_chunk} chunks / {} bytes",
                    header.chunk_count,
                    header.data_bytes,
                    data.len()
                ),
            });
        }
        let crc = crc32fast::hash(&data);
        if crc != header.data_crc32 {
            return Err(StoreError::Corrupt {
                what: what(),
                detail: format!(
                    "checksum of the whole data mismatch (stored {:#010x}, computed {crc:#010x})",
                    header.data_crc32
                ),
            });
        }
        Ok(Snapshot { index: header.index, data })
    }
}

/// The store holds every job's environment: its directory is 0700 and its file 0600, also when
/// they existed before with wider modes. The file is created here (empty, 0600) so that it is never
/// readable by others, not even between its creation and a chmod.
fn owner_only(dir: &Path, path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |what: String| move |source| StoreError::Io { what, source };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("making store directory {} private (0700)", dir.display())))?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(format!("store file {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("making store file {} private (0600)", path.display())))
}

/// Opens or creates the redb file, turning "not a database" (including redb panics on garbage)
/// into an error that names the file.
fn open_database(path: &Path, config: &EmbeddedConfig) -> Result<Database, StoreError> {
    let mut builder = Database::builder();
    builder.set_cache_size(config.cache_size_bytes);
    // redb documents that opening a file it did not write "may panic"; turn that into an error.
    match catch_unwind(AssertUnwindSafe(|| builder.create(path))) {
        Ok(Ok(db)) => Ok(db),
        // redb reports "not a redb database" and short reads of a truncated file as I/O errors.
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(error))))
            if matches!(error.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof) =>
        {
            Err(StoreError::Corrupt {
                what: format!("store file {}", path.display()),
                detail: format!("not a redb database, or truncated ({error}); is this the right data directory?"),
            })
        }
        Ok(Err(error)) => Err(map_redb_error(path, "opening", error.into())),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(StoreError::Corrupt {
                what: format!("store file {}", path.display()),
                detail: format!("not a valid redb database (truncated or overwritten?): redb panicked: {message}"),
            })
        }
    }
}

fn map_redb_error(path: &Path, context: &str, error: redb::Error) -> StoreError {
    let file = format!("store file {}", path.display());
    match error {
        redb::Error::Io(source) => StoreError::Io { what: file, source },
        redb::Error::Corrupted(detail) => {
            StoreError::Corrupt { what: file, detail: format!("{context}: {detail} (not a redb database, or damaged)") }
        }
        redb::Error::DatabaseAlreadyOpen => StoreError::InUse { what: file },
        redb::Error::UpgradeRequired(version) => StoreError::UnsupportedFormat {
            found: u32::from(version),
            supported: 0,
            what: format!("{file} (redb file format; this redb needs an upgrade step)"),
        },
        redb::Error::PreviousIo => StoreError::Backend(format!(
            "{context} on {file}: an earlier I/O error closed the handle; it will be reopened"
        )),
        other => StoreError::Backend(format!("{context} on {file}: {other}")),
    }
}

/// Test helpers that damage a store file on purpose. Not for production use.
#[doc(hidden)]
pub mod fault_injection {
    use super::*;

    fn with_write(dir: &Path, f: impl FnOnce(&WriteTransaction)) {
        let db = Database::create(dir.join(STORE_FILE_NAME)).expect("open the store file");
        let txn = db.begin_write().expect("begin write");
        f(&txn);
        txn.commit().expect("commit");
    }

    /// Flips one byte of the payload of log entry `index` (the envelope checksum no longer matches).
    pub fn corrupt_log_entry(dir: &Path, index: u64) {
        with_write(dir, |txn| {
            let mut log = txn.open_table(LOG).unwrap();
            let mut bytes = log.get(index).unwrap().expect("entry exists").value().to_vec();
            let last = bytes.len() - 1;
            bytes[last] ^= 0x40;
            log.insert(index, bytes.as_slice()).unwrap();
        });
    }

    /// Flips one byte of the payload of chunk `number` of the installed snapshot.
    pub fn corrupt_snapshot_chunk(dir: &Path, snapshot_index: u64, number: u32) {
        with_write(dir, |txn| {
            let mut chunks = txn.open_table(CHUNKS).unwrap();
            let key = (snapshot_index, number);
            let mut bytes = chunks.get(key).unwrap().expect("chunk exists").value().to_vec();
            bytes[envelope::HEADER_BYTES] ^= 0x01;
            chunks.insert(key, bytes.as_slice()).unwrap();
        });
    }

    /// Rewrites log entry `index` with a valid envelope of record format `version`.
    pub fn rewrite_log_entry_version(dir: &Path, index: u64, version: u32) {
        with_write(dir, |txn| {
            let mut log = txn.open_table(LOG).unwrap();
            let bytes = log.get(index).unwrap().expect("entry exists").value().to_vec();
            let payload = bytes[envelope::HEADER_BYTES..].to_vec();
            log.insert(index, envelope::encode(version, &payload).as_slice()).unwrap();
        });
    }

    /// Records `version` as the store format version of the file.
    pub fn set_store_format_version(dir: &Path, version: u32) {
        with_write(dir, |txn| {
            let mut meta = txn.open_table(META).unwrap();
            let record = envelope::encode(FORMAT_RECORD_VERSION, &version.to_le_bytes());
            meta.insert(KEY_FORMAT, record.as_slice()).unwrap();
        });
    }
}
