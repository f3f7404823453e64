//! Back-pressure of the real master: a storm of registrations is shed with 503 and `Retry-After`
//! instead of queueing without bound, and every agent that retries gets in.

use capstan_api::wire::{RegisterRequest, RegisterResponse};
use capstan_master::{start, MasterConfig};
use capstan_model::{AgentId, Capacity};
use capstan_state::AgentInfo;
use std::collections::BTreeMap;
use std::time::Duration;

fn info(id: u64) -> AgentInfo {
    AgentInfo {
        id: AgentId(id),
        hostname: format!("storm-{id}"),
        address: format!("http://10.9.{}.{}:5051", id / 256, id % 256),
        capacity: Capacity { cpus_milli: 1000, mem_bytes: 1 << 30, disk_bytes: 1 << 30, ports: vec![] },
        attributes: BTreeMap::new(),
        version: "test".into(),
    }
}

/// A master on a free port with the embedded store in a temporary directory (kept alive by the
/// returned guard).
async fn master() -> (tempfile::TempDir, capstan_master::MasterHandle) {
    let dir = tempfile::tempdir().unwrap();
    let master = start(MasterConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        store_url: None,
        allow_root_tasks: false,
        liveness: Default::default(),
        ha: Default::default(),
        backup: Default::default(),
        net: Default::default(),
    })
    .await
    .unwrap();
    (dir, master)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_storm_is_shed_with_retry_after_and_everyone_gets_in() {
    let (_dir, master) = master().await;
    let url = format!("{}/v1/agent/register", master.url());
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    const AGENTS: u64 = 1_500;
    let mut handles = vec![];
    for id in 1..=AGENTS {
        let (http, url) = (http.clone(), url.clone());
        handles.push(tokio::spawn(async move {
            let body = RegisterRequest { info: info(id), known_tasks: vec![], running_tasks: vec![] };
            let mut shed = 0u32;
            loop {
                let resp = http.post(&url).json(&body).timeout(Duration::from_secs(30)).send().await.unwrap();
                match resp.status().as_u16() {
                    200 => {
                        let r: RegisterResponse = resp.json().await.unwrap();
                        assert!(r.heartbeat_interval_ms > 0);
                        return shed;
                    }
                    503 => {
                        let after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(String::from);
                        let body: serde_json::Value = resp.json().await.unwrap();
                        assert_eq!(body["error"]["code"], "overloaded", "{body}");
                        let secs: u64 = after.expect("a shed answer says when to retry").parse().unwrap();
                        assert!((1..=60).contains(&secs));
                        shed += 1;
                        // Retry sooner than asked, only to keep the test short; spread like agents.
                        tokio::time::sleep(Duration::from_millis(50 + id % 200)).await;
                    }
                    other => panic!("unexpected status {other}: {}", resp.text().await.unwrap_or_default()),
                }
            }
        }));
    }
    let mut shed_total = 0;
    for h in handles {
        shed_total += h.await.unwrap();
    }
    let registered = master.core().state.read().agents.len() as u64;
    assert_eq!(registered, AGENTS, "every agent got in");
    assert!(
        shed_total > 0,
        "{AGENTS} registrations at once must exceed the {} admitted at a time",
        capstan_master::http::MAX_REGISTRATIONS
    );
    let metrics = master.core().metrics.render(&master.core().state.read());
    let line = metrics
        .lines()
        .find(|l| l.starts_with("capstan_requests_shed_total{route=\"registration\"}"))
        .expect("a shed counter");
    let counted: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(counted as u32, shed_total);
}

/// Large answers to slow readers: each holds its place until its body is sent, so readers that do
/// not read cannot make the master hold more than `MAX_LIST_ANSWERS` of them; the next is shed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_of_large_lists_are_bounded() {
    use std::io::Write;
    let (_dir, master) = master().await;
    // About 30,000 pending tasks: an answer of tens of MB, more than loopback sockets buffer.
    for i in 0..3 {
        let spec: capstan_model::JobSpec = capstan_model::parse_toml(
            &format!(
                "job = \"big/prod/j{i}\"\ninstances = 10000\n[task]\ncommand = \"sleep 1\"\nuser = \"nobody\"\ncpus = 64\nmem = \"1GiB\"\ndisk = \"1GiB\"\n"
            ),
            &capstan_model::ValidationPolicy { allow_root: false },
        )
        .unwrap();
        master.core().submit(capstan_state::Command::CreateJob { spec, seed: i }).await.unwrap();
    }
    // Readers that ask and never read.
    let addr = master.addr;
    let mut stalled = vec![];
    for _ in 0..capstan_master::http::MAX_LIST_ANSWERS {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET /v1/tasks HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        stalled.push(s);
    }
    let http = reqwest::Client::new();
    let url = format!("{}/v1/tasks?state=RUNNING", master.url());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let resp = http.get(&url).send().await.unwrap();
        if resp.status() == 503 {
            assert!(resp.headers().contains_key("retry-after"));
            let body: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], "overloaded", "{body}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the stalled readers never filled the list slots");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Long after every answer was computed, the places are still held by readers that do not read.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 503, "a place was given back while its reader had not read the answer");
    // The readers go away: their places are free again.
    drop(stalled);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let resp = http.get(&url).send().await.unwrap();
        if resp.status() == 200 {
            let tasks: Vec<serde_json::Value> = resp.json().await.unwrap();
            assert!(tasks.is_empty(), "no task runs here");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "list places were not given back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
