//! Cron jobs and finished batch jobs, end to end with real processes.
//!
//! The every-minute scenarios (`* * * * *`, a command that outlives the minute) wait for real
//! minute boundaries: KILL_EXISTING and CANCEL_NEW run side by side in one test, each on its own
//! cluster, so the pair takes about two minutes of wall time (at most 2m10s). The other tests use
//! the six-field form with seconds to stay short, on masters started with
//! `--cron-interval-min 1s` ([`SECONDS_ALLOWED`]); by default runs must be a minute apart, and a
//! schedule every second is refused (tested below).

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

macro_rules! privileged_or_skip {
    ($name:expr) => {
        if !privileged($name) {
            return;
        }
    };
}

/// The master flags that let the tests' schedules fire seconds apart.
const SECONDS_ALLOWED: [&str; 2] = ["--cron-interval-min", "1s"];

fn cron_job(key: &str, cron: &str, policy: &str, instances: u32, command: &str) -> Value {
    let mut spec = job_spec(key, "cron", instances, command);
    spec["cron"] = json!(cron);
    spec["cron_collision_policy"] = json!(policy);
    spec
}

fn runs(c: &Cluster, key: &str) -> Result<Vec<Value>, String> {
    let job = c.job(key)?.ok_or("no job")?;
    // Oldest first, for reading the tests top-down.
    let mut runs = job["cron"]["runs"].as_array().cloned().ok_or_else(|| format!("no cron runs in {job}"))?;
    runs.reverse();
    Ok(runs)
}

fn run_summary(runs: &[Value]) -> String {
    let lines: Vec<String> = runs
        .iter()
        .map(|r| {
            format!(
                "run {} {} scheduled {} missed {} tasks {} ({})",
                r["number"], r["result"], r["scheduled_at"], r["missed"], r["tasks"], r["reason"]
            )
        })
        .collect();
    format!("[{}]", lines.join("; "))
}

fn ms_of(rfc3339: &Value) -> u64 {
    let t = humantime::parse_rfc3339_weak(rfc3339.as_str().unwrap_or_else(|| panic!("not a time: {rfc3339}")))
        .unwrap_or_else(|e| panic!("{rfc3339}: {e}"));
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Samples, every [`POLL`] on its own thread, which runs of a cron job have live tasks; at most
/// one may at any time.
struct OverlapSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u32, Vec<String>)>,
}

impl OverlapSampler {
    fn start(url: String, key: &str) -> OverlapSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, key) = (stop.clone(), key.to_string());
        let thread = std::thread::spawn(move || {
            let http = reqwest::blocking::Client::new();
            let get = |path: &str| -> Option<Value> { http.get(format!("{url}{path}")).send().ok()?.json().ok() };
            let (mut samples, mut overlaps) = (0, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                // Tasks first, then the job: the job is newer, so it knows the run of every task seen.
                let (Some(Value::Array(tasks)), Some(job)) =
                    (get(&format!("/v1/tasks?job={key}")), get(&format!("/v1/jobs/{key}")))
                else {
                    std::thread::sleep(POLL);
                    continue;
                };
                let run_of: BTreeMap<String, u64> = job["cron"]["runs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|r| {
                        let n = r["number"].as_u64().unwrap_or(0);
                        r["tasks"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(move |t| (t.as_str().unwrap_or("").to_string(), n))
                    })
                    .collect();
                let live_runs: BTreeSet<u64> = tasks
                    .iter()
                    .filter(|t| !is_terminal(t))
                    .map(|t| run_of.get(t["id"].as_str().unwrap_or("")).copied().unwrap_or(0))
                    .collect();
                samples += 1;
                if live_runs.len() > 1 {
                    overlaps.push(format!("runs {live_runs:?} live at once: {}", summary(&tasks)));
                }
                std::thread::sleep(POLL);
            }
            (samples, overlaps)
        });
        OverlapSampler { stop, thread }
    }

    /// Stops sampling; panics if two runs were ever live at once. Returns the number of samples.
    fn finish(self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        let (samples, overlaps) = self.thread.join().expect("the sampler thread");
        assert!(overlaps.is_empty(), "two runs overlapped ({} times): {}", overlaps.len(), overlaps[0]);
        samples
    }
}

