//! Tables for people, JSON for scripts.

use capstan_api::wire::{JobUpdatesView, UpdateView};
use capstan_api::{AgentView, JobView, TaskView};
use comfy_table::{presets::UTF8_FULL, Table};
use serde::Serialize;
use std::time::{Duration, SystemTime};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

impl Output {
    pub fn print<T: Serialize>(self, value: &T, table: impl FnOnce() -> String) {
        match self {
            Output::Json => println!("{}", serde_json::to_string_pretty(value).expect("serializable")),
            Output::Table => println!("{}", table()),
        }
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL);
    t.set_header(header.to_vec());
    t
}

fn counts(tasks: &std::collections::BTreeMap<String, u64>) -> String {
    tasks.iter().map(|(s, n)| format!("{n} {s}")).collect::<Vec<_>>().join(", ")
}

pub fn job_table(jobs: &[JobView]) -> String {
    if jobs.is_empty() {
        return "no jobs".into();
    }
    let mut t = table(&["JOB", "TYPE", "STATUS", "INSTANCES", "TASKS"]);
    for j in jobs {
        t.add_row(vec![
            j.job.to_string(),
            j.job_type.clone(),
            j.status.clone(),
            j.instances.to_string(),
            counts(&j.tasks),
        ]);
    }
    t.to_string()
}

fn ports(t: &TaskView) -> String {
    t.ports.iter().map(|(n, p)| format!("{n}={p}")).collect::<Vec<_>>().join(",")
}

pub fn task_table(tasks: &[TaskView]) -> String {
    if tasks.is_empty() {
        return "no tasks".into();
    }
    let mut t = table(&["TASK", "JOB", "INST", "STATE", "HEALTH", "HOST", "PORTS", "PID", "REASON"]);
    for x in tasks {
        t.add_row(vec![
            x.id.to_string(),
            x.job.to_string(),
            x.instance.to_string(),
            x.state.to_string(),
            x.health.clone().unwrap_or_default(),
            x.host.clone().unwrap_or_default(),
            ports(x),
            x.pid.map(|p| p.to_string()).unwrap_or_default(),
            x.reason.clone(),
        ]);
    }
    t.to_string()
}

pub fn task_detail(t: &TaskView) -> String {
    let mut out = format!(
        "task      {}\njob       {} instance {}\nstate     {} (desired {:?})\nreason    {}\nhost      {}\nports     {}\npid       {}\nfailures  {}\n",
        t.id,
        t.job,
        t.instance,
        t.state,
        t.desired,
        t.reason,
        t.host.clone().unwrap_or_else(|| "-".into()),
        ports(t),
        t.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        t.failures
    );
    if let Some(h) = &t.health {
        out.push_str(&format!("health    {h}\n"));
    }
    if let Some(u) = &t.usage {
        out.push_str(&format!(
            "usage     cpu {:.2} s (throttled {:.2} s, {} times), mem {} (peak {}), disk {}  [at {}]\n",
            u.cpu_seconds,
            u.throttled_seconds,
            u.nr_throttled,
            capstan_model::ByteSize(u.mem_bytes).human(),
            capstan_model::ByteSize(u.mem_peak_bytes).human(),
            capstan_model::ByteSize(u.disk_bytes).human(),
            u.at
        ));
    }
    if let Some(nb) = &t.not_before {
        out.push_str(&format!("restarts  not before {nb}\n"));
    }
    out.push_str("events:\n");
    for e in &t.events {
        out.push_str(&format!("  {}  {:<9} {}\n", e.at, e.state.to_string(), e.reason));
    }
    out
}

pub fn job_status(j: &JobView, tasks: &[TaskView]) -> String {
    let mut out = format!(
        "job       {}\ntype      {}\nstatus    {}\ninstances {}\ntasks     {}\ncreated   {}\n",
        j.job,
        j.job_type,
        j.status,
        j.instances,
        counts(&j.tasks),
        j.created_at
    );
    if let Some(f) = &j.finished_at {
        let took = humantime::format_duration(Duration::from_millis(j.duration_ms.unwrap_or(0)));
        let how = if j.status == "finished" {
            format!("complete: all {} instance(s) exited 0", j.instances)
        } else {
            "an instance failed for good".to_string()
        };
        out.push_str(&format!("finished  {f}, took {took} ({how})\n"));
    }
    for r in &j.pending_reasons {
        out.push_str(&format!("pending   {r}\n"));
    }
    if let Some(c) = &j.cron {
        out.push_str(&cron_section(c, SystemTime::now()));
    }
    if let Some(u) = &j.update {
        out.push_str(&job_status_lines(u));
    }
    out.push('\n');
    out.push_str(&task_table(tasks));
    out
}

