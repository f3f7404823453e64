//! Properties of `plan` over random clusters and jobs, with tasks already placed and running:
//! no over-commit (the state's own re-check refuses nothing and capacities hold), no constraint
//! broken, instance counts conserved, same seed → same plan, maximality against a naive reference,
//! and priority order.

mod common;

use capstan_model::spec::{ConstraintSpec, PlacementPolicy};
use capstan_model::{derive_id, JobKey, JobType, PortRange, TaskExit, TaskId, TaskState};
use capstan_placement::plan;
use capstan_state::Report;
use common::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

#[derive(Clone, Debug)]
struct AgentDesc {
    cpus_milli: u32,
    mem_mib: u64,
    disk_mib: u64,
    /// (offset from 31000, length); ranges may overlap.
    ranges: Vec<(u16, u16)>,
    rack: Option<u8>,
    pod: Option<u8>,
}

#[derive(Clone, Debug)]
enum ConsDesc {
    Equals(u8, u8),
    NotEquals(u8, u8),
    In(u8, Vec<u8>),
    Limit(u8, u32),
    DistinctHosts,
    Spread(u8),
}

#[derive(Clone, Debug)]
struct JobDesc {
    batch: bool,
    /// One instance per matching agent (wins over `batch`; keeps only value, not, in constraints).
    system: bool,
    instances: u32,
    cpus_milli: u32,
    mem_mib: u64,
    disk_mib: u64,
    ports: u32,
    constraints: Vec<ConsDesc>,
    priority: i32,
    production: bool,
    spread_policy: bool,
}

/// rack: r0..r4 on agents (r5 on none); pod: p0..p2 (p3 on none); zone: on no agent at all.
fn attribute(a: u8) -> &'static str {
    ["rack", "pod", "zone"][a as usize % 3]
}
fn value(a: u8, v: u8) -> String {
    match a % 3 {
        0 => format!("r{}", v % 6),
        1 => format!("p{}", v % 4),
        _ => format!("z{}", v % 2),
    }
}

fn agent_desc() -> impl Strategy<Value = AgentDesc> {
    (
        500u32..8000,
        512u64..16384,
        0u64..8192,
        prop::collection::vec((0u16..40, 1u16..8), 0..3),
        prop::option::weighted(0.85, 0u8..5),
        prop::option::weighted(0.85, 0u8..3),
    )
        .prop_map(|(cpus_milli, mem_mib, disk_mib, ranges, rack, pod)| AgentDesc {
            cpus_milli,
            mem_mib,
            disk_mib,
            ranges,
            rack,
            pod,
        })
}

fn cons_desc() -> impl Strategy<Value = ConsDesc> {
    prop_oneof![
        (0u8..3, 0u8..6).prop_map(|(a, v)| ConsDesc::Equals(a, v)),
        (0u8..3, 0u8..6).prop_map(|(a, v)| ConsDesc::NotEquals(a, v)),
        (0u8..3, prop::collection::vec(0u8..6, 1..3)).prop_map(|(a, vs)| ConsDesc::In(a, vs)),
        (0u8..3, 1u32..4).prop_map(|(a, n)| ConsDesc::Limit(a, n)),
        Just(ConsDesc::DistinctHosts),
        (0u8..3).prop_map(ConsDesc::Spread),
    ]
}

fn job_desc() -> impl Strategy<Value = JobDesc> {
    (
        (any::<bool>(), 1u32..30, prop::bool::weighted(0.2)),
        // Some demands fit nowhere (agents have at most 8 cpus, 16 GiB).
        prop_oneof![9 => 50u32..3000, 1 => Just(50_000u32)],
        prop_oneof![9 => 16u64..4096, 1 => Just(1u64 << 20)],
        prop_oneof![3 => Just(0u64), 1 => 1u64..2048],
        0u32..3,
        prop::collection::vec(cons_desc(), 0..3),
        (-3i32..4, prop::bool::weighted(0.3), any::<bool>()),
    )
        .prop_map(
            |(
                (batch, instances, system),
                cpus_milli,
                mem_mib,
                disk_mib,
                ports,
                constraints,
                (priority, production, spread_policy),
            )| {
                JobDesc {
                    batch,
                    system,
                    instances,
                    cpus_milli,
                    mem_mib,
                    disk_mib,
                    ports,
                    constraints,
                    priority,
                    production,
                    spread_policy,
                }
            },
        )
}

fn build_agent(id: u64, d: &AgentDesc) -> capstan_state::AgentInfo {
    let ranges =
        d.ranges.iter().map(|(off, len)| PortRange { first: 31000 + off, last: 31000 + off + len - 1 }).collect();
    let rack = d.rack.map(|r| format!("r{r}"));
    let pod = d.pod.map(|p| format!("p{p}"));
    let mut attrs: Vec<(&str, &str)> = vec![];
    if let Some(r) = &rack {
        attrs.push(("rack", r));
    }
    if let Some(p) = &pod {
        attrs.push(("pod", p));
    }
    agent_info(id, d.cpus_milli, d.mem_mib * MIB, d.disk_mib * MIB, ranges, &attrs)
}

