//! The `capstan` command as a library: one binary for the daemons (dev, master, agent, the per-task
//! supervisor) and the client commands (job, task, agent list), which talk HTTP/JSON to a master.
//! `main` is the whole program; the `capstan` binary (`main.rs`) and the hostile-input suite's copy
//! of it (`crates/hostile`) only call it.

mod admin;
mod backup;
mod bench;
mod bench_failover;
mod drain;
mod output;
mod update;

use anyhow::{bail, Context as _};
use capstan_api::{ApiError, Client};
use capstan_master::liveness::{LivenessConfig, RemovalRate};
use clap::{Args, Parser, Subcommand};
use output::Output;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "capstan",
    version,
    about = "Capstan keeps services, batch and cron jobs running on a pool of Linux hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Clone)]
pub struct ClientArgs {
    /// The master(s) to talk to.
    #[arg(long, env = "CAPSTAN_ADDR", default_value = "http://127.0.0.1:7070", global = true)]
    pub addr: String,
    /// How to print results.
    #[arg(long, value_enum, default_value = "table", global = true)]
    pub output: Output,
}

#[derive(Subcommand)]
enum Cmd {
    /// A whole one-host cluster (master, agent, embedded store) in one process.
    Dev(DevArgs),
    /// The control plane.
    Master(MasterArgs),
    /// Run an agent (with flags), or list agents (`capstan agent list`).
    Agent(AgentCmdArgs),
    /// Jobs: create, kill, status, list, validate.
    Job {
        #[command(subcommand)]
        cmd: JobCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Tasks: list, status, logs, kill.
    Task {
        #[command(subcommand)]
        cmd: TaskCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Operator actions: freeze, status, breaker, events, quotas, scheduler levers.
    Admin {
        #[command(subcommand)]
        cmd: admin::AdminCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Benchmarks that print their figures.
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
    },
    /// Simulated agents for scale tests (the real agent protocol, a fake executor).
    Sim {
        #[command(subcommand)]
        cmd: capstan_sim::cli::SimCmd,
    },
    /// The per-task supervisor (started by the agent, not by people).
    #[command(hide = true)]
    Supervise { sandbox: PathBuf },
}

#[derive(Args)]
struct DevArgs {
    /// Where state, sandboxes and logs live (default: the user's data directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:7070")]
    bind: SocketAddr,
    /// Let tasks run as root.
    #[arg(long)]
    allow_root_tasks: bool,
    #[command(flatten)]
    agent: AgentFlags,
    #[command(flatten)]
    jobs: JobFlags,
    // Last: its help heading applies to the flags after it.
    #[command(flatten)]
    liveness: LivenessFlags,
}

/// How long jobs live and how often cron jobs may run (`capstan master` and `capstan dev`); the
/// defaults are `JobSettings::default()`'s (a unit test holds them equal).
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Jobs (master)")]
struct JobFlags {
    /// A finished batch job (its tasks and their history) is forgotten this long after it
    /// finished.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    batch_retention: Duration,
    /// Cron schedules whose runs come closer than this are refused at submission.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    cron_interval_min: Duration,
}

impl JobFlags {
    fn settings(&self) -> anyhow::Result<capstan_master::reaper::JobSettings> {
        if self.cron_interval_min < Duration::from_secs(1) {
            bail!(
                "--cron-interval-min {}: must be at least 1s (cron fire times are whole seconds)",
                humantime::format_duration(self.cron_interval_min)
            );
        }
        Ok(capstan_master::reaper::JobSettings {
            batch_retention: self.batch_retention,
            cron_interval_min: self.cron_interval_min,
        })
    }
}

/// How the master judges whether agents are alive and how carefully it replaces the tasks of
/// those that are not (`capstan master` and `capstan dev`). The defaults are
/// [`LivenessConfig::default`]'s (a unit test holds them equal).
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Agent liveness (master)")]
struct LivenessFlags {
    /// How often agents send a heartbeat (they are told when they register).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// An agent not heard from for this long is marked unreachable (its tasks are kept); at
    /// least twice --heartbeat-interval.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    agent_timeout: Duration,
    /// At most this many agent removals (its tasks replaced elsewhere) per duration: `COUNT/DURATION`.
    #[arg(long, default_value = "1/10s")]
    agent_removal_rate: RemovalRate,
    /// The mass-loss breaker trips (no removals at all) when more than this share of the agents
    /// became unreachable within --breaker-window.
    #[arg(long, default_value_t = 0.3)]
    breaker_threshold: f64,
    /// The window of --breaker-threshold.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    breaker_window: Duration,
    /// The agent attribute whose values are fault domains: all agents (two or more) of one value
    /// unreachable trips the breaker too.
    #[arg(long, default_value = "rack")]
    fault_domain: String,
    /// After it starts (or finds it was stalled), the master waits this long for agents to call in
    /// before it concludes anything about them. Default: --agent-timeout.
    #[arg(long, value_parser = humantime::parse_duration)]
    reregistration_period: Option<Duration>,
    /// A task that runs on an agent without the master knowing it is stopped only after this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    stray_grace: Duration,
}

impl LivenessFlags {
    /// The master's settings, checked as a whole; an error names the flag.
    fn config(self) -> anyhow::Result<LivenessConfig> {
        let config = LivenessConfig {
            heartbeat_interval: self.heartbeat_interval,
            agent_timeout: self.agent_timeout,
            removal_rate: self.agent_removal_rate,
            breaker_threshold: self.breaker_threshold,
            breaker_window: self.breaker_window,
            fault_domain: self.fault_domain,
            reregistration_period: self.reregistration_period.unwrap_or(self.agent_timeout),
            stray_grace: self.stray_grace,
        };
        config.check().map_err(|e| anyhow::anyhow!(e))?;
        Ok(config)
    }
}

/// What the agent offers and how it recovers, measures and cleans up (`capstan agent` and
/// `capstan dev`).
#[derive(Args, Clone)]
struct AgentFlags {
    /// `cpus=N,mem=SIZE,disk=SIZE,ports=LO-HI` instead of what is detected.
    #[arg(long)]
    resources: Option<String>,
    /// `k=v,…` attributes of the agent.
    #[arg(long)]
    attributes: Option<String>,
    /// Cgroup path under which tasks get their cgroups.
    #[arg(long, default_value = "capstan")]
    cgroup_root: String,
    /// On start: `reattach` to the tasks found in the sandboxes (a damaged or newer checkpoint
    /// stops the start), or `cleanup`: kill every task found, report nothing for them, move the
    /// sandboxes aside to DATA/sandboxes.cleanup-<time>/, reset the update log and start clean.
    #[arg(long, default_value = "reattach")]
    recover: capstan_agent::RecoverMode,
    /// How often running tasks are measured (usage sent to the master).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    usage_interval: std::time::Duration,
    /// Where the sandboxes' file system has no project quotas: how often each task's sandbox is
    /// measured against its disk limit (a task over it is killed).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    disk_check_interval: std::time::Duration,
    /// What holds a task to its disk limit: `project-quota` (the sandboxes' file system refuses
    /// writes past it), `loop-volume` (a size-limited ext4 volume per task mounted on its work
    /// directory refuses them; needs root, mkfs.ext4, loop devices; a mkfs per launch),
    /// `check-and-kill` (measured every --disk-check-interval, killed when over) or `auto`:
    /// project quotas where available, else check-and-kill.
    #[arg(long, default_value = "auto")]
    disk_enforcement: capstan_agent::DiskEnforcement,
    /// How often sandboxes of ended tasks are considered for removal.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    sandbox_gc_interval: std::time::Duration,
    /// Sandboxes of tasks that ended (and were reported) longer ago than this are removed.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    sandbox_max_age: std::time::Duration,
    /// Below this much free space on the data directory's file system, sandboxes of ended tasks
    /// are removed, oldest first (`10%`).
    #[arg(long, default_value = "10%", value_parser = parse_percent)]
    sandbox_min_free: f64,
    /// Most processes and threads of one task (its cgroup's pids limit); 0: no limit.
    #[arg(long, default_value_t = capstan_agent::AgentConfig::DEFAULT_TASK_PIDS_MAX)]
    task_pids_max: u64,
}

impl AgentFlags {
    fn apply(self, c: &mut capstan_agent::AgentConfig) -> anyhow::Result<()> {
        c.attributes = parse_attributes(self.attributes.as_deref())?;
        c.resources = self.resources;
        c.cgroup_root = self.cgroup_root;
        c.recover = self.recover;
        c.usage_interval = self.usage_interval;
        c.disk_check_interval = self.disk_check_interval;
        c.disk_enforcement = self.disk_enforcement;
        c.gc_interval = self.sandbox_gc_interval;
        c.sandbox_max_age = self.sandbox_max_age;
        c.sandbox_min_free_percent = self.sandbox_min_free;
        c.task_pids_max = self.task_pids_max;
        Ok(())
    }
}

/// `10%` (or `10`) → 10.0.
fn parse_percent(s: &str) -> Result<f64, String> {
    let n: f64 =
        s.trim().trim_end_matches('%').trim().parse().map_err(|_| format!("`{s}`: use a percentage like 10%"))?;
    if (0.0..=100.0).contains(&n) {
        Ok(n)
    } else {
        Err(format!("`{s}`: a percentage from 0% to 100%"))
    }
}

#[derive(Args)]
struct MasterArgs {
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7070")]
    bind: SocketAddr,
    /// `etcd://host:port[,host:port…][/prefix]` for several masters (one leads, elected through
    /// etcd); default: the embedded store in the data directory.
    #[arg(long)]
    store: Option<String>,
    #[arg(long)]
    allow_root_tasks: bool,
    /// Open HTTP connections at most (lowered to what the file descriptor limit allows).
    #[arg(long, default_value_t = capstan_api::serve::CONNECTIONS_MAX)]
    max_connections: usize,
    /// Open HTTP connections at most from one client address (agents, the CLI and scripts on
    /// one host share it; raise it for `capstan sim` fleets, which all come from one address).
    #[arg(long, default_value_t = capstan_api::serve::CONNECTIONS_PER_IP_MAX)]
    max_connections_per_ip: usize,
    #[command(flatten)]
    liveness: LivenessFlags,
    /// The URL the other masters send clients to while this one leads (default: http://BIND,
    /// with this host's name when BIND listens on every address).
    #[arg(long)]
    advertise: Option<String>,
    /// The leader's etcd lease: when the leader dies, another master leads about this long
    /// after the leader's last renewal. Whole seconds, at least 2s (etcd's smallest lease).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    lease_ttl: std::time::Duration,
    /// How long one etcd call may take before it fails; a leader whose store write fails this
    /// way ends its term (the write's outcome is unknown) and the next term reads the store.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    etcd_timeout: std::time::Duration,
    #[command(flatten)]
    backup: backup::BackupFlags,
    #[command(flatten)]
    jobs: JobFlags,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct AgentCmdArgs {
    #[command(subcommand)]
    cmd: Option<AgentCmd>,
    /// The master(s): `URL[,URL…]`.
    #[arg(long, required = true)]
    master: Option<String>,
    #[arg(long, required = true)]
    data_dir: Option<PathBuf>,
    /// Where the agent's own API (logs) listens: loopback by default, because it does not
    /// authenticate yet; bind a routable address for the master to proxy logs from another host.
    #[arg(long, default_value = "127.0.0.1:7071")]
    bind: SocketAddr,
    /// The URL the master uses to reach this agent (default: from --bind and the hostname).
    #[arg(long)]
    advertise: Option<String>,
    /// Let tasks run as root.
    #[arg(long)]
    allow_root_tasks: bool,
    #[command(flatten)]
    agent: AgentFlags,
}

#[derive(Subcommand)]
enum AgentCmd {
    /// List the agents.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop placing on an agent and move its service tasks elsewhere, never taking a job below
    /// its `min_healthy` share; batch tasks are left to finish. Then the agent is drained.
    Drain {
        /// The agent's id, or its host name when one agent runs there.
        id: String,
        /// Who drains it (default: `$USER@hostname`).
        #[arg(long)]
        by: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Let a drained (or draining) agent take new tasks again.
    Undrain {
        id: String,
        #[arg(long)]
        by: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum JobCmd {
    /// Create a job from a job file.
    Create { file: PathBuf },
    /// Roll a job to a new spec batch by batch (`update FILE`), or steer its update
    /// (`update promote|pause|resume|abort|rollback|status|watch KEY`).
    Update(update::UpdateArgs),
    /// Kill every task of a job and remove it.
    Kill { key: String },
    /// A job's status.
    Status { key: String },
    /// All jobs.
    List,
    /// Check a job file without submitting it.
    Validate { file: PathBuf },
    /// Start a run of a cron job now (its collision policy applies).
    Start { key: String },
}

#[derive(Subcommand)]
enum TaskCmd {
    /// Tasks, optionally of one job or in one state.
    List {
        #[arg(long)]
        job: Option<String>,
        #[arg(long)]
        state: Option<String>,
    },
    /// One task in full.
    Status { id: String },
    /// A task's output, from the agent that ran it.
    Logs {
        id: String,
        #[arg(long)]
        stderr: bool,
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        tail: Option<u64>,
    },
    /// Kill a task (a service instance gets a fresh task).
    Kill { id: String },
}

fn parse_attributes(text: Option<&str>) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in text.unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').with_context(|| format!("--attributes: `{item}` is not key=value"))?;
        if k.trim().is_empty() {
            bail!("--attributes: `{item}` has an empty key");
        }
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

fn default_data_dir() -> PathBuf {
    // Tasks run as other users and must be able to reach their sandboxes under this directory;
    // root's home is private, so root gets the system location.
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/capstan/dev");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    base.join("capstan").join("dev")
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAPSTAN_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

pub fn main() {
    let cli = Cli::parse();
    if let Cmd::Supervise { sandbox } = &cli.command {
        // Single-threaded on purpose: the supervisor forks.
        std::process::exit(capstan_containerizer::supervise_main(sandbox));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(run(cli));
    // A daemon told to stop (SIGTERM, Ctrl-C) exits now: work still under way on the runtime (a
    // blocking load of the state, a request waiting for the writer) does not hold it. Everything
    // acknowledged is in the store already, and a command cut short was not acknowledged.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// How long a stopping process lets the work still on its runtime finish.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

async fn wait_for_shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Dev(a) => {
            let liveness = a.liveness.config()?;
            init_tracing();
            let data_dir = a.data_dir.unwrap_or_else(default_data_dir);
            let jobs = a.jobs.settings()?;
            let dev = start_dev(&data_dir, a.bind, a.allow_root_tasks, liveness, jobs, |c| a.agent.apply(c)).await?;
            println!("capstan dev cluster serving at {} (data in {})", dev.url(), data_dir.display());
            println!("try: capstan job create examples/hello.toml && capstan task list");
            wait_for_shutdown().await;
            eprintln!(
                "stopping; tasks keep running and are found again when capstan dev starts on the same data directory"
            );
            Ok(())
        }
        Cmd::Master(a) => {
            let liveness = a.liveness.config()?;
            let backup = a.backup.schedule()?;
            let jobs = a.jobs.settings()?;
            init_tracing();
            let m = capstan_master::start(capstan_master::MasterConfig {
                bind: a.bind,
                data_dir: a.data_dir,
                store_url: a.store,
                allow_root_tasks: a.allow_root_tasks,
                liveness,
                ha: capstan_master::leader::HaConfig {
                    advertise: a.advertise,
                    lease_ttl: a.lease_ttl,
                    etcd_timeout: a.etcd_timeout,
                },
                backup,
                jobs,
                net: capstan_api::serve::ServeConfig {
                    connections_max: a.max_connections,
                    connections_per_ip_max: a.max_connections_per_ip,
                    ..Default::default()
                },
            })
            .await?;
            println!("capstan master serving at {}", m.url());
            wait_for_shutdown().await;
            Ok(())
        }
        Cmd::Agent(a) => match a.cmd {
            Some(AgentCmd::List { client }) => cmd_agent_list(&client).await,
            Some(AgentCmd::Drain { id, by, client }) => drain::drain(&id, by, false, &client).await,
            Some(AgentCmd::Undrain { id, by, client }) => drain::drain(&id, by, true, &client).await,
            None => {
                init_tracing();
                let (Some(master), Some(data_dir)) = (a.master, a.data_dir) else {
                    bail!("capstan agent needs --master URL and --data-dir DIR")
                };
                let mut config = capstan_agent::AgentConfig {
                    bind: a.bind,
                    advertise: a.advertise,
                    allow_root_tasks: a.allow_root_tasks,
                    ..capstan_agent::AgentConfig::new(master, data_dir)
                };
                a.agent.apply(&mut config)?;
                let h = capstan_agent::start(config).await?;
                println!("capstan agent {} running; API at http://{}", h.agent.id, h.addr);
                wait_for_shutdown().await;
                Ok(())
            }
        },
        Cmd::Job { cmd, client } => cmd_job(cmd, &client).await,
        Cmd::Task { cmd, client } => cmd_task(cmd, &client).await,
        Cmd::Admin { cmd, client } => admin::run(cmd, &client).await,
        Cmd::Bench { cmd } => bench::run(cmd).await,
        Cmd::Sim { cmd } => {
            init_tracing();
            capstan_sim::cli::run(cmd).await
        }
        Cmd::Supervise { .. } => unreachable!("handled before the runtime starts"),
    }
}

pub struct Dev {
    pub master: capstan_master::MasterHandle,
    pub agent: capstan_agent::AgentHandle,
}

impl Dev {
    pub fn url(&self) -> String {
        self.master.url()
    }
}

/// Master + agent in this process, each with its own directory under `data_dir`; `liveness` is
/// the master's (checked by the caller); `agent` sets the agent's settings beyond the defaults
/// (resources, attributes, cgroup root, recovery…).
pub async fn start_dev(
    data_dir: &std::path::Path,
    bind: SocketAddr,
    allow_root_tasks: bool,
    liveness: LivenessConfig,
    jobs: capstan_master::reaper::JobSettings,
    agent: impl FnOnce(&mut capstan_agent::AgentConfig) -> anyhow::Result<()>,
) -> anyhow::Result<Dev> {
    let master = capstan_master::start(capstan_master::MasterConfig {
        bind,
        data_dir: data_dir.join("master"),
        store_url: None,
        allow_root_tasks,
        liveness,
        ha: Default::default(),
        backup: Default::default(),
        jobs,
        net: Default::default(),
    })
    .await?;
    let mut config = capstan_agent::AgentConfig {
        allow_root_tasks,
        ..capstan_agent::AgentConfig::new(master.url(), data_dir.join("agent"))
    };
    agent(&mut config)?;
    let agent = capstan_agent::start(config).await?;
    Ok(Dev { master, agent })
}

/// Sends a request that changes the cluster. Afterwards, when the master said that the cluster is
/// frozen, warns loudly on standard error, whether the request was accepted or not; a request
/// refused because of the freeze says how to lift it.
pub(crate) async fn mutate<T>(
    client: &Client,
    request: impl std::future::Future<Output = Result<T, ApiError>>,
) -> anyhow::Result<T> {
    let result = request.await;
    if let Some(notice) = client.frozen_notice() {
        eprintln!("{}", output::frozen_warning(&notice));
    }
    result.map_err(|e| match &e {
        ApiError::Api { code, .. } if code == "frozen" => {
            anyhow::anyhow!("{e} (the cluster is frozen; `capstan admin unfreeze` lifts it)")
        }
        _ => e.into(),
    })
}

pub(crate) fn read_job_file(file: &std::path::Path) -> anyhow::Result<capstan_model::JobSpec> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    // The master applies its own policy (root or not); here only the file itself is checked.
    let policy = capstan_model::ValidationPolicy { allow_root: true, ..Default::default() };
    let parse = if file.extension().is_some_and(|e| e == "json") {
        capstan_model::parse_json
    } else {
        capstan_model::parse_toml
    };
    parse(&text, &policy).map_err(|problems| anyhow::anyhow!("{} is not a valid job file:\n{problems}", file.display()))
}

/// Checks a job key before it goes into a URL, so a typo gets a clear message.
pub(crate) fn job_key(key: &str) -> anyhow::Result<String> {
    key.parse::<capstan_model::JobKey>().map(|k| k.to_string()).map_err(|e| anyhow::anyhow!(e.0))
}

async fn cmd_job(cmd: JobCmd, c: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(&c.addr);
    match cmd {
        JobCmd::Validate { file } => {
            let spec = read_job_file(&file)?;
            c.output.print(&spec, || {
                if spec.job_type == capstan_model::JobType::System {
                    return format!("{}: valid job {} (system: one per matching agent)", file.display(), spec.job);
                }
                format!("{}: valid job {} ({} × {})", file.display(), spec.job, spec.instances, spec.job_type.as_str())
            });
        }
        JobCmd::Create { file } => {
            let spec = read_job_file(&file)?;
            let created = mutate(&client, client.create_job(&serde_json::to_value(&spec)?)).await?;
            c.output.print(&created, || match &spec.cron {
                Some(cron) => format!(
                    "cron job {} created; it runs on \"{cron}\" (capstan job status shows the next run)",
                    created.job
                ),
                None => format!("job {} created with {} tasks", created.job, created.tasks.len()),
            });
        }
        JobCmd::Update(args) => update::cmd_update(args, c).await?,
        JobCmd::Kill { key } => {
            let key = job_key(&key)?;
            let v = mutate(&client, client.kill_job(&key)).await?;
            c.output.print(&v, || format!("job {key}: {}", v["status"].as_str().unwrap_or("killing")));
        }
        JobCmd::Status { key } => {
            let key = job_key(&key)?;
            let job = client.job(&key).await?;
            let tasks = client.tasks(Some(&key), None).await?;
            c.output.print(&serde_json::json!({"job": job, "tasks": tasks}), || output::job_status(&job, &tasks));
        }
        JobCmd::List => {
            let jobs = client.jobs().await?;
            c.output.print(&jobs, || output::job_table(&jobs));
        }
        JobCmd::Start { key } => {
            let key = job_key(&key)?;
            let run = mutate(&client, client.start_job(&key)).await?;
            c.output.print(&run, || match run.result.as_str() {
                "RUNNING" => format!("job {key}: run {} started with {} task(s)", run.run, run.tasks.len()),
                _ => format!("job {key}: run {} {}: {}", run.run, run.result, run.reason),
            });
            if run.result == "SKIPPED" {
                bail!("run {} of {key} was skipped: {}", run.run, run.reason);
            }
        }
    }
    Ok(())
}

fn parse_task_id(id: &str) -> anyhow::Result<capstan_model::TaskId> {
    id.parse().map_err(|e: String| anyhow::anyhow!(e))
}

async fn cmd_task(cmd: TaskCmd, c: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(&c.addr);
    match cmd {
        TaskCmd::List { job, state } => {
            let tasks = client.tasks(job.as_deref(), state.as_deref()).await?;
            c.output.print(&tasks, || output::task_table(&tasks));
        }
        TaskCmd::Status { id } => {
            let t = client.task(parse_task_id(&id)?).await?;
            c.output.print(&t, || output::task_detail(&t));
        }
        TaskCmd::Kill { id } => {
            let t = mutate(&client, client.kill_task(parse_task_id(&id)?)).await?;
            c.output.print(&t, || format!("task {}: {} ({})", t.id, t.state, t.reason));
        }
        TaskCmd::Logs { id, stderr, follow, tail } => {
            use futures::StreamExt;
            use std::io::Write;
            let resp = client.logs(parse_task_id(&id)?, stderr, follow, tail).await?;
            let mut body = resp.bytes_stream();
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.context("the log stream broke off")?;
                out.write_all(&chunk)?;
                out.flush()?;
            }
        }
    }
    Ok(())
}

async fn cmd_agent_list(c: &ClientArgs) -> anyhow::Result<()> {
    let agents = Client::new(&c.addr).agents().await?;
    c.output.print(&agents, || output::agent_table(&agents));
    Ok(())
}

/// Who presses the button: `$USER@hostname` (`$LOGNAME` or the uid's name when `$USER` is not set).
pub(crate) fn operator() -> String {
    let from_env = |name| std::env::var(name).ok().filter(|v: &String| !v.trim().is_empty());
    let user = from_env("USER").or_else(|| from_env("LOGNAME")).unwrap_or_else(|| {
        let uid = nix::unistd::getuid();
        nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(|| format!("uid{uid}"), |u| u.name)
    });
    let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn liveness_of(args: &[&str]) -> anyhow::Result<LivenessConfig> {
        let mut all = vec!["capstan", "master", "--data-dir", "/nonexistent"];
        all.extend(args);
        let cli = Cli::try_parse_from(all)?;
        let Cmd::Master(m) = cli.command else { panic!("parsed as another command") };
        m.liveness.config()
    }

    #[test]
    fn liveness_flags_default_to_the_masters_defaults() {
        assert_eq!(liveness_of(&[]).unwrap(), LivenessConfig::default());
        let cli = Cli::try_parse_from(["capstan", "dev"]).unwrap();
        let Cmd::Dev(d) = cli.command else { panic!("parsed as another command") };
        assert_eq!(d.liveness.config().unwrap(), LivenessConfig::default());
    }

    #[test]
    fn job_flags_default_to_the_masters_defaults() {
        let want = capstan_master::reaper::JobSettings::default();
        let cli = Cli::try_parse_from(["capstan", "master", "--data-dir", "/nonexistent"]).unwrap();
        let Cmd::Master(m) = cli.command else { panic!("parsed as another command") };
        let got = m.jobs.settings().unwrap();
        assert_eq!((got.batch_retention, got.cron_interval_min), (want.batch_retention, want.cron_interval_min));
        let cli = Cli::try_parse_from(["capstan", "dev", "--cron-interval-min", "500ms"]).unwrap();
        let Cmd::Dev(d) = cli.command else { panic!("parsed as another command") };
        let refused = d.jobs.settings().unwrap_err().to_string();
        assert!(refused.contains("--cron-interval-min 500ms: must be at least 1s"), "{refused}");
    }

    #[test]
    fn liveness_flags_map_onto_the_config() {
        let c = liveness_of(&[
            "--heartbeat-interval",
            "2s",
            "--agent-timeout",
            "1m",
            "--agent-removal-rate",
            "5/1m",
            "--breaker-threshold",
            "0.5",
            "--breaker-window",
            "2m",
            "--fault-domain",
            "zone",
            "--stray-grace",
            "10m",
        ])
        .unwrap();
        let want = LivenessConfig {
            heartbeat_interval: Duration::from_secs(2),
            agent_timeout: Duration::from_secs(60),
            removal_rate: RemovalRate { count: 5, per: Duration::from_secs(60) },
            breaker_threshold: 0.5,
            breaker_window: Duration::from_secs(120),
            fault_domain: "zone".into(),
            // Not given: the agent timeout.
            reregistration_period: Duration::from_secs(60),
            stray_grace: Duration::from_secs(600),
        };
        assert_eq!(c, want);
        let c = liveness_of(&["--agent-timeout", "1m", "--reregistration-period", "90s"]).unwrap();
        assert_eq!(c.reregistration_period, Duration::from_secs(90));
    }

    #[test]
    fn bad_liveness_flags_are_refused_naming_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--agent-removal-rate", "0/1s"], "--agent-removal-rate"),
            (&["--agent-removal-rate", "fast"], "--agent-removal-rate"),
            (&["--agent-timeout", "1s", "--heartbeat-interval", "5s"], "--agent-timeout"),
            (&["--heartbeat-interval", "0s"], "--heartbeat-interval"),
            (&["--breaker-threshold", "1.5"], "--breaker-threshold"),
            (&["--breaker-threshold", "0"], "--breaker-threshold"),
            (&["--fault-domain", " "], "--fault-domain"),
            (&["--stray-grace", "soon"], "--stray-grace"),
        ];
        for (args, flag) in cases {
            let e = liveness_of(args).expect_err(&format!("{args:?} must be refused"));
            assert!(e.to_string().contains(flag), "{args:?}: the message must name {flag}: {e}");
        }
    }
}
