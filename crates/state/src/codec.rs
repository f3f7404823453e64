//! The stored forms of commands and snapshots: a format version in front of a postcard body.
//!
//! Postcard is compact and fast but not self-describing, so any change to a stored type needs a
//! new version number here and an explicit migration from the old one. A reader refuses a version
//! newer than it knows, naming both, rather than misreading it.

use crate::command::Stamped;
use crate::state::ClusterState;
use serde::{Deserialize, Serialize};

/// Version of the encoding of logged commands.
pub const COMMAND_FORMAT_VERSION: u16 = 3;
/// Version of the encoding of snapshots.
pub const SNAPSHOT_FORMAT_VERSION: u16 = 3;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("{what} has format version {found}, but this Capstan reads only up to version {supported}; upgrade Capstan before reading it")]
    TooNew { what: &'static str, found: u16, supported: u16 },
    #[error("{what} has unknown format version {found}")]
    Unknown { what: &'static str, found: u16 },
    #[error("{what} is not readable: {detail}")]
    Malformed { what: &'static str, detail: String },
}

fn encode_versioned<T: Serialize>(version: u16, value: &T) -> Vec<u8> {
    let mut out = version.to_le_bytes().to_vec();
    postcard::to_io(value, &mut out).expect("writing to a Vec cannot fail");
    out
}

fn decode_versioned<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    supported: u16,
    bytes: &[u8],
) -> Result<T, CodecError> {
    if bytes.len() < 2 {
        return Err(CodecError::Malformed { what, detail: format!("{} bytes is too short", bytes.len()) });
    }
    let version = u16::from_le_bytes([bytes[0], bytes[1]]);
    if version > supported {
        return Err(CodecError::TooNew { what, found: version, supported });
    }
    if version != supported {
        // Version 1 is the first; migrations from older versions go here when there are any.
        return Err(CodecError::Unknown { what, found: version });
    }
    postcard::from_bytes(&bytes[2..]).map_err(|e| CodecError::Malformed { what, detail: e.to_string() })
}

pub fn encode_command(c: &Stamped) -> Vec<u8> {
    encode_versioned(COMMAND_FORMAT_VERSION, c)
}

pub fn decode_command(bytes: &[u8]) -> Result<Stamped, CodecError> {
    decode_versioned("a logged command", COMMAND_FORMAT_VERSION, bytes)
}

pub fn encode_snapshot(state: &ClusterState) -> Vec<u8> {
    encode_versioned(SNAPSHOT_FORMAT_VERSION, state)
}

pub fn decode_snapshot(bytes: &[u8]) -> Result<ClusterState, CodecError> {
    let mut state: ClusterState = decode_versioned("a state snapshot", SNAPSHOT_FORMAT_VERSION, bytes)?;
    state.rebuild_derived();
    Ok(state)
}
