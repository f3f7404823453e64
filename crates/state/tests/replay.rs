//! Random histories of the cluster, applied through `ClusterState::apply`, with the state's
//! invariants checked after every command and replay checked at the end: the same log gives the
//! same bytes, from the start or from a snapshot taken anywhere.
//!
//! Commands are built from the state as it is at that moment (a first-fit placer, status updates
//! for tasks that are on agents), and some are wrong on purpose (over-commits, ports taken twice,
//! duplicate sequence numbers, unknown ids) to check that apply refuses them and changes nothing.

mod common;

use capstan_model::{AgentId, JobKey, PortRange, TaskExit, TaskId, TaskState};
use capstan_state::{
    decode_command, decode_snapshot, encode_command, encode_snapshot, ClusterState, Command, Placement, Report,
    Stamped, StatusUpdate,
};
use common::{agent_info, stamped, JobShape, MIB};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const AGENTS_MAX: u64 = 4;
const JOBS_MAX: u8 = 5;

/// One step of a history, before it is turned into a command against the current state.
#[derive(Clone, Debug)]
enum Op {
    /// A leadership term: `back` 0 begins one above the last, more is a stale epoch.
    BeginTerm {
        back: u64,
    },
    RegisterAgent {
        id: u64,
        cpus_milli: u32,
        mem_mib: u64,
        disk_mib: u64,
        port_first: u16,
        port_count: u16,
        split: bool,
    },
    /// The same agent again, same capacity, new address and version (an agent restart).
    ReRegister {
        pick: usize,
    },
    CreateJob {
        name: u8,
        batch: bool,
        /// A system job (one instance per matching agent); wins over `batch`.
        system: bool,
        instances: u32,
        max_failures: u32,
        cpus_milli: u32,
        mem_mib: u64,
        disk_mib: u64,
        ports: u32,
        seed: u64,
    },
    /// First-fit every pending task that may be placed now.
    PlaceFirstFit,
    /// First-fit without counting what this very plan already took: apply must refuse what no longer fits.
    PlaceNaive,
    /// One placement that must be refused.
    PlaceBad {
        pick: usize,
        how: BadPlacement,
    },
    Updates {
        agent_pick: usize,
        updates: Vec<(usize, ReportKind)>,
        duplicate: bool,
    },
    /// An update for a task that the agent does not run.
    UpdateUnknown {
        agent_pick: usize,
        task: u64,
    },
    KillTask {
        pick: usize,
        unknown: bool,
    },
    KillJob {
        name: u8,
    },
    /// One slice of a kill, from an instance, of at most a few instances (a cursor may be stale).
    KillJobSlice {
        name: u8,
        from_instance: u32,
        instances_max: u32,
    },
    /// One slice of forgetting (refused unless the job is over).
    ForgetJobSlice {
        name: u8,
        instances_max: u32,
    },
    Wait {
        ms: u64,
    },
    /// The agent stopped answering.
    Unreachable {
        agent_pick: usize,
    },
    /// A removal step (refused unless the agent is unreachable and the cluster not frozen).
    Remove {
        agent_pick: usize,
    },
    /// The agent says what it has: a subset of what the master put there (kept by `keep`, a bit
    /// mask over them), maybe a task the master never heard of, maybe with a stale list.
    Reconcile {
        agent_pick: usize,
        keep: u64,
        unknown: Option<u64>,
        stale: bool,
    },
    Freeze {
        on: bool,
    },
    /// A run of a cron job: for the next fire time after the latest handled one, or by hand.
    CronRun {
        name: u8,
        scheduled: bool,
        seed: u64,
    },
    /// Drain (or undrain) an agent.
    Drain {
        agent_pick: usize,
        on: bool,
    },
    /// One step of the drain loop, as the drain plan says.
    DrainStep,
    /// Drain moves of arbitrary tasks: apply must keep only those that may move.
    DrainMovesAny {
        picks: Vec<usize>,
    },
    MarkDrained {
        agent_pick: usize,
    },
    Maintenance {
        agent_pick: usize,
        start_offset_s: i64,
        duration_s: u64,
    },
    CancelMaintenance {
        pick: usize,
        unknown: bool,
    },
    /// A rolling update of a job: maybe a new task spec, maybe another instance count.
    StartUpdate {
        name: u8,
        instances: u32,
        change: bool,
        batch_size: u32,
        canaries: u32,
    },
    /// The updater's step, sent only when it would change something (as the master does).
    UpdateStep {
        name: u8,
    },
    /// promote, pause, resume, abort, rollback.
    UpdateControl {
        name: u8,
        action: u8,
    },
}

#[derive(Clone, Copy, Debug)]
enum BadPlacement {
    /// On an agent where it does not fit.
    OverCommit,
    /// A port another task holds on that agent.
    TakenPort,
    /// A port outside the agent's ranges.
    PortOutOfRange,
    /// The same port twice in one placement.
    SamePortTwice,
    /// One port too many.
    WrongPortCount,
    UnknownAgent,
    UnknownTask,
    /// A task that is not pending.
    NotPending,
}

#[derive(Clone, Copy, Debug)]
enum ReportKind {
    Starting,
    Running,
    Exited(i32),
    Killed,
    Signaled,
}

