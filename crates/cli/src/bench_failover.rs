//! `capstan bench failover`: how long a cluster of masters on etcd is without a leader, and
//! without scheduling, after its leader is killed (SIGKILL), over several rounds. It prints its
//! figures and asserts nothing.
//!
//! It starts its own etcd and N `capstan master` child processes (this executable) in a temporary
//! directory, registers one fake agent with room over the agent protocol and keeps it alive with
//! heartbeats to whichever master leads. Each round kills the leader, then at once (a) polls the
//! surviving masters' `GET /v1/leader` until one leads with a newer epoch (time to new leader) and
//! (b) submits a one-instance service job through the [`Client`] given every master, and polls its
//! task until it is placed on the agent (time to first placement). Both are measured from the
//! kill. The killed master is then started again on its port and data directory, and the next
//! round waits until it follows the new leader.

use crate::bench::percentile;
use anyhow::Context as _;
use capstan_api::{ApiError, Client, HeartbeatRequest, LeaderView, RegisterRequest};
use capstan_model::{AgentId, TaskId, TaskState};
use capstan_store::EtcdProcess;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// PRODUCT.md: scheduling again at most this long after the leader is killed.
const TARGET: Duration = Duration::from_secs(3);
/// How long one step of a round (a new leader, a placement, a restarted master) may take before
/// the benchmark gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the benchmark polls while it waits.
const POLL: Duration = Duration::from_millis(10);

#[derive(clap::Args)]
pub struct FailoverArgs {
    /// Masters to run on the one etcd (at least 2: one leads, the others may take over).
    #[arg(long, default_value_t = 3)]
    masters: usize,
    /// Rounds: each kills the leader once.
    #[arg(long, default_value_t = 20)]
    kills: u32,
    /// Every master's `--lease-ttl` (whole seconds, at least 2s).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// Keep the temporary directory (data and logs of etcd and the masters) and print where it is.
    #[arg(long)]
    keep: bool,
    /// Tasks placed before the first kill (in jobs of 5,000), so that every new leader takes over
    /// a state of that size.
    #[arg(long, default_value_t = 0)]
    preload: u32,
}

/// One `capstan master` child process on a fixed port and data directory.
struct MasterChild {
    url: String,
    bind: SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<std::process::Child>,
}

