//! Outgoing status updates: numbered, kept durably in `DATA/updates.log`, sent in order in
//! batches, dropped only once the master acknowledged them.
//!
//! The log is append-only. It starts with the magic `CAPSTUPD` and holds records of
//! `len: u32 LE | crc32: u32 LE | body`, where `body = version: u16 LE | JSON` and the CRC covers
//! the body. The JSON is one [`LogRecord`]: a `header` (the last sequence number used before the
//! records that follow; written first by every rewrite), an `update`, or `acked` (the master has
//! everything up to `seq`). Appends are buffered in memory and written with one fsync per batch,
//! before the batch is sent ([`UpdateQueue::batch`]); an update lost in a crash before that fsync
//! was never sent, and what it said is found again in the sandboxes. The file is rewritten
//! atomically (temporary file, fsync, rename, fsync of the directory) when acknowledged records
//! dominate it, when superseded updates are dropped, and when updates are renumbered.
//!
//! On open, a damaged last record (a crash in the middle of a write) is dropped with a warning; a
//! damaged record followed by more data, a bad magic or a newer record version is refused with a
//! [`LogError`] naming the file: the agent never guesses.

use capstan_model::{TaskId, Timestamp};
use capstan_state::{Report, StatusUpdate};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use tokio::sync::Notify;

/// Updates sent in one request at most.
pub const BATCH_MAX: usize = 1000;
/// Updates held at most before superseded `Running`/`Health` reports are dropped (a later report
/// about the same task says more). `Exited` and `Starting` reports are never dropped, so the
/// queue may stay above this bound when nothing can be merged.
pub const QUEUE_MAX: usize = 100_000;
/// Acknowledged records in the file before a rewrite is considered (it happens when they also
/// outnumber the live ones).
pub const COMPACT_MIN_ACKED: usize = 4096;

/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"CAPSTUPD";
/// The record format this agent writes and the newest it reads.
pub const RECORD_VERSION: u16 = 1;
/// `len` of a record at most (a longer one is damage, not data).
const RECORD_MAX_BYTES: u32 = 16 << 20;

/// One record of `updates.log`, as JSON after the version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogRecord {
    /// Sequence numbers up to `last_seq` are used; the first record of every rewrite.
    Header {
        last_seq: u64,
    },
    Update(StatusUpdate),
    /// The master has applied every update up to `seq`.
    Acked {
        seq: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: damaged record at byte {offset} ({detail}), and more data follows it")]
    Corrupt { path: PathBuf, offset: u64, detail: String },
    #[error("{path}: not an update log (bad magic at byte 0)")]
    BadMagic { path: PathBuf },
    #[error("{path}: record at byte {offset} has format version {found}; this agent reads up to {RECORD_VERSION} (written by a newer agent?)")]
    NewerVersion { path: PathBuf, offset: u64, found: u16 },
}

impl LogError {
    pub fn path(&self) -> &Path {
        match self {
            LogError::Io { path, .. }
            | LogError::Corrupt { path, .. }
            | LogError::BadMagic { path }
            | LogError::NewerVersion { path, .. } => path,
        }
    }
}

/// What reading a log found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Unacknowledged updates, oldest first.
    pub pending: Vec<StatusUpdate>,
    /// The highest sequence number the log shows as used.
    pub last_seq: u64,
    /// Bytes of valid records (where appending continues).
    pub valid_len: u64,
    /// Records in the file that are no longer needed (acknowledged updates, ack records).
    pub dead_records: usize,
    /// A damaged last record was dropped (its offset and what was wrong).
    pub torn_tail: Option<(u64, String)>,
}

fn encode(record: &LogRecord, out: &mut Vec<u8>) {
    let json = serde_json::to_vec(record).expect("log records serialize");
    let mut body = Vec::with_capacity(2 + json.len());
    body.extend_from_slice(&RECORD_VERSION.to_le_bytes());
    body.extend_from_slice(&json);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

/// Reads a whole log. `Ok(None)` when the file does not exist.
pub fn read_log(path: &Path) -> Result<Option<Loaded>, LogError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LogError::Io { path: path.into(), source }),
    };
    decode_log(path, &bytes).map(Some)
}

