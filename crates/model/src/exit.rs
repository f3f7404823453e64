//! How a task's process ended, as observed on its agent, and the words a person reads about it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The end of one task process, as the agent's supervisor observed it.
///
/// Every variant renders to a reason a person understands (`Display`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
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
            TaskExit::LaunchFailed { message } => write!(f, "failed to launch: {message}"),
            TaskExit::SupervisorLost { message } => write!(f, "supervisor lost: {message}"),
        }
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
