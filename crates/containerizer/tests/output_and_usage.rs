//! Integration tests with real supervisors and cgroups: output pipes and log rotation, the end of
//! the output before `exit.json`, the pids limit against a burst of forks, and usage of a running
//! task.

mod common;

use capstan_containerizer::{logs::rotated_path, CgroupMode};
use capstan_model::TaskExit;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

const SHORT: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The numbers of lines `PREFIX NUMBER ...`, in the order the files hold them (oldest first).
fn numbers(files: &[&Path], prefix: &str) -> Vec<u64> {
    files
        .iter()
        .flat_map(|f| read(f).lines().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|line| line.strip_prefix(prefix).and_then(|r| r.split_whitespace().next()?.parse().ok()))
        .collect()
}

#[tokio::test]
async fn output_is_rotated_per_stream_at_the_limit_keeping_n_files() {
    if !privileged("output_is_rotated_per_stream_at_the_limit_keeping_n_files") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    // Lines of 92 bytes: 40,000 of them (3.5 MiB) on stdout, 15,000 (1.3 MiB) on stderr.
    let pad = "x".repeat(80);
    let mut spec = spec(&format!(
        "seq -f 'out %06g {pad}' 1 40000; echo LAST-OUT; seq -f 'err %06g {pad}' 1 15000 >&2; echo LAST-ERR >&2"
    ));
    spec.cpus_milli = 1000;
    spec.log_max_bytes = MIB;
    spec.log_keep = 2;
    let mut handle = c.launch(&sb.path, &spec).unwrap();
    let record = handle.wait().await;
    assert_eq!(record.exit, TaskExit::Exited { code: 0 }, "stderr: {}", read(&sb.log("stderr")));

    let out = sb.log("stdout");
    let (out1, out2) = (rotated_path(&out, 1), rotated_path(&out, 2));
    for f in [&out, &out1, &out2] {
        assert!(size(f) <= MIB, "{} is {} bytes", f.display(), size(f));
    }
    assert!(!rotated_path(&out, 3).exists(), "only log_keep = 2 rotated files are kept");
    assert!(read(&out).ends_with("LAST-OUT\n"), "the last line is in stdout");
    // Three rotations happened, each cut after a whole line: what is kept is one unbroken run of
    // lines that ends with the last one.
    let kept = numbers(&[&out2, &out1, &out], "out ");
    assert_eq!(kept.last(), Some(&40000));
    assert!(kept.windows(2).all(|w| w[1] == w[0] + 1), "no line lost or repeated across rotations");
    // 11,397 lines fill a file: two full rotated files plus the rest, and the oldest part is gone.
    assert!(kept.len() > 2 * 11_000 && kept[0] > 1, "kept {} lines from line {}", kept.len(), kept[0]);
    for file in [&out, &out1, &out2] {
        let meta = std::fs::symlink_metadata(file).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600), "{}: root's alone, never the task's", file.display());
    }

    let err = sb.log("stderr");
    let err1 = rotated_path(&err, 1);
    assert!(size(&err) <= MIB && size(&err1) <= MIB);
    assert!(!rotated_path(&err, 2).exists(), "stderr rotated once, on its own size");
    assert!(read(&err).ends_with("LAST-ERR\n"));
    assert_eq!(numbers(&[&err1, &err], "err "), (1..=15000).collect::<Vec<u64>>(), "all of stderr is kept");
    assert!(!read(&err).contains("out ") && !read(&out).contains("err "), "the streams stay apart");
    assert_eq!(read(&sb.path.join("supervisor.log")), "", "the supervisor had nothing to complain about");
}

#[tokio::test]
async fn the_last_line_is_in_the_file_when_exit_json_appears() {
    if !privileged("the_last_line_is_in_the_file_when_exit_json_appears") {
        return;
    }
    let c = containerizer(false);
    for round in 0..6 {
        let sb = sandbox();
        // Enough output to keep the pipe busy, then the last words and an immediate exit; every
        // other round a background writer keeps the pipe full until the supervisor kills it.
        let chatter = if round % 2 == 1 { "while :; do echo chatter; done & " } else { "" };
        let mut spec = spec(&format!("{chatter}seq 1 30000; echo 'final words'; echo 'final error' >&2; exit 4"));
        spec.cpus_milli = 1000;
        drop(c.launch(&sb.path, &spec).unwrap());
        let exit = sb.path.join("exit.json");
        assert!(eventually(SHORT, || exit.exists()), "round {round}: no exit.json");
        let out = read(&sb.log("stdout"));
        if chatter.is_empty() {
            let tail = &out[out.len().saturating_sub(30)..];
            assert!(out.ends_with("29999\n30000\nfinal words\n"), "round {round}: stdout ends {tail:?}");
        } else {
            // The chatter may come between any two writes, but each write is whole.
            assert!(out.contains("\nfinal words\n"), "round {round}: no final words after the chatter");
        }
        assert_eq!(read(&sb.log("stderr")), "final error\n", "round {round}");
    }
}

#[tokio::test]
async fn a_background_process_holding_the_pipes_does_not_delay_the_end() {
    if !privileged("a_background_process_holding_the_pipes_does_not_delay_the_end") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    let spec = spec("sleep 1000 & while :; do echo chatter; done & echo 'main is done'");
    let started = Instant::now();
    let mut handle = c.launch(&sb.path, &spec).unwrap();
    let record = handle.wait().await;
    assert_eq!(record.exit, TaskExit::Exited { code: 0 });
    // The supervisor gives up on open pipes only after 5 s; the cgroup kill closes them at once.
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    assert!(read(&sb.log("stdout")).contains("main is done\n"));
    assert!(c.task_cgroup(spec.task_id).procs().is_empty());
}