fn decode_log(path: &Path, bytes: &[u8]) -> Result<Loaded, LogError> {
    let mut loaded = Loaded::default();
    if bytes.len() < MAGIC.len() {
        // A crash while the file was being created: nothing in it was ever sent.
        if !MAGIC.starts_with(bytes) {
            return Err(LogError::BadMagic { path: path.into() });
        }
        loaded.torn_tail = (!bytes.is_empty()).then(|| (0, "incomplete magic".to_string()));
        return Ok(loaded);
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(LogError::BadMagic { path: path.into() });
    }
    let mut pending: VecDeque<StatusUpdate> = VecDeque::new();
    let mut pos = MAGIC.len();
    loaded.valid_len = pos as u64;
    while pos < bytes.len() {
        let offset = pos as u64;
        let rest = &bytes[pos..];
        let damaged = |detail: String, end: usize| -> Result<(), LogError> {
            // Damage is a torn tail only when nothing but zeroes follows it.
            if end >= bytes.len() || bytes[end.max(pos)..].iter().all(|b| *b == 0) {
                Ok(())
            } else {
                Err(LogError::Corrupt { path: path.into(), offset, detail })
            }
        };
        if rest.len() < 8 {
            damaged("incomplete record header".into(), bytes.len())?;
            loaded.torn_tail = Some((offset, "incomplete record header".into()));
            break;
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if !(2..=RECORD_MAX_BYTES).contains(&len) {
            let detail = format!("impossible record length {len}");
            damaged(detail.clone(), pos + 8)?;
            loaded.torn_tail = Some((offset, detail));
            break;
        }
        let end = pos + 8 + len as usize;
        if end > bytes.len() {
            loaded.torn_tail = Some((offset, format!("record of {len} bytes cut off at the end of the file")));
            break;
        }
        let body = &bytes[pos + 8..end];
        if crc32fast::hash(body) != crc {
            let detail = "CRC mismatch".to_string();
            damaged(detail.clone(), end)?;
            loaded.torn_tail = Some((offset, detail));
            break;
        }
        let version = u16::from_le_bytes(body[0..2].try_into().expect("2 bytes"));
        if version > RECORD_VERSION || version == 0 {
            return Err(LogError::NewerVersion { path: path.into(), offset, found: version });
        }
        let record: LogRecord = serde_json::from_slice(&body[2..]).map_err(|e| LogError::Corrupt {
            path: path.into(),
            offset,
            detail: format!("record passes its CRC but does not decode: {e}"),
        })?;
        match record {
            LogRecord::Header { last_seq } => {
                loaded.last_seq = loaded.last_seq.max(last_seq);
                // A header starts a rewrite: the pending set is what follows it.
                loaded.dead_records += pending.len();
                pending.clear();
            }
            LogRecord::Update(u) => {
                loaded.last_seq = loaded.last_seq.max(u.seq);
                pending.push_back(u);
            }
            LogRecord::Acked { seq } => {
                loaded.dead_records += 1;
                let before = pending.len();
                pending.retain(|u| u.seq > seq);
                loaded.dead_records += before - pending.len();
            }
        }
        pos = end;
        loaded.valid_len = pos as u64;
    }
    let mut pending: Vec<StatusUpdate> = pending.into();
    pending.sort_by_key(|u| u.seq);
    loaded.pending = pending;
    Ok(loaded)
}

/// Writes a fresh log (header + `pending`) atomically in place of `path`.
fn rewrite(path: &Path, last_seq: u64, pending: impl Iterator<Item = StatusUpdate>) -> io::Result<File> {
    let mut bytes = MAGIC.to_vec();
    encode(&LogRecord::Header { last_seq }, &mut bytes);
    for u in pending {
        encode(&LogRecord::Update(u), &mut bytes);
    }
    let tmp = path.with_extension("log.tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    OpenOptions::new().append(true).open(path)
}

pub struct UpdateQueue {
    inner: Mutex<Inner>,
    pub ready: Notify,
}

struct Inner {
    path: Option<PathBuf>,
    file: Option<File>,
    /// Encoded records not yet written to the file.
    unwritten: Vec<u8>,
    /// The last sequence number handed out.
    last_seq: u64,
    queue: VecDeque<StatusUpdate>,
    /// Records in the file that a rewrite would leave out.
    dead_records: usize,
    /// Queue length after the last merge of superseded reports (merging again only pays off once
    /// the queue has grown past this by a margin).
    merged_at_len: usize,
}

pub fn now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
    )
}

