//! `capstan sim scenario master-pause`: the seeds' worst day, at any size. A real master (a child
//! process) with N simulated agents running M long-lived service tasks is stopped with SIGSTOP for
//! longer than every liveness timeout (and than the jobs' `replace_after`), then resumed; the
//! scenario watches it until every task is RUNNING again and reports what the master did: tasks
//! killed and replaced, agent removals and their pace, the mass-loss breaker, the load it took
//! (status updates per second, memory) and how long it took to converge.
//!
//! Everything is observed from outside, as an operator would: the agents' own counts (every stop
//! the master ordered for a running task is a task killed), the master's `/metrics`,
//! `GET /v1/admin/status` and `GET /v1/events`, and `/proc/PID/status` for its memory.
//!
//! [`master_pause`] is the library function; the command and the CI test
//! (`crates/sim/tests/master_pause.rs`) both call it.

use crate::fleet::{Fleet, FleetConfig, StatsSnapshot};
use crate::master_process::MasterProcess;
use crate::os;
use crate::placement::{mib, thousands};
use crate::prom::Scrape;
use anyhow::Context as _;
use capstan_api::{AdminStatus, Client};
use capstan_model::Capacity;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// How often the master is sampled after it resumed (metrics, admin status, memory).
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How often the master is scraped while the tasks start.
const SETUP_POLL_EVERY: Duration = Duration::from_millis(250);
/// A sample that takes longer than this is skipped (the master may be busy catching up).
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Tasks per job (jobs = tasks / this, rounded up).
const TASKS_PER_JOB: u64 = 10_000;
/// Pages of events read at most (the master keeps a bounded ring; this bounds the loop).
const EVENT_PAGES_MAX: usize = 10_000;
/// Task states that mean "not settled": a task on its way somewhere, or waiting for its agent.
const UNSETTLED_STATES: [&str; 5] = ["PENDING", "ASSIGNED", "STARTING", "KILLING", "UNREACHABLE"];

