//! The Capstan master: serves the HTTP API, and while it leads (always, on the embedded store;
//! when elected, on etcd) runs a *term*: the state loaded from the store, the writer, the
//! scheduler and the other loops. `start` returns once it serves (and, on the embedded store,
//! leads).

pub mod backup;
pub mod core;
pub mod cron;
pub mod drain;
pub mod drain_http;
pub mod events;
pub mod front;
pub mod http;
pub mod leader;
pub mod liveness;
pub mod metrics;
pub mod reaper;
pub mod scheduler;
pub mod standby;
pub mod updater;

use anyhow::Context as _;
use capstan_model::ValidationPolicy;
use capstan_store::{EmbeddedStore, EtcdConfig, EtcdStore, Store};
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
    /// Leadership (several masters on etcd).
    pub ha: leader::HaConfig,
    /// Periodic backups (off without a directory).
    pub backup: backup::BackupSchedule,
    /// Batch job retention, cron interval minimum.
    pub jobs: reaper::JobSettings,
    /// The HTTP server's connection caps and timeouts.
    pub net: capstan_api::serve::ServeConfig,
}

impl MasterConfig {
    /// A master on `bind` with the embedded store in `data_dir` and default settings.
    pub fn new(bind: SocketAddr, data_dir: PathBuf) -> MasterConfig {
        MasterConfig {
            bind,
            data_dir,
            store_url: None,
            allow_root_tasks: false,
            liveness: Default::default(),
            ha: Default::default(),
            backup: Default::default(),
            jobs: Default::default(),
            net: Default::default(),
        }
    }
}

pub struct MasterHandle {
    pub addr: SocketAddr,
    pub front: Arc<front::Front>,
    pub server: tokio::task::JoinHandle<()>,
    /// The leadership loop: campaigns, runs terms, steps down.
    pub leadership: tokio::task::JoinHandle<()>,
    pub events: Arc<events::Events>,
}

impl MasterHandle {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The core of the term this master leads. Panics when it does not lead (tests of one
    /// master on the embedded store, which always leads).
    pub fn core(&self) -> Arc<core::Core> {
        self.front.core().expect("this master does not lead")
    }

    /// Stops serving and leading at once (as a crash would, minus the process exit).
    pub fn stop(&self) {
        self.server.abort();
        self.leadership.abort();
        if let Some(core) = self.front.core() {
            core.close("the master stops");
        }
    }
}

/// The store, and the etcd handle when it is etcd (for the leadership's fence).
pub struct OpenedStore {
    pub store: Arc<dyn Store>,
    pub etcd: Option<Arc<EtcdStore>>,
}

pub fn open_store(config: &MasterConfig) -> anyhow::Result<OpenedStore> {
    match config.store_url.as_deref() {
        None | Some("embedded") => {
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("cannot create the data directory {}", config.data_dir.display()))?;
            Ok(OpenedStore { store: Arc::new(EmbeddedStore::open(&config.data_dir)?), etcd: None })
        }
        Some(url) if url.starts_with("etcd://") => {
            let mut etcd_config = EtcdConfig::from_url(url)?;
            etcd_config.request_timeout = config.ha.etcd_timeout;
            etcd_config.dial_timeout = etcd_config.dial_timeout.min(config.ha.etcd_timeout);
            let etcd = Arc::new(EtcdStore::connect(etcd_config)?);
            Ok(OpenedStore { store: etcd.clone(), etcd: Some(etcd) })
        }
        Some(url) => anyhow::bail!(
            "--store {url}: unknown store; use etcd://host:port[,host:port…] or leave it out for the embedded store"
        ),
    }
}

/// What lives as long as the process, across terms.
struct Shared {
    config: MasterConfig,
    front: Arc<front::Front>,
    store: Arc<dyn Store>,
    /// The same store when it is etcd (the standby copy follows its log).
    etcd: Option<Arc<EtcdStore>>,
    election: leader::Election,
    events: Arc<events::Events>,
    admission: Arc<http::Admission>,
    policy: Arc<ValidationPolicy>,
    http: reqwest::Client,
}