impl Default for UpdateQueue {
    /// A queue in memory only (for tests and tools).
    fn default() -> Self {
        UpdateQueue::with_inner(Inner {
            path: None,
            file: None,
            unwritten: Vec::new(),
            last_seq: 0,
            queue: VecDeque::new(),
            dead_records: 0,
            merged_at_len: 0,
        })
    }
}

impl UpdateQueue {
    fn with_inner(inner: Inner) -> Self {
        UpdateQueue { inner: Mutex::new(inner), ready: Notify::new() }
    }

    /// Opens (or creates) the durable queue at `path`: unacknowledged updates come back in order
    /// and numbering continues after the last sequence number used.
    pub fn open(path: &Path) -> Result<UpdateQueue, LogError> {
        let io_err = |source| LogError::Io { path: path.into(), source };
        let loaded = read_log(path)?.unwrap_or_default();
        if let Some((offset, detail)) = &loaded.torn_tail {
            tracing::warn!(
                "{}: dropping a damaged last record at byte {offset} ({detail}); it was never sent",
                path.display()
            );
        }
        let queue: VecDeque<StatusUpdate> = loaded.pending.into();
        // A fresh start rewrites the file: it drops a torn tail and what was acknowledged.
        let file = rewrite(path, loaded.last_seq, queue.iter().cloned()).map_err(io_err)?;
        Ok(UpdateQueue::with_inner(Inner {
            path: Some(path.into()),
            file: Some(file),
            unwritten: Vec::new(),
            last_seq: loaded.last_seq,
            queue,
            dead_records: 0,
            merged_at_len: 0,
        }))
    }

    /// Replaces whatever is at `path` with an empty log whose numbering continues after
    /// `last_seq` (for `--recover=cleanup`).
    pub fn reset(path: &Path, last_seq: u64) -> Result<(), LogError> {
        rewrite(path, last_seq, std::iter::empty())
            .map(drop)
            .map_err(|source| LogError::Io { path: path.into(), source })
    }

    /// The highest sequence number any readable record of a (possibly damaged) log names: what
    /// `--recover=cleanup` keeps numbering after.
    pub fn salvage_last_seq(path: &Path) -> u64 {
        let Ok(bytes) = fs::read(path) else { return 0 };
        let mut last = 0;
        let mut pos = MAGIC.len();
        while pos + 8 <= bytes.len() {
            let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes")) as usize;
            let end = pos + 8 + len;
            if len < 2 || end > bytes.len() {
                break;
            }
            if let Ok(r) = serde_json::from_slice::<LogRecord>(&bytes[pos + 10..end]) {
                match r {
                    LogRecord::Header { last_seq } => last = last.max(last_seq),
                    LogRecord::Update(u) => last = last.max(u.seq),
                    LogRecord::Acked { seq } => last = last.max(seq),
                }
            }
            pos = end;
        }
        last
    }

    /// The master has applied everything up to `master_seq` (learnt at registration): those
    /// updates are acknowledged, and numbering continues after it. Returns what was acknowledged.
    pub fn continue_after(&self, master_seq: u64) -> Vec<StatusUpdate> {
        if self.renumber_if_behind(master_seq) {
            return Vec::new();
        }
        self.ack(master_seq)
    }

