//! End-to-end tests of backup and restore through the `capstan` CLI and the master's API, with
//! real `capstan master` processes on the embedded store (no agent process: agents register
//! through the agent protocol, so tasks get placed; nothing runs, so nothing needs root).
//!
//! Backup → a new master on a new data directory → restore gives a byte-identical dump (also
//! after that master restarts); truncated, bit-flipped and future-version backups are refused
//! with a clear message and the dump unchanged; `--dry-run` changes nothing; a cluster with jobs
//! needs `--force`; `inspect` prints the counts; periodic backups appear and are pruned.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// One `capstan master` on its own data directory; killed on drop.
struct Master {
    child: Option<Child>,
    url: String,
    dir: tempfile::TempDir,
    flags: Vec<String>,
    http: reqwest::blocking::Client,
}

impl Master {
    fn start(flags: &[&str]) -> Master {
        let dir = tempfile::Builder::new().prefix("capstan-backup-e2e-").tempdir().expect("temporary directory");
        let mut m = Master {
            child: None,
            url: String::new(),
            dir,
            flags: flags.iter().map(|s| s.to_string()).collect(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .no_proxy()
                .build()
                .expect("HTTP client"),
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("master.log"))
            .expect("log file");
        let mut child = Command::new(CAPSTAN)
            .args(["master", "--bind", "127.0.0.1:0", "--data-dir"])
            .arg(self.dir.path().join("data"))
            // Registered agents never send heartbeats here: nothing may become unreachable.
            .args(["--heartbeat-interval", "10m", "--agent-timeout", "1h"])
            .args(&self.flags)
            .env_remove("CAPSTAN_ADDR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawning capstan master");
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut first).expect("reading its first line");
        let url = first.split_whitespace().find(|w| w.starts_with("http://"));
        let Some(url) = url else {
            let _ = child.kill();
            panic!("capstan master did not start: {first:?}\n{}", self.log());
        };
        self.url = url.to_string();
        self.child = Some(child);
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("master.log")).unwrap_or_default()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A restore begins a new leadership term: for a moment the master answers 503 (no leader);
    /// requests wait for the new term as any client would. On etcd, a master that follows sends
    /// clients to the leader it knows of, which may be one just killed until its lease runs out:
    /// asking again soon finds the new one.
    fn send(&self, what: &str, request: impl Fn() -> reqwest::blocking::RequestBuilder) -> reqwest::blocking::Response {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waiting = std::time::Instant::now() < deadline;
            match request().send() {
                Ok(r) if waiting && r.headers().get("capstan-leader").is_some_and(|v| v == "none") => {}
                Ok(r) => return r,
                Err(e) if waiting && e.is_connect() => {}
                Err(e) => panic!("{what}: {e}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let r = self.send(&format!("GET {path}"), || self.http.get(format!("{}{path}", self.url)));
        (r.status().as_u16(), r.bytes().expect("a body").to_vec())
    }

    fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {}", text(&body));
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e})"))
    }

    fn post(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self.send(&format!("POST {path}"), || self.http.post(format!("{}{path}", self.url)).body(body.clone()));
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    fn post_json(&self, path: &str, body: &Value) -> Value {
        let (status, answer) = self.post(path, serde_json::to_vec(body).unwrap());
        assert!((200..300).contains(&status), "POST {path}: {status} {answer}");
        answer
    }

    /// `GET /v1/admin/dump` as text.
    fn dump(&self) -> String {
        let (status, body) = self.get("/v1/admin/dump");
        assert_eq!(status, 200, "dump: {}", text(&body));
        String::from_utf8(body).expect("a UTF-8 dump")
    }

    /// `capstan ARGS --addr URL`.
    fn capstan(&self, args: &[&str]) -> Output {
        let mut all = args.to_vec();
        all.extend(["--addr", &self.url]);
        capstan_raw(&all)
    }

    fn capstan_ok(&self, args: &[&str]) -> String {
        let out = self.capstan(args);
        assert!(out.status.success(), "capstan {args:?} failed: {}\n{}", text(&out.stderr), self.log());
        text(&out.stdout)
    }

    /// Registers a fake agent with room for a few small tasks.
    fn register_agent(&self, id: u64, rack: &str) {
        let info = json!({
            "id": format!("{id:016x}"),
            "hostname": format!("host-{id}"),
            "address": format!("http://10.0.0.{id}:7071"),
            "capacity": {"cpus_milli": 2000, "mem_bytes": 2u64 << 30, "disk_bytes": 2u64 << 30,
                         "ports": [{"first": 31000, "last": 31019}]},
            "attributes": {"rack": rack},
            "version": "test",
        });
        self.post_json("/v1/agent/register", &json!({"info": info, "known_tasks": []}));
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- master log -----\n{}", self.log());
        }
        self.kill();
    }
}

