//! Drain and maintenance with real processes: a split cluster (master, agent `zone=a`) plus extra
//! agents. Jobs are pinned with a `limit = 2` per zone, so that 3 instances on two agents are
//! always laid out 2 + 1.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A service of 3 `sleep`s with `min_healthy = 0.66` (2 must stay healthy), at most 2 per zone.
fn sla_service(key: &str) -> Value {
    let mut spec = job_spec(key, "service", 3, "exec sleep 3600");
    spec["min_healthy"] = json!(0.66);
    spec["constraint"] = json!([{"attribute": "zone", "limit": 2}]);
    spec
}

/// A job whose tasks may only run in `zone`.
fn pinned(key: &str, job_type: &str, zone: &str) -> Value {
    let mut spec = job_spec(key, job_type, 1, "exec sleep 3600");
    spec["constraint"] = json!([{"attribute": "zone", "value": zone}]);
    spec
}

fn agents(c: &Cluster) -> Vec<Value> {
    c.get("/v1/agents").as_array().expect("a list").clone()
}

fn agent_in_zone(c: &Cluster, zone: &str) -> String {
    agents(c)
        .iter()
        .find(|a| a["attributes"]["zone"] == zone)
        .and_then(|a| a["id"].as_str())
        .unwrap_or_else(|| panic!("no agent in zone {zone}"))
        .to_string()
}

fn agent(c: &Cluster, id: &str) -> Value {
    agents(c).into_iter().find(|a| a["id"] == id).unwrap_or_else(|| panic!("no agent {id}"))
}

/// Live tasks of a job per agent id.
fn live_on(tasks: &[Value], agent: &str) -> usize {
    tasks.iter().filter(|t| !is_terminal(t) && t["agent_id"] == agent).count()
}

fn running(tasks: &[Value]) -> usize {
    tasks.iter().filter(|t| t["state"] == "RUNNING").count()
}

/// When the task first entered `state` (RFC 3339, comparable as text).
fn event_at(t: &Value, state: &str) -> Option<String> {
    t["events"].as_array()?.iter().find(|e| e["state"] == state).and_then(|e| e["at"].as_str()).map(str::to_string)
}

/// The case: the agent holding 2 of 3 instances of a `min_healthy = 0.66` job is drained;
/// they move one at a time (never fewer than 2 RUNNING, sampled all along), the agent ends
/// drained, and nothing new goes there until it is undrained.
#[test]
fn draining_an_agent_moves_its_instances_one_at_a_time_within_min_healthy() {
    if !privileged("draining_an_agent_moves_its_instances_one_at_a_time_within_min_healthy") {
        return;
    }
    let mut c = Cluster::start_split_opts(SplitOptions {
        agent_flags: vec!["--attributes".into(), "zone=a".into()],
        ..Default::default()
    });
    c.start_extra_agent("agent-b", &["--attributes", "zone=b"]);
    let job = "www/prod/api";
    c.create_job(&sla_service(job));
    let tasks = c.wait_running(job, 3, SOON);
    let (a, b) = (agent_in_zone(&c, "a"), agent_in_zone(&c, "b"));
    let full = if live_on(&tasks, &a) == 2 { a } else { b };
    assert_eq!(live_on(&tasks, &full), 2, "2 + 1 layout: {}", summary(&tasks));
    // Somewhere for the second instance to go: the other zone takes only one more.
    c.start_extra_agent("agent-c", &["--attributes", "zone=c"]);

    let out = c.capstan_ok(&["agent", "drain", &full, "--by", "ops@test"]);
    assert!(out.contains("draining"), "{out}");
    let started = Instant::now();
    let mut min_running = 3;
    let mut samples = 0;
    wait_until(Duration::from_secs(60), "the agent is drained", || {
        let tasks = c.tasks_of(job)?;
        let n = running(&tasks);
        samples += 1;
        min_running = min_running.min(n);
        assert!(n >= 2, "fewer than 2 instances RUNNING during the drain: {}", summary(&tasks));
        let drain = agent(&c, &full)["drain"].clone();
        ensure(drain["status"] == "drained" && n == 3, (drain, summary(&tasks)))
    });
    eprintln!("drained in {:?}; {samples} samples, at least {min_running} RUNNING", started.elapsed());
    assert_eq!(min_running, 2, "instances were moved (one down at a time)");
    let tasks = c.wait_running(job, 3, SOON);
    assert_eq!(live_on(&tasks, &full), 0, "nothing of the job is left on the drained agent");
    let moves = c.events_of("drain_move");
    assert_eq!(moves.len(), 2, "one move per instance: {moves:?}");
    // From the tasks' own timestamped events, independent of sampling: the second move began
    // only once the first moved instance's replacement was RUNNING.
    let all = c.tasks_of(job).unwrap();
    let mut moved: Vec<(String, u64)> = all
        .iter()
        .filter(|t| t["agent_id"] == full.as_str() && is_terminal(t))
        .map(|t| (event_at(t, "KILLING").expect("a moved task was stopped"), t["instance"].as_u64().unwrap()))
        .collect();
    moved.sort();
    assert_eq!(moved.len(), 2, "{}", summary(&all));
    let first_back = all
        .iter()
        .filter(|t| t["instance"].as_u64() == Some(moved[0].1) && t["agent_id"] != full.as_str())
        .filter_map(|t| event_at(t, "RUNNING"))
        .min()
        .expect("the first moved instance runs elsewhere");
    assert!(first_back <= moved[1].0, "second move at {} before the first replacement ran at {first_back}", moved[1].0);
    assert!(!c.events_of("agent_drained").is_empty());
    assert_eq!(c.metric("capstan_agents_drain{state=\"drained\"}"), Some(1.0));
    assert_eq!(c.metric("capstan_agents_drain{state=\"draining\"}"), Some(0.0));
    let blocked = c.events_of("drain_blocked");
    assert!(blocked.iter().any(|m| m.contains("www/prod/api's SLA")), "the wait is visible: {blocked:?}");
    let table = c.capstan_ok(&["agent", "list"]);
    assert!(table.contains("drained"), "{table}");

    // Nothing new is placed on a drained agent…
    let zone = agent(&c, &full)["attributes"]["zone"].as_str().unwrap().to_string();
    let key = "www/prod/pinned";
    c.create_job(&pinned(key, "service", &zone));
    holds_for(Duration::from_secs(2), "the pinned task waits", || {
        let t = c.tasks_of(key)?;
        ensure(t.len() == 1 && t[0]["state"] == "PENDING", summary(&t))
    });
    // …until it is undrained.
    let out = c.capstan_ok(&["agent", "undrain", &full, "--by", "ops@test"]);
    assert!(out.contains("takes new tasks again"), "{out}");
    let t = c.wait_running(key, 1, SOON);
    assert_eq!(t[0]["agent_id"], full.as_str());
    assert!(agent(&c, &full).get("drain").is_none_or(|d| d.is_null()));
}

