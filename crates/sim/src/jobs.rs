//! The jobs a placement benchmark submits: services of `sim:run` tasks sized so that the tasks
//! fill the simulated agents, optionally with a mix of placement constraints.

use capstan_model::Capacity;
use serde_json::{json, Value};

#[derive(Clone, Debug)]
pub struct JobMix {
    /// Job keys are `bench/placement/{run}-{j}`.
    pub run: String,
    pub jobs: u32,
    pub tasks: u64,
    pub cpus_milli: u32,
    pub mem_bytes: u64,
    /// Adds a mix of constraints (see [`constraints_of`]).
    pub constraints: bool,
    pub racks: u32,
    pub pods: u32,
}

/// Per-task (millicpus, memory bytes) so that `slots` tasks fill one agent of `capacity`.
pub fn task_size_for(capacity: &Capacity, slots: u64) -> (u32, u64) {
    let slots = slots.max(1);
    let cpus_milli = (u64::from(capacity.cpus_milli) / slots).max(1) as u32;
    let mem_bytes = (capacity.mem_bytes / slots).max(4 << 20);
    (cpus_milli, mem_bytes)
}

/// Slots per agent for `tasks` on `agents`: an even share, plus a quarter of slack when
/// constraints take some agents out for some jobs.
pub fn slots_per_agent(tasks: u64, agents: u64, constraints: bool) -> u64 {
    let agents = agents.max(1);
    let share = tasks.div_ceil(agents);
    if constraints {
        (share * 5).div_ceil(4)
    } else {
        share
    }
}

/// Instances of job `j`: `tasks` split as evenly as possible.
pub fn instances_of(mix: &JobMix, j: u32) -> u64 {
    let jobs = u64::from(mix.jobs.max(1));
    mix.tasks / jobs + u64::from(u64::from(j) < mix.tasks % jobs)
}

/// Job `j % 4`: 0 avoids rack r0; 1 puts at most L instances per rack (L = max(50, twice an even
/// share), so it stays satisfiable); 2 wants dc1 and a pod other than p0; 3 has none.
pub fn constraints_of(mix: &JobMix, j: u32) -> Vec<Value> {
    if !mix.constraints {
        return vec![];
    }
    match j % 4 {
        0 => vec![json!({"attribute": "rack", "not": "r0"})],
        1 => {
            let limit = instances_of(mix, j).div_ceil(u64::from(mix.racks.max(1))).saturating_mul(2).max(50);
            vec![json!({"attribute": "rack", "limit": limit.min(100_000)})]
        }
        2 => {
            let pods: Vec<String> =
                if mix.pods > 1 { (1..mix.pods).map(|p| format!("p{p}")).collect() } else { vec!["p0".into()] };
            vec![json!({"attribute": "dc", "value": "dc1"}), json!({"attribute": "pod", "in": pods})]
        }
        _ => vec![],
    }
}

pub fn job_key(mix: &JobMix, j: u32) -> String {
    format!("bench/placement/{}-{j}", mix.run)
}

/// The API body of job `j`.
pub fn job_spec(mix: &JobMix, j: u32) -> Value {
    let mut spec = json!({
        "job": job_key(mix, j),
        "type": "service",
        "instances": instances_of(mix, j),
        "task": {
            "command": "sim:run",
            "user": "nobody",
            "cpus": f64::from(mix.cpus_milli) / 1000.0,
            "mem": format!("{}B", mix.mem_bytes),
            "disk": "1MiB",
        },
    });
    let constraints = constraints_of(mix, j);
    if !constraints.is_empty() {
        spec["constraint"] = Value::Array(constraints);
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix(tasks: u64, jobs: u32, constraints: bool) -> JobMix {
        JobMix { run: "t".into(), jobs, tasks, cpus_milli: 80, mem_bytes: 64 << 20, constraints, racks: 10, pods: 4 }
    }

    #[test]
    fn instances_add_up() {
        let m = mix(100_003, 11, false);
        assert_eq!((0..11).map(|j| instances_of(&m, j)).sum::<u64>(), 100_003);
    }

    #[test]
    fn sizes_fill_agents() {
        let c = crate::fleet::FleetConfig::capacity_from(None).unwrap();
        let slots = slots_per_agent(1_000_000, 10_000, false);
        assert_eq!(slots, 100);
        let (cpus, mem) = task_size_for(&c, slots);
        assert_eq!(cpus, 80);
        assert!(mem * 100 <= c.mem_bytes && mem * 101 > c.mem_bytes);
        assert_eq!(slots_per_agent(10, 1000, false), 1);
        assert_eq!(slots_per_agent(1_000_000, 10_000, true), 125);
    }

    #[test]
    fn specs_are_valid_job_bodies() {
        let policy = capstan_model::ValidationPolicy::default();
        let plain = job_spec(&mix(1000, 2, false), 1);
        capstan_model::parse_json(&plain.to_string(), &policy).expect("a valid job");
        assert!(plain.get("constraint").is_none());
        let m = mix(1000, 4, true);
        let kinds: Vec<usize> = (0..4).map(|j| constraints_of(&m, j).len()).collect();
        assert_eq!(kinds, vec![1, 1, 2, 0]);
        assert_eq!(constraints_of(&m, 1)[0]["limit"], 50);
    }
}