/// Time until two minute boundaries have passed, plus a margin for the runs to start.
const TWO_FIRE_TIMES: Duration = Duration::from_secs(135);

fn every_minute_kill_existing() {
    let c = DevCluster::start();
    let key = "ops/test/every-minute-kill";
    let created = c.create_job(&cron_job(key, "* * * * *", "KILL_EXISTING", 2, "exec sleep 600"));
    assert!(created.is_empty(), "a cron job has no tasks before its first fire time");
    let sampler = OverlapSampler::start(c.url.clone(), key);
    // Run 1 at the next minute, then run 2 a minute later kills it first.
    let runs = wait_until(TWO_FIRE_TIMES, "run 2 runs after killing run 1", || {
        let runs = runs(&c, key)?;
        let ok = runs.len() >= 2 && runs[1]["result"] == "RUNNING" && runs[0]["result"] == "KILLED";
        let tasks = c.tasks_of(key)?;
        let running = tasks.iter().filter(|t| t["state"] == "RUNNING").count();
        ensure(ok && running == 2, format!("{} {}", run_summary(&runs), summary(&tasks))).map(|()| runs)
    });
    let samples = sampler.finish();
    assert!(samples > 100, "sampled continuously: {samples} samples");
    let (first, second) = (&runs[0], &runs[1]);
    assert_eq!(ms_of(&second["scheduled_at"]) - ms_of(&first["scheduled_at"]), 60_000, "{}", run_summary(&runs));
    assert_eq!(ms_of(&first["scheduled_at"]) % 60_000, 0, "fire times are on the minute");
    assert!(first["reason"].as_str().unwrap().contains("run 2 of the cron job started (KILL_EXISTING)"), "{first}");
    assert_eq!((first["missed"].clone(), second["missed"].clone()), (json!(0), json!(0)));
    // The first run's tasks were killed, with the reason, before the second run's were created.
    let ended = ms_of(&first["ended_at"]);
    assert!(ms_of(&second["started_at"]) >= ended, "{}", run_summary(&runs));
    for id in first["tasks"].as_array().unwrap() {
        let t = c.task(id.as_str().unwrap()).unwrap().unwrap();
        assert_eq!(t["state"], "KILLED", "{t}");
        assert!(t["reason"].as_str().unwrap().contains("KILL_EXISTING"), "{t}");
    }
    assert!(
        c.events_of("cron_run_killing_previous").iter().any(|m| m.contains(key) && m.contains("run 2")),
        "an event says run 2 killed run 1"
    );
    let status = c.capstan_ok(&["job", "status", key]);
    assert!(status.contains("KILL_EXISTING") && status.contains("KILLED"), "{status}");
}

fn every_minute_cancel_new() {
    let c = DevCluster::start();
    let key = "ops/test/every-minute-cancel";
    c.create_job(&cron_job(key, "* * * * *", "CANCEL_NEW", 1, "exec sleep 600"));
    let sampler = OverlapSampler::start(c.url.clone(), key);
    let runs = wait_until(TWO_FIRE_TIMES, "run 2 is skipped while run 1 runs", || {
        let runs = runs(&c, key)?;
        ensure(runs.len() >= 2 && runs[1]["result"] == "SKIPPED", run_summary(&runs)).map(|()| runs)
    });
    sampler.finish();
    let (first, second) = (&runs[0], &runs[1]);
    assert_eq!(first["result"], "RUNNING", "the running run is left alone: {}", run_summary(&runs));
    assert_eq!(ms_of(&second["scheduled_at"]) - ms_of(&first["scheduled_at"]), 60_000);
    assert!(second["reason"].as_str().unwrap().contains("run 1 is still running (cron_collision_policy = CANCEL_NEW)"));
    assert_eq!(second["tasks"], json!([]), "a skipped run has no tasks");
    let tasks = c.tasks_of(key).unwrap();
    assert_eq!(tasks.len(), 1, "{}", summary(&tasks));
    assert_eq!(tasks[0]["state"], "RUNNING");
    assert!(pid_alive(task_pid(&tasks[0])), "run 1's process still runs");
    // Visible: in the job's status, its history and as an event.
    assert_eq!(c.job(key).unwrap().unwrap()["status"], "running");
    let status = c.capstan_ok(&["job", "status", key]);
    assert!(status.contains("SKIPPED") && status.contains("CANCEL_NEW"), "{status}");
    let skipped = c.events_of("cron_run_skipped");
    assert!(skipped.iter().any(|m| m.contains(key) && m.contains("run 2")), "{skipped:?}");
}

