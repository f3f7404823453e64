//! The etcd backend: the log and snapshots as keys under `{prefix}/store/` in an etcd cluster, behind the sync [`Store`] trait.
//!
//! Keys (every value wrapped in an [`envelope`](crate::envelope)):
//! - `{prefix}/store/format` → store layout version (u32 LE).
//! - `{prefix}/store/last` → the last log index (u64 LE). It is the one truth about the end of
//!   the log: it moves in the same transaction as the final part of a batch, so a batch is visible
//!   all or nothing. Absent in an empty store.
//! - `{prefix}/store/log/{first:020}-{last:020}` → one part of an appended batch: entries
//!   `first..=last` as `count u32 | (len u32 | bytes)*`. A batch is one part unless it is larger
//!   than [`LOG_PART_BYTES_MAX`]. Parts with `first > last` (a batch cut short) are invisible:
//!   load ignores them and the next append deletes them.
//! - `{prefix}/store/snapshot` → the snapshot meta record: index, data length, chunk count, CRC-32
//!   of the whole data, and the id of its chunk set.
//! - `{prefix}/store/chunks/{index:020}-{set:020}/{number:010}` → up to
//!   [`SNAPSHOT_CHUNK_BYTES`] of snapshot data. `set` is the etcd revision at which the install
//!   began, so a snapshot at the same index never overwrites the chunks of the installed one.
//!
//! Writes. Every write transaction carries the fence compare when a [`Fence`] is set
//! (`create_revision(fence.key) == fence.create_revision`) and, for log writes and the snapshot
//! flip, a compare that `last` (and the snapshot record) did not move since it was read. Each
//! transaction stays under etcd's defaults (1.5 MiB per request, 128 operations): a log part is at
//! most [`LOG_PART_BYTES_MAX`] and every transaction has at most four operations.
//! `install_snapshot` writes the chunks first (one transaction each), then one transaction puts
//! the meta record, moves `last` when the snapshot is beyond the log, and deletes every other chunk
//! set and every log part the snapshot covers; then etcd's history is compacted at that revision.
//!
//! Reads run at one etcd revision, so `load` sees a consistent store while others write.
//!
//! Threads. The store owns a small tokio runtime (2 workers, named `capstan-etcd`); every sync
//! method spawns its work there and waits on a std channel, so it works from plain threads and
//! from inside another tokio runtime alike (it blocks that thread while it waits). Every etcd call
//! has a deadline (`request_timeout`); past it the call fails with [`StoreError::Unavailable`].

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KvClient,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};

use crate::envelope;
use crate::{Loaded, LogEntry, Snapshot, Store, StoreError, SNAPSHOT_CHUNK_BYTES};

/// Layout of the keys under `{prefix}/store/`. Bump with a migration when it changes.
pub(crate) const STORE_FORMAT_VERSION: u32 = 1;
/// Format of the `format` record itself (a u32 LE).
const FORMAT_RECORD_VERSION: u32 = 1;
/// Format of the `last` record (a u64 LE).
const LAST_RECORD_VERSION: u32 = 1;
/// Format of a log part's payload.
const LOG_PART_VERSION: u32 = 1;
/// Format of the snapshot meta record.
const SNAPSHOT_META_VERSION: u32 = 1;
/// Format of a snapshot chunk (raw data bytes).
const SNAPSHOT_CHUNK_VERSION: u32 = 1;

/// The largest payload of one log part (1 MiB): a part and its transaction stay well under
/// etcd's default request limit of 1.5 MiB.
pub const LOG_PART_BYTES_MAX: usize = 1 << 20;
/// The largest command the etcd store accepts (a part holds at least one whole command).
pub const ETCD_ENTRY_BYTES_MAX: usize = LOG_PART_BYTES_MAX - 8;

/// Keys per range read: parts and chunks are at most ~1 MiB, so a page stays under
/// [`DECODING_BYTES_MAX`].
const PAGE_KEYS: i64 = 16;
/// The largest answer the store's KV client decodes (tonic's default is 4 MiB).
const DECODING_BYTES_MAX: usize = 64 << 20;
/// How often a read is retried when a compaction removed the revision it was reading at.
const READ_ATTEMPTS: u32 = 5;
/// How often the snapshot flip is retried when `last` moved meanwhile.
const FLIP_ATTEMPTS: u32 = 5;
/// Name of the store runtime's threads; a sync call from one of them is refused (it would
/// block a worker the call itself needs).
const THREAD_NAME: &str = "capstan-etcd";
/// Entries handed to a log watcher before it must take them (batches in the channel).
const WATCH_CHANNEL_BATCHES: usize = 64;

// gRPC status codes that mean "the server could not be reached or did not answer".
const GRPC_CANCELLED: i32 = 1;
const GRPC_UNKNOWN: i32 = 2;
const GRPC_DEADLINE_EXCEEDED: i32 = 4;
const GRPC_UNAVAILABLE: i32 = 14;

/// Where the etcd store is and how long it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client endpoints, e.g. "http://127.0.0.1:2379".
    pub endpoints: Vec<String>,
    /// Key prefix, default "/capstan"; the store uses `{prefix}/store/…` and never touches
    /// `{prefix}/election/`.
    pub prefix: String,
    /// How long connecting may take. Default 2 s.
    pub dial_timeout: Duration,
    /// How long any one etcd call may take before it is [`StoreError::Unavailable`]. Default 5 s.
    pub request_timeout: Duration,
}

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/capstan";

impl EtcdConfig {
    /// A config for `endpoints` with the defaults.
    pub fn new(endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            dial_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }

    /// "etcd://host:port[,host:port…][/prefix]" → config with defaults; clear error otherwise.
    pub fn from_url(url: &str) -> Result<EtcdConfig, StoreError> {
        let bad = |detail: String| StoreError::Backend(format!("store URL `{url}` is not valid: {detail}"));
        let rest = url.strip_prefix("etcd://").ok_or_else(|| {
            bad("it must start with `etcd://`, e.g. `etcd://127.0.0.1:2379,10.0.0.2:2379/capstan`".to_string())
        })?;
        let (hosts, prefix) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, ""),
        };
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let host = host.trim();
            let Some((name, port)) = host.rsplit_once(':') else {
                return Err(bad(format!("`{host}` has no port; write host:port")));
            };
            if name.is_empty() || name.contains(['@', '?', '#', ' ']) {
                return Err(bad(format!("`{host}` is not a host:port")));
            }
            if port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(bad(format!("`{port}` in `{host}` is not a port number")));
            }
            endpoints.push(format!("http://{host}"));
        }
        let prefix = prefix.trim_end_matches('/');
        if prefix.contains(['?', '#']) {
            return Err(bad(format!("prefix `{prefix}` may not contain `?` or `#`")));
        }
        let mut config = EtcdConfig::new(endpoints);
        if !prefix.is_empty() {
            config.prefix = prefix.to_string();
        }
        Ok(config)
    }
}

/// The leadership a store's writes are conditional on: the key the leader holds in etcd and its
/// create revision. A write whose compare fails returns [`StoreError::Fenced`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub create_revision: i64,
}

/// What a [`LogWatch`] reports.
#[derive(Debug)]
pub enum LogWatchEvent {
    /// Entries appended after the previous event (consecutive, in order).
    Entries(Vec<LogEntry>),
    /// A snapshot at `index` covers entries the watcher has not seen: call [`Store::load`] and
    /// watch again from the new position.
    SnapshotInstalled { index: u64 },
}

/// Follows the log for a warm standby. Dropping it stops the watch.
pub struct LogWatch {
    receiver: std::sync::mpsc::Receiver<Result<LogWatchEvent, StoreError>>,
    task: tokio::task::JoinHandle<()>,
}

impl LogWatch {
    /// Waits up to `timeout` for the next event. `Ok(None)`: nothing new. An `Err` ends the
    /// watch (the store was dropped, or a record could not be read).
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<LogWatchEvent>, StoreError> {
        use std::sync::mpsc::RecvTimeoutError;
        match self.receiver.recv_timeout(timeout) {
            Ok(event) => event.map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                Err(StoreError::Backend("the log watch ended (the etcd store was dropped)".to_string()))
            }
        }
    }
}

impl Drop for LogWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A [`Store`] in etcd. See the module documentation for the key layout.
pub struct EtcdStore {
    inner: Arc<Inner>,
    client: Client,
    /// `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    /// Serializes this process's writes (appends and snapshot installs).
    write_lock: Mutex<()>,
}

/// What the futures run on the store's runtime need.
struct Inner {
    kv: KvClient,
    watch_client: Client,
    config: EtcdConfig,
    keys: Keys,
    fence: Mutex<Option<Fence>>,
    endpoints: String,
}

/// The store's keys, derived from the prefix.
struct Keys {
    root: String,
    format: String,
    last: String,
    snapshot: String,
    log: String,
    chunks: String,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        let root = format!("{}/store/", prefix.trim_end_matches('/'));
        Keys {
            format: format!("{root}format"),
            last: format!("{root}last"),
            snapshot: format!("{root}snapshot"),
            log: format!("{root}log/"),
            chunks: format!("{root}chunks/"),
            root,
        }
    }

    fn log_part(&self, first: u64, last: u64) -> String {
        format!("{}{first:020}-{last:020}", self.log)
    }

    /// The first possible key of a part starting at `first`.
    fn log_from(&self, first: u64) -> String {
        format!("{}{first:020}", self.log)
    }

    fn chunk_set(&self, index: u64, set: u64) -> String {
        format!("{}{index:020}-{set:020}/", self.chunks)
    }

    fn chunk(&self, index: u64, set: u64, number: u32) -> String {
        format!("{}{number:010}", self.chunk_set(index, set))
    }

    /// (first, last) from a log part key.
    fn parse_log_part(&self, key: &str) -> Option<(u64, u64)> {
        let (first, last) = key.strip_prefix(&self.log)?.split_once('-')?;
        if first.len() != 20 || last.len() != 20 {
            return None;
        }
        Some((first.parse().ok()?, last.parse().ok()?))
    }
}

/// The end of the range of keys starting with `prefix` (etcd's "prefix end").
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The key right after `key`.
fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

/// The snapshot meta record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SnapshotMeta {
    index: u64,
    data_bytes: u64,
    chunk_count: u32,
    data_crc32: u32,
    chunk_set: u64,
}

const SNAPSHOT_META_BYTES: usize = 8 + 8 + 4 + 4 + 8;

impl SnapshotMeta {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SNAPSHOT_META_BYTES);
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&self.data_bytes.to_le_bytes());
        out.extend_from_slice(&self.chunk_count.to_le_bytes());
        out.extend_from_slice(&self.data_crc32.to_le_bytes());
        out.extend_from_slice(&self.chunk_set.to_le_bytes());
        out
    }

    fn decode(payload: &[u8], what: impl FnOnce() -> String) -> Result<Self, StoreError> {
        if payload.len() != SNAPSHOT_META_BYTES {
            return Err(StoreError::Corrupt {
                what: what(),
                detail: format!("snapshot record is {} bytes, expected {SNAPSHOT_META_BYTES}", payload.len()),
            });
        }
        let u64_at = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().expect("4 bytes"));
        Ok(Self {
            index: u64_at(0),
            data_bytes: u64_at(8),
            chunk_count: u32_at(16),
            data_crc32: u32_at(20),
            chunk_set: u64_at(24),
        })
    }
}

/// The head of the store at one revision: `last` and the snapshot record, with their mod revisions
/// (0 when absent) for the compares of the next write.
#[derive(Debug, Clone, Copy)]
struct Head {
    revision: i64,
    last: u64,
    last_mod: i64,
    snapshot: Option<SnapshotMeta>,
    snapshot_mod: i64,
}

