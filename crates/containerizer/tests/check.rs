//! Command health checks with real processes: exit codes and stderr in the detail, the user
//! switch, root refused, timeouts that kill the whole process group, and nothing left behind.

use capstan_containerizer::check::{run_command_check, CheckOutcome};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// True when this test may run (it switches users, so it needs root). Otherwise it says loudly
/// why it skips — or, with `CAPSTAN_REQUIRE_PRIVILEGED_TESTS=1` (CI), fails.
fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let why = "it must run as root (it runs commands as other users)";
    if std::env::var("CAPSTAN_REQUIRE_PRIVILEGED_TESTS").as_deref() == Ok("1") {
        panic!("{test}: {why}, and CAPSTAN_REQUIRE_PRIVILEGED_TESTS=1 forbids skipping");
    }
    // Straight to fd 2: libtest would capture (and hide) an `eprintln!` of a passing test.
    let _ =
        std::io::Write::write_all(&mut std::io::stderr(), format!("\n!!!!! SKIPPED {test}: {why} !!!!!\n").as_bytes());
    false
}

/// A sandbox any user can enter (a tempdir itself is 0700), in a parent any user can traverse.
struct Sandbox {
    _parent: tempfile::TempDir,
    path: PathBuf,
}

fn sandbox() -> Sandbox {
    let parent = tempfile::tempdir().unwrap();
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = parent.path().join("sandbox");
    std::fs::create_dir(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    Sandbox { _parent: parent, path }
}

const SECOND: Duration = Duration::from_secs(1);

async fn as_root(command: &str, dir: &Path, timeout: Duration) -> CheckOutcome {
    run_command_check(command, "root", dir, &[], timeout, true, &[]).await
}

/// True once `pid` is gone (or a zombie nobody reaped yet: dead all the same).
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

fn wait_dead(pid: u32) -> bool {
    let until = Instant::now() + 3 * SECOND;
    while Instant::now() < until {
        if is_dead(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[tokio::test]
async fn test_f_ready_fails_then_passes_once_the_file_exists() {
    if !privileged("test_f_ready_fails_then_passes_once_the_file_exists") {
        return;
    }
    let sb = sandbox();
    let before = run_command_check("test -f ready", "nobody", &sb.path, &[], SECOND, false, &[]).await;
    assert_eq!(before, CheckOutcome { ok: false, detail: "command exited with code 1".into() });
    std::fs::write(sb.path.join("ready"), b"").unwrap();
    let after = run_command_check("test -f ready", "nobody", &sb.path, &[], SECOND, false, &[]).await;
    assert_eq!(after, CheckOutcome { ok: true, detail: "command exited with code 0".into() });
}

#[tokio::test]
async fn runs_as_the_user_in_the_sandbox_with_the_task_env() {
    if !privileged("runs_as_the_user_in_the_sandbox_with_the_task_env") {
        return;
    }
    let sb = sandbox();
    let env = vec![("GREETING".to_string(), "hello".to_string())];
    let out = run_command_check(
        r#"echo "$(id -u):$(id -g):$(id -G):$(pwd):$GREETING:$HOME:$USER" >&2; exit 3"#,
        "nobody",
        &sb.path,
        &env,
        SECOND,
        false,
        &[],
    )
    .await;
    let dir = sb.path.display();
    assert_eq!(
        out,
        CheckOutcome {
            ok: false,
            detail: format!("command exited with code 3: 65534:65534:65534:{dir}:hello:{dir}:nobody")
        }
    );
}

#[tokio::test]
async fn the_first_line_of_stderr_or_else_stdout_explains_a_failure() {
    if !privileged("the_first_line_of_stderr_or_else_stdout_explains_a_failure") {
        return;
    }
    let sb = sandbox();
    let out = as_root("echo out; echo '  first problem  ' >&2; echo second >&2; exit 2", &sb.path, SECOND).await;
    assert_eq!(out.detail, "command exited with code 2: first problem");
    let out = as_root("echo only stdout; exit 4", &sb.path, SECOND).await;
    assert_eq!(out.detail, "command exited with code 4: only stdout");
    let out = as_root("kill -SEGV $$", &sb.path, SECOND).await;
    assert_eq!(out, CheckOutcome { ok: false, detail: "command was killed by SIGSEGV".into() });
}

#[tokio::test]
async fn a_chatty_command_does_not_block_on_a_full_pipe() {
    if !privileged("a_chatty_command_does_not_block_on_a_full_pipe") {
        return;
    }
    let sb = sandbox();
    let started = Instant::now();
    let out = as_root("head -c 1000000 /dev/zero | tr '\\0' x; exit 5", &sb.path, 5 * SECOND).await;
    assert!(started.elapsed() < 3 * SECOND, "took {:?}", started.elapsed());
    assert!(!out.ok);
    let expected = format!("command exited with code 5: {}", "x".repeat(512));
    assert_eq!(out.detail, expected, "only the first 512 bytes are kept");
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    if !privileged("a_timeout_kills_the_whole_process_group") {
        return;
    }
    let sb = sandbox();
    let started = Instant::now();
    let out = as_root("sleep 30 & echo $! > bg.pid; sleep 30", &sb.path, Duration::from_millis(300)).await;
    let took = started.elapsed();
    assert_eq!(out, CheckOutcome { ok: false, detail: "command timed out after 300ms".into() });
    assert!(took >= Duration::from_millis(300) && took < 2 * SECOND, "took {took:?}");
    let bg: u32 = std::fs::read_to_string(sb.path.join("bg.pid")).unwrap().trim().parse().unwrap();
    assert!(wait_dead(bg), "the background sleep {bg} outlived the timed-out check");

    let out = as_root("sleep 5", &sb.path, 2 * SECOND).await;
    assert_eq!(out.detail, "command timed out after 2s");
}

#[tokio::test]
async fn a_passing_check_leaves_nothing_behind() {
    if !privileged("a_passing_check_leaves_nothing_behind") {
        return;
    }
    let sb = sandbox();
    let started = Instant::now();
    // The background sleep also holds stdout open: the check must not wait for it.
    let out = as_root("sleep 30 & echo $! > bg.pid; echo fine", &sb.path, 5 * SECOND).await;
    assert!(started.elapsed() < 2 * SECOND, "took {:?}", started.elapsed());
    assert_eq!(out, CheckOutcome { ok: true, detail: "command exited with code 0: fine".into() });
    let bg: u32 = std::fs::read_to_string(sb.path.join("bg.pid")).unwrap().trim().parse().unwrap();
    assert!(wait_dead(bg), "the background sleep {bg} outlived the check");
}

#[tokio::test]
async fn a_dropped_check_kills_its_process_group() {
    if !privileged("a_dropped_check_kills_its_process_group") {
        return;
    }
    let sb = sandbox();
    let dir = sb.path.clone();
    let check = tokio::spawn(async move { as_root("echo $$ > sh.pid; sleep 30", &dir, 30 * SECOND).await });
    let pid_file = sb.path.join("sh.pid");
    let until = Instant::now() + 3 * SECOND;
    let pid: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse().ok()) {
            break pid;
        }
        assert!(Instant::now() < until, "the check never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    check.abort();
    let _ = check.await;
    assert!(wait_dead(pid), "the shell {pid} outlived its aborted check");
}

#[tokio::test]
async fn root_is_refused_unless_allowed() {
    // No privileges needed: the refusal comes before anything runs.
    let sb = sandbox();
    let out = run_command_check("true", "root", &sb.path, &[], SECOND, false, &[]).await;
    assert!(!out.ok);
    assert!(out.detail.starts_with("command not run: refusing to run it as \"root\" (uid 0)"), "{}", out.detail);
}

#[tokio::test]
async fn an_unknown_user_is_a_failed_check() {
    let sb = sandbox();
    let out = run_command_check("true", "no-such-user-capstan", &sb.path, &[], SECOND, false, &[]).await;
    assert_eq!(
        out,
        CheckOutcome {
            ok: false,
            detail: "command not run: user \"no-such-user-capstan\" does not exist on this host".into()
        }
    );
}

#[tokio::test]
async fn a_sandbox_the_user_cannot_enter_is_a_failed_check_not_a_root_run() {
    if !privileged("a_sandbox_the_user_cannot_enter_is_a_failed_check_not_a_root_run") {
        return;
    }
    let sb = sandbox();
    std::fs::set_permissions(&sb.path, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = run_command_check("true", "nobody", &sb.path, &[], SECOND, false, &[]).await;
    assert!(!out.ok);
    assert!(out.detail.starts_with("command not run as \"nobody\" in "), "{}", out.detail);
    assert!(out.detail.contains("Permission denied"), "{}", out.detail);
}

#[tokio::test]
async fn runs_as_the_agents_own_user_without_privileges_to_drop() {
    // Root or not: as the agent's own user. Without root this is the path with nothing to drop.
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid()).unwrap().expect("the test's own user");
    let sb = sandbox();
    let out = run_command_check("id -u >&2; exit 9", &me.name, &sb.path, &[], SECOND, true, &[]).await;
    assert_eq!(out, CheckOutcome { ok: false, detail: format!("command exited with code 9: {}", me.uid) });
}

/// A real task cgroup (memory limit `mem_bytes`) holding one `sleep` that plays the task;
/// killed and removed when dropped.
struct TaskGroup {
    cgroup: capstan_containerizer::TaskCgroup,
    task: std::process::Child,
}

impl TaskGroup {
    fn new(id: u64, mem_bytes: u64) -> TaskGroup {
        let hierarchies = capstan_containerizer::cgroups::Hierarchies::discover().unwrap();
        let cgroup = hierarchies.task_cgroup("capstan-check-test", capstan_model::TaskId(id));
        let task = std::process::Command::new("sleep").arg("600").spawn().unwrap();
        cgroup.setup(task.id(), &capstan_containerizer::CgroupLimits::new(0, mem_bytes, Some(64))).unwrap();
        TaskGroup { cgroup, task }
    }

    fn dirs(&self) -> Vec<PathBuf> {
        self.cgroup.dirs().into_iter().map(PathBuf::from).collect()
    }
}

impl Drop for TaskGroup {
    fn drop(&mut self) {
        let _ = self.task.kill();
        let _ = self.task.wait();
        self.cgroup.kill_all(3 * SECOND, &mut || {});
        let _ = self.cgroup.remove();
    }
}

#[tokio::test]
async fn a_check_runs_inside_the_tasks_cgroup_and_its_memory_counts_against_the_task() {
    if !privileged("a_check_runs_inside_the_tasks_cgroup_and_its_memory_counts_against_the_task") {
        return;
    }
    let sb = sandbox();
    let group = TaskGroup::new(0x7e57_0001, 32 << 20);
    let memory = group.cgroup.controller_dir("memory").unwrap();
    let rel = group.cgroup.rel.display().to_string();
    let where_ = run_command_check(
        "grep -E ':memory:|^0::' /proc/self/cgroup; exit 3",
        "nobody",
        &sb.path,
        &[],
        5 * SECOND,
        false,
        &group.dirs(),
    )
    .await;
    assert!(where_.detail.ends_with(&format!("/{rel}")), "the check ran in {:?}, not in {rel}", where_.detail);

    // 256 MiB written (not only reserved) against the task's 32 MiB: the kernel kills the check.
    let hog = "exec python3 -c \"b = b'x' * (256 << 20); print(len(b))\"";
    let out = run_command_check(hog, "nobody", &sb.path, &[], 30 * SECOND, false, &group.dirs()).await;
    assert_eq!(out, CheckOutcome { ok: false, detail: "command was killed by SIGKILL".into() });
    let oom = std::fs::read_to_string(memory.join("memory.oom_control"))
        .or_else(|_| std::fs::read_to_string(memory.join("memory.events")))
        .unwrap();
    assert!(oom.lines().any(|l| l.starts_with("oom_kill ") && l != "oom_kill 0"), "no OOM kill counted: {oom}");
    assert!(!is_dead(group.task.id()), "the task itself, the smaller process, is spared");
}

#[tokio::test]
async fn a_timed_out_check_kills_what_it_started_with_setsid() {
    if !privileged("a_timed_out_check_kills_what_it_started_with_setsid") {
        return;
    }
    let sb = sandbox();
    let group = TaskGroup::new(0x7e57_0002, 64 << 20);
    let out = as_root_in(
        "setsid -f sh -c 'echo $$ > escaped.pid; exec sleep 600'; sleep 600",
        &sb.path,
        2 * SECOND,
        &group.dirs(),
    )
    .await;
    assert_eq!(out.detail, "command timed out after 2s");
    let escaped: u32 = std::fs::read_to_string(sb.path.join("escaped.pid")).unwrap().trim().parse().unwrap();
    assert!(wait_dead(escaped), "the setsid'd sleep {escaped} outlived its timed-out check");
    assert_eq!(group.cgroup.procs(), vec![group.task.id() as i32], "only the task is left in its cgroup");
}

#[tokio::test]
async fn what_a_passing_check_left_with_setsid_is_in_the_tasks_cgroup_and_dies_with_it() {
    if !privileged("what_a_passing_check_left_with_setsid_is_in_the_tasks_cgroup_and_dies_with_it") {
        return;
    }
    let sb = sandbox();
    let group = TaskGroup::new(0x7e57_0003, 64 << 20);
    // The check passes only once the escaped sleep is in its own session (its pid file is
    // written after `setsid`): before that, the end of the check's process group could take it.
    let out = as_root_in(
        "setsid -f sh -c 'echo $$ > escaped.pid.tmp && mv escaped.pid.tmp escaped.pid; exec sleep 600'; \
         while [ ! -s escaped.pid ]; do sleep 0.01; done",
        &sb.path,
        5 * SECOND,
        &group.dirs(),
    )
    .await;
    assert!(out.ok, "{out:?}");
    // A deadline that fails the test, generous for a loaded machine (the sleep starts at once).
    let until = Instant::now() + 30 * SECOND;
    let escaped: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(sb.path.join("escaped.pid")).ok().and_then(|s| s.trim().parse().ok())
        {
            break pid;
        }
        assert!(Instant::now() < until, "the setsid'd sleep never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(group.cgroup.procs().contains(&(escaped as i32)), "the escaped sleep is counted in the task's cgroup");
    // The task's end: the supervisor's cgroup kill.
    assert!(group.cgroup.kill_all(3 * SECOND, &mut || {}));
    assert!(wait_dead(escaped), "the setsid'd sleep {escaped} outlived its task");
}

#[tokio::test]
async fn a_check_whose_task_cgroup_is_gone_does_not_run() {
    if !privileged("a_check_whose_task_cgroup_is_gone_does_not_run") {
        return;
    }
    let sb = sandbox();
    let gone = vec![PathBuf::from("/sys/fs/cgroup/memory/capstan-check-test/no-such-task")];
    let out = as_root_in("touch ran", &sb.path, SECOND, &gone).await;
    assert!(!out.ok && out.detail.starts_with("command not run: the task's cgroup"), "{out:?}");
    assert!(!sb.path.join("ran").exists(), "the command ran outside its task's cgroup");
}

async fn as_root_in(command: &str, dir: &Path, timeout: Duration, cgroup: &[PathBuf]) -> CheckOutcome {
    run_command_check(command, "root", dir, &[], timeout, true, cgroup).await
}
