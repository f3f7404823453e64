//! Large jobs and job history against a real `capstan master`: a kill of a job of many instances
//! keeps the API answering throughout and is stopped promptly by SIGTERM, and a restarted master
//! completes it; a cron job every second is refused. The master has no agent here, so the tasks
//! stay pending (no root needed), which is also the cheapest kill: what is measured is the
//! master's own work.

#[path = "../../cli/tests/common/mod.rs"]
mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Instances of the large job: the largest allowed (`INSTANCES_MAX`). Before the fix, the kill
/// of a cron run this size visited about n²/2 = 5 billion tasks in one command.
const INSTANCES: u32 = capstan_model::decode::INSTANCES_MAX;
/// Every request must be answered within this, or the test fails (the old master answered
/// nothing for minutes while it applied the kill).
const ANSWER_DEADLINE: Duration = Duration::from_secs(5);
/// How long a master may take to exit after SIGTERM.
const EXIT_DEADLINE: Duration = Duration::from_secs(5);
/// Creating the large job, and the whole kill with its forgetting, within this.
const LARGE_DEADLINE: Duration = Duration::from_secs(120);

/// One `capstan master` child process on a fixed address and data directory.
struct Master {
    dir: PathBuf,
    bind: String,
    child: Option<Child>,
    http: reqwest::blocking::Client,
}

impl Master {
    fn start(dir: PathBuf, flags: &[&str]) -> Master {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let http = reqwest::blocking::Client::builder().timeout(ANSWER_DEADLINE).build().unwrap();
        let mut m = Master { dir, bind: format!("127.0.0.1:{port}"), child: None, http };
        m.spawn(flags);
        m
    }