/// What to run. [`MasterPauseConfig::new`] gives the defaults of the command.
#[derive(Clone, Debug)]
pub struct MasterPauseConfig {
    /// The `capstan` binary that runs the master.
    pub master_bin: PathBuf,
    pub agents: usize,
    /// Long-running service tasks (`sim:run`), over `ceil(tasks / 10,000)` jobs.
    pub tasks: u64,
    /// How long the master stays stopped.
    pub pause: Duration,
    /// `--heartbeat-interval` of the master.
    pub heartbeat_interval: Duration,
    /// `--agent-timeout` of the master.
    pub agent_timeout: Duration,
    /// `--agent-removal-rate` of the master, `COUNT/DURATION`.
    pub removal_rate: String,
    /// The jobs' `replace_after`: shorter than the pause, so that without the master's safeguards
    /// every task would be replaced.
    pub replace_after: Duration,
    /// More flags for `capstan master` (`--breaker-threshold 0.5`, …).
    pub master_args: Vec<String>,
    /// Registration and every task RUNNING must take less than this.
    pub setup_timeout: Duration,
    /// After the resume, convergence must take less than this.
    pub converge_timeout: Duration,
    /// After convergence, keep watching this long (a kill that comes late still counts).
    pub settle: Duration,
    pub capacity: Capacity,
    pub racks: u32,
    pub pods: u32,
    /// Where the master's temporary directory goes (default: the system's).
    pub dir: Option<PathBuf>,
    /// Keep the master's directory and log.
    pub keep_dir: bool,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl MasterPauseConfig {
    /// The command's defaults for `agents`, `tasks` and `pause`: heartbeat 1 s, agent timeout
    /// 5 s, removals 1/10s, `replace_after` halfway between the timeout and the end of the pause.
    pub fn new(master_bin: PathBuf, agents: usize, tasks: u64, pause: Duration) -> MasterPauseConfig {
        let agent_timeout = Duration::from_secs(5);
        MasterPauseConfig {
            master_bin,
            agents,
            tasks,
            pause,
            heartbeat_interval: Duration::from_secs(1),
            agent_timeout,
            removal_rate: "1/10s".into(),
            replace_after: default_replace_after(pause, agent_timeout),
            master_args: vec![],
            setup_timeout: Duration::from_secs(600),
            converge_timeout: Duration::from_secs(120),
            settle: Duration::from_secs(2),
            capacity: FleetConfig::capacity_from(None).expect("the default capacity parses"),
            racks: 10,
            pods: 4,
            dir: None,
            keep_dir: false,
            progress: false,
        }
    }
}

/// Halfway between the agent timeout and the end of the pause (at least 1 s): an agent silent
/// for the whole pause is due for replacement well before the master resumes.
pub fn default_replace_after(pause: Duration, agent_timeout: Duration) -> Duration {
    (pause.saturating_sub(agent_timeout) / 2).max(Duration::from_secs(1))
}

/// `COUNT/DURATION` (`1/10s`), as `--agent-removal-rate` takes it.
pub fn parse_rate(text: &str) -> Result<(u32, Duration), String> {
    let bad = || format!("\"{text}\" is not a rate; write COUNT/DURATION, e.g. \"1/10s\"");
    let (count, per) = text.trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let per = humantime::parse_duration(per.trim()).map_err(|_| bad())?;
    if count == 0 || per.is_zero() {
        return Err(format!("\"{text}\": both the count and the duration must be above zero"));
    }
    Ok((count, per))
}

/// Whether removals at `times_ms` (any order) kept to `count` per `per`: no window of length
/// `per` holds more than `count` of them (10 ms of slack for the stamps' rounding).
pub fn removals_within_rate(times_ms: &[i64], count: u32, per: Duration) -> bool {
    let mut t = times_ms.to_vec();
    t.sort_unstable();
    let count = count as usize;
    let per_ms = per.as_millis() as i64 - 10;
    t.iter().zip(t.iter().skip(count)).all(|(first, later)| later - first >= per_ms)
}

/// The same from cumulative counter samples (seconds, total): a coarse check that also sees
/// removals whose events the master's ring no longer holds. Between two samples `dt` apart at
/// most `count × (⌊(dt + slack) / per⌋ + 1)` removals fit.
pub fn counter_within_rate(samples: &[(f64, f64)], count: u32, per: Duration, slack: Duration) -> bool {
    let per_s = per.as_secs_f64();
    samples.iter().enumerate().all(|(i, (t0, v0))| {
        samples[i + 1..].iter().all(|(t1, v1)| {
            let windows = ((t1 - t0 + slack.as_secs_f64()) / per_s).floor() + 1.0;
            v1 - v0 <= f64::from(count) * windows
        })
    })
}

/// One agent removal the master reported (event `agent_removed`).
#[derive(Clone, Debug, Serialize)]
pub struct RemovalSeen {
    /// Seconds after the master was resumed.
    pub at_s: f64,
    pub message: String,
}

/// What one run saw. `tasks_killed == 0 && converged` is a pass.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MasterPauseReport {
    pub agents: usize,
    pub tasks: u64,
    pub jobs: u32,
    pub pause_s: f64,
    pub heartbeat_interval_ms: u64,
    pub agent_timeout_ms: u64,
    pub agent_removal_rate: String,
    pub replace_after_ms: u64,
    pub master_args: Vec<String>,
    /// From the first agent to all registered.
    pub registration_s: f64,
    /// From the first job to every task RUNNING.
    pub all_running_s: f64,
    /// Running tasks the master stopped after every task ran (`Desired::Stop` or a stop order),
    /// as the agents counted them.
    pub tasks_killed: u64,
    /// The part of `tasks_killed` that stop orders named.
    pub stop_orders: u64,
    /// `capstan_tasks_replaced_total` grew by this after the pause began (`None`: no such metric).
    pub tasks_replaced: Option<u64>,
    /// New tasks the agents were told to start after the pause began (replacements placed).
    pub tasks_launched_after_pause: u64,
    /// Tasks LOST at the end (`capstan_tasks{state="LOST"}`).
    pub tasks_lost: u64,
    /// `capstan_agent_removals_total` grew by this (`None`: no such metric).
    pub removals_total: Option<u64>,
    /// Removals the master's events name, with their times.
    pub removals: Vec<RemovalSeen>,
    /// No more than the rate's count in any window of its duration (events and counter samples).
    pub removal_rate_respected: bool,
    /// The shortest time between two removals.
    pub removal_gap_min_s: Option<f64>,
    /// Seen tripped in an event, a metric sample or an admin status sample.
    pub breaker_tripped: bool,
    pub breaker_evidence: Vec<String>,
    /// Events after the pause began, by kind (`None`: no events route).
    pub events: Option<BTreeMap<String, u64>>,
    /// Events the master no longer held when they were read.
    pub events_missed: u64,
    /// Status updates the master acknowledged, per second, at the most (after the resume).
    pub peak_updates_acked_per_s: f64,
    /// The master's own count of status updates, if it has one (`capstan_status_updates_total`).
    pub peak_status_updates_per_s: Option<f64>,
    pub master_rss_before_pause_bytes: u64,
    /// `VmHWM`: the most the master ever held.
    pub master_rss_peak_bytes: u64,
    pub converged: bool,
    /// From the resume to every task RUNNING (each once), every agent heard, the fleet quiet.
    pub converge_s: Option<f64>,
    /// What was still wrong when it gave up.
    pub not_converged_because: Option<String>,
    /// Task counts by state at the end (non-zero ones).
    pub final_tasks: BTreeMap<String, u64>,
    /// Agents by liveness at the end (`GET /v1/admin/status`; empty without it).
    pub final_agents: BTreeMap<String, u64>,
    /// Agent registrations after the resume.
    pub registrations_after_resume: u64,
    pub heartbeats_after_resume: u64,
    pub heartbeat_failures_after_resume: u64,
    /// 503/429 answers the agents got after the resume.
    pub shed_after_resume: u64,
    pub sim: StatsSnapshot,
    /// The master's log, when the directory was kept.
    pub master_log: Option<PathBuf>,
}

