//! `capstan job update …`: start a rolling update and follow it as it happens (one progress line
//! per change: the batch, a bar, each instance of the batch), or `--detach`; and the operator's
//! `promote`, `pause`, `resume`, `abort`, `rollback`, `status` of a job's update.

use crate::output::{final_line, progress_line, update_status_text, Output};
use crate::{job_key, mutate, read_job_file, ClientArgs};
use anyhow::bail;
use capstan_api::wire::UpdateRequest;
use capstan_api::Client;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// How often a followed update is polled.
const FOLLOW_POLL: Duration = Duration::from_millis(500);

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct UpdateArgs {
    #[command(subcommand)]
    cmd: Option<UpdateCmd>,
    /// The job file with the job's new spec.
    #[arg(required = true)]
    file: Option<PathBuf>,
    /// Return as soon as the update started, without following it.
    #[arg(long)]
    detach: bool,
    /// Who asks, for the update's history (default: $USER@hostname).
    #[arg(long)]
    by: Option<String>,
}

#[derive(Subcommand)]
pub enum UpdateCmd {
    /// Go on past the canaries.
    Promote(KeyArgs),
    /// Start no new batch (the batch in flight finishes).
    Pause(KeyArgs),
    /// Go on after a pause.
    Resume(KeyArgs),
    /// Stop the update where it is (instances already updated keep the new version).
    Abort(KeyArgs),
    /// Put the old version back on every instance, batch by batch.
    Rollback(KeyArgs),
    /// The update in progress and the past ones.
    Status { key: String },
    /// Follow the update in progress until it ends.
    Watch { key: String },
}

#[derive(Args)]
pub struct KeyArgs {
    key: String,
    /// Who asks (default: $USER@hostname).
    #[arg(long)]
    by: Option<String>,
}

pub async fn cmd_update(args: UpdateArgs, c: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(&c.addr);
    let by = |b: Option<String>| b.unwrap_or_else(crate::operator);
    let action = |name: &'static str, k: KeyArgs| (name, k);
    let (name, k) = match args.cmd {
        None => {
            let file = args.file.expect("clap requires FILE without a subcommand");
            let spec = read_job_file(&file)?;
            let key = spec.job.to_string();
            let req = UpdateRequest { spec: serde_json::to_value(&spec)?, by: by(args.by) };
            let started = mutate(&client, client.start_update(&key, &req)).await?;
            let Some(u) = &started.active else {
                let last = started.history.first();
                c.output.print(&started, || match last {
                    Some(u) => format!("job {key}: version {}: {}", started.version, u.message),
                    None => format!("job {key}: version {}", started.version),
                });
                return Ok(());
            };
            if args.detach {
                c.output.print(&started, || {
                    format!(
                        "job {key}: update {} from version {} to {} started ({} instance(s) to replace); follow it with `capstan job update watch {key}`",
                        u.id, u.from_version, u.to_version, u.total
                    )
                });
                return Ok(());
            }
            return follow(&client, &key, u.id, c.output).await;
        }
        Some(UpdateCmd::Status { key }) => {
            let key = job_key(&key)?;
            let v = client.job_updates(&key).await?;
            c.output.print(&v, || update_status_text(&v));
            return Ok(());
        }
        Some(UpdateCmd::Watch { key }) => {
            let key = job_key(&key)?;
            let v = client.job_updates(&key).await?;
            let Some(u) = v.active else { bail!("{key} has no update in progress") };
            return follow(&client, &key, u.id, c.output).await;
        }
        Some(UpdateCmd::Promote(k)) => action("promote", k),
        Some(UpdateCmd::Pause(k)) => action("pause", k),
        Some(UpdateCmd::Resume(k)) => action("resume", k),
        Some(UpdateCmd::Abort(k)) => action("abort", k),
        Some(UpdateCmd::Rollback(k)) => action("rollback", k),
    };
    let key = job_key(&k.key)?;
    let v = mutate(&client, client.update_action(&key, name, &by(k.by))).await?;
    c.output.print(&v, || match (&v.active, v.history.first()) {
        (Some(u), _) => format!("job {key}: update {}: {} ({})", u.id, u.state, u.message),
        (None, Some(u)) => format!("job {key}: update {}: {} ({})", u.id, u.state, u.message),
        (None, None) => format!("job {key}: {name} done"),
    });
    Ok(())
}

/// Polls the update until it ends, printing a line whenever its progress changes; an update that
/// did not succeed is an error (non-zero exit status).
async fn follow(client: &Client, key: &str, id: u32, output: Output) -> anyhow::Result<()> {
    let mut last_line = String::new();
    let mut failed_polls = 0;
    loop {
        let v = match client.job_updates(key).await {
            Ok(v) => {
                failed_polls = 0;
                v
            }
            // A master restarting or failing over: keep following.
            Err(e) if failed_polls < 120 => {
                failed_polls += 1;
                if failed_polls == 1 && matches!(output, Output::Table) {
                    eprintln!("(the master does not answer: {e}; still following)");
                }
                tokio::time::sleep(FOLLOW_POLL).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let active = v.active.as_ref().filter(|u| u.id == id);
        let ended = v.history.iter().find(|u| u.id == id);
        match (active, ended) {
            (Some(u), _) => {
                let line = progress_line(u);
                if line != last_line && matches!(output, Output::Table) {
                    println!("{line}");
                    last_line = line;
                }
            }
            (None, Some(u)) => {
                output.print(u, || final_line(u));
                if u.state != "succeeded" {
                    bail!("update {} of {key} ended {}: {}", u.id, u.state, u.message);
                }
                return Ok(());
            }
            (None, None) => bail!("update {id} of {key} is gone (the job was removed?)"),
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}