    /// If the master knows a higher sequence number than this agent ever used (its log was reset),
    /// renumbers the queued updates after it, in order, so that the master does not drop them as
    /// duplicates, and returns true. Otherwise (the normal case) changes nothing: every update up
    /// to `master_seq` was applied, and the caller acknowledges them.
    pub fn renumber_if_behind(&self, master_seq: u64) -> bool {
        let mut inner = self.inner.lock();
        if master_seq <= inner.last_seq {
            return false;
        }
        tracing::warn!(
            "the master has applied status updates up to {master_seq}, beyond the {} this agent used; \
             renumbering {} queued update(s)",
            inner.last_seq,
            inner.queue.len()
        );
        let mut n = master_seq;
        for u in inner.queue.iter_mut() {
            n += 1;
            u.seq = n;
        }
        inner.last_seq = n;
        if let Err(e) = inner.rewrite() {
            tracing::error!("cannot rewrite the update log after renumbering: {e}");
        }
        true
    }

    /// The queued updates up to `seq` (what an acknowledgement of `seq` will drop).
    pub fn pending_upto(&self, seq: u64) -> Vec<StatusUpdate> {
        self.inner.lock().queue.iter().take_while(|u| u.seq <= seq).cloned().collect()
    }

    /// Queues a report (durable with the next batch).
    pub fn push(&self, task: TaskId, report: Report) {
        let mut inner = self.inner.lock();
        inner.last_seq += 1;
        let update = StatusUpdate { seq: inner.last_seq, task, report, at: now() };
        if inner.file.is_some() {
            let Inner { unwritten, .. } = &mut *inner;
            encode(&LogRecord::Update(update.clone()), unwritten);
        }
        inner.queue.push_back(update);
        if inner.queue.len() > QUEUE_MAX && inner.queue.len() > inner.merged_at_len + QUEUE_MAX / 10 {
            inner.merge_superseded();
        }
        drop(inner);
        self.ready.notify_one();
    }

    /// True when an `Exited` report of `task` waits to be sent.
    pub fn has_pending_exit(&self, task: TaskId) -> bool {
        self.inner.lock().queue.iter().any(|u| u.task == task && matches!(u.report, Report::Exited { .. }))
    }

    /// Makes every queued update durable (one write and one fsync for all of them) and returns
    /// the oldest ones, up to `BATCH_MAX`. Nothing is returned before it is durable.
    pub fn batch(&self) -> io::Result<Vec<StatusUpdate>> {
        let mut inner = self.inner.lock();
        inner.flush()?;
        Ok(inner.queue.iter().take(BATCH_MAX).cloned().collect())
    }

    /// Drops everything up to `seq`; returns what was dropped.
    pub fn ack(&self, seq: u64) -> Vec<StatusUpdate> {
        let mut inner = self.inner.lock();
        let mut acked = vec![];
        while inner.queue.front().is_some_and(|u| u.seq <= seq) {
            acked.push(inner.queue.pop_front().expect("checked"));
        }
        if acked.is_empty() {
            return acked;
        }
        if inner.file.is_some() {
            // Not synced on its own: a lost ack only means resending what the master drops.
            let Inner { unwritten, .. } = &mut *inner;
            encode(&LogRecord::Acked { seq }, unwritten);
            inner.dead_records += acked.len() + 1;
            if inner.dead_records >= COMPACT_MIN_ACKED && inner.dead_records > inner.queue.len() {
                if let Err(e) = inner.rewrite() {
                    tracing::error!("cannot compact the update log: {e}");
                }
            }
        }
        acked
    }

    /// Rewrites the file with only what is still queued.
    pub fn compact(&self) -> io::Result<()> {
        self.inner.lock().rewrite()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last sequence number handed out.
    pub fn last_seq(&self) -> u64 {
        self.inner.lock().last_seq
    }

    /// Records in the file that a rewrite would drop.
    pub fn dead_records(&self) -> usize {
        self.inner.lock().dead_records
    }
}

impl Inner {
    fn flush(&mut self) -> io::Result<()> {
        let Some(file) = &mut self.file else { return Ok(()) };
        if self.unwritten.is_empty() {
            return Ok(());
        }
        file.write_all(&self.unwritten)?;
        file.sync_data()?;
        self.unwritten.clear();
        Ok(())
    }

