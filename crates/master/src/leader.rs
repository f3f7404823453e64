//! Leadership: which master leads, and for how long.
//!
//! - **Solo** (the embedded store): the master that holds the store's file lock leads, from the
//!   start; only a request for a new term (a restore) or a failed write ends a term.
//! - **etcd**: every master campaigns in the election `{prefix}/election` with a lease of
//!   `--lease-ttl`; the winner's election key is the fence of its store writes (each write
//!   compares the key's create revision, so a master that lost the key writes nothing), and the
//!   others follow it. The lease is kept alive every quarter of its TTL; a leader that could not
//!   renew it for three quarters of the TTL steps down before etcd lets it expire, so two masters
//!   never both believe they lead for long, and the fence covers the rest.
//!
//! The election has its own key space (`{prefix}/election/…`), apart from the store's.

use capstan_store::{EtcdStore, Fence};
use etcd_client::{Client, ConnectOptions, ProclaimOptions, ResignOptions};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Leadership settings (`capstan master --lease-ttl …`).
#[derive(Clone, Debug)]
pub struct HaConfig {
    /// The URL other masters redirect to while this one leads (default `http://BIND`).
    pub advertise: Option<String>,
    /// The leader's etcd lease: a dead leader is replaced about this long after its last renewal.
    /// etcd's smallest lease is 2 s with its default timing; whole seconds.
    pub lease_ttl: Duration,
    /// How long one etcd call may take before it fails (and a store write's term ends).
    pub etcd_timeout: Duration,
}

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig { advertise: None, lease_ttl: DEFAULT_LEASE_TTL, etcd_timeout: DEFAULT_ETCD_TIMEOUT }
    }
}

pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(2);
pub const DEFAULT_ETCD_TIMEOUT: Duration = Duration::from_secs(5);

impl HaConfig {
    pub fn check(&self) -> Result<(), String> {
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl.subsec_nanos() != 0 {
            return Err(format!(
                "--lease-ttl {}: must be a whole number of seconds, at least 2s (etcd's smallest lease)",
                humantime::format_duration(self.lease_ttl)
            ));
        }
        if self.etcd_timeout < Duration::from_millis(100) {
            return Err(format!(
                "--etcd-timeout {}: must be at least 100ms",
                humantime::format_duration(self.etcd_timeout)
            ));
        }
        if let Some(a) = &self.advertise {
            if !(a.starts_with("http://") || a.starts_with("https://")) {
                return Err(format!("--advertise {a}: must be a URL such as http://10.0.0.5:7070"));
            }
        }
        Ok(())
    }
}

/// What the election key holds: where the leader answers. JSON with a format version.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaderValue {
    pub format: u32,
    pub url: String,
    /// The term's epoch, once the leader has begun its term (0 while it loads the state).
    #[serde(default)]
    pub epoch: u64,
}

pub const LEADER_VALUE_FORMAT: u32 = 1;

impl LeaderValue {
    fn decode(bytes: &[u8]) -> Option<LeaderValue> {
        let v: LeaderValue = serde_json::from_slice(bytes).ok()?;
        // A newer format may mean something else by the same fields: do not follow it blindly.
        (v.format <= LEADER_VALUE_FORMAT).then_some(v)
    }
}

/// A won election: the term may begin.
pub struct Won {
    /// Becomes true when the leadership is lost (or may be).
    pub lost: watch::Receiver<bool>,
    etcd: Option<EtcdWon>,
    /// Solo: the sender of `lost`, kept so that it never closes (a solo leadership is not lost).
    _solo: Option<watch::Sender<bool>>,
}

struct EtcdWon {
    key: etcd_client::LeaderKey,
    keepalive: tokio::task::JoinHandle<()>,
}

impl Won {
    /// Waits until the leadership is lost.
    pub async fn until_lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }
}

/// The election of one master: solo or through etcd.
pub enum Election {
    Solo,
    Etcd(Box<EtcdElection>),
}

pub struct EtcdElection {
    client: Client,
    store: Arc<EtcdStore>,
    name: String,
    ttl: Duration,
    me: String,
}

/// Who leads, as a follower sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderInfo {
    pub url: String,
    pub epoch: u64,
}

