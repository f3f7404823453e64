//! The task sandbox against its own task and against other tenants: links planted where root
//! reads or writes logs, a rollover race for a root-owned file, a second job (same Unix user)
//! reading the first one's sandbox, and `/tmp` shared between tasks — each on a real cluster.

#[path = "../../cli/tests/common/mod.rs"]
mod common;

use common::*;
use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a task may take to write the output of every rollover of the race test.
const RACE_DEADLINE: Duration = Duration::from_secs(120);
/// Rollovers of `stdout` (10 MiB each, the default log size) during which the race test's task
/// keeps planting links: the issue's reproduction won well within this many.
const RACE_ROLLOVERS: u32 = 40;

/// A split cluster whose agent collects ended sandboxes within a second.
fn cluster() -> Cluster {
    Cluster::start_split_with(&["--sandbox-gc-interval", "200ms", "--sandbox-max-age", "1s"])
}

/// A root-owned file, mode `mode`, in a directory of its own that anyone may traverse (so the
/// task could name it); returns the directory (kept alive by the caller) and the file.
fn root_file(contents: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("root-only");
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    (dir, path)
}

fn service(key: &str, command: &str) -> Value {
    let mut spec = job_spec(key, "service", 1, command);
    spec["task"]["disk"] = json!("512MiB");
    spec
}

fn body_of(resp: reqwest::blocking::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    (status, resp.text().unwrap_or_default())
}

/// `GET url` with a short timeout (a followed log would never end).
fn fetch(url: &str) -> Result<(u16, String), String> {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    client.get(url).send().map(body_of).map_err(|e| format!("GET {url}: {e}"))
}

/// Waits until the log of task `id` (through the master) contains `word`; returns it. (The task
/// keeps running: an ended task's sandbox, logs included, is collected within a second here.)
fn wait_log(c: &Cluster, id: &str, word: &str) -> String {
    wait_until(SOON, &format!("task {id} logged `{word}`"), || {
        let (status, body) = fetch(&format!("{}/v1/tasks/{id}/logs", c.url))?;
        ensure(status == 200 && body.contains(word), (status, &body)).map(|()| body.clone())
    })
}

/// A task's file as root sees it, whether the sandbox has the current layout (`work/`) or the
/// previous one (everything in the sandbox itself): so that the test also runs on old code.
fn task_file(c: &Cluster, id: &str, name: &str) -> Option<PathBuf> {
    [c.work(id).join(name), c.sandbox(id).join(name)].into_iter().find(|p| p.exists())
}

#[test]
fn a_log_replaced_by_a_link_to_a_root_only_file_is_never_served() {
    if !privileged("a_log_replaced_by_a_link_to_a_root_only_file_is_never_served") {
        return;
    }
    let c = cluster();
    let secret = format!("root-only-secret-{}", std::process::id());
    let (_keep, secret_file) = root_file(&format!("{secret}\n"), 0o600);
    // Every place a log could be, from the task's point of view, becomes a link to the secret.
    let s = secret_file.display();
    let command = format!(
        r#"echo task-output; echo task-error >&2
for d in "$CAPSTAN_SANDBOX" "$CAPSTAN_SANDBOX/.." "$CAPSTAN_SANDBOX/../logs"; do
  for f in stdout stderr stdout.1 stderr.1; do rm -f "$d/$f" 2>/dev/null; ln -s {s} "$d/$f" 2>/dev/null; done
done
touch "$CAPSTAN_SANDBOX/planted"; exec sleep 600"#
    );
    let id = c.create_job(&service("hostile/prod/linklog", &command))[0].clone();
    c.wait_task_state(&id, "RUNNING", SOON);
    wait_until(SOON, "the task planted its links", || ensure(task_file(&c, &id, "planted").is_some(), &id));
    let agent = c.agent_url.clone().expect("a split cluster's agent URL");
    for stream in ["stdout", "stderr"] {
        for tail in ["", "&tail=5"] {
            let routes = [
                format!("{}/v1/tasks/{id}/logs?stream={stream}{tail}", c.url),
                format!("{agent}/v1/sandboxes/{id}/logs?stream={stream}{tail}"),
            ];
            for url in routes {
                let (status, body) = fetch(&url).expect("the log route answers");
                assert!(!body.contains(&secret), "{url} served the root-only file ({status}): {body}");
                // What is served is the task's own output (the supervisor's files are out of
                // its reach), or a refusal — never anything else.
                let own = if stream == "stdout" { "task-output" } else { "task-error" };
                assert!(
                    (status == 200 && body.contains(own)) || status == 403 || status == 404,
                    "{url}: {status} {body}"
                );
            }
        }
    }
    assert_eq!(std::fs::read_to_string(&secret_file).unwrap(), format!("{secret}\n"), "the secret is unchanged");
}

