//! `capstan admin …`: operator actions on the whole cluster.

use crate::output::Output;
use crate::ClientArgs;
use anyhow::Context as _;
use capstan_api::{Client, QuotaRequest, QuotaView, SchedulerView};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum AdminCmd {
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

pub async fn run(cmd: AdminCmd, c: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(&c.addr);
    let output: Output = c.output;
    match cmd {
        AdminCmd::Quota { cmd: QuotaCmd::Set { role, cpus, mem, disk } } => {
            let mem = mem.parse().map_err(|e: String| anyhow::anyhow!("--mem: {e}"))?;
            let disk = disk.parse().map_err(|e: String| anyhow::anyhow!("--disk: {e}"))?;
            let q = client.set_quota(&role, &QuotaRequest { cpus, mem, disk }).await?;
            output.print(&q, || quota_table(std::slice::from_ref(&q)));
        }
        AdminCmd::Quota { cmd: QuotaCmd::List } => {
            let qs = client.quotas().await?;
            output.print(&qs, || quota_table(&qs));
        }
        AdminCmd::Quota { cmd: QuotaCmd::Remove { role } } => {
            let v = client.remove_quota(&role).await?;
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
            let s = client.set_scheduler(rate).await?;
            output.print(&s, || scheduler_text(&s));
        }
    }
    Ok(())
}