impl Election {
    pub async fn etcd(store: Arc<EtcdStore>, config: &HaConfig, me: String) -> anyhow::Result<Election> {
        let c = store.config().clone();
        let options = ConnectOptions::new()
            .with_connect_timeout(c.dial_timeout)
            .with_timeout(c.request_timeout)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(&c.endpoints, Some(options))
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to etcd at {}: {e}", c.endpoints.join(",")))?;
        let name = format!("{}/election", c.prefix.trim_end_matches('/'));
        Ok(Election::Etcd(Box::new(EtcdElection { client, store, name, ttl: config.lease_ttl, me })))
    }

    /// Waits until this master leads. `follow` is told who leads meanwhile (etcd).
    pub async fn campaign(&self, follow: &(dyn Fn(Option<LeaderInfo>) + Send + Sync)) -> Won {
        match self {
            Election::Solo => {
                let (never, lost) = watch::channel(false);
                Won { lost, etcd: None, _solo: Some(never) }
            }
            Election::Etcd(e) => e.campaign(follow).await,
        }
    }

    /// Tells the others this leader's epoch (etcd), once its term began.
    pub async fn proclaim(&self, won: &Won, epoch: u64) {
        if let (Election::Etcd(e), Some(w)) = (self, &won.etcd) {
            let value = LeaderValue { format: LEADER_VALUE_FORMAT, url: e.me.clone(), epoch };
            let mut client = e.client.clone();
            let options = ProclaimOptions::new().with_leader(w.key.clone());
            let body = serde_json::to_vec(&value).expect("plain struct");
            if let Err(err) = client.proclaim(body, Some(options)).await {
                tracing::warn!("cannot publish this leader's epoch in etcd: {err}");
            }
        }
    }

    /// Gives up a leadership (best effort: if etcd cannot be reached, the lease runs out).
    pub async fn resign(&self, won: Won) {
        if let (Election::Etcd(e), Some(w)) = (self, won.etcd) {
            w.keepalive.abort();
            let mut client = e.client.clone();
            let lease = w.key.lease();
            let resigned =
                tokio::time::timeout(e.ttl, client.resign(Some(ResignOptions::new().with_leader(w.key)))).await;
            if !matches!(resigned, Ok(Ok(_))) {
                tracing::warn!("could not resign in etcd; the lease runs out within {:?}", e.ttl);
            }
            let _ = tokio::time::timeout(e.ttl, client.lease_revoke(lease)).await;
        }
    }

    /// Sets the store's fence to this leadership (etcd).
    pub fn fence(&self, won: &Won) {
        if let (Election::Etcd(e), Some(w)) = (self, &won.etcd) {
            e.store.set_fence(Some(Fence { key: w.key.key().to_vec(), create_revision: w.key.rev() }));
        }
    }
}