/// Every minute with a command that outlives the minute: KILL_EXISTING kills the running run
/// before the next starts (never two at once), CANCEL_NEW skips the new run and says so. Both run
/// at once on two clusters, so that the pair takes two minutes, not four.
#[test]
fn every_minute_kill_existing_never_overlaps_and_cancel_new_skips_visibly() {
    privileged_or_skip!("every_minute_kill_existing_never_overlaps_and_cancel_new_skips_visibly");
    let started = Instant::now();
    std::thread::scope(|s| {
        let kill = s.spawn(every_minute_kill_existing);
        let cancel = s.spawn(every_minute_cancel_new);
        let (kill, cancel) = (kill.join(), cancel.join());
        if let Err(e) = kill {
            std::panic::resume_unwind(e);
        }
        if let Err(e) = cancel {
            std::panic::resume_unwind(e);
        }
    });
    eprintln!("both every-minute scenarios took {:?}", started.elapsed());
}

#[test]
fn job_start_runs_one_now_under_the_collision_policy() {
    privileged_or_skip!("job_start_runs_one_now_under_the_collision_policy");
    let c = DevCluster::start();
    let key = "ops/test/by-hand";
    // Once a year: nothing runs unless started by hand.
    c.create_job(&cron_job(key, "0 0 1 1 *", "CANCEL_NEW", 1, "sleep 2"));
    let out = c.capstan_ok(&["job", "start", key]);
    assert!(out.contains("run 1 started with 1 task(s)"), "{out}");
    // A second start while run 1 runs is skipped: said, and a non-zero exit.
    let again = c.capstan(&["job", "start", key]);
    assert!(!again.status.success(), "{}", text(&again.stdout));
    assert!(
        text(&again.stderr).contains("run 2 of ops/test/by-hand was skipped: run 1 is still running"),
        "{}",
        text(&again.stderr)
    );
    let runs = wait_until(SOON, "run 1 succeeded", || {
        let runs = runs(&c, key)?;
        ensure(runs.first().is_some_and(|r| r["result"] == "SUCCEEDED"), run_summary(&runs)).map(|()| runs)
    });
    assert_eq!(runs[0]["by"], "started by hand (capstan job start)");
    assert!(runs[0]["scheduled_at"].is_null());
    assert!(runs[0]["duration_ms"].as_u64().unwrap() >= 2000, "{}", run_summary(&runs));
    assert_eq!(runs[1]["result"], "SKIPPED");
    let job = c.job(key).unwrap().unwrap();
    assert_eq!(job["status"], "scheduled", "idle until the next fire time: {job}");
    assert!(job["cron"]["next_run_at"].as_str().unwrap().contains("-01-01T00:00:00"), "{job}");
    // JSON for scripts, and a refusal for jobs that are not cron jobs.
    let out = c.capstan_ok(&["job", "start", key, "--output", "json"]);
    let started: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((started["run"].clone(), started["result"].clone()), (json!(3), json!("RUNNING")));
    c.create_job(&job_spec("ops/test/batch", "batch", 1, "true"));
    let refused = c.capstan(&["job", "start", "ops/test/batch"]);
    assert!(!refused.status.success());
    assert!(text(&refused.stderr).contains("only cron jobs"), "{}", text(&refused.stderr));
}

