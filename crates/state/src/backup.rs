//! Backups: the whole cluster state as of one log index in one self-checking file, and the
//! canonical JSON dump of a state that two copies of the state compare by. Pure: bytes in, bytes
//! out; the master and the CLI do the I/O.
//!
//! A backup file is the store's record envelope around a payload:
//!
//! | bytes        | field                                                                   |
//! |--------------|-------------------------------------------------------------------------|
//! | 0..4         | magic `b"CPSN"`                                                         |
//! | 4..8         | backup format version, u32 LE ([`BACKUP_FORMAT_VERSION`])               |
//! | 8..12        | CRC-32 (IEEE) of bytes 4.. (version and payload), LE                    |
//! | 12..16       | length H of the header, u32 LE                                          |
//! | 16..20       | CRC-32 of the header, LE (so that its lengths can be trusted alone)     |
//! | 20..20+H     | the [`BackupHeader`] as JSON (readable by any later version)            |
//! | 20+H..       | the state: [`encode_snapshot`] (its own u16 format version first)       |
//!
//! [`inspect`] checks everything a restore relies on, and names the first problem it finds (a
//! file cut short is told apart from a damaged one when its header is intact):
//! length, magic, checksum, versions (a newer one names both), the header, the state's own
//! checksum, every record of the state, and the header's counts against the decoded state.

use crate::codec::{self, decode_snapshot, encode_snapshot, CodecError, SNAPSHOT_FORMAT_VERSION};
use crate::state::ClusterState;
use capstan_model::Timestamp;
use serde::{Deserialize, Serialize};

/// Version of the backup file layout (envelope and header).
pub const BACKUP_FORMAT_VERSION: u32 = 1;
/// Bytes every backup starts with (the store's record magic).
pub const MAGIC: [u8; 4] = *b"CPSN";
/// Magic, version and checksum in front of the payload.
pub const ENVELOPE_BYTES: usize = 12;

/// What a backup says about itself; stored as JSON at the front of the payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    pub backup_format_version: u32,
    /// When the master took it (its clock).
    pub created_at: Timestamp,
    /// The Capstan that wrote it.
    pub capstan_version: String,
    /// The log index the state is as of, in the store it was taken from.
    pub store_index: u64,
    /// The format version of the encoded state after the header.
    pub snapshot_format_version: u16,
    pub jobs: u64,
    pub tasks: u64,
    pub agents: u64,
    /// Length and CRC-32 of the encoded state.
    pub state_bytes: u64,
    pub state_crc32: u32,
}

/// Where a restored state came from (kept in the state: `ClusterState::restored`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    /// When the master installed it.
    pub at: Timestamp,
    /// What the operator called the backup (its file name), as the restore request said.
    pub source: String,
    pub backup_created_at: Timestamp,
    /// The index the backup was taken at, in the store it came from.
    pub backup_index: u64,
    /// The checksum of the backup file (its envelope's CRC-32).
    pub backup_crc32: u32,
}

/// A backup that passed every check.
#[derive(Clone, Debug)]
pub struct Inspected {
    pub header: BackupHeader,
    /// The decoded state (migrated to the current format, derived fields rebuilt).
    pub state: ClusterState,
    pub file_bytes: u64,
    /// The envelope's CRC-32: the checksum of the whole file.
    pub file_crc32: u32,
}

/// Why a backup cannot be used; the message says what is wrong in words an operator can act on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackupError {
    #[error("the file is {found} bytes, too short to be a backup: it is truncated, or not a backup")]
    TooShort { found: u64 },
    #[error("the backup is truncated: it has {found} bytes, but {expected} bytes were written")]
    Truncated { found: u64, expected: u64 },
    #[error("the backup has {extra} unexpected bytes after its end (it is {found} bytes, {expected} were written)")]
    TrailingBytes { extra: u64, found: u64, expected: u64 },
    #[error("this is not a Capstan backup: {detail}")]
    NotABackup { detail: String },
    #[error("the backup is damaged: checksum mismatch (stored {stored:#010x}, computed {computed:#010x} over {bytes} bytes); it was changed or cut short after it was written")]
    Checksum { stored: u32, computed: u32, bytes: u64 },
    #[error("the backup has backup format version {found}, but this Capstan reads only up to version {supported}; use a Capstan release that supports version {found}")]
    TooNew { found: u32, supported: u32 },
    #[error("the backup's header is unreadable: {detail}")]
    Header { detail: String },
    #[error("the backup's state cannot be read: {0}")]
    State(CodecError),
    #[error("the backup disagrees with itself: {detail}")]
    Inconsistent { detail: String },
}