impl EtcdElection {
    async fn campaign(&self, follow: &(dyn Fn(Option<LeaderInfo>) + Send + Sync)) -> Won {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.try_campaign(follow).await {
                Ok(won) => return won,
                Err(e) => {
                    tracing::warn!("campaign for leadership failed: {e}; trying again in {backoff:?}");
                    follow(None);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn try_campaign(&self, follow: &(dyn Fn(Option<LeaderInfo>) + Send + Sync)) -> anyhow::Result<Won> {
        let mut client = self.client.clone();
        let lease = client.lease_grant(self.ttl.as_secs() as i64, None).await?.id();
        let (keeper, stream) = client.lease_keep_alive(lease).await?;
        let (lost_tx, mut lost) = watch::channel(false);
        let keepalive = tokio::spawn(keep_alive(self.client.clone(), lease, keeper, stream, self.ttl, lost_tx));
        let value = serde_json::to_vec(&LeaderValue { format: LEADER_VALUE_FORMAT, url: self.me.clone(), epoch: 0 })
            .expect("plain struct");
        let mut campaign_client = self.client.clone();
        let campaign = campaign_client.campaign(self.name.clone(), value, lease);
        tokio::pin!(campaign);
        let mut watch_leader = tokio::time::interval(Duration::from_millis(250));
        let result = loop {
            let leader_check = tokio::select! {
                r = &mut campaign => break r.map_err(anyhow::Error::from),
                r = lost.wait_for(|l| *l) => {
                    let _ = r.map(|_| ());
                    break Err(anyhow::anyhow!("the lease ran out while campaigning"));
                }
                _ = watch_leader.tick() => true,
            };
            if leader_check {
                follow(self.current_leader().await);
            }
        };
        let won = match result {
            Ok(mut r) => r.take_leader().ok_or_else(|| anyhow::anyhow!("etcd answered the campaign without a key")),
            Err(e) => Err(e),
        };
        let key = match won {
            Ok(key) => key,
            Err(e) => {
                keepalive.abort();
                let _ = client.lease_revoke(lease).await;
                return Err(e);
            }
        };
        // The campaign can return after the lease ran out; make sure the key is ours and alive.
        let current = client.get(key.key(), None).await?;
        let alive = current.kvs().first().is_some_and(|kv| kv.create_revision() == key.rev() && kv.lease() == lease);
        if !alive || *lost.borrow() {
            keepalive.abort();
            anyhow::bail!("the election key vanished as the campaign ended");
        }
        tracing::info!(key = %String::from_utf8_lossy(key.key()), revision = key.rev(), "elected leader through etcd");
        Ok(Won { lost, etcd: Some(EtcdWon { key, keepalive }), _solo: None })
    }

    async fn current_leader(&self) -> Option<LeaderInfo> {
        let mut client = self.client.clone();
        let r = tokio::time::timeout(self.ttl, client.leader(self.name.clone())).await.ok()?.ok()?;
        let v = LeaderValue::decode(r.kv()?.value())?;
        (v.url != self.me).then_some(LeaderInfo { url: v.url, epoch: v.epoch })
    }
}

/// Renews the lease every quarter TTL; reports it lost when etcd says it expired, or when no
/// renewal succeeded for three quarters of the TTL (etcd may expire it any moment after that).
async fn keep_alive(
    mut client: Client,
    lease: i64,
    mut keeper: etcd_client::LeaseKeeper,
    mut stream: etcd_client::LeaseKeepAliveStream,
    ttl: Duration,
    lost: watch::Sender<bool>,
) {
    let every = ttl / 4;
    let deadline = ttl * 3 / 4;
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let sent = Instant::now();
        let renewed = tokio::time::timeout(every, async {
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        match renewed {
            Ok(Ok(Some(r))) if r.ttl() > 0 => last_ok = sent,
            Ok(Ok(Some(_))) => {
                tracing::warn!("the leadership lease expired in etcd");
                let _ = lost.send(true);
                return;
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                // The stream broke or stalled (etcd restarting, say): open a new one on the same
                // lease; the next round uses it.
                if let Ok(Ok((k, s))) = tokio::time::timeout(every, client.lease_keep_alive(lease)).await {
                    (keeper, stream) = (k, s);
                }
            }
        }
        if last_ok.elapsed() >= deadline {
            tracing::warn!("could not renew the leadership lease for {:?}; stepping down", last_ok.elapsed());
            let _ = lost.send(true);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_outside_what_etcd_can_do_are_refused_naming_the_flag() {
        let ok = HaConfig::default();
        assert_eq!(ok.check(), Ok(()));
        let bad = |c: HaConfig, flag: &str| {
            let e = c.check().unwrap_err();
            assert!(e.starts_with(flag), "{e}");
        };
        bad(HaConfig { lease_ttl: Duration::from_secs(1), ..HaConfig::default() }, "--lease-ttl 1s");
        bad(HaConfig { lease_ttl: Duration::from_millis(2500), ..HaConfig::default() }, "--lease-ttl 2s 500ms");
        bad(HaConfig { etcd_timeout: Duration::from_millis(10), ..HaConfig::default() }, "--etcd-timeout 10ms");
        bad(HaConfig { advertise: Some("m1:7070".into()), ..HaConfig::default() }, "--advertise m1:7070");
        let three = HaConfig { lease_ttl: Duration::from_secs(3), ..HaConfig::default() };
        assert_eq!(three.check(), Ok(()));
    }

    #[test]
    fn a_leader_value_of_a_newer_format_is_not_followed() {
        let v =
            |format: u32| serde_json::to_vec(&serde_json::json!({"format": format, "url": "http://m1:7070"})).unwrap();
        assert_eq!(LeaderValue::decode(&v(1)), Some(LeaderValue { format: 1, url: "http://m1:7070".into(), epoch: 0 }));
        assert_eq!(LeaderValue::decode(&v(2)), None);
        assert_eq!(LeaderValue::decode(b"not json"), None);
    }
}
