//! End-to-end tests: a real `capstan dev` (master + agent in one process) running real tasks
//! under supervisors and cgroups, driven through its HTTP API and the `capstan` CLI.
//! Each test has its own cluster (data directory, port range, cgroup root); they run in parallel.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

const JOB: &str = "www/prod/hello";

macro_rules! privileged_or_skip {
    ($name:expr) => {
        if !privileged($name) {
            return;
        }
    };
}

/// Waits until `GET /` on `port` answers 200.
fn wait_http_ok(port: u16) {
    wait_until(SOON, &format!("http://127.0.0.1:{port}/ answers 200"), || match http_status(port) {
        Ok(200) => Ok(()),
        other => Err(format!("{other:?}")),
    });
}

/// Waits until `job` has a task for `instance` other than `old` in state RUNNING.
fn wait_replacement(c: &DevCluster, job: &str, instance: u64, old: &str, timeout: Duration) -> Value {
    wait_until(timeout, &format!("a new task for instance {instance} of {job} is RUNNING"), || {
        let tasks = c.tasks_of(job)?;
        tasks
            .iter()
            .find(|t| t["instance"] == instance && t["id"] != old && t["state"] == "RUNNING" && t["pid"].is_u64())
            .cloned()
            .ok_or_else(|| summary(&tasks))
    })
}