fn op() -> impl Strategy<Value = Op> {
    let register = (1..=AGENTS_MAX, 500u32..4000, 64u64..2048, 0u64..2048, 31000u16..31100, 0u16..6, any::<bool>())
        .prop_map(|(id, cpus_milli, mem_mib, disk_mib, port_first, port_count, split)| Op::RegisterAgent {
            id,
            cpus_milli,
            mem_mib,
            disk_mib,
            port_first,
            port_count,
            split,
        });
    let create = (
        (0..JOBS_MAX, any::<bool>(), prop::bool::weighted(0.25)),
        1u32..5,
        0u32..3,
        100u32..1500,
        4u64..600,
        0u64..600,
        0u32..3,
        any::<u64>(),
    )
        .prop_map(
            |((name, batch, system), instances, max_failures, cpus_milli, mem_mib, disk_mib, ports, seed)| {
                Op::CreateJob {
                    name,
                    batch,
                    system,
                    instances,
                    max_failures,
                    cpus_milli,
                    mem_mib,
                    disk_mib,
                    ports,
                    seed,
                }
            },
        );
    let bad = prop_oneof![
        Just(BadPlacement::OverCommit),
        Just(BadPlacement::TakenPort),
        Just(BadPlacement::PortOutOfRange),
        Just(BadPlacement::SamePortTwice),
        Just(BadPlacement::WrongPortCount),
        Just(BadPlacement::UnknownAgent),
        Just(BadPlacement::UnknownTask),
        Just(BadPlacement::NotPending),
    ];
    let report = prop_oneof![
        3 => Just(ReportKind::Starting),
        4 => Just(ReportKind::Running),
        3 => (0i32..4).prop_map(ReportKind::Exited),
        2 => Just(ReportKind::Killed),
        1 => Just(ReportKind::Signaled),
    ];
    prop_oneof![
        3 => register,
        1 => any::<usize>().prop_map(|pick| Op::ReRegister { pick }),
        3 => create,
        5 => Just(Op::PlaceFirstFit),
        1 => Just(Op::PlaceNaive),
        2 => (any::<usize>(), bad).prop_map(|(pick, how)| Op::PlaceBad { pick, how }),
        8 => (any::<usize>(), prop::collection::vec((any::<usize>(), report), 1..4), prop::bool::weighted(0.15))
            .prop_map(|(agent_pick, updates, duplicate)| Op::Updates { agent_pick, updates, duplicate }),
        1 => (any::<usize>(), any::<u64>()).prop_map(|(agent_pick, task)| Op::UpdateUnknown { agent_pick, task }),
        2 => (any::<usize>(), prop::bool::weighted(0.1)).prop_map(|(pick, unknown)| Op::KillTask { pick, unknown }),
        1 => (0..JOBS_MAX).prop_map(|name| Op::KillJob { name }),
        1 => (0..JOBS_MAX, 0u32..4, 0u32..3).prop_map(|(name, from_instance, instances_max)| Op::KillJobSlice {
            name,
            from_instance,
            instances_max
        }),
        1 => (0..JOBS_MAX, 0u32..3).prop_map(|(name, instances_max)| Op::ForgetJobSlice { name, instances_max }),
        2 => (0u64..30_000).prop_map(|ms| Op::Wait { ms }),
        1 => any::<usize>().prop_map(|agent_pick| Op::Unreachable { agent_pick }),
        1 => any::<usize>().prop_map(|agent_pick| Op::Remove { agent_pick }),
        2 => (any::<usize>(), any::<u64>(), prop::option::weighted(0.2, any::<u64>()), prop::bool::weighted(0.2))
            .prop_map(|(agent_pick, keep, unknown, stale)| Op::Reconcile { agent_pick, keep, unknown, stale }),
        1 => any::<bool>().prop_map(|on| Op::Freeze { on }),
        1 => (0u64..3).prop_map(|back| Op::BeginTerm { back }),
        3 => (0..JOBS_MAX, any::<bool>(), any::<u64>())
            .prop_map(|(name, scheduled, seed)| Op::CronRun { name, scheduled, seed }),
        1 => (any::<usize>(), prop::bool::weighted(0.7)).prop_map(|(agent_pick, on)| Op::Drain { agent_pick, on }),
        2 => Just(Op::DrainStep),
        1 => prop::collection::vec(any::<usize>(), 1..4).prop_map(|picks| Op::DrainMovesAny { picks }),
        1 => any::<usize>().prop_map(|agent_pick| Op::MarkDrained { agent_pick }),
        1 => (any::<usize>(), -7200i64..7200, 0u64..7200).prop_map(|(agent_pick, start_offset_s, duration_s)| {
            Op::Maintenance { agent_pick, start_offset_s, duration_s }
        }),
        1 => (any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(pick, unknown)| Op::CancelMaintenance { pick, unknown }),
        2 => (0..JOBS_MAX, 1u32..5, any::<bool>(), 1u32..3, 0u32..2).prop_map(|(name, instances, change, batch_size, canaries)| {
            Op::StartUpdate { name, instances, change, batch_size, canaries }
        }),
        4 => (0..JOBS_MAX).prop_map(|name| Op::UpdateStep { name }),
        1 => (0..JOBS_MAX, 0u8..5).prop_map(|(name, action)| Op::UpdateControl { name, action }),
    ]
}

fn job_key(name: u8) -> JobKey {
    format!("app/test/job{name}").parse().unwrap()
}

fn pick<T: Clone>(items: &[T], i: usize) -> Option<T> {
    (!items.is_empty()).then(|| items[i % items.len()].clone())
}

