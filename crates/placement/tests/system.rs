//! System jobs: each instance is placed on its own agent or nowhere, with a reason naming that
//! agent; one instance that does not fit does not hold back its siblings; a production system
//! task preempts only on its own agent.

mod common;

use capstan_model::JobType;
use capstan_model::TaskState;
use capstan_placement::plan;
use common::*;

fn system(cpus_milli: u32) -> JobShape {
    JobShape { job_type: JobType::System, ..JobShape::service(0, cpus_milli, 64 * MIB) }
}

#[test]
fn each_instance_goes_to_its_own_agent_and_one_that_does_not_fit_waits_alone() {
    let mut c = Cluster::new();
    for (id, cpus) in [(1, 4000), (2, 4000), (3, 200)] {
        c.register(agent_info(id, cpus, 4096 * MIB, 0, vec![], &[("role", "worker")]));
    }
    c.register(agent_info(4, 4000, 4096 * MIB, 0, vec![], &[("role", "db")]));
    let shape = JobShape { constraints: vec![equals("role", "worker")], ..system(500) };
    let created = c.create("infra/prod/agentd", &shape);
    assert_eq!(created.len(), 3, "agents 1-3 match, 4 does not");
    for seed in 0..10 {
        let p = plan(&c.state, c.now(), seed, 100);
        let mut placed: Vec<(u32, u64)> =
            p.placements.iter().map(|pl| (c.state.tasks[&pl.task].instance, pl.agent.0)).collect();
        placed.sort();
        let job = &c.state.jobs[&"infra/prod/agentd".parse().unwrap()];
        for (instance, agent) in &placed {
            assert_eq!(job.pinned[instance].0, *agent, "seed {seed}: instance {instance} off its agent");
        }
        assert_eq!(placed.len(), 2, "seed {seed}: {p:?}");
        assert_eq!(p.unplaced.len(), 1);
        assert_eq!(p.unplaced[0].why, "does not fit on its agent host-3: not enough cpus free");
        assert!(p.unplaced_jobs.is_empty(), "its siblings are not given up on");
    }
    let p = plan(&c.state, c.now(), 1, 100);
    assert_eq!(c.place(p.placements).placements_refused, 0);
    check_counts(&c.state).unwrap();
}

#[test]
fn a_production_system_task_preempts_on_its_own_agent_only() {
    let mut c = Cluster::new();
    c.register(agent_info(1, 1000, 4096 * MIB, 0, vec![], &[]));
    c.register(agent_info(2, 1000, 4096 * MIB, 0, vec![], &[]));
    // Agent 1 is full of low-priority work; agent 2 is empty.
    let filler = JobShape { priority: 1, ..JobShape::service(1, 1000, 64 * MIB) };
    let f = c.create("batch/dev/filler", &filler)[0];
    let pl = capstan_state::Placement { task: f, agent: capstan_model::AgentId(1), ports: vec![] };
    c.place(vec![pl]);
    c.start(f);
    let shape = JobShape { production: true, priority: 10, ..system(600) };
    c.create("infra/prod/agentd", &shape);
    let p = plan(&c.state, c.now(), 3, 100);
    assert_eq!(p.placements.len(), 1, "agent 2's instance is placed: {p:?}");
    assert_eq!(p.placements[0].agent.0, 2);
    assert_eq!(p.preemptions.len(), 1, "agent 1's instance preempts the filler there: {p:?}");
    assert_eq!(p.preemptions[0].victim, f);
    c.place(p.placements);
    c.preempt(p.preemptions);
    assert_eq!(c.state.tasks[&f].state, TaskState::Killing);
}
