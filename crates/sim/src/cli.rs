//! `capstan sim …`: simulated agents against a running master, and scenarios that start their
//! own master (`capstan sim scenario master-pause`).

use crate::fleet::{Fleet, FleetConfig};
use crate::scenario::{self, MasterPauseConfig};
use anyhow::Context as _;
use clap::Subcommand;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum SimCmd {
    /// COUNT simulated agents in this process, registered with a real master and following its
    /// orders with a fake executor: `sim:run` (and any other command) runs until stopped,
    /// `sim:finish:MS` exits 0 after MS, `sim:fail:MS:CODE` exits CODE after MS.
    Agents {
        #[arg(long)]
        count: usize,
        /// The master, `http://host:port`.
        #[arg(long)]
        master: String,
        /// What each agent offers, over `cpus=8,mem=32GiB,disk=100GiB,ports=31000-32000`.
        #[arg(long)]
        resources: Option<String>,
        /// How many racks and pods the agents are spread over (`rack=r<i % R>`, `pod=p<i % P>`).
        #[arg(long, default_value = "rack=10,pod=4")]
        attributes_spread: String,
    },
    /// Scenarios that start a real master (a child process), run simulated agents against it,
    /// break something and report what the master did.
    Scenario {
        #[command(subcommand)]
        cmd: ScenarioCmd,
    },
}

#[derive(Subcommand)]
pub enum ScenarioCmd {
    /// The seeds' worst day: a master with AGENTS simulated agents and TASKS running service tasks
    /// is stopped (SIGSTOP) for PAUSE, past every liveness timeout, then resumed. Prints tasks
    /// killed and replaced, agent removals and their times, whether the breaker tripped, peak
    /// status updates/s, peak master memory and the time to converge; exits non-zero if a task
    /// was killed or the cluster did not converge in time.
    MasterPause(MasterPauseArgs),
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Json,
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("\"{text}\" is not a duration ({e}); write e.g. 8s, 2m"))
}

#[derive(clap::Args, Clone, Debug)]
pub struct MasterPauseArgs {
    /// Simulated agents.
    #[arg(long, default_value_t = 200)]
    pub agents: usize,
    /// Long-running service tasks, over one job per 10,000.
    #[arg(long, default_value_t = 2_000)]
    pub tasks: u64,
    /// How long the master stays stopped.
    #[arg(long, value_parser = duration, default_value = "30s")]
    pub pause: Duration,
    /// The `capstan` binary that runs the master (default: this one).
    #[arg(long)]
    pub master_bin: Option<PathBuf>,
    /// The master's `--heartbeat-interval`.
    #[arg(long, value_parser = duration, default_value = "1s")]
    pub heartbeat_interval: Duration,
    /// The master's `--agent-timeout`.
    #[arg(long, value_parser = duration, default_value = "5s")]
    pub agent_timeout: Duration,
    /// The master's `--agent-removal-rate`.
    #[arg(long, default_value = "1/10s")]
    pub agent_removal_rate: String,
    /// The jobs' `replace_after` (default: halfway between the agent timeout and the end of the
    /// pause, so that without safeguards every task would be replaced).
    #[arg(long, value_parser = duration)]
    pub replace_after: Option<Duration>,
    /// One more flag for `capstan master`, as one word each: `--master-arg=--breaker-threshold
    /// --master-arg=0.5`.
    #[arg(long = "master-arg", allow_hyphen_values = true)]
    pub master_args: Vec<String>,
    /// Give up (and fail) when the cluster has not converged this long after the resume.
    #[arg(long, value_parser = duration, default_value = "120s")]
    pub converge_timeout: Duration,
    /// Give up when the agents have not registered and every task is not RUNNING within this.
    #[arg(long, value_parser = duration, default_value = "600s")]
    pub setup_timeout: Duration,
    /// After convergence, keep watching this long (a late kill still fails the run).
    #[arg(long, value_parser = duration, default_value = "2s")]
    pub settle: Duration,
    /// What each agent offers, over `cpus=8,mem=32GiB,disk=100GiB,ports=31000-32000`.
    #[arg(long)]
    pub resources: Option<String>,
    /// Racks and pods the agents are spread over.
    #[arg(long, default_value = "rack=10,pod=4")]
    pub attributes_spread: String,
    /// Where the master's temporary directory goes.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the master's directory (store and log) and print where it is.
    #[arg(long)]
    pub keep_dir: bool,
    /// `table` for people, `json` (the whole report) for scripts.
    #[arg(long, value_enum, default_value = "table")]
    pub output: OutputFormat,
}