#[test]
fn racing_links_into_the_log_rollover_never_hands_a_root_file_to_the_task() {
    if !privileged("racing_links_into_the_log_rollover_never_hands_a_root_file_to_the_task") {
        return;
    }
    let c = cluster();
    // Stand-ins for /etc/passwd and /etc/cron.d/x: root's, world-readable, outside any sandbox.
    let original = "root:x:0:0:root:/root:/bin/bash\n";
    let (_keep, victim) = root_file(original, 0o644);
    let v = victim.display();
    // Two processes keep replacing `stdout` (where the task can name it) by a link to the victim,
    // atomically (symlink, then rename over the name), in a loop without forks; another writes
    // RACE_ROLLOVERS × 10 MiB, one rollover after another.
    let command = format!(
        r#"python3 -c 'import os, sys
d = os.environ["CAPSTAN_SANDBOX"]
while True:
    for x in (d, d + "/../logs"):
        t = x + "/.plant"
        try:
            os.symlink(sys.argv[1], t); os.rename(t, x + "/stdout")
        except OSError:
            try: os.unlink(t)
            except OSError: pass' {v} &
p1=$!
python3 -c 'import sys
line = b"x" * 1023 + b"\n"
for _ in range({RACE_ROLLOVERS}): sys.stdout.buffer.write(line * 10240)
sys.stdout.flush()' || exit 1
kill $p1; exit 0"#
    );
    let mut spec = job_spec("hostile/prod/race", "batch", 1, &command);
    spec["max_failures"] = json!(0);
    spec["task"]["disk"] = json!("512MiB");
    let id = c.create_job(&spec)[0].clone();
    let ended = wait_until(RACE_DEADLINE, "the racing task wrote every rollover and ended", || {
        let meta = std::fs::metadata(&victim).map_err(|e| e.to_string())?;
        // Checked on every poll too: a win shows here before the task ends.
        if meta.uid() != 0 || meta.gid() != 0 {
            return Ok(None);
        }
        match c.task(&id)? {
            Some(t) if is_terminal(&t) => Ok(Some(t)),
            other => Err(format!("{other:?}")),
        }
    });
    let meta = std::fs::metadata(&victim).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "the root-owned file was handed to the task's user");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), original, "the root-owned file was written to");
    let t = ended.expect("checked above");
    assert_eq!(t["state"], "FINISHED", "the writer ran through every rollover while links were planted: {t}");
}

