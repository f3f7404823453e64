//! `plan` against a brute-force placer on small clusters (at most 4 agents, 7 tasks): the brute
//! force tries every assignment (each task on each agent, or nowhere) and finds the most tasks that
//! can be placed. For identical unconstrained tasks greedy is optimal and `plan` must reach the
//! optimum; in general `plan` must give a valid assignment that is maximal (no unplaced task fits
//! anywhere afterwards), and how often it falls below the optimum is printed, not asserted.

mod common;

use capstan_model::spec::{ConstraintSpec, PlacementPolicy};
use capstan_model::{JobType, PortRange, TaskId};
use capstan_placement::plan;
use capstan_state::ClusterState;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::cell::Cell;
use std::collections::BTreeSet;

/// The most of `tasks` that can be placed on top of `held`, by exhaustive search with a bound.
fn optimum(state: &ClusterState, tasks: &[TaskId], held: &Held) -> usize {
    fn go(state: &ClusterState, tasks: &[TaskId], held: &Held, placed: usize, best: &mut usize) {
        if placed + tasks.len() <= *best {
            return;
        }
        let Some((first, rest)) = tasks.split_first() else {
            *best = placed;
            return;
        };
        for agent in state.agents.keys() {
            if held.fits(state, *first, *agent).is_ok() {
                let mut next = held.clone();
                // The brute force counts ports; which ones does not matter. Invented port numbers
                // (above any real range) stand in for them.
                let n = state.jobs[&state.tasks[first].job].spec.task.ports.len();
                let cap_ports: BTreeSet<u16> =
                    state.agents[agent].info.capacity.ports.iter().flat_map(|r| r.first..=r.last).collect();
                let taken: BTreeSet<u16> = next.ports.get(agent).into_iter().flatten().copied().collect();
                let ports: Vec<u16> = cap_ports.difference(&taken).take(n).copied().collect();
                next.add(state, *first, *agent, &ports);
                go(state, rest, &next, placed + 1, best);
            }
        }
        go(state, rest, held, placed, best);
    }
    let mut best = 0;
    go(state, tasks, held, 0, &mut best);
    best
}

#[derive(Clone, Debug)]
struct SmallAgent {
    cpus_milli: u32,
    mem_mib: u64,
    ports: u8,
    rack: Option<u8>,
    pod: Option<u8>,
}

#[derive(Clone, Debug)]
struct SmallJob {
    instances: u32,
    cpus_milli: u32,
    mem_mib: u64,
    ports: u32,
    priority: i32,
    spread_policy: bool,
    constraints: Vec<ConstraintSpec>,
}

#[derive(Clone, Debug)]
struct Small {
    agents: Vec<SmallAgent>,
    jobs: Vec<SmallJob>,
    seed: u64,
}

fn small_constraint() -> impl Strategy<Value = ConstraintSpec> {
    prop_oneof![
        (0u8..3).prop_map(|v| equals("rack", &format!("r{v}"))),
        (0u8..3).prop_map(|v| not_equals("rack", &format!("r{v}"))),
        (0u8..2, 0u8..2).prop_map(|(a, b)| in_set("pod", &[&format!("p{a}"), &format!("p{b}")])),
        (1u32..3).prop_map(|n| limit("rack", n)),
        Just(distinct_hosts()),
        Just(spread("pod")),
    ]
}

fn build(s: &Small) -> (Cluster, Vec<TaskId>) {
    let mut c = Cluster::new();
    for (i, a) in s.agents.iter().enumerate() {
        let ranges =
            if a.ports == 0 { vec![] } else { vec![PortRange { first: 31000, last: 31000 + u16::from(a.ports) - 1 }] };
        let (r, p) = (a.rack.map(|r| format!("r{r}")), a.pod.map(|p| format!("p{p}")));
        let mut attrs: Vec<(&str, &str)> = vec![];
        if let Some(r) = &r {
            attrs.push(("rack", r));
        }
        if let Some(p) = &p {
            attrs.push(("pod", p));
        }
        c.register(agent_info(i as u64 + 1, a.cpus_milli, a.mem_mib * MIB, 0, ranges, &attrs));
    }
    let mut tasks = vec![];
    for (i, j) in s.jobs.iter().enumerate() {
        let shape = JobShape {
            job_type: JobType::Service,
            instances: j.instances,
            cpus_milli: j.cpus_milli,
            mem_bytes: j.mem_mib * MIB,
            disk_bytes: 0,
            ports: j.ports,
            priority: j.priority,
            production: false,
            placement: if j.spread_policy { PlacementPolicy::Spread } else { PlacementPolicy::Binpack },
            constraints: j.constraints.clone(),
        };
        tasks.extend(c.create(&format!("team/prod/j{i}"), &shape));
    }
    (c, tasks)
}