/// What one command should do, beyond the invariants that always hold.
#[derive(Debug, Default)]
struct Expect {
    /// The command must be refused as a whole.
    rejected: bool,
    /// Every placement in the command must take.
    all_placed: bool,
    /// The one placement in the command must be refused, and its task must stay pending.
    placement_refused: Option<TaskId>,
    /// This many of the updates are duplicates (seq already seen).
    duplicates: u64,
}

/// Free ports of an agent, lowest first, leaving out `taken`.
fn free_ports(state: &ClusterState, agent: AgentId, taken: &BTreeSet<u16>) -> Vec<u16> {
    let a = &state.agents[&agent];
    a.info
        .capacity
        .ports
        .iter()
        .flat_map(|r| r.first..=r.last)
        .filter(|p| !a.used_ports.contains(p) && !taken.contains(p))
        .collect()
}

/// A reference first-fit placer, computed from the state alone. With `count_plan` false it forgets
/// what earlier placements of the same plan took (so some of its placements must be refused).
fn first_fit(state: &ClusterState, now: u64, count_plan: bool) -> Vec<Placement> {
    let mut used: BTreeMap<AgentId, (u64, u64, u64, BTreeSet<u16>)> = state
        .agents
        .iter()
        .map(|(id, a)| (*id, (u64::from(a.used.cpus_milli), a.used.mem_bytes, a.used.disk_bytes, BTreeSet::new())))
        .collect();
    let mut out = Vec::new();
    for id in &state.pending {
        let task = &state.tasks[id];
        if task.not_before.0 > now {
            continue;
        }
        let job = &state.jobs[&task.job];
        // A job being killed in slices keeps pending tasks until its slice stops them.
        if job.killed.is_some() {
            continue;
        }
        let spec = &job.spec.task;
        let job_type = job.spec.job_type;
        // A system task goes on its own agent only.
        let pinned = job.pinned_agent(task.instance);
        let allowed = |id: &AgentId| state.maintenance_allows(*id, job_type, capstan_model::Timestamp(now));
        for (agent_id, agent) in state
            .agents
            .iter()
            .filter(|(id, a)| a.schedulable() && allowed(id) && (!job.is_system() || pinned == Some(**id)))
        {
            let (cpus, mem, disk, plan_ports) = used.get(agent_id).cloned().unwrap();
            let cap = &agent.info.capacity;
            let free = free_ports(state, *agent_id, &plan_ports);
            if cpus + u64::from(spec.cpus_milli) > u64::from(cap.cpus_milli)
                || mem + spec.mem.0 > cap.mem_bytes
                || disk + spec.disk.0 > cap.disk_bytes
                || free.len() < spec.ports.len()
            {
                continue;
            }
            let ports: Vec<u16> = free[..spec.ports.len()].to_vec();
            if count_plan {
                let u = used.get_mut(agent_id).unwrap();
                u.0 += u64::from(spec.cpus_milli);
                u.1 += spec.mem.0;
                u.2 += spec.disk.0;
                u.3.extend(ports.iter().copied());
            }
            out.push(Placement { task: *id, agent: *agent_id, ports });
            break;
        }
    }
    out
}

/// A placement that apply must refuse, or None when the state offers no way to build one.
fn bad_placement(state: &ClusterState, i: usize, how: BadPlacement) -> Option<Placement> {
    let pending: Vec<TaskId> = state.pending.iter().copied().collect();
    let agents: Vec<AgentId> = state.agents.keys().copied().collect();
    let demand_of = |t: TaskId| state.jobs[&state.tasks[&t].job].spec.task.demand();
    let task = pick(&pending, i);
    let agent = pick(&agents, i / 7);
    match how {
        BadPlacement::OverCommit => {
            let task = task?;
            let d = demand_of(task);
            let agent = agents.iter().copied().find(|a| !state.agents[a].fits(&d))?;
            let ports = free_ports(state, agent, &BTreeSet::new()).into_iter().take(d.ports as usize).collect();
            Some(Placement { task, agent, ports })
        }
        BadPlacement::TakenPort => {
            let task = pending.iter().copied().find(|t| demand_of(*t).ports > 0)?;
            let d = demand_of(task);
            let agent = agents.iter().copied().find(|a| !state.agents[a].used_ports.is_empty())?;
            let taken = *state.agents[&agent].used_ports.iter().next().unwrap();
            let mut ports = vec![taken];
            ports.extend(free_ports(state, agent, &BTreeSet::new()).into_iter().take(d.ports as usize - 1));
            (ports.len() == d.ports as usize).then_some(Placement { task, agent, ports })
        }
        BadPlacement::PortOutOfRange => {
            let task = pending.iter().copied().find(|t| demand_of(*t).ports > 0)?;
            let d = demand_of(task);
            let agent = agent?;
            // Agents' ranges lie within 31000..31200; port 80 never does.
            let mut ports = vec![80];
            ports.extend(free_ports(state, agent, &BTreeSet::new()).into_iter().take(d.ports as usize - 1));
            (ports.len() == d.ports as usize).then_some(Placement { task, agent, ports })
        }
        BadPlacement::SamePortTwice => {
            let task = pending.iter().copied().find(|t| demand_of(*t).ports >= 2)?;
            let agent = agent?;
            let free = free_ports(state, agent, &BTreeSet::new());
            let p = *free.first()?;
            let mut ports = vec![p; 2];
            ports.extend(free.iter().skip(1).take(demand_of(task).ports as usize - 2));
            Some(Placement { task, agent, ports })
        }
        BadPlacement::WrongPortCount => {
            let task = task?;
            let agent = agent?;
            let want = demand_of(task).ports as usize + 1;
            let ports: Vec<u16> = free_ports(state, agent, &BTreeSet::new()).into_iter().take(want).collect();
            (ports.len() == want).then_some(Placement { task, agent, ports })
        }
        BadPlacement::UnknownAgent => {
            let task = task?;
            let ports = (0..demand_of(task).ports as u16).map(|p| 31000 + p).collect();
            Some(Placement { task, agent: AgentId(999), ports })
        }
        BadPlacement::UnknownTask => Some(Placement { task: TaskId(0xdead), agent: agent?, ports: vec![] }),
        BadPlacement::NotPending => {
            let ids: Vec<TaskId> =
                state.tasks.values().filter(|t| t.state != TaskState::Pending).map(|t| t.id).collect();
            let task = pick(&ids, i)?;
            let agent = agent?;
            let ports =
                free_ports(state, agent, &BTreeSet::new()).into_iter().take(demand_of(task).ports as usize).collect();
            Some(Placement { task, agent, ports })
        }
    }
}

