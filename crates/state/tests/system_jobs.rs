//! System jobs in the state: one instance per matching active agent, created with the job and when
//! an agent joins or comes back, pinned to its agent, dropped (not replaced) when the agent is
//! removed or stops matching.

mod common;

use capstan_model::spec::ConstraintSpec;
use capstan_model::{AgentId, JobKey, JobType, PortRange, TaskExit, TaskId, TaskState};
use capstan_state::{AgentInfo, Command, Placement, Report};
use common::{agent_info, JobShape, TestCluster, MIB};

type Cluster = TestCluster;

fn agent(id: u64, role: &str) -> AgentInfo {
    let mut info = agent_info(id, 2000, 2048 * MIB, 1024 * MIB, vec![PortRange { first: 31000, last: 31009 }]);
    info.attributes.insert("role".into(), role.into());
    info
}

impl Cluster {
    fn job(&self) -> &capstan_state::Job {
        &self.state.jobs[&key()]
    }

    /// Agent of each live instance's current task, by pinned agent.
    fn pinned(&self) -> Vec<u64> {
        self.job().pinned.values().map(|a| a.0).collect()
    }

    fn current_on(&self, agent: u64) -> TaskId {
        let instance = self.job().instance_on(AgentId(agent)).expect("an instance there");
        self.job().current[&instance]
    }

    fn place(&mut self, task: TaskId, agent: u64) -> u32 {
        let placements = vec![Placement { task, agent: AgentId(agent), ports: vec![] }];
        self.apply(Command::Place { placements }).placements_refused
    }

    fn report(&mut self, task: TaskId, report: Report) {
        let agent = self.state.tasks[&task].agent.unwrap();
        self.report_from(agent, task, report);
    }
}

fn key() -> JobKey {
    "infra/prod/node-exporter".parse().unwrap()
}

/// Runs on agents with `role = worker`.
fn system_spec() -> capstan_model::JobSpec {
    let mut spec = JobShape { job_type: JobType::System, instances: 0, ports: 0, ..JobShape::service(0) }.spec("x/y/z");
    spec.job = key();
    spec.constraint =
        vec![ConstraintSpec { attribute: Some("role".into()), value: Some("worker".into()), ..Default::default() }];
    spec
}

fn cluster_with_job() -> Cluster {
    let mut c = Cluster::empty();
    for (id, role) in [(1, "worker"), (2, "worker"), (3, "db")] {
        c.apply(Command::RegisterAgent { info: agent(id, role) });
    }
    let created = c.apply(Command::CreateJob { spec: system_spec(), seed: 9 }).created;
    assert_eq!(created.len(), 2);
    c
}

#[test]
fn one_instance_per_matching_agent_and_one_more_for_each_that_joins() {
    let mut c = cluster_with_job();
    assert_eq!(c.pinned(), vec![1, 2], "agent 3 does not match");
    assert_eq!(c.job().instance_count(), 2);

    // A worker joins: it gets an instance; a db agent joins: nothing.
    c.apply(Command::RegisterAgent { info: agent(4, "worker") });
    c.apply(Command::RegisterAgent { info: agent(5, "db") });
    assert_eq!(c.pinned(), vec![1, 2, 4]);
    // Registering again (an agent restart) does not add a second one.
    c.apply(Command::RegisterAgent { info: agent(4, "worker") });
    assert_eq!(c.pinned(), vec![1, 2, 4]);
    assert_eq!(c.state.pending.len(), 3);
}

#[test]
fn a_system_task_is_placed_only_on_its_own_agent_and_restarts_there() {
    let mut c = cluster_with_job();
    let t1 = c.current_on(1);
    assert_eq!(c.place(t1, 2), 1, "agent 2 is not its agent");
    assert_eq!(c.place(t1, 3), 1);
    assert_eq!(c.place(t1, 1), 0);
    c.report(t1, Report::Starting);
    c.report(t1, Report::Running { pid: 7 });
    // It fails: a fresh task for the same instance, pinned to the same agent, after a backoff.
    c.report(t1, Report::Exited { exit: TaskExit::Exited { code: 1 } });
    let again = c.current_on(1);
    assert_ne!(again, t1);
    assert_eq!(c.state.tasks[&again].state, TaskState::Pending);
    assert_eq!(c.pinned(), vec![1, 2]);
}

#[test]
fn a_removed_agent_is_dropped_from_the_job_not_replaced_and_counted_again_when_back() {
    let mut c = cluster_with_job();
    let t1 = c.current_on(1);
    c.place(t1, 1);
    c.report(t1, Report::Running { pid: 7 });
    c.apply(Command::AgentsUnreachable { agents: vec![AgentId(1)] });
    assert_eq!(c.pinned(), vec![1, 2], "unreachable still counts");
    c.now_ms += 10 * 60 * 1000;
    let applied = c.apply(Command::RemoveAgent { agent: AgentId(1) });
    assert!(applied.replaced.is_empty(), "a system task is not replaced elsewhere");
    assert_eq!(c.state.tasks[&t1].state, TaskState::Lost);
    assert_eq!(c.pinned(), vec![2]);
    assert_eq!(c.job().instance_count(), 1);
    assert!(matches!(c.state.agents[&AgentId(1)].liveness, capstan_state::Liveness::Removed { .. }));
    assert_eq!(c.state.pending.len(), 1, "only agent 2's task waits; nothing new for agent 1");

    // The agent answers again: active, and a new instance for it.
    c.apply(Command::AgentReconcile { agent: AgentId(1), known: vec![], running: vec![], as_of_seq: None });
    assert_eq!(c.pinned(), vec![2, 1]);
    assert_ne!(c.current_on(1), t1);
}

#[test]
fn an_agent_that_stops_matching_loses_its_instance_and_a_killed_job_stops_everywhere() {
    let mut c = cluster_with_job();
    let t2 = c.current_on(2);
    c.place(t2, 2);
    c.report(t2, Report::Running { pid: 7 });
    c.apply(Command::RegisterAgent { info: agent(2, "db") });
    assert_eq!(c.pinned(), vec![1]);
    assert_eq!(c.state.tasks[&t2].state, TaskState::Killing);
    assert!(c.state.tasks[&t2].reason().contains("no longer matches"), "{}", c.state.tasks[&t2].reason());
    c.report(t2, Report::Exited { exit: TaskExit::Killed { by: "master".into() } });
    assert_eq!(c.state.tasks[&t2].state, TaskState::Killed);
    assert_eq!(c.pinned(), vec![1], "not restarted");

    c.apply(Command::KillJob { job: key(), by: "test".into() });
    assert!(c.state.jobs.is_empty(), "its one pending task ended at once");
    c.apply(Command::RegisterAgent { info: agent(6, "worker") });
    assert!(c.state.tasks.values().all(|t| t.state.is_terminal()) || c.state.tasks.is_empty());
}
