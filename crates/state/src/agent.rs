//! Agents as the master knows them: what they offer, what is reserved on them.

use capstan_model::{AgentId, Capacity, Demand, TaskId, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What an agent says about itself when it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub id: AgentId,
    pub hostname: String,
    /// `http://host:port` of the agent's own API (logs).
    pub address: String,
    pub capacity: Capacity,
    pub attributes: BTreeMap<String, String>,
    pub version: String,
}

/// Whether the master hears from an agent (see `crates/master/src/liveness.rs` for who decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Liveness {
    /// Heard from within the agent timeout; new tasks may go there.
    Active,
    /// Not heard from within the timeout since `since`; its tasks are kept (UNREACHABLE) until
    /// their job's `replace_after` passes and a (rate-limited) removal replaces them.
    Unreachable { since: Timestamp },
    /// Unreachable, and every task that may be replaced was replaced (at `at`).
    Removed { since: Timestamp, at: Timestamp },
    // Draining is not a liveness: see `Agent::drain` (a draining agent can become unreachable).
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Active => "active",
            Liveness::Unreachable { .. } => "unreachable",
            Liveness::Removed { .. } => "removed",
        }
    }

    /// When it stopped answering, unless it is active.
    pub fn unreachable_since(self) -> Option<Timestamp> {
        match self {
            Liveness::Active => None,
            Liveness::Unreachable { since } | Liveness::Removed { since, .. } => Some(since),
        }
    }
}

/// A task that runs on an agent while the master does not want it there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stray {
    /// When the master first saw it.
    pub since: Timestamp,
    /// Stop it without waiting for the grace period: the master knows it (ended, replaced, or
    /// its job killed) and wants it stopped. An unknown task waits out the grace period: unknown
    /// is not the same as dead.
    pub stop_now: bool,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    pub info: AgentInfo,
    pub registered_at: Timestamp,
    /// The highest status-update sequence number applied from this agent.
    pub last_update_seq: u64,
    pub liveness: Liveness,
    /// Tasks that run there without the master wanting them (found by reconciliation).
    pub strays: BTreeMap<TaskId, Stray>,
    /// Set while the agent is drained or draining (`capstan agent drain`): nothing new goes there.
    pub drain: Option<crate::drain::Drain>,
    // --- derived from tasks; rebuilt after a snapshot is loaded
    #[serde(skip)]
    pub used: Demand,
    #[serde(skip)]
    pub used_ports: BTreeSet<u16>,
    /// Tasks that hold resources here.
    #[serde(skip)]
    pub tasks: BTreeSet<TaskId>,
    /// Grows whenever what this agent must run changes; agents wait on it.
    #[serde(skip)]
    pub orders_version: u64,
}

impl Agent {
    pub fn new(info: AgentInfo, at: Timestamp) -> Agent {
        Agent {
            info,
            registered_at: at,
            last_update_seq: 0,
            liveness: Liveness::Active,
            strays: BTreeMap::new(),
            drain: None,
            used: Demand::default(),
            used_ports: BTreeSet::new(),
            tasks: BTreeSet::new(),
            orders_version: 0,
        }
    }

    /// New tasks may be placed here: active, and not drained or draining.
    pub fn schedulable(&self) -> bool {
        self.liveness == Liveness::Active && self.drain.is_none()
    }

    /// Whether `demand` fits in what is left (ports counted, not chosen).
    pub fn fits(&self, demand: &Demand) -> bool {
        let c = &self.info.capacity;
        u64::from(self.used.cpus_milli) + u64::from(demand.cpus_milli) <= u64::from(c.cpus_milli)
            && self.used.mem_bytes + demand.mem_bytes <= c.mem_bytes
            && self.used.disk_bytes + demand.disk_bytes <= c.disk_bytes
            && self.used_ports.len() as u64 + u64::from(demand.ports) <= u64::from(c.port_count())
    }

    pub fn free(&self) -> Demand {
        let c = &self.info.capacity;
        Demand {
            cpus_milli: c.cpus_milli.saturating_sub(self.used.cpus_milli),
            mem_bytes: c.mem_bytes.saturating_sub(self.used.mem_bytes),
            disk_bytes: c.disk_bytes.saturating_sub(self.used.disk_bytes),
            ports: c.port_count().saturating_sub(self.used_ports.len() as u32),
        }
    }

    pub(crate) fn reserve(&mut self, task: TaskId, demand: &Demand, ports: &[u16]) {
        self.used.cpus_milli += demand.cpus_milli;
        self.used.mem_bytes += demand.mem_bytes;
        self.used.disk_bytes += demand.disk_bytes;
        self.used_ports.extend(ports.iter().copied());
        self.tasks.insert(task);
    }

    pub(crate) fn release(&mut self, task: TaskId, demand: &Demand, ports: &[u16]) {
        if !self.tasks.remove(&task) {
            return;
        }
        self.used.cpus_milli -= demand.cpus_milli;
        self.used.mem_bytes -= demand.mem_bytes;
        self.used.disk_bytes -= demand.disk_bytes;
        for p in ports {
            self.used_ports.remove(p);
        }
    }
}