fn report(kind: ReportKind, seq: u64) -> Report {
    match kind {
        ReportKind::Starting => Report::Starting,
        ReportKind::Running => Report::Running { pid: 1000 + seq as u32 },
        ReportKind::Exited(code) => Report::Exited { exit: TaskExit::Exited { code } },
        ReportKind::Killed => Report::Exited { exit: TaskExit::Killed { by: "agent".into() } },
        ReportKind::Signaled => Report::Exited { exit: TaskExit::Signaled { signal: 9 } },
    }
}

/// Turns one op into a command against the current state; None when the state offers nothing to do.
fn command(state: &ClusterState, now: u64, op: &Op) -> Option<(Command, Expect)> {
    let agents: Vec<AgentId> = state.agents.keys().copied().collect();
    let mut expect = Expect::default();
    let command = match op {
        Op::RegisterAgent { id, cpus_milli, mem_mib, disk_mib, port_first, port_count, split } => {
            if state.agents.contains_key(&AgentId(*id)) {
                return None; // a new capacity under running tasks is not what this test is about
            }
            let mut ports = Vec::new();
            if *port_count > 0 {
                let last = port_first + port_count - 1;
                if *split && *port_count > 1 {
                    let mid = port_first + port_count / 2;
                    ports.push(PortRange { first: *port_first, last: mid - 1 });
                    ports.push(PortRange { first: mid + 50, last: last + 50 });
                } else {
                    ports.push(PortRange { first: *port_first, last });
                }
            }
            let mut info = agent_info(*id, *cpus_milli, mem_mib * MIB, disk_mib * MIB, ports);
            info.attributes.insert("role".into(), if id % 2 == 1 { "a" } else { "b" }.into());
            Command::RegisterAgent { info }
        }
        Op::ReRegister { pick: i } => {
            let id = pick(&agents, *i)?;
            let mut info = state.agents[&id].info.clone();
            info.address = format!("http://10.0.1.{}:5051", id.0);
            info.version = format!("{now}");
            if now % 5 == 3 {
                info.hostname.clear();
                expect.rejected = true;
            }
            if now % 5 == 1 {
                // It comes back with another role: system jobs on `role = a` gain or lose it.
                let role = if info.attributes.get("role").is_some_and(|r| r == "a") { "b" } else { "a" };
                info.attributes.insert("role".into(), role.into());
            }
            Command::RegisterAgent { info }
        }
        Op::CreateJob { name, batch, system, instances, max_failures, cpus_milli, mem_mib, disk_mib, ports, seed } => {
            let job_type = match (*system, *batch) {
                (true, _) => capstan_model::JobType::System,
                (false, true) => capstan_model::JobType::Batch,
                (false, false) => capstan_model::JobType::Service,
            };
            let shape = JobShape {
                job_type,
                instances: if *system { 0 } else { *instances },
                max_failures: *max_failures,
                cpus_milli: *cpus_milli,
                mem_bytes: mem_mib * MIB,
                disk_bytes: disk_mib * MIB,
                ports: *ports,
            };
            expect.rejected = state.jobs.contains_key(&job_key(*name));
            let mut spec = shape.spec(&job_key(*name).to_string());
            spec.replace_after = match seed % 3 {
                0 => None,
                1 => Some(capstan_model::spec::ReplaceAfter::After(capstan_model::spec::DurationMs(5_000))),
                _ => Some(capstan_model::spec::ReplaceAfter::Never),
            };
            if *system && seed % 2 == 1 {
                spec.constraint = vec![capstan_model::spec::ConstraintSpec {
                    attribute: Some("role".into()),
                    value: Some("a".into()),
                    ..Default::default()
                }];
            }
            // Some batch jobs are cron jobs instead: their tasks come from Op::CronRun.
            if *batch && !*system && seed % 4 == 3 {
                spec.job_type = capstan_model::JobType::Cron;
                spec.cron = Some("* * * * *".into());
                if seed % 8 == 7 {
                    spec.cron_collision_policy = Some(capstan_model::spec::CronCollisionPolicy::CancelNew);
                }
            }
            Command::CreateJob { spec, seed: *seed }
        }
        Op::PlaceFirstFit => {
            let placements = first_fit(state, now, true);
            if placements.is_empty() {
                return None;
            }
            expect.all_placed = true;
            Command::Place { placements }
        }
        Op::PlaceNaive => {
            let placements = first_fit(state, now, false);
            if placements.is_empty() {
                return None;
            }
            Command::Place { placements }
        }
        Op::PlaceBad { pick, how } => {
            let p = bad_placement(state, *pick, *how)?;
            expect.placement_refused = Some(p.task);
            Command::Place { placements: vec![p] }
        }
        Op::Updates { agent_pick, updates, duplicate } => {
            let agent = pick(&agents, *agent_pick)?;
            let on_agent: Vec<TaskId> = state.tasks.values().filter(|t| t.agent == Some(agent)).map(|t| t.id).collect();
            let last = state.agents[&agent].last_update_seq;
            let mut seq = last;
            let mut out = Vec::new();
            for (i, kind) in updates {
                let task = pick(&on_agent, *i)?;
                seq += 1;
                out.push(StatusUpdate { seq, task, report: report(*kind, seq), at: capstan_model::Timestamp(now) });
            }
            if *duplicate && last > 0 {
                // A redelivery of updates already applied: the seq says so, whatever they carry.
                for u in &mut out {
                    u.seq = last;
                }
                expect.duplicates = out.len() as u64;
            }
            Command::AgentUpdates { agent, updates: out }
        }
        Op::UpdateUnknown { agent_pick, task } => {
            let (agent, rejected) = match pick(&agents, *agent_pick) {
                Some(a) => (a, false),
                None => (AgentId(777), true),
            };
            expect.rejected = rejected;
            let seq = state.agents.get(&agent).map_or(1, |a| a.last_update_seq + 1);
            let update =
                StatusUpdate { seq, task: TaskId(*task), report: Report::Starting, at: capstan_model::Timestamp(now) };
            Command::AgentUpdates { agent, updates: vec![update] }
        }
        Op::KillTask { pick: i, unknown } => {
            let ids: Vec<TaskId> = state.tasks.keys().copied().collect();
            let task = match pick(&ids, *i) {
                Some(t) if !unknown => t,
                _ => {
                    expect.rejected = true;
                    TaskId(0xdead_beef)
                }
            };
            expect.rejected |= state.frozen.is_some();
            Command::KillTask { task, by: "test".into() }
        }
        Op::KillJob { name } => {
            expect.rejected = !state.jobs.contains_key(&job_key(*name)) || state.frozen.is_some();
            Command::KillJob { job: job_key(*name), by: "test".into() }
        }
        Op::KillJobSlice { name, from_instance, instances_max } => {
            expect.rejected =
                !state.jobs.contains_key(&job_key(*name)) || state.frozen.is_some() || *instances_max == 0;
            Command::KillJobSlice {
                job: job_key(*name),
                by: "test".into(),
                from_instance: *from_instance,
                instances_max: *instances_max,
            }
        }
        Op::ForgetJobSlice { name, instances_max } => {
            expect.rejected = !state.jobs.get(&job_key(*name)).is_some_and(|j| j.is_over()) || *instances_max == 0;
            Command::ForgetJobSlice { job: job_key(*name), instances_max: *instances_max }
        }
        Op::Wait { .. } => return None,
        Op::Unreachable { agent_pick } => Command::AgentsUnreachable { agents: vec![pick(&agents, *agent_pick)?] },
        Op::Remove { agent_pick } => {
            let agent = pick(&agents, *agent_pick)?;
            expect.rejected = state.frozen.is_some()
                || !matches!(state.agents[&agent].liveness, capstan_state::Liveness::Unreachable { .. });
            Command::RemoveAgent { agent }
        }
        Op::Reconcile { agent_pick, keep, unknown, stale } => {
            let agent = pick(&agents, *agent_pick)?;
            let there: Vec<TaskId> = state.tasks.values().filter(|t| t.agent == Some(agent)).map(|t| t.id).collect();
            let mut known: Vec<TaskId> =
                there.iter().enumerate().filter(|(i, _)| keep >> (i % 64) & 1 == 1).map(|(_, t)| *t).collect();
            let mut running: Vec<TaskId> = known
                .iter()
                .copied()
                .filter(|t| {
                    !matches!(state.tasks[t].state, TaskState::Finished | TaskState::Failed | TaskState::Killed)
                })
                .collect();
            if let Some(u) = unknown {
                known.push(TaskId(*u));
                running.push(TaskId(*u));
            }
            let last = state.agents[&agent].last_update_seq;
            let as_of_seq = if *stale && last > 0 {
                Some(last - 1)
            } else if now.is_multiple_of(2) {
                Some(last)
            } else {
                None
            };
            Command::AgentReconcile { agent, known, running, as_of_seq }
        }
        Op::Drain { agent_pick, on } => {
            let agent = pick(&agents, *agent_pick)?;
            if *on {
                Command::DrainAgent { agent, by: "test".into() }
            } else {
                Command::UndrainAgent { agent, by: "test".into() }
            }
        }
        Op::DrainStep => {
            let moves = state.drain_plan(256).moves;
            if moves.is_empty() {
                return None;
            }
            Command::DrainMoves { moves }
        }
        Op::DrainMovesAny { picks } => {
            let ids: Vec<TaskId> = state.tasks.keys().copied().collect();
            let moves: Vec<TaskId> = picks.iter().filter_map(|i| pick(&ids, *i)).collect();
            expect.rejected = state.frozen.is_some();
            Command::DrainMoves { moves }
        }
        Op::MarkDrained { agent_pick } => {
            let agent = pick(&agents, *agent_pick)?;
            expect.rejected = !state.drain_progress(agent).is_some_and(|p| p.done());
            Command::MarkDrained { agent }
        }
        Op::Maintenance { agent_pick, start_offset_s, duration_s } => {
            let agent = pick(&agents, *agent_pick)?;
            let start = capstan_model::Timestamp((now as i64 + start_offset_s * 1000).max(0) as u64);
            let duration_ms = duration_s * 1000;
            expect.rejected = duration_ms == 0 || start.0 + duration_ms <= now;
            Command::ScheduleMaintenance { agents: vec![agent], start, duration_ms, by: "test".into() }
        }
        Op::CancelMaintenance { pick: i, unknown } => {
            let ids: Vec<u64> = state.maintenance.keys().copied().collect();
            let id = match pick(&ids, *i) {
                Some(id) if !unknown => id,
                _ => {
                    expect.rejected = true;
                    9_999
                }
            };
            Command::CancelMaintenance { id, by: "test".into() }
        }
        Op::BeginTerm { back } => {
            // A new term above the last (back 0), or a stale one at or below it: refused.
            expect.rejected = *back > 0;
            Command::BeginTerm { epoch: (state.epoch + 1).saturating_sub(*back) }
        }
        Op::Freeze { on } => Command::SetFreeze {
            freeze: on.then(|| capstan_state::Freeze {
                reason: "test".into(),
                by: "tester".into(),
                at: capstan_model::Timestamp(now),
            }),
        },
        Op::CronRun { name, scheduled, seed } => {
            let job = state.jobs.get(&job_key(*name));
            expect.rejected = job.is_none_or(|j| j.killed.is_some() || j.spec.job_type != capstan_model::JobType::Cron);
            let last_fire = job.and_then(|j| j.cron.as_ref()).map_or(now, |c| c.last_fire.0);
            Command::StartCronRun {
                job: job_key(*name),
                scheduled_at: scheduled.then_some(capstan_model::Timestamp(last_fire + 60_000)),
                missed: (*seed % 3) as u32,
                seed: *seed,
                by: "test".into(),
            }
        }
        Op::StartUpdate { name, instances, change, batch_size, canaries } => {
            let job = state.jobs.get(&job_key(*name))?;
            let mut spec = (*job.spec).clone();
            if *change {
                spec.task.command.push_str(" v");
            }
            spec.instances = *instances;
            spec.update = Some(capstan_model::spec::UpdateSpec {
                batch_size: *batch_size,
                watch: capstan_model::spec::DurationMs(1_000),
                max_per_instance_failures: 0,
                max_total_failures: 0,
                rollback_on_failure: true,
                canaries: (*canaries).min(*instances),
                auto_promote: false,
            });
            expect.rejected = job.killed.is_some()
                || job.spec.job_type != capstan_model::JobType::Service
                || job.updates.active.is_some()
                || (*instances < job.spec.instances && state.frozen.is_some());
            Command::StartUpdate { spec, by: "tester".into(), seed: now }
        }
        Op::UpdateStep { name } => {
            let job = state.jobs.get(&job_key(*name))?;
            if !capstan_state::updates::step_needed(state, job, capstan_model::Timestamp(now)) {
                return None;
            }
            Command::UpdateStep { job: job_key(*name) }
        }
        Op::UpdateControl { name, action } => {
            use capstan_state::updates::{UpdateAction, UpdateState};
            let job = state.jobs.get(&job_key(*name))?;
            let action = [
                UpdateAction::Promote,
                UpdateAction::Pause,
                UpdateAction::Resume,
                UpdateAction::Abort,
                UpdateAction::Rollback,
            ][usize::from(*action) % 5];
            expect.rejected = match &job.updates.active {
                None => true,
                Some(u) => match action {
                    UpdateAction::Promote => u.state != UpdateState::AwaitingPromote,
                    UpdateAction::Pause => u.paused.is_some(),
                    UpdateAction::Resume => u.paused.is_none(),
                    UpdateAction::Abort => false,
                    UpdateAction::Rollback => u.state == UpdateState::RollingBack || state.frozen.is_some(),
                },
            };
            Command::UpdateControl { job: job_key(*name), action, by: "tester".into() }
        }
    };
    Some((command, expect))
}