    fn rewrite(&mut self) -> io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let file = rewrite(path, self.last_seq, self.queue.iter().cloned())?;
        self.file = Some(file);
        self.unwritten.clear();
        self.dead_records = 0;
        Ok(())
    }

    /// Drops `Running` reports followed by a later `Running` or `Exited` of the same task, and
    /// `Health` reports followed by a later `Health` or `Exited`; `Starting` and `Exited` stay.
    fn merge_superseded(&mut self) {
        #[derive(Default, Clone, Copy)]
        struct Later {
            running: bool,
            health: bool,
            exited: bool,
        }
        let before = self.queue.len();
        let mut later: HashMap<TaskId, Later> = HashMap::new();
        let mut keep = vec![true; before];
        for (i, u) in self.queue.iter().enumerate().rev() {
            let l = later.entry(u.task).or_default();
            match u.report {
                Report::Running { .. } => {
                    keep[i] = !(l.running || l.exited);
                    l.running = true;
                }
                Report::Health { .. } => {
                    keep[i] = !(l.health || l.exited);
                    l.health = true;
                }
                Report::Exited { .. } => l.exited = true,
                Report::Starting => {}
            }
        }
        let mut i = 0;
        self.queue.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        self.merged_at_len = self.queue.len();
        tracing::warn!(
            "status update queue over {QUEUE_MAX} (the master is not taking updates): dropped {} superseded \
             report(s), {} left",
            before - self.queue.len(),
            self.queue.len()
        );
        if let Err(e) = self.rewrite() {
            tracing::error!("cannot rewrite the update log after dropping superseded reports: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_model::TaskExit;

    fn running(q: &UpdateQueue, task: u64) {
        q.push(TaskId(task), Report::Running { pid: task as u32 });
    }

    #[test]
    fn survives_a_reopen_in_order_and_numbering_continues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("updates.log");
        let q = UpdateQueue::open(&path).unwrap();
        for t in 1..=5 {
            running(&q, t);
        }
        let batch = q.batch().unwrap();
        assert_eq!(batch.iter().map(|u| u.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        q.ack(2);
        q.batch().unwrap(); // writes the ack record
        drop(q);
        let q = UpdateQueue::open(&path).unwrap();
        let batch = q.batch().unwrap();
        assert_eq!(batch.iter().map(|u| (u.seq, u.task.0)).collect::<Vec<_>>(), [(3, 3), (4, 4), (5, 5)]);
        running(&q, 6);
        assert_eq!(q.batch().unwrap().last().unwrap().seq, 6);
        q.ack(6);
        q.batch().unwrap();
        drop(q);
        let q = UpdateQueue::open(&path).unwrap();
        assert!(q.is_empty());
        assert_eq!(q.last_seq(), 6, "numbering continues after everything was acknowledged");
    }

    #[test]
    fn only_flushed_updates_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("updates.log");
        let q = UpdateQueue::open(&path).unwrap();
        running(&q, 1);
        q.batch().unwrap();
        running(&q, 2); // never flushed: never sent
        drop(q);
        let q = UpdateQueue::open(&path).unwrap();
        assert_eq!(q.batch().unwrap().len(), 1);
    }

    #[test]
    fn torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("updates.log");
        let q = UpdateQueue::open(&path).unwrap();
        running(&q, 1);
        running(&q, 2);
        q.batch().unwrap();
        drop(q);
        let len = fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap(); // the last record lost its end
        drop(f);
        let q = UpdateQueue::open(&path).unwrap();
        let batch = q.batch().unwrap();
        assert_eq!(batch.iter().map(|u| u.seq).collect::<Vec<_>>(), [1]);
        // A zero-filled tail (preallocated blocks) is torn too.
        drop(q);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0u8; 64]).unwrap();
        drop(f);
        assert_eq!(UpdateQueue::open(&path).unwrap().len(), 1);
    }

