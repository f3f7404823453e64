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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    pub info: AgentInfo,
    pub registered_at: Timestamp,
    /// The highest status-update sequence number applied from this agent.
    pub last_update_seq: u64,
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
            used: Demand::default(),
            used_ports: BTreeSet::new(),
            tasks: BTreeSet::new(),
            orders_version: 0,
        }
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