/// The derived fields, as apply keeps them and as `rebuild_derived` computes them, must agree.
fn check_derived(state: &ClusterState) -> Result<(), TestCaseError> {
    let mut rebuilt = state.clone();
    rebuilt.rebuild_derived();
    prop_assert_eq!(&state.pending, &rebuilt.pending, "pending");
    prop_assert_eq!(&state.queue, &rebuilt.queue, "queue");
    prop_assert_eq!(state.counts, rebuilt.counts, "counts");
    prop_assert_eq!(state.queue.len(), state.pending.len(), "queue and pending hold the same tasks");
    for (id, a) in &state.agents {
        let r = &rebuilt.agents[id];
        prop_assert_eq!(a.used, r.used, "agent {} used", id);
        prop_assert_eq!(&a.used_ports, &r.used_ports, "agent {} used_ports", id);
        prop_assert_eq!(&a.tasks, &r.tasks, "agent {} tasks", id);
    }
    for (key, j) in &state.jobs {
        let r = &rebuilt.jobs[key];
        prop_assert_eq!(&j.current, &r.current, "job {} current", key);
        prop_assert_eq!(&j.history, &r.history, "job {} history", key);
    }
    // Nothing else differs (orders_version is not rebuilt; the clone keeps it).
    prop_assert!(*state == rebuilt, "rebuild_derived changed something else");
    Ok(())
}

