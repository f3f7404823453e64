//! `capstan agent drain|undrain`, `capstan admin maintenance …` and `capstan admin sla
//! safe-to-drain`: taking agents out of service without breaking any job's SLA
//! (docs/maintenance.md).

use crate::output::{self, Output};
use crate::{mutate, ClientArgs};
use anyhow::{bail, Context as _};
use capstan_api::{AgentView, Client, MaintenanceRequest, MaintenanceView, OperatorRequest, SafeToDrainView};
use capstan_model::AgentId;
use clap::Subcommand;
use std::time::{Duration, SystemTime};

#[derive(Subcommand)]
pub enum MaintenanceCmd {
    /// Plan maintenance of agents: from 30 minutes before --start until it ends, no new
    /// long-running (service, system) task goes to them; during it, no new task at all.
    ///
    /// Running tasks are not moved: drain the agents (`capstan agent drain`) when it is time.
    Schedule {
        /// Agent ids or host names, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        agents: Vec<String>,
        /// `now`, `+DURATION` (from now, e.g. `+2h`), or an RFC 3339 time (`2025-06-01T22:00:00Z`).
        #[arg(long)]
        start: String,
        /// How long it lasts (`90m`, `4h`).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Who plans it (default: `$USER@hostname`).
        #[arg(long)]
        by: Option<String>,
    },
    /// Every window still scheduled, underway or just ended.
    List,
    /// Cancel a window.
    Cancel {
        id: u64,
        /// Who cancels it (default: `$USER@hostname`).
        #[arg(long)]
        by: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum SlaCmd {
    /// Agents that can be drained now, all together, without any job falling below its SLA.
    ///
    /// A job with `min_healthy` keeps its share; a job without keeps --percent of its
    /// instances healthy. Agents already draining count as gone.
    SafeToDrain {
        /// The share (0-100) of its instances a job without `min_healthy` must keep healthy.
        #[arg(long)]
        percent: f64,
    },
}

/// An agent id, or the host name of exactly one agent.
async fn resolve_agent(client: &Client, text: &str) -> anyhow::Result<AgentId> {
    if let Ok(id) = text.trim().parse::<AgentId>() {
        return Ok(id);
    }
    let agents = client.agents().await?;
    let matching: Vec<&AgentView> = agents.iter().filter(|a| a.hostname == text.trim()).collect();
    match matching.as_slice() {
        [one] => Ok(one.id),
        [] => bail!("`{text}` is neither an agent id (16 hexadecimal digits) nor the host name of an agent"),
        many => bail!(
            "{} agents run on host `{text}`: name one by id ({})",
            many.len(),
            many.iter().map(|a| a.id.to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// `now`, `+DURATION` or an RFC 3339 time, as RFC 3339.
fn parse_start(text: &str, now: SystemTime) -> anyhow::Result<String> {
    let text = text.trim();
    let at = if text == "now" {
        now
    } else if let Some(rest) = text.strip_prefix('+') {
        now + humantime::parse_duration(rest).with_context(|| format!("--start {text}: `{rest}` is not a duration"))?
    } else {
        humantime::parse_rfc3339_weak(text).with_context(|| {
            format!("--start {text}: use `now`, `+DURATION` (e.g. `+2h`) or an RFC 3339 time (2025-06-01T22:00:00Z)")
        })?
    };
    Ok(humantime::format_rfc3339_millis(at).to_string())
}

pub async fn drain(id: &str, by: Option<String>, undrain: bool, c: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(&c.addr);
    let agent = resolve_agent(&client, id).await?;
    let req = OperatorRequest { by: by.unwrap_or_else(crate::operator) };
    let view = if undrain {
        mutate(&client, client.undrain_agent(agent, &req)).await?
    } else {
        mutate(&client, client.drain_agent(agent, &req)).await?
    };
    c.output.print(&view, || match &view.drain {
        Some(d) => format!(
            "agent {} ({}) is {}: nothing new is placed there; {}\nfollow it with `capstan agent list` or \
             `capstan admin events --follow`",
            view.id, view.hostname, d.status, d.progress
        ),
        None => format!("agent {} ({}) takes new tasks again", view.id, view.hostname),
    });
    Ok(())
}

fn maintenance_table(windows: &[MaintenanceView], now: SystemTime) -> String {
    if windows.is_empty() {
        return "no maintenance windows".into();
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL);
    t.set_header(vec!["ID", "PHASE", "START", "END", "AGENTS", "BY"]);
    for w in windows {
        t.add_row(vec![
            w.id.to_string(),
            w.phase.clone(),
            output::time_and_relative(&w.start, now),
            output::time_and_relative(&w.end, now),
            w.agents.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","),
            w.by.clone(),
        ]);
    }
    t.to_string()
}

pub async fn maintenance(cmd: MaintenanceCmd, client: &Client, out: Output) -> anyhow::Result<()> {
    let now = SystemTime::now();
    match cmd {
        MaintenanceCmd::Schedule { agents, start, duration, by } => {
            let mut ids = Vec::new();
            for a in agents.iter().filter(|a| !a.trim().is_empty()) {
                ids.push(resolve_agent(client, a).await?);
            }
            let req = MaintenanceRequest {
                agents: ids,
                start: parse_start(&start, now)?,
                duration_ms: duration.as_millis() as u64,
                by: by.unwrap_or_else(crate::operator),
            };
            let w = mutate(client, client.schedule_maintenance(&req)).await?;
            out.print(&w, || {
                format!(
                    "maintenance window {} ({}): {} agent(s) from {} to {}; new long-running tasks avoid them",
                    w.id,
                    w.phase,
                    w.agents.len(),
                    output::time_and_relative(&w.start, now),
                    output::time_and_relative(&w.end, now)
                )
            });
        }
        MaintenanceCmd::List => {
            let windows = client.maintenance().await?;
            out.print(&windows, || maintenance_table(&windows, now));
        }
        MaintenanceCmd::Cancel { id, by } => {
            let req = OperatorRequest { by: by.unwrap_or_else(crate::operator) };
            let w = mutate(client, client.cancel_maintenance(id, &req)).await?;
            out.print(&w, || format!("maintenance window {} cancelled", w.id));
        }
    }
    Ok(())
}

fn safe_text(v: &SafeToDrainView) -> String {
    let mut lines = vec![];
    if v.safe.is_empty() {
        lines.push("no agent can be drained now without breaking a job's SLA".to_string());
    } else {
        lines.push(format!("{} agent(s) can be drained now, together:", v.safe.len()));
        for a in &v.safe {
            lines.push(format!("  {}  {}  ({} healthy service tasks)", a.agent, a.hostname, a.serving_tasks));
        }
    }
    if !v.not_safe.is_empty() {
        lines.push("not now:".into());
        for a in &v.not_safe {
            lines.push(format!("  {}  {}  {}", a.agent, a.hostname, a.reason.as_deref().unwrap_or("-")));
        }
    }
    lines.join("\n")
}

pub async fn sla(cmd: SlaCmd, client: &Client, out: Output) -> anyhow::Result<()> {
    match cmd {
        SlaCmd::SafeToDrain { percent } => {
            if !(0.0..=100.0).contains(&percent) {
                bail!("--percent {percent}: use a number from 0 to 100");
            }
            let v = client.safe_to_drain(percent).await?;
            out.print(&v, || safe_text(&v));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_is_now_a_time_from_now_or_an_rfc3339_time() {
        let now = humantime::parse_rfc3339_weak("2025-06-01T10:00:00Z").unwrap();
        assert_eq!(parse_start("now", now).unwrap(), "2025-06-01T10:00:00.000Z");
        assert_eq!(parse_start("+2h", now).unwrap(), "2025-06-01T12:00:00.000Z");
        assert_eq!(parse_start("2025-06-02T22:30:00Z", now).unwrap(), "2025-06-02T22:30:00.000Z");
        let e = parse_start("tomorrow", now).unwrap_err();
        assert!(format!("{e:#}").contains("RFC 3339"), "{e:#}");
    }
}
