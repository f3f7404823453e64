//! Spread over a fault domain: instances of a job with `spread = "rack"` go evenly over the racks,
//! even where bin-packing alone would fill one rack first; and `placement = "spread"` prefers the
//! emptiest agents.

mod common;

use capstan_model::spec::PlacementPolicy;
use capstan_placement::plan;
use common::*;
use std::collections::BTreeMap;

const GIB: u64 = 1024 * MIB;

/// 3 racks × 4 agents; rack r0's agents are bigger, so bin-packing alone would favour them.
fn cluster() -> Cluster {
    let mut c = Cluster::new();
    for id in 1..=12u64 {
        let rack = format!("r{}", (id - 1) / 4);
        let cpus = if rack == "r0" { 16_000 } else { 4_000 };
        c.register(agent_info(id, cpus, 64 * GIB, 64 * GIB, vec![], &[("rack", &rack)]));
    }
    c
}

fn per_rack(c: &Cluster) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for t in c.state.tasks.values().filter(|t| t.state.holds_resources()) {
        let agent = &c.state.agents[&t.agent.expect("placed")];
        *out.entry(agent.info.attributes["rack"].clone()).or_default() += 1;
    }
    out
}

#[test]
fn instances_spread_evenly_over_racks_in_one_pass_and_over_many() {
    for seed in 0..20 {
        let mut c = cluster();
        let shape = JobShape { constraints: vec![spread("rack")], ..JobShape::service(9, 500, GIB) };
        c.create("www/prod/spread", &shape);
        let p = plan(&c.state, c.now(), seed, 1000);
        assert_eq!(p.placements.len(), 9);
        assert_eq!(c.place(p.placements).placements_refused, 0);
        let racks = per_rack(&c);
        assert_eq!(racks.values().copied().collect::<Vec<_>>(), vec![3, 3, 3], "seed {seed}: {racks:?}");
    }
    // Placed a few at a time (limit 2 per pass), the spread still evens out.
    let mut c = cluster();
    let shape = JobShape { constraints: vec![spread("rack")], ..JobShape::service(12, 500, GIB) };
    c.create("www/prod/spread", &shape);
    for seed in 0..6 {
        let p = plan(&c.state, c.now(), seed, 2);
        assert_eq!(c.place(p.placements).placements_refused, 0);
    }
    assert_eq!(per_rack(&c).values().copied().collect::<Vec<_>>(), vec![4, 4, 4]);
}

#[test]
fn binpack_fills_agents_and_spread_policy_prefers_empty_ones() {
    let mut c = cluster();
    let packed = JobShape::service(4, 1_000, GIB);
    c.create("www/prod/packed", &packed);
    let p = plan(&c.state, c.now(), 7, 1000);
    assert_eq!(c.place(p.placements.clone()).placements_refused, 0);
    let agents: std::collections::BTreeSet<_> = p.placements.iter().map(|x| x.agent).collect();
    assert!(agents.len() <= 2, "bin-pack used {} agents for 4 small tasks", agents.len());

    let mut c = cluster();
    let spread_out = JobShape { placement: PlacementPolicy::Spread, ..JobShape::service(4, 1_000, GIB) };
    c.create("www/prod/spread-out", &spread_out);
    let p = plan(&c.state, c.now(), 7, 1000);
    let agents: std::collections::BTreeSet<_> = p.placements.iter().map(|x| x.agent).collect();
    assert_eq!(agents.len(), 4, "spread put 4 tasks on {} agents", agents.len());
}