impl MasterPauseReport {
    /// Why this run fails, in words; empty when it passes.
    pub fn failures(&self) -> Vec<String> {
        let mut out = vec![];
        if self.tasks_killed > 0 {
            out.push(format!("{} tasks were killed", self.tasks_killed));
        }
        if !self.converged {
            out.push(format!(
                "not converged: {}",
                self.not_converged_because.as_deref().unwrap_or("every task RUNNING was never seen")
            ));
        }
        out
    }
}

/// The checks of one sample after the resume: `None` when converged, else what is still wrong.
fn unconverged(
    config: &MasterPauseConfig,
    scrape: &Scrape,
    admin: Option<&AdminStatus>,
    fleet: &Fleet,
    resumed_at: Instant,
) -> Option<String> {
    let mut wrong = vec![];
    let running = scrape.tasks_in("RUNNING");
    if running != config.tasks {
        wrong.push(format!("{running} of {} tasks RUNNING on the master", config.tasks));
    }
    for state in UNSETTLED_STATES {
        let n = scrape.tasks_in(state);
        if n > 0 {
            wrong.push(format!("{n} {state}"));
        }
    }
    let s = fleet.stats();
    if s.running != config.tasks {
        wrong.push(format!("the agents run {} tasks", s.running));
    }
    let queued = fleet.updates_queued();
    if queued > 0 {
        wrong.push(format!("{queued} status updates not yet acknowledged"));
    }
    let heard = fleet.heard_since(resumed_at);
    if heard < config.agents {
        wrong.push(format!("{heard} of {} agents heard since the resume", config.agents));
    }
    if let Some(a) = admin {
        let active = a.agents.get("active").copied().unwrap_or(0);
        if active != config.agents as u64 {
            wrong.push(format!("{active} of {} agents active ({:?})", config.agents, a.agents));
        }
    }
    (!wrong.is_empty()).then(|| wrong.join(", "))
}

async fn with_timeout<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(SAMPLE_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {} s", SAMPLE_TIMEOUT.as_secs())),
    }
}

/// Reads every event after `after`; `None` when the master has no events route.
async fn events_after(client: &Client, after: u64) -> Option<(Vec<capstan_api::EventView>, u64, u64)> {
    let (mut after, mut out, mut missed) = (after, vec![], 0);
    for _ in 0..EVENT_PAGES_MAX {
        let page = with_timeout("events", client.events(after, Duration::ZERO)).await.ok()?;
        missed += page.missed;
        if page.events.is_empty() {
            return Some((out, page.next.max(after), missed));
        }
        after = page.next;
        out.extend(page.events);
    }
    Some((out, after, missed))
}

fn seconds_after(at: &str, origin: SystemTime) -> Option<f64> {
    let t = humantime::parse_rfc3339(at).ok()?;
    Some(match t.duration_since(origin) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    })
}

fn job_spec(run: &str, j: u32, instances: u64, config: &MasterPauseConfig) -> serde_json::Value {
    let slots = crate::jobs::slots_per_agent(config.tasks, config.agents as u64, true);
    let (cpus_milli, mem_bytes) = crate::jobs::task_size_for(&config.capacity, slots);
    serde_json::json!({
        "job": format!("sim/master-pause/{run}-{j}"),
        "type": "service",
        "instances": instances,
        "replace_after": format!("{}ms", config.replace_after.as_millis()),
        "task": {
            "command": "sim:run",
            "user": "nobody",
            "cpus": f64::from(cpus_milli) / 1000.0,
            "mem": format!("{mem_bytes}B"),
            "disk": "1MiB",
        },
    })
}