/// A cron job's schedule, next run and run history (newest first).
pub fn cron_section(c: &capstan_api::wire::CronView, now: SystemTime) -> String {
    let mut out = format!(
        "schedule  {} ({}) — {}\npolicy    {}\nnext run  {}\n",
        c.schedule,
        c.timezone,
        c.description,
        c.collision_policy,
        c.next_run_at.as_deref().map_or_else(|| "never".to_string(), |t| time_and_relative(t, now)),
    );
    if c.runs.is_empty() {
        out.push_str("runs      none yet\n");
        return out;
    }
    let mut t = table(&["RUN", "RESULT", "SCHEDULED", "STARTED", "TOOK", "MISSED", "BY", "REASON"]);
    for r in &c.runs {
        t.add_row(vec![
            r.number.to_string(),
            r.result.clone(),
            r.scheduled_at.as_deref().map_or_else(|| "-".to_string(), |at| relative(at, now)),
            r.started_at.as_deref().map_or_else(|| "-".to_string(), |at| relative(at, now)),
            r.duration_ms.map_or_else(|| "-".to_string(), |ms| compact(Duration::from_millis(ms))),
            r.missed.to_string(),
            r.by.clone(),
            r.reason.clone(),
        ]);
    }
    out.push_str(&format!("runs (newest first):\n{t}\n"));
    out
}

pub fn agent_table(agents: &[AgentView]) -> String {
    if agents.is_empty() {
        return "no agents".into();
    }
    let mut t = table(&[
        "AGENT",
        "HOST",
        "LIVENESS",
        "LAST SEEN",
        "UNREACHABLE SINCE",
        "CPUS",
        "MEM",
        "DISK",
        "PORTS",
        "TASKS",
        "ATTRIBUTES",
        "SCHEDULING",
    ]);
    let now = SystemTime::now();
    for a in agents {
        t.add_row(vec![
            a.id.to_string(),
            a.hostname.clone(),
            if a.liveness.is_empty() { "-".to_string() } else { a.liveness.clone() },
            a.last_seen.as_deref().map_or_else(|| "-".to_string(), |at| relative(at, now)),
            a.unreachable_since.as_deref().map_or_else(|| "-".to_string(), |at| relative(at, now)),
            format!("{}/{}", a.used.cpus, a.capacity.cpus),
            format!("{}/{}", a.used.mem.human(), a.capacity.mem.human()),
            format!("{}/{}", a.used.disk.human(), a.capacity.disk.human()),
            format!("{}/{}", a.used.ports, a.capacity.ports),
            a.tasks.to_string(),
            a.attributes.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
            scheduling(a),
        ]);
    }
    t.to_string()
}

/// Whether new tasks may go to the agent: `ok`, or its drain's progress, or its maintenance.
fn scheduling(a: &AgentView) -> String {
    let mut parts = vec![];
    if let Some(d) = &a.drain {
        parts.push(if d.status == "drained" { d.progress.clone() } else { format!("draining: {}", d.progress) });
    }
    if let Some(m) = &a.maintenance {
        parts.push(format!("maintenance {m}"));
    }
    if parts.is_empty() {
        "ok".into()
    } else {
        parts.join("; ")
    }
}

/// The line every mutating command prints on standard error while the cluster is frozen.
pub fn frozen_warning(notice: &str) -> String {
    format!("warning: the cluster is FROZEN: {notice}; destructive actions are paused (capstan admin unfreeze)")
}

/// An RFC 3339 time of the master as people read it next to `now`: `12s ago`, `in 3m5s`; the
/// text as it is when it is not such a time.
pub fn relative(at: &str, now: SystemTime) -> String {
    let Ok(t) = humantime::parse_rfc3339_weak(at) else { return at.to_string() };
    match now.duration_since(t) {
        Ok(past) => format!("{} ago", compact(past)),
        Err(future) => format!("in {}", compact(future.duration())),
    }
}

/// An RFC 3339 time with how long ago (or how soon) it is: `2024-05-01T10:00:00.000Z (12s ago)`.
pub fn time_and_relative(at: &str, now: SystemTime) -> String {
    let rel = relative(at, now);
    if rel == at {
        at.to_string()
    } else {
        format!("{at} ({rel})")
    }
}

/// The two largest units of a duration, whole seconds at the finest: `45s`, `5m12s`, `3h4m`, `2d3h`.
pub fn compact(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, minutes, seconds) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, m) => format!("{m}m{seconds}s"),
        (0, h, m) => format!("{h}h{m}m"),
        (d, h, _) => format!("{d}d{h}h"),
    }
}

/// `capstan admin masters`: URL, role, leader, epoch, store, since (or the error).
pub fn masters_table(rows: &[serde_json::Value]) -> String {
    let mut t = table(&["MASTER", "ROLE", "LEADER", "EPOCH", "STORE", "SINCE"]);
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string).unwrap_or_else(|| "-".into());
    for r in rows {
        let epoch = r["epoch"].as_u64().filter(|e| *e > 0).map_or("-".to_string(), |e| e.to_string());
        let store = r.get("error").map_or_else(|| text(&r["store"]), text);
        t.add_row(vec![text(&r["me"]), text(&r["role"]), text(&r["leader"]), epoch, store, text(&r["since"])]);
    }
    t.to_string()
}

