//! `capstan sim …`: simulated agents against a running master.

use crate::fleet::{Fleet, FleetConfig};
use clap::Subcommand;
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
}

pub async fn run(cmd: SimCmd) -> anyhow::Result<()> {
    match cmd {
        SimCmd::Agents { count, master, resources, attributes_spread } => {
            let capacity =
                FleetConfig::capacity_from(resources.as_deref()).map_err(|e| anyhow::anyhow!("--resources: {e}"))?;
            let (racks, pods) = FleetConfig::parse_spread(&attributes_spread)
                .map_err(|e| anyhow::anyhow!("--attributes-spread: {e}"))?;
            check_nofile(count)?;
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
    }
}

/// Raises the open-file limit to the hard limit and says so when it is too low for `agents`.
pub fn check_nofile(agents: usize) -> anyhow::Result<u64> {
    let limit = crate::os::raise_nofile_limit().map_err(|e| anyhow::anyhow!("cannot raise RLIMIT_NOFILE: {e}"))?;
    let needed = crate::os::nofile_needed(agents);
    if limit.soft < needed {
        eprintln!(
            "warning: the open-file limit is {} (hard limit {}), but {agents} simulated agents need about {needed}; \
             raise the hard limit (ulimit -Hn, /etc/security/limits.conf or LimitNOFILE=) or expect connection errors",
            limit.soft, limit.hard
        );
    }
    Ok(limit.soft)
}