#[tokio::test]
async fn a_task_writing_as_fast_as_it_can_stays_bounded_and_killable() {
    if !privileged("a_task_writing_as_fast_as_it_can_stays_bounded_and_killable") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    let mut spec = spec("yes 'as fast as it can'");
    spec.cpus_milli = 1000;
    spec.log_max_bytes = 64 << 10;
    spec.log_keep = 1;
    let mut handle = c.launch(&sb.path, &spec).unwrap();
    handle.started().await.unwrap();
    let out = sb.log("stdout");
    let out1 = rotated_path(&out, 1);
    // Several rotations under a writer that never pauses.
    assert!(eventually(SHORT, || out1.exists() && size(&out1) > 0), "stdout was rotated");
    let first = std::fs::metadata(&out1).unwrap().ino();
    assert!(eventually(SHORT, || std::fs::metadata(&out1).map(|m| m.ino()).unwrap_or(first) != first));
    handle.kill_by("enough").unwrap();
    let record = tokio::time::timeout(SHORT, handle.wait()).await.expect("the supervisor was not blocked");
    assert_eq!(record.exit, TaskExit::Killed { by: "enough".into() });
    assert!(size(&out) <= 64 << 10 && size(&out1) <= 64 << 10);
    assert!(!rotated_path(&out, 2).exists());
    assert!(read(&out1).lines().all(|l| l == "as fast as it can"), "whole lines only");
}

#[tokio::test]
async fn a_fork_burst_stays_within_pids_max_and_the_kill_empties_the_cgroup() {
    if !privileged("a_fork_burst_stays_within_pids_max_and_the_kill_empties_the_cgroup") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    // A bounded burst: 200 attempts at `sleep 100 &`. (dash gives up at the first failed fork,
    // so the attempts are made from python, which counts them.)
    let mut spec = spec(
        r#"python3 -c "
import subprocess, time
started = failed = 0
for _ in range(200):
    try:
        subprocess.Popen(['sleep', '100'])
        started += 1
    except OSError:
        failed += 1
print('started', started, 'failed', failed, flush=True)
time.sleep(1000)
""#,
    );
    spec.cpus_milli = 1000;
    spec.pids_max = Some(64);
    let mut handle = c.launch(&sb.path, &spec).unwrap();
    handle.started().await.unwrap();
    let cg = c.task_cgroup(spec.task_id);
    let pids_dir = cg.controller_dir("pids").unwrap();
    let current = || read(&pids_dir.join("pids.current")).trim().parse::<u64>().unwrap_or(0);
    let mut most = 0;
    let stdout = sb.log("stdout");
    assert!(
        eventually(SHORT, || {
            most = most.max(current());
            read(&stdout).starts_with("started")
        }),
        "the burst ends: {}",
        read(&sb.log("stderr"))
    );
    most = most.max(current());
    let report = read(&stdout);
    let counts: Vec<u64> = report.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let [started, failed] = counts[..] else { panic!("unexpected report {report:?}") };
    assert_eq!(started + failed, 200);
    assert!(started < 64 && failed > 136, "{report}");
    assert!(most <= 64, "pids.current reached {most}");
    let events = read(&pids_dir.join("pids.events"));
    assert!(events.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0) > 0, "{events}");
    let pids = cg.procs();
    assert!(pids.len() as u64 > started, "python and its sleeps: {}", pids.len());

    handle.kill().unwrap();
    assert!(matches!(handle.wait().await.exit, TaskExit::Killed { .. }));
    for pid in &pids {
        assert!(!alive(*pid), "process {pid} survived the kill");
    }
    assert!(cg.procs().is_empty());
    assert!(!pids_dir.exists(), "cgroup removed");
}

#[tokio::test]
async fn usage_of_a_running_cpu_bound_task_shows_its_quota_and_throttling() {
    if !privileged("usage_of_a_running_cpu_bound_task_shows_its_quota_and_throttling") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    let spec = spec("while :; do :; done");
    assert_eq!(spec.cpus_milli, 200);
    let mut handle = c.launch(&sb.path, &spec).unwrap();
    handle.started().await.unwrap();
    let (t0, u0) = (Instant::now(), c.read_usage(spec.task_id));
    // A measurement over an interval, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (t1, u1) = (Instant::now(), c.read_usage(spec.task_id));
    let share = (u1.cpu_usage_ns - u0.cpu_usage_ns) as f64 / (t1 - t0).as_nanos() as f64;
    assert!((0.12..=0.30).contains(&share), "cpu share {share:.3} with a 0.2 CPU quota: {u0:?} → {u1:?}");
    assert!(u1.nr_throttled > u0.nr_throttled && u1.throttled_ns > u0.throttled_ns, "throttled: {u1:?}");
    // 0.8 of every 100 ms period is spent throttled; allow for the first period and jitter.
    let throttled = (u1.throttled_ns - u0.throttled_ns) as f64 / (t1 - t0).as_nanos() as f64;
    assert!(throttled > 0.3, "throttled share {throttled:.3}: {u1:?}");
    assert!(u1.mem_bytes > 0 && u1.mem_peak_bytes >= u1.mem_bytes, "memory: {u1:?}");
    assert!(handle.usage().cpu_usage_ns >= u1.cpu_usage_ns, "the handle reads the same cgroup");

    handle.kill().unwrap();
    let record = handle.wait().await;
    assert!(record.usage.cpu_usage_ns >= u1.cpu_usage_ns, "{:?}", record.usage);
    assert_eq!(c.read_usage(spec.task_id), Default::default(), "no cgroup, no usage");
    if c.mode() == CgroupMode::Unified {
        assert_eq!(record.usage.throttled_ns % 1000, 0, "v2 counts microseconds");
    }
}
