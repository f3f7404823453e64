//! Several masters on one etcd: failover, fencing, and an etcd outage, with real processes (etcd,
//! three `capstan master`, one `capstan agent` running real tasks).
//!
//! These tests time nothing against the target (the failover benchmark measures it: `capstan
//! bench failover`); they bound waits generously and assert what must never happen: an
//! acknowledged job lost, a running task killed or duplicated, a deposed leader writing.

mod common;

use common::*;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const MASTER_FLAGS: &[&str] = &["--lease-ttl", "2s"];

/// Jobs created one after the other against every master (following redirects, retrying while
/// no master leads), until stopped: the keys of those acknowledged (201).
struct Creator {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Creator {
    fn start(masters: Vec<String>, prefix: &str) -> Creator {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a, prefix) = (stop.clone(), acked.clone(), prefix.to_string());
        let thread = thread::spawn(move || {
            let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
            let mut n = 0;
            while !s.load(Ordering::SeqCst) {
                let key = format!("ha/test/{prefix}{n}");
                let spec = job_spec(&key, "service", 1, "sleep 600");
                // Each job is tried against the masters in turn until one acknowledges or refuses it.
                for url in masters.iter().cycle().take(masters.len() * 20) {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    match http.post(format!("{url}/v1/jobs")).json(&spec).send() {
                        Ok(r) if r.status().as_u16() == 201 => {
                            a.lock().unwrap().push(key.clone());
                            break;
                        }
                        Ok(r) if r.status().as_u16() == 409 => break, // a retry of one that was written
                        _ => thread::sleep(Duration::from_millis(50)),
                    }
                }
                n += 1;
            }
        });
        Creator { stop, acked, thread: Some(thread) }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("the creator thread");
        }
        self.acked.lock().unwrap().clone()
    }
}

fn by_id(tasks: &[Value]) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> =
        tasks.iter().map(|t| (t["id"].as_str().unwrap().to_string(), t["pid"].as_u64().unwrap())).collect();
    v.sort();
    v
}