    fn spawn(&mut self, flags: &[&str]) {
        let mut child = Command::new(CAPSTAN)
            .args(["master", "--data-dir"])
            .arg(&self.dir)
            .args(["--bind", &self.bind])
            .args(flags)
            .env("CAPSTAN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning capstan master");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("capstan master serving at"), "unexpected first line {line:?}");
        self.child = Some(child);
        wait_until(SOON, "the master leads", || match self.get("/v1/jobs") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        });
    }

    /// One request, answered within [`ANSWER_DEADLINE`] or an error.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), String> {
        let url = format!("http://{}{path}", self.bind);
        let mut req = self.http.request(method.parse().unwrap(), &url);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let resp = req.send().map_err(|e| format!("{method} {path}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().map_err(|e| format!("{method} {path}: {e}"))?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    fn get(&self, path: &str) -> Result<(u16, Value), String> {
        self.call("GET", path, None)
    }

    /// Must be answered in time: a late answer fails the test, naming what was asked.
    fn must(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let asked = Instant::now();
        self.call(method, path, body)
            .unwrap_or_else(|e| panic!("no answer within {ANSWER_DEADLINE:?} (after {:?}): {e}", asked.elapsed()))
    }

    /// SIGTERM, then the process must be gone within [`EXIT_DEADLINE`].
    fn sigterm(&mut self) {
        let mut child = self.child.take().expect("the master runs");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        let deadline = Instant::now() + EXIT_DEADLINE;
        loop {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the master did not exit within {EXIT_DEADLINE:?} of SIGTERM");
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A cron job of `INSTANCES` instances that nothing can place, and one run of it started by hand:
/// that many pending tasks.
fn large_cron_run(m: &Master, key: &str) {
    let mut spec = job_spec(key, "cron", INSTANCES, "true");
    spec["cron"] = json!("0 0 1 1 *");
    let (status, answer) = m.must("POST", "/v1/jobs", Some(&spec));
    assert_eq!(status, 201, "{answer}");
    let started = Instant::now();
    let (status, answer) = m
        .call("POST", &format!("/v1/jobs/{key}/start"), Some(&json!({})))
        .unwrap_or_else(|e| panic!("starting the run: {e} after {:?}", started.elapsed()));
    assert_eq!(status, 200, "{answer}");
    let job = m.must("GET", &format!("/v1/jobs/{key}"), None).1;
    assert_eq!(job["tasks"]["PENDING"], json!(INSTANCES), "{}", job["tasks"]);
}

fn pending_of(job: &Value) -> u64 {
    job["tasks"]["PENDING"].as_u64().unwrap_or(0)
}

/// DELETE of a large job: acknowledged at once as `killing`, and while the master stops its tasks
/// and forgets them every read and a write are answered in time, until the job is gone.
#[test]
fn the_api_answers_throughout_the_kill_of_a_large_job() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::start(dir.path().join("master"), &[]);
    let key = "big/test/cron";
    large_cron_run(&m, key);
    let (status, answer) = m.must("DELETE", &format!("/v1/jobs/{key}"), None);
    assert_eq!((status, answer["status"].clone()), (200, json!("killing")), "{answer}");
    let deadline = Instant::now() + LARGE_DEADLINE;
    let (mut reads, mut during) = (0u32, 0u32);
    let mut wrote = false;
    loop {
        assert!(Instant::now() < deadline, "the kill did not end within {LARGE_DEADLINE:?}");
        assert_eq!(m.must("GET", "/v1/health", None).0, 200);
        let (status, job) = m.must("GET", &format!("/v1/jobs/{key}"), None);
        reads += 2;
        if status == 404 {
            break;
        }
        assert_eq!((status, job["status"].clone()), (200, json!("killing")), "{job}");
        during += 1;
        if !wrote {
            // A write goes through between the kill's slices.
            let small = job_spec("big/test/small", "service", 1, "sleep 600");
            let (status, answer) = m.must("POST", "/v1/jobs", Some(&small));
            assert_eq!(status, 201, "{answer}");
            wrote = true;
        }
        std::thread::sleep(POLL);
    }
    assert!(during >= 1, "the job was seen being killed ({reads} reads)");
    eprintln!("{reads} reads answered in time, {during} of the job while it was being killed");
    let (status, small) = m.must("GET", "/v1/jobs/big/test/small", None);
    assert_eq!(status, 200, "the job created during the kill is there: {small}");
}

/// SIGTERM during the kill of a large job stops the master at once; the restarted master finds
/// the job killed and part of its tasks not yet stopped, and completes the kill.
#[test]
fn sigterm_stops_a_master_mid_kill_and_a_restart_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Master::start(dir.path().join("master"), &[]);
    let key = "big/test/resume";
    large_cron_run(&m, key);
    let (status, answer) = m.must("DELETE", &format!("/v1/jobs/{key}"), None);
    assert_eq!((status, answer["status"].clone()), (200, json!("killing")), "{answer}");
    // A freeze holds the rest of the kill (its slices are destructive), so the master is
    // stopped mid-way for sure.
    let freeze = json!({"reason": "hold the kill mid-way", "by": "bigjob test"});
    assert_eq!(m.must("POST", "/v1/admin/freeze", Some(&freeze)).0, 200);
    let job = m.must("GET", &format!("/v1/jobs/{key}"), None).1;
    let left = pending_of(&job);
    assert!(
        left > 0 && left < u64::from(INSTANCES),
        "the kill is under way, neither done nor not started: {}",
        job["tasks"]
    );
    m.sigterm();
    m.spawn(&[]);
    let job = m.must("GET", &format!("/v1/jobs/{key}"), None).1;
    assert_eq!(job["status"], "killing", "still killed after the restart: {job}");
    assert_eq!(pending_of(&job), left, "the same tasks are left: {}", job["tasks"]);
    assert_eq!(m.must("POST", "/v1/admin/unfreeze", Some(&json!({"by": "bigjob test"}))).0, 200);
    wait_until(LARGE_DEADLINE, "the restarted master completes the kill", || {
        match m.must("GET", &format!("/v1/jobs/{key}"), None) {
            (404, _) => Ok(()),
            (_, job) => Err(format!("{} {}", job["status"], job["tasks"])),
        }
    });
}

/// A cron job every second is refused at submission, naming the key and the minimum.
#[test]
fn a_cron_job_every_second_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::start(dir.path().join("master"), &[]);
    let mut spec = job_spec("big/test/often", "cron", 1, "true");
    spec["cron"] = json!("* * * * * *");
    let (status, answer) = m.must("POST", "/v1/jobs", Some(&spec));
    assert_eq!(status, 400, "{answer}");
    let said = answer.to_string();
    for w in ["cron", "runs 1s after the run before it", "at least 1m apart", "--cron-interval-min"] {
        assert!(said.contains(w), "the refusal says `{w}`: {said}");
    }
    assert_eq!(m.must("GET", "/v1/jobs/big/test/often", None).0, 404, "nothing was created");
}
