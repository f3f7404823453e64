//! Integration tests with real supervisors, processes, users and cgroups: launch, exit reasons,
//! limits, kill, and re-attaching after the launching handle or process is gone.

mod common;

use capstan_containerizer::{Attached, LaunchError};
use capstan_model::TaskExit;
use common::*;
use std::time::Duration;

const SHORT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn task_runs_as_nobody_with_env_and_output_files() {
    if !privileged("task_runs_as_nobody_with_env_and_output_files") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    let spec = spec(r#"id -u; echo "task=$CAPSTAN_TASK home=$HOME user=$USER pwd=$(pwd)"; echo oops >&2"#);
    let mut handle = c.launch(&sb.path, &spec).unwrap();
    let pid = handle.started().await.unwrap();
    assert!(pid > 0);
    let record = handle.wait().await;
    assert_eq!(record.exit, TaskExit::Exited { code: 0 }, "stderr: {}", read(&sb.log("stderr")));
    let work = sb.work();
    let p = work.display();
    assert_eq!(read(&sb.log("stdout")), format!("65534\ntask=hello home={p} user=nobody pwd={p}\n"));
    assert_eq!(read(&sb.log("stderr")), "oops\n");
    assert!(sb.path.join("exit.json").exists() && sb.path.join("task.json").exists());
    assert!(!c.task_cgroup(spec.task_id).controller_dir("memory").unwrap().exists(), "cgroup removed");
}

#[tokio::test]
async fn exit_code_is_recorded() {
    if !privileged("exit_code_is_recorded") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    let mut handle = c.launch(&sb.path, &spec("exit 3")).unwrap();
    assert_eq!(handle.wait().await.exit, TaskExit::Exited { code: 3 });
}

#[tokio::test]
async fn kill_9_from_outside_is_signaled() {
    if !privileged("kill_9_from_outside_is_signaled") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    let mut handle = c.launch(&sb.path, &spec("sleep 1000")).unwrap();
    let pid = handle.started().await.unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL).unwrap();
    assert_eq!(handle.wait().await.exit, TaskExit::Signaled { signal: 9 });
}

#[tokio::test]
async fn over_the_memory_limit_is_out_of_memory() {
    if !privileged("over_the_memory_limit_is_out_of_memory") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    let mut spec = spec(r#"python3 -c "b=bytearray(200*1024*1024); print('survived')""#);
    spec.mem_bytes = 64 << 20;
    let mut handle = c.launch(&sb.path, &spec).unwrap();
    let record = handle.wait().await;
    assert_eq!(record.exit, TaskExit::OutOfMemory { limit_bytes: 64 << 20 }, "stderr: {}", read(&sb.log("stderr")));
    assert!(record.exit.to_string().contains("64MiB"), "{}", record.exit);
    assert!(record.usage.mem_peak_bytes > 32 << 20, "{:?}", record.usage);
}

#[tokio::test]
async fn limits_are_in_the_cgroup_files() {
    if !privileged("limits_are_in_the_cgroup_files") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    let spec = spec("sleep 1000");
    let mut handle = c.launch(&sb.path, &spec).unwrap();
    let pid = handle.started().await.unwrap();
    let cg = c.task_cgroup(spec.task_id);
    let file =
        |controller: &str, name: &str| read(&cg.controller_dir(controller).unwrap().join(name)).trim().to_owned();
    match c.mode() {
        capstan_containerizer::CgroupMode::Unified => {
            assert_eq!(file("cpu", "cpu.max"), "20000 100000");
            assert_eq!(file("memory", "memory.max"), (128u64 << 20).to_string());
            assert_eq!(file("pids", "pids.max"), "64");
        }
        _ => {
            assert_eq!(file("cpu", "cpu.cfs_quota_us"), "20000");
            assert_eq!(file("cpu", "cpu.cfs_period_us"), "100000");
            assert_eq!(file("cpu", "cpu.shares"), "204");
            assert_eq!(file("memory", "memory.limit_in_bytes"), (128u64 << 20).to_string());
            let memsw = cg.controller_dir("memory").unwrap().join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                assert_eq!(read(&memsw).trim(), (128u64 << 20).to_string());
            }
            assert_eq!(file("pids", "pids.max"), "64");
        }
    }
    assert!(cg.procs().contains(&(pid as i32)), "task {pid} is in its cgroup: {:?}", cg.procs());
    handle.kill().unwrap();
    assert!(matches!(handle.wait().await.exit, TaskExit::Killed { .. }));
}