fn agents() -> impl Strategy<Value = Vec<SmallAgent>> {
    let agent =
        (500u32..4000, 256u64..4096, 0u8..4, prop::option::weighted(0.8, 0u8..3), prop::option::weighted(0.8, 0u8..2))
            .prop_map(|(cpus_milli, mem_mib, ports, rack, pod)| SmallAgent { cpus_milli, mem_mib, ports, rack, pod });
    prop::collection::vec(agent, 1..=4)
}

/// Identical, unconstrained tasks: greedy is optimal, so `plan` places exactly the optimum.
#[test]
fn identical_unconstrained_tasks_reach_the_optimum() {
    let strategy = (agents(), 1u32..=7, 200u32..2500, 64u64..2048, 0u32..3, any::<bool>(), any::<u64>()).prop_map(
        |(agents, n, cpus, mem, ports, spread_policy, seed)| Small {
            agents,
            jobs: vec![SmallJob {
                instances: n,
                cpus_milli: cpus,
                mem_mib: mem,
                ports,
                priority: 0,
                spread_policy,
                constraints: vec![],
            }],
            seed,
        },
    );
    let mut runner = TestRunner::new(Config { cases: 1000, failure_persistence: None, ..Config::default() });
    runner
        .run(&strategy, |s| {
            let (mut c, tasks) = build(&s);
            let best = optimum(&c.state, &tasks, &Held::of(&c.state));
            let p = plan(&c.state, c.now(), s.seed, 100);
            prop_assert_eq!(p.placements.len(), best, "plan {:?}", p);
            prop_assert_eq!(c.place(p.placements).placements_refused, 0);
            Ok(())
        })
        .unwrap();
}

/// Any small problem: `plan` is valid and maximal; how often it is below the optimum is printed.
#[test]
fn plan_is_valid_and_maximal_against_brute_force() {
    let job =
        (
            1u32..=3,
            200u32..2500,
            64u64..2048,
            0u32..3,
            0i32..3,
            any::<bool>(),
            prop::collection::vec(small_constraint(), 0..3),
        )
            .prop_map(|(instances, cpus_milli, mem_mib, ports, priority, spread_policy, constraints)| {
                SmallJob { instances, cpus_milli, mem_mib, ports, priority, spread_policy, constraints }
            });
    let jobs = prop::collection::vec(job, 1..=3);
    let strategy = (agents(), jobs, any::<u64>()).prop_map(|(agents, jobs, seed)| Small { agents, jobs, seed });
    let mut runner = TestRunner::new(Config { cases: 2000, failure_persistence: None, ..Config::default() });
    // (cases, below the optimum, tasks short in all, largest gap)
    let stats = Cell::new((0u32, 0u32, 0usize, 0usize));
    runner
        .run(&strategy, |s| {
            let (mut c, tasks) = build(&s);
            prop_assume!(tasks.len() <= 7);
            let best = optimum(&c.state, &tasks, &Held::of(&c.state));
            let p = plan(&c.state, c.now(), s.seed, 100);
            prop_assert!(p.preemptions.is_empty());
            // Valid: each placement fits on what the earlier ones left.
            let mut held = Held::of(&c.state);
            for pl in &p.placements {
                held.fits(&c.state, pl.task, pl.agent).map_err(|why| TestCaseError::fail(format!("{pl:?}: {why}")))?;
                held.add(&c.state, pl.task, pl.agent, &pl.ports);
            }
            // Maximal: no unplaced task fits anywhere after the plan.
            for u in &p.unplaced {
                prop_assert!(held.fits_somewhere(&c.state, u.task).is_none(), "{} left unplaced but fits", u.task);
            }
            // Every task is placed, unplaced with a reason, or of a job that fits nowhere (whose
            // other tasks the pass skipped) — and those fit nowhere either.
            for t in &tasks {
                let named = p.placements.iter().any(|x| x.task == *t) || p.unplaced.iter().any(|x| x.task == *t);
                let job = &c.state.tasks[t].job;
                let skipped = p.unplaced_jobs.iter().any(|(j, _)| *j == **job);
                prop_assert!(named || skipped, "task {} neither placed nor explained", t);
                if !named {
                    prop_assert!(held.fits_somewhere(&c.state, *t).is_none(), "{} skipped but fits", t);
                }
            }
            prop_assert!(p.placements.len() <= best);
            let (cases, below, missed, gap) = stats.get();
            let short = best - p.placements.len();
            stats.set((cases + 1, below + u32::from(short > 0), missed + short, gap.max(short)));
            let applied = c.place(p.placements);
            prop_assert_eq!(applied.placements_refused, 0);
            check_constraints(&c.state).map_err(TestCaseError::fail)?;
            Ok(())
        })
        .unwrap();
    let (cases, below, missed, gap) = stats.get();
    println!(
        "greedy vs brute force: below the optimum in {below} of {cases} small problems ({:.1}%), \
         {missed} tasks short in all, at most {gap} short in one",
        100.0 * f64::from(below) / f64::from(cases.max(1)),
    );
}
