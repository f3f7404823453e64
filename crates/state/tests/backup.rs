//! Backup files: what `inspect` accepts and, for every way a file can be wrong, the error it
//! names (truncated, damaged, from the future, disagreeing with itself), plus the canonical dump.

mod common;
mod fixture;

use capstan_model::Timestamp;
use capstan_state::backup::{self, BackupError, BackupHeader, BACKUP_FORMAT_VERSION, ENVELOPE_BYTES};
use capstan_state::codec::SNAPSHOT_FORMAT_VERSION;
use capstan_state::{encode_snapshot, ClusterState, CodecError};

const AT: Timestamp = Timestamp(1_750_000_000_000);

fn state() -> ClusterState {
    fixture::history().state
}

fn header_of(bytes: &[u8]) -> BackupHeader {
    backup::inspect(bytes).expect("a good backup").header
}

#[test]
fn a_backup_reads_back_as_the_same_state_with_its_counts() {
    let s = state();
    let bytes = backup::encode(&s, AT, "9.9.9");
    let got = backup::inspect(&bytes).expect("a fresh backup passes inspection");
    let h = &got.header;
    assert_eq!(h.backup_format_version, BACKUP_FORMAT_VERSION);
    assert_eq!(h.snapshot_format_version, SNAPSHOT_FORMAT_VERSION);
    assert_eq!((h.created_at, h.capstan_version.as_str(), h.store_index), (AT, "9.9.9", s.index));
    assert_eq!((h.jobs, h.tasks, h.agents), (6, 11, 3));
    assert_eq!(encode_snapshot(&got.state), encode_snapshot(&s));
    assert_eq!(got.state.pending, s.pending, "derived fields are rebuilt");
    assert_eq!(backup::dump(&got.state), backup::dump(&s));
    assert_eq!(got.file_bytes, bytes.len() as u64);
    assert_eq!(got.file_crc32, u32::from_le_bytes(bytes[8..12].try_into().unwrap()));
    // The same state gives the same bytes.
    assert_eq!(backup::encode(&s, AT, "9.9.9"), bytes);
}

#[test]
fn an_empty_cluster_backs_up_too() {
    let bytes = backup::encode(&ClusterState::default(), AT, "1");
    let got = backup::inspect(&bytes).unwrap();
    assert_eq!((got.header.jobs, got.header.tasks, got.header.agents), (0, 0, 0));
}

#[test]
fn a_truncated_backup_is_refused_as_truncated() {
    let bytes = backup::encode(&state(), AT, "1");
    let len = bytes.len() as u64;
    let header_end = {
        let h = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        ENVELOPE_BYTES + 8 + h
    };
    for cut in 0..bytes.len() {
        let err = backup::inspect(&bytes[..cut]).unwrap_err();
        match err {
            BackupError::TooShort { found } => assert!(cut < ENVELOPE_BYTES && found == cut as u64),
            BackupError::Truncated { found, expected } => {
                assert!(cut >= header_end, "cut at {cut}");
                assert_eq!((found, expected), (cut as u64, len));
            }
            // Cut inside the header: it cannot vouch for the length, so this is damage.
            BackupError::Checksum { .. } => assert!((ENVELOPE_BYTES..header_end).contains(&cut), "cut at {cut}"),
            other => panic!("cut at {cut}: {other}"),
        }
    }
    let err = backup::inspect(&bytes[..bytes.len() / 2]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("the backup is truncated: it has {} bytes, but {len} bytes were written", bytes.len() / 2)
    );
}

#[test]
fn every_flipped_bit_is_refused_as_damage() {
    let bytes = backup::encode(&state(), AT, "1");
    for byte in 0..bytes.len() {
        for bit in [0, 3, 7] {
            let mut bad = bytes.clone();
            bad[byte] ^= 1 << bit;
            match backup::inspect(&bad).unwrap_err() {
                BackupError::NotABackup { .. } => assert!(byte < 4, "byte {byte} bit {bit}"),
                BackupError::Checksum { stored, computed, .. } => assert_ne!(stored, computed),
                other => panic!("byte {byte} bit {bit}: {other}"),
            }
        }
    }
    let mut bad = bytes.clone();
    bad[bytes.len() - 10] ^= 0x10;
    let text = backup::inspect(&bad).unwrap_err().to_string();
    assert!(text.starts_with("the backup is damaged: checksum mismatch"), "{text}");
}

#[test]
fn extra_bytes_after_the_end_are_refused() {
    let mut bytes = backup::encode(&state(), AT, "1");
    let len = bytes.len() as u64;
    bytes.extend_from_slice(b"junk");
    let err = backup::inspect(&bytes).unwrap_err();
    assert_eq!(err, BackupError::TrailingBytes { extra: 4, found: len + 4, expected: len });
}