#[tokio::test]
async fn kill_ends_a_task_that_ignores_sigterm_and_all_its_children() {
    if !privileged("kill_ends_a_task_that_ignores_sigterm_and_all_its_children") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    let spec = spec("trap '' TERM; sleep 1000 & sleep 1000 & wait");
    let mut handle = c.launch(&sb.path, &spec).unwrap();
    handle.started().await.unwrap();
    let cg = c.task_cgroup(spec.task_id);
    assert!(eventually(SHORT, || cg.procs().len() >= 3), "shell and two sleeps: {:?}", cg.procs());
    let pids = cg.procs();
    handle.kill_by("test request").unwrap();
    let record = handle.wait().await;
    assert_eq!(record.exit, TaskExit::Killed { by: "test request".into() });
    for pid in &pids {
        assert!(!alive(*pid), "task process {pid} survived the kill");
    }
    assert!(cg.procs().is_empty());
    assert!(!cg.controller_dir("pids").unwrap().exists(), "cgroup removed");
}

#[tokio::test]
async fn supervisor_survives_a_dropped_handle_and_attach_finds_it() {
    if !privileged("supervisor_survives_a_dropped_handle_and_attach_finds_it") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    let mut handle = c.launch(&sb.path, &spec("sleep 1000")).unwrap();
    let pid = handle.started().await.unwrap();
    let supervisor = handle.supervisor_pid();
    drop(handle);
    let Attached::Running(mut handle) = c.attach(&sb.path).unwrap() else { panic!("not running") };
    assert_eq!(handle.supervisor_pid(), supervisor);
    assert_eq!(handle.started().await.unwrap(), pid);
    handle.kill().unwrap();
    assert_eq!(handle.wait().await.exit, TaskExit::Killed { by: "stop requested".into() });
    assert!(!alive(pid as i32));
}

#[tokio::test]
async fn a_task_that_ended_unwatched_is_found_exited_with_its_code() {
    if !privileged("a_task_that_ended_unwatched_is_found_exited_with_its_code") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    drop(c.launch(&sb.path, &spec("exit 7")).unwrap());
    assert!(eventually(SHORT, || sb.path.join("exit.json").exists()));
    let Attached::Exited(record) = c.attach(&sb.path).unwrap() else { panic!("still running?") };
    assert_eq!(record.exit, TaskExit::Exited { code: 7 });
}

#[tokio::test]
async fn a_supervisor_killed_without_a_record_is_lost_and_its_task_killed() {
    if !privileged("a_supervisor_killed_without_a_record_is_lost_and_its_task_killed") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    let spec = spec("sleep 1000");
    let mut handle = c.launch(&sb.path, &spec).unwrap();
    let pid = handle.started().await.unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(handle.supervisor_pid() as i32), nix::sys::signal::SIGKILL)
        .unwrap();
    let record = handle.wait().await;
    assert!(matches!(record.exit, TaskExit::SupervisorLost { .. }), "{:?}", record.exit);
    assert!(eventually(SHORT, || !alive(pid as i32)), "leftover task {pid} killed");
    assert!(c.task_cgroup(spec.task_id).procs().is_empty());
    let Attached::Exited(again) = c.attach(&sb.path).unwrap() else { panic!("running?") };
    assert_eq!(again.exit, record.exit, "the lost record is kept");
}

#[tokio::test]
async fn root_is_refused_unless_allowed() {
    if !privileged("root_is_refused_unless_allowed") {
        return;
    }
    let sb = sandbox();
    let mut spec = spec("id -u");
    spec.user = "root".into();
    let refused = containerizer(false).launch(&sb.path, &spec).unwrap_err();
    assert!(matches!(refused, LaunchError::RootRefused { .. }), "{refused}");
    assert!(refused.to_string().contains("root"));

    let mut handle = containerizer(true).launch(&sb.path, &spec).unwrap();
    assert_eq!(handle.wait().await.exit, TaskExit::Exited { code: 0 });
    assert_eq!(read(&sb.log("stdout")), "0\n");
}

#[tokio::test]
async fn an_unknown_user_fails_the_launch_with_its_name() {
    if !privileged("an_unknown_user_fails_the_launch_with_its_name") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    let mut spec = spec("true");
    spec.user = "no-such-capstan-user".into();
    let mut handle = c.launch(&sb.path, &spec).unwrap();
    let record = handle.started().await.unwrap_err();
    match &record.exit {
        TaskExit::LaunchFailed { message } => assert!(message.contains("no-such-capstan-user"), "{message}"),
        other => panic!("expected LaunchFailed, got {other:?}"),
    }
    assert_eq!(handle.wait().await, record);
}

