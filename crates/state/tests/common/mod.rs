//! Builders shared by the state tests: agents, job specs and stamped commands, with no defaults
//! hidden in them beyond what each argument says.

#![allow(dead_code)] // each test file uses a different part

use capstan_model::{AgentId, ByteSize, Capacity, JobKey, JobSpec, JobType, PortRange, TaskId, TaskSpec, Timestamp};
use capstan_state::{AgentInfo, Command, Stamped};
use std::collections::BTreeMap;

pub const MIB: u64 = 1 << 20;

pub fn agent_info(id: u64, cpus_milli: u32, mem_bytes: u64, disk_bytes: u64, ports: Vec<PortRange>) -> AgentInfo {
    AgentInfo {
        id: AgentId(id),
        hostname: format!("host-{id}"),
        address: format!("http://10.0.0.{id}:5051"),
        capacity: Capacity { cpus_milli, mem_bytes, disk_bytes, ports },
        attributes: BTreeMap::new(),
        version: "test".into(),
    }
}

pub struct JobShape {
    pub job_type: JobType,
    pub instances: u32,
    pub max_failures: u32,
    pub cpus_milli: u32,
    pub mem_bytes: u64,
    pub disk_bytes: u64,
    pub ports: u32,
}

impl JobShape {
    pub fn service(instances: u32) -> JobShape {
        JobShape {
            job_type: JobType::Service,
            instances,
            max_failures: 3,
            cpus_milli: 250,
            mem_bytes: 64 * MIB,
            disk_bytes: 0,
            ports: 1,
        }
    }

    pub fn batch(instances: u32, max_failures: u32) -> JobShape {
        JobShape { job_type: JobType::Batch, max_failures, ports: 0, ..JobShape::service(instances) }
    }

    pub fn spec(&self, key: &str) -> JobSpec {
        JobSpec {
            job: key.parse::<JobKey>().expect("test job keys are valid"),
            job_type: self.job_type,
            instances: self.instances,
            max_failures: self.max_failures,
            priority: 0,
            production: false,
            placement: Default::default(),
            cron: None,
            cron_timezone: None,
            cron_collision_policy: None,
            replace_after: None,
            min_healthy: None,
            task: TaskSpec {
                command: "sleep 1000".into(),
                user: "nobody".into(),
                cpus_milli: self.cpus_milli,
                mem: ByteSize(self.mem_bytes),
                disk: ByteSize(self.disk_bytes),
                ports: (0..self.ports).map(|i| format!("p{i}")).collect(),
                env: BTreeMap::new(),
                kill_grace: TaskSpec::DEFAULT_KILL_GRACE,
            },
            health_check: None,
            update: None,
            constraint: Vec::new(),
        }
    }
}

pub fn stamped(at_ms: u64, command: Command) -> Stamped {
    Stamped { at: Timestamp(at_ms), command }
}

/// Applies `command` stamped at `at_ms`, checking on the way what every applied command must
/// satisfy: its logged form reads back as itself, and a snapshot taken right after reads back as
/// the same state (derived fields rebuilt).
pub fn apply_round_trip(
    state: &mut capstan_state::ClusterState,
    at_ms: u64,
    command: Command,
) -> Result<capstan_state::Applied, capstan_state::Rejection> {
    use capstan_state::{decode_command, decode_snapshot, encode_command, encode_snapshot};
    let c = stamped(at_ms, command);
    assert_eq!(decode_command(&encode_command(&c)).unwrap(), c, "a command reads back from the log");
    let result = state.apply(&c);
    let back = decode_snapshot(&encode_snapshot(state)).unwrap();
    assert_eq!(encode_snapshot(&back), encode_snapshot(state), "a snapshot reads back the same");
    assert_eq!(back.pending, state.pending, "pending tasks are rebuilt from a snapshot");
    // Every derived field (indexes, counts, the agent → instance index) rebuilds the same.
    let mut rebuilt = state.clone();
    rebuilt.rebuild_derived();
    assert!(rebuilt == *state, "rebuild_derived differs from the incrementally kept fields");
    result
}

/// A cluster as the state tests drive it: the state, a clock that moves one millisecond per
/// command, and agents that number their status updates as real agents do. Every command goes
/// through [`apply_round_trip`]. Each test file adds its own story-telling methods in an `impl`
/// of its own.
pub struct TestCluster {
    pub state: capstan_state::ClusterState,
    pub now_ms: u64,
    /// The sequence number of each agent's newest status update.
    pub seq: BTreeMap<AgentId, u64>,
}

impl TestCluster {
    /// No agent and no job, at 1,000,000 ms.
    pub fn empty() -> TestCluster {
        TestCluster { state: Default::default(), now_ms: 1_000_000, seq: BTreeMap::new() }
    }

    /// Registers agent `id` with these resources and the ports `first..=first+9`.
    pub fn register(&mut self, id: AgentId, cpus_milli: u32, mem_bytes: u64, disk_bytes: u64, first_port: u16) {
        let ports = vec![PortRange { first: first_port, last: first_port + 9 }];
        self.apply(Command::RegisterAgent { info: agent_info(id.0, cpus_milli, mem_bytes, disk_bytes, ports) });
    }

    /// Applies at the current time, one millisecond later than the last command; it must be accepted.
    pub fn apply(&mut self, command: Command) -> capstan_state::Applied {
        self.try_apply(command).unwrap_or_else(|e| panic!("refused: {e}"))
    }

    pub fn try_apply(&mut self, command: Command) -> Result<capstan_state::Applied, capstan_state::Rejection> {
        self.now_ms += 1;
        apply_round_trip(&mut self.state, self.now_ms, command)
    }

    /// `agent` reports on `task`, with its next sequence number.
    pub fn report_from(
        &mut self,
        agent: AgentId,
        task: TaskId,
        report: capstan_state::Report,
    ) -> capstan_state::Applied {
        let seq = self.seq.entry(agent).or_insert(0);
        *seq += 1;
        let update = capstan_state::StatusUpdate { seq: *seq, task, report, at: Timestamp(self.now_ms) };
        self.apply(Command::AgentUpdates { agent, updates: vec![update] })
    }

    /// Places a pending task on `agent` with the agent's lowest free ports; the placement must take.
    pub fn place_on(&mut self, task: TaskId, agent: AgentId) {
        let t = &self.state.tasks[&task];
        let n = self.state.jobs[&t.job].spec_for(t.job_version).task.ports.len();
        let a = &self.state.agents[&agent];
        let ports: Vec<u16> = a
            .info
            .capacity
            .ports
            .iter()
            .flat_map(|r| r.first..=r.last)
            .filter(|p| !a.used_ports.contains(p))
            .take(n)
            .collect();
        let applied = self.apply(Command::Place { placements: vec![capstan_state::Placement { task, agent, ports }] });
        assert_eq!(applied.placements_refused, 0, "placing {task} on {agent}");
    }

    /// The live task of an instance.
    pub fn current(&self, job: &str, instance: u32) -> TaskId {
        self.state.jobs[&job.parse::<JobKey>().unwrap()].current[&instance]
    }
}