/// A running term: its core, its routes and the loops that act for the leader.
struct Term {
    core: Arc<core::Core>,
    routes: axum::Router,
    loops: Vec<tokio::task::JoinHandle<()>>,
}

pub async fn start(config: MasterConfig) -> anyhow::Result<MasterHandle> {
    config.liveness.check().map_err(|e| anyhow::anyhow!(e))?;
    config.ha.check().map_err(|e| anyhow::anyhow!(e))?;
    config.backup.check().map_err(|e| anyhow::anyhow!(e))?;
    config.net.check().map_err(|e| anyhow::anyhow!(e))?;
    let opened = open_store(&config)?;
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("cannot listen on {}", config.bind))?;
    let addr = listener.local_addr()?;
    let me = config.ha.advertise.clone().unwrap_or_else(|| advertised(addr));
    let election = match &opened.etcd {
        None => leader::Election::Solo,
        Some(etcd) => leader::Election::etcd(etcd.clone(), &config.ha, me.clone()).await?,
    };
    let metrics = Arc::new(metrics::Metrics::new());
    let front = Arc::new(front::Front::new(me, opened.store.describe(), metrics));
    let events = Arc::new(events::Events::default());
    let router = front::router(front.clone());
    let server = tokio::spawn(capstan_api::serve::serve(listener, router, config.net.clone()));
    let solo = opened.etcd.is_none();
    let shared = Arc::new(Shared {
        policy: Arc::new(ValidationPolicy {
            allow_root: config.allow_root_tasks,
            cron_interval_min_ms: config.jobs.cron_interval_min.as_millis() as u64,
        }),
        config,
        front: front.clone(),
        store: opened.store,
        etcd: opened.etcd,
        election,
        events: events.clone(),
        admission: Default::default(),
        // The log proxy's client: it follows no redirect (an agent could point it anywhere).
        http: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?,
    });
    // On the embedded store this master leads at once: wait for its first term, so that a
    // caller (capstan dev, tests) finds a working master.
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let leadership = tokio::spawn(lead(shared, first_tx));
    if solo {
        match first_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                server.abort();
                leadership.abort();
                return Err(e);
            }
            Err(_) => anyhow::bail!("the master stopped before it began to lead"),
        }
    }
    tracing::info!("master serving on http://{addr}");
    Ok(MasterHandle { addr, front, server, leadership, events })
}

/// `http://ADDR`, with this host's name for an address that listens everywhere.
fn advertised(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        format!("http://{host}:{}", addr.port())
    } else {
        format!("http://{addr}")
    }
}