#[test]
fn a_second_job_of_the_same_user_cannot_read_the_first_ones_sandbox() {
    if !privileged("a_second_job_of_the_same_user_cannot_read_the_first_ones_sandbox") {
        return;
    }
    let c = cluster();
    let secret = format!("tenant-a-secret-{}", std::process::id());
    let mut a = service("tenant-a/prod/app", r#"echo "$SECRET"; echo "$SECRET" > mine; exec sleep 600"#);
    a["task"]["env"] = json!({"SECRET": secret});
    let a_id = c.create_job(&a)[0].clone();
    let a_task = c.wait_task_state(&a_id, "RUNNING", SOON);
    wait_until(SOON, "tenant A wrote its file", || ensure(task_file(&c, &a_id, "mine").is_some(), &a_id));
    let a_pid = a_task["pid"].as_u64().expect("a pid");
    let a_sandbox = c.sandbox(&a_id);
    // Tenant B, also `nobody`, tries every way in it knows of (paths of both layouts, and /proc).
    let probe = r#"for f in "$A/launch.json" "$A/stdout" "$A/logs/stdout" "$A/mine" "$A/work/mine" \
  "/proc/$A_PID/environ" "/proc/$A_PID/cwd/mine" "/proc/$A_PID/root$A/work/mine"; do
  echo "== $f"; cat "$f" 2>&1; done
for d in "$A" "$A/work" "$A/logs" "/proc/$A_PID/cwd"; do echo "== ls $d"; ls -A "$d" 2>&1; done
echo probed; exec sleep 600"#;
    let mut b = service("tenant-b/prod/probe", probe);
    b["task"]["env"] = json!({"A": a_sandbox.display().to_string(), "A_PID": a_pid.to_string()});
    let b_id = c.create_job(&b)[0].clone();
    let seen = wait_log(&c, &b_id, "probed");
    assert!(!seen.contains(&secret), "tenant B read tenant A's secret:\n{seen}");
    for name in ["launch.json", "exit.json", "supervisor.json", "logs", "work", "stdout", "mine"] {
        assert!(!seen.lines().any(|l| l.trim() == name), "tenant B listed `{name}` of A's sandbox:\n{seen}");
    }
    assert_eq!(c.task(&a_id).unwrap().unwrap()["state"], "RUNNING", "tenant A was left alone");
}

#[test]
fn each_task_has_a_private_tmp_that_goes_with_its_sandbox() {
    if !privileged("each_task_has_a_private_tmp_that_goes_with_its_sandbox") {
        return;
    }
    let c = cluster();
    let marker = format!("capstan-hostile-tmp-{}", std::process::id());
    let host_tmp = Path::new("/tmp").join(&marker);
    let _ = std::fs::remove_file(&host_tmp);
    // A writes its file into /tmp and ends; B, running meanwhile, looks for it.
    let mut a = job_spec(
        "tenant-a/prod/tmp",
        "batch",
        1,
        &format!(
            r#"echo from-a > /tmp/{marker} && touch "$CAPSTAN_SANDBOX/written" &&
while [ ! -e "$CAPSTAN_SANDBOX/go" ]; do sleep 0.1; done"#
        ),
    );
    a["max_failures"] = json!(0);
    let a_id = c.create_job(&a)[0].clone();
    wait_until(SOON, "A wrote into its /tmp", || ensure(task_file(&c, &a_id, "written").is_some(), &a_id));
    let b = service("tenant-b/prod/tmp", &format!("cat /tmp/{marker} 2>&1; echo looked; exec sleep 600"));
    let b_id = c.create_job(&b)[0].clone();
    let seen = wait_log(&c, &b_id, "looked");
    assert!(!seen.contains("from-a"), "B saw A's /tmp file: {seen}");
    assert!(!host_tmp.exists(), "A's /tmp file reached the host's /tmp");
    // It lives in A's sandbox (counted with its disk) and goes when the sandbox is collected.
    let in_sandbox = c.work(&a_id).join("tmp").join(&marker);
    assert_eq!(std::fs::read_to_string(&in_sandbox).unwrap_or_default(), "from-a\n", "A's /tmp is in its sandbox");
    let written = task_file(&c, &a_id, "written").expect("A's own directory");
    std::fs::write(written.with_file_name("go"), "").unwrap();
    c.wait_task_state(&a_id, "FINISHED", SOON);
    wait_until(SOON, "A's sandbox, /tmp included, is collected", || {
        ensure(!in_sandbox.exists() && !c.sandbox(&a_id).exists(), &in_sandbox)
    });
    assert!(!host_tmp.exists());
}
