//! Preemption: a production task that fits nowhere stops lower-priority, non-production tasks,
//! never production ones nor ones of equal or higher priority; once they ended it is placed there.

mod common;

use capstan_model::{AgentId, TaskId, TaskState};
use capstan_placement::plan;
use common::*;
use std::collections::BTreeSet;

const GIB: u64 = 1024 * MIB;

fn shape(instances: u32, cpus_milli: u32, priority: i32, production: bool) -> JobShape {
    JobShape { priority, production, ..JobShape::service(instances, cpus_milli, 256 * MIB) }
}

/// Places everything pending and starts it; every placement must take.
fn place_and_run(c: &mut Cluster) {
    let p = plan(&c.state, c.now(), 1, 1000);
    assert!(p.preemptions.is_empty());
    assert_eq!(c.place(p.placements.clone()).placements_refused, 0);
    for pl in p.placements {
        c.start(pl.task);
    }
}

struct Scene {
    c: Cluster,
    /// Non-production, priority 1, on agent 1: the only legitimate victims.
    low: BTreeSet<TaskId>,
    /// Non-production, priority 5 (equal to the preemptor), on agent 1.
    equal: BTreeSet<TaskId>,
    /// Production, priority 0, on agent 1.
    production_low: BTreeSet<TaskId>,
    /// Non-production, priority 9, on agent 2, which has nothing else.
    higher: BTreeSet<TaskId>,
    preemptor: TaskId,
}

/// Agent 1 (4 cpus) is full with 2 low + 1 equal + 1 production task of 1 cpu each; agent 2
/// (2 cpus) is full with 2 higher-priority tasks. Then a production task of 1.5 cpus, priority 5.
fn scene() -> Scene {
    let mut c = Cluster::new();
    c.register(agent_info(1, 4000, 8 * GIB, 0, vec![], &[("rack", "r1")]));
    let low: BTreeSet<TaskId> = c.create("batch/prod/low", &shape(2, 1000, 1, false)).into_iter().collect();
    let equal: BTreeSet<TaskId> = c.create("svc/prod/equal", &shape(1, 1000, 5, false)).into_iter().collect();
    let production_low = c.create("svc/prod/cheap", &shape(1, 1000, 0, true)).into_iter().collect();
    place_and_run(&mut c);
    c.register(agent_info(2, 2000, 8 * GIB, 0, vec![], &[("rack", "r2")]));
    let higher = c.create("svc/prod/higher", &shape(2, 1000, 9, false)).into_iter().collect();
    place_and_run(&mut c);
    assert!(c.state.pending.is_empty());
    let preemptor = c.create("svc/prod/critical", &shape(1, 1500, 5, true))[0];
    Scene { c, low, equal, production_low, higher, preemptor }
}

#[test]
fn production_task_preempts_only_lower_priority_non_production_tasks_then_runs_there() {
    let Scene { mut c, low, equal, production_low, higher, preemptor } = scene();
    let p = plan(&c.state, c.now(), 7, 1000);
    assert!(p.placements.is_empty(), "{p:?}");
    assert_eq!(p.unplaced.len(), 1);
    assert!(p.unplaced[0].why.contains("preempting"), "{}", p.unplaced[0].why);
    let victims: BTreeSet<TaskId> = p.preemptions.iter().map(|x| x.victim).collect();
    assert!(p.preemptions.iter().all(|x| x.by == preemptor));
    assert!(victims.is_subset(&low), "victims {victims:?} must be among the low-priority tasks {low:?}");
    assert!(victims.is_disjoint(&equal) && victims.is_disjoint(&production_low) && victims.is_disjoint(&higher));
    // Enough: 1.5 cpus on a full agent needs both 1-cpu low tasks.
    assert_eq!(victims, low);

    c.preempt(p.preemptions.clone());
    for v in &victims {
        let t = &c.state.tasks[v];
        assert_eq!(t.state, TaskState::Killing);
        assert!(t.reason().contains(&preemptor.to_string()) && t.reason().contains("preempted"), "{}", t.reason());
    }
    c.finish_kills();
    for v in &victims {
        assert_eq!(c.state.tasks[v].state, TaskState::Killed);
    }
    // The victims' service instances come back as pending replacements, and lose to the preemptor.
    let p = plan(&c.state, c.now(), 8, 1000);
    assert!(p.preemptions.is_empty(), "{p:?}");
    let placed: Vec<(TaskId, AgentId)> = p.placements.iter().map(|x| (x.task, x.agent)).collect();
    assert_eq!(placed, vec![(preemptor, AgentId(1))], "{p:?}");
    assert_eq!(c.place(p.placements).placements_refused, 0);
    check_no_overcommit(&c.state).unwrap();
    check_counts(&c.state).unwrap();
}

