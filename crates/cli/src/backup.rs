//! `capstan admin backup FILE`, `capstan admin backup inspect FILE [--dump]` and
//! `capstan admin restore FILE [--dry-run] [--force]`, and the periodic-backup flags of
//! `capstan master`. The file format is `capstan_state::backup`; docs/backup.md.

use crate::mutate;
use crate::output::Output;
use anyhow::Context as _;
use capstan_api::{BackupInfo, Client, RestoreView};
use capstan_master::backup::{backup_info, write_file_atomically, BackupSchedule};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Periodic backups of `capstan master`; the defaults are [`BackupSchedule::default`]'s (a unit
/// test holds them equal).
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Periodic backups (master)")]
pub struct BackupFlags {
    /// Write a backup of the whole state into this directory every --backup-interval
    /// (files `capstan-backup-<UTC time>.backup`). Without it: no periodic backups.
    #[arg(long)]
    backup_dir: Option<PathBuf>,
    /// How often to back up.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    backup_interval: Duration,
    /// How many periodic backups to keep; older ones are deleted.
    #[arg(long, default_value_t = 24)]
    backup_keep: usize,
}

impl BackupFlags {
    pub fn schedule(self) -> anyhow::Result<BackupSchedule> {
        let s = BackupSchedule { dir: self.backup_dir, interval: self.backup_interval, keep: self.backup_keep };
        s.check().map_err(|e| anyhow::anyhow!(e))?;
        Ok(s)
    }
}

/// `backup FILE` or `backup inspect FILE [--dump]`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BackupArgs {
    /// Where to write the backup (atomically: FILE is complete or untouched).
    #[arg(required = true)]
    pub file: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Option<BackupCmd>,
}

#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Check a backup file from end to end (offline) and print its version, time, counts and
    /// checksum.
    Inspect {
        file: PathBuf,
        /// Print the whole state as canonical JSON instead (the same bytes as the master's
        /// `GET /v1/admin/dump` for the same state).
        #[arg(long)]
        dump: bool,
    },
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// A file written by `capstan admin backup` or a periodic backup.
    pub file: PathBuf,
    /// Check everything and say what would be replaced; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Replace a cluster that has jobs.
    #[arg(long)]
    pub force: bool,
}

