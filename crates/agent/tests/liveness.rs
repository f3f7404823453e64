//! The agent in the master's liveness protocol, against a real master: heartbeats keep an idle
//! agent active, a master that does not know a running task orders it stopped and the agent
//! stops it, and a frozen cluster keeps an unhealthy task running until it is unfrozen.
//!
//! These need the master's side of heartbeats, stop orders and freeze (`docs` of issue 5): the
//! expectations are the master's documented behaviour.

mod common;

use capstan_api::{FreezeRequest, OperatorRequest};
use capstan_containerizer::records::EXIT_FILE;
use capstan_containerizer::ExitRecord;
use capstan_master::liveness::LivenessConfig;
use capstan_model::TaskExit;
use common::*;
use std::time::Duration;

/// Short liveness settings: heartbeats every 200 ms, unreachable after 1 s of silence.
fn quick_liveness() -> LivenessConfig {
    LivenessConfig {
        heartbeat_interval: Duration::from_millis(200),
        agent_timeout: Duration::from_secs(1),
        reregistration_period: Duration::from_millis(500),
        stray_grace: Duration::from_secs(1),
        ..LivenessConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_an_idle_agent_active_past_the_agent_timeout() {
    if !privileged("heartbeats_keep_an_idle_agent_active_past_the_agent_timeout") {
        return;
    }
    let c = Cluster::start_with(quick_liveness(), |_| {}).await;
    let agent = c.agent.as_ref().unwrap().agent.clone();
    wait_until(SOON, "the agent took the master's heartbeat interval", || async {
        match agent.heartbeat_interval() {
            d if d == Duration::from_millis(200) => Ok(()),
            d => Err(format!("{d:?}")),
        }
    })
    .await;
    // No task runs, so nothing but heartbeats (and the orders long poll) reaches the master: three
    // agent timeouts of them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let agents = c.client.agents().await.unwrap();
    let view = agents.iter().find(|a| a.id == agent.id).expect("the agent is listed");
    assert_eq!(view.liveness, "active", "{view:?}");
    assert!(view.last_seen.is_some(), "{view:?}");
    assert!(view.unreachable_since.is_none(), "{view:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_unknown_to_the_master_is_stopped_by_its_stop_order() {
    if !privileged("a_task_unknown_to_the_master_is_stopped_by_its_stop_order") {
        return;
    }
    let mut c = Cluster::start(|_| {}).await;
    let task = c.create_job(job_spec("test/prod/stray", "service", "exec sleep 600")).await[0];
    let pid = c.wait_state(task, "RUNNING", SOON).await.pid.expect("a pid");

    // The agent comes back to a second master with an empty state: to it the task is a stray,
    // stopped once the re-registration period and the stray grace are over.
    c.stop_agent();
    let other = start_master(c.dir().join("other-master"), quick_liveness()).await;
    c.start_agent(|a| a.masters = other.url()).await.expect("agent starts");
    let agent = c.agent.as_ref().unwrap().agent.clone();
    assert!(agent.is_running(task), "the agent re-attached to the task");

    wait_until(SOON, "the stray task's process is gone", || async {
        if pid_alive(pid) {
            Err(format!("pid {pid} alive"))
        } else {
            Ok(())
        }
    })
    .await;
    let exit = c.sandbox(task).join(EXIT_FILE);
    let record: ExitRecord = wait_until(SOON, "the supervisor recorded the end", || async {
        let bytes = std::fs::read(&exit).map_err(|e| format!("{}: {e}", exit.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    })
    .await;
    assert!(matches!(record.exit, TaskExit::Killed { .. }), "stopped by the order, not failed: {:?}", record.exit);
    // The agent's watcher learns of the end on its own time: wait for it, do not race it.
    wait_until(SOON, "the agent saw the task end", || async {
        if agent.is_running(task) {
            Err("still running to the agent".to_string())
        } else {
            Ok(())
        }
    })
    .await;
    other.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_frozen_a_failed_health_check_keeps_its_task_until_unfrozen() {
    if !privileged("while_frozen_a_failed_health_check_keeps_its_task_until_unfrozen") {
        return;
    }
    let c = Cluster::start(|_| {}).await;
    let agent = c.agent.as_ref().unwrap().agent.clone();
    c.client
        .freeze(&FreezeRequest { reason: "incident 42".into(), by: "test".into() })
        .await
        .expect("the master freezes");
    // Placed after the freeze: the orders that bring the task say the cluster is frozen.
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
    let running = c.wait_task(task, "is healthy", SOON, |t| t.health.as_deref() == Some("healthy")).await;
    let pid = running.pid.expect("a pid");
    assert!(agent.is_frozen(), "the orders said frozen");

    std::fs::remove_file(capstan_containerizer::work_dir(&c.sandbox(task)).join("ready")).unwrap();
    c.wait_task(task, "is unhealthy", SOON, |t| t.health.as_deref() == Some("unhealthy")).await;
    // Several runs of two failed checks long: still running.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spared = c.client.task(task).await.unwrap();
    assert_eq!(serde_json::to_value(spared.state).unwrap(), "RUNNING", "{spared:?}");
    assert!(pid_alive(pid), "the task process runs on");

    c.client.unfreeze(&OperatorRequest { by: "test".into() }).await.expect("the master unfreezes");
    // The agent hears of it with its next orders; a new placement on it makes them come now.
    c.create_job(job_spec("test/prod/nudge", "service", "exec sleep 600")).await;
    let failed = c.wait_state(task, "FAILED", SOON).await;
    assert!(!agent.is_frozen());
    assert!(matches!(failed.exit, Some(TaskExit::HealthCheckFailed { .. })), "{:?}", failed.exit);
}
