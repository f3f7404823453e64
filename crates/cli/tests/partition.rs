//! End-to-end tests of agents cut off from the master, with real processes: one agent runs in a
//! network namespace of its own (joined to the host by a veth pair) and is cut off by taking the
//! link down; another runs on the host. And a master restarted while its agents run on.

mod common;

use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

/// A network namespace joined to the host by a veth pair: host side `10.X.Y.1/30`, namespace side
/// `10.X.Y.2/30`. Removed on drop.
struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    fn create() -> Result<Netns, String> {
        let tag: u32 = rand::random::<u32>() & 0xffff;
        let n = Netns {
            name: format!("capstan-t{tag:04x}"),
            host_if: format!("cst{tag:04x}h"),
            ns_if: format!("cst{tag:04x}n"),
            host_ip: format!("10.{}.{}.1", 100 + (tag >> 8) % 100, (tag & 0xff) & 0xfc),
            ns_ip: format!("10.{}.{}.2", 100 + (tag >> 8) % 100, (tag & 0xff) & 0xfc),
        };
        ip(&["netns", "add", &n.name])?;
        ip(&["link", "add", &n.host_if, "type", "veth", "peer", "name", &n.ns_if])?;
        ip(&["link", "set", &n.ns_if, "netns", &n.name])?;
        ip(&["addr", "add", &format!("{}/30", n.host_ip), "dev", &n.host_if])?;
        ip(&["link", "set", &n.host_if, "up"])?;
        n.exec(&["addr", "add", &format!("{}/30", n.ns_ip), "dev", &n.ns_if])?;
        n.exec(&["link", "set", &n.ns_if, "up"])?;
        n.exec(&["link", "set", "lo", "up"])?;
        Ok(n)
    }

    fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Nothing passes between the namespace and the host.
    fn cut(&self) {
        self.exec(&["link", "set", &self.ns_if, "down"]).expect("link down in the namespace");
        ip(&["link", "set", &self.host_if, "down"]).expect("link down on the host");
    }

    fn heal(&self) {
        ip(&["link", "set", &self.host_if, "up"]).expect("link up on the host");
        self.exec(&["link", "set", &self.ns_if, "up"]).expect("link up in the namespace");
    }

    /// Runs a command in the namespace's network only: `ip netns exec` would also remount /sys
    /// (hiding the cgroup file systems the agent needs), `nsenter --net` does not.
    fn prefix(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--net=/run/netns/{}", self.name), "--".into()]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A network namespace, or a loud skip (a failure under CI) when this host cannot make one.
fn netns_or_skip(test: &str) -> Option<Netns> {
    if !privileged(test) {
        return None;
    }
    match Netns::create() {
        Ok(n) => Some(n),
        Err(e) => {
            if std::env::var("CAPSTAN_REQUIRE_PRIVILEGED_TESTS").as_deref() == Ok("1") {
                panic!("{test}: cannot make a network namespace ({e}), and CAPSTAN_REQUIRE_PRIVILEGED_TESTS=1 forbids skipping");
            }
            eprintln!("\n!!!!! SKIPPED {test}: cannot make a network namespace ({e}) !!!!!\n");
            None
        }
    }
}

/// Short liveness settings, so that a test sees minutes of production in seconds.
fn fast_liveness() -> Vec<String> {
    [
        "--heartbeat-interval",
        "300ms",
        "--agent-timeout",
        "2s",
        "--reregistration-period",
        "2s",
        "--agent-removal-rate",
        "1/1s",
        "--stray-grace",
        "10m",
    ]
    .map(String::from)
    .to_vec()
}

/// Processes (pids) of this job's tasks alive on this host, whichever agent runs them.
fn copies_running(job: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return vec![] };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == format!("CAPSTAN_JOB={job}").as_bytes()))
        })
        .collect();
    pids.sort();
    pids
}

fn agent_of(c: &Cluster, address_prefix: &str) -> Value {
    let agents = c.get("/v1/agents");
    agents
        .as_array()
        .and_then(|a| a.iter().find(|x| x["address"].as_str().is_some_and(|s| s.starts_with(address_prefix))))
        .cloned()
        .unwrap_or_else(|| panic!("no agent at {address_prefix}: {agents}"))
}

