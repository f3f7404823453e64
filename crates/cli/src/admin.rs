//! `capstan admin …`: operator actions on the whole cluster.

use crate::output::{self, Output};
use crate::{mutate, operator, ClientArgs};
use anyhow::Context as _;
use capstan_api::{
    AdminStatus, ApiError, Client, EventView, EventsPage, FreezeRequest, OperatorRequest, QuotaRequest, QuotaView,
    SchedulerView,
};
use clap::Subcommand;
use std::io::Write as _;
use std::time::{Duration, SystemTime};

#[derive(Subcommand)]
pub enum AdminCmd {
    /// Pause every destructive action of the master until `capstan admin unfreeze`.
    ///
    /// Paused: job and task kills (refused), preemption, agent removals and replacements,
    /// stopping stray tasks. Reads, job creation, status updates and heartbeats keep working.
    /// The freeze survives master restarts.
    Freeze {
        /// Why, for the other operators (shown by `admin status` and on every mutating command).
        #[arg(long, value_parser = non_blank)]
        reason: String,
        /// Who freezes (default: `$USER@hostname`).
        #[arg(long, value_parser = non_blank)]
        by: Option<String>,
    },
    /// Lift a freeze.
    Unfreeze {
        /// Who unfreezes (default: `$USER@hostname`).
        #[arg(long, value_parser = non_blank)]
        by: Option<String>,
    },
    /// The cluster's safety state: freeze, breaker, agents by liveness, removals, settings.
    ///
    /// Also the re-registration period and the stray tasks.
    Status,
    /// The mass-loss breaker (it stops agent removals when many agents vanish at once).
    Breaker {
        #[command(subcommand)]
        cmd: BreakerCmd,
    },
    /// What happened to the cluster, one line each: TIME KIND MESSAGE.
    ///
    /// Agents unreachable, removed or back, the breaker, freezes, stray tasks.
    Events {
        /// Keep waiting for new events and print each as it happens.
        #[arg(long, short)]
        follow: bool,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Production quotas per role.
    Quota {
        #[command(subcommand)]
        cmd: QuotaCmd,
    },
    /// Scheduler levers.
    Scheduler {
        #[command(subcommand)]
        cmd: SchedulerCmd,
    },
    /// Maintenance windows: planned downtime of agents that new long-running tasks avoid.
    Maintenance {
        #[command(subcommand)]
        cmd: crate::drain::MaintenanceCmd,
    },
    /// Job SLAs (`min_healthy`): which agents can go now.
    Sla {
        #[command(subcommand)]
        cmd: crate::drain::SlaCmd,
    },
    /// Save the whole cluster state to FILE (`backup FILE`), or check a backup file offline
    /// (`backup inspect FILE [--dump]`).
    Backup(crate::backup::BackupArgs),
    /// Replace the cluster's state with a backup's, after checking all of it on the master.
    ///
    /// Refused, changing nothing, for a damaged, truncated or newer-format file, and for a
    /// cluster that has jobs unless --force.
    Restore(crate::backup::RestoreArgs),
    /// Every master given with --addr: its role (leader, follower, starting), whom it follows,
    /// the leader's epoch, and where the state lives.
    Masters,
}

#[derive(Subcommand)]
pub enum QuotaCmd {
    /// Set what a role's production jobs may hold at most, in total.
    Set {
        role: String,
        #[arg(long)]
        cpus: f64,
        #[arg(long)]
        mem: String,
        #[arg(long)]
        disk: String,
    },
    /// Every quota and what is used of it.
    List,
    /// Remove a role's quota (it is then not limited).
    Remove { role: String },
}

#[derive(Subcommand)]
pub enum BreakerCmd {
    /// Reset a tripped breaker so that removals may go on (at --agent-removal-rate).
    Reset {
        /// Who resets it (default: `$USER@hostname`).
        #[arg(long, value_parser = non_blank)]
        by: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum SchedulerCmd {
    /// The scheduler's settings and queue.
    Status,
    /// Ceiling on placements per second: a number, or `unlimited`.
    Rate { per_second: String },
}

fn quota_table(quotas: &[QuotaView]) -> String {
    if quotas.is_empty() {
        return "no quotas: every role is unlimited".into();
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL);
    t.set_header(vec!["ROLE", "CPUS", "MEM", "DISK"]);
    for q in quotas {
        t.add_row(vec![
            q.role.clone(),
            format!("{}/{}", q.used.cpus, q.quota.cpus),
            format!("{}/{}", q.used.mem.human(), q.quota.mem.human()),
            format!("{}/{}", q.used.disk.human(), q.quota.disk.human()),
        ]);
    }
    t.to_string()
}

fn scheduler_text(s: &SchedulerView) -> String {
    let rate = s.max_placements_per_second.map_or("unlimited".to_string(), |r| format!("{r}/s"));
    format!("placement rate  {rate}\npending tasks   {}", s.pending_tasks)
}

fn non_blank(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.trim().to_string())
    }
}

/// Settings as their flags of `capstan master` write them.
fn settings_lines(s: &AdminStatus) -> Vec<(String, String)> {
    let ms = |v: u64| humantime::format_duration(Duration::from_millis(v)).to_string();
    let l = &s.settings;
    vec![
        ("--heartbeat-interval".into(), ms(l.heartbeat_interval_ms)),
        ("--agent-timeout".into(), ms(l.agent_timeout_ms)),
        ("--agent-removal-rate".into(), l.agent_removal_rate.clone()),
        ("--breaker-threshold".into(), s.breaker.threshold.to_string()),
        ("--breaker-window".into(), ms(s.breaker.window_ms)),
        ("--fault-domain".into(), s.breaker.fault_domain.clone()),
        ("--reregistration-period".into(), ms(l.reregistration_period_ms)),
        ("--stray-grace".into(), ms(l.stray_grace_ms)),
    ]
}

pub fn status_text(s: &AdminStatus, now: SystemTime) -> String {
    let mut lines: Vec<(String, String)> = vec![];
    let mut line = |k: &str, v: String| lines.push((k.to_string(), v));
    match &s.frozen {
        Some(f) => {
            line("frozen", "YES: kills, preemption, removals, replacements and stray stops are paused".into());
            line("  by", f.by.clone());
            line("  since", output::time_and_relative(&f.since, now));
            line("  reason", f.reason.clone());
        }
        None => line("frozen", "no".into()),
    }
    let b = &s.breaker;
    if b.tripped {
        line("breaker", "TRIPPED: no agent removals until it resets (capstan admin breaker reset)".into());
        if let Some(since) = &b.since {
            line("  since", output::time_and_relative(since, now));
        }
        line("  reason", b.reason.clone().unwrap_or_else(|| "-".into()));
    } else {
        line("breaker", "ok".into());
    }
    line(
        "  trips",
        format!(
            "when more than {}% of the agents become unreachable within {}, or every agent (two or more) \
             with one value of attribute `{}`",
            (b.threshold * 1000.0).round() / 10.0,
            humantime::format_duration(Duration::from_millis(b.window_ms)),
            b.fault_domain
        ),
    );
    line(
        "re-registration",
        match &s.reregistration_until {
            Some(until) => format!(
                "until {}: agents are given time to call in, nothing is concluded about them",
                output::time_and_relative(until, now)
            ),
            None => "over".into(),
        },
    );
    line(
        "agents",
        if s.agents.is_empty() {
            "none".into()
        } else {
            s.agents.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
        },
    );
    line("removals", format!("{} agents removed, {} tasks replaced", s.removals_total, s.tasks_replaced_total));
    line("stray tasks", s.stray_tasks.to_string());
    line("settings", String::new());
    for (flag, value) in settings_lines(s) {
        line(&format!("  {flag}"), value);
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    lines.iter().map(|(k, v)| format!("{k:<width$}  {v}").trim_end().to_string()).collect::<Vec<_>>().join("\n")
}

/// `TIME KIND MESSAGE`.
pub fn event_line(e: &EventView) -> String {
    format!("{}  {:<18}  {}", e.at, e.kind, e.message)
}

fn missed_line(missed: u64) -> String {
    format!("-- {missed} events missed: the master keeps only the most recent ones --")
}

/// At most this many pages are read to catch up before `admin events` prints (the master's ring
/// is bounded, so this is never reached in practice).
const CATCH_UP_PAGES_MAX: usize = 10_000;
/// How long one long-poll of `admin events --follow` waits at the master.
const FOLLOW_WAIT: Duration = Duration::from_secs(30);
/// Retries of `admin events --follow` while the master cannot be reached back off up to this.
const FOLLOW_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Every event after `after` that the master has now, as one page.
async fn events_now(client: &Client, after: u64) -> Result<EventsPage, ApiError> {
    let mut all = EventsPage { events: vec![], next: after, missed: 0 };
    for _ in 0..CATCH_UP_PAGES_MAX {
        let page = client.events(all.next, Duration::ZERO).await?;
        all.missed += page.missed;
        let done = page.events.is_empty() || page.next <= all.next;
        all.next = page.next.max(all.next);
        all.events.extend(page.events);
        if done {
            break;
        }
    }
    Ok(all)
}

/// Worth trying again: the master is away, restarting, or shedding load.
fn transient(e: &ApiError) -> bool {
    match e {
        ApiError::Api { status, .. } => *status == 429 || *status >= 500,
        ApiError::Unreachable { .. } | ApiError::Protocol { .. } => true,
    }
}

/// Prints events as they happen until interrupted.
async fn follow_events(client: &Client, output: Output, mut after: u64) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(500);
    let mut stdout = std::io::stdout();
    loop {
        let page = match client.events(after, FOLLOW_WAIT).await {
            Ok(page) => page,
            Err(e) if transient(&e) => {
                let wait = backoff + backoff.mul_f64(rand::random::<f64>() / 2.0);
                let shown = humantime::format_duration(Duration::from_millis(wait.as_millis() as u64));
                eprintln!("capstan admin events: {e}; trying again in {shown}");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(FOLLOW_BACKOFF_MAX);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        backoff = Duration::from_millis(500);
        if page.missed > 0 {
            match output {
                Output::Table => writeln!(stdout, "{}", missed_line(page.missed))?,
                Output::Json => {
                    eprintln!("warning: {} events missed: the master keeps only the most recent ones", page.missed)
                }
            }
        }
        for e in &page.events {
            match output {
                Output::Table => writeln!(stdout, "{}", event_line(e))?,
                Output::Json => writeln!(stdout, "{}", serde_json::to_string(e).expect("serializable"))?,
            }
        }
        stdout.flush()?;
        after = page.next.max(after);
    }
}

pub async fn run(cmd: AdminCmd, c: &ClientArgs) -> anyhow::Result<()> {
    run_command(cmd, c).await.map_err(|e| match e.downcast_ref::<ApiError>() {
        Some(ApiError::Api { status: 404, code, message, .. }) if code == "not_found" && message == "no such route" => {
            anyhow::anyhow!(
                "{e}: the master at {} does not offer this command (is it older than this capstan?)",
                c.addr
            )
        }
        _ => e,
    })
}

async fn run_command(cmd: AdminCmd, c: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(&c.addr);
    let output: Output = c.output;
    match cmd {
        AdminCmd::Maintenance { cmd } => return crate::drain::maintenance(cmd, &client, output).await,
        AdminCmd::Sla { cmd } => return crate::drain::sla(cmd, &client, output).await,
        AdminCmd::Backup(args) => return crate::backup::backup(args, &client, output).await,
        AdminCmd::Restore(args) => return crate::backup::restore(args, &client, output).await,
        AdminCmd::Masters => return masters(&client, output).await,
        AdminCmd::Freeze { reason, by } => {
            let req = FreezeRequest { reason, by: by.unwrap_or_else(operator) };
            let s = mutate(&client, client.freeze(&req)).await?;
            if let (None, Some(f)) = (client.frozen_notice(), &s.frozen) {
                // The answer to the freeze itself may come before the notice is attached.
                let notice = format!("{} (frozen by {} since {})", f.reason, f.by, f.since);
                eprintln!("{}", output::frozen_warning(&notice));
            }
            output.print(&s, || match &s.frozen {
                Some(f) => format!(
                    "the cluster is frozen (by {} since {}): {}\nkills, preemption, agent removals, replacements and \
                     stray stops are paused until `capstan admin unfreeze`",
                    f.by, f.since, f.reason
                ),
                None => "the master answered, but does not show the cluster frozen".into(),
            });
        }
        AdminCmd::Unfreeze { by } => {
            let s = mutate(&client, client.unfreeze(&OperatorRequest { by: by.unwrap_or_else(operator) })).await?;
            output.print(&s, || match &s.frozen {
                None => "the cluster is no longer frozen".into(),
                Some(f) => format!("the cluster is still frozen (by {} since {}): {}", f.by, f.since, f.reason),
            });
        }
        AdminCmd::Status => {
            let s = client.admin_status().await?;
            output.print(&s, || status_text(&s, SystemTime::now()));
        }
        AdminCmd::Breaker { cmd: BreakerCmd::Reset { by } } => {
            let s = mutate(&client, client.reset_breaker(&OperatorRequest { by: by.unwrap_or_else(operator) })).await?;
            output.print(&s, || match (&s.breaker.tripped, &s.breaker.reason) {
                (false, _) => "breaker reset: agent removals may go on at --agent-removal-rate".into(),
                (true, reason) => {
                    format!("the breaker is still tripped: {}", reason.as_deref().unwrap_or("no reason given"))
                }
            });
        }
        AdminCmd::Events { follow, after } => {
            if follow {
                return follow_events(&client, output, after).await;
            }
            let page = events_now(&client, after).await?;
            output.print(&page, || {
                let mut lines = vec![];
                if page.missed > 0 {
                    lines.push(missed_line(page.missed));
                }
                lines.extend(page.events.iter().map(event_line));
                if lines.is_empty() {
                    lines.push(format!("no events after {after}"));
                }
                lines.join("\n")
            });
        }
        AdminCmd::Quota { cmd: QuotaCmd::Set { role, cpus, mem, disk } } => {
            let mem = mem.parse().map_err(|e: String| anyhow::anyhow!("--mem: {e}"))?;
            let disk = disk.parse().map_err(|e: String| anyhow::anyhow!("--disk: {e}"))?;
            let q = mutate(&client, client.set_quota(&role, &QuotaRequest { cpus, mem, disk })).await?;
            output.print(&q, || quota_table(std::slice::from_ref(&q)));
        }
        AdminCmd::Quota { cmd: QuotaCmd::List } => {
            let qs = client.quotas().await?;
            output.print(&qs, || quota_table(&qs));
        }
        AdminCmd::Quota { cmd: QuotaCmd::Remove { role } } => {
            let v = mutate(&client, client.remove_quota(&role)).await?;
            output.print(&v, || format!("role {role}: quota removed"));
        }
        AdminCmd::Scheduler { cmd: SchedulerCmd::Status } => {
            let s = client.scheduler().await?;
            output.print(&s, || scheduler_text(&s));
        }
        AdminCmd::Scheduler { cmd: SchedulerCmd::Rate { per_second } } => {
            let rate = if per_second == "unlimited" {
                None
            } else {
                Some(
                    per_second
                        .parse::<u32>()
                        .with_context(|| format!("`{per_second}`: give a whole number or `unlimited`"))?,
                )
            };
            let s = mutate(&client, client.set_scheduler(rate)).await?;
            output.print(&s, || scheduler_text(&s));
        }
    }
    Ok(())
}

/// One row per master of `--addr`: what `GET /v1/leader` says, or why it could not be asked.
async fn masters(client: &Client, output: Output) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for addr in client.addrs() {
        let row = match client.leader_of(addr).await {
            Ok(view) => serde_json::to_value(&view).expect("serializable"),
            Err(e) => serde_json::json!({"me": addr, "role": "unreachable", "error": e.to_string()}),
        };
        rows.push(row);
    }
    let leaders = rows.iter().filter(|r| r["role"] == "leader").count();
    output.print(&rows, || output::masters_table(&rows));
    if leaders == 0 {
        anyhow::bail!("no master of {} leads", client.addrs().join(","));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_api::{BreakerView, FreezeView, LivenessSettingsView};

    fn status() -> AdminStatus {
        AdminStatus {
            frozen: Some(FreezeView {
                reason: "rack r3 flaps".into(),
                by: "ops@h1".into(),
                since: "2024-05-01T09:58:00.000Z".into(),
            }),
            breaker: BreakerView {
                tripped: true,
                reason: Some("4 of 10 agents became unreachable within 1m".into()),
                since: Some("2024-05-01T09:59:30.000Z".into()),
                threshold: 0.3,
                window_ms: 60_000,
                fault_domain: "rack".into(),
            },
            reregistration_until: Some("2024-05-01T10:00:20.000Z".into()),
            agents: [("active".to_string(), 6), ("unreachable".to_string(), 4)].into(),
            removals_total: 2,
            tasks_replaced_total: 5,
            stray_tasks: 1,
            settings: LivenessSettingsView {
                heartbeat_interval_ms: 5000,
                agent_timeout_ms: 30_000,
                agent_removal_rate: "1/10s".into(),
                reregistration_period_ms: 30_000,
                stray_grace_ms: 300_000,
            },
        }
    }

    #[test]
    fn admin_status_reads_as_a_page_for_people() {
        let now = humantime::parse_rfc3339_weak("2024-05-01T10:00:00Z").unwrap();
        let want = "\
frozen                     YES: kills, preemption, removals, replacements and stray stops are paused
  by                       ops@h1
  since                    2024-05-01T09:58:00.000Z (2m0s ago)
  reason                   rack r3 flaps
breaker                    TRIPPED: no agent removals until it resets (capstan admin breaker reset)
  since                    2024-05-01T09:59:30.000Z (30s ago)
  reason                   4 of 10 agents became unreachable within 1m
  trips                    when more than 30% of the agents become unreachable within 1m, or every agent (two or more) with one value of attribute `rack`
re-registration            until 2024-05-01T10:00:20.000Z (in 20s): agents are given time to call in, nothing is concluded about them
agents                     6 active, 4 unreachable
removals                   2 agents removed, 5 tasks replaced
stray tasks                1
settings
  --heartbeat-interval     5s
  --agent-timeout          30s
  --agent-removal-rate     1/10s
  --breaker-threshold      0.3
  --breaker-window         1m
  --fault-domain           rack
  --reregistration-period  30s
  --stray-grace            5m";
        assert_eq!(status_text(&status(), now), want);
    }

    #[test]
    fn a_calm_cluster_says_so_briefly() {
        let mut s = status();
        s.frozen = None;
        s.breaker.tripped = false;
        s.reregistration_until = None;
        let text = status_text(&s, SystemTime::now());
        assert!(text.starts_with("frozen                     no\nbreaker                    ok\n  trips"), "{text}");
        assert!(text.contains("\nre-registration            over\n"), "{text}");
    }

    #[test]
    fn an_event_is_one_line_time_kind_message() {
        let e = EventView {
            seq: 7,
            at: "2024-05-01T10:00:00.000Z".into(),
            kind: "frozen".into(),
            message: "frozen by ops@h1: rack r3 flaps".into(),
        };
        assert_eq!(event_line(&e), "2024-05-01T10:00:00.000Z  frozen              frozen by ops@h1: rack r3 flaps");
    }
}
