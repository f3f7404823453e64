//! A real master (in this process, on a temporary embedded store) and 20 simulated agents over
//! HTTP: a 100-task service gets RUNNING everywhere, then killing the job ends every task KILLED.

use capstan_api::Client;
use capstan_sim::prom::Scrape;
use capstan_sim::{Fleet, FleetConfig};
use std::time::{Duration, Instant};

async fn wait_for(what: &str, deadline: Instant, mut done: impl AsyncFnMut() -> bool) {
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_tasks_run_then_die_on_twenty_sim_agents() {
    let deadline = Instant::now() + Duration::from_secs(20);
    let dir = tempfile::tempdir().unwrap();
    let master = capstan_master::start(capstan_master::MasterConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("master"),
        store_url: None,
        allow_root_tasks: false,
        liveness: Default::default(),
        ha: Default::default(),
        backup: Default::default(),
        jobs: Default::default(),
        net: Default::default(),
    })
    .await
    .unwrap();
    let client = Client::new(&master.url());
    let fleet = Fleet::start(FleetConfig {
        master: master.url(),
        count: 20,
        capacity: FleetConfig::capacity_from(Some("cpus=8,mem=32GiB")).unwrap(),
        racks: 5,
        pods: 2,
    });
    wait_for("20 agents", deadline, async || client.agents().await.unwrap().len() == 20).await;
    let agents = client.agents().await.unwrap();
    let mut racks: Vec<&str> = agents.iter().map(|a| a.attributes["rack"].as_str()).collect();
    racks.sort();
    racks.dedup();
    assert_eq!(racks, ["r0", "r1", "r2", "r3", "r4"]);
    assert!(agents.iter().all(|a| a.hostname.starts_with("sim-") && a.attributes["dc"] == "dc1"));

    let spec = serde_json::json!({
        "job": "sim/test/hundred", "type": "service", "instances": 100,
        "task": {"command": "sim:run", "user": "nobody", "cpus": 1.0, "mem": "64MiB", "disk": "1MiB"}
    });
    let created = client.create_job(&spec).await.unwrap();
    assert_eq!(created.tasks.len(), 100);
    wait_for("100 RUNNING", deadline, async || {
        Scrape::parse(&client.metrics().await.unwrap()).tasks_in("RUNNING") == 100
    })
    .await;
    let tasks = client.tasks(Some("sim/test/hundred"), None).await.unwrap();
    assert_eq!(tasks.len(), 100);
    assert!(tasks.iter().all(|t| t.state == capstan_model::TaskState::Running && t.pid.is_some()));
    // 100 tasks of 1 cpu on 8-cpu agents: bin-packed onto 13 agents, none over-committed.
    let mut per_host = std::collections::BTreeMap::<String, u32>::new();
    for t in &tasks {
        *per_host.entry(t.host.clone().unwrap()).or_default() += 1;
    }
    assert!(per_host.values().all(|n| *n <= 8), "{per_host:?}");

    client.kill_job("sim/test/hundred").await.unwrap();
    // The master forgets a killed job once every task ended; each end the agents reported is an
    // `Exited(Killed)` on a KILLING task, which the lifecycle turns into KILLED.
    wait_for("every task KILLED and the job gone", deadline, async || {
        fleet.stats().killed_acked == 100 && client.job("sim/test/hundred").await.is_err()
    })
    .await;
    let m = Scrape::parse(&client.metrics().await.unwrap());
    assert_eq!(m.get("capstan_illegal_transitions"), Some(0.0));
    assert_eq!(m.get("capstan_status_updates_unknown_task"), Some(0.0));
    assert_eq!(m.tasks_in("RUNNING") + m.tasks_in("KILLING"), 0);
    let s = fleet.stats();
    assert_eq!((s.launched, s.killed, s.running), (100, 100, 0));
    // Running reports plus kill reports, nothing else (no STARTING).
    assert_eq!(s.updates_acked, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_go_out_at_the_masters_pace_and_never_cause_a_registration_storm() {
    // Whether or not this master serves the heartbeat route (a master without it answers 404
    // `not_found`, which is not "unknown agent"), every agent beats within its first interval
    // and registers exactly once; failed heartbeats back off (at least 1 s).
    let dir = tempfile::tempdir().unwrap();
    let master = capstan_master::start(capstan_master::MasterConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("master"),
        store_url: None,
        allow_root_tasks: false,
        liveness: Default::default(),
        ha: Default::default(),
        backup: Default::default(),
        jobs: Default::default(),
        net: Default::default(),
    })
    .await
    .unwrap();
    let client = Client::new(&master.url());
    let count = 20;
    let fleet = Fleet::start(FleetConfig {
        master: master.url(),
        count,
        capacity: FleetConfig::capacity_from(None).unwrap(),
        racks: 5,
        pods: 2,
    });
    let started = Instant::now();
    wait_for("20 agents", started + Duration::from_secs(20), async || client.agents().await.unwrap().len() == count)
        .await;
    // The master says 5 s (the default); the first heartbeat of each agent falls in it.
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    let elapsed_s = started.elapsed().as_secs_f64();
    let s = fleet.stats();
    assert_eq!((s.registered, s.registrations), (count as u64, count as u64), "{s:?}");
    assert!(s.heartbeats_sent >= count as u64, "every agent beats in its first interval: {s:?}");
    // Answered: one per 4–5 s; failed: 1 s, 2 s, 4 s… So at most one a second, plus the first.
    assert!(s.heartbeats_sent as f64 <= count as f64 * (elapsed_s + 1.0), "{s:?} in {elapsed_s:.1} s");
    assert_eq!(s.shed, 0);
}