fn stderr_of(out: &Output) -> String {
    text(&out.stderr)
}

/// A cluster with agents, placed tasks of several job types, an unplaceable job and a quota.
fn populated() -> Master {
    let m = Master::start(&[]);
    m.register_agent(1, "r1");
    m.register_agent(2, "r2");
    m.post_json("/v1/jobs", &job_spec("www/prod/web", "service", 3, "exec sleep 600"));
    m.post_json("/v1/jobs", &job_spec("batch/prod/etl", "batch", 2, "exit 0"));
    let mut cron = job_spec("ops/prod/report", "cron", 1, "exit 0");
    cron["cron"] = json!("0 3 1 1 *");
    m.post_json("/v1/jobs", &cron);
    let mut huge = job_spec("www/dev/huge", "service", 1, "exec sleep 600");
    huge["task"]["cpus"] = json!(64);
    m.post_json("/v1/jobs", &huge);
    wait_until(SOON, "every task that fits is placed", || {
        let tasks = m.get_json("/v1/tasks");
        let assigned = tasks.as_array().unwrap().iter().filter(|t| t["state"] == "ASSIGNED").count();
        ensure(assigned == 5, summary(tasks.as_array().unwrap()))
    });
    // Settled: the scheduler has nothing more to do.
    let dump = m.dump();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(m.dump(), dump, "the cluster is settled before the test takes its backup");
    m
}

/// A backup file of `m` taken with the CLI.
fn take_backup(m: &Master, name: &str) -> PathBuf {
    let file = m.path(name);
    let out = m.capstan_ok(&["admin", "backup", file.to_str().unwrap()]);
    assert!(out.contains("written to"), "{out}");
    file
}

fn assert_refused(what: &str, out: &Output, words: &[&str]) {
    let err = stderr_of(out);
    assert!(!out.status.success(), "{what} must fail, but it succeeded: {}", text(&out.stdout));
    for w in words {
        assert!(err.contains(w), "{what}: standard error must mention {w:?}:\n{err}");
    }
}

