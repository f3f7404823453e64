//! Tables for people, JSON for scripts.

use capstan_api::{AgentView, JobView, TaskView};
use comfy_table::{presets::UTF8_FULL, Table};
use serde::Serialize;

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
        out.push_str(&format!("finished  {f} (after {} ms)\n", j.duration_ms.unwrap_or(0)));
    }
    for r in &j.pending_reasons {
        out.push_str(&format!("pending   {r}\n"));
    }
    out.push('\n');
    out.push_str(&task_table(tasks));
    out
}

pub fn agent_table(agents: &[AgentView]) -> String {
    if agents.is_empty() {
        return "no agents".into();
    }
    let mut t = table(&["AGENT", "HOST", "CPUS", "MEM", "DISK", "PORTS", "TASKS", "ATTRIBUTES"]);
    for a in agents {
        t.add_row(vec![
            a.id.to_string(),
            a.hostname.clone(),
            format!("{}/{}", a.used.cpus, a.capacity.cpus),
            format!("{}/{}", a.used.mem.human(), a.capacity.mem.human()),
            format!("{}/{}", a.used.disk.human(), a.capacity.disk.human()),
            format!("{}/{}", a.used.ports, a.capacity.ports),
            a.tasks.to_string(),
            a.attributes.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
        ]);
    }
    t.to_string()
}