#[test]
fn other_files_are_not_backups() {
    let err = backup::inspect(b"{\"jobs\": []} and more text").unwrap_err();
    assert!(matches!(err, BackupError::NotABackup { .. }), "{err}");
    assert!(err.to_string().contains("not a Capstan backup"), "{err}");
    assert_eq!(backup::inspect(b"").unwrap_err(), BackupError::TooShort { found: 0 });
}

/// A backup of `s` with the header changed by `edit` and the state's bytes by `state`, framed
/// with correct checksums (as a future Capstan would write it).
fn forged(s: &ClusterState, edit: impl FnOnce(&mut BackupHeader), state: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut header = header_of(&backup::encode(s, AT, "1"));
    let mut snapshot = encode_snapshot(s);
    state(&mut snapshot);
    header.state_bytes = snapshot.len() as u64;
    header.state_crc32 = crc32fast::hash(&snapshot);
    edit(&mut header);
    backup::frame(&header, &snapshot)
}

#[test]
fn a_future_backup_format_is_refused_naming_both_versions() {
    let s = state();
    let future = BACKUP_FORMAT_VERSION + 1;
    let bytes = forged(&s, |h| h.backup_format_version = future, |_| {});
    let err = backup::inspect(&bytes).unwrap_err();
    assert_eq!(err, BackupError::TooNew { found: future, supported: BACKUP_FORMAT_VERSION });
    let text = err.to_string();
    assert!(
        text.contains(&format!("backup format version {future}"))
            && text.contains(&format!("up to version {BACKUP_FORMAT_VERSION}")),
        "{text}"
    );
}

#[test]
fn a_future_snapshot_format_is_refused_naming_both_versions() {
    let s = state();
    let future = SNAPSHOT_FORMAT_VERSION + 1;
    let bytes = forged(&s, |h| h.snapshot_format_version = future, |b| b[..2].copy_from_slice(&future.to_le_bytes()));
    let err = backup::inspect(&bytes).unwrap_err();
    assert_eq!(
        err,
        BackupError::State(CodecError::TooNew {
            what: "a state snapshot",
            found: future,
            supported: SNAPSHOT_FORMAT_VERSION
        })
    );
    let text = err.to_string();
    assert!(text.contains(&format!("format version {future}")), "{text}");
    assert!(text.contains(&format!("up to version {SNAPSHOT_FORMAT_VERSION}")), "{text}");
}

#[test]
fn a_v3_state_in_a_backup_is_migrated() {
    let v3 = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v3/snapshot.bin")).unwrap();
    let s = state();
    let bytes = forged(
        &s,
        |h| h.snapshot_format_version = 3,
        |b| {
            b.clear();
            b.extend_from_slice(&v3);
        },
    );
    let got = backup::inspect(&bytes).expect("a backup holding a v3 state reads");
    assert_eq!(got.header.snapshot_format_version, 3);
    assert_eq!(backup::dump(&got.state), backup::dump(&s));
}

#[test]
fn an_undecodable_state_is_refused() {
    let s = state();
    let bytes = forged(&s, |_| {}, |b| b.truncate(b.len() - 7));
    let err = backup::inspect(&bytes).unwrap_err();
    assert!(matches!(err, BackupError::State(CodecError::Malformed { .. })), "{err}");
    assert!(
        err.to_string().starts_with("the backup's state cannot be read: a state snapshot is not readable"),
        "{err}"
    );
}

#[test]
fn counts_that_disagree_with_the_state_are_refused() {
    let s = state();
    let bytes = forged(&s, |h| h.tasks += 1, |_| {});
    let err = backup::inspect(&bytes).unwrap_err();
    assert_eq!(
        err,
        BackupError::Inconsistent {
            detail: format!("the header counts {} tasks, the state has {}", s.tasks.len() + 1, s.tasks.len())
        }
    );
    let err = backup::inspect(&forged(&s, |h| h.state_crc32 ^= 1, |_| {})).unwrap_err();
    assert!(matches!(&err, BackupError::Inconsistent { detail } if detail.contains("the state's checksum")), "{err}");
    let err = backup::inspect(&forged(&s, |h| h.store_index += 5, |_| {})).unwrap_err();
    assert!(matches!(&err, BackupError::Inconsistent { detail } if detail.contains("index")), "{err}");
}

#[test]
fn the_dump_is_canonical_json_without_the_index_and_the_restore_record() {
    let mut s = state();
    let text = backup::dump(&s);
    assert!(text.ends_with("}\n"));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v.get("index").is_none() && v.get("restored").is_none());
    assert_eq!(v["jobs"].as_object().unwrap().len(), 6);
    // Keys are sorted at every level: the text is its own canonical form.
    assert_eq!(serde_json::to_string_pretty(&v).unwrap() + "\n", text);
    s.index += 100;
    s.restored = Some(backup::Restored {
        at: AT,
        source: "x.backup".into(),
        backup_created_at: AT,
        backup_index: 1,
        backup_crc32: 7,
    });
    assert_eq!(backup::dump(&s), text, "where a copy lives is not part of the dump");
    s.task_seq += 1;
    assert_ne!(backup::dump(&s), text);
}