/// Invariants of any state apply produces.
fn check_invariants(state: &ClusterState) -> Result<(), TestCaseError> {
    for (id, a) in &state.agents {
        let cap = &a.info.capacity;
        prop_assert!(a.used.cpus_milli <= cap.cpus_milli, "agent {} cpus over-committed", id);
        prop_assert!(a.used.mem_bytes <= cap.mem_bytes, "agent {} mem over-committed", id);
        prop_assert!(a.used.disk_bytes <= cap.disk_bytes, "agent {} disk over-committed", id);
        prop_assert!(a.used_ports.len() as u32 <= cap.port_count(), "agent {} ports over-committed", id);
        // Ports held by the tasks on the agent: in its ranges, none twice.
        let mut seen = BTreeSet::new();
        for t in state.tasks.values().filter(|t| t.agent == Some(*id) && t.state.holds_resources()) {
            prop_assert_eq!(
                t.ports.len(),
                state.jobs[&t.job].spec_for(t.job_version).task.ports.len(),
                "task {} ports",
                t.id
            );
            for p in &t.ports {
                prop_assert!(cap.ports.iter().any(|r| r.contains(*p)), "port {} outside agent {}'s ranges", p, id);
                prop_assert!(seen.insert(*p), "port {} used twice on agent {}", p, id);
            }
        }
        prop_assert_eq!(&seen, &a.used_ports, "agent {}: used_ports vs the tasks' ports", id);
    }
    // At most one live task per (job, instance); every task belongs to a job that has it in its history.
    let mut live: BTreeSet<(JobKey, u32)> = BTreeSet::new();
    for t in state.tasks.values() {
        let job = state.jobs.get(&t.job);
        prop_assert!(job.is_some(), "task {} of a job that is gone", t.id);
        let job = job.unwrap();
        if job.is_system() {
            prop_assert!(t.instance < job.next_instance, "task {} instance out of range", t.id);
            // A system instance's wanted task holds resources on its own agent only.
            if let (Some(agent), true) = (job.pinned_agent(t.instance), t.state.holds_resources()) {
                if t.desired == capstan_model::Desired::Run && job.current.get(&t.instance) == Some(&t.id) {
                    prop_assert_eq!(t.agent, Some(agent), "system task {} off its agent", t.id);
                }
            }
        } else {
            // An update that lowered `instances` stops the surplus instances' tasks (and keeps their history).
            prop_assert!(
                t.instance < job.spec.instances || t.desired == capstan_model::Desired::Stop || t.state.is_terminal(),
                "task {} instance out of range",
                t.id
            );
        }
        // A replacement stopping because the copy it replaced came back is live for a while beside
        // it; it is not wanted (desired STOP).
        if !t.state.is_terminal() && t.desired == capstan_model::Desired::Run {
            prop_assert!(
                live.insert(((*t.job).clone(), t.instance)),
                "two live tasks for {} instance {}",
                t.job,
                t.instance
            );
        }
        prop_assert_eq!(t.state.holds_resources(), t.agent.is_some_and(|a| state.agents[&a].tasks.contains(&t.id)));
        prop_assert!(t.events.len() <= capstan_state::state::TASK_EVENTS_MAX);
    }
    for j in state.jobs.values() {
        // A system job has one instance per agent at most, each on a known agent.
        prop_assert_eq!(j.pinned.len(), j.pinned_by_agent.len(), "job {}: two instances on one agent", j.spec.job);
        prop_assert!(j.pinned.values().all(|a| state.agents.contains_key(a)));
        if j.finished_at.is_some() {
            prop_assert_eq!(j.done.len() as u32, j.spec.instances, "job {} finished early", j.spec.job);
        }
    }
    Ok(())
}

