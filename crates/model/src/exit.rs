//! How a task's process ended, as observed on its agent, and the words a person reads about it.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

/// The end of one task process, as the agent's supervisor observed it.
///
/// Every variant renders to a reason a person understands (`Display`).
///
/// In JSON it is tagged by `kind` (`{"kind": "exited", "code": 3}`). Compact binary forms such as
/// the stored log (postcard) cannot read serde's tagged enums (they need `deserialize_any`), so
/// there the same fields are read back in order: see `Deserialize` below.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", tag = "kind", rename_all = "snake_case")]
pub enum TaskExit {
    /// The process exited by itself with this status.
    Exited { code: i32 },
    /// The process was ended by a signal nobody in Capstan sent (e.g. `kill -9` by hand).
    Signaled { signal: i32 },
    /// The kernel's OOM killer ended the task because it reached its memory limit.
    OutOfMemory { limit_bytes: u64 },
    /// The sandbox grew past the task's disk reservation and the agent killed it.
    OverDisk { limit_bytes: u64, used_bytes: u64 },
    /// Capstan stopped it on request (user kill, job kill, update, preemption); `by` says who.
    Killed { by: String },
    /// The task's health check failed too many times in a row and its agent killed it.
    HealthCheckFailed { reason: String },
    /// The task never started: bad user, missing binary, cgroup failure, …
    LaunchFailed { message: String },
    /// The supervisor that watched the task vanished without recording how the task ended.
    SupervisorLost { message: String },
}

impl TaskExit {
    /// True when the task ended on its own with status 0.
    pub fn is_success(&self) -> bool {
        matches!(self, TaskExit::Exited { code: 0 })
    }
}

impl fmt::Display for TaskExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskExit::Exited { code } => write!(f, "exited with code {code}"),
            TaskExit::Signaled { signal } => {
                write!(f, "killed by signal {signal}")?;
                if let Some(name) = signal_name(*signal) {
                    write!(f, " ({name})")?;
                }
                Ok(())
            }
            TaskExit::OutOfMemory { limit_bytes } => write!(
                f,
                "out of memory: killed by the kernel at its memory limit of {}",
                crate::resources::ByteSize(*limit_bytes)
            ),
            TaskExit::OverDisk { limit_bytes, used_bytes } => write!(
                f,
                "over disk quota: sandbox used {} of its {} limit",
                crate::resources::ByteSize(*used_bytes),
                crate::resources::ByteSize(*limit_bytes)
            ),
            TaskExit::Killed { by } => write!(f, "killed: {by}"),
            TaskExit::HealthCheckFailed { reason } => write!(f, "failed health check: {reason}"),
            TaskExit::LaunchFailed { message } => write!(f, "failed to launch: {message}"),
            TaskExit::SupervisorLost { message } => write!(f, "supervisor lost: {message}"),
        }
    }
}

impl Serialize for TaskExit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The derived (tagged) form: a struct whose first field is `kind`, in every format.
        TaskExit::serialize(self, s)
    }
}

impl<'de> Deserialize<'de> for TaskExit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            TaskExit::deserialize(d)
        } else {
            d.deserialize_struct("TaskExit", &["kind", "field1", "field2"], CompactTaskExit)
        }
    }
}

/// Reads the derived tagged form from a format that is not self-describing: `kind`, then the
/// variant's fields in declaration order.
struct CompactTaskExit;

impl<'de> Visitor<'de> for CompactTaskExit {
    type Value = TaskExit;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a task exit: kind, then its fields")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TaskExit, A::Error> {
        fn next<'de, A: SeqAccess<'de>, T: Deserialize<'de>>(seq: &mut A, i: usize) -> Result<T, A::Error> {
            seq.next_element()?.ok_or_else(|| de::Error::invalid_length(i, &CompactTaskExit))
        }
        const KINDS: &[&str] = &[
            "exited",
            "signaled",
            "out_of_memory",
            "over_disk",
            "killed",
            "health_check_failed",
            "launch_failed",
            "supervisor_lost",
        ];
        let kind: String = next(&mut seq, 0)?;
        Ok(match kind.as_str() {
            "exited" => TaskExit::Exited { code: next(&mut seq, 1)? },
            "signaled" => TaskExit::Signaled { signal: next(&mut seq, 1)? },
            "out_of_memory" => TaskExit::OutOfMemory { limit_bytes: next(&mut seq, 1)? },
            "over_disk" => TaskExit::OverDisk { limit_bytes: next(&mut seq, 1)?, used_bytes: next(&mut seq, 2)? },
            "killed" => TaskExit::Killed { by: next(&mut seq, 1)? },
            "health_check_failed" => TaskExit::HealthCheckFailed { reason: next(&mut seq, 1)? },
            "launch_failed" => TaskExit::LaunchFailed { message: next(&mut seq, 1)? },
            "supervisor_lost" => TaskExit::SupervisorLost { message: next(&mut seq, 1)? },
            other => return Err(de::Error::unknown_variant(other, KINDS)),
        })
    }
}

fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_like_sentences() {
        let cases = [
            (TaskExit::Exited { code: 3 }, "exited with code 3"),
            (TaskExit::Signaled { signal: 9 }, "killed by signal 9 (SIGKILL)"),
            (TaskExit::Signaled { signal: 64 }, "killed by signal 64"),
            (
                TaskExit::OutOfMemory { limit_bytes: 64 << 20 },
                "out of memory: killed by the kernel at its memory limit of 64MiB",
            ),
            (TaskExit::Killed { by: "user request".into() }, "killed: user request"),
        ];
        for (exit, want) in cases {
            assert_eq!(exit.to_string(), want);
        }
    }
}
