//! The end of a term ends the long polls it holds: an agent waiting for its orders on a term that
//! ended is answered at once (503, no orders), so that it goes to the next leader instead of
//! waiting out its poll on a master that no longer leads.

use capstan_api::wire::RegisterRequest;
use capstan_master::{start, MasterConfig};
use capstan_model::{AgentId, Capacity};
use capstan_state::AgentInfo;
use std::collections::BTreeMap;
use std::time::Duration;

/// The agent's poll: 60 s, the longest a master holds one.
const POLL_WAIT_MS: u64 = 60_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_on_a_term_that_ends_is_answered_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let master = start(MasterConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())).await.unwrap();
    let http = reqwest::Client::new();
    let info = AgentInfo {
        id: AgentId(7),
        hostname: "poller".into(),
        address: "http://127.0.0.1:7071".into(),
        capacity: Capacity { cpus_milli: 1000, mem_bytes: 1 << 30, disk_bytes: 1 << 30, ports: vec![] },
        attributes: BTreeMap::new(),
        version: "test".into(),
    };
    let body = RegisterRequest { info, known_tasks: vec![], running_tasks: vec![] };
    let resp = http.post(format!("{}/v1/agent/register", master.url())).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let orders: serde_json::Value = http
        .get(format!("{}/v1/agent/{}/orders", master.url(), AgentId(7)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (epoch, version) = (orders["master_epoch"].as_u64().unwrap(), orders["version"].as_u64().unwrap());

    // A poll with nothing new: it waits on this term.
    let url = format!(
        "{}/v1/agent/{}/orders?epoch={epoch}&version={version}&wait_ms={POLL_WAIT_MS}",
        master.url(),
        AgentId(7)
    );
    let poll = tokio::spawn({
        let http = http.clone();
        async move {
            let resp = http.get(url).send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    });
    // Not a wait for correctness: it gives the poll time to reach the master and be held there,
    // so that the term ends under a waiting poll, the case at hand.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!poll.is_finished(), "nothing changed for the agent: its poll is held while the term lasts");
    let core = master.core();
    core.request_new_term("the test ends the term");
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), poll)
        .await
        .expect("the poll on the ended term is answered long before its 60 s wait")
        .unwrap();
    assert_eq!(status, 503, "no orders from a term that ended: {body}");
    assert!(body.contains("no_leader"), "{body}");
}
