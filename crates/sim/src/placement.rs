//! `capstan bench placement`: placement throughput end to end over the real protocol, durable.
//!
//! A master runs as its own process (`capstan master`, embedded store, in a temporary directory),
//! so its memory and CPU are its own; the simulated agents run in this process. Once every agent
//! is registered, the jobs are submitted as fast as the API takes them, and the clock runs from
//! the first submission until the master's `/metrics` counts every task RUNNING (scraped every
//! 200 ms: listing a million tasks over the API would measure the listing). The physical limit
//! it is compared with is the time to merely append as many task records to a fresh embedded
//! store on the same file system, in batches of 1,000.

use crate::baseline::{self, RawWrite};
use crate::fleet::{Fleet, FleetConfig, StatsSnapshot};
use crate::jobs::{self, JobMix};
use crate::master_process::MasterProcess;
use crate::os;
use crate::prom::Scrape;
use anyhow::Context as _;
use capstan_api::Client;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How often `/metrics` is scraped while waiting.
const SCRAPE_EVERY: Duration = Duration::from_millis(200);
/// Job submissions in flight at once.
const SUBMISSIONS_IN_FLIGHT_MAX: usize = 4;
/// Tasks per job by default (jobs = tasks / this, rounded up).
const TASKS_PER_JOB_DEFAULT: u64 = 10_000;

#[derive(clap::Args, Clone, Debug)]
pub struct PlacementArgs {
    /// Simulated agents.
    #[arg(long, default_value_t = 1_000)]
    pub agents: usize,
    /// Tasks to place, over all jobs.
    #[arg(long, default_value_t = 10_000)]
    pub tasks: u64,
    /// Jobs to spread the tasks over (default: one per 10,000 tasks).
    #[arg(long)]
    pub jobs: Option<u32>,
    /// Cpus per task (default: an even share of an agent, so the tasks fill every agent).
    #[arg(long)]
    pub cpus_per_task: Option<f64>,
    /// Memory per task, e.g. `64MiB` (default: an even share of an agent).
    #[arg(long)]
    pub mem_per_task: Option<String>,
    /// What each agent offers, over `cpus=8,mem=32GiB,disk=100GiB,ports=31000-32000`.
    #[arg(long)]
    pub resources: Option<String>,
    /// Racks and pods the agents are spread over.
    #[arg(long, default_value = "rack=50,pod=5")]
    pub attributes_spread: String,
    /// Give a mix of jobs placement constraints (rack not r0; a per-rack limit; dc and pod).
    #[arg(long)]
    pub constraints: bool,
    /// Where the temporary directories go (the master's store and the raw-write store share it).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the temporary directory (the master's store and log) and print where it is.
    #[arg(long)]
    pub keep_dir: bool,
    /// Give up when not every task is RUNNING after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// Skip the raw store write (the physical limit).
    #[arg(long)]
    pub no_raw_write: bool,
}

/// What one run measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct Figures {
    agents: usize,
    tasks: u64,
    jobs: u32,
    cpus_milli_per_task: u32,
    mem_bytes_per_task: u64,
    constraints: bool,
    registration_s: f64,
    submitted_s: f64,
    placed_s: Option<f64>,
    running_s: Option<f64>,
    /// When the scrape that saw every task RUNNING was sent (a lower bound of the end).
    running_scrape_started_s: Option<f64>,
    running: u64,
    tasks_per_s: Option<f64>,
    placement_latency_p50_s: Option<f64>,
    placement_latency_p99_s: Option<f64>,
    placement_latency_mean_s: Option<f64>,
    master_rss_before_bytes: u64,
    master_rss_peak_bytes: u64,
    master_bytes_per_task: Option<f64>,
    master_cpu_s: f64,
    master_cpu_by_thread_s: BTreeMap<String, f64>,
    sim_cpu_s: f64,
    sim_rss_peak_bytes: u64,
    scheduler_passes: u64,
    scheduler_pass_mean_ms: f64,
    scheduler_pass_total_s: f64,
    store_commits: u64,
    store_commit_mean_ms: f64,
    store_commit_total_s: f64,
    commands_logged: u64,
    placements_refused: f64,
    illegal_transitions: f64,
    duplicate_updates: f64,
    raw_write: Option<RawWrite>,
    raw_write_s: Option<f64>,
    end_to_end_over_raw_write: Option<f64>,
    scrape_mean_ms: f64,
    snapshots: SnapshotsSeen,
    constraint_check: Option<ConstraintCheck>,
    sim: StatsSnapshot,
    timeline: Vec<Window>,
}