    #[test]
    fn damaged_middle_record_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("updates.log");
        let q = UpdateQueue::open(&path).unwrap();
        for t in 1..=3 {
            running(&q, t);
        }
        q.batch().unwrap();
        drop(q);
        let mut bytes = fs::read(&path).unwrap();
        // Flip a byte inside the second record (after the magic and the header).
        let header_len = 8 + u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        let second = 8 + header_len + 8 + 4;
        bytes[second + 20] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let err = UpdateQueue::open(&path).err().expect("refused");
        assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn newer_record_version_and_bad_magic_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("updates.log");
        let mut bytes = MAGIC.to_vec();
        let body = [&2u16.to_le_bytes()[..], b"{}"].concat();
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        fs::write(&path, &bytes).unwrap();
        let err = UpdateQueue::open(&path).err().expect("refused");
        assert!(matches!(err, LogError::NewerVersion { found: 2, .. }), "{err}");
        fs::write(&path, b"{\"not\": \"a log\"}").unwrap();
        assert!(matches!(UpdateQueue::open(&path).err(), Some(LogError::BadMagic { .. })));
    }

    #[test]
    fn compaction_keeps_only_what_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("updates.log");
        let q = UpdateQueue::open(&path).unwrap();
        for t in 0..(COMPACT_MIN_ACKED as u64 + 10) {
            running(&q, t);
        }
        q.batch().unwrap();
        let big = fs::metadata(&path).unwrap().len();
        q.ack(COMPACT_MIN_ACKED as u64 + 5); // acknowledged records dominate: rewritten
        q.batch().unwrap();
        assert_eq!(q.dead_records(), 0);
        let small = fs::metadata(&path).unwrap().len();
        assert!(small < big / 100, "{small} vs {big}");
        drop(q);
        let q = UpdateQueue::open(&path).unwrap();
        let seqs: Vec<u64> = q.batch().unwrap().iter().map(|u| u.seq).collect();
        let first = COMPACT_MIN_ACKED as u64 + 6;
        assert_eq!(seqs, (first..first + 5).collect::<Vec<_>>());
        assert_eq!(q.last_seq(), first + 4);
    }

    #[test]
    fn registration_acknowledges_what_the_master_has_or_renumbers_after_it() {
        let q = UpdateQueue::default();
        running(&q, 1);
        running(&q, 2);
        running(&q, 3);
        assert_eq!(q.continue_after(2).len(), 2);
        assert_eq!(q.batch().unwrap().iter().map(|u| u.seq).collect::<Vec<_>>(), [3]);
        // The master knows more than this agent ever used: renumber after it.
        q.continue_after(10);
        assert_eq!(q.batch().unwrap().iter().map(|u| u.seq).collect::<Vec<_>>(), [11]);
        running(&q, 4);
        assert_eq!(q.last_seq(), 12);
    }

    #[test]
    fn over_the_bound_superseded_reports_go_and_exits_stay() {
        let q = UpdateQueue::default();
        let tasks = 1000u64;
        for round in 0..(QUEUE_MAX as u64 / tasks + 20) {
            for t in 0..tasks {
                if round == 3 && t % 2 == 0 {
                    q.push(TaskId(t), Report::Exited { exit: TaskExit::Exited { code: 0 } });
                } else {
                    running(&q, t);
                }
            }
        }
        assert!(q.len() <= QUEUE_MAX + QUEUE_MAX / 10 + 1, "{}", q.len());
        let inner = q.inner.lock();
        let exits = inner.queue.iter().filter(|u| matches!(u.report, Report::Exited { .. })).count();
        assert_eq!(exits, tasks as usize / 2, "no Exited report is ever dropped");
        let seqs: Vec<u64> = inner.queue.iter().map(|u| u.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "still in order");
        // Every task's last report is still there.
        for t in 0..tasks {
            assert!(inner.queue.iter().any(|u| u.task == TaskId(t) && matches!(u.report, Report::Running { .. })));
        }
    }
}