/// Applies `c` and checks everything that must hold after any command.
fn apply_checked(state: &mut ClusterState, c: &Stamped, expect: &Expect) -> Result<bool, TestCaseError> {
    // (f) the stored form reads back as the command.
    let bytes = encode_command(c);
    prop_assert_eq!(&decode_command(&bytes).unwrap(), c);

    let before = state.clone();
    let before_bytes = encode_snapshot(state);
    let result = state.apply(c);
    match &result {
        Err(rejection) => {
            prop_assert!(expect.rejected, "refused unexpectedly: {} for {:?}", rejection, c.command);
            // (g) a refused command changes nothing.
            prop_assert_eq!(&encode_snapshot(state), &before_bytes);
            prop_assert!(*state == before, "a refused command changed the state");
        }
        Ok(applied) => {
            prop_assert!(!expect.rejected, "accepted a command that must be refused: {:?}", c.command);
            if expect.all_placed {
                prop_assert_eq!(applied.placements_refused, 0, "first-fit placements refused: {:?}", c.command);
            }
            if let Some(task) = expect.placement_refused {
                prop_assert_eq!(applied.placements_refused, 1, "a bad placement took: {:?}", c.command);
                if let Some(t) = before.tasks.get(&task) {
                    prop_assert_eq!(&state.tasks[&task], t, "a refused placement changed its task");
                }
                prop_assert_eq!(&state.agents, &before.agents, "a refused placement changed an agent");
            }
            prop_assert_eq!(
                state.counters.duplicate_updates - before.counters.duplicate_updates,
                expect.duplicates,
                "duplicates counted"
            );
            if expect.duplicates > 0 {
                prop_assert_eq!(&state.tasks, &before.tasks, "a duplicate update changed a task");
            }
        }
    }
    check_invariants(state)?;
    check_derived(state)?;
    Ok(result.is_ok())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_histories_keep_the_invariants_and_replay_exactly(
        ops in prop::collection::vec(op(), 1..80),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut state = ClusterState::default();
        let mut now = 1_000_000u64;
        let mut log: Vec<(Stamped, bool)> = Vec::new();
        for op in &ops {
            now += 1 + (now % 7) * 100;
            if let Op::Wait { ms } = op {
                now += ms;
            }
            let Some((command, expect)) = command(&state, now, op) else { continue };
            let c = stamped(now, command);
            let accepted = apply_checked(&mut state, &c, &expect)?;
            log.push((c, accepted));
        }
        let full = encode_snapshot(&state);
        // REPLAY_STATS=1 cargo test … -- --nocapture shows what the generated histories reach.
        if std::env::var("REPLAY_STATS").is_ok() {
            let names: Vec<&str> = log.iter().filter(|(_, ok)| *ok).map(|(c, _)| c.command.name()).collect();
            eprintln!("STATS cmds={} accepted={} refused={} counts={:?} counters={:?} jobs_finished={} killed_jobs={}",
                log.len(), names.len(), log.len() - names.len(), state.task_counts(), state.counters,
                state.jobs.values().filter(|j| j.finished_at.is_some()).count(),
                state.jobs.values().filter(|j| j.killed.is_some()).count());
        }

        // (a) determinism: the same log on a fresh state, same outcomes, same bytes.
        let mut again = ClusterState::default();
        for (c, accepted) in &log {
            prop_assert_eq!(again.apply(c).is_ok(), *accepted);
        }
        prop_assert_eq!(&encode_snapshot(&again), &full);
        prop_assert!(again == state, "replay differs in derived fields");

        // (b) a snapshot anywhere, then the rest of the log: the same bytes.
        let k = cut.index(log.len() + 1);
        let mut head = ClusterState::default();
        for (c, _) in &log[..k] {
            let _ = head.apply(c);
        }
        let mut resumed = decode_snapshot(&encode_snapshot(&head)).unwrap();
        prop_assert_eq!(&encode_snapshot(&resumed), &encode_snapshot(&head));
        for (c, accepted) in &log[k..] {
            prop_assert_eq!(resumed.apply(c).is_ok(), *accepted);
        }
        prop_assert_eq!(&encode_snapshot(&resumed), &full);
        check_derived(&resumed)?;
        prop_assert_eq!(&resumed.pending, &state.pending);
        for (id, a) in &state.agents {
            let r = &resumed.agents[id];
            prop_assert_eq!((a.used, &a.used_ports, &a.tasks), (r.used, &r.used_ports, &r.tasks));
        }
        for (key, j) in &state.jobs {
            let r = &resumed.jobs[key];
            prop_assert_eq!((&j.current, &j.history), (&r.current, &r.history));
        }
    }
}

