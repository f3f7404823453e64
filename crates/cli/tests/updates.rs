//! Rolling updates end to end: real masters, agents and tasks (Python HTTP servers with an http
//! health check), driven through `capstan job update` and `GET /v1/jobs/{key}/update`, while a
//! sampler counts how many instances are down at once.

mod common;

use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

macro_rules! privileged_or_skip {
    ($name:expr) => {
        if !privileged($name) {
            return;
        }
    };
}

const KEY: &str = "www/prod/rolling";
/// Long enough for six Python servers to roll in three batches, or to roll back.
const ROLL: Duration = Duration::from_secs(90);

/// A job file for 6 (or `instances`) Python HTTP servers checked on `health_path`, rolled in
/// batches of 2 with a 1 s watch; `greeting` stands for the version of the code; `extra` goes into
/// `[update]`.
fn job_file(instances: u32, greeting: &str, health_path: &str, extra: &str) -> String {
    format!(
        r#"
job = "{KEY}"
type = "service"
instances = {instances}

[task]
command = "exec python3 -m http.server $PORT_HTTP --bind 127.0.0.1"
user = "nobody"
cpus = 0.2
mem = "48MiB"
disk = "16MiB"
ports = ["http"]
kill_grace = "2s"

[task.env]
GREETING = "{greeting}"

[health_check]
type = "http"
port = "http"
path = "{health_path}"
interval = "1s"
timeout = "500ms"
grace_period = "4s"
consecutive_failures = 2

[update]
batch_size = 2
watch = "1s"
{extra}
"#
    )
}

/// Counts, every 50 ms, the instances of `instances` that have no RUNNING and healthy task; keeps
/// the most seen at once.
struct DownSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, usize)>>,
}

