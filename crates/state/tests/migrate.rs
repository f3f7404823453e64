//! Stored formats across versions: the committed encodings of older versions (`tests/fixtures/`)
//! read back through the explicit migrations; newer and never-released versions are refused,
//! naming both versions.

mod common;
mod fixture;

use capstan_state::codec::{COMMAND_FORMAT_VERSION, SNAPSHOT_FORMAT_VERSION};
use capstan_state::{
    backup, decode_command, decode_snapshot, encode_command, encode_snapshot, ClusterState, CodecError,
};
use std::path::PathBuf;

fn fixtures_dir(version: u16) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("v{version}"))
}

/// Writes the encodings of the current version: run by hand before changing a stored type
/// (see `tests/fixture/mod.rs`).
#[test]
#[ignore = "writes fixture files; run by hand before a format change"]
fn write_fixtures() {
    assert_eq!(COMMAND_FORMAT_VERSION, SNAPSHOT_FORMAT_VERSION, "the fixtures assume one version for both");
    let h = fixture::history();
    let dir = fixtures_dir(SNAPSHOT_FORMAT_VERSION);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("snapshot.bin"), encode_snapshot(&h.state)).unwrap();
    let log: Vec<Vec<u8>> = h.log.iter().map(encode_command).collect();
    std::fs::write(dir.join("commands.bin"), fixture::encode_log(&log)).unwrap();
    std::fs::write(dir.join("state.json"), backup::dump(&h.state)).unwrap();
    std::fs::write(dir.join("index"), format!("{}\n", h.state.index)).unwrap();
}

fn read_fixture(version: u16, name: &str) -> Vec<u8> {
    let path = fixtures_dir(version).join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_v3_snapshot_migrates_to_the_same_cluster() {
    let bytes = read_fixture(3, "snapshot.bin");
    assert_eq!(&bytes[..2], &3u16.to_le_bytes(), "the fixture is a version-3 snapshot");
    let state = decode_snapshot(&bytes).expect("a v3 snapshot reads");
    let want = String::from_utf8(read_fixture(3, "state.json")).unwrap();
    assert_eq!(backup::dump(&state), want, "the migrated state is the one v3 wrote");
    let index: u64 = String::from_utf8(read_fixture(3, "index")).unwrap().trim().parse().unwrap();
    assert_eq!(state.index, index);
    assert_eq!(state.restored, None, "a v3 state was never restored");
    assert!(!state.pending.is_empty(), "derived fields are rebuilt after the migration");
    // Written again, it is a current snapshot that reads back as itself.
    let again = encode_snapshot(&state);
    assert_eq!(&again[..2], &SNAPSHOT_FORMAT_VERSION.to_le_bytes());
    assert_eq!(encode_snapshot(&decode_snapshot(&again).unwrap()), again);
}

#[test]
fn the_v3_command_log_replays_to_the_v3_snapshot() {
    let log = read_fixture(3, "commands.bin");
    let mut state = ClusterState::default();
    let entries = fixture::decode_log(&log);
    assert!(entries.len() > 40, "the fixture log has {} commands", entries.len());
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(&entry[..2], &3u16.to_le_bytes(), "entry {i} is a version-3 command");
        let stamped = decode_command(entry).unwrap_or_else(|e| panic!("entry {i}: {e}"));
        state
            .apply(&stamped)
            .unwrap_or_else(|e| panic!("entry {i} ({}) refused on replay: {e}", stamped.command.name()));
        state.index += 1;
    }
    let snapshot = decode_snapshot(&read_fixture(3, "snapshot.bin")).unwrap();
    assert_eq!(encode_snapshot(&state), encode_snapshot(&snapshot), "the v3 log replays to the v3 snapshot");
    // And today's code builds the same history: the fixture generator did not drift.
    let today = fixture::history();
    let today_log: Vec<Vec<u8>> = today.log.iter().map(encode_command).collect();
    let v3_log: Vec<Vec<u8>> = entries.iter().map(|e| e[2..].to_vec()).collect();
    let today_bodies: Vec<Vec<u8>> = today_log.iter().map(|e| e[2..].to_vec()).collect();
    assert_eq!(today_bodies, v3_log, "command bodies did not change from 3 to 4");
}