// ---- rolling updates

/// Width of an update's progress bar, in characters.
const BAR_WIDTH: usize = 20;

/// `[batch 2/3] [########------------] 2/6 done  #2 RUNNING healthy v2 up 1.2s/2s  #3 STARTING v2`
pub fn progress_line(u: &UpdateView) -> String {
    let done = u.done.len();
    let total = (u.total as usize).max(1);
    let filled = (done * BAR_WIDTH / total).min(BAR_WIDTH);
    let bar = format!("{}{}", "#".repeat(filled), "-".repeat(BAR_WIDTH - filled));
    let state = match &u.paused_by {
        Some(by) => format!("paused by {by}"),
        None => u.state.clone(),
    };
    let mut line = format!(
        "[{state} batch {}/{}] [{bar}] {done}/{} done v{}→v{}",
        u.batches, u.batches_total, u.total, u.from_version, u.to_version
    );
    if !u.failed.is_empty() {
        line.push_str(&format!(" failed {:?}", u.failed));
    }
    for i in &u.batch {
        line.push_str(&format!("  #{} {}", i.instance, i.state.map_or("-".to_string(), |s| s.to_string())));
        if let Some(h) = &i.health {
            line.push_str(&format!(" {h}"));
        }
        if let Some(v) = i.version {
            line.push_str(&format!(" v{v}"));
        }
        if let Some(up) = i.up_ms {
            line.push_str(&format!(" up {:.1}s/{:.1}s", up as f64 / 1000.0, u.watch_ms as f64 / 1000.0));
        }
    }
    if u.batch.is_empty() || u.state == "awaiting_promote" {
        line.push_str(&format!("  ({})", u.message));
    }
    line
}

pub fn final_line(u: &UpdateView) -> String {
    let secs = u.duration_ms.unwrap_or(0) as f64 / 1000.0;
    format!(
        "update {} of {} {} after {secs:.1}s (version {} → {}; {} of {} instance(s) replaced in {} batch(es)): {}",
        u.id,
        u.job,
        u.state,
        u.from_version,
        u.to_version,
        u.done.len(),
        u.total,
        u.batches,
        u.message
    )
}

pub fn update_status_text(v: &JobUpdatesView) -> String {
    let mut out = format!("job {} at version {}\n", v.job, v.version);
    match &v.active {
        Some(u) => out.push_str(&format!(
            "in progress: update {} by {} since {}\n  {}\n",
            u.id,
            u.by,
            u.started_at,
            progress_line(u)
        )),
        None => out.push_str("no update in progress\n"),
    }
    if !v.history.is_empty() {
        out.push_str("history (newest first):\n");
        for u in &v.history {
            out.push_str(&format!(
                "  update {}: v{} → v{} by {} at {}: {} ({})\n",
                u.id, u.from_version, u.to_version, u.by, u.started_at, u.state, u.message
            ));
        }
    }
    out
}

/// The lines `capstan job status` adds for an update in progress.
pub fn job_status_lines(u: &UpdateView) -> String {
    format!("update    {} by {}: v{} → v{}\n          {}\n", u.id, u.by, u.from_version, u.to_version, progress_line(u))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_durations_keep_the_two_largest_units() {
        let cases =
            [(0, "0s"), (45, "45s"), (312, "5m12s"), (3600 * 3 + 245, "3h4m"), (86_400 * 2 + 3 * 3600 + 7, "2d3h")];
        for (secs, want) in cases {
            assert_eq!(compact(Duration::from_secs(secs)), want, "{secs} s");
        }
    }

    #[test]
    fn relative_times_read_both_ways_and_leave_other_text_alone() {
        let now = humantime::parse_rfc3339_weak("2024-05-01T10:00:00Z").unwrap();
        assert_eq!(relative("2024-05-01T09:59:48.250Z", now), "11s ago");
        assert_eq!(relative("2024-05-01T10:03:05Z", now), "in 3m5s");
        assert_eq!(relative("yesterday", now), "yesterday");
        assert_eq!(time_and_relative("2024-05-01T09:59:00.000Z", now), "2024-05-01T09:59:00.000Z (1m0s ago)");
    }

    #[test]
    fn the_frozen_warning_is_loud_and_says_how_to_lift_it() {
        assert_eq!(
            frozen_warning("rack r3 flaps (frozen by ops@h1 since 2024-05-01T10:00:00.000Z)"),
            "warning: the cluster is FROZEN: rack r3 flaps (frozen by ops@h1 since 2024-05-01T10:00:00.000Z); \
             destructive actions are paused (capstan admin unfreeze)"
        );
    }
}
