//! Fuzz target: any bytes as the body of an agent's call to the master (register, heartbeat,
//! status updates, usage; the first byte chooses), decoded as the master decodes it and, when it
//! decodes, turned into the commands the master's handler would log and applied to a cluster with
//! two agents and a running job. Must hold: no panic; a refused command changes nothing; after
//! every applied command the indexes kept incrementally equal those rebuilt from scratch, the
//! command reads back from its logged form, and a snapshot reads back as the same state.
//!
//! A convenience for the fuzzer: task ids below [`SETUP_TASK_ALIASES`] name the setup's tasks by
//! their index (real ids are random 64-bit numbers, which the fuzzer would not guess); every other
//! id passes unchanged, as an unknown task.
#![no_main]

use capstan_api::wire::{HeartbeatRequest, RegisterRequest, UpdatesRequest, UsageReport};
use capstan_model::{AgentId, Capacity, PortRange, TaskId, Timestamp};
use capstan_state::{AgentInfo, ClusterState, Command, Placement, Stamped, StatusUpdate};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// As the master's `MAX_UPDATES_PER_BATCH`: larger batches are refused before they are applied.
const MAX_UPDATES_PER_BATCH: usize = 10_000;

/// Task ids below this are aliases of the setup's tasks (`id % tasks`).
const SETUP_TASK_ALIASES: u64 = 16;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, body)) = data.split_first() else { return };
    let mut state = cluster().clone();
    let tasks: Vec<TaskId> = state.tasks.keys().copied().collect();
    let alias = |t: TaskId| if t.0 < SETUP_TASK_ALIASES { tasks[(t.0 as usize) % tasks.len()] } else { t };
    let aliases = |ts: Vec<TaskId>| ts.into_iter().map(alias).collect::<Vec<_>>();
    let commands = match choice % 4 {
        0 => match serde_json::from_slice::<RegisterRequest>(body) {
            Ok(r) => {
                let agent = r.info.id;
                vec![
                    Command::RegisterAgent { info: r.info },
                    Command::AgentReconcile {
                        agent,
                        known: aliases(r.known_tasks),
                        running: aliases(r.running_tasks),
                        as_of_seq: None,
                    },
                ]
            }
            Err(_) => return,
        },
        1 => match serde_json::from_slice::<HeartbeatRequest>(body) {
            Ok(mut h) if state.agents.contains_key(&h.agent) => {
                h.known_tasks = aliases(h.known_tasks);
                h.running_tasks = aliases(h.running_tasks);
                if state.reconcile_needed(h.agent, &h.known_tasks, &h.running_tasks, h.as_of_seq) {
                    vec![Command::AgentReconcile {
                        agent: h.agent,
                        known: h.known_tasks,
                        running: h.running_tasks,
                        as_of_seq: Some(h.as_of_seq),
                    }]
                } else {
                    vec![]
                }
            }
            _ => return,
        },
        2 => match serde_json::from_slice::<UpdatesRequest>(body) {
            Ok(u) if u.updates.len() <= MAX_UPDATES_PER_BATCH && !u.updates.is_empty() => {
                let updates = u.updates.into_iter().map(|x| StatusUpdate { task: alias(x.task), ..x }).collect();
                vec![Command::AgentUpdates { agent: u.agent, updates }]
            }
            _ => return,
        },
        _ => {
            let _ = serde_json::from_slice::<UsageReport>(body);
            return;
        }
    };
    for (i, command) in commands.into_iter().enumerate() {
        apply_checked(&mut state, 2_000_000 + i as u64, command);
    }
});

/// Applies as the master's writer does, checking what every command must satisfy.
fn apply_checked(state: &mut ClusterState, at_ms: u64, command: Command) {
    use capstan_state::{decode_command, decode_snapshot, encode_command, encode_snapshot};
    let stamped = Stamped { at: Timestamp(at_ms), command };
    assert_eq!(decode_command(&encode_command(&stamped)).expect("reads back"), stamped);
    let before = state.clone();
    if state.apply(&stamped).is_err() {
        assert!(*state == before, "a refused command changed the state");
        return;
    }
    let mut rebuilt = state.clone();
    rebuilt.rebuild_derived();
    assert!(rebuilt == *state, "rebuild_derived differs from the incrementally kept fields");
    let back = decode_snapshot(&encode_snapshot(state)).expect("a snapshot reads back");
    assert_eq!(encode_snapshot(&back), encode_snapshot(state));
}

/// Agents 1 and 2 with ports 31000–31009, and a 4-instance service job placed on both (the
/// corpus's bodies name these agents and tasks; task ids are derived from the job's seed).
fn cluster() -> &'static ClusterState {
    static CLUSTER: OnceLock<ClusterState> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let mut state = ClusterState::default();
        let mut at = 1_000_000;
        let mut apply = |state: &mut ClusterState, command: Command| {
            at += 1;
            state.apply(&Stamped { at: Timestamp(at), command }).expect("the setup applies");
        };
        for id in 1..=2 {
            let info = AgentInfo {
                id: AgentId(id),
                hostname: format!("host-{id}"),
                address: format!("http://10.0.0.{id}:7071"),
                capacity: Capacity {
                    cpus_milli: 4_000,
                    mem_bytes: 8 << 30,
                    disk_bytes: 8 << 30,
                    ports: vec![PortRange { first: 31_000, last: 31_009 }],
                },
                attributes: Default::default(),
                version: "fuzz".into(),
            };
            apply(&mut state, Command::RegisterAgent { info });
        }
        let spec = capstan_model::parse_toml(
            "job = \"web/prod/api\"\ninstances = 4\n[task]\ncommand = \"sleep 1000\"\nuser = \"nobody\"\n\
             cpus = 0.5\nmem = \"64MiB\"\ndisk = \"64MiB\"\nports = [\"http\"]\n",
            &Default::default(),
        )
        .expect("the setup's job is valid");
        apply(&mut state, Command::CreateJob { spec, seed: 7 });
        let tasks: Vec<TaskId> = state.tasks.keys().copied().collect();
        for (i, task) in tasks.into_iter().enumerate() {
            let agent = AgentId(1 + (i as u64 % 2));
            let placement = Placement { task, agent, ports: vec![31_000 + (i as u16 / 2)] };
            apply(&mut state, Command::Place { placements: vec![placement] });
        }
        state
    })
}
