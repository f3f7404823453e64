//! The stored forms of commands and snapshots: a format version in front of a postcard body.
//!
//! Postcard is compact and fast but not self-describing, so any change to a stored type needs a
//! new version number here and an explicit migration from the old one. A reader refuses a version
//! newer than it knows, naming both, rather than misreading it.
//!
//! Versions: 1 and 2 never left development (refused). 3: the first released format. 4: the
//! snapshot gained `ClusterState::restored` and `ClusterState::epoch`; commands gained
//! `BeginTerm` (a new last variant, so every version-3 command reads unchanged as version 4). 5:
//! commands gained `KillJobSlice` and `ForgetJobSlice` (new last variants: every version-4 command
//! reads unchanged); snapshots did not change (version 5 is 4, so that a master that cannot read
//! the newer commands of a log does not read its snapshot either). Tests: `tests/migrate.rs`, against the
//! committed encodings in `tests/fixtures/vN/`.

use crate::command::Stamped;
use crate::state::ClusterState;
use serde::{Deserialize, Serialize};

/// Version of the encoding of logged commands.
pub const COMMAND_FORMAT_VERSION: u16 = 5;
/// Version of the encoding of snapshots.
pub const SNAPSHOT_FORMAT_VERSION: u16 = 5;
/// The oldest format version a released Capstan wrote; lower numbers never left development.
pub const FIRST_RELEASED_FORMAT_VERSION: u16 = 3;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("{what} has format version {found}, but this Capstan reads only up to version {supported}; upgrade Capstan before reading it")]
    TooNew { what: &'static str, found: u16, supported: u16 },
    #[error("{what} has format version {found}, which no released Capstan wrote (the first released version is {first}); it cannot be read")]
    NeverReleased { what: &'static str, found: u16, first: u16 },
    #[error("{what} has unknown format version {found}")]
    Unknown { what: &'static str, found: u16 },
    #[error("{what} is not readable: {detail}")]
    Malformed { what: &'static str, detail: String },
}

const COMMAND: &str = "a logged command";
const SNAPSHOT: &str = "a state snapshot";

fn encode_versioned<T: Serialize>(version: u16, value: &T) -> Vec<u8> {
    let mut out = version.to_le_bytes().to_vec();
    postcard::to_io(value, &mut out).expect("writing to a Vec cannot fail");
    out
}

/// The format version in front of `bytes` and the body after it; refuses versions this Capstan
/// cannot read.
fn split_version<'a>(what: &'static str, supported: u16, bytes: &'a [u8]) -> Result<(u16, &'a [u8]), CodecError> {
    if bytes.len() < 2 {
        return Err(CodecError::Malformed { what, detail: format!("{} bytes is too short", bytes.len()) });
    }
    let version = u16::from_le_bytes([bytes[0], bytes[1]]);
    if version > supported {
        return Err(CodecError::TooNew { what, found: version, supported });
    }
    if version < FIRST_RELEASED_FORMAT_VERSION {
        return Err(CodecError::NeverReleased { what, found: version, first: FIRST_RELEASED_FORMAT_VERSION });
    }
    Ok((version, &bytes[2..]))
}

/// The whole body as one `T`; bytes left over are an error too.
fn body<T: for<'de> Deserialize<'de>>(what: &'static str, body: &[u8]) -> Result<T, CodecError> {
    let (value, rest) =
        postcard::take_from_bytes(body).map_err(|e| CodecError::Malformed { what, detail: e.to_string() })?;
    if !rest.is_empty() {
        return Err(CodecError::Malformed { what, detail: format!("{} bytes left over after its end", rest.len()) });
    }
    Ok(value)
}

pub fn encode_command(c: &Stamped) -> Vec<u8> {
    encode_versioned(COMMAND_FORMAT_VERSION, c)
}

pub fn decode_command(bytes: &[u8]) -> Result<Stamped, CodecError> {
    match split_version(COMMAND, COMMAND_FORMAT_VERSION, bytes)? {
        // Each version only added variants at the end: older commands read unchanged.
        (3..=5, rest) => body(COMMAND, rest),
        (found, _) => Err(CodecError::Unknown { what: COMMAND, found }),
    }
}

pub fn encode_snapshot(state: &ClusterState) -> Vec<u8> {
    encode_versioned(SNAPSHOT_FORMAT_VERSION, state)
}

/// The format version a snapshot was written with, without decoding it (for `backup inspect`).
pub fn snapshot_version(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_le_bytes([*bytes.first()?, *bytes.get(1)?]))
}

pub fn decode_snapshot(bytes: &[u8]) -> Result<ClusterState, CodecError> {
    let mut state = match split_version(SNAPSHOT, SNAPSHOT_FORMAT_VERSION, bytes)? {
        (3, rest) => v3::ClusterState::into_v4(body(SNAPSHOT, rest)?),
        // 5 only says that the log may hold version-5 commands: the state is encoded as in 4.
        (4 | 5, rest) => body(SNAPSHOT, rest)?,
        (found, _) => return Err(CodecError::Unknown { what: SNAPSHOT, found }),
    };
    state.rebuild_derived();
    Ok(state)
}

/// Snapshot format 3, frozen: only the top-level struct changed in 4, so only it is copied here;
/// the types inside are today's, which read version 3 unchanged. When one of them changes, its
/// version-3 form gets a frozen copy here too. Never edit these.
mod v3 {
    use crate::agent::Agent;
    use crate::command::{Freeze, Quota, SchedulerSettings};
    use crate::drain::MaintenanceWindow;
    use crate::state::{Counters, Job, Task};
    use capstan_model::{AgentId, JobKey, TaskId};
    use serde::Deserialize;
    use std::collections::BTreeMap;

    /// `ClusterState` as version 3 stored it (field order matters: postcard is positional).
    #[derive(Deserialize)]
    pub struct ClusterState {
        index: u64,
        jobs: BTreeMap<JobKey, Job>,
        tasks: BTreeMap<TaskId, Task>,
        task_seq: u64,
        job_seq: u64,
        agents: BTreeMap<AgentId, Agent>,
        counters: Counters,
        quotas: BTreeMap<String, Quota>,
        scheduler: SchedulerSettings,
        frozen: Option<Freeze>,
        maintenance: BTreeMap<u64, MaintenanceWindow>,
        maintenance_seq: u64,
    }

    impl ClusterState {
        /// Version 4 added `restored` (a version-3 state was never restored by it) and `epoch`
        /// (no version-3 master began a term in the log: 0, and the next term begins above it).
        pub fn into_v4(self) -> crate::state::ClusterState {
            crate::state::ClusterState {
                index: self.index,
                jobs: self.jobs,
                tasks: self.tasks,
                task_seq: self.task_seq,
                job_seq: self.job_seq,
                agents: self.agents,
                counters: self.counters,
                quotas: self.quotas,
                scheduler: self.scheduler,
                frozen: self.frozen,
                maintenance: self.maintenance,
                maintenance_seq: self.maintenance_seq,
                restored: None,
                epoch: 0,
                ..Default::default()
            }
        }
    }
}
