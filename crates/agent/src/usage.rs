//! Resource usage of running tasks: measured every `usage_interval` from their cgroups and
//! sandboxes, sent to the master (newest wins, nothing durable), and the disk quota: a task whose
//! sandbox grew past its `disk` is stopped as `TaskExit::OverDisk`.

use crate::{Agent, Stop};
use capstan_api::{TaskUsage, UsageReport};
use capstan_model::{TaskExit, TaskId, Timestamp};
use std::sync::Arc;

/// What one measurement found.
struct Measured {
    usage: TaskUsage,
    disk_limit_bytes: u64,
}

fn measure(agent: &Agent, task: TaskId, disk_limit_bytes: u64, at: Timestamp) -> Measured {
    let u = agent.containerizer.read_usage(task);
    let usage = TaskUsage {
        task,
        cpu_seconds: u.cpu_usage_ns as f64 / 1e9,
        throttled_seconds: u.throttled_ns as f64 / 1e9,
        nr_throttled: u.nr_throttled,
        mem_bytes: u.mem_bytes,
        mem_peak_bytes: u.mem_peak_bytes,
        disk_bytes: capstan_containerizer::disk_usage_bytes(&agent.sandbox(task)),
        at: capstan_api::rfc3339(at),
    };
    Measured { usage, disk_limit_bytes }
}

/// Every `usage_interval`: measure every running task, stop those over their disk quota, and
/// send the measurements to the master.
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
            running.into_iter().map(|(task, limit)| measure(&a, task, limit, at)).collect::<Vec<_>>()
        })
        .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::error!("measuring task usage failed: {e}");
                continue;
            }
        };
        for m in &measured {
            let used = m.usage.disk_bytes;
            if m.disk_limit_bytes > 0 && used > m.disk_limit_bytes {
                let task = m.usage.task;
                tracing::warn!(%task, "sandbox uses {used} bytes, over its disk limit of {}; stopping it", m.disk_limit_bytes);
                agent.stop_task(
                    task,
                    Stop::Because(TaskExit::OverDisk { limit_bytes: m.disk_limit_bytes, used_bytes: used }),
                );
            }
        }
        let report = UsageReport { agent: agent.id, tasks: measured.into_iter().map(|m| m.usage).collect() };
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