/// A window starting soon keeps new service tasks off the agent (batch tasks still go there);
/// cancelling it lets them in. `safe-to-drain` lists the agent holding 1 of 3 instances of a
/// `min_healthy = 0.66` job, not the one holding 2.
#[test]
fn maintenance_keeps_new_services_off_and_safe_to_drain_respects_min_healthy() {
    if !privileged("maintenance_keeps_new_services_off_and_safe_to_drain_respects_min_healthy") {
        return;
    }
    let mut c = Cluster::start_split_opts(SplitOptions {
        agent_flags: vec!["--attributes".into(), "zone=a".into()],
        ..Default::default()
    });
    c.start_extra_agent("agent-b", &["--attributes", "zone=b"]);
    let a = agent_in_zone(&c, "a");

    let out =
        c.capstan_ok(&["admin", "maintenance", "schedule", "--agents", &a, "--start", "+10m", "--duration", "1h"]);
    assert!(out.contains("maintenance window 1 (starting soon)"), "{out}");
    let list = c.capstan_ok(&["admin", "maintenance", "list"]);
    assert!(list.contains("starting soon") && list.contains(&a), "{list}");
    assert!(agent(&c, &a)["maintenance"].as_str().unwrap_or_default().contains("window 1 starts at"));

    c.create_job(&pinned("www/prod/svc", "service", "a"));
    c.create_job(&pinned("etl/prod/batch", "batch", "a"));
    let batch = c.wait_running("etl/prod/batch", 1, SOON);
    assert_eq!(batch[0]["agent_id"], a.as_str(), "batch work still goes there before the window");
    wait_until(SOON, "the service says why it waits", || {
        let job = c.job("www/prod/svc")?.ok_or("no job")?;
        let reasons = job["pending_reasons"].to_string();
        ensure(reasons.contains("in or near maintenance"), reasons)
    });
    holds_for(Duration::from_secs(1), "the service task waits", || {
        let t = c.tasks_of("www/prod/svc")?;
        ensure(t.len() == 1 && t[0]["state"] == "PENDING", summary(&t))
    });
    c.capstan_ok(&["admin", "maintenance", "cancel", "1"]);
    let svc = c.wait_running("www/prod/svc", 1, SOON);
    assert_eq!(svc[0]["agent_id"], a.as_str());

    // safe-to-drain: 2 + 1 layout of a 0.66 job; the agent with 1 can go (2 stay), not the other.
    let job = "www/prod/api";
    c.create_job(&sla_service(job));
    let tasks = c.wait_running(job, 3, SOON);
    let b = agent_in_zone(&c, "b");
    let (full, single) = if live_on(&tasks, &a) == 2 { (&a, &b) } else { (&b, &a) };
    let v: Value =
        serde_json::from_str(&c.capstan_ok(&["admin", "sla", "safe-to-drain", "--percent", "50", "--output", "json"]))
            .expect("JSON");
    let safe: Vec<&str> = v["safe"].as_array().unwrap().iter().map(|s| s["agent"].as_str().unwrap()).collect();
    assert_eq!(safe, [single.as_str()], "{v}");
    let not: Vec<&Value> = v["not_safe"].as_array().unwrap().iter().collect();
    assert_eq!(not.len(), 1, "{v}");
    assert_eq!(not[0]["agent"], full.as_str());
    // Cumulative: with the safe agent gone too, the job would keep none.
    let reason = not[0]["reason"].as_str().unwrap();
    assert!(reason.contains("www/prod/api would keep 0 of 3") && reason.contains("gone too"), "{v}");
    let text = c.capstan_ok(&["admin", "sla", "safe-to-drain", "--percent", "50"]);
    assert!(text.contains("1 agent(s) can be drained now") && text.contains("not now:"), "{text}");
}
