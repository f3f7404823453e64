//! End-to-end tests of the scheduling levers on a real `capstan dev` cluster: constraints and the
//! reasons of what cannot be placed, preemption, quotas, the placement rate ceiling.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

macro_rules! privileged_or_skip {
    ($name:expr) => {
        if !privileged($name) {
            return;
        }
    };
}

fn pending_reasons(c: &DevCluster, key: &str) -> Vec<String> {
    c.job(key)
        .ok()
        .flatten()
        .and_then(|j| j["pending_reasons"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r.as_str().map(String::from))
        .collect()
}

#[test]
fn constraints_place_what_they_allow_and_explain_what_they_refuse() {
    privileged_or_skip!("constraints_place_what_they_allow_and_explain_what_they_refuse");
    let c = DevCluster::start_with("", &["--attributes", "rack=r1,pod=p1"]);

    // A value that no agent has: everything waits, and the job says why.
    let mut spec = job_spec("www/prod/elsewhere", "service", 2, "exec sleep 600");
    spec["constraint"] = json!([{"attribute": "rack", "value": "r2"}]);
    c.create_job(&spec);
    let reasons = wait_until(SOON, "a pending reason naming the constraint", || {
        let r = pending_reasons(&c, "www/prod/elsewhere");
        ensure(r.iter().any(|x| x.starts_with("2 of 2 instances pending") && x.contains("fail `rack = r2`")), &r)?;
        Ok(r)
    });
    assert_eq!(reasons.len(), 1, "{reasons:?}");

    // At most one per rack on a one-rack cluster: one runs, one waits with the reason.
    let mut spec = job_spec("www/prod/one-per-rack", "service", 2, "exec sleep 600");
    spec["constraint"] = json!([{"attribute": "rack", "limit": 1}]);
    c.create_job(&spec);
    wait_until(SOON, "one instance runs", || {
        let running = c.tasks_of("www/prod/one-per-rack")?.iter().filter(|t| t["state"] == "RUNNING").count();
        ensure(running == 1, running)
    });
    wait_until(SOON, "the second instance waits on the limit", || {
        let r = pending_reasons(&c, "www/prod/one-per-rack");
        ensure(r.iter().any(|x| x.starts_with("1 of 2 instances pending") && x.contains("at most 1 per rack")), &r)
    });
    holds_for(Duration::from_millis(800), "still only one runs", || {
        let running = c.tasks_of("www/prod/one-per-rack")?.iter().filter(|t| t["state"] == "RUNNING").count();
        ensure(running == 1, running)
    });

    // `in` and `not` that match the agent: placed.
    let mut spec = job_spec("www/prod/matching", "service", 1, "exec sleep 600");
    spec["constraint"] = json!([{"attribute": "rack", "in": ["r1", "r9"]}, {"attribute": "pod", "not": "p2"}]);
    c.create_job(&spec);
    c.wait_running("www/prod/matching", 1, SOON);
}

#[test]
fn a_production_job_preempts_lower_priority_work_and_never_the_reverse() {
    privileged_or_skip!("a_production_job_preempts_lower_priority_work_and_never_the_reverse");
    let c = DevCluster::start_with("cpus=1", &[]);
    let mut batchy = job_spec("ads/dev/filler", "service", 4, "exec sleep 600");
    batchy["task"]["cpus"] = json!(0.25);
    batchy["priority"] = json!(1);
    c.create_job(&batchy);
    let fillers = c.wait_running("ads/dev/filler", 4, SOON);

    let mut prod = job_spec("www/prod/important", "service", 1, "exec sleep 600");
    prod["task"]["cpus"] = json!(0.5);
    prod["priority"] = json!(100);
    prod["production"] = json!(true);
    let ids = c.create_job(&prod);
    c.wait_task_state(&ids[0], "RUNNING", SOON);

    // Exactly enough victims (two of 0.25), each told who took its place.
    let preempted: Vec<Value> = fillers
        .iter()
        .filter_map(|t| c.task(&task_id(t)).ok().flatten())
        .filter(|t| t["reason"].as_str().unwrap_or("").contains("preempted by task"))
        .collect();
    assert_eq!(preempted.len(), 2, "{}", summary(&preempted));
    for t in &preempted {
        assert_eq!(t["state"], "KILLED", "{t}");
        assert!(t["reason"].as_str().unwrap().contains(&ids[0]), "{t}");
    }

    // A higher-priority job that is not production preempts nothing: it waits.
    let mut greedy = job_spec("ads/dev/greedy", "service", 1, "exec sleep 600");
    greedy["task"]["cpus"] = json!(0.5);
    greedy["priority"] = json!(1000);
    let g = c.create_job(&greedy);
    holds_for(Duration::from_secs(1), "the non-production job waits", || {
        let t = c.task(&g[0])?.ok_or("gone")?;
        ensure(t["state"] == "PENDING", t["state"].clone())
    });
    let important = c.task(&ids[0]).unwrap().unwrap();
    assert_eq!(important["state"], "RUNNING", "production is never a victim: {important}");
}

#[test]
fn a_production_job_over_its_role_quota_is_refused_with_the_numbers() {
    privileged_or_skip!("a_production_job_over_its_role_quota_is_refused_with_the_numbers");
    let c = DevCluster::start();
    c.capstan_ok(&["admin", "quota", "set", "www", "--cpus", "1", "--mem", "1GiB", "--disk", "1GiB"]);

    let mut ok = job_spec("www/prod/small", "service", 2, "exec sleep 600");
    ok["production"] = json!(true);
    ok["task"]["cpus"] = json!(0.25);
    c.create_job(&ok);

    let mut big = job_spec("www/prod/big", "service", 3, "exec sleep 600");
    big["production"] = json!(true);
    big["task"]["cpus"] = json!(0.25);
    let (status, body) = c.request("POST", "/v1/jobs", Some(&big.to_string())).expect("request");
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "over_quota", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("cpus: 0.5 in use + 0.75 asked > 1 quota"), "{message}");
    assert!(c.job("www/prod/big").unwrap().is_none(), "nothing was created");

    // Not production: not counted against the quota.
    big["production"] = json!(false);
    c.create_job(&big);

    let list = c.capstan_ok(&["admin", "quota", "list", "--output", "json"]);
    let quotas: Value = serde_json::from_str(&list).expect("JSON");
    assert_eq!(quotas[0]["role"], "www");
    assert_eq!(quotas[0]["used"]["cpus"], 0.5, "{quotas}");
}