impl MasterChild {
    fn spawn(&mut self, exe: &Path, store_url: &str, lease_ttl: Duration) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt as _;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let log_err = log.try_clone().with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut command = std::process::Command::new(exe);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // Even if this process is SIGKILLed, the master goes with it. (The signal follows
                // the spawning thread, a runtime worker that lives as long as the process.)
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = command
            .arg("master")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--bind")
            .arg(self.bind.to_string())
            .arg("--store")
            .arg(store_url)
            .arg("--lease-ttl")
            .arg(humantime::format_duration(lease_ttl).to_string())
            .env("NO_COLOR", "1")
            .env_remove("CAPSTAN_ADDR")
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("cannot start `{} master`", exe.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL; returns when the signal was sent (before the process is reaped).
    fn kill9(&mut self) -> Option<std::process::Child> {
        let mut child = self.child.take()?;
        // An error means it already exited; it is reaped by the caller either way.
        let _ = child.kill();
        Some(child)
    }

    fn kill9_and_reap(&mut self) {
        if let Some(mut child) = self.kill9() {
            let _ = child.wait();
        }
    }
}

/// Everything the benchmark started. Dropping it (at the end, on an error, on Ctrl-C) kills the
/// masters, then etcd, then removes the directory (unless it was kept).
struct Cluster {
    masters: Vec<MasterChild>,
    etcd: Option<EtcdProcess>,
    dir: Option<tempfile::TempDir>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.masters {
            m.kill9_and_reap();
        }
        if let Some(etcd) = &mut self.etcd {
            etcd.kill9();
        }
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What one round measured.
struct Round {
    killed: String,
    old_epoch: u64,
    new_leader: String,
    new_epoch: u64,
    to_leader: Duration,
    to_placement: Duration,
    placed_state: TaskState,
    /// Attempts of the job submission (each attempt after the first: every master failed it).
    submissions: u32,
    rejoined_after: Duration,
}

pub async fn run(args: FailoverArgs) -> anyhow::Result<()> {
    if args.masters < 2 {
        anyhow::bail!("--masters {}: at least 2, so that one can take over", args.masters);
    }
    if args.kills == 0 {
        anyhow::bail!("--kills 0: nothing to measure");
    }
    if let Some(reason) = capstan_store::etcd_missing() {
        anyhow::bail!("the failover benchmark needs etcd: {reason}");
    }
    let exe = std::env::current_exe().context("cannot find this executable to start masters from")?;
    let dir = tempfile::Builder::new().prefix("capstan-bench-failover-").tempdir()?;
    let mut cluster = Cluster { masters: Vec::new(), etcd: None, dir: None };
    let dir_path = dir.path().to_path_buf();
    cluster.dir = Some(dir);
    let outcome = tokio::select! {
        r = bench(&mut cluster, &exe, &dir_path, &args) => r,
        _ = crate::wait_for_shutdown() => Err(anyhow::anyhow!("interrupted; the masters and etcd are stopped")),
    };
    if args.keep {
        for m in &mut cluster.masters {
            m.kill9_and_reap();
        }
        if let Some(etcd) = &mut cluster.etcd {
            etcd.kill9();
        }
        if let Some(dir) = cluster.dir.take() {
            println!("kept {} (etcd.log, m0.log … and their data)", dir.keep().display());
        }
    }
    outcome
}

async fn bench(cluster: &mut Cluster, exe: &Path, dir: &Path, args: &FailoverArgs) -> anyhow::Result<()> {
    let etcd_dir = dir.join("etcd");
    let etcd = tokio::task::spawn_blocking(move || EtcdProcess::start(&etcd_dir))
        .await
        .context("starting etcd")?
        .context("cannot start etcd")?;
    let store_url = etcd.url();
    cluster.etcd = Some(etcd);

    // Fixed ports, so that a restarted master answers where it did. Held until all are chosen.
    let listeners = (0..args.masters)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("cannot find free ports for the masters")?;
    for (i, l) in listeners.iter().enumerate() {
        let bind = l.local_addr()?;
        cluster.masters.push(MasterChild {
            url: format!("http://{bind}"),
            bind,
            data_dir: dir.join(format!("m{i}")),
            log: dir.join(format!("m{i}.log")),
            child: None,
        });
    }
    drop(listeners);
    for m in &mut cluster.masters {
        m.spawn(exe, &store_url, args.lease_ttl)?;
    }
    let urls: Vec<String> = cluster.masters.iter().map(|m| m.url.clone()).collect();
    let probe = Client::new(&urls[0]);
    let (first, view, _) = wait_for_leader(&probe, &urls, 0, Instant::now())
        .await
        .with_context(|| format!("no master led (logs in {}, kept with --keep)", dir.display()))?;
    for (i, url) in urls.iter().enumerate() {
        if i != first {
            wait_for_follower(&probe, url, &view.me).await?;
        }
    }
    println!(
        "{} masters on etcd ({}), lease TTL {}; {} leads with epoch {}",
        args.masters,
        store_url,
        humantime::format_duration(args.lease_ttl),
        view.me,
        view.epoch
    );

    let client = Client::new(&urls.join(","));
    let heartbeats = Arc::new(Heartbeats::default());
    let interval = register_agent(&client).await?;
    let _heartbeat = AbortOnDrop(tokio::spawn(keep_agent_alive(client.clone(), interval, heartbeats.clone())));
    if args.preload > 0 {
        let started = Instant::now();
        preload(&client, args.preload).await?;
        println!("preloaded {} placed tasks in {}", args.preload, secs(started.elapsed()));
    }

    let run_id = rand::random::<u32>() % 100_000;
    let mut rounds = Vec::with_capacity(args.kills as usize);
    for n in 0..args.kills {
        let round = round(cluster, exe, &store_url, args.lease_ttl, &probe, &client, &format!("r{run_id}-{n}"))
            .await
            .with_context(|| format!("round {} (logs in {}, kept with --keep)", n + 1, dir.display()))?;
        println!(
            "round {:>2}: killed {} (epoch {}); {} leads (epoch {}) after {}; first placement ({}) after {}{}; \
             the killed master followed again {} after the kill",
            n + 1,
            round.killed,
            round.old_epoch,
            round.new_leader,
            round.new_epoch,
            secs(round.to_leader),
            round.placed_state,
            secs(round.to_placement),
            if round.submissions > 1 { format!(" (submitted {} times)", round.submissions) } else { String::new() },
            secs(round.rejoined_after),
        );
        rounds.push(round);
    }

    let to_leader: Vec<f64> = rounds.iter().map(|r| r.to_leader.as_secs_f64()).collect();
    let to_placement: Vec<f64> = rounds.iter().map(|r| r.to_placement.as_secs_f64()).collect();
    println!();
    println!(
        "{} kills of the leader among {} masters, lease TTL {}",
        rounds.len(),
        args.masters,
        humantime::format_duration(args.lease_ttl)
    );
    println!("{}", summary_line("time to new leader", &to_leader));
    println!("{}", summary_line("time to first placement", &to_placement));
    println!(
        "agent heartbeats: {} answered, {} failed and retried",
        heartbeats.ok.load(Ordering::Relaxed),
        heartbeats.failed.load(Ordering::Relaxed)
    );
    println!("machine: {}", machine());
    println!("{}", verdict(&to_placement, TARGET));
    Ok(())
}

/// One kill of the leader, measured; the killed master restarted and following again.
async fn round(
    cluster: &mut Cluster,
    exe: &Path,
    store_url: &str,
    lease_ttl: Duration,
    probe: &Client,
    client: &Client,
    name: &str,
) -> anyhow::Result<Round> {
    let urls: Vec<String> = cluster.masters.iter().map(|m| m.url.clone()).collect();
    let (leader, view, _) = wait_for_leader(probe, &urls, 0, Instant::now()).await?;
    let mut dead = cluster.masters[leader].kill9().context("the leader was not running")?;
    let t0 = Instant::now();
    // Reaping is quick once SIGKILL was sent; the clock already runs.
    let _ = dead.wait();
    let survivors: Vec<String> =
        urls.iter().enumerate().filter(|(i, _)| *i != leader).map(|(_, u)| u.clone()).collect();
    let (new, placed) =
        tokio::join!(wait_for_leader(probe, &survivors, view.epoch, t0), submit_and_wait_placed(client, name, t0),);
    let (_, new_view, seen_at) = new?;
    let (to_placement, placed_state, submissions) = placed?;
    let killed = &mut cluster.masters[leader];
    killed.spawn(exe, store_url, lease_ttl)?;
    wait_for_follower(probe, &killed.url, &new_view.me).await?;
    Ok(Round {
        killed: view.me,
        old_epoch: view.epoch,
        new_leader: new_view.me,
        new_epoch: new_view.epoch,
        to_leader: seen_at.saturating_duration_since(t0),
        to_placement,
        placed_state,
        submissions,
        rejoined_after: t0.elapsed(),
    })
}

/// Polls `GET /v1/leader` of every master in `urls` until one leads with an epoch above
/// `above_epoch`: its index, its view and when it was seen. Gives up `STEP_TIMEOUT` after `since`.
async fn wait_for_leader(
    probe: &Client,
    urls: &[String],
    above_epoch: u64,
    since: Instant,
) -> anyhow::Result<(usize, LeaderView, Instant)> {
    loop {
        let views = futures::future::join_all(urls.iter().map(|u| probe.leader_of(u))).await;
        let seen_at = Instant::now();
        let leader = views
            .into_iter()
            .enumerate()
            .filter_map(|(i, v)| v.ok().map(|v| (i, v)))
            .filter(|(_, v)| v.role == "leader" && v.epoch > above_epoch)
            .max_by_key(|(_, v)| v.epoch);
        if let Some((i, v)) = leader {
            return Ok((i, v, seen_at));
        }
        if since.elapsed() > STEP_TIMEOUT {
            anyhow::bail!(
                "no master among {} led with an epoch above {above_epoch} within {}",
                urls.join(", "),
                secs(STEP_TIMEOUT)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the master at `url` answers that it follows `leader`.
async fn wait_for_follower(probe: &Client, url: &str, leader: &str) -> anyhow::Result<()> {
    let since = Instant::now();
    loop {
        let view = probe.leader_of(url).await;
        if let Ok(v) = &view {
            if v.role == "follower" && v.leader.as_deref() == Some(leader) {
                return Ok(());
            }
        }
        if since.elapsed() > STEP_TIMEOUT {
            let now = match view {
                Ok(v) => format!("it says {} (leader {:?}, epoch {})", v.role, v.leader, v.epoch),
                Err(e) => e.to_string(),
            };
            anyhow::bail!("{url} did not follow {leader} within {}: {now}", secs(STEP_TIMEOUT));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Submits a one-instance service job named `bench/failover/{name}` through the client (every
/// master), again and again until one master takes it, then polls its task until it is placed:
/// the time from `t0`, the task's state then, and how many submissions it took.
async fn submit_and_wait_placed(
    client: &Client,
    name: &str,
    t0: Instant,
) -> anyhow::Result<(Duration, TaskState, u32)> {
    let key = format!("bench/failover/{name}");
    let spec = crate::bench::tiny_service(&key, 1);
    let mut submissions = 0;
    let task: TaskId = loop {
        submissions += 1;
        let last = match client.create_job(&spec).await {
            Ok(created) => match created.tasks.first() {
                Some(id) => break *id,
                None => anyhow::bail!("job {key} was created without a task"),
            },
            // An earlier attempt was served although its answer was lost.
            Err(ApiError::Api { status: 409, code, .. }) if code == "job_exists" => {
                match client.tasks(Some(&key), None).await {
                    Ok(tasks) if !tasks.is_empty() => break tasks[0].id,
                    Ok(_) => "the job exists without tasks".to_string(),
                    Err(e) => e.to_string(),
                }
            }
            // No master could take it (the followers still send clients to the dead leader, or
            // none leads yet): the request was not served; ask again.
            Err(e) => e.to_string(),
        };
        if t0.elapsed() > STEP_TIMEOUT {
            anyhow::bail!("job {key} not accepted within {} of the kill: {last}", secs(STEP_TIMEOUT));
        }
        tokio::time::sleep(POLL).await;
    };
    loop {
        let last = match client.task(task).await {
            Ok(t) if t.agent_id.is_some() && t.state != TaskState::Pending => {
                return Ok((t0.elapsed(), t.state, submissions));
            }
            Ok(t) => format!("{} ({})", t.state, t.reason),
            Err(e) => e.to_string(),
        };
        if t0.elapsed() > STEP_TIMEOUT {
            anyhow::bail!("task {task} of {key} not placed within {} of the kill: {last}", secs(STEP_TIMEOUT));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Creates `tasks` small tasks in jobs of 5,000 and waits until all are placed.
async fn preload(client: &Client, tasks: u32) -> anyhow::Result<()> {
    const PER_JOB: u32 = 5_000;
    let mut left = tasks;
    let mut n = 0;
    while left > 0 {
        let instances = left.min(PER_JOB);
        let spec = crate::bench::tiny_service(&format!("bench/preload/p{n}"), instances);
        client.create_job(&spec).await.context("creating the preloaded jobs")?;
        left -= instances;
        n += 1;
    }
    let since = Instant::now();
    loop {
        let jobs = client.jobs().await.context("listing jobs")?;
        let placed: u64 = jobs
            .iter()
            .filter(|j| j.job.to_string().starts_with("bench/preload/"))
            .map(|j| j.tasks.get("ASSIGNED").copied().unwrap_or(0))
            .sum();
        if placed >= u64::from(tasks) {
            return Ok(());
        }
        if since.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("only {placed} of {tasks} preloaded tasks placed after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The fake agent's id.
const AGENT_ID: AgentId = AgentId(0xfa11_0001);

/// A fake agent with room for thousands of small tasks, registered over the agent protocol. Its
/// tasks never run (nobody long-polls its orders): a placement is all this benchmark needs.
fn agent_registration() -> anyhow::Result<RegisterRequest> {
    let info = serde_json::json!({
        "id": AGENT_ID.to_string(),
        "hostname": "bench-failover-agent",
        "address": "http://127.0.0.1:9",
        "capacity": {"cpus_milli": 4_000_000, "mem_bytes": 1u64 << 45, "disk_bytes": 1u64 << 45,
                     "ports": [{"first": 31000, "last": 31999}]},
        "attributes": {"rack": "bench"},
        "version": env!("CARGO_PKG_VERSION"),
    });
    serde_json::from_value(serde_json::json!({"info": info, "known_tasks": []}))
        .context("the fake agent's registration does not decode")
}

/// Registers the fake agent (retrying while no master takes it); returns its heartbeat interval.
async fn register_agent(client: &Client) -> anyhow::Result<Duration> {
    let req = agent_registration()?;
    let since = Instant::now();
    loop {
        match client.register(&req).await {
            Ok(r) => return Ok(Duration::from_millis(r.heartbeat_interval_ms.max(100))),
            Err(e) if since.elapsed() > STEP_TIMEOUT => {
                return Err(anyhow::anyhow!(e).context("cannot register the benchmark's agent"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[derive(Default)]
struct Heartbeats {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// Sends the fake agent's heartbeats to whichever master leads, for as long as the benchmark runs;
/// a failed one is tried again after 100 ms, and an unknown agent registers again.
async fn keep_agent_alive(client: Client, mut interval: Duration, counts: Arc<Heartbeats>) {
    let req = HeartbeatRequest { agent: AGENT_ID, known_tasks: vec![], running_tasks: vec![], as_of_seq: 0 };
    let mut wait = interval;
    loop {
        tokio::time::sleep(wait).await;
        match client.heartbeat(&req).await {
            Ok(r) => {
                counts.ok.fetch_add(1, Ordering::Relaxed);
                interval = Duration::from_millis(r.heartbeat_interval_ms.max(100));
                wait = interval;
            }
            Err(e) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                if e.status() == Some(404) {
                    if let Ok(req) = agent_registration() {
                        let _ = client.register(&req).await;
                    }
                }
                wait = Duration::from_millis(100);
            }
        }
    }
}

/// `1.234 s`.
fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// `NAME  min … p50 … p95 … max …` over figures in seconds (any order).
fn summary_line(name: &str, figures_secs: &[f64]) -> String {
    let mut sorted = figures_secs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let min = sorted.first().copied().unwrap_or(f64::NAN);
    let max = sorted.last().copied().unwrap_or(f64::NAN);
    format!(
        "{name:<24} min {min:.3} s   p50 {:.3} s   p95 {:.3} s   max {max:.3} s",
        percentile(&sorted, 50.0),
        percentile(&sorted, 95.0),
    )
}

/// Whether the p95 time to first placement meets the target, and how many rounds missed it.
fn verdict(to_placement_secs: &[f64], target: Duration) -> String {
    let mut sorted = to_placement_secs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let p95 = percentile(&sorted, 95.0);
    let t = target.as_secs_f64();
    let over = sorted.iter().filter(|s| **s > t).count();
    format!(
        "target (PRODUCT.md): scheduling again ≤ {t:.0} s after the leader is killed: p95 {p95:.3} s {}; \
         {over} of {} rounds over it",
        if p95 <= t { "MEETS it" } else { "MISSES it" },
        sorted.len()
    )
}

/// Cores, memory, CPU model and kernel of this machine, from /proc; `unknown` where unreadable.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or_else(|_| "unknown".to_string(), |n| n.to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or_else(|| "unknown".to_string(), |kib| format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0)));
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| format!("Linux {}", k.trim()))
        .or_else(|_| std::fs::read_to_string("/proc/version").map(|v| v.trim().to_string()))
        .unwrap_or_else(|_| "unknown kernel".into());
    format!("{cores} cores ({model}), {memory} RAM, {kernel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line_gives_min_percentiles_and_max_in_any_order() {
        let figures: Vec<f64> = (1..=20).rev().map(|i| f64::from(i) / 10.0).collect();
        assert_eq!(
            summary_line("time to new leader", &figures),
            "time to new leader       min 0.100 s   p50 1.000 s   p95 1.900 s   max 2.000 s"
        );
        assert_eq!(
            summary_line("x", &[2.5]),
            "x                        min 2.500 s   p50 2.500 s   p95 2.500 s   max 2.500 s"
        );
    }

    #[test]
    fn verdict_says_whether_p95_meets_the_target_and_counts_the_rounds_over_it() {
        let mut figures = vec![2.1; 19];
        figures.push(3.4);
        let v = verdict(&figures, Duration::from_secs(3));
        assert!(v.contains("p95 2.100 s MEETS it; 1 of 20 rounds over it"), "{v}");
        let v = verdict(&[2.0, 3.2, 3.5], Duration::from_secs(3));
        assert!(v.contains("p95 3.500 s MISSES it; 2 of 3 rounds over it"), "{v}");
    }
}
