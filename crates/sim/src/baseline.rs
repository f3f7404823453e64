//! The physical limit of a placement benchmark: the time to merely write as many task records
//! as it places to the same kind of store, on the same file system, in batches of 1,000.

use capstan_model::{AgentId, Desired, JobKey, TaskId, TaskState, Timestamp};
use capstan_state::{Task, TaskEventRecord};
use capstan_store::{EmbeddedStore, LogEntry, Store};
use std::path::Path;
use std::time::{Duration, Instant};

/// Entries per `append` (one durable commit each).
pub const BATCH_ENTRIES: usize = 1000;

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct RawWrite {
    pub records: u64,
    pub bytes: u64,
    pub commits: u64,
    /// Encoding and appending, from the first record to the last commit.
    #[serde(serialize_with = "secs")]
    pub elapsed: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// A task as the master holds it once it runs: three events, an agent, a pid.
pub fn running_task(job: &JobKey, instance: u32, seq: u64, agent: AgentId, at: Timestamp) -> Task {
    let id = TaskId(capstan_model::derive_id(seq ^ 0x5eed));
    let event = |ms: u64, state: TaskState, reason: String| TaskEventRecord {
        at: at.plus_ms(ms),
        state,
        reason: reason.into_boxed_str(),
    };
    let pid = 10_000 + (seq % 50_000) as u32;
    Task {
        id,
        seq,
        job: std::sync::Arc::new(job.clone()),
        instance,
        job_version: 1,
        state: TaskState::Running,
        desired: Desired::Run,
        agent: Some(agent),
        ports: vec![],
        pid: Some(pid),
        exit: None,
        failures: 0,
        not_before: at,
        created_at: at,
        running_since: Some(at.plus_ms(40)),
        restart_when_stopped: false,
        healthy: None,
        kill_reason: None,
        events: vec![
            event(0, TaskState::Pending, "waiting for a place".into()),
            event(20, TaskState::Assigned, format!("assigned to agent {agent}")),
            event(40, TaskState::Running, format!("running as pid {pid}")),
        ],
    }
}

/// Opens a fresh embedded store in `dir` (which must not hold one) and appends `records`
/// postcard-encoded running tasks spread over `agents` agents, in batches of [`BATCH_ENTRIES`].
pub fn write_task_records(dir: &Path, records: u64, agents: u64) -> anyhow::Result<RawWrite> {
    let store = EmbeddedStore::open(dir)?;
    anyhow::ensure!(store.last_index()? == 0, "{} already holds a store", dir.display());
    let agent_ids: Vec<AgentId> =
        (0..agents.clamp(1, 100_000)).map(|i| AgentId(capstan_model::derive_id(i + 1))).collect();
    let job_every = 10_000u64;
    let at = Timestamp(1_700_000_000_000);
    let started = Instant::now();
    let (mut bytes, mut commits) = (0u64, 0u64);
    let mut index = 0u64;
    let mut batch = Vec::with_capacity(BATCH_ENTRIES);
    let mut job = JobKey { role: "bench".into(), env: "placement".into(), name: "raw-0".into() };
    while index < records {
        batch.clear();
        for _ in 0..BATCH_ENTRIES.min((records - index) as usize) {
            if index.is_multiple_of(job_every) {
                job = JobKey {
                    role: "bench".into(),
                    env: "placement".into(),
                    name: format!("raw-{}", index / job_every),
                };
            }
            let agent = agent_ids[(index % agent_ids.len() as u64) as usize];
            let task = running_task(&job, (index % job_every) as u32, index + 1, agent, at);
            let data = postcard::to_allocvec(&task)?;
            bytes += data.len() as u64;
            index += 1;
            batch.push(LogEntry { index, data });
        }
        store.append(&batch)?;
        commits += 1;
    }
    Ok(RawWrite { records, bytes, commits, elapsed: started.elapsed() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let w = write_task_records(dir.path(), 2_500, 10).unwrap();
        assert_eq!((w.records, w.commits), (2_500, 3));
        assert!(w.bytes / w.records > 80, "a realistic record is not tiny: {} bytes", w.bytes / w.records);
        let store = EmbeddedStore::open(dir.path());
        // Still open by nobody: the first handle was dropped.
        let loaded = store.unwrap().load().unwrap();
        assert_eq!(loaded.entries.len(), 2_500);
        let t: Task = postcard::from_bytes(&loaded.entries[7].data).unwrap();
        assert_eq!(t.state, TaskState::Running);
    }
}