fn build_job(d: &JobDesc) -> JobShape {
    let constraints: Vec<ConstraintSpec> = d
        .constraints
        .iter()
        .filter(|c| !d.system || matches!(c, ConsDesc::Equals(..) | ConsDesc::NotEquals(..) | ConsDesc::In(..)))
        .map(|c| match c {
            ConsDesc::Equals(a, v) => equals(attribute(*a), &value(*a, *v)),
            ConsDesc::NotEquals(a, v) => not_equals(attribute(*a), &value(*a, *v)),
            ConsDesc::In(a, vs) => {
                let vals: Vec<String> = vs.iter().map(|v| value(*a, *v)).collect();
                let refs: Vec<&str> = vals.iter().map(String::as_str).collect();
                in_set(attribute(*a), &refs)
            }
            ConsDesc::Limit(a, n) => limit(attribute(*a), *n),
            ConsDesc::DistinctHosts => distinct_hosts(),
            ConsDesc::Spread(a) => spread(attribute(*a)),
        })
        .collect();
    JobShape {
        job_type: match (d.system, d.batch) {
            (true, _) => JobType::System,
            (false, true) => JobType::Batch,
            (false, false) => JobType::Service,
        },
        instances: if d.system { 0 } else { d.instances },
        cpus_milli: d.cpus_milli,
        mem_bytes: d.mem_mib * MIB,
        disk_bytes: d.disk_mib * MIB,
        ports: d.ports,
        priority: d.priority,
        production: d.production,
        placement: if d.spread_policy { PlacementPolicy::Spread } else { PlacementPolicy::Binpack },
        constraints,
    }
}

/// Everything a correct plan must satisfy on the state it was planned from, checked against the
/// naive reference; then the plan is applied and the state's invariants checked again.
fn plan_and_check(c: &mut Cluster, seed: u64, limit: usize) -> Result<(), TestCaseError> {
    let now = c.now();
    let state = &c.state;
    let p = plan(state, now, seed, limit);
    prop_assert_eq!(&p, &plan(state, now, seed, limit), "same seed, same plan");
    check_plan_names(state, &p, now).map_err(TestCaseError::fail)?;
    prop_assert!(p.placements.len() + p.unplaced.len() <= limit);

    // Every placement fits on its agent given what the placements before it took.
    let mut held = Held::of(state);
    for pl in &p.placements {
        if let Err(why) = held.fits(state, pl.task, pl.agent) {
            return Err(TestCaseError::fail(format!("placement {pl:?} does not fit: {why}")));
        }
        held.add(state, pl.task, pl.agent, &pl.ports);
    }
    // Room the plan holds for production tasks waiting on their victims is taken too.
    for (agent, task) in &p.held {
        held.hold(state, *task, *agent);
    }

    // Maximality and priority, for tasks of jobs that did not ask for preemptions.
    let preempting: BTreeSet<JobKey> = p.preemptions.iter().map(|x| (*state.tasks[&x.by].job).clone()).collect();
    let order = |id: TaskId| {
        let t = &state.tasks[&id];
        (-i64::from(state.jobs[&t.job].spec.priority), state.jobs[&t.job].ord, t.seq)
    };
    for u in &p.unplaced {
        let t = &state.tasks[&u.task];
        if preempting.contains(&t.job) {
            continue;
        }
        if let Some(a) = held.fits_somewhere(state, u.task) {
            return Err(TestCaseError::fail(format!(
                "task {} of {} left unplaced ({}) but fits on agent {a} after the plan",
                u.task, t.job, u.why
            )));
        }
        // It did not fit even on what the tasks ahead of it in priority order had left.
        let ahead: Vec<_> = p.placements.iter().filter(|pl| order(pl.task) < order(u.task)).cloned().collect();
        let mut before = Held::with_plan(state, &ahead);
        for (agent, task) in p.held.iter().filter(|(_, task)| order(*task) < order(u.task)) {
            before.hold(state, *task, *agent);
        }
        if let Some(a) = before.fits_somewhere(state, u.task) {
            return Err(TestCaseError::fail(format!(
                "task {} (priority {}) left unplaced, but it fit on agent {a} before lower-priority tasks took it",
                u.task, state.jobs[&t.job].spec.priority
            )));
        }
    }
    // Preemptions name only non-production, lower-priority, live victims of production preemptors.
    for x in &p.preemptions {
        let v = &state.tasks[&x.victim];
        let by = &state.tasks[&x.by];
        let (vj, bj) = (&state.jobs[&v.job].spec, &state.jobs[&by.job].spec);
        prop_assert!(bj.production && !vj.production && vj.priority < bj.priority, "bad preemption {:?}", x);
        prop_assert!(v.state.holds_resources());
    }

    // Apply: the state's re-check refuses nothing; nothing is created or lost.
    let ids_before: BTreeSet<TaskId> = c.state.tasks.keys().copied().collect();
    let pending_before = c.state.pending.len();
    let applied = c.place(p.placements.clone());
    prop_assert_eq!(applied.placements_refused, 0, "apply refused placements of {:?}", p.placements);
    let ids_after: BTreeSet<TaskId> = c.state.tasks.keys().copied().collect();
    prop_assert_eq!(ids_before, ids_after, "placing created or lost tasks");
    prop_assert_eq!(c.state.pending.len(), pending_before - p.placements.len());
    for pl in &p.placements {
        prop_assert_eq!(c.state.tasks[&pl.task].state, TaskState::Assigned);
    }
    check_no_overcommit(&c.state).map_err(TestCaseError::fail)?;
    check_constraints(&c.state).map_err(TestCaseError::fail)?;
    check_counts(&c.state).map_err(TestCaseError::fail)?;
    if !p.preemptions.is_empty() {
        c.preempt(p.preemptions.clone());
    }
    Ok(())
}