/// Runs the scenario: starts the master and the fleet, pauses, resumes, watches, reports. An
/// error means the scenario could not be run (the master did not start, the tasks never all
/// ran); a run that killed tasks or did not converge is a report whose `failures()` say so.
pub async fn master_pause(config: MasterPauseConfig) -> anyhow::Result<MasterPauseReport> {
    anyhow::ensure!(config.agents > 0 && config.tasks > 0, "--agents and --tasks must be at least 1");
    let (rate_count, rate_per) =
        parse_rate(&config.removal_rate).map_err(|e| anyhow::anyhow!("--agent-removal-rate: {e}"))?;
    anyhow::ensure!(
        config.master_bin.is_file(),
        "no capstan binary at {} to run the master",
        config.master_bin.display()
    );
    if config.pause <= config.agent_timeout + config.replace_after && config.progress {
        eprintln!(
            "note: the pause ({}) is not longer than the agent timeout plus replace_after ({} + {}): \
             without safeguards nothing would be replaced anyway",
            humantime::format_duration(config.pause),
            humantime::format_duration(config.agent_timeout),
            humantime::format_duration(config.replace_after)
        );
    }
    crate::os::check_nofile(config.agents)?;
    let base = config.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let tmp = tempfile::Builder::new().prefix("capstan-scenario-master-pause-").tempdir_in(&base)?;
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let mut args = vec![
        "--heartbeat-interval".to_string(),
        ms(config.heartbeat_interval),
        "--agent-timeout".into(),
        ms(config.agent_timeout),
        "--agent-removal-rate".into(),
        config.removal_rate.clone(),
    ];
    args.extend(config.master_args.iter().cloned());
    let mut master =
        MasterProcess::start(&config.master_bin, &tmp.path().join("master"), &tmp.path().join("master.log"), &args)
            .await?;
    if config.progress {
        eprintln!("master pid {} at {} (log {}) with {}", master.pid, master.url, master.log.display(), args.join(" "));
    }
    let result = drive(&config, &mut master, rate_count, rate_per).await;
    let log = master.log.clone();
    master.stop().await;
    let kept = if config.keep_dir {
        let dir = tmp.keep();
        if config.progress {
            eprintln!("kept {}", dir.display());
        }
        Some(dir.join("master.log"))
    } else {
        None
    };
    match result {
        Ok(mut report) => {
            report.master_log = kept;
            Ok(report)
        }
        Err(e) => Err(e.context(format!("master log: {}", log.display()))),
    }
}

