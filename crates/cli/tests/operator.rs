//! End-to-end tests of the operator's controls through the `capstan` CLI: freezing the cluster
//! (kills refused, creation warned, the freeze kept across restarts), `admin status`, the breaker,
//! `admin events`, the liveness columns of `agent list`, and the liveness flags of `capstan
//! master` and `capstan dev` (refused before anything starts when they cannot work).
//!
//! The flag and argument tests need no cluster and no root; the others run a real `capstan dev`.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const JOB: &str = "www/prod/sleeper";
const REASON: &str = "rack r3 flaps; investigating";
const BY: &str = "ops@test-host";
const WARNING: &str = "warning: the cluster is FROZEN: ";

macro_rules! privileged_or_skip {
    ($name:expr) => {
        if !privileged($name) {
            return;
        }
    };
}

/// A service of `instances` tasks that only sleep.
fn sleepers(key: &str, instances: u32) -> Value {
    job_spec(key, "service", instances, "exec sleep 600")
}

fn stderr_of(out: &Output) -> String {
    text(&out.stderr)
}

/// Runs `capstan ARGS` (no `--addr` added) and expects it to exit on its own within [`SOON`];
/// a daemon that starts instead of refusing is killed and the test fails.
fn exits_by_itself(args: &[&str]) -> Output {
    let mut child = Command::new(CAPSTAN)
        .args(args)
        .env_remove("CAPSTAN_ADDR")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running capstan");
    let deadline = Instant::now() + SOON;
    while child.try_wait().expect("waiting for capstan").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reaping capstan");
            panic!("capstan {args:?} did not exit by itself (it should refuse to start): {}", text(&out.stdout));
        }
        std::thread::sleep(POLL);
    }
    child.wait_with_output().expect("reaping capstan")
}

/// Asserts that the command failed and that its standard error mentions every one of `words`
/// (case-insensitive).
fn assert_refused(what: &str, out: &Output, words: &[&str]) {
    let err = stderr_of(out);
    assert!(!out.status.success(), "{what} must fail, but it succeeded:\nstdout: {}\nstderr: {err}", text(&out.stdout));
    for w in words {
        assert!(err.to_lowercase().contains(&w.to_lowercase()), "{what}: standard error must mention {w:?}:\n{err}");
    }
}