/// The backup of `state` (as of `state.index`), taken at `created_at` by Capstan `capstan_version`.
pub fn encode(state: &ClusterState, created_at: Timestamp, capstan_version: &str) -> Vec<u8> {
    let snapshot = encode_snapshot(state);
    let header = BackupHeader {
        backup_format_version: BACKUP_FORMAT_VERSION,
        created_at,
        capstan_version: capstan_version.to_string(),
        store_index: state.index,
        snapshot_format_version: SNAPSHOT_FORMAT_VERSION,
        jobs: state.jobs.len() as u64,
        tasks: state.tasks.len() as u64,
        agents: state.agents.len() as u64,
        state_bytes: snapshot.len() as u64,
        state_crc32: crc32fast::hash(&snapshot),
    };
    frame(&header, &snapshot)
}

/// The file for `header` and an encoded state, exactly as given (the envelope's version is the
/// header's): [`encode`] uses it, and tests use it to build backups of other versions.
pub fn frame(header: &BackupHeader, snapshot: &[u8]) -> Vec<u8> {
    let header_json = serde_json::to_vec(header).expect("the header serializes");
    let mut payload = Vec::with_capacity(8 + header_json.len() + snapshot.len());
    payload.extend_from_slice(&(header_json.len() as u32).to_le_bytes());
    payload.extend_from_slice(&crc32fast::hash(&header_json).to_le_bytes());
    payload.extend_from_slice(&header_json);
    payload.extend_from_slice(snapshot);
    let version = header.backup_format_version.to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&version);
    crc.update(&payload);
    let mut out = Vec::with_capacity(ENVELOPE_BYTES + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// The header (its own checksum verified) and the encoded state of a payload, and the length
/// of the whole file the header describes.
fn split_payload(payload: &[u8]) -> Result<(BackupHeader, &[u8], u64), BackupError> {
    let (Some(len_bytes), Some(crc_bytes)) = (payload.get(..4), payload.get(4..8)) else {
        return Err(BackupError::Header { detail: "the file ends before the header".into() });
    };
    let header_len = u32::from_le_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
    let header_crc32 = u32::from_le_bytes(crc_bytes.try_into().expect("4 bytes"));
    let Some(header_json) = payload.get(8..8 + header_len) else {
        return Err(BackupError::Header {
            detail: format!("the header is {header_len} bytes, but only {} follow", payload.len() - 8),
        });
    };
    let computed = crc32fast::hash(header_json);
    if computed != header_crc32 {
        return Err(BackupError::Header {
            detail: format!("checksum mismatch (stored {header_crc32:#010x}, computed {computed:#010x})"),
        });
    }
    let header: BackupHeader =
        serde_json::from_slice(header_json).map_err(|e| BackupError::Header { detail: e.to_string() })?;
    let expected = (ENVELOPE_BYTES + 8 + header_len) as u64 + header.state_bytes;
    Ok((header, &payload[8 + header_len..], expected))
}

/// Checks `bytes` as a backup from end to end and decodes its state; the first problem found is
/// the error. Nothing here trusts a field before the checksum covering it was verified.
pub fn inspect(bytes: &[u8]) -> Result<Inspected, BackupError> {
    let found = bytes.len() as u64;
    if bytes.len() < ENVELOPE_BYTES {
        return Err(BackupError::TooShort { found });
    }
    if bytes[..4] != MAGIC {
        return Err(BackupError::NotABackup {
            detail: format!("it starts with {:02x?}, not the magic {:02x?} (\"CPSN\")", &bytes[..4], MAGIC),
        });
    }
    let version = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let stored = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let payload = &bytes[ENVELOPE_BYTES..];
    let mut crc = crc32fast::Hasher::new();
    crc.update(&bytes[4..8]);
    crc.update(payload);
    let computed = crc.finalize();
    if stored != computed {
        // Say "truncated" when the header is intact (its own checksum) and says the file was longer.
        if let Ok((_, _, expected)) = split_payload(payload) {
            if found < expected {
                return Err(BackupError::Truncated { found, expected });
            }
            if found > expected {
                return Err(BackupError::TrailingBytes { extra: found - expected, found, expected });
            }
        }
        return Err(BackupError::Checksum { stored, computed, bytes: found - 8 });
    }
    if version == 0 {
        return Err(BackupError::NotABackup { detail: "backup format version 0 was never written".into() });
    }
    if version > BACKUP_FORMAT_VERSION {
        return Err(BackupError::TooNew { found: version, supported: BACKUP_FORMAT_VERSION });
    }
    let (header, snapshot, expected) = split_payload(payload)?;
    if header.backup_format_version != version {
        return Err(BackupError::Inconsistent {
            detail: format!(
                "the envelope says backup format version {version}, the header {}",
                header.backup_format_version
            ),
        });
    }
    if found != expected {
        return Err(BackupError::Inconsistent {
            detail: format!("the header says the file is {expected} bytes, it is {found}"),
        });
    }
    if header.snapshot_format_version > SNAPSHOT_FORMAT_VERSION {
        return Err(BackupError::State(CodecError::TooNew {
            what: "a state snapshot",
            found: header.snapshot_format_version,
            supported: SNAPSHOT_FORMAT_VERSION,
        }));
    }
    if codec::snapshot_version(snapshot) != Some(header.snapshot_format_version) {
        return Err(BackupError::Inconsistent {
            detail: format!(
                "the header says snapshot format version {}, the state itself {:?}",
                header.snapshot_format_version,
                codec::snapshot_version(snapshot)
            ),
        });
    }
    let state_crc32 = crc32fast::hash(snapshot);
    if state_crc32 != header.state_crc32 {
        return Err(BackupError::Inconsistent {
            detail: format!(
                "the state's checksum is {state_crc32:#010x}, the header says {:#010x}",
                header.state_crc32
            ),
        });
    }
    let state = decode_snapshot(snapshot).map_err(BackupError::State)?;
    check_against_header(&state, &header)?;
    Ok(Inspected { header, state, file_bytes: found, file_crc32: stored })
}

/// The decoded state agrees with the header's counts and index, and every record sits under its
/// own id.
fn check_against_header(state: &ClusterState, header: &BackupHeader) -> Result<(), BackupError> {
    let mut problems = Vec::new();
    let counts = [
        ("jobs", header.jobs, state.jobs.len() as u64),
        ("tasks", header.tasks, state.tasks.len() as u64),
        ("agents", header.agents, state.agents.len() as u64),
    ];
    for (what, said, has) in counts {
        if said != has {
            problems.push(format!("the header counts {said} {what}, the state has {has}"));
        }
    }
    if state.index != header.store_index {
        problems.push(format!("the header says index {}, the state {}", header.store_index, state.index));
    }
    problems.extend(
        state.jobs.iter().filter(|(k, j)| **k != *j.key).map(|(k, j)| format!("job {k} is stored as {}", j.key)),
    );
    problems.extend(
        state.tasks.iter().filter(|(k, t)| **k != t.id).map(|(k, t)| format!("task {k} is stored as {}", t.id)),
    );
    problems.extend(
        state
            .agents
            .iter()
            .filter(|(k, a)| **k != a.info.id)
            .map(|(k, a)| format!("agent {k} is stored as {}", a.info.id)),
    );
    let counted: u64 = state.task_counts().values().sum();
    if counted != state.tasks.len() as u64 {
        problems.push(format!("{counted} tasks counted by state, {} stored", state.tasks.len()));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(BackupError::Inconsistent { detail: problems.join("; ") })
    }
}

/// The whole state as canonical JSON: every stored field, object keys sorted, pretty-printed,
/// ending in a newline. Two states with the same cluster content give the same bytes, whichever
/// store or master holds them: `GET /v1/admin/dump` and `capstan admin backup inspect --dump`.
///
/// Left out ([`DUMP_LEAVES_OUT`]): `index` (the log position, which differs between stores
/// holding the same state, e.g. after a restore), `restored` (where this copy came from) and
/// `epoch` (the leadership term, which every new leader advances, and a restore starts one).
pub fn dump(state: &ClusterState) -> String {
    let mut value = serde_json::to_value(state).expect("the state serializes to JSON");
    if let Some(fields) = value.as_object_mut() {
        for field in DUMP_LEAVES_OUT {
            fields.remove(*field);
        }
    }
    let mut text = serde_json::to_string_pretty(&value).expect("a JSON value prints");
    text.push('\n');
    text
}

/// Top-level fields of the state that [`dump`] leaves out.
pub const DUMP_LEAVES_OUT: &[&str] = &["index", "restored", "epoch"];