fn reason(t: &Value) -> &str {
    t["reason"].as_str().unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// 1. A service runs: processes, users, environment, ports, sandboxes, logs.

#[test]
fn service_instances_run_as_nobody_on_their_own_ports_with_the_contract_environment() {
    privileged_or_skip!("service_instances_run_as_nobody_on_their_own_ports_with_the_contract_environment");
    let c = DevCluster::start();
    c.create_job(&http_service(JOB, 3));
    let tasks = c.wait_running(JOB, 3, SOON);

    let ports: BTreeSet<u16> = tasks.iter().map(|t| task_port(t, "http")).collect();
    assert_eq!(ports.len(), 3, "each instance has its own port: {}", summary(&tasks));
    for p in &ports {
        assert!((c.ports.0..=c.ports.1).contains(p), "port {p} is outside the agent's range {:?}", c.ports);
    }
    let instances: BTreeSet<u64> = tasks.iter().map(|t| t["instance"].as_u64().unwrap()).collect();
    assert_eq!(instances, BTreeSet::from([0, 1, 2]));

    for t in &tasks {
        let (id, pid, port) = (task_id(t), task_pid(t), task_port(t, "http"));
        wait_http_ok(port);
        assert_eq!(proc_uid(pid), 65534, "task {id} (pid {pid}) must run as nobody");
        let env = proc_environ(pid);
        let sandbox = c.sandbox(&id);
        assert_eq!(env.get("CAPSTAN_TASK_ID"), Some(&id), "env of {id}: {env:?}");
        assert_eq!(env.get("CAPSTAN_JOB").map(String::as_str), Some(JOB), "env of {id}: {env:?}");
        assert_eq!(env.get("CAPSTAN_INSTANCE"), Some(&t["instance"].to_string()), "env of {id}: {env:?}");
        assert_eq!(env.get("CAPSTAN_SANDBOX"), Some(&c.work(&id).display().to_string()), "env of {id}: {env:?}");
        assert_eq!(env.get("PORT_HTTP"), Some(&port.to_string()), "env of {id}: {env:?}");
        for log in ["stdout", "stderr"] {
            assert!(c.log_file(&id, log).is_file(), "{} has no {log} file in logs/", sandbox.display());
        }
        assert_eq!(t["host"].as_str().map(str::is_empty), Some(false), "task has a host: {t}");
    }

    // The request made above shows up in the server's request log (its stderr).
    let id = task_id(&tasks[0]);
    wait_until(SOON, "`capstan task logs --stderr` shows the request", || {
        let out = c.capstan(&["task", "logs", &id, "--stderr"]);
        let logs = text(&out.stdout);
        if out.status.success() && logs.contains("\"GET / HTTP/1.1\" 200") {
            Ok(())
        } else {
            Err(format!("status {}, stdout {logs:?}, stderr {:?}", out.status, text(&out.stderr)))
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 2. A killed service task is reported and replaced.

#[test]
fn a_service_task_killed_by_sigkill_is_reported_failed_and_replaced() {
    privileged_or_skip!("a_service_task_killed_by_sigkill_is_reported_failed_and_replaced");
    let mut c = DevCluster::start();
    c.create_job(&http_service(JOB, 2));
    let tasks = c.wait_running(JOB, 2, SOON);
    let victim = &tasks[0];
    let (id, pid) = (task_id(victim), task_pid(victim));

    sigkill(pid);
    let ended = c.wait_task_state(&id, "FAILED", SOON);
    assert!(reason(&ended).contains("signal 9"), "reason of the killed task: {ended}");

    let replacement = wait_replacement(&c, JOB, victim["instance"].as_u64().unwrap(), &id, Duration::from_secs(10));
    wait_http_ok(task_port(&replacement, "http"));
    // The other instance was not touched.
    let other = c.task(&task_id(&tasks[1])).unwrap().unwrap();
    assert_eq!(other["state"], "RUNNING", "the other instance: {other}");
    assert_eq!(other["pid"], tasks[1]["pid"]);

    // A restart does not report the ended task again nor start anything new.
    let settled = c.wait_running(JOB, 2, SOON);
    let count = c.tasks_of(JOB).unwrap().len();
    c.restart();
    holds_for(Duration::from_secs(1), "nothing changes after a restart", || {
        let now = c.tasks_of(JOB)?;
        ensure(now.len() == count, summary(&now))?;
        let dead = now.iter().find(|t| t["id"] == id.as_str()).ok_or("the failed task is gone")?;
        ensure(dead["state"] == "FAILED", summary(&now))?;
        for t in &settled {
            let same = now.iter().any(|n| n["id"] == t["id"] && n["state"] == "RUNNING" && n["pid"] == t["pid"]);
            ensure(same, summary(&now))?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// 3. Out of memory.

#[test]
fn a_task_over_its_memory_limit_fails_with_out_of_memory() {
    privileged_or_skip!("a_task_over_its_memory_limit_fails_with_out_of_memory");
    let c = DevCluster::start();
    let key = "batch/test/oom";
    let mut spec =
        job_spec(key, "batch", 1, r#"exec python3 -c "b = bytearray(200*1024*1024); import time; time.sleep(60)""#);
    spec["max_failures"] = json!(0);
    let ids = c.create_job(&spec);
    let t = c.wait_task_state(&ids[0], "FAILED", Duration::from_secs(30));
    let why = reason(&t);
    assert!(why.contains("out of memory"), "reason: {why:?} ({t})");
    assert!(why.contains("32MiB"), "the reason names the limit: {why:?}");
    let job = wait_until(SOON, "the job is failed", || match c.job(key)? {
        Some(j) if j["status"] == "failed" => Ok(j),
        other => Err(format!("{other:?}")),
    });
    assert_eq!(job["tasks"]["FAILED"], 1, "{job}");
}

// ---------------------------------------------------------------------------------------------
// 4. Batch jobs.

#[test]
fn a_batch_job_that_exits_0_finishes() {
    privileged_or_skip!("a_batch_job_that_exits_0_finishes");
    let c = DevCluster::start();
    let key = "batch/test/ok";
    let ids = c.create_job(&job_spec(key, "batch", 1, "exit 0"));
    let t = c.wait_task_state(&ids[0], "FINISHED", SOON);
    assert!(t["pid"].is_null() || t["state"] == "FINISHED", "{t}");
    let job = wait_until(SOON, "the job is finished", || match c.job(key)? {
        Some(j) if j["status"] == "finished" => Ok(j),
        other => Err(format!("{other:?}")),
    });
    assert!(job["duration_ms"].is_u64(), "a finished batch job has a duration: {job}");
    assert!(job["finished_at"].is_string(), "{job}");
    let tasks = c.tasks_of(key).unwrap();
    assert_eq!(tasks.len(), 1, "no retries after success: {}", summary(&tasks));
}

#[test]
fn a_failing_batch_job_is_retried_max_failures_times_then_failed() {
    privileged_or_skip!("a_failing_batch_job_is_retried_max_failures_times_then_failed");
    let c = DevCluster::start();
    let key = "batch/test/three";
    let mut spec = job_spec(key, "batch", 1, "exit 3");
    spec["max_failures"] = json!(2);
    c.create_job(&spec);
    // Two retries with backoff 1 s and 2 s.
    let job = wait_until(Duration::from_secs(30), "the job is failed", || match c.job(key)? {
        Some(j) if j["status"] == "failed" => Ok(j),
        other => Err(format!("{other:?} tasks {}", summary(&c.tasks_of(key)?))),
    });
    let tasks = c.tasks_of(key).unwrap();
    assert_eq!(tasks.len(), 3, "1 run + 2 retries: {}", summary(&tasks));
    for t in &tasks {
        assert_eq!(t["instance"], 0);
        assert_eq!(t["state"], "FAILED", "{}", summary(&tasks));
        assert!(reason(t).contains("exited with code 3"), "{}", summary(&tasks));
    }
    // And nothing else gets started afterwards.
    holds_for(Duration::from_millis(1500), "no 4th task", || {
        let n = c.tasks_of(key)?.len();
        ensure(n == 3, format!("{n} tasks"))
    });
    assert!(job["finished_at"].is_string(), "{job}");
}

// ---------------------------------------------------------------------------------------------
// 5. Restart of the dev process: tasks survive and are re-attached.

#[test]
fn tasks_survive_a_kill_9_of_the_dev_process_and_are_reattached() {
    privileged_or_skip!("tasks_survive_a_kill_9_of_the_dev_process_and_are_reattached");
    let mut c = DevCluster::start();
    c.create_job(&http_service(JOB, 2));
    let before = c.wait_running(JOB, 2, SOON);
    let identities: Vec<(String, u32, u64)> = before
        .iter()
        .map(|t| {
            let pid = task_pid(t);
            (task_id(t), pid, proc_stat(pid).expect("running").1)
        })
        .collect();

    c.restart();

    assert!(c.job(JOB).unwrap().is_some(), "the job survives the restart");
    let agents = c.get("/v1/agents");
    assert_eq!(agents.as_array().map(Vec::len), Some(1), "the agent comes back as itself: {agents}");
    holds_for(Duration::from_secs(2), "the same 2 tasks keep running with the same processes", || {
        let now = c.tasks_of(JOB)?;
        ensure(now.len() == 2, format!("no new tasks: {}", summary(&now)))?;
        for (id, pid, ticks) in &identities {
            let t = now.iter().find(|t| t["id"] == id.as_str()).ok_or(format!("task {id} is gone"))?;
            ensure(t["state"] == "RUNNING" && t["pid"] == *pid, format!("task {id}: {}", summary(&now)))?;
            ensure(proc_stat(*pid).is_some_and(|s| s.1 == *ticks), format!("process {pid} of {id} was replaced"))?;
        }
        Ok(())
    });
    for t in &before {
        wait_http_ok(task_port(t, "http"));
    }
    // The agent came back with a new address; logs are still served through the master.
    let first = &identities[0].0;
    wait_until(SOON, "`capstan task logs --stderr` works after the restart", || {
        let out = c.capstan(&["task", "logs", first, "--stderr"]);
        let logs = text(&out.stdout);
        ensure(out.status.success() && logs.contains("\"GET / HTTP/1.1\" 200"), (out.status, logs, text(&out.stderr)))
    });

    // The re-attached agent still watches them: a killed one is replaced.
    let (id, pid, _) = &identities[0];
    sigkill(*pid);
    let ended = c.wait_task_state(id, "FAILED", SOON);
    assert!(reason(&ended).contains("signal 9"), "{ended}");
    let now = c.wait_running(JOB, 2, SOON);
    assert!(now.iter().all(|t| t["id"] != id.as_str()), "{}", summary(&now));
    assert!(now.iter().any(|t| t["id"] == identities[1].0.as_str()), "the other task is untouched: {}", summary(&now));
}

// ---------------------------------------------------------------------------------------------
// 6. A task that died while the dev process was down.

#[test]
fn a_task_killed_while_the_dev_process_is_down_is_reported_and_replaced_after_restart() {
    privileged_or_skip!("a_task_killed_while_the_dev_process_is_down_is_reported_and_replaced_after_restart");
    let mut c = DevCluster::start();
    c.create_job(&http_service(JOB, 2));
    let tasks = c.wait_running(JOB, 2, SOON);
    let (id, pid) = (task_id(&tasks[0]), task_pid(&tasks[0]));

    c.kill9();
    sigkill(pid);
    // Its supervisor (which outlives the dev process) records the end.
    let exit = c.sandbox(&id).join("exit.json");
    wait_until(SOON, "the supervisor wrote exit.json", || ensure(exit.is_file(), exit.display()));
    c.start_again();

    let ended = c.wait_task_state(&id, "FAILED", SOON);
    assert!(reason(&ended).contains("signal 9"), "{ended}");
    let replacement = wait_replacement(&c, JOB, tasks[0]["instance"].as_u64().unwrap(), &id, SOON);
    wait_http_ok(task_port(&replacement, "http"));
    let now = c.wait_running(JOB, 2, SOON);
    assert!(now.iter().any(|t| t["id"] == tasks[1]["id"] && t["pid"] == tasks[1]["pid"]), "{}", summary(&now));
}

// ---------------------------------------------------------------------------------------------
// 7. Killing a job.

#[test]
fn killing_a_job_stops_every_process_removes_cgroups_and_forgets_the_job() {
    privileged_or_skip!("killing_a_job_stops_every_process_removes_cgroups_and_forgets_the_job");
    let mut c = DevCluster::start();
    c.create_job(&http_service(JOB, 2));
    let tasks = c.wait_running(JOB, 2, SOON);
    let mut pids = vec![];
    for t in &tasks {
        let id = task_id(t);
        pids.push(task_pid(t));
        pids.push(read_identity(&c.sandbox(&id).join("supervisor.json")).expect("supervisor.json").0);
        assert!(!task_cgroups(&c.cgroup_root, &id).is_empty(), "task {id} has cgroups while it runs");
    }

    let out = c.capstan_ok(&["job", "kill", JOB]);
    assert!(out.contains(JOB), "{out}");

    let mut seen: Vec<String> = vec![];
    wait_until(SOON, "the job is gone from /v1/jobs", || {
        for t in &tasks {
            if let Some(now) = c.task(&task_id(t))? {
                seen.push(format!("{} {}", now["id"], now["state"]));
            }
        }
        let jobs = c.get("/v1/jobs");
        let listed = jobs.as_array().is_some_and(|a| a.iter().any(|j| j["job"] == JOB));
        ensure(!listed, &jobs)
    });
    // Killing never shows as a failure.
    assert!(seen.iter().all(|s| !s.contains("FAILED") && !s.contains("LOST")), "{seen:?}");
    assert_eq!(c.job(JOB).unwrap(), None, "GET /v1/jobs/KEY is 404 afterwards");
    for t in &tasks {
        assert_eq!(c.task(&task_id(t)).unwrap(), None, "the ended tasks went with the job");
    }
    wait_until(SOON, "no process of the job is alive", || {
        let alive: Vec<u32> = pids.iter().copied().filter(|p| pid_alive(*p)).collect();
        ensure(alive.is_empty(), alive)
    });
    wait_until(SOON, "the tasks' cgroups are removed", || {
        let left: Vec<_> = tasks.iter().flat_map(|t| task_cgroups(&c.cgroup_root, &task_id(t))).collect();
        ensure(left.is_empty(), left)
    });
    for t in &tasks {
        let id = task_id(t);
        let exit = std::fs::read_to_string(c.sandbox(&id).join("exit.json")).unwrap_or_default();
        assert!(exit.contains("killed") || exit.contains("Killed"), "exit.json of {id}: {exit}");
    }
    // It stays gone across a restart.
    c.restart();
    holds_for(Duration::from_millis(500), "the job stays gone", || {
        let tasks = c.tasks_of(JOB)?;
        ensure(c.job(JOB)?.is_none() && tasks.is_empty(), summary(&tasks))
    });
}

// ---------------------------------------------------------------------------------------------
// 8. Killing one task of a service.

#[test]
fn killing_a_service_task_ends_it_killed_and_starts_a_fresh_one() {
    privileged_or_skip!("killing_a_service_task_ends_it_killed_and_starts_a_fresh_one");
    let c = DevCluster::start();
    c.create_job(&http_service(JOB, 1));
    let t = c.wait_running(JOB, 1, SOON).remove(0);
    let (id, pid) = (task_id(&t), task_pid(&t));

    c.capstan_ok(&["task", "kill", &id]);
    let ended = c.wait_task_state(&id, "KILLED", SOON);
    assert!(reason(&ended).contains("kill"), "{ended}");
    wait_until(SOON, "the killed process is gone", || ensure(!pid_alive(pid), pid));
    let fresh = wait_replacement(&c, JOB, 0, &id, SOON);
    wait_http_ok(task_port(&fresh, "http"));
    let job = c.job(JOB).unwrap().expect("the job remains");
    assert_eq!(job["instances"], 1);
}

// ---------------------------------------------------------------------------------------------
// 9. CLI errors and outputs.

const GOOD_TOML: &str = r#"
job = "www/prod/cli"
type = "service"
instances = 1

[task]
command = "sleep 600"
user = "nobody"
cpus = 0.05
mem = "32MiB"
disk = "32MiB"
"#;

#[test]
fn cli_reports_errors_with_non_zero_exit_and_clear_messages() {
    privileged_or_skip!("cli_reports_errors_with_non_zero_exit_and_clear_messages");
    let c = DevCluster::start();

    // Unknown key: refused before anything is sent, naming the field.
    let bad = c.write_file("bad.toml", &GOOD_TOML.replace("instances = 1", "instances = 1\ncolour = \"red\""));
    let out = c.capstan(&["job", "create", bad.to_str().unwrap()]);
    assert!(!out.status.success(), "an unknown key must fail: {out:?}");
    assert!(text(&out.stderr).contains("colour"), "stderr names the field: {}", text(&out.stderr));
    let out = c.capstan(&["job", "validate", bad.to_str().unwrap()]);
    assert!(!out.status.success() && text(&out.stderr).contains("colour"), "{out:?}");

    // Valid file: validate, create, create again.
    let good = c.write_file("good.toml", GOOD_TOML);
    let out = c.capstan_ok(&["job", "validate", good.to_str().unwrap()]);
    assert!(out.contains("www/prod/cli"), "{out}");
    c.capstan_ok(&["job", "create", good.to_str().unwrap()]);
    let out = c.capstan(&["job", "create", good.to_str().unwrap()]);
    assert!(!out.status.success(), "creating an existing job must fail: {out:?}");
    assert!(text(&out.stderr).contains("exists"), "stderr says it exists: {}", text(&out.stderr));

    // Unknown job.
    let out = c.capstan(&["job", "status", "no/such/job"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("no job"), "{}", text(&out.stderr));

    // Unreachable master.
    let out = capstan_raw(&["job", "list", "--addr", "http://127.0.0.1:1"]);
    assert!(!out.status.success(), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("cannot reach") && err.contains("127.0.0.1:1"), "a clear message: {err}");

    // JSON output is JSON; the table output has the agent's hostname.
    c.wait_running("www/prod/cli", 1, SOON);
    let out = c.capstan_ok(&["task", "list", "--output", "json"]);
    let tasks: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    assert_eq!(tasks.as_array().map(Vec::len), Some(1), "{tasks}");
    assert_eq!(tasks[0]["job"], "www/prod/cli");
    let out = c.capstan_ok(&["job", "status", "www/prod/cli", "--output", "json"]);
    let status: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    assert_eq!(status["job"]["job"], "www/prod/cli", "{status}");

    let hostname = c.get("/v1/agents")[0]["hostname"].as_str().expect("an agent").to_string();
    let system = nix::unistd::gethostname().unwrap().into_string().unwrap();
    assert_eq!(hostname, system, "the agent reports this host's name");
    let out = c.capstan_ok(&["agent", "list"]);
    assert!(out.contains(&hostname), "agent list shows {hostname}: {out}");
}

// ---------------------------------------------------------------------------------------------
// 10. API errors.

fn assert_error_shape(what: &str, status: u16, body: &Value, want_status: u16) {
    assert_eq!(status, want_status, "{what}: {body}");
    assert!(body["error"]["code"].as_str().is_some_and(|s| !s.is_empty()), "{what}: error.code in {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|s| !s.is_empty()), "{what}: error.message in {body}");
}

#[test]
fn api_errors_have_the_error_shape_and_name_every_problem() {
    privileged_or_skip!("api_errors_have_the_error_shape_and_name_every_problem");
    let c = DevCluster::start();

    let (status, body) = c.request("POST", "/v1/jobs", Some("{not json")).unwrap();
    assert_error_shape("invalid JSON", status, &body, 400);

    let bad = json!({
        "job": "not a key",
        "type": "service",
        "instances": -1,
        "colour": "red",
        "task": {"command": "true", "user": "nobody", "cpus": "lots", "mem": "much", "disk": "32MiB"}
    });
    let (status, body) = c.request("POST", "/v1/jobs", Some(&bad.to_string())).unwrap();
    assert_error_shape("several mistakes", status, &body, 400);
    assert_eq!(body["error"]["code"], "invalid_job", "{body}");
    let paths: BTreeSet<&str> =
        body["error"]["details"].as_array().expect("details").iter().filter_map(|d| d["path"].as_str()).collect();
    for p in ["job", "instances", "colour", "task.cpus", "task.mem"] {
        assert!(paths.contains(p), "details name {p}: {paths:?} in {body}");
    }

    let mut root = http_service("www/prod/root", 1);
    root["task"]["user"] = json!("root");
    let (status, body) = c.request("POST", "/v1/jobs", Some(&root.to_string())).unwrap();
    assert_error_shape("user root", status, &body, 400);
    assert!(body.to_string().contains("task.user"), "names task.user: {body}");
    assert_eq!(c.job("www/prod/root").unwrap(), None, "nothing was created");

    let good = job_spec("www/prod/once", "service", 1, "sleep 600");
    let (status, _) = c.request("POST", "/v1/jobs", Some(&good.to_string())).unwrap();
    assert_eq!(status, 201);
    let (status, body) = c.request("POST", "/v1/jobs", Some(&good.to_string())).unwrap();
    assert_error_shape("existing job", status, &body, 409);
    assert_eq!(body["error"]["code"], "job_exists", "{body}");

    let (status, body) = c.request("GET", "/v1/tasks/nothex", None).unwrap();
    assert_error_shape("bad task id", status, &body, 400);
    let (status, body) = c.request("GET", "/v1/tasks/00000000000000ab", None).unwrap();
    assert_error_shape("unknown task", status, &body, 404);
    let (status, body) = c.request("GET", "/v1/jobs/no/such/job", None).unwrap();
    assert_error_shape("unknown job", status, &body, 404);
    let (status, body) = c.request("DELETE", "/v1/jobs/no/such/job", None).unwrap();
    assert_error_shape("killing an unknown job", status, &body, 404);
    let (status, body) = c.request("GET", "/v1/tasks?state=SLEEPING", None).unwrap();
    assert_error_shape("unknown state", status, &body, 400);
    let (status, body) = c.request("GET", "/v1/no/such/route", None).unwrap();
    assert_error_shape("unknown route", status, &body, 404);
    assert_eq!(body["error"]["code"], "not_found", "{body}");
}

// ---------------------------------------------------------------------------------------------
// 11. Metrics.

/// The value of the sample `name` (with its labels exactly as written) in a text exposition.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
}

#[test]
fn metrics_count_tasks_and_agents_and_time_store_writes_and_placement() {
    privileged_or_skip!("metrics_count_tasks_and_agents_and_time_store_writes_and_placement");
    let c = DevCluster::start();
    c.create_job(&http_service(JOB, 2));
    c.wait_running(JOB, 2, SOON);
    let m = c.metrics();
    let running = c.get("/v1/tasks?state=RUNNING").as_array().unwrap().len() as f64;
    assert_eq!(running, 2.0);
    assert_eq!(sample(&m, "capstan_tasks{state=\"RUNNING\"}"), Some(running), "{m}");
    assert_eq!(sample(&m, "capstan_agents"), Some(1.0), "{m}");
    assert!(m.contains("# TYPE capstan_store_write_seconds histogram"), "{m}");
    assert!(sample(&m, "capstan_store_write_seconds_count").is_some_and(|n| n > 0.0), "{m}");
    assert!(m.contains("capstan_store_write_seconds_bucket{le="), "{m}");
    assert!(m.contains("# TYPE capstan_placement_latency_seconds histogram"), "{m}");
    assert!(sample(&m, "capstan_placement_latency_seconds_count").is_some_and(|n| n >= 2.0), "{m}");
}

// ---------------------------------------------------------------------------------------------
// 12. Unplaceable work waits and says why.

#[test]
fn a_job_asking_for_more_cpus_than_the_agent_has_stays_pending_with_a_reason() {
    privileged_or_skip!("a_job_asking_for_more_cpus_than_the_agent_has_stays_pending_with_a_reason");
    let c = DevCluster::start();
    let key = "big/prod/hog";
    let mut spec = job_spec(key, "service", 1, "sleep 600");
    spec["task"]["cpus"] = json!(4096);
    let ids = c.create_job(&spec);
    let job = wait_until(SOON, "the job has a pending reason about cpus", || match c.job(key)? {
        Some(j)
            if j["pending_reasons"].as_array().is_some_and(|r| r.iter().any(|s| s.to_string().contains("cpus"))) =>
        {
            Ok(j)
        }
        other => Err(format!("{other:?}")),
    });
    assert_eq!(job["tasks"]["PENDING"], 1, "{job}");
    holds_for(Duration::from_secs(1), "the task stays PENDING", || {
        let t = c.task(&ids[0])?.ok_or("404")?;
        ensure(t["state"] == "PENDING", &t)
    });
}

// ---------------------------------------------------------------------------------------------
// More restarts, privacy of the data directory, and the harness itself.

#[test]
fn a_task_whose_supervisor_also_died_while_the_dev_process_was_down_is_replaced() {
    privileged_or_skip!("a_task_whose_supervisor_also_died_while_the_dev_process_was_down_is_replaced");
    let mut c = DevCluster::start();
    c.create_job(&http_service(JOB, 1));
    let t = c.wait_running(JOB, 1, SOON).remove(0);
    let (id, pid) = (task_id(&t), task_pid(&t));
    let (supervisor, _) = read_identity(&c.sandbox(&id).join("supervisor.json")).expect("supervisor.json");

    c.kill9();
    sigkill(supervisor);
    sigkill(pid);
    wait_until(SOON, "supervisor and task are gone", || {
        ensure(!pid_alive(supervisor) && !pid_alive(pid), (pid_alive(supervisor), pid_alive(pid)))
    });
    c.start_again();

    let ended = wait_until(SOON, "the master learns the task ended", || match c.task(&id)? {
        Some(t) if is_terminal(&t) => Ok(t),
        other => Err(format!("{other:?}")),
    });
    assert!(matches!(ended["state"].as_str(), Some("FAILED" | "LOST")), "{ended}");
    let fresh = wait_replacement(&c, JOB, 0, &id, SOON);
    wait_http_ok(task_port(&fresh, "http"));
}

/// A batch task (no retries) that lists its sandbox by path and writes `out` there; its id and
/// the task as it ended.
fn run_sandbox_probe(c: &DevCluster) -> (Vec<String>, Value) {
    let mut spec = job_spec(
        "batch/test/sandbox",
        "batch",
        1,
        r#"ls "$CAPSTAN_SANDBOX" >/dev/null && echo ok > "$CAPSTAN_SANDBOX/out""#,
    );
    spec["max_failures"] = json!(0);
    let ids = c.create_job(&spec);
    let t = wait_until(SOON, "the task ended", || match c.task(&ids[0])? {
        Some(t) if is_terminal(&t) => Ok(t),
        other => Err(format!("{other:?}")),
    });
    (ids, t)
}

#[test]
fn a_sandbox_the_task_user_cannot_reach_fails_the_launch_with_the_reason() {
    privileged_or_skip!("a_sandbox_the_task_user_cannot_reach_fails_the_launch_with_the_reason");
    // Tasks run as nobody and are told their sandbox by absolute path (CAPSTAN_SANDBOX). Under a
    // private (0700) directory they could start (the supervisor enters the sandbox as root) but not
    // use their own path — e.g. `python3 -m http.server` would answer 404 to everything. The launch
    // is refused instead, with a reason that names the directory in the way.
    let c = DevCluster::start_with_private_parent(true);
    let (_, t) = run_sandbox_probe(&c);
    assert_eq!(t["state"], "FAILED", "{t}");
    let reason = t["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("cannot reach its sandbox") && reason.contains("mode 700"), "{reason}");
}

#[test]
fn the_task_user_can_use_its_sandbox_by_path() {
    privileged_or_skip!("the_task_user_can_use_its_sandbox_by_path");
    let c = DevCluster::start_with_private_parent(false);
    let (ids, t) = run_sandbox_probe(&c);
    let stderr = std::fs::read_to_string(c.log_file(&ids[0], "stderr")).unwrap_or_default();
    assert_eq!(t["state"], "FINISHED", "the task could not use $CAPSTAN_SANDBOX: {t}\nits stderr: {stderr}");
}

#[test]
fn dropping_a_cluster_leaves_no_process_and_no_cgroup_behind() {
    privileged_or_skip!("dropping_a_cluster_leaves_no_process_and_no_cgroup_behind");
    let c = DevCluster::start();
    // A background child that is neither the supervisor nor the recorded task process.
    c.create_job(&job_spec(JOB, "service", 2, "sleep 600 & exec sleep 601"));
    let tasks = c.wait_running(JOB, 2, SOON);
    let mut pids: Vec<u32> = vec![];
    for t in &tasks {
        let id = task_id(t);
        pids.push(task_pid(t));
        pids.push(read_identity(&c.sandbox(&id).join("supervisor.json")).expect("supervisor.json").0);
        let cgroup = task_cgroups(&c.cgroup_root, &id).into_iter().find(|d| d.join("cgroup.procs").is_file());
        let procs = std::fs::read_to_string(cgroup.expect("a task cgroup").join("cgroup.procs")).unwrap();
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    pids.sort();
    pids.dedup();
    assert!(pids.len() >= 6, "supervisor, task and its child per instance: {pids:?}");
    let root = c.cgroup_root.clone();
    let data = c.data_dir.clone();
    drop(c);
    let alive: Vec<u32> = pids.iter().copied().filter(|p| pid_alive(*p)).collect();
    assert!(alive.is_empty(), "still alive after drop: {alive:?}");
    assert!(cgroup_dirs(&root).is_empty(), "cgroups left: {:?}", cgroup_dirs(&root));
    assert!(!data.exists(), "{} is left", data.display());
}

#[test]
fn a_job_killed_just_before_the_dev_process_dies_is_still_killed_after_restart() {
    privileged_or_skip!("a_job_killed_just_before_the_dev_process_dies_is_still_killed_after_restart");
    let mut c = DevCluster::start();
    c.create_job(&job_spec(JOB, "service", 2, "exec sleep 600"));
    let tasks = c.wait_running(JOB, 2, SOON);
    let (status, body) = c.request("DELETE", &format!("/v1/jobs/{JOB}"), None).unwrap();
    assert_eq!(status, 200, "{body}");
    c.restart();
    wait_until(SOON, "the job is gone after the restart", || {
        let left = c.tasks_of(JOB)?;
        ensure(c.job(JOB)?.is_none() && left.is_empty(), summary(&left))
    });
    wait_until(SOON, "its processes are gone", || {
        let alive: Vec<u32> = tasks.iter().map(task_pid).filter(|p| pid_alive(*p)).collect();
        ensure(alive.is_empty(), alive)
    });
}