/// Five seconds of the run, from the master's metrics.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct Window {
    at_s: f64,
    pending: u64,
    assigned: u64,
    running: u64,
    placed: u64,
    /// Scheduler passes that ended in the window, and their mean duration.
    passes: u64,
    pass_mean_ms: f64,
    store_commits: u64,
    commit_mean_ms: f64,
    commands_logged: u64,
    master_rss_bytes: u64,
    /// How long the last `/metrics` scrape took (the master counts every task for it).
    scrape_ms: f64,
    sim_updates_queued: usize,
}

/// What the master's log says about snapshots (the writer installs one every 20,000 entries).
#[derive(Clone, Debug, Default, serde::Serialize)]
struct SnapshotsSeen {
    count: u64,
    total_ms: u64,
    max_ms: u64,
    max_bytes: u64,
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ … final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn snapshots_in_log(log: &std::path::Path) -> SnapshotsSeen {
    let mut seen = SnapshotsSeen::default();
    let text = std::fs::read_to_string(log).unwrap_or_default();
    for line in text.lines().filter(|l| l.contains("snapshot installed")) {
        let line = &strip_ansi(line);
        let field = |name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.trim_end_matches(',').parse().ok())
                .unwrap_or(0)
        };
        let (ms, bytes) = (field("elapsed_ms"), field("bytes"));
        seen.count += 1;
        seen.total_ms += ms;
        seen.max_ms = seen.max_ms.max(ms);
        seen.max_bytes = seen.max_bytes.max(bytes);
    }
    seen
}

pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}

pub(crate) fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 && c != '-' {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub async fn run(args: PlacementArgs) -> anyhow::Result<()> {
    tokio::select! {
        r = measure(args) => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; the master was stopped"),
    }
}

async fn measure(args: PlacementArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.agents > 0 && args.tasks > 0, "--agents and --tasks must be at least 1");
    let capacity =
        FleetConfig::capacity_from(args.resources.as_deref()).map_err(|e| anyhow::anyhow!("--resources: {e}"))?;
    let (racks, pods) =
        FleetConfig::parse_spread(&args.attributes_spread).map_err(|e| anyhow::anyhow!("--attributes-spread: {e}"))?;
    let nofile = crate::os::check_nofile(args.agents)?;
    let slots = jobs::slots_per_agent(args.tasks, args.agents as u64, args.constraints);
    let (mut cpus_milli, mut mem_bytes) = jobs::task_size_for(&capacity, slots);
    if let Some(c) = args.cpus_per_task {
        cpus_milli = capstan_model::resources::cpus_to_milli(c).map_err(|e| anyhow::anyhow!("--cpus-per-task: {e}"))?;
    }
    if let Some(m) = &args.mem_per_task {
        mem_bytes = m.parse::<capstan_model::ByteSize>().map_err(|e| anyhow::anyhow!("--mem-per-task: {e}"))?.0;
    }
    let job_count = args.jobs.unwrap_or(args.tasks.div_ceil(TASKS_PER_JOB_DEFAULT) as u32).max(1);
    anyhow::ensure!(
        args.tasks.div_ceil(u64::from(job_count)) <= u64::from(capstan_model::decode::INSTANCES_MAX),
        "--jobs {job_count}: a job holds at most {} instances; use more jobs",
        capstan_model::decode::INSTANCES_MAX
    );
    let mix = JobMix {
        run: format!("r{}", rand::random::<u32>() % 1_000_000),
        jobs: job_count,
        tasks: args.tasks,
        cpus_milli,
        mem_bytes,
        constraints: args.constraints,
        racks,
        pods,
    };

    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let tmp = tempfile::Builder::new().prefix("capstan-bench-placement-").tempdir_in(&base)?;
    let exe = std::env::current_exe().context("cannot find the capstan binary to start a master")?;
    let master = MasterProcess::start(&exe, &tmp.path().join("master"), &tmp.path().join("master.log"), &[]).await?;
    eprintln!("master pid {} at {} (log {}); open-file limit {nofile}", master.pid, master.url, master.log.display());
    let result = drive(&args, &mix, &master, capacity, racks, pods).await;
    let master_log = master.log.clone();
    master.stop().await;
    let mut figures = match result {
        Ok(mut f) => {
            f.snapshots = snapshots_in_log(&master_log);
            f
        }
        Err(e) => {
            if args.keep_dir {
                eprintln!("kept {}", tmp.keep().display());
            }
            return Err(e.context(format!("master log: {}", master_log.display())));
        }
    };

    if !args.no_raw_write {
        eprintln!("writing {} task records to a fresh embedded store (the physical limit)…", args.tasks);
        let dir = tmp.path().join("raw-write");
        let tasks = args.tasks;
        let agents = args.agents as u64;
        let raw = tokio::task::spawn_blocking(move || {
            let r = baseline::write_task_records(&dir, tasks, agents);
            let _ = std::fs::remove_dir_all(&dir);
            r
        })
        .await??;
        let raw_s = raw.elapsed.as_secs_f64();
        figures.raw_write_s = Some(raw_s);
        figures.end_to_end_over_raw_write = figures.running_s.map(|e| e / raw_s);
        figures.raw_write = Some(raw);
    }
    print_report(&figures);
    if args.keep_dir {
        eprintln!("kept {}", tmp.keep().display());
    }
    Ok(())
}