/// While the victims are stopping, later passes (the scheduler runs one whenever anything changes)
/// must not pick more victims for the same preemptor.
#[test]
fn no_more_victims_while_the_first_ones_stop() {
    let mut c = Cluster::new();
    c.register(agent_info(1, 4000, 8 * GIB, 0, vec![], &[]));
    c.create("batch/prod/low", &shape(4, 1000, 1, false));
    place_and_run(&mut c);
    let preemptor = c.create("svc/prod/critical", &shape(1, 1000, 5, true))[0];
    let first = plan(&c.state, c.now(), 1, 1000);
    assert_eq!(first.preemptions.len(), 1, "{first:?}");
    c.preempt(first.preemptions.clone());
    for pass in 0..3u64 {
        let p = plan(&c.state, c.now(), 10 + pass, 1000);
        assert!(p.preemptions.is_empty(), "pass {pass}: more victims while the first stops: {p:?}");
        assert!(p.placements.is_empty());
        assert_eq!(p.unplaced.iter().map(|u| u.task).collect::<Vec<_>>(), vec![preemptor]);
    }
    assert_eq!(c.tasks_in(TaskState::Killing).len(), 1);
    c.finish_kills();
    let p = plan(&c.state, c.now(), 20, 1000);
    assert_eq!(p.placements.iter().map(|x| x.task).collect::<Vec<_>>(), vec![preemptor]);
    assert_eq!(c.place(p.placements).placements_refused, 0);
}

/// Two production tasks in one pass do not count on the same stopping task's room.
#[test]
fn two_preemptors_do_not_share_one_victim() {
    let mut c = Cluster::new();
    c.register(agent_info(1, 4000, 8 * GIB, 0, vec![], &[]));
    c.create("batch/prod/low", &shape(4, 1000, 1, false));
    place_and_run(&mut c);
    let critical = c.create("svc/prod/critical", &shape(2, 1000, 5, true));
    let p = plan(&c.state, c.now(), 1, 1000);
    let victims: BTreeSet<TaskId> = p.preemptions.iter().map(|x| x.victim).collect();
    assert_eq!(victims.len(), 2, "one victim each: {p:?}");
    c.preempt(p.preemptions);
    let p = plan(&c.state, c.now(), 2, 1000);
    assert!(p.preemptions.is_empty(), "{p:?}");
    c.finish_kills();
    let p = plan(&c.state, c.now(), 3, 1000);
    let placed: BTreeSet<TaskId> = p.placements.iter().map(|x| x.task).collect();
    assert_eq!(placed, critical.into_iter().collect());
}

/// A production task whose room can only come from production or higher-priority tasks
/// preempts nothing.
#[test]
fn nothing_to_preempt_means_no_preemptions() {
    let mut c = Cluster::new();
    c.register(agent_info(1, 2000, 8 * GIB, 0, vec![], &[]));
    c.create("svc/prod/other", &shape(1, 1000, 0, true));
    c.create("svc/prod/same", &shape(1, 1000, 5, false));
    place_and_run(&mut c);
    c.create("svc/prod/critical", &shape(1, 1000, 5, true));
    let p = plan(&c.state, c.now(), 1, 1000);
    assert!(p.preemptions.is_empty(), "{p:?}");
    assert_eq!(p.unplaced.len(), 1);
    assert!(p.unplaced[0].why.contains("lack cpus"), "{}", p.unplaced[0].why);
}

/// Siblings of a job with one instance per host make room on different agents, not twice on one.
#[test]
fn distinct_hosts_preemptors_make_room_on_different_agents() {
    let mut c = Cluster::new();
    c.register(agent_info(1, 2000, 8 * GIB, 0, vec![], &[]));
    c.register(agent_info(2, 2000, 8 * GIB, 0, vec![], &[]));
    c.create("batch/prod/low", &shape(4, 1000, 1, false));
    place_and_run(&mut c);
    let mut critical = shape(2, 1000, 5, true);
    critical.constraints = vec![distinct_hosts()];
    let critical: BTreeSet<TaskId> = c.create("svc/prod/critical", &critical).into_iter().collect();
    let p = plan(&c.state, c.now(), 1, 1000);
    let agents: BTreeSet<AgentId> = p.preemptions.iter().map(|x| c.state.tasks[&x.victim].agent.unwrap()).collect();
    assert_eq!(p.preemptions.len(), 2, "{p:?}");
    assert_eq!(agents.len(), 2, "one victim on each agent: {p:?}");
    c.preempt(p.preemptions);
    c.finish_kills();
    let p = plan(&c.state, c.now(), 2, 1000);
    assert_eq!(p.placements.iter().map(|x| x.task).collect::<BTreeSet<_>>(), critical);
    assert_eq!(c.place(p.placements).placements_refused, 0);
    check_constraints(&c.state).unwrap();
}
