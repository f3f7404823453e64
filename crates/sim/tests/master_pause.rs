//! The seeds' worst day, scaled down for CI: a real master (`capstan master`, a child process)
//! with 200 simulated agents and 2,000 running tasks is stopped with SIGSTOP past every timeout
//! (agent timeout 3 s, the jobs' `replace_after` 2 s, pause 8 s), then resumed. Nothing may be
//! killed, removals may not go faster than the configured rate, the mass-loss breaker must trip,
//! and every task must be RUNNING again (each once) within a bound. It runs the same code as
//! `capstan sim scenario master-pause`.
//!
//! The master is the built `capstan` binary: `$CAPSTAN_BIN` if set, else `target/<profile>/capstan`
//! next to this test's own binary, built first with cargo when it is missing or older than the
//! workspace's sources (`cargo test -p capstan-sim` alone does not build it). It never skips.

use capstan_sim::{master_pause, MasterPauseConfig};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The newest modification time of the workspace files the binary is built from (sources under
/// `src`, manifests, the lock file).
fn newest_source(root: &Path) -> SystemTime {
    fn walk(dir: &Path, newest: &mut SystemTime) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if !path.ends_with("target") && !path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
                {
                    walk(&path, newest);
                }
            } else if (path.extension().is_some_and(|e| e == "rs") && path.components().any(|c| c.as_os_str() == "src"))
                || path.ends_with("Cargo.toml")
            {
                if let Ok(m) = entry.metadata().and_then(|m| m.modified()) {
                    *newest = (*newest).max(m);
                }
            }
        }
    }
    let mut newest = SystemTime::UNIX_EPOCH;
    walk(&root.join("crates"), &mut newest);
    for f in ["Cargo.toml", "Cargo.lock"] {
        if let Ok(m) = std::fs::metadata(root.join(f)).and_then(|m| m.modified()) {
            newest = newest.max(m);
        }
    }
    newest
}

fn capstan_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("CAPSTAN_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "CAPSTAN_BIN={} is not a file", bin.display());
        return bin;
    }
    // This test runs as target/<profile>/deps/master_pause-HASH.
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("capstan");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fresh = std::fs::metadata(&bin).and_then(|m| m.modified()).is_ok_and(|built| built >= newest_source(&root));
    if !fresh {
        let profile = profile_dir.file_name().expect("a profile directory").to_string_lossy().to_string();
        let target_dir = profile_dir.parent().expect("a target directory");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build
            .current_dir(&root)
            .args(["build", "-p", "capstan-cli", "--bin", "capstan"])
            .arg("--target-dir")
            .arg(target_dir);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                build.arg("--release");
            }
            other => {
                build.args(["--profile", other]);
            }
        }
        eprintln!("building the capstan binary for the master: {build:?}");
        let status = build.status().expect("running cargo to build the capstan binary");
        assert!(status.success(), "cannot build the capstan binary ({status}); set CAPSTAN_BIN to a built one");
    }
    assert!(
        bin.is_file(),
        "no capstan binary at {}; build it (cargo build -p capstan-cli) or set CAPSTAN_BIN",
        bin.display()
    );
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_paused_past_every_timeout_kills_nothing_and_converges() {
    let bin = capstan_binary();
    let mut config = MasterPauseConfig::new(bin, 200, 2_000, Duration::from_secs(8));
    config.heartbeat_interval = Duration::from_secs(1);
    config.agent_timeout = Duration::from_secs(3);
    config.replace_after = Duration::from_secs(2);
    config.removal_rate = "1/5s".into();
    config.setup_timeout = Duration::from_secs(60);
    config.converge_timeout = Duration::from_secs(30);
    config.settle = Duration::from_secs(2);
    config.progress = std::env::var_os("CAPSTAN_TEST_PROGRESS").is_some();
    // Without safeguards every agent would be unreachable and every task due for replacement.
    assert!(config.pause > config.agent_timeout + config.replace_after);

    let report = master_pause(config).await.expect("the scenario runs");
    let table = capstan_sim::scenario::render_table(&report);
    println!("{table}");
    assert_eq!(report.tasks_killed, 0, "tasks were killed:\n{table}");
    assert!(report.removal_rate_respected, "removals went faster than 1/5s:\n{table}");
    assert!(report.breaker_tripped, "the breaker did not trip:\n{table}");
    assert!(report.converged, "not every task RUNNING again within 30 s:\n{table}");
    assert!(report.converge_s.is_some_and(|s| s < 30.0), "{table}");
    // Converged means each of the 2,000 tasks runs exactly once, on the master and on the agents.
    assert_eq!(report.final_tasks.get("RUNNING"), Some(&2_000), "{table}");
    assert_eq!(report.sim.running, 2_000, "{table}");
    assert!(report.failures().is_empty(), "{table}");
}