#[test]
fn killing_the_leader_loses_no_acknowledged_job_and_no_running_task() {
    if !privileged("killing_the_leader_loses_no_acknowledged_job_and_no_running_task")
        || !capstan_store::etcd_or_skip("killing_the_leader_loses_no_acknowledged_job_and_no_running_task")
    {
        return;
    }
    let mut c = Cluster::start_ha(3, MASTER_FLAGS);
    let (old, old_epoch) = c.wait_leader(SOON, 0);
    c.create_job(&job_spec("ha/test/steady", "service", 2, "sleep 600"));
    let before = by_id(&c.wait_running("ha/test/steady", 2, SOON));

    // Jobs are being created while the leader dies.
    let creator = Creator::start(c.ha.iter().map(HaMaster::url).collect(), "during");
    wait_until(SOON, "some jobs are acknowledged before the kill", || ensure(creator.acked() >= 3, creator.acked()));
    // Followers keep a warm copy of the state, close behind the leader.
    let leader_index = c.leader_view(old).unwrap()["index"].as_u64().unwrap();
    wait_until(SOON, "the followers' copies reach the leader's index", || {
        let behind: Vec<Value> = (0..c.ha.len())
            .filter(|i| *i != old)
            .map(|i| c.leader_view(i))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|v| v["index"].as_u64().unwrap_or(0) < leader_index)
            .collect();
        ensure(behind.is_empty(), behind)
    });
    let killed_at = Instant::now();
    c.kill9_ha_master(old);
    let (new, new_epoch) = c.wait_leader(Duration::from_secs(20), old_epoch);
    let took = killed_at.elapsed();
    eprintln!("a new leader (master {new}, epoch {new_epoch}) {took:?} after the kill");
    assert_ne!(new, old);
    assert!(took < Duration::from_secs(8), "a new leader only after {took:?} (lease 2 s)");
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert!(
        log.lines().any(|l| l.contains(&format!("[master-{new} err]")) && l.contains("the standby copy")),
        "the new leader began from its standby copy, not from a full read of the store:\n{}",
        c.log_tail(30)
    );
    let acked_before = creator.acked();
    wait_until(SOON, "jobs are acknowledged by the new leader", || {
        ensure(creator.acked() >= acked_before + 3, creator.acked())
    });
    let acked = creator.finish();

    // Nothing acknowledged is lost, and what was created runs (scheduling resumed).
    for key in &acked {
        assert!(c.job(key).unwrap().is_some(), "job {key} was acknowledged but the new leader does not know it");
    }
    let last = acked.last().expect("jobs were acknowledged");
    c.wait_running(last, 1, SOON);

    // The tasks that ran before still run: the same tasks, the same processes, no copies.
    let after = by_id(&c.wait_running("ha/test/steady", 2, SOON));
    assert_eq!(before, after, "the running tasks changed across the failover");
    for (_, pid) in &after {
        assert!(pid_alive(*pid as u32), "task process {pid} died");
    }
    holds_for(Duration::from_secs(2), "no task of the steady job is replaced", || {
        let tasks = c.tasks_of("ha/test/steady")?;
        ensure(tasks.len() == 2, &tasks)
    });

    // The agent follows the new leader: it reports to it (its newest epoch is on disk).
    let agents = c.get("/v1/agents");
    assert_eq!(agents.as_array().map(Vec::len), Some(1), "{agents}");
    assert_eq!(agents[0]["liveness"], "active", "{agents}");
    wait_until(SOON, "the agent has seen the new epoch", || {
        let seen: u64 = std::fs::read_to_string(c.agent_dir().join("master-epoch"))
            .map_err(|e| e.to_string())?
            .trim()
            .parse()
            .map_err(|e: std::num::ParseIntError| e.to_string())?;
        ensure(seen == new_epoch, seen)
    });

    // Operators see who leads; the CLI finds the leader from the whole list, dead master first.
    let mut ordered: Vec<String> = vec![c.ha[old].url()];
    ordered.extend((0..c.ha.len()).filter(|i| *i != old).map(|i| c.ha[i].url()));
    let all = ordered.join(",");
    let out = capstan_raw(&["admin", "masters", "--addr", &all, "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let roles: Vec<&str> = rows.as_array().unwrap().iter().map(|r| r["role"].as_str().unwrap()).collect();
    assert_eq!(roles.iter().filter(|r| **r == "leader").count(), 1, "{rows}");
    assert_eq!(roles[0], "unreachable", "the killed master: {rows}");
    let listed = capstan_raw(&["job", "list", "--addr", &all]);
    assert!(listed.status.success() && text(&listed.stdout).contains("ha/test/steady"), "{}", text(&listed.stderr));

    // The killed master comes back as a follower of the new leader.
    c.start_ha_master(old);
    let (still, _) = c.wait_leader(SOON, new_epoch - 1);
    assert_eq!(still, new, "the returning master must not take over");
}

#[test]
fn a_paused_old_leader_that_comes_back_cannot_write() {
    if !privileged("a_paused_old_leader_that_comes_back_cannot_write")
        || !capstan_store::etcd_or_skip("a_paused_old_leader_that_comes_back_cannot_write")
    {
        return;
    }
    let mut c = Cluster::start_ha(3, MASTER_FLAGS);
    let (old, old_epoch) = c.wait_leader(SOON, 0);
    let old_url = c.ha[old].url();
    let old_pid = c.ha[old].pid().expect("runs");

    // Cut the leader off (paused: it believes it still leads when it wakes up).
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old_pid as i32), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let (new, new_epoch) = c.wait_leader_among(Duration::from_secs(20), old_epoch, &[old]);
    assert_ne!(new, old);
    c.create_job(&job_spec("ha/test/after", "service", 1, "sleep 600"));

    // A request sent straight to the old leader while it is paused, served when it wakes up.
    let no_redirects = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let spec = job_spec("ha/test/stale", "service", 1, "sleep 600");
    let stale = thread::spawn(move || {
        let r = no_redirects.post(format!("{old_url}/v1/jobs")).json(&spec).send().expect("an answer");
        (r.status().as_u16(), r.text().unwrap_or_default())
    });
    // Not a wait for correctness: whether the request reaches the paused process before or after
    // SIGCONT, the answer must be one of the same three; this only makes the stale case likely.
    thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old_pid as i32), nix::sys::signal::Signal::SIGCONT).unwrap();
    let (status, body) = stale.join().unwrap();
    eprintln!("the deposed leader answered {status}: {body}");
    assert_ne!(status, 201, "the deposed leader acknowledged a job: {body}");
    assert!(status == 307 || status == 503, "unexpected answer from the deposed leader: {status} {body}");
    // Either it noticed first and stepped down (307 to the new leader; 503 `no_leader` while it
    // had no leader to name, or when its term ended with the request in hand), or its write
    // reached etcd and the fence refused it.
    if body.contains("\"unavailable\"") {
        assert!(body.contains("leadership key"), "refused, but not by the fence: {body}");
    } else if status == 503 {
        assert!(body.contains("\"no_leader\""), "{body}");
    }

    // Its job is nowhere; the new leader's is there; the old one follows.
    assert!(c.job("ha/test/stale").unwrap().is_none(), "a job sent to the deposed leader was written");
    assert!(c.job("ha/test/after").unwrap().is_some());
    let (still, _) = c.wait_leader(SOON, new_epoch - 1);
    assert_eq!(still, new);
    c.wait_running("ha/test/after", 1, SOON);
}

#[test]
fn etcd_killed_and_started_again_masters_wait_and_lose_nothing() {
    if !privileged("etcd_killed_and_started_again_masters_wait_and_lose_nothing")
        || !capstan_store::etcd_or_skip("etcd_killed_and_started_again_masters_wait_and_lose_nothing")
    {
        return;
    }
    let mut c = Cluster::start_ha(3, MASTER_FLAGS);
    c.create_job(&job_spec("ha/test/before", "service", 2, "sleep 600"));
    let before = by_id(&c.wait_running("ha/test/before", 2, SOON));

    c.etcd.as_mut().expect("etcd").kill9();
    // While etcd is down nothing can be acknowledged; masters keep running and answer.
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(3)).build().unwrap();
    let during = job_spec("ha/test/during", "service", 1, "sleep 600");
    let mut acked_during = false;
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(4) {
        if let Ok(r) = http.post(format!("{}/v1/jobs", c.url)).json(&during).send() {
            acked_during |= r.status().as_u16() == 201;
        }
        thread::sleep(Duration::from_millis(200));
    }
    for i in 0..c.ha.len() {
        assert!(c.ha_master_runs(i), "master {i} exited while etcd was down\n{}", c.log_tail(40));
    }
    c.etcd.as_mut().expect("etcd").restart().expect("etcd starts again");

    c.wait_leader(Duration::from_secs(30), 0);
    assert!(c.job("ha/test/before").unwrap().is_some());
    if acked_during {
        assert!(c.job("ha/test/during").unwrap().is_some(), "a job acknowledged during the outage was lost");
    }
    let after = by_id(&c.wait_running("ha/test/before", 2, SOON));
    assert_eq!(before, after, "the running tasks changed across the etcd outage");
    c.create_job(&job_spec("ha/test/after", "service", 1, "sleep 600"));
    c.wait_running("ha/test/after", 1, SOON);
}