/// The master is down across fire times: on recovery the job runs once, not once per fire time,
/// and the run records how many fire times were missed.
#[test]
fn a_master_restart_across_fire_times_runs_the_missed_run_once() {
    privileged_or_skip!("a_master_restart_across_fire_times_runs_the_missed_run_once");
    const EVERY_MS: u64 = 3_000;
    let mut c = Cluster::start_split_opts(SplitOptions {
        master_flags: SECONDS_ALLOWED.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    });
    let key = "ops/test/missed";
    c.create_job(&cron_job(key, "*/3 * * * * *", "KILL_EXISTING", 1, "true"));
    let before = wait_until(SOON, "a scheduled run", || {
        let runs = runs(&c, key)?;
        ensure(runs.iter().any(|r| r["result"] == "SUCCEEDED"), run_summary(&runs)).map(|()| runs)
    });
    c.kill9_master();
    let down = Instant::now();
    std::thread::sleep(Duration::from_millis(3 * EVERY_MS + 500));
    c.start_master();
    let down_for = down.elapsed();
    let after = wait_until(SOON, "the missed run", || {
        let runs = runs(&c, key)?;
        ensure(runs.len() > before.len() && runs.iter().any(|r| r["missed"].as_u64() > Some(0)), run_summary(&runs))
            .map(|()| runs)
    });
    // The last run before the master went away (it may have ended its run after `before` was read).
    let recovered: Vec<&Value> = after.iter().filter(|r| r["missed"].as_u64() > Some(0)).collect();
    assert_eq!(recovered.len(), 1, "one run for all the missed fire times: {}", run_summary(&after));
    let run = recovered[0];
    let i = after.iter().position(|r| r == run).unwrap();
    let previous = &after[i - 1];
    let gap = ms_of(&run["scheduled_at"]) - ms_of(&previous["scheduled_at"]);
    let k = gap / EVERY_MS;
    assert!(k >= 3, "the master was down {down_for:?} across {k} fire times: {}", run_summary(&after));
    let missed = run["missed"].as_u64().unwrap();
    // Every fire time since the previous run was missed; the latest one is the run itself (it
    // counts as missed unless it fell after the new master started).
    assert!(missed == k || missed == k - 1, "missed {missed} of {k}: {}", run_summary(&after));
    assert!(run["result"] != "SKIPPED", "{}", run_summary(&after));
    let missed_events = c.events_of("cron_runs_missed");
    assert!(missed_events.iter().any(|m| m.contains(key) && m.contains("runs once")), "{missed_events:?}");
    // Afterwards the schedule goes on as usual, with nothing missed.
    let later = wait_until(SOON, "a run on time after the recovery", || {
        let runs = runs(&c, key)?;
        ensure(runs.len() > i + 1, run_summary(&runs)).map(|()| runs)
    });
    assert_eq!(later[i + 1]["missed"], 0, "{}", run_summary(&later));
    assert_eq!(ms_of(&later[i + 1]["scheduled_at"]) - ms_of(&run["scheduled_at"]), EVERY_MS);
}

/// While the cluster is frozen KILL_EXISTING cannot kill: the new run is skipped, and says why.
#[test]
fn while_frozen_kill_existing_skips_the_new_run() {
    privileged_or_skip!("while_frozen_kill_existing_skips_the_new_run");
    let c = DevCluster::start_with("", &SECONDS_ALLOWED);
    let key = "ops/test/frozen";
    c.create_job(&cron_job(key, "*/2 * * * * *", "KILL_EXISTING", 1, "exec sleep 600"));
    let task = wait_until(SOON, "run 1 runs", || {
        let tasks = c.tasks_of(key)?;
        let running: Vec<Value> = tasks.into_iter().filter(|t| t["state"] == "RUNNING").collect();
        running.into_iter().next().ok_or_else(|| "not yet".to_string())
    });
    c.capstan_ok(&["admin", "freeze", "--reason", "cron test", "--by", "tester"]);
    let runs = wait_until(SOON, "a run skipped because frozen", || {
        let runs = runs(&c, key)?;
        let frozen =
            runs.iter().any(|r| r["result"] == "SKIPPED" && r["reason"].as_str().unwrap_or("").contains("frozen"));
        ensure(frozen, run_summary(&runs)).map(|()| runs)
    });
    let t = c.task(&task_id(&task)).unwrap().unwrap();
    assert_eq!(t["state"], "RUNNING", "nothing killed while frozen: {}", run_summary(&runs));
    assert!(pid_alive(task_pid(&t)));
    c.capstan_ok(&["admin", "unfreeze", "--by", "tester"]);
    wait_until(SOON, "the next run kills the old one once unfrozen", || {
        let t = c.task(&task_id(&task))?.ok_or("gone")?;
        ensure(t["state"] == "KILLED", t)
    });
}