impl DownSampler {
    fn start(c: &Cluster, instances: u64) -> DownSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let url = format!("{}/v1/tasks?job={KEY}", c.url);
        let thread = std::thread::spawn(move || {
            let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(2)).no_proxy().build().unwrap();
            let (mut max_down, mut samples) = (0, 0);
            while !flag.load(Ordering::Relaxed) {
                if let Some(Value::Array(tasks)) = http.get(&url).send().ok().and_then(|r| r.json::<Value>().ok()) {
                    let up: BTreeSet<u64> = tasks
                        .iter()
                        .filter(|t| t["state"] == "RUNNING" && t["health"] == "healthy")
                        .filter_map(|t| t["instance"].as_u64())
                        .collect();
                    let down = (0..instances).filter(|i| !up.contains(i)).count();
                    max_down = max_down.max(down);
                    samples += 1;
                }
                std::thread::sleep(POLL);
            }
            (max_down, samples)
        });
        DownSampler { stop, thread: Some(thread) }
    }

    /// The most instances down at once, and how many samples were taken.
    fn stop(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for DownSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The current (non-terminal) task of each instance, once `n` instances are RUNNING and healthy
/// on `version`.
fn wait_healthy(c: &Cluster, n: usize, version: u64) -> BTreeMap<u64, String> {
    wait_until(ROLL, &format!("{n} healthy instances of version {version}"), || {
        let tasks = c.tasks_of(KEY)?;
        let live: Vec<&Value> = tasks.iter().filter(|t| !is_terminal(t)).collect();
        let ok = live.len() == n
            && live.iter().all(|t| t["state"] == "RUNNING" && t["health"] == "healthy" && t["version"] == version);
        if ok {
            Ok(live.iter().map(|t| (t["instance"].as_u64().unwrap(), task_id(t))).collect())
        } else {
            Err(tasks
                .iter()
                .map(|t| format!("#{} {} v{} {} {}", t["instance"], t["id"], t["version"], t["state"], t["health"]))
                .collect::<Vec<_>>()
                .join("; "))
        }
    })
}

fn updates(c: &Cluster) -> Value {
    c.get(&format!("/v1/jobs/{KEY}/update"))
}

/// Waits until update `id` ended and returns it.
fn wait_ended(c: &Cluster, id: u64) -> Value {
    wait_until(ROLL, &format!("update {id} ended"), || {
        let v = updates(c);
        v["history"]
            .as_array()
            .and_then(|h| h.iter().find(|u| u["id"] == id).cloned())
            .ok_or_else(|| format!("{}", v["active"]))
    })
}

#[test]
fn an_update_rolls_in_three_batches_and_a_failing_one_rolls_back() {
    privileged_or_skip!("an_update_rolls_in_three_batches_and_a_failing_one_rolls_back");
    let c = Cluster::start();
    let v1 = c.write_file("v1.toml", &job_file(6, "v1", "/", ""));
    c.capstan_ok(&["job", "create", v1.to_str().unwrap()]);
    let first = wait_healthy(&c, 6, 1);

    // To a version that passes health: three batches of two, never more than two down.
    let sampler = DownSampler::start(&c, 6);
    let v2 = c.write_file("v2.toml", &job_file(6, "v2", "/", ""));
    let out = c.capstan_ok(&["job", "update", v2.to_str().unwrap(), "--by", "alice@laptop"]);
    let (max_down, samples) = sampler.stop();
    assert!(samples > 20, "the sampler ran ({samples} samples)");
    assert!(max_down <= 2, "at most one batch (2) down at once, saw {max_down}:\n{out}");
    assert!(max_down >= 1, "instances were replaced");
    for batch in ["batch 1/3", "batch 2/3", "batch 3/3"] {
        assert!(out.contains(batch), "the progress shows {batch}:\n{out}");
    }
    assert!(out.contains("succeeded"), "the final result:\n{out}");
    let second = wait_healthy(&c, 6, 2);
    assert!(first.values().all(|id| !second.values().any(|x| x == id)), "every instance has a new task");
    let u = &updates(&c)["history"][0];
    assert_eq!(
        (&u["state"], &u["from_version"], &u["to_version"], &u["batches"], &u["by"]),
        (&Value::from("succeeded"), &Value::from(1), &Value::from(2), &Value::from(3), &Value::from("alice@laptop"))
    );
    let status = c.capstan_ok(&["job", "update", "status", KEY]);
    assert!(status.contains("v1 → v2 by alice@laptop") && status.contains("succeeded"), "{status}");

    // To a version that fails health: stops at the first batch and rolls back by itself.
    let sampler = DownSampler::start(&c, 6);
    let v3 = c.write_file("v3.toml", &job_file(6, "v3", "/missing", ""));
    let out = c.capstan(&["job", "update", v3.to_str().unwrap()]);
    let (max_down, _) = sampler.stop();
    assert!(!out.status.success(), "a rolled back update is a failure for the CLI");
    let err = text(&out.stderr);
    assert!(err.contains("rolled_back"), "{err}");
    let u = wait_ended(&c, 2);
    assert_eq!(u["state"], "rolled_back", "{u}");
    assert_eq!(u["batches"], 1, "the rollback took the first batch back in one batch: {u}");
    let failed: Vec<u64> = u["failed"].as_array().unwrap().iter().filter_map(Value::as_u64).collect();
    assert!(!failed.is_empty() && failed.iter().all(|i| *i < 2), "the first batch failed: {u}");
    assert!(max_down <= 2, "saw {max_down} down");
    let after = wait_healthy(&c, 6, 2);
    for i in 2..6 {
        assert_eq!(after[&i], second[&i], "instance {i} outside the first batch was never touched");
    }
    let job = c.job(KEY).unwrap().unwrap();
    assert_eq!(job["version"], 2, "the job is on its old version again");
}

#[test]
fn instances_change_in_place_and_a_canary_waits_for_promote_and_abort_keeps_the_old_version() {
    privileged_or_skip!("instances_change_in_place_and_a_canary_waits_for_promote_and_abort_keeps_the_old_version");
    let c = Cluster::start();
    let v1 = c.write_file("v1.toml", &job_file(6, "v1", "/", ""));
    c.capstan_ok(&["job", "create", v1.to_str().unwrap()]);
    let first = wait_healthy(&c, 6, 1);

    // `instances` alone: 6 → 8 → 6, nothing else restarted.
    let more = c.write_file("more.toml", &job_file(8, "v1", "/", ""));
    let out = c.capstan_ok(&["job", "update", more.to_str().unwrap()]);
    assert!(out.contains("nothing replaced"), "{out}");
    let eight = wait_healthy(&c, 8, 2);
    for (i, id) in &first {
        assert_eq!(&eight[i], id, "instance {i} kept its task");
    }
    c.capstan_ok(&["job", "update", v1.to_str().unwrap()]);
    let six = wait_healthy(&c, 6, 3);
    assert_eq!(six, first, "the first six kept their tasks");

    // A canary: one instance first, then it waits for promote.
    let canary = c.write_file("canary.toml", &job_file(6, "v2", "/", "canaries = 1"));
    let out = c.capstan_ok(&["job", "update", canary.to_str().unwrap(), "--detach"]);
    assert!(out.contains("started"), "{out}");
    wait_until(ROLL, "the canary is up and the update waits", || {
        let a = &updates(&c)["active"];
        ensure(a["state"] == "awaiting_promote", a.clone())
    });
    holds_for(Duration::from_secs(2), "it keeps waiting for promote", || {
        let a = &updates(&c)["active"];
        ensure(a["state"] == "awaiting_promote" && a["done"].as_array().map(Vec::len) == Some(1), a.clone())
    });
    let status = c.capstan_ok(&["job", "status", KEY]);
    assert!(status.contains("awaiting_promote"), "job status shows the update:\n{status}");
    assert_eq!(c.metric("capstan_updates_active"), Some(1.0), "an update waiting for promote is in progress");

    // Abort: the update stops; the five others keep their old-version task.
    c.capstan_ok(&["job", "update", "abort", KEY]);
    let u = wait_ended(&c, 3);
    assert_eq!(u["state"], "aborted", "{u}");
    holds_for(Duration::from_secs(2), "the five others keep their old-version task", || {
        let tasks = c.tasks_of(KEY)?;
        let live: BTreeMap<u64, (String, u64)> = tasks
            .iter()
            .filter(|t| t["state"] == "RUNNING")
            .map(|t| (t["instance"].as_u64().unwrap(), (task_id(t), t["version"].as_u64().unwrap())))
            .collect();
        let old_kept = (1..6).all(|i| live.get(&i) == Some(&(first[&i].clone(), 3)));
        ensure(old_kept && live.len() == 6, live)
    });
    let history = c.capstan_ok(&["job", "update", "status", KEY]);
    assert!(history.contains("aborted") && history.contains("no update in progress"), "{history}");
}

#[test]
fn a_master_restart_mid_update_resumes_it_where_it_was() {
    privileged_or_skip!("a_master_restart_mid_update_resumes_it_where_it_was");
    let mut c = Cluster::start_split();
    let v1 = c.write_file("v1.toml", &job_file(6, "v1", "/", ""));
    c.capstan_ok(&["job", "create", v1.to_str().unwrap()]);
    wait_healthy(&c, 6, 1);
    let v2 = c.write_file("v2.toml", &job_file(6, "v2", "/", ""));
    c.capstan_ok(&["job", "update", v2.to_str().unwrap(), "--detach"]);
    wait_until(ROLL, "the second batch started", || {
        let a = &updates(&c)["active"];
        ensure(a["batches"] == 2, a.clone())
    });
    c.kill9_master();
    c.start_master();
    let u = wait_ended(&c, 1);
    assert_eq!((&u["state"], &u["batches"]), (&Value::from("succeeded"), &Value::from(3)), "{u}");
    wait_healthy(&c, 6, 2);
    // Each instance went to version 2 once: the restart did not start the update over.
    let tasks = c.tasks_of(KEY).unwrap();
    for i in 0..6u64 {
        let v2_tasks = tasks.iter().filter(|t| t["instance"] == i && t["version"] == 2).count();
        assert_eq!(v2_tasks, 1, "instance {i}: {}", summary(&tasks));
    }
}
