//! Inputs without bounds, sent to a real `capstan dev` as a careless script would: each is refused
//! with a message that says what is wrong, and the cluster is unchanged and keeps answering.

#[path = "../../cli/tests/common/mod.rs"]
mod common;

use common::*;
use serde_json::{json, Value};

/// A valid job body with `patch` merged into it.
fn job(patch: Value) -> String {
    let mut spec = json!({
        "job": "www/prod/hostile",
        "instances": 1,
        "task": {"command": "sleep 600", "user": "nobody", "cpus": 0.1, "mem": "16MiB", "disk": "16MiB"}
    });
    for (k, v) in patch.as_object().expect("an object") {
        if k == "task" {
            for (tk, tv) in v.as_object().expect("a task object") {
                spec["task"][tk] = tv.clone();
            }
        } else {
            spec[k] = v.clone();
        }
    }
    spec.to_string()
}

/// `POST /v1/jobs` with `body` must be a 400 whose message contains every one of `words`, and no
/// job may exist afterwards.
fn assert_job_refused(c: &Cluster, body: &str, words: &[&str]) {
    let (status, answer) = c.request("POST", "/v1/jobs", Some(body)).expect("the master answers");
    assert_eq!(status, 400, "refused as a bad request: {answer}");
    let said = answer.to_string();
    for w in words {
        assert!(said.contains(w), "the refusal names `{w}`: {said}");
    }
    assert_eq!(c.job("www/prod/hostile").expect("job lookup"), None, "nothing was created");
}

#[test]
fn an_oversized_freeze_reason_is_refused_and_every_client_keeps_working() {
    if !privileged("an_oversized_freeze_reason_is_refused_and_every_client_keeps_working") {
        return;
    }
    let c = Cluster::start();
    let reason = "x".repeat(1_500_000);
    let body = json!({"reason": reason, "by": "script@host"}).to_string();
    let (status, answer) = c.request("POST", "/v1/admin/freeze", Some(&body)).expect("the master answers");
    assert!(status == 400 || status == 413, "a 1.5 MB reason is refused, got {status}: {answer}");
    let (status, answer) = c
        .request("POST", "/v1/admin/freeze", Some(&json!({"reason": "a\r\nx-evil: 1", "by": "s@h"}).to_string()))
        .unwrap();
    assert_eq!(status, 400, "a reason that would split a header is refused: {answer}");
    // The cluster is not frozen, and the CLI (which reads every response head) still works.
    let status = c.get("/v1/admin/status");
    assert!(status["frozen"].is_null(), "nothing was frozen: {status}");
    c.capstan_ok(&["job", "list"]);
}

#[test]
fn job_bodies_past_every_limit_are_refused_with_what_is_wrong() {
    if !privileged("job_bodies_past_every_limit_are_refused_with_what_is_wrong") {
        return;
    }
    let c = Cluster::start();
    // 2^63 instances: a number out of range, not "expected a whole number, found an integer".
    assert_job_refused(&c, &job(json!({"instances": 9_223_372_036_854_775_808u64})), &["instances", "out of range"]);
    // 40,000 constraints: refused as too many, at once (one problem, not 40,000).
    let constraints: Vec<Value> = (0..40_000).map(|i| json!({"attribute": "rack", "not": format!("r{i}")})).collect();
    let body = job(json!({"constraint": constraints}));
    let (status, answer) = c.request("POST", "/v1/jobs", Some(&body)).expect("the master answers");
    assert!(status == 400 || status == 413, "40,000 constraints are refused: {status}");
    if status == 400 {
        let said = answer.to_string();
        assert!(said.contains("at most 64"), "the refusal says the limit: {said}");
        assert!(said.len() < 10_000, "one problem, not one per constraint: {} bytes", said.len());
    }
    // "0B" once meant no disk limit at all.
    assert_job_refused(&c, &job(json!({"task": {"disk": "0B"}})), &["task.disk", "more than 0B"]);
    // User names that cannot exist on a Debian host are refused at submission, not retried at launch.
    for user in ["ROOT", "-rf", "9lives", "nobody\u{0}x"] {
        assert_job_refused(&c, &job(json!({"task": {"user": user}})), &["task.user"]);
    }
    assert_eq!(c.job("www/prod/hostile").unwrap(), None);
    c.capstan_ok(&["job", "list"]);
}

#[test]
fn the_log_proxy_passes_no_query_text_to_the_agent() {
    if !privileged("the_log_proxy_passes_no_query_text_to_the_agent") {
        return;
    }
    let c = Cluster::start();
    let ids = c.create_job(&serde_json::from_str(&job(json!({}))).unwrap());
    c.wait_running("www/prod/hostile", 1, SOON);
    for stream in ["stdout%26tail%3D1", "..%2Fsupervisor.log", "stdin"] {
        let (status, answer) =
            c.request("GET", &format!("/v1/tasks/{}/logs?stream={stream}", ids[0]), None).expect("the master answers");
        assert_eq!(status, 400, "stream={stream} is refused by the master: {answer}");
        assert!(answer.to_string().contains("stdout or stderr"), "{answer}");
    }
    let (status, _) = c.request("GET", &format!("/v1/tasks/{}/logs?stream=stderr", ids[0]), None).unwrap();
    assert_eq!(status, 200, "a real stream is still served");
}
