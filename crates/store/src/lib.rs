//! capstan-store: durable storage for the master's state — a log of opaque commands plus snapshots, behind one [`Store`] trait.
//!
//! The master keeps its state in memory. Every change is a command (encoded elsewhere into opaque
//! bytes) that is appended here durably *before* it is acknowledged. Now and then the master
//! installs a [`Snapshot`] of its whole state at some log index; log entries up to that index are
//! then dropped. On start it calls [`Store::load`] and replays the entries after the snapshot.
//!
//! Backends: [`EmbeddedStore`] (redb, one file) and [`EtcdStore`] (keys under a prefix in an etcd
//! cluster, for several masters). Both pass the same [`conformance`] suite, so nothing in the
//! trait mentions either. `docs/store.md` describes both.
//!
//! Architecture invariants:
//! - Every stored record is wrapped in an [`envelope`] (magic, format version, CRC-32); a reader
//!   refuses a newer version with [`StoreError::UnsupportedFormat`] and a damaged record with
//!   [`StoreError::Corrupt`] naming it — never silently.
//! - Snapshots are stored in chunks of at most [`SNAPSHOT_CHUNK_BYTES`], so no single record is
//!   larger than that plus an envelope header (etcd limits a request to 1.5 MiB).
//! - `append` is one durable commit per call (group commit): callers batch commands.
//! - No global state. The trait is sync; the etcd backend hides its async client behind a private
//!   runtime of its own, and its only clock use is the deadline on each etcd call.

pub mod conformance;
mod embedded;
pub mod envelope;
pub mod etcd;
pub mod etcd_process;

pub use embedded::{EmbeddedConfig, EmbeddedStore, STORE_FILE_NAME};
pub use etcd::{
    EtcdConfig, EtcdStore, Fence, LogWatch, LogWatchEvent, DEFAULT_PREFIX, ETCD_ENTRY_BYTES_MAX, LOG_PART_BYTES_MAX,
};
pub use etcd_process::{etcd_missing, etcd_or_skip, EtcdProcess, ETCD_BIN_ENV};

#[doc(hidden)]
pub use embedded::fault_injection;

/// The largest piece a snapshot is split into when stored (1 MiB).
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// One command in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Position in the log; the first entry ever appended has index 1.
    pub index: u64,
    /// The encoded command; opaque to the store.
    pub data: Vec<u8>,
}

/// The master's whole state as of log index `index` (every entry `<= index` is applied in it).
#[derive(Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub index: u64,
    /// Opaque encoded state; may be 100+ MiB.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Snapshot {
    // The data may be 100 MiB: print its size, not its bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").field("index", &self.index).field("data_bytes", &self.data.len()).finish()
    }
}

/// What [`Store::load`] returns: the newest snapshot and the log entries after it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Loaded {
    pub snapshot: Option<Snapshot>,
    /// Entries strictly after the snapshot (or from index 1 without one), in order, consecutive.
    pub entries: Vec<LogEntry>,
}

/// Durable storage for the master: a log of commands plus the newest snapshot.
///
/// All methods take `&self` and may be called from several threads; writes are serialized by the
/// backend, and each call is atomic.
pub trait Store: Send + Sync + 'static {
    /// Durably and atomically appends `entries` (one commit, one fsync, for the whole batch).
    ///
    /// `entries[0].index` must be `last_index() + 1` and the indexes consecutive, otherwise
    /// [`StoreError::OutOfOrder`] and nothing is written. An empty slice is a no-op. On an I/O
    /// error (e.g. a full disk) nothing of the batch is stored, everything appended before stays,
    /// and the store remains usable for later calls.
    fn append(&self, entries: &[LogEntry]) -> Result<(), StoreError>;

    /// Reads the newest snapshot and every log entry after it, verifying every checksum.
    fn load(&self) -> Result<Loaded, StoreError>;

    /// Durably stores `snapshot`, then drops log entries with index `<= snapshot.index`, in one
    /// atomic step: a crash leaves either the old snapshot with the old log, or the new one with
    /// the trimmed log.
    ///
    /// A snapshot older than the installed one is refused with [`StoreError::StaleSnapshot`]
    /// (nothing changes); one at the same index replaces it. A snapshot beyond the last log index
    /// is accepted (e.g. a restore from backup): the whole log is dropped and
    /// `last_index()` becomes `snapshot.index`.
    fn install_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError>;

    /// The index of the last entry appended, or the snapshot's index when the log after it is
    /// empty; 0 for an empty store.
    fn last_index(&self) -> Result<u64, StoreError>;

    /// Where the data lives, for logs and error messages, e.g. "embedded store at /x/state.redb".
    fn describe(&self) -> String;
}

impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn append(&self, entries: &[LogEntry]) -> Result<(), StoreError> {
        (**self).append(entries)
    }
    fn load(&self) -> Result<Loaded, StoreError> {
        (**self).load()
    }
    fn install_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        (**self).install_snapshot(snapshot)
    }
    fn last_index(&self) -> Result<u64, StoreError> {
        (**self).last_index()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// Everything that can go wrong in a store. Messages name the file or record and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The operating system refused a read or write (full disk, permissions, ...).
    #[error("I/O error on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A record or the store file itself is damaged.
    #[error("{what} is corrupt: {detail}; restore the store from a backup")]
    Corrupt { what: String, detail: String },
    /// Written by a newer capstan than this one.
    #[error(
        "{what} has format version {found}, but this capstan understands only up to version \
         {supported}; run a capstan release that supports version {found}"
    )]
    UnsupportedFormat { found: u32, supported: u32, what: String },
    /// An append did not continue the log exactly; nothing was written.
    #[error("append out of order: expected index {expected}, got {found}; nothing was written")]
    OutOfOrder { expected: u64, found: u64 },
    /// A snapshot older than the installed one was offered; nothing was changed.
    #[error(
        "snapshot at index {offered} is older than the installed snapshot at index {installed}; \
         nothing was changed"
    )]
    StaleSnapshot { offered: u64, installed: u64 },
    /// Another process (or another handle in this one) has the store open.
    #[error("{what} is in use by another process (or another handle in this one); stop it first")]
    InUse { what: String },
    /// A write was refused because this process no longer holds the leadership it was fenced with.
    #[error("the write was refused: {detail}; nothing was written")]
    Fenced { detail: String },
    /// The store could not be reached or did not answer in time; a write's outcome is unknown.
    #[error("{what} did not answer: {detail}")]
    Unavailable { what: String, detail: String },
    /// Any other backend failure, with the backend's message.
    #[error("{0}")]
    Backend(String),
}
