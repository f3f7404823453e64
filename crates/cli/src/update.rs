//! `capstan job update …`: start a rolling update and follow it as it happens (one progress line
//! per change: the batch, a bar, each instance of the batch), or `--detach`; and the operator's
//! `promote`, `pause`, `resume`, `abort`, `rollback`, `status` of a job's update.

use crate::output::Output;
use crate::{job_key, mutate, read_job_file, ClientArgs};
use anyhow::bail;
use capstan_api::wire::{JobUpdatesView, UpdateRequest, UpdateView};
use capstan_api::Client;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// How often a followed update is polled.
const FOLLOW_POLL: Duration = Duration::from_millis(500);
/// Width of the progress bar, in characters.
const BAR_WIDTH: usize = 20;

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
    let by = |b: Option<String>| b.unwrap_or_else(crate::admin::operator);
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
            c.output.print(&v, || status_text(&v));
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

fn status_text(v: &JobUpdatesView) -> String {
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