fn read(file: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

/// Checks `bytes` as a backup, naming the file in the error.
fn inspect(file: &Path, bytes: &[u8]) -> anyhow::Result<capstan_state::backup::Inspected> {
    capstan_state::backup::inspect(bytes).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

pub fn info_text(file: &Path, b: &BackupInfo) -> String {
    let mut lines = vec![
        format!("backup      {}", file.display()),
        format!("taken       {} by capstan {}", b.created_at, b.capstan_version),
        format!("formats     backup {}, state {}", b.backup_format_version, b.snapshot_format_version),
        format!("index       {}", b.store_index),
        format!("jobs        {}", b.jobs),
        format!("tasks       {}", b.tasks),
        format!("agents      {}", b.agents),
        format!("size        {} bytes", b.file_bytes),
        format!("checksum    crc32 {}", b.checksum),
    ];
    if let Some(r) = &b.restored_from {
        lines.push(format!("restored    from {r}"));
    }
    lines.join("\n")
}

pub async fn backup(args: BackupArgs, client: &Client, output: Output) -> anyhow::Result<()> {
    match (args.cmd, args.file) {
        (Some(BackupCmd::Inspect { file, dump }), _) => {
            let bytes = read(&file)?;
            let b = inspect(&file, &bytes)?;
            if dump {
                print!("{}", capstan_state::backup::dump(&b.state));
                return Ok(());
            }
            let info = backup_info(&b);
            output.print(&info, || format!("{}\nOK: every check passed", info_text(&file, &info)));
        }
        (None, Some(file)) => {
            let bytes = client.backup().await?;
            // Checked here too, so that a file that says it is a backup is one.
            let b = inspect(&file, &bytes).context("the master sent a backup that does not pass inspection")?;
            write_file_atomically(&file, &bytes)?;
            let info = backup_info(&b);
            output.print(&info, || {
                format!(
                    "backup of {} jobs, {} tasks, {} agents (index {}) written to {} ({} bytes, crc32 {})",
                    info.jobs,
                    info.tasks,
                    info.agents,
                    info.store_index,
                    file.display(),
                    info.file_bytes,
                    info.checksum
                )
            });
        }
        (None, None) => anyhow::bail!("capstan admin backup needs FILE, or `inspect FILE`"),
    }
    Ok(())
}

pub async fn restore(args: RestoreArgs, client: &Client, output: Output) -> anyhow::Result<()> {
    let bytes = read(&args.file)?;
    // The master checks the file; this capstan may be older or newer than the master.
    let source = args.file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let view = mutate(client, client.restore(bytes, &source, args.dry_run, args.force))
        .await
        .with_context(|| format!("restore from {} refused", args.file.display()))?;
    output.print(&view, || restore_text(&args.file, &view));
    Ok(())
}

fn restore_text(file: &Path, v: &RestoreView) -> String {
    let what = format!("{} jobs, {} tasks, {} agents", v.backup.jobs, v.backup.tasks, v.backup.agents);
    let before = format!("{} jobs, {} tasks, {} agents", v.replaced_jobs, v.replaced_tasks, v.replaced_agents);
    match v.index {
        None => format!(
            "dry run: {} passed every check ({what}, taken {}); a restore would replace the cluster's {before}; \
             nothing was changed",
            file.display(),
            v.backup.created_at
        ),
        Some(index) => format!(
            "restored {what} from {} (taken {}) at index {index}; replaced {before}",
            file.display(),
            v.backup.created_at
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Top {
        #[command(subcommand)]
        cmd: Top2,
    }

    #[derive(Subcommand, Debug)]
    enum Top2 {
        Backup(BackupArgs),
        Restore(RestoreArgs),
        Master {
            #[command(flatten)]
            flags: BackupFlags,
        },
    }

    fn parse(args: &[&str]) -> Result<Top2, clap::Error> {
        Top::try_parse_from(std::iter::once("capstan").chain(args.iter().copied())).map(|t| t.cmd)
    }

    #[test]
    fn backup_file_and_backup_inspect_file_both_parse() {
        let Top2::Backup(b) = parse(&["backup", "/tmp/x.backup"]).unwrap() else { panic!() };
        assert_eq!((b.file, b.cmd.is_none()), (Some(PathBuf::from("/tmp/x.backup")), true));

        let Top2::Backup(b) = parse(&["backup", "inspect", "/tmp/x.backup"]).unwrap() else { panic!() };
        assert!(b.file.is_none());
        assert!(
            matches!(b.cmd, Some(BackupCmd::Inspect { ref file, dump: false }) if file == Path::new("/tmp/x.backup"))
        );

        let Top2::Backup(b) = parse(&["backup", "inspect", "f", "--dump"]).unwrap() else { panic!() };
        assert!(matches!(b.cmd, Some(BackupCmd::Inspect { dump: true, .. })));

        // A file named like the subcommand needs a path: `./inspect`.
        let Top2::Backup(b) = parse(&["backup", "./inspect"]).unwrap() else { panic!() };
        assert_eq!(b.file, Some(PathBuf::from("./inspect")));
    }

    #[test]
    fn backup_without_a_file_is_a_usage_error() {
        assert!(parse(&["backup"]).is_err());
        assert!(parse(&["backup", "inspect"]).is_err());
        assert!(parse(&["backup", "a", "b"]).is_err());
        assert!(parse(&["backup", "inspect", "f", "--force"]).is_err());
    }

    #[test]
    fn restore_flags() {
        let Top2::Restore(r) = parse(&["restore", "f"]).unwrap() else { panic!() };
        assert_eq!((r.file, r.dry_run, r.force), (PathBuf::from("f"), false, false));
        let Top2::Restore(r) = parse(&["restore", "f", "--dry-run", "--force"]).unwrap() else { panic!() };
        assert!(r.dry_run && r.force);
        assert!(parse(&["restore"]).is_err());
    }

    #[test]
    fn backup_flags_default_to_the_masters_defaults() {
        let Top2::Master { flags } = parse(&["master"]).unwrap() else { panic!() };
        assert_eq!(flags.schedule().unwrap(), BackupSchedule::default());
        let Top2::Master { flags } =
            parse(&["master", "--backup-dir", "/b", "--backup-interval", "5m", "--backup-keep", "3"]).unwrap()
        else {
            panic!()
        };
        let s = flags.schedule().unwrap();
        assert_eq!((s.dir, s.interval, s.keep), (Some(PathBuf::from("/b")), Duration::from_secs(300), 3));
        let Top2::Master { flags } = parse(&["master", "--backup-keep", "0"]).unwrap() else { panic!() };
        assert!(flags.schedule().unwrap_err().to_string().contains("--backup-keep"));
    }
}