/// A batch job is complete when every instance exited 0; its status says so and how long it took.
#[test]
fn a_batch_job_is_complete_when_all_instances_exit_0_and_says_how_long_it_took() {
    privileged_or_skip!("a_batch_job_is_complete_when_all_instances_exit_0_and_says_how_long_it_took");
    let c = DevCluster::start();
    let key = "batch/test/three";
    c.create_job(&job_spec(key, "batch", 3, "sleep 1"));
    let job = wait_until(SOON, "the job is finished", || match c.job(key)? {
        Some(j) if j["status"] == "finished" => Ok(j),
        other => Err(format!("{other:?}")),
    });
    let tasks = c.tasks_of(key).unwrap();
    assert_eq!(tasks.len(), 3, "{}", summary(&tasks));
    assert!(tasks.iter().all(|t| t["state"] == "FINISHED"), "{}", summary(&tasks));
    let duration_ms = job["duration_ms"].as_u64().expect("a duration");
    assert!((1_000..SOON.as_millis() as u64).contains(&duration_ms), "{job}");
    assert_eq!(ms_of(&job["finished_at"]) - ms_of(&job["created_at"]), duration_ms);
    let status = c.capstan_ok(&["job", "status", key]);
    assert!(status.contains("status    finished"), "{status}");
    assert!(status.contains("complete: all 3 instance(s) exited 0"), "{status}");
    assert!(status.contains(", took "), "{status}");
    // One that fails for good is over too, as failed.
    let failing = "batch/test/fails";
    let mut spec = job_spec(failing, "batch", 2, "test $CAPSTAN_INSTANCE = 0");
    spec["max_failures"] = json!(0);
    c.create_job(&spec);
    let job = wait_until(SOON, "the failing job is over", || match c.job(failing)? {
        Some(j) if j["status"] == "failed" => Ok(j),
        other => Err(format!("{other:?}")),
    });
    assert!(job["duration_ms"].is_u64(), "{job}");
    let status = c.capstan_ok(&["job", "status", failing]);
    assert!(status.contains("an instance failed for good"), "{status}");
}

/// Finished batch jobs are not kept forever: after `--batch-retention` the job and its tasks are
/// forgotten (404), while a job still running stays.
#[test]
fn a_finished_batch_job_is_forgotten_after_its_retention() {
    privileged_or_skip!("a_finished_batch_job_is_forgotten_after_its_retention");
    let c = DevCluster::start_with("", &["--batch-retention", "2s"]);
    let key = "batch/test/old";
    let tasks = c.create_job(&job_spec(key, "batch", 2, "true"));
    wait_until(SOON, "the job is finished", || match c.job(key)? {
        Some(j) if j["status"] == "finished" => Ok(()),
        other => Err(format!("{other:?}")),
    });
    c.create_job(&job_spec("batch/test/long", "batch", 1, "exec sleep 600"));
    wait_until(SOON, "the finished job is forgotten after its retention", || match c.job(key)? {
        None => Ok(()),
        Some(j) => Err(format!("{}", j["status"])),
    });
    for t in &tasks {
        assert_eq!(c.task(t).unwrap(), None, "task {t} is forgotten with its job");
    }
    assert!(c.job("batch/test/long").unwrap().is_some(), "a batch job still running stays");
}