/// The leadership loop: campaign, run a term until it is lost or ends, step down, again.
async fn lead(shared: Arc<Shared>, first: tokio::sync::oneshot::Sender<anyhow::Result<()>>) {
    let mut first = Some(first);
    let mut backoff = std::time::Duration::from_millis(200);
    loop {
        let follow_front = shared.front.clone();
        let follow = move |leader: Option<leader::LeaderInfo>| {
            if !matches!(follow_front.role(), front::Role::Leading { .. }) {
                follow_front.set(front::Role::Following { leader });
            }
        };
        // While following, keep a warm copy of the state (etcd).
        let standby =
            shared.etcd.as_ref().map(|e| standby::Standby::start(e.clone(), shared.front.standby_index.clone()));
        let mut won = shared.election.campaign(&follow).await;
        shared.front.set(front::Role::Starting);
        shared.election.fence(&won);
        let term = match begin_term(&shared, standby).await {
            Ok(term) => term,
            Err(e) => {
                tracing::error!("cannot begin a term: {e:#}");
                shared.front.set(front::Role::Following { leader: None });
                shared.election.resign(won).await;
                if let Some(first) = first.take() {
                    // The first term on the embedded store: the caller reports it and exits.
                    if matches!(shared.election, leader::Election::Solo) {
                        let _ = first.send(Err(e));
                        return;
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                continue;
            }
        };
        backoff = std::time::Duration::from_millis(200);
        shared.election.proclaim(&won, term.core.epoch).await;
        shared.front.set(front::Role::Leading { core: term.core.clone(), routes: term.routes.clone() });
        if let Some(first) = first.take() {
            let _ = first.send(Ok(()));
        }
        let reason = tokio::select! {
            _ = won.until_lost() => "the leadership was lost".to_string(),
            _ = term_over(&term.core) => term.core.end_reason().unwrap_or_else(|| "the term ended".into()),
        };
        tracing::warn!(epoch = term.core.epoch, "stepping down: {reason}");
        shared.front.set(front::Role::Following { leader: None });
        end_term(term, &reason);
        shared.election.resign(won).await;
    }
}

async fn term_over(core: &core::Core) {
    loop {
        let notified = core.term_over.notified();
        if core.is_closed() {
            return;
        }
        notified.await;
    }
}

/// Loads the state, begins the term in the log (`BeginTerm`, the first write of every term,
/// fenced on etcd), and starts the leader's loops.
async fn begin_term(shared: &Arc<Shared>, standby: Option<standby::Standby>) -> anyhow::Result<Term> {
    let store = shared.store.clone();
    let etcd = shared.etcd.clone();
    let state = tokio::task::spawn_blocking(move || match (standby, etcd) {
        (Some(standby), Some(etcd)) => standby.take_caught_up(&etcd),
        _ => core::load_state(store.as_ref()),
    })
    .await??;
    let epoch = core::Core::next_epoch(&state);
    let solo = matches!(shared.election, leader::Election::Solo);
    let core = core::Core::start(shared.store.clone(), shared.front.metrics.clone(), state, epoch, solo);
    if let Err(e) = core.submit(capstan_state::Command::BeginTerm { epoch }).await {
        core.close("the term could not begin");
        anyhow::bail!("the term's first write failed: {e}");
    }
    core.metrics.terms.inc();
    tracing::info!(epoch, "leading: term began");
    shared.events.add("term_began", format!("{} leads with epoch {epoch}", shared.front.me));
    // A new `Liveness`: agents get their re-registration period from now.
    let liveness = Arc::new(liveness::Liveness::new(shared.config.liveness.clone()));
    let unplaced = scheduler::Unplaced::default();
    let app = http::AppState {
        core: core.clone(),
        unplaced: unplaced.clone(),
        policy: shared.policy.clone(),
        http: shared.http.clone(),
        usage: Default::default(),
        liveness: liveness.clone(),
        events: shared.events.clone(),
        admission: shared.admission.clone(),
        data_dir: shared.config.data_dir.clone(),
    };
    let events = shared.events.clone();
    let loops = vec![
        tokio::spawn(scheduler::run(core.clone(), unplaced)),
        tokio::spawn(liveness::run(core.clone(), liveness, events.clone())),
        tokio::spawn(cron::run(core.clone(), events.clone())),
        tokio::spawn(drain::run(core.clone(), events.clone())),
        tokio::spawn(updater::run(core.clone(), events)),
        tokio::spawn(reaper::run(core.clone(), shared.config.jobs.clone())),
        // Only the leader backs up: the loop lives as long as the term.
        tokio::spawn(backup::run(core.clone(), shared.config.backup.clone(), Arc::new(|| true))),
    ];
    Ok(Term { core, routes: http::router(app), loops })
}

fn end_term(term: Term, reason: &str) {
    term.core.close(reason);
    drop(term); // aborts its loops
}

impl Drop for Term {
    // However a term ends (stepping down, or the leadership loop itself aborted), its loops end
    // with it: nothing of a past term may act.
    fn drop(&mut self) {
        for l in &self.loops {
            l.abort();
        }
    }
}