async fn drive(
    config: &MasterPauseConfig,
    master: &mut MasterProcess,
    rate_count: u32,
    rate_per: Duration,
) -> anyhow::Result<MasterPauseReport> {
    let client = Client::new(&master.url);
    let jobs = config.tasks.div_ceil(TASKS_PER_JOB) as u32;
    let mut r = MasterPauseReport {
        agents: config.agents,
        tasks: config.tasks,
        jobs,
        pause_s: config.pause.as_secs_f64(),
        heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u64,
        agent_timeout_ms: config.agent_timeout.as_millis() as u64,
        agent_removal_rate: config.removal_rate.clone(),
        replace_after_ms: config.replace_after.as_millis() as u64,
        master_args: config.master_args.clone(),
        ..Default::default()
    };
    let progress = |line: String| {
        if config.progress {
            eprintln!("{line}");
        }
    };

    // 1. Agents.
    let setup_deadline = Instant::now() + config.setup_timeout;
    let started = Instant::now();
    let fleet = Fleet::start(FleetConfig {
        master: master.url.clone(),
        count: config.agents,
        capacity: config.capacity.clone(),
        racks: config.racks,
        pods: config.pods,
    });
    loop {
        let registered = fleet.stats().registered as usize;
        if registered >= config.agents && client.agents().await?.len() >= config.agents {
            break;
        }
        anyhow::ensure!(
            Instant::now() < setup_deadline,
            "only {registered} of {} agents registered in time ({:?}; last error: {:?})",
            config.agents,
            fleet.stats(),
            fleet.last_error()
        );
        tokio::time::sleep(SETUP_POLL_EVERY).await;
    }
    r.registration_s = started.elapsed().as_secs_f64();
    progress(format!("{} agents registered in {:.1} s", config.agents, r.registration_s));

    // 2. Jobs, every task RUNNING.
    let run = format!("r{}", rand::random::<u32>() % 1_000_000);
    let t0 = Instant::now();
    for j in 0..jobs {
        let instances = config.tasks / u64::from(jobs) + u64::from(u64::from(j) < config.tasks % u64::from(jobs));
        let spec = job_spec(&run, j, instances, config);
        client.create_job(&spec).await.with_context(|| format!("job {} was refused", spec["job"]))?;
    }
    loop {
        let s = Scrape::parse(&client.metrics().await?);
        let f = fleet.stats();
        if s.tasks_in("RUNNING") == config.tasks && f.running == config.tasks && fleet.updates_queued() == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < setup_deadline,
            "only {} of {} tasks RUNNING in time (pending {}; agents run {})",
            s.tasks_in("RUNNING"),
            config.tasks,
            s.tasks_in("PENDING"),
            f.running
        );
        anyhow::ensure!(master.is_running(), "the master exited while the tasks started");
        tokio::time::sleep(SETUP_POLL_EVERY).await;
    }
    r.all_running_s = t0.elapsed().as_secs_f64();
    progress(format!("{} tasks in {jobs} jobs RUNNING in {:.1} s", config.tasks, r.all_running_s));
    // A few heartbeats before the pause, so the master has heard every agent.
    tokio::time::sleep(config.heartbeat_interval * 2).await;

    // 3. Baselines.
    let before = Scrape::parse(&client.metrics().await?);
    let sim_before = fleet.stats();
    let events_before = events_after(&client, 0).await.map(|(_, next, _)| next);
    r.master_rss_before_pause_bytes = os::status_bytes(master.pid, "VmRSS").unwrap_or(0);
    let counter = |s: &Scrape, name: &str| s.get(name);

    // 4. The pause.
    progress(format!("SIGSTOP the master for {}", humantime::format_duration(config.pause)));
    master.pause()?;
    let pause_end = Instant::now() + config.pause;
    while Instant::now() < pause_end {
        tokio::time::sleep((pause_end - Instant::now()).min(Duration::from_secs(5))).await;
        let s = fleet.stats();
        progress(format!(
            "  paused: heartbeats {} ({} failed), polls failed {}, update posts failed {}",
            s.heartbeats_sent, s.heartbeat_failures, s.poll_errors, s.update_errors
        ));
    }
    let resumed_wall = SystemTime::now();
    let resumed_at = Instant::now();
    master.resume()?;
    let sim_resumed = fleet.stats();
    progress("SIGCONT: watching until every task is RUNNING again".into());

    // 5. Watch.
    let deadline = resumed_at + config.converge_timeout;
    let mut removal_samples: Vec<(f64, f64)> = vec![];
    let mut last_acked = (resumed_at, sim_resumed.updates_acked);
    let mut last_master_updates: Option<(Instant, f64)> =
        counter(&before, "capstan_status_updates_total").map(|v| (resumed_at, v));
    let mut settled_at: Option<Instant> = None;
    let mut last_scrape = before.clone();
    let mut why = None;
    let mut samples = 0u64;
    loop {
        tokio::time::sleep(SAMPLE_EVERY).await;
        samples += 1;
        anyhow::ensure!(master.is_running(), "the master exited after it was resumed");
        let now = Instant::now();
        let since = now.duration_since(resumed_at).as_secs_f64();
        let acked = fleet.stats().updates_acked;
        let dt = now.duration_since(last_acked.0).as_secs_f64();
        if dt > 0.0 {
            r.peak_updates_acked_per_s = r.peak_updates_acked_per_s.max((acked - last_acked.1) as f64 / dt);
        }
        last_acked = (now, acked);
        let scrape = with_timeout("metrics", client.metrics()).await.map(|t| Scrape::parse(&t));
        let admin = with_timeout("admin status", client.admin_status()).await.ok();
        let scrape = match scrape {
            Ok(s) => s,
            Err(e) => {
                why = Some(e);
                if now >= deadline {
                    break;
                }
                continue;
            }
        };
        if let Some(v) = counter(&scrape, "capstan_status_updates_total") {
            if let Some((t, prev)) = last_master_updates {
                let dt = now.duration_since(t).as_secs_f64();
                if dt > 0.0 {
                    let rate = (v - prev) / dt;
                    r.peak_status_updates_per_s = Some(r.peak_status_updates_per_s.unwrap_or(0.0).max(rate));
                }
            }
            last_master_updates = Some((now, v));
        }
        if let Some(v) = counter(&scrape, "capstan_agent_removals_total") {
            removal_samples.push((since, v));
        }
        if scrape.get("capstan_breaker_tripped") == Some(1.0)
            && !r.breaker_evidence.iter().any(|e| e.starts_with("metric"))
        {
            r.breaker_evidence.push(format!("metric capstan_breaker_tripped = 1 at +{since:.1} s"));
        }
        if let Some(a) = admin.as_ref().filter(|a| a.breaker.tripped) {
            if !r.breaker_evidence.iter().any(|e| e.starts_with("admin status")) {
                r.breaker_evidence.push(format!(
                    "admin status: tripped at +{since:.1} s ({})",
                    a.breaker.reason.as_deref().unwrap_or("no reason given")
                ));
            }
        }
        let wrong = unconverged(config, &scrape, admin.as_ref(), &fleet, resumed_at);
        last_scrape = scrape;
        match (&wrong, settled_at) {
            (None, None) => {
                settled_at = Some(now);
                r.converge_s = Some(since);
                progress(format!(
                    "converged {since:.1} s after the resume; watching {} more",
                    humantime::format_duration(config.settle)
                ));
            }
            (None, Some(at)) if now.duration_since(at) >= config.settle => break,
            (None, Some(_)) => {}
            (Some(w), _) => {
                if settled_at.take().is_some() {
                    r.converge_s = None;
                    progress(format!("+{since:.1} s: unsettled again: {w}"));
                }
            }
        }
        why = wrong;
        if settled_at.is_none() && now >= deadline {
            break;
        }
        if config.progress && samples.is_multiple_of(5) {
            let s = fleet.stats();
            eprintln!(
                "  +{since:>5.1} s  {}  | heartbeats {} ({} failed), shed {}, registrations {}",
                why.as_deref().unwrap_or("settled"),
                s.heartbeats_sent - sim_resumed.heartbeats_sent,
                s.heartbeat_failures - sim_resumed.heartbeat_failures,
                s.shed - sim_resumed.shed,
                s.registrations - sim_resumed.registrations
            );
        }
    }
    r.converged = r.converge_s.is_some();
    r.not_converged_because = if r.converged { None } else { why };

    // 6. What happened.
    let end = with_timeout("metrics", client.metrics()).await.map(|t| Scrape::parse(&t)).unwrap_or(last_scrape);
    let delta = |name: &str| Some((counter(&end, name)? - counter(&before, name).unwrap_or(0.0)).max(0.0) as u64);
    r.tasks_replaced = delta("capstan_tasks_replaced_total");
    r.removals_total = delta("capstan_agent_removals_total");
    r.tasks_lost = end.tasks_in("LOST");
    for state in capstan_model::TaskState::ALL {
        let n = end.tasks_in(state.as_str());
        if n > 0 {
            r.final_tasks.insert(state.as_str().to_string(), n);
        }
    }
    for state in UNSETTLED_STATES {
        let n = end.tasks_in(state);
        if n > 0 {
            r.final_tasks.insert(state.to_string(), n);
        }
    }
    if let Ok(a) = with_timeout("admin status", client.admin_status()).await {
        r.final_agents = a.agents.clone();
        if a.breaker.tripped && !r.breaker_evidence.iter().any(|e| e.starts_with("admin status")) {
            r.breaker_evidence.push("admin status: still tripped at the end".into());
        }
    }
    if let Some((events, _, missed)) = events_after(&client, events_before.unwrap_or(0)).await {
        let mut kinds = BTreeMap::new();
        for e in &events {
            *kinds.entry(e.kind.clone()).or_insert(0) += 1;
            let at_s = seconds_after(&e.at, resumed_wall);
            match e.kind.as_str() {
                "agent_removed" => {
                    r.removals.push(RemovalSeen { at_s: at_s.unwrap_or(f64::NAN), message: e.message.clone() })
                }
                "breaker_tripped" => r.breaker_evidence.push(format!(
                    "event breaker_tripped at {}: {}",
                    at_s.map(|s| format!("{s:+.1} s")).unwrap_or_else(|| e.at.clone()),
                    e.message
                )),
                _ => {}
            }
        }
        r.events = Some(kinds);
        r.events_missed = missed;
    }
    r.breaker_tripped = !r.breaker_evidence.is_empty();
    let removal_ms: Vec<i64> = r.removals.iter().map(|x| (x.at_s * 1000.0).round() as i64).collect();
    r.removal_rate_respected = removals_within_rate(&removal_ms, rate_count, rate_per)
        && counter_within_rate(&removal_samples, rate_count, rate_per, SAMPLE_EVERY * 2);
    let mut sorted = removal_ms.clone();
    sorted.sort_unstable();
    r.removal_gap_min_s = sorted.windows(2).map(|w| (w[1] - w[0]) as f64 / 1000.0).reduce(f64::min);
    r.master_rss_peak_bytes = os::status_bytes(master.pid, "VmHWM").unwrap_or(0);
    let sim = fleet.stats();
    r.tasks_killed = sim.killed - sim_before.killed;
    r.stop_orders = sim.stop_orders - sim_before.stop_orders;
    r.tasks_launched_after_pause = sim.launched - sim_before.launched;
    r.registrations_after_resume = sim.registrations - sim_resumed.registrations;
    r.heartbeats_after_resume = sim.heartbeats_sent - sim_resumed.heartbeats_sent;
    r.heartbeat_failures_after_resume = sim.heartbeat_failures - sim_resumed.heartbeat_failures;
    r.shed_after_resume = sim.shed - sim_resumed.shed;
    r.sim = sim;
    drop(fleet);
    Ok(r)
}

