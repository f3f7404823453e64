//! System jobs end to end, on real agents (one master, several `capstan agent` processes): one
//! instance on every matching agent, one more when a matching agent joins, none on an agent whose
//! attributes do not match, and killing the job stops them all.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// agent address → agent id, as the master lists them.
fn agent_ids(c: &Cluster) -> BTreeMap<String, String> {
    let agents = c.get("/v1/agents");
    agents
        .as_array()
        .expect("a list of agents")
        .iter()
        .map(|a| (a["address"].as_str().unwrap_or("").to_string(), a["id"].to_string()))
        .collect()
}

/// The agent ids that RUNNING tasks of `job` are on, sorted; repeated if an agent has two.
fn running_on(tasks: &[Value]) -> Vec<String> {
    let mut on: Vec<String> = tasks.iter().map(|t| t["agent_id"].to_string()).collect();
    on.sort();
    on
}

#[test]
fn a_system_job_runs_once_on_every_matching_agent_and_on_each_that_joins() {
    if !privileged("a_system_job_runs_once_on_every_matching_agent_and_on_each_that_joins") {
        return;
    }
    let mut c = Cluster::start_split_with(&["--attributes", "role=worker"]);
    let worker2 = c.start_extra_agent("worker2", &["--attributes", "role=worker"]);
    let worker3 = c.start_extra_agent("worker3", &["--attributes", "role=worker"]);
    let db = c.start_extra_agent("db", &["--attributes", "role=db"]);
    let ids = agent_ids(&c);
    let workers: Vec<String> = ids.iter().filter(|(a, _)| *a != &db).map(|(_, id)| id.clone()).collect();
    assert_eq!(workers.len(), 3, "{ids:?}");
    assert!(ids.contains_key(&worker2) && ids.contains_key(&worker3));

    let job = "infra/prod/node-agent";
    let mut spec = job_spec(job, "system", 0, "exec sleep 100000");
    spec.as_object_mut().unwrap().remove("instances");
    spec["constraint"] = json!([{"attribute": "role", "value": "worker"}]);
    assert_eq!(c.create_job(&spec).len(), 3);
    let mut expected = workers.clone();
    expected.sort();
    let tasks = c.wait_running(job, 3, SOON);
    assert_eq!(running_on(&tasks), expected, "one on each worker, none on the db agent");
    let status = c.capstan_ok(&["job", "status", job]);
    assert!(status.contains("type      system") && status.contains("instances 3"), "{status}");

    // A fourth worker joins: it gets an instance; the other three keep theirs.
    let worker4 = c.start_extra_agent("worker4", &["--attributes", "role=worker"]);
    let tasks = c.wait_running(job, 4, SOON);
    let w4 = agent_ids(&c)[&worker4].clone();
    expected.push(w4);
    expected.sort();
    assert_eq!(running_on(&tasks), expected);
    assert_eq!(c.job(job).unwrap().unwrap()["instances"], 4);
    let pids: Vec<u32> = tasks.iter().map(task_pid).collect();

    // Killing the job stops every instance.
    c.capstan_ok(&["job", "kill", job]);
    wait_until(SOON, "the job is gone and its processes ended", || {
        let gone = c.job(job)?.is_none();
        let alive: Vec<&u32> = pids.iter().filter(|p| pid_alive(**p)).collect();
        ensure(gone && alive.is_empty(), alive)
    });
}
