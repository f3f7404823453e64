//! Backups: the whole cluster state as of one log index in one self-checking file, and the
//! canonical JSON dump of a state that two copies of the state compare by.

use crate::state::ClusterState;

/// The whole state as canonical JSON: every stored field, object keys sorted, pretty-printed,
/// ending in a newline. Two states with the same cluster content give the same bytes.
///
/// Left out: `index` (the log position, which differs between stores that hold the same state,
/// e.g. after a restore).
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
pub const DUMP_LEAVES_OUT: &[&str] = &["index"];