/// Agents report on what they were given: most tasks start, some fail at once (a replacement with
/// a restart backoff follows), some stay assigned; stopping tasks end.
fn agents_react(c: &mut Cluster, rng: &mut u64) {
    for id in c.tasks_in(TaskState::Assigned) {
        *rng = derive_id(*rng);
        match *rng % 4 {
            0 | 1 => c.start(id),
            2 => {
                c.start(id);
                c.report(id, Report::Exited { exit: TaskExit::Exited { code: 1 } });
            }
            _ => {}
        }
    }
    *rng = derive_id(*rng);
    if rng.is_multiple_of(2) {
        c.finish_kills();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn plans_are_safe_maximal_and_deterministic(
        agents in prop::collection::vec(agent_desc(), 1..40),
        early in prop::collection::vec(job_desc(), 1..5),
        late in prop::collection::vec(job_desc(), 0..3),
        seed in any::<u64>(),
        small_limit in prop::option::weighted(0.2, 1usize..8),
    ) {
        let mut c = Cluster::new();
        for (i, a) in agents.iter().enumerate() {
            c.register(build_agent(i as u64 + 1, a));
        }
        for (i, j) in early.iter().enumerate() {
            c.create(&format!("team/prod/early{i}"), &build_job(j));
        }
        let mut rng = seed;
        // Warm up: some tasks placed, running, failed and waiting out a backoff.
        plan_and_check(&mut c, seed, 10_000)?;
        agents_react(&mut c, &mut rng);
        c.now_ms += (seed % 3) * 700;
        for (i, j) in late.iter().enumerate() {
            c.create(&format!("team/prod/late{i}"), &build_job(j));
        }
        check_counts(&c.state).map_err(TestCaseError::fail)?;
        for round in 0..3u64 {
            plan_and_check(&mut c, derive_id(seed ^ round), small_limit.unwrap_or(10_000))?;
            agents_react(&mut c, &mut rng);
            c.now_ms += 600;
            check_no_overcommit(&c.state).map_err(TestCaseError::fail)?;
            check_constraints(&c.state).map_err(TestCaseError::fail)?;
            check_counts(&c.state).map_err(TestCaseError::fail)?;
        }
    }
}

/// One agent, two tasks that cannot both fit: the higher priority one is placed, whatever the
/// creation order and seed.
#[test]
fn higher_priority_wins_the_last_room() {
    for seed in 0..20u64 {
        for high_first in [false, true] {
            let mut c = Cluster::new();
            c.register(agent_info(1, 1000, 1024 * MIB, 0, vec![], &[]));
            let mut low = JobShape::service(1, 700, 100 * MIB);
            low.priority = 1;
            let mut high = JobShape::service(1, 700, 100 * MIB);
            high.priority = 5;
            let (l, h) = if high_first {
                let h = c.create("team/prod/high", &high)[0];
                (c.create("team/prod/low", &low)[0], h)
            } else {
                let l = c.create("team/prod/low", &low)[0];
                (l, c.create("team/prod/high", &high)[0])
            };
            let p = plan(&c.state, c.now(), seed, 10);
            assert_eq!(p.placements.iter().map(|x| x.task).collect::<Vec<_>>(), vec![h], "seed {seed}");
            assert_eq!(p.unplaced.iter().map(|x| x.task).collect::<Vec<_>>(), vec![l]);
            assert!(p.unplaced[0].why.contains("lack cpus"), "{}", p.unplaced[0].why);
        }
    }
}

/// Ranges that overlap on one agent (`ports=31000-31005;31003-31008` is accepted at registration)
/// hold 9 ports, not 12: the plan must not promise more than exist.
#[test]
fn overlapping_port_ranges_are_counted_once() {
    let mut c = Cluster::new();
    let ranges = vec![PortRange { first: 31000, last: 31005 }, PortRange { first: 31003, last: 31008 }];
    c.register(agent_info(1, 64_000, 64 * 1024 * MIB, 0, ranges, &[]));
    let mut shape = JobShape::service(6, 100, MIB);
    shape.ports = 2;
    c.create("team/prod/web", &shape);
    let p = plan(&c.state, c.now(), 3, 100);
    let applied = c.place(p.placements.clone());
    assert_eq!(applied.placements_refused, 0, "{p:?}");
    assert_eq!(p.placements.len(), 4, "9 distinct ports hold 4 tasks of 2 ports");
    check_no_overcommit(&c.state).unwrap();
}
