//! Builders shared by the state tests: agents, job specs and stamped commands, with no defaults
//! hidden in them beyond what each argument says.

#![allow(dead_code)] // each test file uses a different part

use capstan_model::{AgentId, ByteSize, Capacity, JobKey, JobSpec, JobType, PortRange, TaskSpec, Timestamp};
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
    result
}