/// Every kind of exit and report survives the stored form, and keeps its tagged JSON form.
#[test]
fn every_report_survives_the_stored_form() {
    let exits = [
        TaskExit::Exited { code: -3 },
        TaskExit::Signaled { signal: 9 },
        TaskExit::OutOfMemory { limit_bytes: 64 << 20 },
        TaskExit::OverDisk { limit_bytes: 1 << 30, used_bytes: (1 << 30) + 1 },
        TaskExit::Killed { by: "user request".into() },
        TaskExit::LaunchFailed { message: "no such user".into() },
        TaskExit::SupervisorLost { message: "gone".into() },
    ];
    let mut reports = vec![Report::Starting, Report::Running { pid: 42 }];
    reports.extend(exits.iter().cloned().map(|exit| Report::Exited { exit }));
    let updates: Vec<StatusUpdate> = reports
        .iter()
        .enumerate()
        .map(|(i, report)| StatusUpdate {
            seq: i as u64 + 1,
            task: TaskId(i as u64),
            report: report.clone(),
            at: capstan_model::Timestamp(7),
        })
        .collect();
    let c = stamped(1, Command::AgentUpdates { agent: AgentId(1), updates });
    assert_eq!(decode_command(&encode_command(&c)).unwrap(), c);

    let json = serde_json::to_value(Report::Exited { exit: TaskExit::Exited { code: 3 } }).unwrap();
    assert_eq!(json, serde_json::json!({"kind": "exited", "exit": {"kind": "exited", "code": 3}}));
    for exit in exits {
        let text = serde_json::to_string(&exit).unwrap();
        assert!(text.starts_with("{\"kind\":"), "{text}");
        assert_eq!(serde_json::from_str::<TaskExit>(&text).unwrap(), exit);
    }
}
