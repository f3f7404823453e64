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
        jobs: Default::default(),
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

/// Large answers to slow readers: rendered, their render place given back before they are sent,
/// and held only against a budget of bytes; small answers never wait behind them. Readers that
/// do not read cannot make the master hold more than `ANSWER_BYTES_IN_FLIGHT_MAX` of answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_lists_never_wait_behind_slow_readers_of_large_ones() {
    use std::io::Write;
    let (_dir, master) = master().await;
    // About 30,000 pending tasks: an answer of tens of MB, more than loopback sockets buffer.
    for i in 0..3 {
        let spec: capstan_model::JobSpec = capstan_model::parse_toml(
            &format!(
                "job = \"big/prod/j{i}\"\ninstances = 10000\n[task]\ncommand = \"sleep 1\"\nuser = \"nobody\"\ncpus = 64\nmem = \"1GiB\"\ndisk = \"1GiB\"\n"
            ),
            &capstan_model::ValidationPolicy::default(),
        )
        .unwrap();
        master.core().submit(capstan_state::Command::CreateJob { spec, seed: i }).await.unwrap();
    }
    let one: capstan_model::JobSpec = capstan_model::parse_toml(
        "job = \"small/prod/one\"\ninstances = 1\n[task]\ncommand = \"sleep 1\"\nuser = \"nobody\"\ncpus = 64\nmem = \"1GiB\"\ndisk = \"1GiB\"\n",
        &capstan_model::ValidationPolicy::default(),
    )
    .unwrap();
    master.core().submit(capstan_state::Command::CreateJob { spec: one, seed: 9 }).await.unwrap();
    let http = reqwest::Client::new();
    let small = format!("{}/v1/tasks?job=small/prod/one", master.url());
    let large = format!("{}/v1/tasks", master.url());
    // Twice as many readers that ask and never read as there are render places.
    let addr = master.addr;
    let mut stalled = vec![];
    for _ in 0..2 * capstan_master::http::MAX_LIST_ANSWERS {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET /v1/tasks HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        stalled.push(s);
    }
    // While they hold their answers, the small list is answered every time.
    for _ in 0..20 {
        let resp = http.get(&small).send().await.unwrap();
        assert_eq!(resp.status(), 200, "a one-task list waited behind {} stalled readers", stalled.len());
        let tasks: Vec<serde_json::Value> = resp.json().await.unwrap();
        assert_eq!(tasks.len(), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The readers go away: the budget is free again.
    drop(stalled);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let resp = http.get(format!("{large}?limit=2")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "a page is small");
        assert!(resp.headers().contains_key(capstan_api::wire::NEXT_HEADER));
        let resp = http.get(&large).send().await.unwrap();
        if resp.status() == 200 {
            let tasks: Vec<serde_json::Value> = resp.json().await.unwrap();
            assert_eq!(tasks.len(), 30_001);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the budget was not given back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A burst of status updates from many agents at once (a mass exit, a fleet re-registering)
/// waits its turn instead of being shed: with more batches in flight than the master applies at
/// once, every one is still answered 200 and acknowledged, and nothing is counted as shed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_status_updates_waits_its_turn_instead_of_being_shed() {
    use capstan_api::wire::{UpdatesRequest, UpdatesResponse};
    use capstan_model::TaskId;
    use capstan_state::{Report, StatusUpdate};
    let (_dir, master) = master().await;
    const AGENTS: u64 = 4 * capstan_master::http::MAX_UPDATE_BATCHES as u64;
    for id in 1..=AGENTS {
        master.core().submit(capstan_state::Command::RegisterAgent { info: info(id) }).await.unwrap();
    }
    let url = format!("{}/v1/agent/updates", master.url());
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(AGENTS as usize));
    let mut handles = vec![];
    for id in 1..=AGENTS {
        let (http, url, start) = (http.clone(), url.clone(), start.clone());
        handles.push(tokio::spawn(async move {
            // Updates about tasks the master does not know: each batch is still a command the
            // writer logs (the agent's sequence number moves), which is what takes a turn.
            let updates = (1..=50)
                .map(|seq| StatusUpdate {
                    seq,
                    task: TaskId(id << 16 | seq),
                    report: Report::Running { pid: 1 },
                    at: capstan_model::Timestamp(0),
                })
                .collect();
            let body = UpdatesRequest { agent: AgentId(id), updates };
            start.wait().await;
            let resp = http.post(&url).json(&body).timeout(Duration::from_secs(60)).send().await.unwrap();
            let status = resp.status();
            let text = resp.text().await.unwrap();
            assert_eq!(status, 200, "agent {id}: {text}");
            let ack: UpdatesResponse = serde_json::from_str(&text).unwrap();
            assert_eq!(ack.acked_seq, 50, "agent {id}");
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let metrics = master.core().metrics.render(&master.core().state.read());
    let shed = metrics.lines().find(|l| l.starts_with("capstan_requests_shed_total{route=\"status update\"}"));
    assert_eq!(shed, None, "no status update may be shed in a burst the line holds");
}

/// Pages: every task once, in order, through `limit` and `next`; the client reads them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_paged_and_the_client_follows_the_pages() {
    let (_dir, master) = master().await;
    for (i, n) in [(0u64, 7u32), (1, 5)] {
        let spec: capstan_model::JobSpec = capstan_model::parse_toml(
            &format!(
                "job = \"r/prod/j{i}\"\ninstances = {n}\n[task]\ncommand = \"sleep 1\"\nuser = \"nobody\"\ncpus = 64\nmem = \"1GiB\"\ndisk = \"1GiB\"\n"
            ),
            &capstan_model::ValidationPolicy::default(),
        )
        .unwrap();
        master.core().submit(capstan_state::Command::CreateJob { spec, seed: i }).await.unwrap();
    }
    let http = reqwest::Client::new();
    let whole: Vec<serde_json::Value> =
        http.get(format!("{}/v1/tasks", master.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(whole.len(), 12);
    let mut paged = vec![];
    let mut next: Option<String> = None;
    for _ in 0..10 {
        let q = next.as_ref().map(|n| format!("&next={n}")).unwrap_or_default();
        let resp = http.get(format!("{}/v1/tasks?limit=5{q}", master.url())).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        next = resp.headers().get(capstan_api::wire::NEXT_HEADER).map(|v| v.to_str().unwrap().to_string());
        let page: Vec<serde_json::Value> = resp.json().await.unwrap();
        assert!(page.len() <= 5);
        paged.extend(page);
        if next.is_none() {
            break;
        }
    }
    assert_eq!(paged, whole, "the pages are the whole list, in the same order");
    let resp = http.get(format!("{}/v1/tasks?next=nonsense", master.url())).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let resp = http.get(format!("{}/v1/jobs?limit=1", master.url())).send().await.unwrap();
    assert!(resp.headers().contains_key(capstan_api::wire::NEXT_HEADER));
    let client = capstan_api::Client::new(&master.url());
    assert_eq!(client.tasks(None, None).await.unwrap().len(), 12);
    assert_eq!(client.jobs().await.unwrap().len(), 2);
}
