//! Scale smoke test: one `plan` pass over 100,000 pending tasks of 10 jobs with a limit of 10,000,
//! on 1,000 and on 10,000 agents. It prints the times and asserts nothing about them; it checks
//! that the cost per task stays flat as the cluster grows (candidate sampling) and that the plan is
//! accepted whole. Slow in a debug build, hence ignored there; run it with
//! `cargo test -p capstan-placement --release --test scale -- --ignored --nocapture`.

mod common;

use capstan_model::spec::PlacementPolicy;
use capstan_model::PortRange;
use capstan_placement::plan;
use common::*;
use std::time::Instant;

const GIB: u64 = 1024 * MIB;
const TASKS_PER_JOB: u32 = 10_000;
const LIMIT: usize = 10_000;

fn cluster(agents: u64) -> Cluster {
    let mut c = Cluster::new();
    for i in 0..agents {
        let (rack, pod) = (format!("r{}", i % 40), format!("p{}", i % 3));
        let ports = vec![PortRange { first: 31000, last: 31999 }];
        c.register(agent_info(i + 1, 32_000, 128 * GIB, 1024 * GIB, ports, &[("rack", &rack), ("pod", &pod)]));
    }
    for j in 0..10u32 {
        let mut shape = JobShape::service(TASKS_PER_JOB, 100 + 50 * j, (64 + 32 * u64::from(j)) * MIB);
        shape.ports = j % 3;
        shape.priority = (j % 4) as i32;
        shape.placement = if j % 2 == 0 { PlacementPolicy::Binpack } else { PlacementPolicy::Spread };
        shape.constraints = match j {
            0 => vec![spread("rack")],
            1 => vec![not_equals("pod", "p0")],
            2 => vec![in_set("rack", &["r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8"])],
            3 => vec![limit("rack", 400)],
            _ => vec![],
        };
        c.create(&format!("team/prod/job{j}"), &shape);
    }
    c
}

fn one_pass(agents: u64) -> f64 {
    let t = Instant::now();
    let mut c = cluster(agents);
    let built = t.elapsed();
    assert_eq!(c.state.pending.len(), 10 * TASKS_PER_JOB as usize);
    let t = Instant::now();
    let p = plan(&c.state, c.now(), 42, LIMIT);
    let took = t.elapsed();
    let per_task_us = took.as_secs_f64() * 1e6 / p.placements.len().max(1) as f64;
    println!(
        "{agents:>6} agents, {} pending: plan placed {} (unplaced {}) in {:.1} ms = {per_task_us:.2} µs per placed task \
         (building the state took {:.2} s)",
        c.state.pending.len(),
        p.placements.len(),
        p.unplaced.len(),
        took.as_secs_f64() * 1e3,
        built.as_secs_f64(),
    );
    assert_eq!(p.placements.len() + p.unplaced.len(), LIMIT);
    let applied = c.place(p.placements);
    assert_eq!(applied.placements_refused, 0);
    per_task_us
}

#[test]
#[ignore = "slow in debug builds; run with --release -- --ignored --nocapture"]
fn plan_cost_per_task_stays_flat_from_1k_to_10k_agents() {
    let small = one_pass(1_000);
    let large = one_pass(10_000);
    println!("cost per placed task, 10,000 agents / 1,000 agents: {:.2}x", large / small);
}

/// Every pass after the first: plan 10,000, apply, until nothing more is placed. Each pass meets
/// another job (another constraint kind) and fuller agents.
fn drain(agents: u64) {
    let mut c = cluster(agents);
    let mut line = Vec::new();
    for pass in 0..12u64 {
        let t = Instant::now();
        let p = plan(&c.state, c.now(), pass, LIMIT);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        line.push(format!("{ms:.0}ms/{}", p.placements.len()));
        let placed = p.placements.len();
        assert_eq!(c.place(p.placements).placements_refused, 0);
        if placed == 0 {
            break;
        }
    }
    println!("{agents:>6} agents, draining 100,000 tasks 10,000 a pass (time/placed): {}", line.join(" "));
}

#[test]
#[ignore = "slow in debug builds; run with --release -- --ignored --nocapture"]
fn draining_the_queue_pass_by_pass() {
    drain(1_000);
    drain(10_000);
}