/// How a conditional write ended.
enum Commit {
    Done {
        revision: i64,
    },
    /// `last` (or the snapshot record) moved since it was read; nothing was written.
    Moved,
}

fn is_compacted(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status) if status.message().contains("compacted"))
}

impl Inner {
    fn where_(&self) -> String {
        format!("etcd at {}", self.endpoints)
    }

    fn map_error(&self, doing: &str, error: etcd_client::Error) -> StoreError {
        let unavailable = match &error {
            etcd_client::Error::GRpcStatus(status) => matches!(
                i32::from(status.code()),
                GRPC_CANCELLED | GRPC_UNKNOWN | GRPC_DEADLINE_EXCEEDED | GRPC_UNAVAILABLE
            ),
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
            _ => false,
        };
        if unavailable {
            StoreError::Unavailable { what: self.where_(), detail: format!("{doing}: {error}") }
        } else {
            StoreError::Backend(format!("{} refused {doing}: {error}", self.where_()))
        }
    }

    /// Runs one etcd call with the request deadline.
    async fn call<T>(
        &self,
        doing: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.config.request_timeout, call).await {
            Ok(result) => result.map_err(|error| self.map_error(doing, error)),
            Err(_) => Err(StoreError::Unavailable {
                what: self.where_(),
                detail: format!("{doing} took longer than the request timeout of {:?}", self.config.request_timeout),
            }),
        }
    }

    /// Like [`call`](Self::call), but a compacted revision is `Ok(None)` so the caller can retry.
    async fn call_read<T>(
        &self,
        doing: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<Option<T>, StoreError> {
        match tokio::time::timeout(self.config.request_timeout, call).await {
            Ok(Ok(value)) => Ok(Some(value)),
            Ok(Err(error)) if is_compacted(&error) => Ok(None),
            Ok(Err(error)) => Err(self.map_error(doing, error)),
            Err(_) => Err(StoreError::Unavailable {
                what: self.where_(),
                detail: format!("{doing} took longer than the request timeout of {:?}", self.config.request_timeout),
            }),
        }
    }

    fn key_what(&self, key: &str) -> String {
        format!("key `{key}` in {}", self.where_())
    }

    /// Creates the format record in a new store, checks it in an existing one.
    async fn check_format(&self) -> Result<(), StoreError> {
        let key = &self.keys.format;
        let record = envelope::encode(FORMAT_RECORD_VERSION, &STORE_FORMAT_VERSION.to_le_bytes());
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), record, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let response = self.call("creating or reading the store format record", self.kv.clone().txn(txn)).await?;
        if response.succeeded() {
            return Ok(());
        }
        let what = || format!("store format record {}", self.key_what(key));
        let value = response
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            })
            .ok_or_else(|| StoreError::Backend(format!("{} vanished while it was read", what())))?;
        let decoded = envelope::decode(&value, FORMAT_RECORD_VERSION, what)?;
        let bytes: [u8; 4] = decoded.payload.try_into().map_err(|_| StoreError::Corrupt {
            what: what(),
            detail: format!("{} bytes, expected 4", decoded.payload.len()),
        })?;
        let version = u32::from_le_bytes(bytes);
        if version > STORE_FORMAT_VERSION {
            return Err(StoreError::UnsupportedFormat {
                found: version,
                supported: STORE_FORMAT_VERSION,
                what: what(),
            });
        }
        if version != STORE_FORMAT_VERSION {
            return Err(StoreError::Corrupt {
                what: what(),
                detail: format!("store format version {version} was never written by capstan"),
            });
        }
        Ok(())
    }

    /// Reads `last` and the snapshot record in one transaction (one revision).
    async fn read_head(&self) -> Result<Head, StoreError> {
        let txn = Txn::new()
            .and_then([TxnOp::get(self.keys.last.as_str(), None), TxnOp::get(self.keys.snapshot.as_str(), None)]);
        let response = self.call("reading the last index and the snapshot record", self.kv.clone().txn(txn)).await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut head = Head { revision, last: 0, last_mod: 0, snapshot: None, snapshot_mod: 0 };
        for op in response.op_responses() {
            let TxnOpResponse::Get(get) = op else { continue };
            let Some(kv) = get.kvs().first() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if key == self.keys.last {
                let what = || format!("last index record {}", self.key_what(&key));
                let decoded = envelope::decode(kv.value(), LAST_RECORD_VERSION, what)?;
                let bytes: [u8; 8] = decoded.payload.try_into().map_err(|_| StoreError::Corrupt {
                    what: what(),
                    detail: format!("{} bytes, expected 8", decoded.payload.len()),
                })?;
                head.last = u64::from_le_bytes(bytes);
                head.last_mod = kv.mod_revision();
            } else if key == self.keys.snapshot {
                let what = || format!("snapshot record {}", self.key_what(&key));
                let decoded = envelope::decode(kv.value(), SNAPSHOT_META_VERSION, what)?;
                head.snapshot = Some(SnapshotMeta::decode(decoded.payload, what)?);
                head.snapshot_mod = kv.mod_revision();
            }
        }
        if let Some(snapshot) = head.snapshot {
            if head.last < snapshot.index {
                return Err(StoreError::Corrupt {
                    what: format!("store under `{}` in {}", self.keys.root, self.where_()),
                    detail: format!("the last index {} is before the snapshot at index {}", head.last, snapshot.index),
                });
            }
        }
        Ok(head)
    }

    fn fence_compare(&self) -> Option<(Compare, Fence)> {
        let fence = self.fence.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()?;
        Some((Compare::create_revision(fence.key.clone(), CompareOp::Equal, fence.create_revision), fence))
    }

    /// One write transaction: the fence compare (when fenced), the given compares, then `ops`.
    async fn commit(&self, doing: &str, mut compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<Commit, StoreError> {
        let fence = self.fence_compare();
        let mut or_else = Vec::new();
        if let Some((compare, fence)) = &fence {
            compares.push(compare.clone());
            or_else.push(TxnOp::get(fence.key.clone(), None));
        }
        let txn = Txn::new().when(compares).and_then(ops).or_else(or_else);
        let response = self.call(doing, self.kv.clone().txn(txn)).await?;
        if response.succeeded() {
            return Ok(Commit::Done { revision: response.header().map_or(0, |h| h.revision()) });
        }
        if let Some((_, fence)) = fence {
            let found = response.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => Some(get.kvs().first().map(|kv| kv.create_revision())),
                _ => None,
            });
            let found = found.flatten();
            if found != Some(fence.create_revision) {
                let key = String::from_utf8_lossy(&fence.key);
                let now = match found {
                    None => "no longer exists".to_string(),
                    Some(revision) => format!("was recreated (create revision {revision})"),
                };
                return Err(StoreError::Fenced {
                    detail: format!(
                        "{doing}: the leadership key `{key}` (create revision {}) {now} in {}",
                        fence.create_revision,
                        self.where_()
                    ),
                });
            }
        }
        Ok(Commit::Moved)
    }

    /// `Err(Fenced)` when a fence is set and its key is gone or was recreated.
    async fn check_fence(&self, doing: &str) -> Result<(), StoreError> {
        let Some(fence) = self.fence.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone() else {
            return Ok(());
        };
        let response = self.call(doing, self.kv.clone().get(fence.key.clone(), None)).await?;
        let found = response.kvs().first().map(|kv| kv.create_revision());
        if found == Some(fence.create_revision) {
            return Ok(());
        }
        let key = String::from_utf8_lossy(&fence.key);
        let now = match found {
            None => "no longer exists".to_string(),
            Some(revision) => format!("was recreated (create revision {revision})"),
        };
        Err(StoreError::Fenced {
            detail: format!(
                "{doing}: the leadership key `{key}` (create revision {}) {now} in {}",
                fence.create_revision,
                self.where_()
            ),
        })
    }

    /// Compares that `last` and the snapshot record are as in `head`.
    fn head_compares(&self, head: &Head) -> Vec<Compare> {
        let unchanged = |key: &str, mod_revision: i64| {
            if mod_revision == 0 {
                Compare::version(key, CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key, CompareOp::Equal, mod_revision)
            }
        };
        vec![unchanged(&self.keys.last, head.last_mod), unchanged(&self.keys.snapshot, head.snapshot_mod)]
    }

    async fn append(&self, entries: Vec<LogEntry>) -> Result<(), StoreError> {
        let Some(first) = entries.first().map(|e| e.index) else {
            return Ok(());
        };
        let parts = encode_parts(&entries)?;
        let head = self.read_head().await?;
        if first != head.last + 1 {
            // Another writer moved the log: say so plainly when it is because this one lost the
            // leadership it was fenced with.
            self.check_fence("appending").await?;
            return Err(StoreError::OutOfOrder { expected: head.last + 1, found: first });
        }
        let part_count = parts.len();
        for (number, (part_first, part_last, payload)) in parts.into_iter().enumerate() {
            let key = self.keys.log_part(part_first, part_last);
            let mut ops = Vec::with_capacity(4);
            if number == 0 {
                // Remove what a batch cut short left beyond `last` (invisible parts), around this key.
                ops.push(TxnOp::delete(self.keys.log_from(first), Some(DeleteOptions::new().with_range(key.as_str()))));
                ops.push(TxnOp::delete(
                    key_after(key.as_bytes()),
                    Some(DeleteOptions::new().with_range(prefix_end(&self.keys.log))),
                ));
            }
            ops.push(TxnOp::put(key.as_str(), envelope::encode(LOG_PART_VERSION, &payload), None));
            if number + 1 == part_count {
                ops.push(TxnOp::put(
                    self.keys.last.as_str(),
                    envelope::encode(LAST_RECORD_VERSION, &part_last.to_le_bytes()),
                    None,
                ));
            }
            let doing = format!("appending entries {part_first}..={part_last}");
            match self.commit(&doing, self.head_compares(&head), ops).await? {
                Commit::Done { .. } => {}
                Commit::Moved => {
                    // Another writer moved the log; what this call wrote is invisible.
                    self.check_fence(&doing).await?;
                    let now = self.read_head().await?;
                    return Err(StoreError::OutOfOrder { expected: now.last + 1, found: first });
                }
            }
        }
        Ok(())
    }

    /// Reads every key in `[start, end)` at `revision`, a page at a time. `Ok(None)`: the
    /// revision was compacted meanwhile.
    async fn read_range(
        &self,
        doing: &str,
        start: Vec<u8>,
        end: Vec<u8>,
        revision: i64,
        mut each: impl FnMut(&str, &[u8]) -> Result<(), StoreError>,
    ) -> Result<Option<()>, StoreError> {
        let mut from = start;
        loop {
            let options = GetOptions::new().with_range(end.clone()).with_limit(PAGE_KEYS).with_revision(revision);
            let Some(response) = self.call_read(doing, self.kv.clone().get(from.clone(), Some(options))).await? else {
                return Ok(None);
            };
            for kv in response.kvs() {
                let key = String::from_utf8_lossy(kv.key());
                each(&key, kv.value())?;
            }
            match response.kvs().last() {
                Some(kv) if response.more() => from = key_after(kv.key()),
                _ => return Ok(Some(())),
            }
        }
    }

    async fn read_snapshot(&self, meta: SnapshotMeta, revision: i64) -> Result<Option<Snapshot>, StoreError> {
        let set = self.keys.chunk_set(meta.index, meta.chunk_set);
        let what = || format!("snapshot at index {} (chunks `{set}*` in {})", meta.index, self.where_());
        let data_bytes = usize::try_from(meta.data_bytes).map_err(|_| StoreError::Corrupt {
            what: what(),
            detail: format!("length {} does not fit in memory", meta.data_bytes),
        })?;
        let mut data = Vec::with_capacity(data_bytes);
        let mut expected = 0u32;
        let read = self
            .read_range(
                "reading snapshot chunks",
                set.clone().into_bytes(),
                prefix_end(&set),
                revision,
                |key, value| {
                    let chunk_what = || {
                        format!(
                            "snapshot chunk {expected} of the snapshot at index {}, {}",
                            meta.index,
                            self.key_what(key)
                        )
                    };
                    if key != self.keys.chunk(meta.index, meta.chunk_set, expected) {
                        return Err(StoreError::Corrupt {
                            what: what(),
                            detail: format!("chunk {expected} is missing (found key `{key}`)"),
                        });
                    }
                    let decoded = envelope::decode(value, SNAPSHOT_CHUNK_VERSION, chunk_what)?;
                    data.extend_from_slice(decoded.payload);
                    expected += 1;
                    Ok(())
                },
            )
            .await?;
        if read.is_none() {
            return Ok(None);
        }
        if expected != meta.chunk_count || data.len() != data_bytes {
            return Err(StoreError::Corrupt {
                what: what(),
                detail: format!(
                    "expected {} chunks / {} bytes, found {expected} chunks / {} bytes",
                    meta.chunk_count,
                    meta.data_bytes,
                    data.len()
                ),
            });
        }
        let crc = crc32fast::hash(&data);
        if crc != meta.data_crc32 {
            return Err(StoreError::Corrupt {
                what: what(),
                detail: format!(
                    "checksum of the whole data mismatch (stored {:#010x}, computed {crc:#010x})",
                    meta.data_crc32
                ),
            });
        }
        Ok(Some(Snapshot { index: meta.index, data }))
    }

    /// Entries `after + 1 ..= head.last` at `head.revision`. `Ok(None)`: compacted meanwhile.
    async fn read_log(&self, head: &Head, after: u64) -> Result<Option<Vec<LogEntry>>, StoreError> {
        let mut entries = Vec::new();
        if head.last <= after {
            return Ok(Some(entries));
        }
        // The part holding `after + 1` starts at or before it: find the last part key that does.
        let options = GetOptions::new()
            .with_range(self.keys.log_from(after + 2))
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(1)
            .with_keys_only()
            .with_revision(head.revision);
        let Some(response) = self
            .call_read("finding the first log part", self.kv.clone().get(self.keys.log.as_str(), Some(options)))
            .await?
        else {
            return Ok(None);
        };
        let start = match response.kvs().first() {
            Some(kv) => kv.key().to_vec(),
            None => self.keys.log.clone().into_bytes(),
        };
        let end = self.keys.log_from(head.last + 1).into_bytes();
        let mut expected = after + 1;
        let read = self
            .read_range("reading the log", start, end, head.revision, |key, value| {
                let what = || format!("log record {}", self.key_what(key));
                let Some((part_first, part_last)) = self.keys.parse_log_part(key) else {
                    return Err(StoreError::Corrupt {
                        what: what(),
                        detail: "the key is not `log/FIRST-LAST`".to_string(),
                    });
                };
                if part_last <= after {
                    return Ok(()); // covered by the snapshot, not deleted yet
                }
                let decoded = envelope::decode(value, LOG_PART_VERSION, what)?;
                decode_part(decoded.payload, part_first, part_last, after, &mut expected, &mut entries, what)
            })
            .await?;
        if read.is_none() {
            return Ok(None);
        }
        if expected != head.last + 1 {
            return Err(StoreError::Corrupt {
                what: format!("log under `{}` in {}", self.keys.log, self.where_()),
                detail: format!("entries {expected}..={} are missing", head.last),
            });
        }
        Ok(Some(entries))
    }

    async fn load(&self) -> Result<Loaded, StoreError> {
        for _ in 0..READ_ATTEMPTS {
            let head = self.read_head().await?;
            let snapshot = match head.snapshot {
                None => None,
                Some(meta) => match self.read_snapshot(meta, head.revision).await? {
                    Some(snapshot) => Some(snapshot),
                    None => continue,
                },
            };
            let after = snapshot.as_ref().map_or(0, |s| s.index);
            let Some(entries) = self.read_log(&head, after).await? else {
                continue;
            };
            return Ok(Loaded { snapshot, entries });
        }
        Err(StoreError::Unavailable {
            what: self.where_(),
            detail: format!("loading: etcd compacted the revision being read {READ_ATTEMPTS} times in a row"),
        })
    }

    /// Entries after `index`, or `Err(covering snapshot index)` when a snapshot dropped some.
    async fn entries_after(&self, index: u64) -> Result<Result<Vec<LogEntry>, u64>, StoreError> {
        for _ in 0..READ_ATTEMPTS {
            let head = self.read_head().await?;
            if let Some(snapshot) = head.snapshot {
                if index < snapshot.index {
                    return Ok(Err(snapshot.index));
                }
            }
            if let Some(entries) = self.read_log(&head, index).await? {
                return Ok(Ok(entries));
            }
        }
        Err(StoreError::Unavailable {
            what: self.where_(),
            detail: format!("reading the log: etcd compacted the revision being read {READ_ATTEMPTS} times in a row"),
        })
    }

    async fn install_snapshot(&self, index: u64, data: Arc<Vec<u8>>) -> Result<(), StoreError> {
        let data_bytes = data.len();
        let chunk_count = u32::try_from(data_bytes.div_ceil(SNAPSHOT_CHUNK_BYTES))
            .map_err(|_| StoreError::Backend(format!("snapshot of {data_bytes} bytes is too large")))?;
        let head = self.read_head().await?;
        if let Some(old) = head.snapshot {
            if index < old.index {
                return Err(StoreError::StaleSnapshot { offered: index, installed: old.index });
            }
        }
        // The revision now is the id of this chunk set: later installs see a higher one.
        let set = u64::try_from(head.revision).unwrap_or(0);
        for (number, chunk) in data.chunks(SNAPSHOT_CHUNK_BYTES).enumerate() {
            let key = self.keys.chunk(index, set, number as u32);
            let ops = vec![TxnOp::put(key, envelope::encode(SNAPSHOT_CHUNK_VERSION, chunk), None)];
            let doing = format!("writing chunk {number} of the snapshot at index {index}");
            // Only the fence guards chunks: they are invisible until the flip.
            self.commit(&doing, Vec::new(), ops).await?;
        }
        let meta = SnapshotMeta {
            index,
            data_bytes: data_bytes as u64,
            chunk_count,
            data_crc32: crc32fast::hash(&data),
            chunk_set: set,
        };
        let set_prefix = self.keys.chunk_set(index, set);
        for _ in 0..FLIP_ATTEMPTS {
            let head = self.read_head().await?;
            if let Some(old) = head.snapshot {
                if index < old.index {
                    return Err(StoreError::StaleSnapshot { offered: index, installed: old.index });
                }
            }
            // Delete the log parts the snapshot covers; a part that straddles it stays.
            let mut log_delete_end = self.keys.log_from(index + 1).into_bytes();
            if index < head.last {
                let options = GetOptions::new()
                    .with_range(log_delete_end.clone())
                    .with_sort(SortTarget::Key, SortOrder::Descend)
                    .with_limit(1)
                    .with_keys_only();
                let response = self
                    .call(
                        "finding the log part at the snapshot",
                        self.kv.clone().get(self.keys.log.as_str(), Some(options)),
                    )
                    .await?;
                if let Some(kv) = response.kvs().first() {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    match self.keys.parse_log_part(&key) {
                        Some((_, part_last)) if part_last > index => log_delete_end = kv.key().to_vec(),
                        Some(_) => {}
                        None => {
                            return Err(StoreError::Corrupt {
                                what: format!("log record {}", self.key_what(&key)),
                                detail: "the key is not `log/FIRST-LAST`".to_string(),
                            })
                        }
                    }
                }
            }
            let mut ops = vec![
                TxnOp::put(self.keys.snapshot.as_str(), envelope::encode(SNAPSHOT_META_VERSION, &meta.encode()), None),
                TxnOp::delete(self.keys.chunks.as_str(), Some(DeleteOptions::new().with_range(set_prefix.as_str()))),
                TxnOp::delete(
                    prefix_end(&set_prefix),
                    Some(DeleteOptions::new().with_range(prefix_end(&self.keys.chunks))),
                ),
                TxnOp::delete(self.keys.log.as_str(), Some(DeleteOptions::new().with_range(log_delete_end))),
            ];
            if index > head.last {
                ops.push(TxnOp::put(
                    self.keys.last.as_str(),
                    envelope::encode(LAST_RECORD_VERSION, &index.to_le_bytes()),
                    None,
                ));
            }
            let doing = format!("installing the snapshot at index {index}");
            match self.commit(&doing, self.head_compares(&head), ops).await? {
                Commit::Moved => continue,
                Commit::Done { revision } => {
                    self.compact(revision).await;
                    return Ok(());
                }
            }
        }
        Err(StoreError::Backend(format!(
            "installing the snapshot at index {index} in {}: the log kept moving under it ({FLIP_ATTEMPTS} attempts); \
             is another process writing to `{}`?",
            self.where_(),
            self.keys.root
        )))
    }

    /// Compacts etcd's history up to `revision` so deleted chunks and parts free their space.
    /// A failure is logged, not returned: the snapshot is already installed.
    async fn compact(&self, revision: i64) {
        let options = CompactionOptions::new().with_physical();
        match tokio::time::timeout(self.config.request_timeout, self.kv.clone().compact(revision, Some(options))).await
        {
            Ok(Ok(_)) => {}
            Ok(Err(error)) if is_compacted(&error) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, revision, where_ = %self.where_(), "compacting etcd after a snapshot failed")
            }
            Err(_) => tracing::warn!(revision, where_ = %self.where_(), "compacting etcd after a snapshot timed out"),
        }
    }

    /// Follows `last` and sends what was appended after `known`; ends when the receiver is gone.
    async fn watch_log(
        self: Arc<Self>,
        mut known: u64,
        sender: std::sync::mpsc::SyncSender<Result<LogWatchEvent, StoreError>>,
    ) {
        use std::sync::mpsc::TrySendError;
        let mut backoff = Duration::from_millis(100);
        loop {
            // (Re)start: read what is there, then watch `last` from the revision after that read.
            let start = async {
                let head = self.read_head().await?;
                let mut client = self.watch_client.clone();
                let options = WatchOptions::new().with_start_revision(head.revision + 1);
                let stream = self
                    .call("starting a watch on the log", client.watch(self.keys.last.as_str(), Some(options)))
                    .await?;
                Ok::<_, StoreError>(stream)
            };
            let mut stream = match start.await {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::debug!(%error, "log watch: etcd unavailable, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let mut changed = true;
            loop {
                if changed {
                    let event = match self.entries_after(known).await {
                        Ok(Ok(entries)) if entries.is_empty() => None,
                        Ok(Ok(entries)) => {
                            known = entries.last().map_or(known, |e| e.index);
                            Some(Ok(LogWatchEvent::Entries(entries)))
                        }
                        Ok(Err(index)) => {
                            known = index;
                            Some(Ok(LogWatchEvent::SnapshotInstalled { index }))
                        }
                        Err(StoreError::Unavailable { .. }) => break,
                        Err(error) => Some(Err(error)),
                    };
                    if let Some(mut event) = event {
                        let fatal = event.is_err();
                        loop {
                            match sender.try_send(event) {
                                Ok(()) => break,
                                Err(TrySendError::Disconnected(_)) => return,
                                Err(TrySendError::Full(back)) => {
                                    event = back;
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                            }
                        }
                        if fatal {
                            return;
                        }
                    }
                }
                match stream.message().await {
                    Ok(Some(response)) => {
                        changed = response.events().iter().any(|e| e.event_type() == EventType::Put)
                            || response.compact_revision() > 0
                            || response.canceled();
                        if response.canceled() {
                            break;
                        }
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}

/// Splits a batch into parts of at most [`LOG_PART_BYTES_MAX`] payload bytes.
fn encode_parts(entries: &[LogEntry]) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError> {
    for pair in entries.windows(2) {
        if pair[1].index != pair[0].index.wrapping_add(1) {
            return Err(StoreError::OutOfOrder { expected: pair[0].index.wrapping_add(1), found: pair[1].index });
        }
    }
    let mut parts = Vec::new();
    let mut current: Option<(u64, u64, Vec<u8>)> = None;
    for entry in entries {
        if entry.data.len() > ETCD_ENTRY_BYTES_MAX {
            return Err(StoreError::Backend(format!(
                "command at index {} is {} bytes; the etcd store takes commands of at most {ETCD_ENTRY_BYTES_MAX} bytes \
                 (etcd's request limit); nothing was written",
                entry.index,
                entry.data.len()
            )));
        }
        let entry_bytes = 4 + entry.data.len();
        if let Some((_, _, payload)) = &current {
            if payload.len() + entry_bytes > LOG_PART_BYTES_MAX {
                parts.extend(current.take());
            }
        }
        let (_, last, payload) = current.get_or_insert_with(|| (entry.index, entry.index, vec![0; 4]));
        *last = entry.index;
        payload.extend_from_slice(&(entry.data.len() as u32).to_le_bytes());
        payload.extend_from_slice(&entry.data);
        let count = u32::from_le_bytes(payload[0..4].try_into().expect("4 bytes")) + 1;
        payload[0..4].copy_from_slice(&count.to_le_bytes());
    }
    parts.extend(current);
    Ok(parts)
}

/// Decodes one part's payload, pushing entries after `after` and checking they continue `expected`.
fn decode_part(
    payload: &[u8],
    part_first: u64,
    part_last: u64,
    after: u64,
    expected: &mut u64,
    entries: &mut Vec<LogEntry>,
    what: impl Fn() -> String,
) -> Result<(), StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { what: what(), detail };
    if payload.len() < 4 {
        return Err(corrupt(format!("payload is {} bytes, shorter than its count", payload.len())));
    }
    let count = u32::from_le_bytes(payload[0..4].try_into().expect("4 bytes"));
    if part_last < part_first || u64::from(count) != part_last - part_first + 1 {
        return Err(corrupt(format!("holds {count} entries, but its key names {part_first}..={part_last}")));
    }
    let mut at = 4usize;
    for index in part_first..=part_last {
        let len_bytes = payload.get(at..at + 4).ok_or_else(|| corrupt(format!("entry {index} is cut off")))?;
        let len = u32::from_le_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
        at += 4;
        let data = payload.get(at..at + len).ok_or_else(|| corrupt(format!("entry {index} is cut off")))?;
        at += len;
        if index <= after {
            continue;
        }
        if index != *expected {
            return Err(corrupt(if index < *expected {
                format!("entry {index} appears twice")
            } else {
                format!("entries {}..{index} are missing before it", *expected)
            }));
        }
        entries.push(LogEntry { index, data: data.to_vec() });
        *expected += 1;
    }
    if at != payload.len() {
        return Err(corrupt(format!("{} bytes after the last entry", payload.len() - at)));
    }
    Ok(())
}

impl EtcdStore {
    /// Connects to etcd, checks (or creates) the store's format record and returns the store.
    ///
    /// Sync. Works when called from inside a tokio runtime and from a plain thread: the store owns
    /// a small private runtime and runs every etcd call on it. etcd not answering within
    /// `request_timeout` (the first call also waits for the connection) is
    /// [`StoreError::Unavailable`].
    pub fn connect(config: EtcdConfig) -> Result<EtcdStore, StoreError> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Backend("the etcd store needs at least one endpoint".to_string()));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(THREAD_NAME)
            .enable_all()
            .build()
            .map_err(|source| StoreError::Io { what: "starting the etcd store's runtime".to_string(), source })?;
        let handle = runtime.handle().clone();
        let endpoints = config.endpoints.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(config.dial_timeout)
            .with_keep_alive(Duration::from_secs(10), config.dial_timeout.max(Duration::from_secs(1)));
        let connect_config = config.clone();
        let client = wait_on(&handle, async move {
            let connect = Client::connect(connect_config.endpoints.clone(), Some(options));
            match tokio::time::timeout(connect_config.dial_timeout, connect).await {
                Ok(Ok(client)) => Ok(client),
                Ok(Err(error)) => Err(StoreError::Unavailable {
                    what: format!("etcd at {}", connect_config.endpoints.join(",")),
                    detail: format!("connecting: {error}"),
                }),
                Err(_) => Err(StoreError::Unavailable {
                    what: format!("etcd at {}", connect_config.endpoints.join(",")),
                    detail: format!("connecting took longer than {:?}", connect_config.dial_timeout),
                }),
            }
        })?;
        let inner = Arc::new(Inner {
            kv: client.kv_client().max_decoding_message_size(DECODING_BYTES_MAX),
            watch_client: client.clone(),
            keys: Keys::new(&config.prefix),
            config,
            fence: Mutex::new(None),
            endpoints,
        });
        let store = EtcdStore { inner, client, runtime: Some(runtime), handle, write_lock: Mutex::new(()) };
        let inner = Arc::clone(&store.inner);
        // The channel connects lazily: this first call is what finds out whether etcd answers.
        store.run(async move { inner.check_format().await })?;
        Ok(store)
    }

    /// Every later write (append, install_snapshot) carries
    /// `create_revision(fence.key) == fence.create_revision` in its transaction; when that compare
    /// fails the write changes nothing and returns [`StoreError::Fenced`]. `None`: writes are
    /// unconditional (tests, offline tools).
    pub fn set_fence(&self, fence: Option<Fence>) {
        *self.inner.fence.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = fence;
    }

    /// A clone of the connected client. It runs on the store's runtime: use it while the store lives.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The store's private runtime (spawn etcd work here; do not call the store's sync methods
    /// from tasks on it).
    pub fn runtime(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// Log entries after `index` up to the last one, in order. Fails when a snapshot already
    /// dropped some of them (load the snapshot instead).
    pub fn entries_after(&self, index: u64) -> Result<Vec<LogEntry>, StoreError> {
        let inner = Arc::clone(&self.inner);
        let result = self.run(async move { inner.entries_after(index).await })?;
        result.map_err(|snapshot| {
            StoreError::Backend(format!(
                "entries after {index} are no longer in the log under `{}`: the snapshot at index {snapshot} covers them; \
                 load the snapshot",
                self.inner.keys.log
            ))
        })
    }

    /// Follows the log from after `index` for a warm standby: every append is reported as
    /// [`LogWatchEvent::Entries`]; a snapshot that covers unseen entries as
    /// [`LogWatchEvent::SnapshotInstalled`]. Survives etcd restarts (it re-reads from where it was).
    pub fn watch_log(&self, index: u64) -> LogWatch {
        let (sender, receiver) = std::sync::mpsc::sync_channel(WATCH_CHANNEL_BATCHES);
        let task = self.handle.spawn(Arc::clone(&self.inner).watch_log(index, sender));
        LogWatch { receiver, task }
    }

    /// Runs `future` on the store's runtime and waits for it on a std channel.
    fn run<T: Send + 'static>(
        &self,
        future: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        if std::thread::current().name() == Some(THREAD_NAME) {
            return Err(StoreError::Backend(format!(
                "a sync call on the etcd store ({}) was made from the store's own runtime; \
                 call it from another thread (e.g. spawn_blocking)",
                self.describe()
            )));
        }
        wait_on(&self.handle, future)
    }
}

/// Spawns `future` on `handle` and blocks this thread on a std channel until it is done.
fn wait_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    future: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (sender, receiver) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = sender.send(future.await);
    });
    receiver
        .recv()
        .map_err(|_| StoreError::Backend("the etcd store's runtime stopped before the call finished".to_string()))?
}

impl Store for EtcdStore {
    fn append(&self, entries: &[LogEntry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let _writing = self.write_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let inner = Arc::clone(&self.inner);
        let entries = entries.to_vec();
        self.run(async move { inner.append(entries).await })
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        let inner = Arc::clone(&self.inner);
        self.run(async move { inner.load().await })
    }

    fn install_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let _writing = self.write_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let inner = Arc::clone(&self.inner);
        let (index, data) = (snapshot.index, Arc::new(snapshot.data.clone()));
        self.run(async move { inner.install_snapshot(index, data).await })
    }

    fn last_index(&self) -> Result<u64, StoreError> {
        let inner = Arc::clone(&self.inner);
        self.run(async move { Ok(inner.read_head().await?.last) })
    }

    fn describe(&self) -> String {
        format!("etcd store at {} under `{}`", self.inner.endpoints, self.inner.keys.root)
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime: shut it down in the background.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_with_hosts_and_prefix() {
        let config = EtcdConfig::from_url("etcd://10.0.0.1:2379,etcd-2:2380/team/capstan/").unwrap();
        assert_eq!(config.endpoints, vec!["http://10.0.0.1:2379", "http://etcd-2:2380"]);
        assert_eq!(config.prefix, "/team/capstan");
        assert_eq!(config.dial_timeout, Duration::from_secs(2));
        assert_eq!(config.request_timeout, Duration::from_secs(5));
        let config = EtcdConfig::from_url("etcd://127.0.0.1:2379").unwrap();
        assert_eq!((config.endpoints.len(), config.prefix.as_str()), (1, "/capstan"));
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, expected) in [
            ("http://127.0.0.1:2379", "must start with `etcd://`"),
            ("etcd://", "has no port"),
            ("etcd://host", "has no port"),
            ("etcd://host:http", "is not a port number"),
            ("etcd://host:0", "is not a port number"),
            ("etcd://a:1,,b:2", "has no port"),
            ("etcd://:2379", "is not a host:port"),
        ] {
            let message = EtcdConfig::from_url(url).unwrap_err().to_string();
            assert!(message.contains(url) && message.contains(expected), "{url}: {message}");
        }
    }

    #[test]
    fn parts_split_big_batches_and_decode_back() {
        let entries: Vec<LogEntry> =
            (1..=40).map(|index| LogEntry { index, data: vec![index as u8; 100_000] }).collect();
        let parts = encode_parts(&entries).unwrap();
        assert!(parts.len() >= 4, "{} parts", parts.len());
        let mut decoded = Vec::new();
        let mut expected = 1;
        for (first, last, payload) in &parts {
            assert!(payload.len() <= LOG_PART_BYTES_MAX);
            decode_part(payload, *first, *last, 0, &mut expected, &mut decoded, || "part".to_string()).unwrap();
        }
        assert_eq!(decoded, entries);
        let too_big = [LogEntry { index: 1, data: vec![0; ETCD_ENTRY_BYTES_MAX + 1] }];
        assert!(encode_parts(&too_big).unwrap_err().to_string().contains("at most"));
    }

    #[test]
    fn keys_sort_numerically_and_parse_back() {
        let keys = Keys::new("/capstan/");
        assert_eq!(keys.root, "/capstan/store/");
        assert!(keys.log_part(9, 10) < keys.log_part(10, 10));
        assert_eq!(keys.parse_log_part(&keys.log_part(7, 123)), Some((7, 123)));
        assert_eq!(keys.parse_log_part("/capstan/store/log/garbage"), None);
        assert!(!keys.root.starts_with("/capstan/election/"));
    }
}
