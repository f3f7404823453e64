//! Sandbox garbage collection: every `gc_interval`, the sandboxes of tasks that ended *and*
//! whose end the master acknowledged are removed when older than `sandbox_max_age`, or, oldest
//! first, while the data directory's file system has less free space than
//! `sandbox_min_free_percent`. A sandbox's disk volume (`loop-volume`) is unmounted and its image
//! deleted before the sandbox goes. A running task's sandbox is never removed. Old
//! `sandboxes.cleanup-*` directories (left by `--recover=cleanup`) go after `sandbox_max_age`.

use crate::Agent;
use capstan_model::TaskId;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Free space of the file system holding `path`, in percent of its size.
pub fn free_percent(path: &Path) -> Option<f64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    let total = s.blocks() as f64;
    (total > 0.0).then(|| s.blocks_available() as f64 * 100.0 / total)
}

/// Which of `candidates` (task, ended at in ms since the epoch) to remove: every one older than
/// `max_age`, then, oldest first, as many as `still_short` asks for (it is called after each
/// pick with the picks so far). Pure, for tests.
pub fn choose(
    mut candidates: Vec<(TaskId, u64)>,
    now_ms: u64,
    max_age: Duration,
    mut still_short: impl FnMut(&[TaskId]) -> bool,
) -> Vec<TaskId> {
    candidates.sort_by_key(|(id, at)| (*at, *id));
    let max_age_ms = max_age.as_millis() as u64;
    let mut chosen = vec![];
    let mut rest = vec![];
    for (id, at) in candidates {
        if now_ms.saturating_sub(at) > max_age_ms {
            chosen.push(id);
        } else {
            rest.push(id);
        }
    }
    for id in rest {
        if !still_short(&chosen) {
            break;
        }
        chosen.push(id);
    }
    chosen
}

pub(crate) async fn gc_loop(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(agent.config.gc_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let a = agent.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || collect(&a)).await {
            tracing::error!("sandbox garbage collection failed: {e}");
        }
    }
}

/// One pass (blocking: it removes directories).
pub(crate) fn collect(agent: &Agent) {
    let now_ms = crate::updates::now().0;
    let candidates = agent.collectable_tasks();
    let data_dir = agent.config.data_dir.clone();
    let min_free = agent.config.sandbox_min_free_percent;
    let chosen = choose(candidates, now_ms, agent.config.sandbox_max_age, |chosen| {
        // Remove what is chosen so far before measuring again.
        for id in chosen {
            remove(agent, *id);
        }
        free_percent(&data_dir).is_some_and(|free| free < min_free)
    });
    for id in &chosen {
        remove(agent, *id);
    }
    if !chosen.is_empty() {
        tracing::info!(
            "sandbox garbage collection removed {} sandbox(es): {}",
            chosen.len(),
            chosen.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    remove_old_cleanups(&data_dir, agent.config.sandbox_max_age);
}

/// Forgets one ended, reported task and removes its sandbox (idempotent).
fn remove(agent: &Agent, task: TaskId) {
    if !agent.forget_ended(task) {
        return;
    }
    agent.remove_volume(task);
    let dir = agent.sandbox(task);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => tracing::info!(%task, "removed sandbox {}", dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(%task, "cannot remove sandbox {}: {e}", dir.display()),
    }
}

fn remove_old_cleanups(data_dir: &Path, max_age: Duration) {
    let Ok(entries) = std::fs::read_dir(data_dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_str().is_some_and(|n| n.starts_with("sandboxes.cleanup-")) {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > max_age);
        if old {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => tracing::info!("removed {}", e.path().display()),
                Err(err) => tracing::warn!("cannot remove {}: {err}", e.path().display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_ones_go_then_oldest_first_while_space_is_short() {
        let day = 24 * 3600 * 1000;
        let now = 100 * day;
        let c = vec![(TaskId(1), now - 10 * day), (TaskId(2), now - day), (TaskId(3), now - 2 * day)];
        let week = Duration::from_secs(7 * 24 * 3600);
        assert_eq!(choose(c.clone(), now, week, |_| false), [TaskId(1)]);
        assert_eq!(choose(c.clone(), now, week, |chosen| chosen.len() < 2), [TaskId(1), TaskId(3)]);
        assert_eq!(choose(c, now, week, |_| true), [TaskId(1), TaskId(3), TaskId(2)]);
    }
}
