//! Prometheus metrics of the master. Gauges that mirror the state (tasks by state, agents) are
//! computed when scraped; counters and histograms are updated where things happen.

use capstan_model::TaskState;
use capstan_state::ClusterState;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LivenessLabel {
    pub liveness: String,
}

pub struct Metrics {
    registry: Registry,
    pub tasks: Family<StateLabel, Gauge>,
    pub agents: Gauge,
    pub jobs: Gauge,
    pub store_write_seconds: Histogram,
    /// Time from a task becoming placeable to its placement being durable.
    pub placement_latency_seconds: Histogram,
    pub scheduler_pass_seconds: Histogram,
    pub placements: Counter,
    pub placements_refused: Gauge,
    pub illegal_transitions: Gauge,
    pub duplicate_updates: Gauge,
    pub updates_for_unknown_tasks: Gauge,
    pub command_queue: Gauge,
    pub log_index: Gauge,
    pub scheduler_queue: Gauge,
    pub scheduler_rate_limit: Gauge,
    pub agents_by_liveness: Family<LivenessLabel, Gauge>,
    pub frozen: Gauge,
    /// 1 while this master leads (the other masters of the cluster show 0).
    pub leader: Gauge,
    /// Leadership terms this master began.
    pub terms: Counter,
    pub breaker_tripped: Gauge,
    pub agent_removals: Gauge,
    pub tasks_replaced: Gauge,
    pub tasks_taken_back: Gauge,
    pub stray_tasks: Gauge,
    pub heartbeats: Counter,
    pub status_updates: Counter,
    pub requests_shed: Family<RouteLabel, Counter>,
    /// Agents by drain state (`draining`, `drained`).
    pub agents_drain: Family<StateLabel, Gauge>,
    pub updates_active: Gauge,
    pub maintenance_windows: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("capstan");
        let tasks = Family::<StateLabel, Gauge>::default();
        registry.register("tasks", "Tasks by state", tasks.clone());
        let agents = Gauge::default();
        registry.register("agents", "Registered agents", agents.clone());
        let jobs = Gauge::default();
        registry.register("jobs", "Jobs", jobs.clone());
        let store_write_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 18));
        registry.register(
            "store_write_seconds",
            "Time to durably append one batch of commands",
            store_write_seconds.clone(),
        );
        let placement_latency_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 18));
        registry.register(
            "placement_latency_seconds",
            "Time from a task becoming placeable to its placement being durable",
            placement_latency_seconds.clone(),
        );
        let scheduler_pass_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 18));
        registry.register(
            "scheduler_pass_seconds",
            "Time to compute one placement plan",
            scheduler_pass_seconds.clone(),
        );
        let placements = Counter::default();
        registry.register("placements", "Tasks placed", placements.clone());
        let placements_refused = Gauge::default();
        registry.register(
            "placements_refused",
            "Placements refused by the plan applier because the state moved on",
            placements_refused.clone(),
        );
        let illegal_transitions = Gauge::default();
        registry.register(
            "illegal_transitions",
            "Task events that made no sense in the task's state (ignored)",
            illegal_transitions.clone(),
        );
        let duplicate_updates = Gauge::default();
        registry.register(
            "duplicate_status_updates",
            "Status updates received again and dropped",
            duplicate_updates.clone(),
        );
        let updates_for_unknown_tasks = Gauge::default();
        registry.register(
            "status_updates_unknown_task",
            "Status updates for tasks the master does not place on that agent",
            updates_for_unknown_tasks.clone(),
        );
        let command_queue = Gauge::default();
        registry.register("command_queue", "Commands waiting for the writer", command_queue.clone());
        let scheduler_queue = Gauge::default();
        registry.register(
            "scheduler_queue_tasks",
            "Tasks waiting in the scheduler's queue (pending)",
            scheduler_queue.clone(),
        );
        let scheduler_rate_limit = Gauge::default();
        registry.register(
            "scheduler_max_placements_per_second",
            "The operator's ceiling on placements per second; 0 means unlimited",
            scheduler_rate_limit.clone(),
        );
        let log_index = Gauge::default();
        registry.register("log_index", "Index of the last command applied", log_index.clone());
        let agents_by_liveness = Family::<LivenessLabel, Gauge>::default();
        registry.register("agents_by_liveness", "Agents by liveness", agents_by_liveness.clone());
        let frozen = Gauge::default();
        registry.register("frozen", "1 while the cluster is frozen (no destructive actions)", frozen.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this master leads the cluster", leader.clone());
        let terms = Counter::default();
        registry.register("terms", "Leadership terms this master began", terms.clone());
        let breaker_tripped = Gauge::default();
        registry.register(
            "breaker_tripped",
            "1 while the mass-loss breaker stops agent removals",
            breaker_tripped.clone(),
        );
        let agent_removals = Gauge::default();
        registry.register(
            "agent_removals_total",
            "Removal steps of unreachable agents (rate limited)",
            agent_removals.clone(),
        );
        let tasks_replaced = Gauge::default();
        registry.register(
            "tasks_replaced_total",
            "Tasks replaced elsewhere because their agent stayed unreachable",
            tasks_replaced.clone(),
        );
        let tasks_taken_back = Gauge::default();
        registry.register(
            "tasks_taken_back_total",
            "Replaced tasks taken back when their agent returned before the replacement started",
            tasks_taken_back.clone(),
        );
        let stray_tasks = Gauge::default();
        registry.register(
            "stray_tasks",
            "Tasks running on agents without the master wanting them",
            stray_tasks.clone(),
        );
        let heartbeats = Counter::default();
        registry.register("heartbeats", "Agent heartbeats received", heartbeats.clone());
        let status_updates = Counter::default();
        registry.register("status_updates", "Status updates received from agents", status_updates.clone());
        let requests_shed = Family::<RouteLabel, Counter>::default();
        registry.register("requests_shed", "Requests answered 503 to shed load", requests_shed.clone());
        let agents_drain = Family::<StateLabel, Gauge>::default();
        registry.register("agents_drain", "Agents being drained or drained, by state", agents_drain.clone());
        let updates_active = Gauge::default();
        registry.register("updates_active", "Rolling updates in progress", updates_active.clone());
        let maintenance_windows = Gauge::default();
        registry.register(
            "maintenance_windows",
            "Maintenance windows the master keeps (scheduled, in progress or ended)",
            maintenance_windows.clone(),
        );
        Metrics {
            registry,
            agents_drain,
            updates_active,
            maintenance_windows,
            agents_by_liveness,
            frozen,
            leader,
            terms,
            breaker_tripped,
            agent_removals,
            tasks_replaced,
            tasks_taken_back,
            stray_tasks,
            heartbeats,
            status_updates,
            requests_shed,
            tasks,
            agents,
            jobs,
            store_write_seconds,
            placement_latency_seconds,
            scheduler_pass_seconds,
            placements,
            placements_refused,
            illegal_transitions,
            duplicate_updates,
            updates_for_unknown_tasks,
            command_queue,
            log_index,
            scheduler_queue,
            scheduler_rate_limit,
        }
    }

    /// Refreshes the state mirrors and renders the text format.
    pub fn render(&self, state: &ClusterState) -> String {
        let counts = state.task_counts();
        for s in TaskState::ALL {
            self.tasks
                .get_or_create(&StateLabel { state: s.as_str().into() })
                .set(*counts.get(&s).unwrap_or(&0) as i64);
        }
        self.agents.set(state.agents.len() as i64);
        self.jobs.set(state.jobs.len() as i64);
        self.placements_refused.set(state.counters.placements_refused as i64);
        self.illegal_transitions.set(state.counters.illegal_transitions as i64);
        self.duplicate_updates.set(state.counters.duplicate_updates as i64);
        self.updates_for_unknown_tasks.set(state.counters.updates_for_unknown_tasks as i64);
        self.log_index.set(state.index as i64);
        self.scheduler_queue.set(state.queue.len() as i64);
        self.scheduler_rate_limit.set(i64::from(state.scheduler.max_placements_per_second.unwrap_or(0)));
        for l in ["active", "unreachable", "removed"] {
            let n = state.agents.values().filter(|a| a.liveness.as_str() == l).count();
            self.agents_by_liveness.get_or_create(&LivenessLabel { liveness: l.into() }).set(n as i64);
        }
        self.frozen.set(i64::from(state.frozen.is_some()));
        let drained =
            state.agents.values().filter(|a| a.drain.as_ref().is_some_and(|d| d.drained_at.is_some())).count();
        let draining = state.agents.values().filter(|a| a.drain.is_some()).count() - drained;
        self.agents_drain.get_or_create(&StateLabel { state: "draining".into() }).set(draining as i64);
        self.agents_drain.get_or_create(&StateLabel { state: "drained".into() }).set(drained as i64);
        self.updates_active.set(state.jobs.values().filter(|j| j.updates.active.is_some()).count() as i64);
        self.maintenance_windows.set(state.maintenance.len() as i64);
        self.agent_removals.set(state.counters.agent_removals as i64);
        self.tasks_replaced.set(state.counters.tasks_replaced_unreachable as i64);
        self.tasks_taken_back.set(state.counters.tasks_taken_back as i64);
        self.stray_tasks.set(state.agents.values().map(|a| a.strays.len() as i64).sum());
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