#[test]
fn backup_then_restore_into_a_new_master_gives_an_identical_dump() {
    let a = populated();
    let before = a.dump();
    let file = take_backup(&a, "cluster.backup");
    assert_eq!(a.dump(), before, "taking a backup changes nothing");

    // Offline inspection: counts, and the same dump as the live master's, byte for byte.
    let path = file.to_str().unwrap();
    let out = capstan_raw(&["admin", "backup", "inspect", path]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let shown = text(&out.stdout);
    for line in ["jobs        4", "tasks       6", "agents      2", "OK: every check passed"] {
        assert!(shown.contains(line), "inspect must show {line:?}:\n{shown}");
    }
    let info: Value =
        serde_json::from_slice(&capstan_raw(&["admin", "backup", "inspect", path, "--output", "json"]).stdout).unwrap();
    assert_eq!((info["jobs"].as_u64(), info["tasks"].as_u64(), info["agents"].as_u64()), (Some(4), Some(6), Some(2)));
    assert_eq!(info["backup_format_version"], 1);
    assert_eq!(info["snapshot_format_version"], capstan_state::codec::SNAPSHOT_FORMAT_VERSION);
    assert_eq!(info["checksum"].as_str().map(str::len), Some(8));
    let offline = capstan_raw(&["admin", "backup", "inspect", path, "--dump"]);
    assert!(offline.status.success(), "{}", stderr_of(&offline));
    assert_eq!(text(&offline.stdout), before, "inspect --dump is the live master's dump");

    // A new master on a new data directory: a dry run first changes nothing.
    let mut b = Master::start(&[]);
    let empty = b.dump();
    let out = b.capstan_ok(&["admin", "restore", path, "--dry-run"]);
    assert!(out.contains("dry run") && out.contains("nothing was changed"), "{out}");
    assert_eq!(b.dump(), empty, "a dry run changes nothing");

    let out = b.capstan_ok(&["admin", "restore", path]);
    assert!(out.contains("restored 4 jobs, 6 tasks, 2 agents"), "{out}");
    assert_eq!(b.dump(), before, "the restored cluster is the backed-up one");
    let jobs = b.get_json("/v1/jobs");
    assert_eq!(jobs.as_array().unwrap().len(), 4, "the API serves the restored state: {jobs}");

    // The restore is in the store: a restarted master loads the same state.
    b.restart();
    assert_eq!(b.dump(), before, "the restored state survives a restart");
    // And it remembers where it came from.
    let again = take_backup(&b, "again.backup");
    let shown = capstan_raw(&["admin", "backup", "inspect", again.to_str().unwrap()]);
    assert!(text(&shown.stdout).contains("restored    from cluster.backup"), "{}", text(&shown.stdout));

    // Now that it has jobs, another restore needs --force.
    let out = b.capstan(&["admin", "restore", path]);
    assert_refused("a restore over jobs without --force", &out, &["has 4 job(s)", "--force", "nothing was changed"]);
    let out = b.capstan(&["admin", "restore", path, "--dry-run"]);
    assert_refused("a dry run over jobs without --force", &out, &["--force"]);
    b.capstan_ok(&["admin", "restore", path, "--force"]);
    assert_eq!(b.dump(), before);
}

/// A copy of `file` changed by `edit`, next to it as `name`.
fn altered(file: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(file).unwrap();
    edit(&mut bytes);
    let out = file.with_file_name(name);
    std::fs::write(&out, bytes).unwrap();
    out
}

/// `file` as a future Capstan might have written it: versions changed, checksums right.
fn forged(file: &Path, name: &str, backup_version: u32, snapshot_version: u16) -> PathBuf {
    use capstan_state::backup;
    let got = backup::inspect(&std::fs::read(file).unwrap()).unwrap();
    let mut snapshot = capstan_state::encode_snapshot(&got.state);
    snapshot[..2].copy_from_slice(&snapshot_version.to_le_bytes());
    let mut header = got.header.clone();
    header.backup_format_version = backup_version;
    header.snapshot_format_version = snapshot_version;
    header.state_bytes = snapshot.len() as u64;
    header.state_crc32 = crc32fast::hash(&snapshot);
    let out = file.with_file_name(name);
    std::fs::write(&out, backup::frame(&header, &snapshot)).unwrap();
    out
}

#[test]
fn damaged_and_future_backups_are_refused_and_nothing_changes() {
    let a = populated();
    let file = take_backup(&a, "good.backup");
    let len = std::fs::metadata(&file).unwrap().len() as usize;

    // The target has a job of its own, and every restore says --force: the file is the only
    // reason left to refuse.
    let b = Master::start(&[]);
    b.register_agent(9, "r9");
    b.post_json("/v1/jobs", &job_spec("keep/prod/me", "batch", 1, "exit 0"));
    wait_until(SOON, "the target's task is placed", || {
        let tasks = b.get_json("/v1/tasks");
        ensure(tasks[0]["state"] == "ASSIGNED", tasks)
    });
    let before = b.dump();

    let truncated = altered(&file, "truncated.backup", |b| b.truncate(len * 2 / 3));
    let flipped = altered(&file, "flipped.backup", |b| b[len - 40] ^= 0x04);
    let current = capstan_state::codec::SNAPSHOT_FORMAT_VERSION;
    let future_backup = forged(&file, "future-backup.backup", 2, current);
    let future_state = forged(&file, "future-state.backup", 1, current + 1);
    let not_a_backup = altered(&file, "not.backup", |b| *b = b"{\"jobs\": {}}\n".to_vec());
    let cases: [(&PathBuf, &[&str]); 5] = [
        (&truncated, &["truncated", &format!("it has {} bytes, but {len} bytes were written", len * 2 / 3)]),
        (&flipped, &["damaged", "checksum mismatch"]),
        (&future_backup, &["backup format version 2", "only up to version 1"]),
        (&future_state, &[&format!("format version {}", current + 1), &format!("only up to version {current}")]),
        (&not_a_backup, &["not a Capstan backup"]),
    ];
    for (file, words) in cases {
        let path = file.to_str().unwrap();
        let out = b.capstan(&["admin", "restore", path, "--force"]);
        assert_refused(&format!("restore {path}"), &out, words);
        assert!(stderr_of(&out).contains("nothing was changed"), "{}", stderr_of(&out));
        assert_eq!(b.dump(), before, "a refused restore ({path}) changes nothing");
        let out = b.capstan(&["admin", "restore", path, "--force", "--dry-run"]);
        assert_refused(&format!("dry run of {path}"), &out, words);
        // Offline inspection finds the same problem.
        let out = capstan_raw(&["admin", "backup", "inspect", path]);
        assert_refused(&format!("inspect {path}"), &out, words);
        // The API answers 400 with the same words.
        let (status, answer) = b.post("/v1/admin/restore?force=true", std::fs::read(file).unwrap());
        assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("bad_backup")), "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(words[0]), "{answer}");
    }
    assert_eq!(b.dump(), before);
    // The good file still restores.
    b.capstan_ok(&["admin", "restore", file.to_str().unwrap(), "--force"]);
    assert_eq!(b.dump(), a.dump());
}

