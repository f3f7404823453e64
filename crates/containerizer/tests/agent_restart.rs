//! Integration test: a task outlives the `kill -9` of the process that launched it (an agent
//! restart), and a new containerizer attaches to its supervisor and stops it.
//!
//! The task keeps writing output, and its supervisor keeps copying it into the sandbox, while no
//! agent is there. The "agent" is this test binary re-executed with `CAPSTAN_TEST_LAUNCH_INTO` set: it runs only
//! the `launcher_process` test, which launches a task, prints a marker line and waits forever.

mod common;

use capstan_containerizer::Attached;
use capstan_model::TaskExit;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const LAUNCH_INTO: &str = "CAPSTAN_TEST_LAUNCH_INTO";
const MARKER: &str = "CAPSTAN-TEST-LAUNCHED";

/// Not a test of its own: the launching "agent" when re-executed by the test below.
#[tokio::test]
async fn launcher_process() {
    let Some(sandbox) = std::env::var_os(LAUNCH_INTO) else { return };
    let spec = spec("while :; do echo tick; sleep 0.05; done");
    let mut handle = containerizer(false).launch(sandbox.as_ref(), &spec).unwrap();
    let pid = handle.started().await.unwrap();
    println!("\n{MARKER} {pid}"); // libtest prints its own text in front
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn task_survives_kill_9_of_its_launcher_and_attach_stops_it() {
    if !privileged("task_survives_kill_9_of_its_launcher_and_attach_stops_it") {
        return;
    }
    let sb = sandbox();
    let mut launcher = Command::new(std::env::current_exe().unwrap())
        .args(["launcher_process", "--exact", "--nocapture", "--test-threads=1"])
        .env(LAUNCH_INTO, &sb.path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(launcher.stdout.take().unwrap());
    let task_pid: i32 = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.split_once(MARKER).map(|(_, p)| p.trim().parse().unwrap()))
        .expect("the launcher reports the task pid");
    launcher.kill().unwrap(); // SIGKILL
    launcher.wait().unwrap();

    assert!(alive(task_pid), "the task outlived its launcher");
    // Its supervisor still copies its output into the sandbox.
    let stdout = sb.log("stdout");
    let written = std::fs::metadata(&stdout).unwrap().len();
    assert!(eventually(Duration::from_secs(20), || std::fs::metadata(&stdout).unwrap().len() > written));
    let c = containerizer(false);
    let Attached::Running(mut handle) = c.attach(&sb.path).unwrap() else { panic!("not running") };
    assert_eq!(handle.started().await.unwrap(), task_pid as u32);
    handle.kill().unwrap();
    let record = handle.wait().await;
    assert_eq!(record.exit, TaskExit::Killed { by: "stop requested".into() });
    assert!(!alive(task_pid));
    let Attached::Exited(again) = c.attach(&sb.path).unwrap() else { panic!("running after the kill") };
    assert_eq!(again, record);
}