/// `RUNNING 2,000, LOST 3`.
fn counts(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter().map(|(k, n)| format!("{k} {}", thousands(*n as f64))).collect::<Vec<_>>().join(", ")
}

/// The report as a table for people.
pub fn render_table(r: &MasterPauseReport) -> String {
    let opt = |v: Option<u64>, missing: &str| v.map(|n| thousands(n as f64)).unwrap_or_else(|| missing.to_string());
    let removals = if r.removals.is_empty() {
        "none".to_string()
    } else {
        let times: Vec<String> = r.removals.iter().take(20).map(|x| format!("{:+.1} s", x.at_s)).collect();
        let more = r.removals.len().saturating_sub(20);
        format!("{}{}", times.join(", "), if more > 0 { format!(" (and {more} more)") } else { String::new() })
    };
    let rows: Vec<(&str, String)> = vec![
        ("tasks killed", format!("{} ({} by stop orders)", r.tasks_killed, r.stop_orders)),
        (
            "tasks replaced",
            format!(
                "{} (capstan_tasks_replaced_total); {} new tasks started after the pause; {} LOST",
                opt(r.tasks_replaced, "no metric"),
                r.tasks_launched_after_pause,
                r.tasks_lost
            ),
        ),
        (
            "agent removals",
            format!(
                "{} (capstan_agent_removals_total), {} in events; rate {} {}{}",
                opt(r.removals_total, "no metric"),
                r.removals.len(),
                r.agent_removal_rate,
                if r.removal_rate_respected { "respected" } else { "EXCEEDED" },
                r.removal_gap_min_s.map(|g| format!(", closest two {g:.1} s apart")).unwrap_or_default()
            ),
        ),
        ("removal times (after resume)", removals),
        (
            "breaker tripped",
            if r.breaker_tripped { format!("yes: {}", r.breaker_evidence.join("; ")) } else { "no".into() },
        ),
        (
            "peak status updates/s",
            format!(
                "{} acknowledged to the agents{}",
                thousands(r.peak_updates_acked_per_s),
                r.peak_status_updates_per_s
                    .map(|p| format!(", {} by the master's count", thousands(p)))
                    .unwrap_or_default()
            ),
        ),
        (
            "master RSS before pause / peak",
            format!("{} / {}", mib(r.master_rss_before_pause_bytes), mib(r.master_rss_peak_bytes)),
        ),
        (
            "time to converge after resume",
            match r.converge_s {
                Some(s) => format!("{s:.1} s"),
                None => format!("did not converge: {}", r.not_converged_because.as_deref().unwrap_or("?")),
            },
        ),
        (
            "after resume",
            format!(
                "{} heartbeats ({} failed), {} shed answers (503/429), {} registrations",
                r.heartbeats_after_resume,
                r.heartbeat_failures_after_resume,
                r.shed_after_resume,
                r.registrations_after_resume
            ),
        ),
        (
            "events after the pause",
            match &r.events {
                Some(k) => {
                    let kinds: Vec<String> = k.iter().map(|(kind, n)| format!("{kind} {n}")).collect();
                    let missed =
                        if r.events_missed > 0 { format!(" ({} missed)", r.events_missed) } else { String::new() };
                    format!("{}{missed}", if kinds.is_empty() { "none".into() } else { kinds.join(", ") })
                }
                None => "no events route".into(),
            },
        ),
        ("tasks at the end", counts(&r.final_tasks)),
        ("agents at the end", if r.final_agents.is_empty() { "—".into() } else { counts(&r.final_agents) }),
        ("setup", format!("agents registered in {:.1} s, tasks RUNNING in {:.1} s", r.registration_s, r.all_running_s)),
    ];
    let mut out = format!(
        "master-pause: {} agents, {} tasks in {} jobs, paused {} (heartbeat {} ms, agent timeout {} ms, removals {}, replace_after {} ms{})\n",
        thousands(r.agents as f64),
        thousands(r.tasks as f64),
        r.jobs,
        humantime::format_duration(Duration::from_secs_f64(r.pause_s)),
        r.heartbeat_interval_ms,
        r.agent_timeout_ms,
        r.agent_removal_rate,
        r.replace_after_ms,
        if r.master_args.is_empty() { String::new() } else { format!(", {}", r.master_args.join(" ")) }
    );
    let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
    for (k, v) in &rows {
        out.push_str(&format!("  {k:<width$}  {v}\n"));
    }
    let failures = r.failures();
    out.push_str(&if failures.is_empty() { "PASS\n".to_string() } else { format!("FAIL: {}\n", failures.join("; ")) });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1/10s"), Ok((1, Duration::from_secs(10))));
        assert_eq!(parse_rate(" 5 / 1m "), Ok((5, Duration::from_secs(60))));
        assert!(parse_rate("0/10s").is_err());
        assert!(parse_rate("1/0s").is_err());
        assert!(parse_rate("10s").is_err());
        assert!(parse_rate("a/10s").is_err());
    }

    #[test]
    fn removal_pace() {
        let per = Duration::from_secs(10);
        assert!(removals_within_rate(&[], 1, per));
        assert!(removals_within_rate(&[5], 1, per));
        assert!(removals_within_rate(&[20_000, 0, 10_000], 1, per));
        // Rounded stamps a few ms short of the period pass; a second one too soon does not.
        assert!(removals_within_rate(&[0, 9_995], 1, per));
        assert!(!removals_within_rate(&[0, 9_000], 1, per));
        // Two per 10 s: any two may be close, never three in one window.
        assert!(removals_within_rate(&[0, 1, 10_000, 10_001], 2, per));
        assert!(!removals_within_rate(&[0, 1, 2], 2, per));
        assert!(!removals_within_rate(&[0, 5_000, 9_000], 2, per));
    }

    #[test]
    fn removal_counter_pace() {
        let per = Duration::from_secs(10);
        let slack = Duration::from_secs(2);
        assert!(counter_within_rate(&[], 1, per, slack));
        // One per 10 s, sampled every second.
        let good: Vec<(f64, f64)> = (0..40).map(|t| (t as f64, (t / 10) as f64)).collect();
        assert!(counter_within_rate(&good, 1, per, slack));
        let bad = vec![(0.0, 0.0), (1.0, 0.0), (2.0, 3.0)];
        assert!(!counter_within_rate(&bad, 1, per, slack));
    }

    #[test]
    fn replace_after_falls_inside_the_pause() {
        let s = Duration::from_secs;
        assert_eq!(default_replace_after(s(8), s(3)), Duration::from_millis(2500));
        assert_eq!(default_replace_after(s(120), s(5)), Duration::from_millis(57_500));
        assert_eq!(default_replace_after(s(2), s(5)), s(1));
        let c = MasterPauseConfig::new("capstan".into(), 10, 100, s(120));
        assert!(c.agent_timeout + c.replace_after < c.pause);
    }

    #[test]
    fn job_bodies_are_valid_and_add_up() {
        let mut c = MasterPauseConfig::new("capstan".into(), 200, 2_000, Duration::from_secs(8));
        c.replace_after = Duration::from_millis(2500);
        let spec = job_spec("t", 0, 2_000, &c);
        assert_eq!(spec["replace_after"], "2500ms");
        assert_eq!(spec["task"]["command"], "sim:run");
        // 10 tasks per agent plus a quarter of room for replacements.
        let mem: capstan_model::ByteSize = spec["task"]["mem"].as_str().unwrap().parse().unwrap();
        assert!(mem.0 * 12 <= c.capacity.mem_bytes && mem.0 * 14 > c.capacity.mem_bytes, "{mem:?}");
    }

    #[test]
    fn event_times_relative_to_the_resume() {
        let origin = humantime::parse_rfc3339("2026-01-01T00:00:10Z").unwrap();
        assert_eq!(seconds_after("2026-01-01T00:00:12.500Z", origin), Some(2.5));
        assert_eq!(seconds_after("2026-01-01T00:00:09Z", origin), Some(-1.0));
        assert_eq!(seconds_after("yesterday", origin), None);
    }

    #[test]
    fn table_says_pass_or_fail() {
        let mut r = MasterPauseReport { converged: true, converge_s: Some(3.0), ..Default::default() };
        assert!(render_table(&r).ends_with("PASS\n"));
        r.tasks_killed = 2;
        assert!(render_table(&r).contains("FAIL: 2 tasks were killed"));
    }
}