async fn scrape(client: &Client) -> anyhow::Result<Scrape> {
    Ok(Scrape::parse(&client.metrics().await?))
}

/// Scrapes and says how long it took.
async fn timed_scrape(client: &Client) -> anyhow::Result<(Scrape, f64)> {
    let started = Instant::now();
    let s = scrape(client).await?;
    Ok((s, started.elapsed().as_secs_f64() * 1000.0))
}

async fn drive(
    args: &PlacementArgs,
    mix: &JobMix,
    master: &MasterProcess,
    capacity: capstan_model::Capacity,
    racks: u32,
    pods: u32,
) -> anyhow::Result<Figures> {
    let client = Client::new(&master.url);
    let mut f = Figures {
        agents: args.agents,
        tasks: args.tasks,
        jobs: mix.jobs,
        cpus_milli_per_task: mix.cpus_milli,
        mem_bytes_per_task: mix.mem_bytes,
        constraints: mix.constraints,
        ..Default::default()
    };

    // 1. Agents.
    let started = Instant::now();
    let fleet = Fleet::start(FleetConfig { master: master.url.clone(), count: args.agents, capacity, racks, pods });
    let deadline = started + Duration::from_secs(300);
    loop {
        let registered = client.agents().await?.len();
        if registered >= args.agents {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {registered} of {} agents registered after 300 s ({:?})",
            args.agents,
            fleet.stats()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    f.registration_s = started.elapsed().as_secs_f64();
    eprintln!("{} agents registered in {:.1} s", args.agents, f.registration_s);
    // Let the agents settle into their long polls.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 2. Submit and wait.
    f.master_rss_before_bytes = os::status_bytes(master.pid, "VmRSS").unwrap_or(0);
    let master_cpu_before = os::cpu_seconds(master.pid).unwrap_or(0.0);
    let threads_before = os::cpu_seconds_by_thread(master.pid);
    let sim_cpu_before = os::cpu_seconds(std::process::id()).unwrap_or(0.0);
    // Registration moved these already: the report gives what happened after the first job.
    let before = scrape(&client).await?;
    let t0 = Instant::now();
    let submitter = {
        let client = client.clone();
        let mix = mix.clone();
        tokio::spawn(async move {
            let mut results = futures::stream::iter(0..mix.jobs)
                .map(|j| {
                    let client = client.clone();
                    let spec = jobs::job_spec(&mix, j);
                    async move { client.create_job(&spec).await.map_err(|e| (j, e)) }
                })
                .buffer_unordered(SUBMISSIONS_IN_FLIGHT_MAX);
            while let Some(r) = results.next().await {
                if let Err((j, e)) = r {
                    anyhow::bail!("job {} was refused: {e}", jobs::job_key(&mix, j));
                }
            }
            Ok(t0.elapsed())
        })
    };
    let mut submitter = Some(submitter);
    let deadline = t0 + Duration::from_secs(args.timeout_s);
    let mut window_start = before.clone();
    let mut last_progress = Instant::now();
    let mut last: Scrape;
    let (mut scrapes, mut scrape_total_ms) = (0u64, 0.0);
    loop {
        tokio::time::sleep(SCRAPE_EVERY).await;
        if submitter.as_ref().is_some_and(|s| s.is_finished()) {
            let elapsed = submitter.take().expect("checked").await??;
            f.submitted_s = elapsed.as_secs_f64();
            eprintln!("{} jobs accepted in {:.2} s", mix.jobs, f.submitted_s);
        }
        let scrape_started_s = t0.elapsed().as_secs_f64();
        let (scraped, scrape_ms) = timed_scrape(&client).await?;
        last = scraped;
        scrapes += 1;
        scrape_total_ms += scrape_ms;
        let placed = last.get("capstan_placements_total").unwrap_or(0.0) as u64;
        if f.placed_s.is_none() && placed >= args.tasks {
            f.placed_s = Some(t0.elapsed().as_secs_f64());
        }
        f.running = last.tasks_in("RUNNING");
        if f.running >= args.tasks {
            // The scrape counted somewhere between asking and answering; the answer is the
            // conservative end.
            f.running_s = Some(t0.elapsed().as_secs_f64());
            f.running_scrape_started_s = Some(scrape_started_s);
            break;
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            let w = window(t0, &window_start, &last, scrape_ms, master.pid, fleet.updates_queued());
            window_start = last.clone();
            let s = fleet.stats();
            eprintln!(
                "{:>6.1} s  pending {}  assigned {}  running {}  placed {}  | {} passes of {:.0} ms, {} commits of {:.1} ms ({} commands), scrape {:.0} ms, master rss {} | sim queued {} errors {}/{}{}",
                w.at_s,
                w.pending,
                w.assigned,
                w.running,
                w.placed,
                w.passes,
                w.pass_mean_ms,
                w.store_commits,
                w.commit_mean_ms,
                w.commands_logged,
                w.scrape_ms,
                mib(w.master_rss_bytes),
                w.sim_updates_queued,
                s.poll_errors,
                s.update_errors,
                fleet.last_error().map(|e| format!(" (last: {e})")).unwrap_or_default(),
            );
            f.timeline.push(w);
        }
        if Instant::now() >= deadline {
            eprintln!(
                "gave up after {} s: {} of {} tasks RUNNING (pending {})",
                args.timeout_s,
                f.running,
                args.tasks,
                last.tasks_in("PENDING")
            );
            break;
        }
    }
    if let Some(s) = submitter.take() {
        match tokio::time::timeout(Duration::from_secs(5), s).await {
            Ok(joined) => f.submitted_s = joined??.as_secs_f64(),
            Err(_) => anyhow::bail!("job submissions were still running when the tasks ran; this cannot be"),
        }
    }

    f.scrape_mean_ms = scrape_total_ms / scrapes.max(1) as f64;

    // 3. What the master says about itself.
    f.master_rss_peak_bytes = os::status_bytes(master.pid, "VmHWM").unwrap_or(0);
    f.master_bytes_per_task =
        Some(f.master_rss_peak_bytes.saturating_sub(f.master_rss_before_bytes) as f64 / args.tasks as f64);
    f.master_cpu_s = os::cpu_seconds(master.pid).unwrap_or(0.0) - master_cpu_before;
    f.master_cpu_by_thread_s = os::cpu_seconds_by_thread(master.pid)
        .into_iter()
        .map(|(name, s)| {
            let before = threads_before.get(&name).copied().unwrap_or(0.0);
            (name, s - before)
        })
        .filter(|(_, s)| *s >= 0.005)
        .collect();
    f.sim_cpu_s = os::cpu_seconds(std::process::id()).unwrap_or(0.0) - sim_cpu_before;
    f.sim_rss_peak_bytes = os::status_bytes(std::process::id(), "VmHWM").unwrap_or(0);
    f.tasks_per_s = f.running_s.map(|s| args.tasks as f64 / s);
    let latency = "capstan_placement_latency_seconds";
    f.placement_latency_p50_s = last.quantile(latency, 0.5);
    f.placement_latency_p99_s = last.quantile(latency, 0.99);
    let (sum, count) = last.sum_count(latency);
    f.placement_latency_mean_s = (count > 0).then(|| sum / count as f64);
    let delta = |name: &str| {
        let ((s1, c1), (s0, c0)) = (last.sum_count(name), before.sum_count(name));
        (s1 - s0, c1.saturating_sub(c0))
    };
    let (sum, count) = delta("capstan_scheduler_pass_seconds");
    f.scheduler_passes = count;
    f.scheduler_pass_total_s = sum;
    f.scheduler_pass_mean_ms = if count > 0 { sum / count as f64 * 1000.0 } else { 0.0 };
    let (sum, count) = delta("capstan_store_write_seconds");
    f.store_commits = count;
    f.store_commit_total_s = sum;
    f.store_commit_mean_ms = if count > 0 { sum / count as f64 * 1000.0 } else { 0.0 };
    f.commands_logged =
        (last.get("capstan_log_index").unwrap_or(0.0) - before.get("capstan_log_index").unwrap_or(0.0)) as u64;
    f.placements_refused = last.get("capstan_placements_refused").unwrap_or(0.0);
    f.illegal_transitions = last.get("capstan_illegal_transitions").unwrap_or(0.0);
    f.duplicate_updates = last.get("capstan_duplicate_status_updates").unwrap_or(0.0);
    f.sim = fleet.stats();
    drop(fleet);
    if mix.constraints && f.running_s.is_some() {
        f.constraint_check = Some(check_constraints(&client, mix).await?);
    }
    anyhow::ensure!(
        f.running_s.is_some(),
        "not every task ran: {} of {} RUNNING after {} s",
        f.running,
        args.tasks,
        args.timeout_s
    );
    Ok(f)
}

/// Whether the first constrained jobs' tasks sit where their constraints allow.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct ConstraintCheck {
    tasks_checked: u64,
    violations: u64,
    /// Job 1's most instances on one rack, and its limit.
    most_on_one_rack: u64,
    rack_limit: u64,
}

async fn check_constraints(client: &Client, mix: &JobMix) -> anyhow::Result<ConstraintCheck> {
    let agents = client.agents().await?;
    let attrs: BTreeMap<String, BTreeMap<String, String>> =
        agents.into_iter().map(|a| (a.hostname, a.attributes)).collect();
    let attr = |host: &Option<String>, key: &str| -> String {
        host.as_ref().and_then(|h| attrs.get(h)).and_then(|a| a.get(key)).cloned().unwrap_or_default()
    };
    let mut check = ConstraintCheck::default();
    for j in 0..mix.jobs.min(3) {
        let tasks = client.tasks(Some(&jobs::job_key(mix, j)), Some("RUNNING")).await?;
        check.tasks_checked += tasks.len() as u64;
        match j {
            0 => check.violations += tasks.iter().filter(|t| attr(&t.host, "rack") == "r0").count() as u64,
            1 => {
                let mut per_rack: BTreeMap<String, u64> = BTreeMap::new();
                for t in &tasks {
                    *per_rack.entry(attr(&t.host, "rack")).or_default() += 1;
                }
                check.rack_limit = jobs::constraints_of(mix, 1)[0]["limit"].as_u64().unwrap_or(0);
                check.most_on_one_rack = per_rack.values().copied().max().unwrap_or(0);
                check.violations += per_rack.values().map(|n| n.saturating_sub(check.rack_limit)).sum::<u64>();
            }
            _ => {
                check.violations += tasks
                    .iter()
                    .filter(|t| attr(&t.host, "dc") != "dc1" || (mix.pods > 1 && attr(&t.host, "pod") == "p0"))
                    .count() as u64
            }
        }
    }
    Ok(check)
}

fn window(t0: Instant, from: &Scrape, to: &Scrape, scrape_ms: f64, master_pid: u32, queued: usize) -> Window {
    let delta = |name: &str| {
        let ((s1, c1), (s0, c0)) = (to.sum_count(name), from.sum_count(name));
        (s1 - s0, c1.saturating_sub(c0))
    };
    let (pass_s, passes) = delta("capstan_scheduler_pass_seconds");
    let (commit_s, commits) = delta("capstan_store_write_seconds");
    let index = |s: &Scrape| s.get("capstan_log_index").unwrap_or(0.0) as u64;
    Window {
        at_s: t0.elapsed().as_secs_f64(),
        pending: to.tasks_in("PENDING"),
        assigned: to.tasks_in("ASSIGNED"),
        running: to.tasks_in("RUNNING"),
        placed: to.get("capstan_placements_total").unwrap_or(0.0) as u64,
        passes,
        pass_mean_ms: if passes > 0 { pass_s / passes as f64 * 1000.0 } else { 0.0 },
        store_commits: commits,
        commit_mean_ms: if commits > 0 { commit_s / commits as f64 * 1000.0 } else { 0.0 },
        commands_logged: index(to).saturating_sub(index(from)),
        master_rss_bytes: os::status_bytes(master_pid, "VmRSS").unwrap_or(0),
        scrape_ms,
        sim_updates_queued: queued,
    }
}

fn print_report(f: &Figures) {
    let opt_s = |v: Option<f64>| v.map(|s| format!("{s:.2} s")).unwrap_or_else(|| "—".into());
    let opt_ms = |v: Option<f64>| v.map(|s| format!("{:.0} ms", s * 1000.0)).unwrap_or_else(|| "—".into());
    let mut rows: Vec<(String, String)> = vec![
        ("all agents registered".into(), format!("{:.2} s", f.registration_s)),
        ("all jobs accepted".into(), format!("{:.2} s", f.submitted_s)),
        ("all tasks placed".into(), opt_s(f.placed_s)),
        (
            "all tasks RUNNING (end to end)".into(),
            format!("{} (seen by the scrape sent at {})", opt_s(f.running_s), opt_s(f.running_scrape_started_s)),
        ),
        (
            "throughput end to end".into(),
            f.tasks_per_s
                .map(|t| format!("{} tasks/s (target ≥ 16,700/s)", thousands(t)))
                .unwrap_or_else(|| "—".into()),
        ),
        (
            "placement latency p50 / p99 / mean".into(),
            format!(
                "{} / {} / {}",
                opt_ms(f.placement_latency_p50_s),
                opt_ms(f.placement_latency_p99_s),
                opt_ms(f.placement_latency_mean_s)
            ),
        ),
        (
            "master RSS before / peak".into(),
            format!("{} / {}", mib(f.master_rss_before_bytes), mib(f.master_rss_peak_bytes)),
        ),
        (
            "master memory per task".into(),
            f.master_bytes_per_task.map(|b| format!("{b:.0} B (target ≤ 1,024 B)")).unwrap_or_else(|| "—".into()),
        ),
    ];
    if let (Some(raw), Some(s)) = (&f.raw_write, f.raw_write_s) {
        rows.push((
            "raw write of the task records".into(),
            format!(
                "{s:.2} s ({} records, {} B each, {} commits)",
                thousands(raw.records as f64),
                raw.bytes / raw.records.max(1),
                raw.commits
            ),
        ));
        rows.push((
            "end to end / raw write".into(),
            f.end_to_end_over_raw_write.map(|r| format!("{r:.1}× (target ≤ 2×)")).unwrap_or_else(|| "—".into()),
        ));
    }
    let threads: Vec<String> = f.master_cpu_by_thread_s.iter().map(|(n, s)| format!("{n} {s:.1} s")).collect();
    rows.push(("master CPU".into(), format!("{:.1} s ({})", f.master_cpu_s, threads.join(", "))));
    rows.push((
        "this process (sim agents): CPU / peak RSS".into(),
        format!("{:.1} s / {}", f.sim_cpu_s, mib(f.sim_rss_peak_bytes)),
    ));
    rows.push((
        "scheduler passes".into(),
        format!(
            "{}, mean {:.1} ms, total {:.2} s",
            f.scheduler_passes, f.scheduler_pass_mean_ms, f.scheduler_pass_total_s
        ),
    ));
    rows.push((
        "store commits".into(),
        format!(
            "{}, mean {:.2} ms, total {:.2} s; {} commands logged ({:.1} per commit)",
            f.store_commits,
            f.store_commit_mean_ms,
            f.store_commit_total_s,
            f.commands_logged,
            f.commands_logged as f64 / f.store_commits.max(1) as f64
        ),
    ));
    rows.push((
        "snapshots (from the master's log)".into(),
        format!(
            "{}, {} ms in all, longest {} ms, largest {}",
            f.snapshots.count,
            f.snapshots.total_ms,
            f.snapshots.max_ms,
            mib(f.snapshots.max_bytes)
        ),
    ));
    if let Some(c) = &f.constraint_check {
        rows.push((
            "constraint violations".into(),
            format!(
                "{} in {} tasks of the first 3 jobs (job 1: at most {} per rack, limit {})",
                c.violations, c.tasks_checked, c.most_on_one_rack, c.rack_limit
            ),
        ));
    }
    rows.push(("/metrics scrape (every 200 ms)".into(), format!("mean {:.1} ms", f.scrape_mean_ms)));
    rows.push((
        "sim traffic".into(),
        format!(
            "{} orders, {} update posts ({:.1} updates each), errors: {} polls, {} posts",
            f.sim.orders_received,
            f.sim.update_posts,
            f.sim.updates_sent as f64 / f.sim.update_posts.max(1) as f64,
            f.sim.poll_errors,
            f.sim.update_errors
        ),
    ));
    rows.push((
        "refused placements / illegal transitions / duplicate updates".into(),
        format!("{} / {} / {}", f.placements_refused, f.illegal_transitions, f.duplicate_updates),
    ));
    println!(
        "placement: {} tasks in {} jobs on {} simulated agents ({} millicpus, {} per task{})",
        thousands(f.tasks as f64),
        f.jobs,
        thousands(f.agents as f64),
        f.cpus_milli_per_task,
        capstan_model::ByteSize(f.mem_bytes_per_task).human(),
        if f.constraints { ", with constraints" } else { "" }
    );
    let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
    for (k, v) in &rows {
        println!("  {k:<width$}  {v}");
    }
    let mut json = serde_json::to_value(f).expect("serializable");
    json["bench"] = "placement".into();
    println!("{json}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_snapshot_lines_with_or_without_colours() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("master.log");
        std::fs::write(
            &log,
            "\u{1b}[2m2026-11-22T00:03:05Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m core: snapshot installed \u{1b}[3mindex\u{1b}[0m\u{1b}[2m=\u{1b}[0m20000 \u{1b}[3mbytes\u{1b}[0m\u{1b}[2m=\u{1b}[0m1464686 \u{1b}[3melapsed_ms\u{1b}[0m\u{1b}[2m=\u{1b}[0m6\n\
             2026-11-22T00:03:09Z INFO core: snapshot installed index=40000 bytes=2000000 elapsed_ms=11\n\
             2026-11-22T00:03:09Z INFO core: something else elapsed_ms=999\n",
        )
        .unwrap();
        let s = snapshots_in_log(&log);
        assert_eq!((s.count, s.total_ms, s.max_ms, s.max_bytes), (2, 17, 11, 2_000_000));
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1234567.0), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
    }
}