#[test]
fn an_agent_cut_off_past_the_timeout_has_its_task_replaced_and_after_healing_one_copy_runs() {
    let test = "an_agent_cut_off_past_the_timeout_has_its_task_replaced_and_after_healing_one_copy_runs";
    let Some(ns) = netns_or_skip(test) else { return };
    let mut c = Cluster::start_split_opts(SplitOptions {
        master_host: Some(ns.host_ip.clone()),
        master_flags: fast_liveness(),
        agent_flags: vec!["--bind".into(), format!("{}:0", ns.ns_ip), "--attributes".into(), "side=cut".into()],
        agent_prefix: ns.prefix(),
    });
    let job = "web/prod/cut";
    let mut spec = job_spec(job, "service", 1, "exec sleep 100000");
    spec["replace_after"] = json!("3s");
    let old = c.create_job(&spec).remove(0);
    let running = c.wait_task_state(&old, "RUNNING", SOON);
    let old_pid = running["pid"].as_u64().expect("a pid") as u32;
    assert_eq!(copies_running(job), vec![old_pid]);
    // A second agent, on the host, where the replacement can go.
    c.start_extra_agent("agent2", &["--attributes", "side=host"]);

    ns.cut();
    // Unreachable after the timeout, its task kept and still running there.
    let t = c.wait_task_state(&old, "UNREACHABLE", Duration::from_secs(20));
    assert!(t["reason"].as_str().unwrap_or("").contains("stopped answering"), "{t}");
    assert_eq!(agent_of(&c, &format!("http://{}", ns.ns_ip))["liveness"], "unreachable");
    assert!(pid_alive(old_pid), "cut off is not dead: the task runs on");
    // Past replace_after, at the removal rate: replaced on the other agent.
    let lost = c.wait_task_state(&old, "LOST", Duration::from_secs(20));
    assert!(lost["reason"].as_str().unwrap_or("").contains("replace_after"), "{lost}");
    let replacement = c.wait_replacement(job, 0, &old, SOON);
    let new_id = replacement["id"].as_str().unwrap().to_string();
    let new = c.wait_task_state(&new_id, "RUNNING", SOON);
    assert!(new["host"].is_string());
    assert_ne!(new["agent_id"], running["agent_id"]);
    assert_eq!(copies_running(job).len(), 2, "while cut off, both copies run: the old one cannot be told to stop");
    assert_eq!(c.metric("capstan_tasks_replaced_total"), Some(1.0));

    ns.heal();
    // The agent answers again; the running replacement stays, the returning copy is the surplus.
    wait_until(Duration::from_secs(20), "the cut-off agent is active again", || {
        let a = agent_of(&c, &format!("http://{}", ns.ns_ip));
        ensure(a["liveness"] == "active", a)
    });
    wait_until(Duration::from_secs(20), "exactly one copy runs", || {
        let pids = copies_running(job);
        ensure(pids.len() == 1 && !pids.contains(&old_pid), pids)
    });
    holds_for(Duration::from_secs(3), "one copy keeps running, the replacement", || {
        let pids = copies_running(job);
        let t = c.task(&new_id)?.ok_or("the replacement is gone")?;
        ensure(pids.len() == 1 && t["state"] == "RUNNING" && t["pid"].as_u64() == Some(u64::from(pids[0])), (pids, t))
    });
    let events = c.get("/v1/events?after=0");
    let kinds: Vec<&str> = events["events"].as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    for k in ["agent_unreachable", "agent_removed", "agent_back", "stray_task"] {
        assert!(kinds.contains(&k), "no {k} event in {kinds:?}");
    }
}

#[test]
fn a_singleton_on_a_cut_off_agent_is_never_replaced() {
    let test = "a_singleton_on_a_cut_off_agent_is_never_replaced";
    let Some(ns) = netns_or_skip(test) else { return };
    let mut c = Cluster::start_split_opts(SplitOptions {
        master_host: Some(ns.host_ip.clone()),
        master_flags: fast_liveness(),
        agent_flags: vec!["--bind".into(), format!("{}:0", ns.ns_ip)],
        agent_prefix: ns.prefix(),
    });
    let job = "db/prod/single";
    let mut spec = job_spec(job, "service", 1, "exec sleep 100000");
    spec["replace_after"] = json!("never");
    let old = c.create_job(&spec).remove(0);
    let pid = c.wait_task_state(&old, "RUNNING", SOON)["pid"].as_u64().unwrap() as u32;
    c.start_extra_agent("agent2", &[]);
    ns.cut();
    c.wait_task_state(&old, "UNREACHABLE", Duration::from_secs(20));
    holds_for(Duration::from_secs(5), "the singleton is not replaced", || {
        let tasks = c.tasks_of(job)?;
        ensure(tasks.len() == 1 && tasks[0]["state"] == "UNREACHABLE", tasks)
    });
    ns.heal();
    let t = c.wait_task_state(&old, "RUNNING", Duration::from_secs(20));
    assert_eq!(t["pid"].as_u64(), Some(u64::from(pid)));
    assert_eq!(copies_running(job), vec![pid]);
}

#[test]
fn a_master_restarted_while_agents_run_on_replaces_and_kills_nothing() {
    if !privileged("a_master_restarted_while_agents_run_on_replaces_and_kills_nothing") {
        return;
    }
    let mut c = Cluster::start_split_opts(SplitOptions { master_flags: fast_liveness(), ..Default::default() });
    let job = "web/prod/steady";
    let ids = c.create_job(&job_spec(job, "service", 3, "exec sleep 100000"));
    let before: Vec<(String, u64)> =
        ids.iter().map(|id| (id.clone(), c.wait_task_state(id, "RUNNING", SOON)["pid"].as_u64().unwrap())).collect();
    c.kill9_master();
    // Down for longer than the agent timeout: the agents' silence is the master's own.
    std::thread::sleep(Duration::from_secs(4));
    c.start_master();
    holds_for(Duration::from_secs(6), "the same tasks run, nothing replaced or killed", || {
        let tasks = c.tasks_of(job)?;
        let now: Vec<(String, u64)> = tasks
            .iter()
            .filter(|t| t["state"] == "RUNNING")
            .map(|t| (t["id"].as_str().unwrap_or("").to_string(), t["pid"].as_u64().unwrap_or(0)))
            .collect();
        let mut now_sorted = now.clone();
        now_sorted.sort();
        let mut want = before.clone();
        want.sort();
        ensure(tasks.len() == 3 && now_sorted == want, tasks)
    });
    assert_eq!(copies_running(job).len(), 3);
    assert_eq!(c.metric("capstan_tasks_replaced_total"), Some(0.0));
    assert_eq!(c.metric("capstan_agent_removals_total"), Some(0.0));
}
