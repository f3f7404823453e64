//! The Capstan master: loads the state from the store, runs the writer, the scheduler and the
//! HTTP API. `start` returns once it serves.

pub mod backup;
pub mod core;
pub mod cron;
pub mod drain;
pub mod drain_http;
pub mod events;
pub mod http;
pub mod liveness;
pub mod metrics;
pub mod scheduler;
pub mod updater;

use anyhow::Context as _;
use capstan_model::ValidationPolicy;
use capstan_store::{EmbeddedStore, Store};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct MasterConfig {
    pub bind: SocketAddr,
    pub data_dir: PathBuf,
    /// `None`: the embedded store in `data_dir`.
    pub store_url: Option<String>,
    /// Tasks may run as root.
    pub allow_root_tasks: bool,
    pub liveness: liveness::LivenessConfig,
    /// Periodic backups (off without a directory).
    pub backup: backup::BackupSchedule,
}

pub struct MasterHandle {
    pub addr: SocketAddr,
    pub core: Arc<core::Core>,
    pub server: tokio::task::JoinHandle<()>,
    pub scheduler: tokio::task::JoinHandle<()>,
    pub liveness: tokio::task::JoinHandle<()>,
    /// The cron loop (`cron.rs`).
    pub cron: tokio::task::JoinHandle<()>,
    pub drain: tokio::task::JoinHandle<()>,
    /// The loop that drives rolling updates.
    pub updater: tokio::task::JoinHandle<()>,
    pub events: Arc<events::Events>,
    /// The periodic backups loop (ends at once when they are off).
    pub backups: tokio::task::JoinHandle<()>,
}

impl MasterHandle {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

pub fn open_store(config: &MasterConfig) -> anyhow::Result<Arc<dyn Store>> {
    match config.store_url.as_deref() {
        None | Some("embedded") => {
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("cannot create the data directory {}", config.data_dir.display()))?;
            Ok(Arc::new(EmbeddedStore::open(&config.data_dir)?))
        }
        Some(url) if url.starts_with("etcd://") => {
            anyhow::bail!("--store {url}: the etcd store is not yet supported by this version of Capstan; leave --store out to use the embedded store")
        }
        Some(url) => anyhow::bail!(
            "--store {url}: unknown store; use etcd://host:port[,host:port…] or leave it out for the embedded store"
        ),
    }
}

pub async fn start(config: MasterConfig) -> anyhow::Result<MasterHandle> {
    let store = open_store(&config)?;
    let metrics = Arc::new(metrics::Metrics::new());
    let core = core::Core::start(store, metrics)?;
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("cannot listen on {}", config.bind))?;
    let addr = listener.local_addr()?;
    config.liveness.check().map_err(|e| anyhow::anyhow!(e))?;
    config.backup.check().map_err(|e| anyhow::anyhow!(e))?;
    let liveness = Arc::new(liveness::Liveness::new(config.liveness.clone()));
    let events = Arc::new(events::Events::default());
    let unplaced = scheduler::Unplaced::default();
    let app = http::AppState {
        core: core.clone(),
        unplaced: unplaced.clone(),
        policy: Arc::new(ValidationPolicy { allow_root: config.allow_root_tasks }),
        http: reqwest::Client::new(),
        usage: Default::default(),
        liveness: liveness.clone(),
        events: events.clone(),
        admission: Default::default(),
    };
    let router = http::router(app);
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("HTTP server stopped: {e}");
        }
    });
    let scheduler = tokio::spawn(scheduler::run(core.clone(), unplaced));
    let liveness_loop = tokio::spawn(liveness::run(core.clone(), liveness.clone(), events.clone()));
    let cron_loop = tokio::spawn(cron::run(core.clone(), events.clone()));
    let drain_loop = tokio::spawn(drain::run(core.clone(), events.clone()));
    let updater = tokio::spawn(updater::run(core.clone(), events.clone()));
    // Only the leader backs up; until leadership lands, this master is always the leader.
    let backups = tokio::spawn(backup::run(core.clone(), config.backup.clone(), Arc::new(|| true)));
    tracing::info!("master serving on http://{addr}");
    Ok(MasterHandle {
        addr,
        core,
        server,
        scheduler,
        liveness: liveness_loop,
        cron: cron_loop,
        drain: drain_loop,
        updater,
        events,
        backups,
    })
}