/// `capstan admin status --output json`.
fn admin_status(c: &DevCluster) -> Value {
    let out = c.capstan_ok(&["admin", "status", "--output", "json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("admin status --output json is not JSON ({e}): {out}"))
}

fn freeze(c: &DevCluster) -> Output {
    let out = c.capstan(&["admin", "freeze", "--reason", REASON, "--by", BY]);
    assert!(out.status.success(), "admin freeze failed ({}): {}", out.status, stderr_of(&out));
    out
}

/// Every task of `tasks` is still RUNNING with the same process, and that process lives.
fn still_running(c: &DevCluster, tasks: &[Value]) -> Result<(), String> {
    for t in tasks {
        let id = task_id(t);
        let now = c.task(&id)?.ok_or_else(|| format!("task {id} is gone"))?;
        if now["state"] != "RUNNING" || now["pid"] != t["pid"] || !pid_alive(task_pid(t)) {
            return Err(format!(
                "task {id} was RUNNING with pid {}, now {} pid {}",
                t["pid"], now["state"], now["pid"]
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Arguments and flags (no cluster)

#[test]
fn admin_freeze_without_a_reason_is_refused_by_the_cli() {
    let out = capstan_raw(&["admin", "freeze", "--addr", "http://127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(2), "a usage error: {}", stderr_of(&out));
    assert_refused("admin freeze without --reason", &out, &["--reason", "required"]);

    let out = capstan_raw(&["admin", "freeze", "--reason", "  ", "--addr", "http://127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(2), "a usage error: {}", stderr_of(&out));
    assert_refused("admin freeze with a blank --reason", &out, &["--reason", "empty"]);
}

#[test]
fn bad_liveness_flags_stop_master_and_dev_before_they_start_naming_the_flag() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let data = dir.path().to_str().expect("a UTF-8 path");
    let cases: &[(&[&str], &str)] = &[
        (&["--agent-removal-rate", "0/1s"], "--agent-removal-rate"),
        (&["--agent-removal-rate", "fast"], "--agent-removal-rate"),
        (&["--agent-timeout", "1s", "--heartbeat-interval", "5s"], "--agent-timeout"),
        (&["--breaker-threshold", "1.5"], "--breaker-threshold"),
        (&["--heartbeat-interval", "soon"], "--heartbeat-interval"),
    ];
    for daemon in ["master", "dev"] {
        for (flags, flag) in cases {
            let data_dir = format!("{data}/{daemon}");
            let mut args = vec![daemon, "--data-dir", &data_dir, "--bind", "127.0.0.1:0"];
            args.extend(flags.iter());
            let out = exits_by_itself(&args);
            assert_refused(&format!("capstan {}", args.join(" ")), &out, &[flag]);
            assert!(
                !text(&out.stdout).contains("serving at"),
                "capstan {daemon} {flags:?} started serving: {}",
                text(&out.stdout)
            );
        }
    }
    assert!(
        std::fs::read_dir(dir.path()).expect("the data directory").next().is_none(),
        "a refused start must not create state under {data}"
    );
}

// ---------------------------------------------------------------------------------------------
// Freeze

#[test]
fn a_freeze_with_a_reason_shows_in_admin_status_with_who_and_why() {
    privileged_or_skip!("a_freeze_with_a_reason_shows_in_admin_status_with_who_and_why");
    let c = DevCluster::start();
    let status = admin_status(&c);
    assert!(status["frozen"].is_null(), "a new cluster is not frozen: {status}");
    let table = c.capstan_ok(&["admin", "status"]);
    assert!(table.lines().any(|l| l.starts_with("frozen") && l.ends_with(" no")), "admin status:\n{table}");

    let out = freeze(&c);
    assert!(text(&out.stdout).contains(REASON), "admin freeze says what it did: {}", text(&out.stdout));
    assert!(stderr_of(&out).contains(WARNING), "admin freeze warns like every mutating command: {}", stderr_of(&out));

    let status = admin_status(&c);
    assert_eq!(status["frozen"]["reason"], REASON, "{status}");
    assert_eq!(status["frozen"]["by"], BY, "{status}");
    assert!(status["frozen"]["since"].as_str().is_some_and(|s| !s.is_empty()), "{status}");

    let table = c.capstan_ok(&["admin", "status"]);
    assert!(table.lines().any(|l| l.starts_with("frozen") && l.contains("YES")), "admin status:\n{table}");
    assert!(table.lines().any(|l| l.trim_start().starts_with("by") && l.contains(BY)), "admin status:\n{table}");
    assert!(
        table.lines().any(|l| l.trim_start().starts_with("reason") && l.contains(REASON)),
        "admin status:\n{table}"
    );

    let out = c.capstan(&["admin", "unfreeze", "--by", BY]);
    assert!(out.status.success(), "admin unfreeze: {}", stderr_of(&out));
    assert!(!stderr_of(&out).contains(WARNING), "no FROZEN warning once unfrozen: {}", stderr_of(&out));
    assert!(admin_status(&c)["frozen"].is_null(), "unfrozen");
}

#[test]
fn admin_freeze_says_by_default_that_user_at_host_pressed_it() {
    privileged_or_skip!("admin_freeze_says_by_default_that_user_at_host_pressed_it");
    let c = DevCluster::start();
    let out = Command::new(CAPSTAN)
        .args(["admin", "freeze", "--reason", REASON, "--addr", &c.url])
        .env("USER", "tester")
        .stdin(Stdio::null())
        .output()
        .expect("running capstan");
    assert!(out.status.success(), "admin freeze: {}", stderr_of(&out));
    let host = nix::unistd::gethostname().expect("hostname").into_string().expect("a UTF-8 hostname");
    assert_eq!(admin_status(&c)["frozen"]["by"], format!("tester@{host}"));
}

#[test]
fn while_frozen_kills_are_refused_and_the_tasks_keep_running_until_unfreeze() {
    privileged_or_skip!("while_frozen_kills_are_refused_and_the_tasks_keep_running_until_unfreeze");
    let c = DevCluster::start();
    c.create_job(&sleepers(JOB, 2));
    let tasks = c.wait_running(JOB, 2, SOON);
    freeze(&c);

    let out = c.capstan(&["job", "kill", JOB]);
    assert_refused("job kill while frozen", &out, &["frozen"]);
    let out = c.capstan(&["task", "kill", &task_id(&tasks[0])]);
    assert_refused("task kill while frozen", &out, &["frozen"]);
    // The API says why with a stable code.
    let (status, body) = c.request("DELETE", &format!("/v1/jobs/{JOB}"), None).expect("the master answers");
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("frozen")), "DELETE while frozen: {body}");

    holds_for(Duration::from_secs(1), "the frozen job's tasks keep running", || still_running(&c, &tasks));
    let job = c.job(JOB).expect("the master answers");
    assert!(job.is_some(), "the job is still there");

    c.capstan_ok(&["admin", "unfreeze"]);
    let out = c.capstan(&["job", "kill", JOB]);
    assert!(out.status.success(), "job kill after unfreeze: {}", stderr_of(&out));
    assert!(!stderr_of(&out).contains(WARNING), "no FROZEN warning once unfrozen: {}", stderr_of(&out));
    for t in &tasks {
        wait_until(SOON, "the killed task's process is gone", || ensure(!pid_alive(task_pid(t)), task_pid(t)));
    }
    // A killed job goes away once its tasks all ended.
    wait_until(SOON, "the killed job is gone", || match c.job(JOB)? {
        None => Ok(()),
        Some(j) => Err(format!("still there: {j}")),
    });
}

#[test]
fn while_frozen_job_create_succeeds_with_a_loud_warning() {
    privileged_or_skip!("while_frozen_job_create_succeeds_with_a_loud_warning");
    let c = DevCluster::start();
    freeze(&c);
    let file = c.write_file(
        "sleeper.toml",
        &format!(
            r#"job = "{JOB}"
type = "service"
instances = 1

[task]
command = "exec sleep 600"
user = "nobody"
cpus = 0.05
mem = "32MiB"
disk = "32MiB"
"#
        ),
    );
    let out = c.capstan(&["job", "create", file.to_str().expect("a UTF-8 path")]);
    assert!(out.status.success(), "job create while frozen: {}", stderr_of(&out));
    let err = stderr_of(&out);
    let warning = err.lines().find(|l| l.starts_with(WARNING)).unwrap_or_else(|| panic!("no FROZEN warning: {err}"));
    assert!(warning.contains(REASON), "the warning says why: {warning}");
    assert!(warning.ends_with("destructive actions are paused (capstan admin unfreeze)"), "{warning}");
    // Creating is not destructive: the task is placed and runs.
    c.wait_running(JOB, 1, SOON);

    // Reads do not warn; other mutating commands do.
    let out = c.capstan(&["job", "list"]);
    assert!(out.status.success() && !stderr_of(&out).contains(WARNING), "job list: {}", stderr_of(&out));
    let out = c.capstan(&["admin", "scheduler", "rate", "unlimited"]);
    assert!(out.status.success(), "scheduler rate: {}", stderr_of(&out));
    assert!(stderr_of(&out).contains(WARNING), "scheduler rate warns while frozen: {}", stderr_of(&out));
}

#[test]
fn a_freeze_survives_a_restart_of_the_dev_cluster() {
    privileged_or_skip!("a_freeze_survives_a_restart_of_the_dev_cluster");
    let mut c = DevCluster::start();
    c.create_job(&sleepers(JOB, 1));
    let tasks = c.wait_running(JOB, 1, SOON);
    freeze(&c);
    let before = admin_status(&c)["frozen"].clone();
    assert_eq!(before["reason"], REASON, "frozen before the restart: {before}");

    c.kill9();
    c.start_again();
    let after = admin_status(&c)["frozen"].clone();
    assert_eq!(after, before, "the same freeze after the restart");
    let out = c.capstan(&["job", "kill", JOB]);
    assert_refused("job kill after the restart, still frozen", &out, &["frozen"]);
    holds_for(Duration::from_millis(500), "the task keeps running", || still_running(&c, &tasks));
}

// ---------------------------------------------------------------------------------------------
// Events, breaker, agents, settings

#[test]
fn admin_events_show_the_freeze_and_the_unfreeze() {
    privileged_or_skip!("admin_events_show_the_freeze_and_the_unfreeze");
    let c = DevCluster::start();
    freeze(&c);
    c.capstan_ok(&["admin", "unfreeze", "--by", BY]);

    let lines = c.capstan_ok(&["admin", "events"]);
    let kind_of = |l: &str| l.split_whitespace().nth(1).map(str::to_string);
    let kinds: Vec<String> = lines.lines().filter_map(kind_of).collect();
    let frozen = kinds.iter().position(|k| k == "frozen");
    let unfrozen = kinds.iter().position(|k| k == "unfrozen");
    assert!(frozen.is_some() && unfrozen > frozen, "frozen, then unfrozen:\n{lines}");
    let frozen_line = lines.lines().find(|l| kind_of(l).as_deref() == Some("frozen")).expect("the frozen line");
    let at = frozen_line.split_whitespace().next().expect("a time");
    assert!(humantime::parse_rfc3339_weak(at).is_ok(), "each line starts with the time: {frozen_line}");

    let page: Value = serde_json::from_str(&c.capstan_ok(&["admin", "events", "--output", "json"])).expect("JSON");
    let events = page["events"].as_array().unwrap_or_else(|| panic!("events: {page}"));
    let seq_of_frozen = events.iter().find(|e| e["kind"] == "frozen").and_then(|e| e["seq"].as_u64());
    let seq_of_frozen = seq_of_frozen.unwrap_or_else(|| panic!("a frozen event: {page}"));

    let after: Value = serde_json::from_str(&c.capstan_ok(&[
        "admin",
        "events",
        "--after",
        &seq_of_frozen.to_string(),
        "--output",
        "json",
    ]))
    .expect("JSON");
    let kinds: Vec<&str> =
        after["events"].as_array().expect("events").iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(!kinds.contains(&"frozen") && kinds.contains(&"unfrozen"), "events after the freeze: {after}");
}

#[test]
fn admin_events_follow_prints_each_event_as_it_happens() {
    privileged_or_skip!("admin_events_follow_prints_each_event_as_it_happens");
    let c = DevCluster::start();
    let mut follower = Command::new(CAPSTAN)
        .args(["admin", "events", "--follow", "--addr", &c.url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("running capstan admin events --follow");
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = follower.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Give the follower time to reach its long poll, so the event comes while it waits.
    std::thread::sleep(Duration::from_millis(300));
    freeze(&c);
    let deadline = Instant::now() + SOON;
    let mut seen = vec![];
    let found = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.split_whitespace().nth(1) == Some("frozen") => break Some(line),
            Ok(line) => seen.push(line),
            Err(_) => break None,
        }
    };
    let exited = follower.try_wait().expect("the follower");
    let _ = follower.kill();
    let _ = follower.wait();
    let line = found.unwrap_or_else(|| panic!("no frozen event followed (exited: {exited:?}); lines: {seen:?}"));
    assert!(line.contains(REASON) || line.contains(BY), "the event says who or why: {line}");
}

#[test]
fn admin_breaker_reset_and_status_show_a_calm_breaker() {
    privileged_or_skip!("admin_breaker_reset_and_status_show_a_calm_breaker");
    let c = DevCluster::start();
    let status = admin_status(&c);
    assert_eq!(status["breaker"]["tripped"], false, "{status}");
    let out: Value =
        serde_json::from_str(&c.capstan_ok(&["admin", "breaker", "reset", "--output", "json"])).expect("JSON");
    assert_eq!(out["breaker"]["tripped"], false, "{out}");
    let table = c.capstan_ok(&["admin", "status"]);
    assert!(table.lines().any(|l| l.starts_with("breaker") && l.ends_with(" ok")), "admin status:\n{table}");
    assert!(table.contains("--agent-removal-rate"), "admin status shows the settings:\n{table}");
}

#[test]
fn liveness_flags_of_capstan_dev_reach_the_master() {
    privileged_or_skip!("liveness_flags_of_capstan_dev_reach_the_master");
    let c = DevCluster::start_with(
        "",
        &[
            "--heartbeat-interval",
            "1s",
            "--agent-timeout",
            "4s",
            "--agent-removal-rate",
            "3/1m",
            "--breaker-threshold",
            "0.5",
            "--breaker-window",
            "2m",
            "--fault-domain",
            "zone",
            "--stray-grace",
            "7m",
        ],
    );
    let status = admin_status(&c);
    let s = &status["settings"];
    assert_eq!(s["heartbeat_interval_ms"], 1000, "{status}");
    assert_eq!(s["agent_timeout_ms"], 4000, "{status}");
    assert_eq!(s["reregistration_period_ms"], 4000, "defaults to the agent timeout: {status}");
    assert_eq!(s["stray_grace_ms"], 420_000, "{status}");
    let rate: String = s["agent_removal_rate"].as_str().unwrap_or_default().split_whitespace().collect();
    assert_eq!(rate, "3/1m", "{status}");
    assert_eq!(status["breaker"]["threshold"], 0.5, "{status}");
    assert_eq!(status["breaker"]["window_ms"], 120_000, "{status}");
    assert_eq!(status["breaker"]["fault_domain"], "zone", "{status}");
}

#[test]
fn agent_list_shows_liveness_and_when_the_agent_was_last_seen() {
    privileged_or_skip!("agent_list_shows_liveness_and_when_the_agent_was_last_seen");
    let c = DevCluster::start();
    let table = c.capstan_ok(&["agent", "list"]);
    for column in ["LIVENESS", "LAST SEEN", "UNREACHABLE SINCE"] {
        assert!(table.contains(column), "agent list has a {column} column:\n{table}");
    }
    let agents: Value = serde_json::from_str(&c.capstan_ok(&["agent", "list", "--output", "json"])).expect("JSON");
    let agent = &agents[0];
    assert_eq!(agent["liveness"], "active", "{agents}");
    assert!(agent["last_seen"].as_str().is_some_and(|t| humantime::parse_rfc3339_weak(t).is_ok()), "{agents}");
    assert!(agent["unreachable_since"].is_null(), "{agents}");
    assert!(table.contains("active") && table.contains(" ago"), "agent list shows it active, seen just now:\n{table}");
}
