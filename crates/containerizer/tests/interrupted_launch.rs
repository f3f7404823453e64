//! Integration tests: a launch interrupted by the death of the launching agent (`launch.json`
//! written, supervisor not started or not yet recorded) is found `NotStarted` and runs its task
//! exactly once when relaunched; at most one supervisor ever runs a sandbox's task
//! (`supervisor.lock`), and none runs a task whose end is recorded.

mod common;

use capstan_containerizer::{Attached, Containerizer, ContainerizerConfig, ExitRecord, LaunchSpec, EXIT_SANDBOX_BUSY};
use capstan_model::TaskExit;
use common::*;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SHORT: Duration = Duration::from_secs(20);
const SUPERVISOR: &str = env!("CARGO_BIN_EXE_capstan-supervisor");

/// Leaves `sandbox` exactly as `Containerizer::launch` leaves it right before it spawns the
/// supervisor: the "supervisor" here is `/bin/true`, gone at once without having done anything,
/// as if the agent had been killed before the spawn.
fn interrupted_launch(sandbox: &Path, spec: &LaunchSpec) {
    let c = Containerizer::new(ContainerizerConfig {
        cgroup_root: CGROUP_ROOT.into(),
        allow_root: false,
        supervisor_cmd: vec!["/bin/true".into()],
    })
    .unwrap();
    let handle = c.launch(sandbox, spec).unwrap();
    let pid = handle.supervisor_pid();
    drop(handle); // reaped by a thread; never waited on (that would record the launch lost)
    assert!(eventually(SHORT, || !alive(pid as i32)));
    for file in ["launch.json", "supervisor-config.json"] {
        assert!(sandbox.join(file).exists(), "{file} written");
    }
    for file in ["supervisor.json", "task.json", "exit.json"] {
        assert!(!sandbox.join(file).exists(), "no {file}");
    }
}

/// Locks `SANDBOX/supervisor.lock` as a supervisor does (until the file is dropped).
fn hold_lock(sandbox: &Path) -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(sandbox.join("supervisor.lock"))
        .unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0, "lock taken");
    file
}

#[tokio::test]
async fn an_interrupted_launch_is_not_started_and_relaunch_runs_it_once() {
    if !privileged("an_interrupted_launch_is_not_started_and_relaunch_runs_it_once") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    interrupted_launch(&sb.path, &spec("echo ran >> ran; exit 3"));
    for _ in 0..2 {
        match c.attach(&sb.path).unwrap() {
            Attached::NotStarted => {}
            other => panic!("an interrupted launch must be NotStarted, not {other:?}"),
        }
        assert!(!sb.path.join("exit.json").exists(), "attach records no end for it");
    }
    let mut handle = c.relaunch(&sb.path).unwrap();
    handle.started().await.unwrap();
    let record = handle.wait().await;
    assert_eq!(record.exit, TaskExit::Exited { code: 3 });
    assert_eq!(read(&sb.work().join("ran")), "ran\n", "the task ran once");
    let Attached::Exited(again) = c.attach(&sb.path).unwrap() else { panic!("running after its end?") };
    assert_eq!(again, record);
}

#[test]
fn attach_waits_for_a_supervisor_that_holds_the_lock_and_is_not_started_once_it_is_released() {
    if !privileged("attach_waits_for_a_supervisor_that_holds_the_lock_and_is_not_started_once_it_is_released") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    interrupted_launch(&sb.path, &spec("echo ran >> ran"));
    // A supervisor between taking the lock and recording itself (then dying).
    let lock = hold_lock(&sb.path);
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        drop(lock);
    });
    let t0 = Instant::now();
    let attached = c.attach(&sb.path).unwrap();
    assert!(matches!(attached, Attached::NotStarted), "{attached:?}");
    assert!(t0.elapsed() >= Duration::from_millis(300), "attach waited while the lock was held");
    release.join().unwrap();
    assert!(!sb.path.join("exit.json").exists());
    assert!(!sb.work().join("ran").exists());
}

#[test]
fn of_supervisors_started_together_on_one_sandbox_exactly_one_runs_the_task() {
    if !privileged("of_supervisors_started_together_on_one_sandbox_exactly_one_runs_the_task") {
        return;
    }
    let sb = sandbox();
    interrupted_launch(&sb.path, &spec("echo ran >> ran; sleep 2"));
    let supervisors: Vec<_> = (0..4)
        .map(|_| Command::new(SUPERVISOR).arg(&sb.path).stdin(Stdio::null()).stdout(Stdio::null()).spawn().unwrap())
        .collect();
    let mut codes: Vec<i32> = supervisors.into_iter().map(|mut s| s.wait().unwrap().code().unwrap()).collect();
    codes.sort_unstable();
    assert_eq!(codes, [0, EXIT_SANDBOX_BUSY, EXIT_SANDBOX_BUSY, EXIT_SANDBOX_BUSY], "one ran it, three gave up");
    assert_eq!(read(&sb.work().join("ran")), "ran\n", "the task ran once");
    let record: ExitRecord = serde_json::from_str(&read(&sb.path.join("exit.json"))).unwrap();
    assert_eq!(record.exit, TaskExit::Exited { code: 0 });
}

#[tokio::test]
async fn two_relaunches_racing_run_the_task_once_and_both_handles_follow_it() {
    if !privileged("two_relaunches_racing_run_the_task_once_and_both_handles_follow_it") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    interrupted_launch(&sb.path, &spec("echo ran >> ran; sleep 1; exit 4"));
    // The second stands for a supervisor the crashed agent had spawned: one of them gives up,
    // and its handle follows the other instead of calling the task lost.
    let mut first = c.relaunch(&sb.path).unwrap();
    let mut second = c.relaunch(&sb.path).unwrap();
    let pid = first.started().await.unwrap();
    assert_eq!(second.started().await.unwrap(), pid);
    let record = first.wait().await;
    assert_eq!(record.exit, TaskExit::Exited { code: 4 });
    assert_eq!(second.wait().await, record);
    assert_eq!(read(&sb.work().join("ran")), "ran\n", "the task ran once");
}

#[tokio::test]
async fn a_supervisor_started_on_a_sandbox_with_an_exit_record_runs_nothing() {
    if !privileged("a_supervisor_started_on_a_sandbox_with_an_exit_record_runs_nothing") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    let mut handle = c.launch(&sb.path, &spec("echo ran >> ran")).unwrap();
    let record = handle.wait().await;
    assert_eq!(record.exit, TaskExit::Exited { code: 0 });
    let exit_json = read(&sb.path.join("exit.json"));

    let status = Command::new(SUPERVISOR).arg(&sb.path).stdin(Stdio::null()).stdout(Stdio::null()).status().unwrap();
    assert_eq!(status.code(), Some(0));
    // Through the handle too: it finds the record that is there.
    let mut handle = c.relaunch(&sb.path).unwrap();
    assert_eq!(handle.wait().await, record);

    assert_eq!(read(&sb.work().join("ran")), "ran\n", "the task did not run again");
    assert_eq!(read(&sb.path.join("exit.json")), exit_json, "the record is untouched");
}

#[tokio::test]
async fn the_task_does_not_inherit_the_sandbox_lock() {
    if !privileged("the_task_does_not_inherit_the_sandbox_lock") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    let mut handle = c.launch(&sb.path, &spec("sleep 1000")).unwrap();
    let pid = handle.started().await.unwrap();
    let held: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| target.ends_with("supervisor.lock"))
        .collect();
    assert!(held.is_empty(), "the task holds {held:?}");
    handle.kill().unwrap();
    assert!(matches!(handle.wait().await.exit, TaskExit::Killed { .. }));
}
