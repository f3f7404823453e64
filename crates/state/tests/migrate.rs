//! Stored formats across versions: the committed encodings of older versions (`tests/fixtures/`)
//! read back through the explicit migrations; newer and never-released versions are refused,
//! naming both versions.

mod common;
mod fixture;

use capstan_state::codec::{COMMAND_FORMAT_VERSION, SNAPSHOT_FORMAT_VERSION};
use capstan_state::{backup, encode_command, encode_snapshot};
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