#[test]
fn the_placement_rate_ceiling_slows_placement_and_can_be_lifted() {
    privileged_or_skip!("the_placement_rate_ceiling_slows_placement_and_can_be_lifted");
    let c = DevCluster::start();
    c.capstan_ok(&["admin", "scheduler", "rate", "4"]);
    let status = c.capstan_ok(&["admin", "scheduler", "status"]);
    assert!(status.contains("4/s"), "{status}");
    let metrics = c.metrics();
    assert!(metrics.contains("capstan_scheduler_max_placements_per_second 4"), "{metrics}");

    let started = Instant::now();
    c.create_job(&job_spec("ops/test/slow", "service", 12, "exec sleep 600"));
    c.wait_running("ops/test/slow", 12, Duration::from_secs(20));
    let took = started.elapsed();
    // 12 placements at 4 per second (with at most one second's burst) take at least 2 s.
    assert!(took >= Duration::from_secs(2), "12 tasks placed in {took:?} under a 4/s ceiling");

    c.capstan_ok(&["admin", "scheduler", "rate", "unlimited"]);
    let started = Instant::now();
    c.create_job(&job_spec("ops/test/fast", "service", 12, "exec sleep 600"));
    c.wait_running("ops/test/fast", 12, SOON);
    assert!(started.elapsed() < took, "lifting the ceiling did not speed placement up");

    let bad = c.capstan(&["admin", "scheduler", "rate", "0"]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("would stop all scheduling"), "{}", text(&bad.stderr));
}