fn with_version(bytes: &[u8], version: u16) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[..2].copy_from_slice(&version.to_le_bytes());
    out
}

#[test]
fn newer_versions_are_refused_naming_both_versions() {
    let h = fixture::history();
    let next = SNAPSHOT_FORMAT_VERSION + 1;
    let err = decode_snapshot(&with_version(&encode_snapshot(&h.state), next)).unwrap_err();
    assert_eq!(err, CodecError::TooNew { what: "a state snapshot", found: next, supported: SNAPSHOT_FORMAT_VERSION });
    let text = err.to_string();
    assert!(
        text.contains(&format!("version {next}")) && text.contains(&format!("up to version {SNAPSHOT_FORMAT_VERSION}")),
        "{text}"
    );

    let next = COMMAND_FORMAT_VERSION + 1;
    let err = decode_command(&with_version(&encode_command(&h.log[0]), next)).unwrap_err();
    assert_eq!(err, CodecError::TooNew { what: "a logged command", found: next, supported: COMMAND_FORMAT_VERSION });
    let text = err.to_string();
    assert!(
        text.contains(&format!("version {next}")) && text.contains(&format!("up to version {COMMAND_FORMAT_VERSION}")),
        "{text}"
    );
}

#[test]
fn never_released_versions_are_refused_clearly() {
    let h = fixture::history();
    for version in [0u16, 1, 2] {
        let err = decode_snapshot(&with_version(&encode_snapshot(&h.state), version)).unwrap_err();
        assert_eq!(err, CodecError::NeverReleased { what: "a state snapshot", found: version, first: 3 });
        assert!(err.to_string().contains("no released Capstan wrote"), "{err}");
        let err = decode_command(&with_version(&encode_command(&h.log[0]), version)).unwrap_err();
        assert_eq!(err, CodecError::NeverReleased { what: "a logged command", found: version, first: 3 });
    }
}

#[test]
fn a_damaged_or_padded_body_is_malformed_not_misread() {
    let h = fixture::history();
    let snapshot = encode_snapshot(&h.state);
    let mut padded = snapshot.clone();
    padded.push(0);
    let err = decode_snapshot(&padded).unwrap_err();
    assert!(matches!(&err, CodecError::Malformed { detail, .. } if detail.contains("1 bytes left over")), "{err}");
    let err = decode_snapshot(&snapshot[..snapshot.len() / 2]).unwrap_err();
    assert!(matches!(err, CodecError::Malformed { what: "a state snapshot", .. }), "{err}");
    assert!(matches!(decode_command(&[4]).unwrap_err(), CodecError::Malformed { .. }));
}

/// Version 5 (kill and forget slices) is committed too, so that the next format change is tested
/// against it: its snapshot reads as the cluster it wrote, and its log replays to that snapshot.
#[test]
fn the_v5_encodings_read_back_and_replay() {
    let bytes = read_fixture(5, "snapshot.bin");
    assert_eq!(&bytes[..2], &5u16.to_le_bytes(), "the fixture is a version-5 snapshot");
    let snapshot = decode_snapshot(&bytes).expect("a v5 snapshot reads");
    assert_eq!(backup::dump(&snapshot), String::from_utf8(read_fixture(5, "state.json")).unwrap());
    let mut state = ClusterState::default();
    for (i, entry) in fixture::decode_log(&read_fixture(5, "commands.bin")).iter().enumerate() {
        assert_eq!(&entry[..2], &5u16.to_le_bytes(), "entry {i} is a version-5 command");
        let stamped = decode_command(entry).unwrap_or_else(|e| panic!("entry {i}: {e}"));
        state.apply(&stamped).unwrap_or_else(|e| panic!("entry {i} refused on replay: {e}"));
        state.index += 1;
    }
    assert_eq!(encode_snapshot(&state), encode_snapshot(&snapshot), "the v5 log replays to the v5 snapshot");
}
