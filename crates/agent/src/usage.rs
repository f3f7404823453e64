//! Resource usage of running tasks: measured every `usage_interval` from their cgroups and
//! sandboxes and sent to the master (newest wins, nothing durable); and the disk limit's
//! check-and-kill fallback (`disk_loop`): every `disk_check_interval`, a task whose sandbox grew
//! past its `disk` is stopped as `TaskExit::OverDisk` ("over disk quota: sandbox used X of its Y
//! limit"). Tasks whose sandbox a project quota holds are left to the kernel (see
//! `capstan_containerizer::ProjectQuotas`). The fallback acts after the fact: a task can write
//! about (its write rate × the interval) past its limit before it is stopped.

use crate::{Agent, Stop};
use capstan_api::{TaskUsage, UsageReport};
use capstan_model::{TaskExit, TaskId, Timestamp};
use std::sync::Arc;

fn measure(agent: &Agent, task: TaskId, at: Timestamp) -> TaskUsage {
    let u = agent.containerizer.read_usage(task);
    TaskUsage {
        task,
        cpu_seconds: u.cpu_usage_ns as f64 / 1e9,
        throttled_seconds: u.throttled_ns as f64 / 1e9,
        nr_throttled: u.nr_throttled,
        mem_bytes: u.mem_bytes,
        mem_peak_bytes: u.mem_peak_bytes,
        disk_bytes: sandbox_disk_bytes(&agent.sandbox(task)),
        at: capstan_api::rfc3339(at),
    }
}

/// Bytes a task's sandbox holds on disk, its work directory's volume included when it has one
/// (`loop-volume`; the walk stays on one file system).
fn sandbox_disk_bytes(sandbox: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let work = capstan_containerizer::sandbox::work_dir(sandbox);
    let own = capstan_containerizer::disk_usage_bytes(sandbox);
    match (std::fs::symlink_metadata(sandbox), std::fs::symlink_metadata(&work)) {
        (Ok(s), Ok(w)) if w.is_dir() && s.dev() != w.dev() => own + capstan_containerizer::disk_usage_bytes(&work),
        _ => own,
    }
}

/// Every `usage_interval`: measure every running task and send the measurements to the master.
pub(crate) async fn usage_loop(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(agent.config.usage_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let running = agent.running_tasks();
        if running.is_empty() {
            continue;
        }
        let a = agent.clone();
        let measured = match tokio::task::spawn_blocking(move || {
            let at = crate::updates::now();
            running.into_iter().map(|(task, _)| measure(&a, task, at)).collect::<Vec<_>>()
        })
        .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::error!("measuring task usage failed: {e}");
                continue;
            }
        };
        let report = UsageReport { agent: agent.id, tasks: measured };
        match agent.client.send_usage(&report).await {
            Ok(_) => {
                if failing {
                    tracing::info!("usage reports reach the master again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("cannot send usage to the master: {e} (will keep trying every interval)");
                }
                failing = true;
            }
        }
    }
}

/// Every `disk_check_interval`: measure the sandbox of every running task that no project quota
/// holds, and stop those over their disk limit.
pub(crate) async fn disk_loop(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(agent.config.disk_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let checked = agent.disk_checked_tasks();
        if checked.is_empty() {
            continue;
        }
        let a = agent.clone();
        let over = match tokio::task::spawn_blocking(move || {
            checked
                .into_iter()
                .filter_map(|(task, limit)| {
                    let used = sandbox_disk_bytes(&a.sandbox(task));
                    (used > limit).then_some((task, limit, used))
                })
                .collect::<Vec<_>>()
        })
        .await
        {
            Ok(over) => over,
            Err(e) => {
                tracing::error!("measuring sandboxes for their disk limits failed: {e}");
                continue;
            }
        };
        for (task, limit_bytes, used_bytes) in over {
            tracing::warn!(%task, "sandbox uses {used_bytes} bytes, over its disk limit of {limit_bytes}; stopping it");
            agent.stop_task(task, Stop::Because(TaskExit::OverDisk { limit_bytes, used_bytes }));
        }
    }
}
