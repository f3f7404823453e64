//! End-to-end tests of the issue "An agent that never loses a task": a `capstan master` and a
//! `capstan agent` as two real processes (`Cluster::start_split`), each killed with SIGKILL and
//! started again on its data directory while real tasks run and change state; health checks,
//! graceful and forced kills, the disk quota, cpu usage and throttling, a damaged checkpoint, and
//! logs.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

macro_rules! privileged_or_skip {
    ($name:expr) => {
        if !privileged($name) {
            return;
        }
    };
}

fn reason(t: &Value) -> &str {
    t["reason"].as_str().unwrap_or("")
}

fn states_of_events(t: &Value) -> Vec<String> {
    t["events"]
        .as_array()
        .map(|e| e.iter().filter_map(|e| e["state"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// `(task id, pid, start time)` of running tasks.
fn identities(tasks: &[Value]) -> Vec<(String, u32, u64)> {
    tasks
        .iter()
        .map(|t| {
            let pid = task_pid(t);
            (task_id(t), pid, proc_stat(pid).unwrap_or_else(|| panic!("task process {pid} is not alive")).1)
        })
        .collect()
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
        .unwrap_or_else(|e| panic!("cannot send {sig} to {pid}: {e}"));
}

fn parse_time(at: &Value) -> SystemTime {
    let s = at.as_str().unwrap_or_else(|| panic!("not a timestamp: {at}"));
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
}

/// The time of the task's first event in `state`.
fn event_time(t: &Value, state: &str) -> SystemTime {
    let e = t["events"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["state"] == state))
        .unwrap_or_else(|| panic!("task has no {state} event: {t}"));
    parse_time(&e["at"])
}

/// Sandboxes of the cluster's agent that hold an `exit.json` (the supervisor recorded the end).
fn exits_recorded(c: &Cluster) -> usize {
    std::fs::read_dir(c.sandboxes())
        .map(|d| d.flatten().filter(|e| e.path().join("exit.json").is_file()).count())
        .unwrap_or(0)
}

/// Every process that belongs to these tasks: task process, supervisor, and whatever is in their
/// cgroups.
fn processes_of(c: &Cluster, tasks: &[Value]) -> Vec<u32> {
    let mut pids = vec![];
    for t in tasks {
        let id = task_id(t);
        pids.push(task_pid(t));
        if let Some((sup, _)) = read_identity(&c.sandbox(&id).join("supervisor.json")) {
            pids.push(sup);
        }
        pids.extend(task_cgroup_pids(&c.cgroup_root, &id));
    }
    pids.sort();
    pids.dedup();
    pids
}

fn wait_all_gone(pids: &[u32]) {
    wait_until(SOON, "every process of the tasks is gone", || {
        let alive: Vec<u32> = pids.iter().copied().filter(|p| pid_alive(*p)).collect();
        ensure(alive.is_empty(), alive)
    });
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 of the agent while 5 tasks run; one exits (code 7) while the agent is down.

#[test]
fn agent_kill_9_keeps_its_tasks_and_reports_the_one_that_exited_while_it_was_down() {
    privileged_or_skip!("agent_kill_9_keeps_its_tasks_and_reports_the_one_that_exited_while_it_was_down");
    let mut c = Cluster::start_split();
    let key = "www/prod/five";
    // SIGUSR1 makes the task exit with code 7.
    c.create_job(&job_spec(key, "service", 5, "trap 'exit 7' USR1; sleep 600 & wait"));
    let before = c.wait_running(key, 5, SOON);
    let ids = identities(&before);
    let recorder = c.record_states(key);

    c.kill9_agent();
    let (victim, victim_pid, _) = ids[2].clone();
    let victim_instance = before[2]["instance"].as_u64().unwrap();
    signal(victim_pid, nix::sys::signal::Signal::SIGUSR1);
    let exit = c.sandbox(&victim).join("exit.json");
    wait_until(SOON, "the victim's supervisor recorded its exit", || ensure(exit.is_file(), exit.display()));
    let record: Value = serde_json::from_slice(&std::fs::read(&exit).unwrap()).expect("exit.json is JSON");
    assert_eq!(record["exit"], json!({"kind": "exited", "code": 7}), "exit.json records code 7: {record}");
    // While the agent is down the master does not act on any of them.
    holds_for(Duration::from_millis(500), "the master still shows the 5 tasks RUNNING", || {
        let now = c.tasks_of(key)?;
        ensure(now.len() == 5 && now.iter().all(|t| t["state"] == "RUNNING"), summary(&now))
    });

    c.start_agent(&[]);
    let ended = c.wait_task_state(&victim, "FAILED", SOON);
    assert!(reason(&ended).contains("exited with code 7"), "reason of the task that exited: {ended}");
    let fresh = c.wait_replacement(key, victim_instance, &victim, SOON);
    assert_ne!(task_pid(&fresh), victim_pid);
    c.wait_running(key, 5, SOON);

    holds_for(Duration::from_secs(1), "the 4 others are the same processes, RUNNING", || {
        let now = c.tasks_of(key)?;
        for (id, pid, ticks) in ids.iter().filter(|(id, ..)| *id != victim) {
            let t = now.iter().find(|t| t["id"] == id.as_str()).ok_or(format!("task {id} is gone"))?;
            ensure(t["state"] == "RUNNING" && t["pid"] == *pid, format!("task {id}: {}", summary(&now)))?;
            ensure(proc_stat(*pid).is_some_and(|s| s.1 == *ticks), format!("process {pid} of {id} was replaced"))?;
        }
        ensure(now.len() == 6, format!("exactly one new task: {}", summary(&now)))
    });

    let seen = recorder.stop();
    assert!(seen.polls > 20, "the recorder polled throughout: {seen:?}");
    assert!(seen.tasks_seen_in("LOST").is_empty(), "the master showed a task LOST: {:?}", seen.states);
    for (id, ..) in &ids {
        let states = &seen.states[id];
        let want: &[&str] = if *id == victim { &["RUNNING", "FAILED"] } else { &["RUNNING"] };
        assert_eq!(states, want, "states the master showed for {id}: {:?}", seen.states);
        let t = c.task(id).unwrap().expect("the task is still known");
        assert!(!states_of_events(&t).iter().any(|s| s == "LOST"), "events of {id}: {t}");
    }
}

/// What `Containerizer::launch` of an agent of the *previous* sandbox layout (the sandbox owned
/// by the task's user, 0750, no `logs/` or `work/`) leaves when the agent dies after writing
/// `launch.json` (and the supervisor's config and log) but before the supervisor recorded itself:
/// a copy of `template` (an earlier task's sandbox) for task `id` of `job`. The restarted agent
/// of this version lays the sandbox out anew before it runs the task (see `relaunch`).
fn fabricate_interrupted_launch(template: &Path, sandbox: &Path, id: &str, job: &str, command: &str) {
    let mut launch: Value = serde_json::from_slice(&std::fs::read(template.join("launch.json")).unwrap()).unwrap();
    launch["task_id"] = json!(id);
    launch["command"] = json!(command);
    for kv in launch["env"].as_array_mut().expect("env pairs") {
        let value = match kv[0].as_str() {
            Some("CAPSTAN_TASK_ID") => json!(id),
            Some("CAPSTAN_JOB") => json!(job),
            Some("CAPSTAN_INSTANCE") => json!("0"),
            Some("CAPSTAN_SANDBOX") => json!(sandbox.display().to_string()),
            _ => continue,
        };
        kv[1] = value;
    }
    std::fs::create_dir_all(sandbox).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("user nobody");
    nix::unistd::chown(sandbox, Some(nobody.uid), Some(nobody.gid)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(sandbox, std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::write(sandbox.join("launch.json"), serde_json::to_vec_pretty(&launch).unwrap()).unwrap();
    for f in std::fs::read_dir(template).unwrap().flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        if name.starts_with("supervisor") && name.ends_with(".json") && name != "supervisor.json" {
            std::fs::copy(f.path(), sandbox.join(&name)).unwrap();
        }
    }
    std::fs::write(sandbox.join("supervisor.log"), "").unwrap();
}

#[test]
fn a_launch_interrupted_by_an_agent_crash_runs_the_task_once_after_restart() {
    privileged_or_skip!("a_launch_interrupted_by_an_agent_crash_runs_the_task_once_after_restart");
    // The crash window of `Containerizer::launch`: launch.json written, supervisor not started (or
    // not yet recorded). Nothing ran, so the task must run after the restart — not end FAILED
    // "supervisor lost" and count as a failure of its instance. (Seen at random in the batch tests
    // below; made deterministic here by writing the sandbox as launch leaves it.)
    let mut c = Cluster::start_split();
    let warmup = c.create_job(&job_spec("batch/test/warmup", "batch", 1, "exit 0"));
    c.wait_task_state(&warmup[0], "FINISHED", SOON);

    c.kill9_agent();
    let key = "batch/test/interrupted";
    let command = "echo ran >> \"$CAPSTAN_SANDBOX/ran\"; exit 0";
    let mut spec = job_spec(key, "batch", 1, command);
    spec["max_failures"] = json!(0);
    let id = c.create_job(&spec).remove(0);
    wait_until(SOON, "the master placed the task on the (dead) agent", || match c.task(&id)? {
        Some(t) if t["agent_id"].is_string() => Ok(()),
        other => Err(format!("{other:?}")),
    });
    fabricate_interrupted_launch(&c.sandbox(&warmup[0]), &c.sandbox(&id), &id, key, command);
    c.start_agent(&[]);

    let t = wait_until(SOON, "the task ended", || match c.task(&id)? {
        Some(t) if is_terminal(&t) => Ok(t),
        other => Err(format!("{other:?}")),
    });
    assert_eq!(t["state"], "FINISHED", "an interrupted launch is not a failure of the task: {t}");
    let tasks = c.tasks_of(key).unwrap();
    assert_eq!(tasks.len(), 1, "no retry: {}", summary(&tasks));
    let ran = std::fs::read_to_string(c.work(&id).join("ran")).unwrap_or_default();
    assert_eq!(ran, "ran\n", "the command ran exactly once");
}

// ---------------------------------------------------------------------------------------------
// 2. A restart of the master, or of the agent, while a batch job's tasks finish.

#[derive(Clone, Copy, Debug)]
enum Victim {
    Master,
    Agent,
}

fn staggered_batch_survives_a_kill_9_of(victim: Victim) {
    const N: usize = 40;
    let mut c = Cluster::start_split();
    let key = "batch/test/staggered";
    // Instance i sleeps 0.15 × i seconds: they finish one by one over about 6 s.
    let mut spec = job_spec(
        key,
        "batch",
        N as u32,
        "sleep $(printf '%d.%02d' $((CAPSTAN_INSTANCE * 15 / 100)) $((CAPSTAN_INSTANCE * 15 % 100))); exit 0",
    );
    spec["task"]["cpus"] = json!(0.01);
    spec["task"]["mem"] = json!("16MiB");
    spec["task"]["disk"] = json!("1MiB");
    spec["max_failures"] = json!(3);
    let recorder = c.record_states(key);
    c.create_job(&spec);

    let finished_before = wait_until(SOON, "a few instances finished", || {
        let tasks = c.tasks_of(key)?;
        let n = tasks.iter().filter(|t| t["state"] == "FINISHED").count();
        if n >= 3 {
            Ok(n)
        } else {
            Err(summary(&tasks))
        }
    });
    match victim {
        Victim::Master => c.kill9_master(),
        Victim::Agent => c.kill9_agent(),
    }
    let exits_at_kill = exits_recorded(&c);
    assert!(exits_at_kill < N, "every task already ended when the {victim:?} was killed: the test proves nothing");
    // Let more tasks end while it is down, so that there is something to catch up on.
    wait_until(SOON, "more tasks end while it is down", || {
        let n = exits_recorded(&c);
        ensure(n >= exits_at_kill + 3, format!("{n} exits recorded, {exits_at_kill} at the kill"))
    });
    match victim {
        Victim::Master => c.start_master(),
        Victim::Agent => c.start_agent(&[]),
    }

    let tasks = wait_until(Duration::from_secs(30), "every instance FINISHED", || {
        let tasks = c.tasks_of(key)?;
        let finished = tasks.iter().filter(|t| t["state"] == "FINISHED").count();
        ensure(finished >= N, summary(&tasks))?;
        Ok(tasks)
    });
    let seen = recorder.stop();

    let mut per_instance: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for t in &tasks {
        per_instance.entry(t["instance"].as_u64().expect("instance")).or_default().push(t);
    }
    assert_eq!(per_instance.len(), N, "every instance has tasks: {}", summary(&tasks));
    for (instance, ts) in &per_instance {
        assert_eq!(ts.len(), 1, "instance {instance}: exactly one task (no retry, no duplicate): {}", summary(&tasks));
        let t = ts[0];
        assert_eq!(t["state"], "FINISHED", "instance {instance}: {t}");
        let finished_events = states_of_events(t).iter().filter(|s| *s == "FINISHED").count();
        assert_eq!(finished_events, 1, "instance {instance}: exactly one FINISHED event: {}", t["events"]);
    }
    for bad in ["LOST", "FAILED", "KILLED"] {
        assert!(seen.tasks_seen_in(bad).is_empty(), "the master showed a task {bad}: {:?}", seen.states);
    }
    let job = wait_until(SOON, "the job is finished", || match c.job(key)? {
        Some(j) if j["status"] == "finished" => Ok(j),
        other => Err(format!("{other:?}")),
    });
    assert_eq!(job["tasks"]["FINISHED"], N as u64, "{job}");
    let duplicates = c.metric("capstan_duplicate_status_updates");
    let illegal = c.metric("capstan_illegal_transitions");
    eprintln!(
        "{victim:?} killed after {finished_before} FINISHED ({exits_at_kill} exits recorded); \
         duplicate status updates: {duplicates:?}"
    );
    assert!(duplicates.is_some(), "/metrics has capstan_duplicate_status_updates:\n{}", c.metrics());
    assert_eq!(illegal, Some(0.0), "capstan_illegal_transitions:\n{}", c.metrics());
}

#[test]
fn a_batch_job_finishes_exactly_once_per_instance_across_a_kill_9_of_the_master() {
    privileged_or_skip!("a_batch_job_finishes_exactly_once_per_instance_across_a_kill_9_of_the_master");
    staggered_batch_survives_a_kill_9_of(Victim::Master);
}

#[test]
fn a_batch_job_finishes_exactly_once_per_instance_across_a_kill_9_of_the_agent() {
    privileged_or_skip!("a_batch_job_finishes_exactly_once_per_instance_across_a_kill_9_of_the_agent");
    staggered_batch_survives_a_kill_9_of(Victim::Agent);
}

// ---------------------------------------------------------------------------------------------
// 3. HTTP health check.

/// Answers 200 on every path until `$CAPSTAN_SANDBOX/fail` exists, then 500.
const CHECKED_SERVER: &str = r#"
import http.server, os
FAIL = os.path.join(os.environ["CAPSTAN_SANDBOX"], "fail")
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 500 if os.path.exists(FAIL) else 200
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"failing\n" if code == 500 else b"ok\n")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT_HTTP"])), Handler).serve_forever()
"#;

#[test]
fn a_task_failing_its_http_health_check_is_killed_with_the_reason_and_replaced() {
    privileged_or_skip!("a_task_failing_its_http_health_check_is_killed_with_the_reason_and_replaced");
    let c = Cluster::start_split();
    let key = "www/prod/checked";
    // In the job itself: a file of the test's directory (under /tmp) is out of the task's reach,
    // as its /tmp is its own.
    // A whole cpu: with grace_period = "0s" the server must answer within 2 checks (about 200 ms)
    // of its start, and python3 needs about 80 ms of cpu to get there (at 0.05 cpus: 1.6 s).
    let job = c.write_file(
        "checked.toml",
        &format!(
            r#"
job = "{key}"
type = "service"
instances = 1

[task]
command = 'exec python3 -c "$SERVER_PY"'
user = "nobody"
cpus = 1
mem = "64MiB"
disk = "32MiB"
ports = ["http"]
kill_grace = "1s"

[task.env]
SERVER_PY = '''{CHECKED_SERVER}'''

[health_check]
type = "http"
port = "http"
path = "/health"
interval = "1s"
timeout = "500ms"
grace_period = "0s"
consecutive_failures = 2
"#
        ),
    );
    c.capstan_ok(&["job", "create", job.to_str().unwrap()]);

    let healthy = wait_until(SOON, "the task is RUNNING and healthy", || {
        let tasks = c.tasks_of(key)?;
        tasks.iter().find(|t| t["state"] == "RUNNING" && t["health"] == "healthy").cloned().ok_or_else(|| {
            tasks
                .iter()
                .map(|t| format!("{} {} health={} ({})", t["id"], t["state"], t["health"], t["reason"]))
                .collect()
        })
    });
    let id = task_id(&healthy);
    let port = task_port(&healthy, "http");
    let listed = c.capstan_ok(&["task", "list", "--job", key]);
    assert!(listed.lines().any(|l| l.contains(&id) && l.contains("healthy")), "task list shows it healthy:\n{listed}");

    std::fs::write(c.work(&id).join("fail"), "").expect("creating the fail file");
    let failed = c.wait_task_state(&id, "FAILED", SOON);
    let why = reason(&failed);
    assert!(why.contains("failed health check"), "reason: {why:?} ({failed})");
    assert!(why.contains("/health"), "the reason names the path: {why:?}");
    assert!(why.contains("500"), "the reason names the status: {why:?}");
    assert!(why.contains(&port.to_string()), "the reason names the port: {why:?}");
    wait_until(SOON, "the failed task's process is gone", || ensure(!pid_alive(task_pid(&healthy)), &healthy["pid"]));

    let fresh = c.wait_replacement(key, 0, &id, SOON);
    let fresh_id = task_id(&fresh);
    wait_until(SOON, "the replacement is healthy", || match c.task(&fresh_id)? {
        Some(t) if t["state"] == "RUNNING" && t["health"] == "healthy" => Ok(()),
        other => Err(format!("{other:?}")),
    });
}

// ---------------------------------------------------------------------------------------------
// 4. Kills: forked children, and a task that ignores SIGTERM.

#[test]
fn killing_a_task_that_forked_children_leaves_no_process_behind() {
    privileged_or_skip!("killing_a_task_that_forked_children_leaves_no_process_behind");
    let c = Cluster::start_split();
    let key = "www/prod/forks";
    c.create_job(&job_spec(key, "service", 1, "sleep 600 & sleep 601 & sleep 602 & wait"));
    let t = c.wait_running(key, 1, SOON).remove(0);
    let id = task_id(&t);
    // The shell and its three children are in the task's cgroup.
    let in_cgroup = wait_until(SOON, "the shell and its 3 children are in the task's cgroup", || {
        let pids = task_cgroup_pids(&c.cgroup_root, &id);
        ensure(pids.len() >= 4, &pids)?;
        Ok(pids)
    });
    let mut pids = processes_of(&c, std::slice::from_ref(&t));
    pids.extend(&in_cgroup);
    pids.sort();
    pids.dedup();

    let out = c.capstan_ok(&["task", "kill", &id]);
    assert!(out.contains(&id), "{out}");
    let ended = c.wait_task_state(&id, "KILLED", SOON);
    assert!(reason(&ended).starts_with("killed: "), "{ended}");
    wait_all_gone(&pids);
    wait_until(SOON, "the task's cgroups are removed", || {
        let left = task_cgroups(&c.cgroup_root, &id);
        ensure(left.is_empty(), left)
    });
}

#[test]
fn a_task_that_ignores_sigterm_is_sigkilled_after_its_kill_grace() {
    privileged_or_skip!("a_task_that_ignores_sigterm_is_sigkilled_after_its_kill_grace");
    let c = Cluster::start_split();
    let key = "www/prod/stubborn";
    let mut spec = job_spec(key, "service", 1, "trap '' TERM; sleep 600");
    spec["task"]["kill_grace"] = json!("1s");
    c.create_job(&spec);
    let t = c.wait_running(key, 1, SOON).remove(0);
    let id = task_id(&t);
    let pids = wait_until(SOON, "the shell and sleep are in the task's cgroup", || {
        let pids = task_cgroup_pids(&c.cgroup_root, &id);
        ensure(pids.len() >= 2, &pids)?;
        Ok(pids)
    });

    let start = Instant::now();
    c.capstan_ok(&["task", "kill", &id]);
    let ended = c.wait_task_state(&id, "KILLED", SOON);
    let took = start.elapsed();
    assert!(reason(&ended).starts_with("killed: "), "{ended}");
    assert!(took >= Duration::from_secs(1), "KILLED after {took:?}, before the 1 s grace passed: {ended}");
    assert!(took < Duration::from_secs(5), "KILLED only after {took:?}: {ended}");
    wait_all_gone(&pids);
}

// ---------------------------------------------------------------------------------------------
// 5. Disk quota.

#[test]
fn a_task_writing_past_its_disk_quota_fails_over_disk_quota() {
    privileged_or_skip!("a_task_writing_past_its_disk_quota_fails_over_disk_quota");
    let c = Cluster::start_split_with(&["--usage-interval", "200ms"]);
    let key = "batch/test/disk";
    let mut spec = job_spec(key, "batch", 1, "dd if=/dev/zero of=big bs=1M count=50; sleep 600");
    spec["task"]["disk"] = json!("10MiB");
    spec["task"]["mem"] = json!("128MiB");
    spec["task"]["kill_grace"] = json!("1s");
    spec["max_failures"] = json!(0);
    let ids = c.create_job(&spec);
    let running = c.wait_task_state(&ids[0], "RUNNING", SOON);
    let t = c.wait_task_state(&ids[0], "FAILED", SOON);
    let why = reason(&t);
    assert!(why.contains("over disk quota"), "reason: {why:?} ({t})");
    assert!(why.contains("10MiB"), "the reason names the limit: {why:?}");
    if let Some(pid) = running["pid"].as_u64() {
        wait_until(SOON, "its process is gone", || ensure(!pid_alive(pid as u32), pid));
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Cpu usage and throttling.

#[test]
fn a_busy_task_is_throttled_to_its_cpus_and_its_usage_is_reported() {
    privileged_or_skip!("a_busy_task_is_throttled_to_its_cpus_and_its_usage_is_reported");
    let c = Cluster::start_split_with(&["--usage-interval", "200ms"]);
    let key = "www/prod/busy";
    let mut spec = job_spec(key, "service", 1, "while :; do :; done");
    spec["task"]["cpus"] = json!(0.2);
    c.create_job(&spec);
    let t = c.wait_running(key, 1, SOON).remove(0);
    let id = task_id(&t);
    let started = event_time(&t, "RUNNING");

    let (t, elapsed) = wait_until(SOON, "usage measured 4 s after the task started", || {
        let t = c.task(&id)?.ok_or("404")?;
        let u = &t["usage"];
        if !u.is_object() {
            return Err(format!("no usage yet: {t}"));
        }
        let elapsed = parse_time(&u["at"]).duration_since(started).unwrap_or_default();
        ensure(elapsed >= Duration::from_secs(4), u)?;
        Ok((t, elapsed))
    });
    let u = &t["usage"];
    let cpu = u["cpu_seconds"].as_f64().expect("cpu_seconds");
    let share = cpu / elapsed.as_secs_f64();
    assert!((0.1..=0.3).contains(&share), "cpu {cpu} s over {elapsed:?} = {share:.3} cpus, limit 0.2: {u}");
    assert!(u["throttled_seconds"].as_f64().is_some_and(|s| s > 0.0), "throttled_seconds: {u}");
    assert!(u["nr_throttled"].as_u64().is_some_and(|n| n > 0), "nr_throttled: {u}");

    let status = c.capstan_ok(&["task", "status", &id]);
    let line = status.lines().find(|l| l.starts_with("usage")).unwrap_or_else(|| panic!("no usage line:\n{status}"));
    assert!(line.contains("cpu") && line.contains("throttled"), "usage line: {line:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. A damaged checkpoint.

/// Kills the agent of a cluster running 2 tasks, damages a file with `damage`, and checks that the
/// agent refuses to start naming `file`, then starts with `--recover=cleanup` and kills the tasks.
/// Returns the tasks and their processes.
fn damaged_checkpoint(
    c: &mut Cluster,
    key: &str,
    file: &std::path::Path,
    damage: impl FnOnce(&std::path::Path),
) -> Vec<Value> {
    c.create_job(&job_spec(key, "service", 2, "sleep 600 & exec sleep 601"));
    let tasks = c.wait_running(key, 2, SOON);
    let pids = processes_of(c, &tasks);
    assert!(pids.len() >= 4, "supervisor and task processes: {pids:?}");

    c.kill9_agent();
    damage(file);
    let refused = c.agent_fails_to_start(&[]);
    assert!(refused.status.is_some_and(|s| !s.success()), "the agent must exit non-zero: {refused:?}");
    assert!(
        refused.stderr.contains(&file.display().to_string()),
        "its standard error names {}:\n{}",
        file.display(),
        refused.stderr
    );
    assert!(refused.stderr.contains("--recover=cleanup"), "it says how to start anyway:\n{}", refused.stderr);
    // Refusing changed nothing: the tasks still run.
    assert!(pids.iter().all(|p| pid_alive(*p)), "a refused start must not touch the tasks: {pids:?}");

    c.start_agent(&["--recover=cleanup"]);
    wait_all_gone(&pids);
    for t in &tasks {
        let id = task_id(t);
        wait_until(SOON, "the task's cgroups are removed", || {
            let left = task_cgroups(&c.cgroup_root, &id);
            ensure(left.is_empty(), left)
        });
    }
    let aside: Vec<_> = std::fs::read_dir(c.agent_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("sandboxes.cleanup-"))
        .collect();
    assert_eq!(aside.len(), 1, "the old sandboxes are moved aside to DATA/sandboxes.cleanup-*");
    tasks
}

#[test]
fn a_garbage_agent_json_stops_the_agent_until_recover_cleanup() {
    privileged_or_skip!("a_garbage_agent_json_stops_the_agent_until_recover_cleanup");
    let mut c = Cluster::start_split();
    let file = c.agent_dir().join("agent.json");
    damaged_checkpoint(&mut c, "www/prod/garbage", &file, |f| {
        std::fs::write(f, b"\x00\x01garbage{{{not json").expect("writing garbage");
    });
}

/// The records of an update log: `(offset, len)` of each, after the 8-byte magic.
fn log_records(bytes: &[u8]) -> Vec<(usize, usize)> {
    assert_eq!(&bytes[..8], b"CAPSTUPD", "the update log starts with its magic");
    let mut out = vec![];
    let mut pos = 8;
    while pos + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        if len == 0 || pos + 8 + len > bytes.len() {
            break;
        }
        out.push((pos, len));
        pos += 8 + len;
    }
    out
}

#[test]
fn a_damaged_update_log_record_stops_the_agent_until_recover_cleanup() {
    privileged_or_skip!("a_damaged_update_log_record_stops_the_agent_until_recover_cleanup");
    let mut c = Cluster::start_split();
    let key = "www/prod/damaged";
    let file = c.agent_dir().join("updates.log");
    let agent_before = c.get("/v1/agents")[0]["id"].clone();
    let tasks = damaged_checkpoint(&mut c, key, &file, |f| {
        let mut bytes = std::fs::read(f).expect("the update log exists");
        let records = log_records(&bytes);
        assert!(records.len() >= 2, "the log holds several records: {records:?}");
        // One byte in the body of the first record (followed by the others): not a torn tail.
        let (offset, len) = records[0];
        let i = offset + 8 + len / 2;
        bytes[i] ^= 0x55;
        std::fs::write(f, &bytes).expect("writing the damaged log");
    });
    // Same identity (agent.json was fine): the master learns that the agent no longer has the
    // tasks, marks them LOST and replaces them.
    let agents = c.get("/v1/agents");
    assert!(agents.as_array().unwrap().iter().any(|a| a["id"] == agent_before), "the agent kept its id: {agents}");
    for t in &tasks {
        let id = task_id(t);
        let lost = c.wait_task_state(&id, "LOST", SOON);
        assert!(!reason(&lost).is_empty(), "{lost}");
    }
    let now = c.wait_running(key, 2, SOON);
    assert!(now.iter().all(|n| tasks.iter().all(|t| t["id"] != n["id"])), "fresh tasks: {}", summary(&now));
}

// ---------------------------------------------------------------------------------------------
// 8. Logs.

#[test]
fn task_logs_tail_follow_and_after_the_end() {
    privileged_or_skip!("task_logs_tail_follow_and_after_the_end");
    let c = Cluster::start_split();

    // --tail of an ended task.
    let ids = c.create_job(&job_spec("batch/test/ten", "batch", 1, "for i in $(seq 1 10); do echo \"line $i\"; done"));
    c.wait_task_state(&ids[0], "FINISHED", SOON);
    let tail = c.capstan_ok(&["task", "logs", &ids[0], "--tail", "3"]);
    assert_eq!(tail, "line 8\nline 9\nline 10\n", "--tail 3");
    let all = c.capstan_ok(&["task", "logs", &ids[0]]);
    let want: String = (1..=10).map(|i| format!("line {i}\n")).collect();
    assert_eq!(all, want, "the whole log of an ended task");

    // --follow of a running task streams lines as they are written.
    let key = "www/prod/ticker";
    c.create_job(&job_spec(key, "service", 1, "i=0; while :; do i=$((i+1)); echo \"tick $i\"; sleep 0.1; done"));
    let t = c.wait_running(key, 1, SOON).remove(0);
    let id = task_id(&t);
    let stdout = c.log_file(&id, "stdout");
    let ticks_in_file = || std::fs::read_to_string(&stdout).unwrap_or_default().lines().count();
    wait_until(SOON, "the task wrote a few lines", || ensure(ticks_in_file() >= 3, ticks_in_file()));
    let mut follow = Command::new(CAPSTAN)
        .args(["task", "logs", &id, "--follow", "--addr", &c.url])
        .env_remove("CAPSTAN_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("capstan task logs --follow");
    let written_at_start = ticks_in_file();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut got: Vec<String> = vec![];
    let deadline = Instant::now() + SOON;
    let target = written_at_start + 5;
    let newest = |got: &[String]| got.iter().filter_map(|l| l.strip_prefix("tick ")?.parse::<usize>().ok()).max();
    while newest(&got).is_none_or(|n| n < target) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => got.push(line),
            Err(e) => {
                let _ = follow.kill();
                let _ = follow.wait();
                panic!("--follow did not stream tick {target} ({e}); got {got:?}");
            }
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert_eq!(got[0], "tick 1", "--follow starts at the beginning: {got:?}");
    let numbers: Vec<usize> =
        got.iter().map(|l| l.strip_prefix("tick ").and_then(|n| n.parse().ok()).expect("a tick")).collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "lines in order, none lost: {got:?}");

    // After the task ended its log is still served.
    c.capstan_ok(&["task", "kill", &id]);
    c.wait_task_state(&id, "KILLED", SOON);
    let after = c.capstan_ok(&["task", "logs", &id]);
    assert!(after.starts_with("tick 1\n") && after.lines().count() >= target, "log after the end: {after:?}");
    let last3 = c.capstan_ok(&["task", "logs", &id, "--tail", "3"]);
    let lines: Vec<&str> = after.lines().collect();
    assert_eq!(last3, format!("{}\n", lines[lines.len() - 3..].join("\n")), "--tail 3 after the end");
}
