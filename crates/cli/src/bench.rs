//! `capstan bench …`: benchmarks that print their figures (they assert nothing).

use capstan_api::Client;
use capstan_model::TaskState;
use clap::Subcommand;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Submit → RUNNING latency of a one-task job, over COUNT submissions, one at a time.
    /// Without --addr it starts its own dev cluster in a temporary directory.
    Launch {
        #[arg(long, default_value_t = 100)]
        count: u32,
        /// A running cluster to measure instead of a private one.
        #[arg(long)]
        addr: Option<String>,
    },
    /// Placement throughput end to end: a master in its own process (embedded store), AGENTS
    /// simulated agents in this one over the real protocol, TASKS `sim:run` tasks submitted as
    /// fast as the API takes them, timed until the master counts them all RUNNING; compared with
    /// the time to merely write as many task records to the same store.
    Placement(capstan_sim::placement::PlacementArgs),
    /// Leader failover on etcd: its own etcd and MASTERS masters (child processes); kills the
    /// leader KILLS times and times how long until another leads and until a new job is placed.
    Failover(crate::bench_failover::FailoverArgs),
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Launch { count, addr } => launch(count, addr).await,
        BenchCmd::Placement(args) => capstan_sim::placement::run(args).await,
        BenchCmd::Failover(args) => crate::bench_failover::run(args).await,
    }
}

/// A service job of `instances` tasks too small to matter (`exec sleep 3600`, 0.01 cpus, 16 MiB),
/// the benchmarks' unit of work.
pub(crate) fn tiny_service(key: &str, instances: u32) -> serde_json::Value {
    serde_json::json!({
        "job": key,
        "type": "service",
        "instances": instances,
        "task": {"command": "exec sleep 3600", "user": "nobody", "cpus": 0.01, "mem": "16MiB", "disk": "1MiB"}
    })
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn launch(count: u32, addr: Option<String>) -> anyhow::Result<()> {
    let mut _private = None;
    let url = match addr {
        Some(a) => a,
        None => {
            let dir = tempfile::tempdir()?;
            // Tasks run as nobody and must reach their sandboxes under this directory.
            std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            let dev = crate::start_dev(
                dir.path(),
                "127.0.0.1:0".parse()?,
                false,
                Default::default(),
                Default::default(),
                |c| {
                    c.resources = Some("ports=40000-40999".into());
                    c.cgroup_root = format!("capstan-bench-{}", std::process::id());
                    Ok(())
                },
            )
            .await?;
            let url = dev.url();
            _private = Some((dir, dev));
            url
        }
    };
    let client = Client::new(&url);
    let run_id: u32 = rand::random::<u32>() % 100_000;
    let mut latencies_ms = Vec::with_capacity(count as usize);
    for i in 0..count {
        let key = format!("bench/latency/r{run_id}-{i}");
        let spec = tiny_service(&key, 1);
        let started = Instant::now();
        let created = client.create_job(&spec).await?;
        let id = created.tasks[0];
        loop {
            let t = client.task(id).await?;
            if t.state == TaskState::Running {
                break;
            }
            if t.state.is_terminal() {
                anyhow::bail!("benchmark task {id} ended: {}", t.reason);
            }
            if started.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("benchmark task {id} not RUNNING after 30 s: {} ({})", t.state, t.reason);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        latencies_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        client.kill_job(&key).await?;
    }
    latencies_ms.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let mean = latencies_ms.iter().sum::<f64>() / latencies_ms.len().max(1) as f64;
    println!("submit → RUNNING for a one-task job, {count} submissions against {url}");
    println!(
        "p50 {:.1} ms   p90 {:.1} ms   p99 {:.1} ms   max {:.1} ms   mean {:.1} ms",
        percentile(&latencies_ms, 50.0),
        percentile(&latencies_ms, 90.0),
        percentile(&latencies_ms, 99.0),
        latencies_ms.last().copied().unwrap_or(f64::NAN),
        mean
    );
    // Let the killed tasks go before the private cluster's directory is removed.
    if _private.is_some() {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let live = client.tasks(None, None).await?.iter().filter(|t| !t.state.is_terminal()).count();
            if live == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}
