//! The fake executor: what a simulated task does, decided from its command alone (pure).
//!
//! - `sim:finish:<ms>` runs, then exits with code 0 after `ms` milliseconds;
//! - `sim:fail:<ms>:<code>` runs, then exits with `code` after `ms` milliseconds;
//! - `sim:run` and anything else runs until it is stopped.
//!
//! A task never reports `Starting`: the lifecycle accepts `Assigned → Running`, and skipping it
//! halves the status-update traffic of a placement benchmark.

/// What a simulated task does once launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// Runs until the master orders it stopped.
    Run,
    /// Runs, then exits by itself with `code` after `after_ms`.
    Exit { after_ms: u64, code: i32 },
}

/// Reads a task's command. Malformed `sim:` commands (`sim:finish:soon`) run forever, like
/// anything else that is not a `sim:` command: a benchmark must not fail on a typo in a job.
pub fn behavior(command: &str) -> Behavior {
    let mut parts = command.trim().split(':');
    if parts.next() != Some("sim") {
        return Behavior::Run;
    }
    let kind = parts.next();
    let after_ms = parts.next().and_then(|s| s.parse::<u64>().ok());
    let code = parts.next().and_then(|s| s.parse::<i32>().ok());
    match (kind, after_ms, code, parts.next()) {
        (Some("finish"), Some(after_ms), None, None) => Behavior::Exit { after_ms, code: 0 },
        (Some("fail"), Some(after_ms), Some(code), None) => Behavior::Exit { after_ms, code },
        _ => Behavior::Run,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let cases = [
            ("sim:run", Behavior::Run),
            ("exec sleep 3600", Behavior::Run),
            ("", Behavior::Run),
            ("sim:finish:250", Behavior::Exit { after_ms: 250, code: 0 }),
            ("sim:fail:10:3", Behavior::Exit { after_ms: 10, code: 3 }),
            ("sim:fail:0:-9", Behavior::Exit { after_ms: 0, code: -9 }),
            ("sim:finish:soon", Behavior::Run),
            ("sim:fail:10", Behavior::Run),
            ("sim:finish:1:2", Behavior::Run),
            ("sim:fail:1:2:3", Behavior::Run),
        ];
        for (command, expected) in cases {
            assert_eq!(behavior(command), expected, "{command:?}");
        }
    }
}