#[tokio::test]
async fn the_sandbox_is_roots_and_its_task_alone_enters_it_with_a_private_tmp() {
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    if !privileged("the_sandbox_is_roots_and_its_task_alone_enters_it_with_a_private_tmp") {
        return;
    }
    let c = containerizer(false);
    let sb = sandbox();
    let marker = format!("capstan-private-tmp-{}", std::process::id());
    let spec = spec(&format!(
        "id -g; id -G; echo private > /tmp/{marker}; ls -A /tmp | grep -v '^[.]tmp'; cat /tmp/{marker}; \
             cat /var/tmp/{marker}; echo shm > /dev/shm/{marker}; ls -A /dev/shm"
    ));
    // (The sandbox lies in a tempdir under /tmp here, so its own path shows in the private /tmp
    // too, as `.tmpXXXX`: its work directory is mounted there again. See supervisor.rs.)
    let mut handle = c.launch(&sb.path, &spec).unwrap();
    let record = handle.wait().await;
    assert_eq!(record.exit, TaskExit::Exited { code: 0 }, "stderr: {}", read(&sb.log("stderr")));
    let launched = read(&sb.path.join("launch.json"));
    let gid: u32 = launched
        .split("\"sandbox_gid\": ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or_else(|| panic!("launch.json records the sandbox's group: {launched}"));
    assert!((capstan_containerizer::SANDBOX_GID_FIRST..=capstan_containerizer::SANDBOX_GID_LAST).contains(&gid));
    let out = read(&sb.log("stdout"));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], gid.to_string(), "the sandbox's group is the task's primary group: {out}");
    assert!(lines[1].split(' ').any(|g| g == gid.to_string()), "and a supplementary one: {out}");
    let expected = [marker.as_str(), "private", "private", marker.as_str()];
    assert_eq!(lines[2..], expected, "/tmp and /var/tmp are the sandbox's, /dev/shm the task's own: {out}");
    for dir in ["/tmp", "/var/tmp", "/dev/shm"] {
        assert!(!Path::new(dir).join(&marker).exists(), "nothing reached the host's {dir}");
    }
    assert_eq!(read(&sb.work().join("tmp").join(&marker)), "private\n", "the task's /tmp is in its sandbox");
    let mode = |p: &Path| {
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.mode() & 0o7777, m.uid(), m.gid())
    };
    assert_eq!(mode(&sb.path), (0o710, 0, 0), "root's, and given back to group root once the task ended");
    assert_eq!(mode(&sb.path.join("launch.json")), (0o600, 0, 0));
    assert_eq!(mode(&sb.path.join("exit.json")), (0o600, 0, 0));
    assert_eq!(mode(&sb.path.join("logs")), (0o700, 0, 0));
    assert_eq!(mode(&sb.log("stdout")), (0o600, 0, 0));
    assert_eq!(mode(&sb.work()), (0o700, 65534, gid));
}

#[tokio::test]
async fn running_tasks_never_share_a_group_and_an_ended_one_frees_its_own() {
    if !privileged("running_tasks_never_share_a_group_and_an_ended_one_frees_its_own") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    // Sandboxes side by side, as under one agent's DATA/sandboxes.
    let parent = sandbox();
    std::fs::create_dir_all(&parent.path).unwrap();
    let path = |name: &str| parent.path.join(name);
    let group = |p: &std::path::Path| std::fs::metadata(p).unwrap().gid();
    let c = containerizer(false);
    let mut first = c.launch(&path("a"), &spec("sleep 1000")).unwrap();
    let _second = c.launch(&path("b"), &spec("sleep 1000")).unwrap();
    first.started().await.unwrap();
    // A new containerizer knows nothing in memory, as an agent after a restart or kill -9: the
    // groups held are read from the sandboxes themselves.
    let restarted = containerizer(false);
    let mut third = restarted.launch(&path("c"), &spec("sleep 1000")).unwrap();
    third.started().await.unwrap();
    let held = [group(&path("a")), group(&path("b")), group(&path("c"))];
    for gid in held {
        assert!((capstan_containerizer::SANDBOX_GID_FIRST..=capstan_containerizer::SANDBOX_GID_LAST).contains(&gid));
    }
    assert!(held[0] != held[1] && held[1] != held[2] && held[0] != held[2], "three live tasks, three groups: {held:?}");
    // The first one ends: its sandbox goes back to group root and its id is free again.
    first.kill().unwrap();
    first.wait().await;
    assert_eq!(group(&path("a")), 0);
    let mut fourth = restarted.launch(&path("d"), &spec("sleep 1000")).unwrap();
    fourth.started().await.unwrap();
    assert_eq!(group(&path("d")), held[0].min(held[1]).min(held[2]), "the lowest free id is reused");
    for h in [&third, &fourth] {
        h.kill().unwrap();
    }
    third.wait().await;
    fourth.wait().await;
    let mut second = restarted.attach(&path("b")).unwrap();
    if let Attached::Running(h) = &mut second {
        h.kill().unwrap();
        h.wait().await;
    }
}