fn periodic_backups(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| n.starts_with("capstan-backup-") && n.ends_with(".backup"));
    names.sort();
    names
}

#[test]
fn periodic_backups_appear_and_are_pruned_to_keep() {
    let dir = tempfile::tempdir().unwrap();
    let backups = dir.path().join("backups");
    let m =
        Master::start(&["--backup-dir", backups.to_str().unwrap(), "--backup-interval", "200ms", "--backup-keep", "3"]);
    m.post_json("/v1/jobs", &job_spec("www/prod/web", "service", 2, "exec sleep 600"));
    let first = wait_until(SOON, "three periodic backups", || {
        let names = periodic_backups(&backups);
        ensure(names.len() == 3, &names).map(|_| names)
    });
    // More come, and the oldest go: never more than three.
    wait_until(SOON, "the first backups are pruned", || {
        let names = periodic_backups(&backups);
        if names.len() > 3 {
            panic!("more than --backup-keep backups: {names:?}");
        }
        ensure(!names.contains(&first[0]) && !names.contains(&first[1]), &names)
    });
    let names = periodic_backups(&backups);
    let newest = backups.join(names.last().unwrap());
    let shown = capstan_raw(&["admin", "backup", "inspect", newest.to_str().unwrap(), "--output", "json"]);
    assert!(shown.status.success(), "{}", stderr_of(&shown));
    let info: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!((info["jobs"].as_u64(), info["tasks"].as_u64()), (Some(1), Some(2)));
    let leftovers: Vec<_> = std::fs::read_dir(&backups)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !(n.ends_with(".tmp") || (n.starts_with("capstan-backup-") && n.ends_with(".backup"))))
        .collect();
    assert!(leftovers.is_empty(), "only backups in the directory: {leftovers:?}");
}

#[test]
fn bad_backup_flags_stop_the_master_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    for (flags, flag) in [(["--backup-keep", "0"], "--backup-keep"), (["--backup-interval", "0s"], "--backup-interval")]
    {
        let mut args = vec!["master", "--data-dir", data, "--bind", "127.0.0.1:0"];
        args.extend(flags);
        let out = capstan_raw(&args);
        assert!(!out.status.success(), "{flags:?} must be refused");
        assert!(stderr_of(&out).contains(flag), "{flags:?}: {}", stderr_of(&out));
    }
}

#[test]
fn backup_needs_a_reachable_master_and_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.backup");
    let out = capstan_raw(&["admin", "backup", file.to_str().unwrap(), "--addr", "http://127.0.0.1:9"]);
    assert_refused("backup without a master", &out, &["cannot reach"]);
    assert!(!file.exists(), "no file is left behind");
    let out = capstan_raw(&["admin", "backup"]);
    assert_eq!(out.status.code(), Some(2), "a usage error: {}", stderr_of(&out));
    let out = capstan_raw(&["admin", "backup", "inspect", dir.path().join("missing").to_str().unwrap()]);
    assert_refused("inspect of a missing file", &out, &["cannot read", "missing"]);
}

/// A backup moves a cluster from the embedded store to etcd and back (the migration path), and
/// each copy survives a restart of its master.
#[test]
fn restore_moves_a_cluster_from_the_embedded_store_to_etcd_and_back() {
    if !capstan_store::etcd_or_skip("restore_moves_a_cluster_from_the_embedded_store_to_etcd_and_back") {
        return;
    }
    let embedded = populated();
    let before = embedded.dump();
    let file = take_backup(&embedded, "embedded.backup");

    let etcd_dir = tempfile::Builder::new().prefix("capstan-backup-etcd-").tempdir().unwrap();
    let etcd = capstan_store::EtcdProcess::start(&etcd_dir.path().join("etcd")).expect("starting etcd");
    let mut on_etcd = Master::start(&["--store", &etcd.url()]);
    let out = on_etcd.capstan_ok(&["admin", "restore", file.to_str().unwrap()]);
    assert!(out.contains("restored 4 jobs, 6 tasks, 2 agents"), "{out}");
    assert_eq!(on_etcd.dump(), before, "the cluster moved to etcd unchanged");
    on_etcd.restart();
    assert_eq!(on_etcd.dump(), before, "etcd holds it: a restarted master loads the same state");

    let back = take_backup(&on_etcd, "etcd.backup");
    let embedded_again = Master::start(&[]);
    embedded_again.capstan_ok(&["admin", "restore", back.to_str().unwrap()]);
    assert_eq!(embedded_again.dump(), before, "and back to the embedded store unchanged");
}
