//! The reaper of a real master: a finished batch job is kept for its retention period, then it
//! and its ended tasks are forgotten, in slices when it is large.

use capstan_master::reaper::JobSettings;
use capstan_master::{start, MasterConfig};
use capstan_model::{AgentId, Capacity, JobKey, TaskExit, TaskState, Timestamp};
use capstan_state::state::FORGET_SLICE_INSTANCES;
use capstan_state::{AgentInfo, Command, Report, StatusUpdate};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The retention the test's master keeps finished batch jobs for.
const RETENTION: Duration = Duration::from_secs(2);
/// Waits in this test fail past this.
const DEADLINE: Duration = Duration::from_secs(60);

fn batch(key: &str, instances: u32) -> capstan_model::JobSpec {
    capstan_model::parse_toml(
        &format!(
            "job = \"{key}\"\ntype = \"batch\"\ninstances = {instances}\n[task]\ncommand = \"true\"\nuser = \"nobody\"\ncpus = 0.001\nmem = \"4MiB\"\ndisk = \"1MiB\"\n"
        ),
        &capstan_model::ValidationPolicy::default(),
    )
    .unwrap()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_batch_job_is_kept_for_its_retention_then_forgotten_in_slices() {
    let dir = tempfile::tempdir().unwrap();
    let master = start(MasterConfig {
        jobs: JobSettings { batch_retention: RETENTION, ..Default::default() },
        ..MasterConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())
    })
    .await
    .unwrap();
    let core = master.core();
    let agent = AgentId(1);
    let info = AgentInfo {
        id: agent,
        hostname: "reaper-test".into(),
        address: "http://10.9.0.1:5051".into(),
        capacity: Capacity { cpus_milli: 1_000_000, mem_bytes: 1 << 50, disk_bytes: 1 << 50, ports: vec![] },
        attributes: BTreeMap::new(),
        version: "test".into(),
    };
    core.submit(Command::RegisterAgent { info }).await.unwrap();
    // More instances than one forget slice: forgotten in several.
    let instances = FORGET_SLICE_INSTANCES * 2 + 1;
    let key: JobKey = "batch/test/old".parse().unwrap();
    let created = core.submit(Command::CreateJob { spec: batch("batch/test/old", instances), seed: 1 }).await.unwrap();
    wait_for("the scheduler places every task", || {
        let state = core.state.read();
        created.created.iter().all(|t| state.tasks[t].state == TaskState::Assigned)
    })
    .await;
    let mut seq = 0;
    for chunk in created.created.chunks(500) {
        let mut updates = vec![];
        for t in chunk {
            for report in [Report::Running { pid: 1 }, Report::Exited { exit: TaskExit::Exited { code: 0 } }] {
                seq += 1;
                updates.push(StatusUpdate { seq, task: *t, report, at: Timestamp(0) });
            }
        }
        core.submit(Command::AgentUpdates { agent, updates }).await.unwrap();
    }
    {
        let state = core.state.read();
        let job = &state.jobs[&key];
        assert!(job.finished_at.is_some() && job.is_over(), "the job finished");
        assert_eq!(state.tasks.len() as u32, instances, "its tasks are kept for now");
    }
    // Another batch job that has not finished is never forgotten.
    core.submit(Command::CreateJob { spec: batch("batch/test/waiting", 1), seed: 2 }).await.unwrap();
    wait_for("the finished job is forgotten after its retention", || !core.state.read().jobs.contains_key(&key)).await;
    let state = core.state.read();
    assert!(state.tasks.values().all(|t| *t.job != key), "its tasks are forgotten with it");
    assert!(state.jobs.contains_key(&"batch/test/waiting".parse::<JobKey>().unwrap()), "the unfinished job stays");
    drop(state);
    master.stop();
}
