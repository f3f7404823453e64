//! The agent never loses a task: a damaged checkpoint stops the start (naming the file) until the
//! operator asks for `--recover=cleanup`; disk quotas stop tasks; usage reaches the master;
//! ended sandboxes are collected.

mod common;

use capstan_agent::RecoverMode;
use capstan_model::{TaskExit, TaskId};
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_agent_json_refuses_to_start_until_cleanup() {
    if !privileged("damaged_agent_json_refuses_to_start_until_cleanup") {
        return;
    }
    let mut c = Cluster::start(|_| {}).await;
    let id = c.agent.as_ref().unwrap().agent.id;
    c.stop_agent();
    let path = c.agent_dir.join("agent.json");
    std::fs::write(&path, b"{\"format_version\": 1, \"id\": \"00").unwrap();
    let err = c.start_agent(|_| {}).await.expect_err("a damaged agent.json stops the start");
    let message = format!("{err:#}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("--recover=cleanup"), "{message}");
    let checkpoint = err.downcast_ref::<capstan_agent::CheckpointError>().expect("a CheckpointError");
    assert_eq!(checkpoint.file, path);

    // A newer format is refused too.
    std::fs::write(&path, format!("{{\"format_version\": 99, \"id\": \"{id}\"}}")).unwrap();
    let message = format!("{:#}", c.start_agent(|_| {}).await.expect_err("newer format"));
    assert!(message.contains("newer"), "{message}");

    std::fs::write(&path, b"garbage").unwrap();
    c.start_agent(|a| a.recover = RecoverMode::Cleanup).await.expect("cleanup starts");
    let new_id = c.agent.as_ref().unwrap().agent.id;
    assert_ne!(new_id, id, "agent.json was unreadable: a new identity");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["id"], new_id.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_sandbox_refuses_and_cleanup_kills_its_task() {
    if !privileged("damaged_sandbox_refuses_and_cleanup_kills_its_task") {
        return;
    }
    let mut c = Cluster::start(|_| {}).await;
    let id = c.agent.as_ref().unwrap().agent.id;
    let task = c.create_job(job_spec("test/prod/sleeper", "service", "exec sleep 600")).await[0];
    let running = c.wait_state(task, "RUNNING", SOON).await;
    let pid = running.pid.expect("a pid");
    c.stop_agent();
    let launch = c.sandbox(task).join("launch.json");
    std::fs::write(&launch, b"{\"task_id\": ").unwrap();

    let err = c.start_agent(|_| {}).await.expect_err("a damaged launch.json stops the start");
    let message = format!("{err:#}");
    assert!(message.contains(&launch.display().to_string()), "{message}");
    assert!(message.contains("--recover=cleanup"), "{message}");
    assert!(pid_alive(pid), "a refused start touches nothing");

    c.start_agent(|a| a.recover = RecoverMode::Cleanup).await.expect("cleanup starts");
    assert_eq!(c.agent.as_ref().unwrap().agent.id, id, "agent.json was fine: same identity");
    wait_until(SOON, "the task process is gone", || async {
        if pid_alive(pid) {
            Err(format!("pid {pid} alive"))
        } else {
            Ok(())
        }
    })
    .await;
    assert!(!c.sandbox(task).exists(), "the sandbox was moved aside");
    let aside: Vec<_> = std::fs::read_dir(&c.agent_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("sandboxes.cleanup-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert!(aside[0].path().join("sandboxes").join(task.to_string()).join("launch.json").exists());
    let cgroups: Vec<_> = ["memory", "pids", "cpu"]
        .iter()
        .map(|c2| std::path::Path::new("/sys/fs/cgroup").join(c2).join(&c.cgroup_root).join(task.to_string()))
        .filter(|d| d.exists())
        .collect();
    assert!(cgroups.is_empty(), "the task's cgroups are gone: {cgroups:?}");
    // Nothing was reported for it: the master learns from the re-registration that the agent no
    // longer has it.
    c.wait_state(task, "LOST", SOON).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_over_its_disk_quota_fails() {
    if !privileged("a_task_over_its_disk_quota_fails") {
        return;
    }
    let c = Cluster::start(|_| {}).await;
    let mut spec = job_spec("test/prod/filler", "batch", "dd if=/dev/zero of=big bs=1M count=50 && exec sleep 600");
    spec["task"]["disk"] = "10MiB".into();
    spec["max_failures"] = 0.into();
    let task = c.create_job(spec).await[0];
    let failed = c.wait_state(task, "FAILED", SOON).await;
    assert!(failed.reason.contains("over disk quota"), "{}", failed.reason);
    match failed.exit {
        Some(TaskExit::OverDisk { limit_bytes, used_bytes }) => {
            assert_eq!(limit_bytes, 10 << 20);
            assert!(used_bytes > limit_bytes, "{used_bytes}");
        }
        other => panic!("expected OverDisk, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_a_running_task_reaches_the_master() {
    if !privileged("usage_of_a_running_task_reaches_the_master") {
        return;
    }
    let c = Cluster::start(|a| a.task_pids_max = 64).await;
    let task = c.create_job(job_spec("test/prod/busy", "service", "while :; do :; done")).await[0];
    c.wait_state(task, "RUNNING", SOON).await;
    let t = c
        .wait_task(task, "has cpu and memory usage", Duration::from_secs(10), |t| {
            t.usage.as_ref().is_some_and(|u| u.cpu_seconds > 0.0 && u.mem_bytes > 0)
        })
        .await;
    let usage = t.usage.unwrap();
    assert_eq!(usage.task, task);
    assert!(humantime::parse_rfc3339(&usage.at).is_ok(), "{}", usage.at);
    // Every task gets the agent's pids limit.
    let launch: serde_json::Value =
        serde_json::from_slice(&std::fs::read(c.sandbox(task).join("launch.json")).unwrap()).unwrap();
    assert_eq!(launch["pids_max"], 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_of_reported_tasks_are_collected() {
    if !privileged("sandboxes_of_reported_tasks_are_collected") {
        return;
    }
    let c = Cluster::start(|a| {
        a.gc_interval = Duration::from_millis(200);
        a.sandbox_max_age = Duration::from_millis(500);
    })
    .await;
    let done = c.create_job(job_spec("test/prod/quick", "batch", "echo done")).await[0];
    let running = c.create_job(job_spec("test/prod/slow", "service", "exec sleep 600")).await[0];
    c.wait_state(done, "FINISHED", SOON).await;
    c.wait_state(running, "RUNNING", SOON).await;
    let sandbox = c.sandbox(done);
    wait_until(SOON, "the ended task's sandbox is collected", || async {
        if sandbox.exists() {
            Err(format!("{} still there", sandbox.display()))
        } else {
            Ok(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(c.sandbox(running).exists(), "a running task's sandbox stays");
    assert!(!c.agent.as_ref().unwrap().agent.is_running(done));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_queued_while_the_agent_was_down_arrive_after_a_restart() {
    if !privileged("updates_queued_while_the_agent_was_down_arrive_after_a_restart") {
        return;
    }
    let mut c = Cluster::start(|_| {}).await;
    let task: TaskId = c.create_job(job_spec("test/prod/ends", "batch", "sleep 1; exit 3")).await[0];
    let pid = c.wait_state(task, "RUNNING", SOON).await.pid.unwrap();
    let seq_before = c.agent.as_ref().unwrap().agent.updates.last_seq();
    c.stop_agent();
    wait_until(SOON, "the task ends while the agent is down", || async {
        if pid_alive(pid) {
            Err("alive".into())
        } else {
            Ok(())
        }
    })
    .await;
    c.start_agent(|_| {}).await.expect("restart");
    let t = c.wait_task(task, "failed with exit code 3", SOON, |t| t.exit == Some(TaskExit::Exited { code: 3 })).await;
    assert!(t.reason.contains('3'), "{}", t.reason);
    assert!(c.agent.as_ref().unwrap().agent.updates.last_seq() > seq_before, "numbering continued");
    wait_until(SOON, "the end is marked reported", || async {
        if c.sandbox(task).join("reported").exists() {
            Ok(())
        } else {
            Err("no marker".into())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_marks_the_task_healthy_then_fails_it() {
    if !privileged("a_health_check_marks_the_task_healthy_then_fails_it") {
        return;
    }
    let c = Cluster::start(|_| {}).await;
    // Healthy while the file `ready` exists; the test removes it.
    let mut spec = job_spec("test/prod/checked", "batch", "touch ready; exec sleep 600");
    spec["max_failures"] = 0.into();
    spec["health_check"] = serde_json::json!({
        "type": "command",
        "command": "test -f ready",
        "interval": "1s",
        "timeout": "500ms",
        "grace_period": "0s",
        "consecutive_failures": 2,
    });
    let task = c.create_job(spec).await[0];
    c.wait_task(task, "is healthy", SOON, |t| t.health.as_deref() == Some("healthy")).await;
    std::fs::remove_file(capstan_containerizer::work_dir(&c.sandbox(task)).join("ready")).unwrap();
    let failed = c.wait_state(task, "FAILED", SOON).await;
    assert!(failed.reason.contains("failed health check"), "{}", failed.reason);
    assert!(matches!(failed.exit, Some(TaskExit::HealthCheckFailed { .. })), "{:?}", failed.exit);
    assert!(failed.events.iter().any(|e| e.reason.contains("unhealthy")), "{:?}", failed.events);
}
