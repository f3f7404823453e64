//! Task state: what Capstan wants of a task (desired) apart from what its agent saw (observed).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Milliseconds since the Unix epoch. The core never reads a clock: the shell stamps every command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn plus_ms(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }
    pub fn since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// The observed state of one task (one run of one instance).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    /// Waiting for a place (or for its restart backoff to pass).
    Pending,
    /// Placed on an agent; the launch order is on its way.
    Assigned,
    /// The agent is launching it.
    Starting,
    /// Its process runs.
    Running,
    /// Capstan asked its agent to stop it.
    Killing,
    /// Ended by itself with status 0.
    Finished,
    /// Ended by itself otherwise (exit code, signal, out of memory, launch failure).
    Failed,
    /// Stopped because Capstan asked.
    Killed,
    /// Its agent was lost with it.
    Lost,
    /// Its agent stopped answering; the task probably still runs there. It keeps its place until
    /// it is replaced (per its job's `replace_after`) or its agent answers again.
    Unreachable,
}

impl TaskState {
    pub const ALL: [TaskState; 10] = [
        TaskState::Pending,
        TaskState::Assigned,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Killing,
        TaskState::Finished,
        TaskState::Failed,
        TaskState::Killed,
        TaskState::Lost,
        TaskState::Unreachable,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Finished | TaskState::Failed | TaskState::Killed | TaskState::Lost)
    }

    /// True while the task holds resources on an agent.
    pub fn holds_resources(self) -> bool {
        matches!(
            self,
            TaskState::Assigned
                | TaskState::Starting
                | TaskState::Running
                | TaskState::Killing
                | TaskState::Unreachable
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Assigned => "ASSIGNED",
            TaskState::Starting => "STARTING",
            TaskState::Running => "RUNNING",
            TaskState::Killing => "KILLING",
            TaskState::Finished => "FINISHED",
            TaskState::Failed => "FAILED",
            TaskState::Killed => "KILLED",
            TaskState::Lost => "LOST",
            TaskState::Unreachable => "UNREACHABLE",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TaskState::ALL.iter().copied().find(|t| t.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| {
            let all: Vec<&str> = TaskState::ALL.iter().map(|t| t.as_str()).collect();
            format!("`{s}` is not a task state (one of {})", all.join(", "))
        })
    }
}

/// What the master wants of a task. Written only by the master; the agent obeys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Desired {
    Run,
    Stop,
}