impl MasterPauseArgs {
    pub fn config(&self) -> anyhow::Result<MasterPauseConfig> {
        let master_bin = match &self.master_bin {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("cannot find the capstan binary to start a master")?,
        };
        let mut c = MasterPauseConfig::new(master_bin, self.agents, self.tasks, self.pause);
        c.heartbeat_interval = self.heartbeat_interval;
        c.agent_timeout = self.agent_timeout;
        scenario::parse_rate(&self.agent_removal_rate).map_err(|e| anyhow::anyhow!("--agent-removal-rate: {e}"))?;
        c.removal_rate = self.agent_removal_rate.clone();
        c.replace_after =
            self.replace_after.unwrap_or_else(|| scenario::default_replace_after(self.pause, self.agent_timeout));
        c.master_args = self.master_args.clone();
        c.converge_timeout = self.converge_timeout;
        c.setup_timeout = self.setup_timeout;
        c.settle = self.settle;
        c.capacity =
            FleetConfig::capacity_from(self.resources.as_deref()).map_err(|e| anyhow::anyhow!("--resources: {e}"))?;
        (c.racks, c.pods) = FleetConfig::parse_spread(&self.attributes_spread)
            .map_err(|e| anyhow::anyhow!("--attributes-spread: {e}"))?;
        c.dir = self.dir.clone();
        c.keep_dir = self.keep_dir;
        c.progress = true;
        Ok(c)
    }
}

pub async fn run(cmd: SimCmd) -> anyhow::Result<()> {
    match cmd {
        SimCmd::Agents { count, master, resources, attributes_spread } => {
            let capacity =
                FleetConfig::capacity_from(resources.as_deref()).map_err(|e| anyhow::anyhow!("--resources: {e}"))?;
            let (racks, pods) = FleetConfig::parse_spread(&attributes_spread)
                .map_err(|e| anyhow::anyhow!("--attributes-spread: {e}"))?;
            crate::os::check_nofile(count)?;
            let master = if master.contains("://") { master } else { format!("http://{master}") };
            let fleet = Fleet::start(FleetConfig { master: master.clone(), count, capacity, racks, pods });
            eprintln!("{count} simulated agents starting against {master}; Ctrl-C stops them");
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = tick.tick() => {
                        let s = fleet.stats();
                        eprintln!(
                            "{:>6.0} s  registered {}/{count}  running {}  orders {}  update posts {} ({} updates, {} acked, {} errors)  poll errors {}",
                            started.elapsed().as_secs_f64(), s.registered, s.running, s.orders_received,
                            s.update_posts, s.updates_sent, s.updates_acked, s.update_errors, s.poll_errors
                        );
                    }
                }
            }
            drop(fleet);
            Ok(())
        }
        SimCmd::Scenario { cmd: ScenarioCmd::MasterPause(args) } => {
            let config = args.config()?;
            let report = tokio::select! {
                r = scenario::master_pause(config) => r?,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; the master was stopped"),
            };
            match args.output {
                OutputFormat::Table => print!("{}", scenario::render_table(&report)),
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            let failures = report.failures();
            anyhow::ensure!(failures.is_empty(), "master-pause failed: {}", failures.join("; "));
            Ok(())
        }
    }
}
