//! A real `capstan master` as a child process of a benchmark or scenario, so that its memory and
//! CPU are its own and it can be paused (SIGSTOP) like a master stalled by its host.

use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

/// How long the master may take to serve after it was started.
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);

/// The master as a child process; killed when dropped (error, Ctrl-C) or by [`MasterProcess::stop`].
pub struct MasterProcess {
    child: tokio::process::Child,
    pub pid: u32,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its stderr (the log).
    pub log: PathBuf,
}

/// The last `lines` lines of a log, for an error message.
fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl MasterProcess {
    /// Starts `exe master --data-dir DATA_DIR --bind 127.0.0.1:0 ARGS…` with its log in `log`, and
    /// waits until it serves.
    pub async fn start(exe: &Path, data_dir: &Path, log: &Path, args: &[String]) -> anyhow::Result<MasterProcess> {
        let log_file = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        // The open-file limit was raised in this process already; the child inherits it.
        let mut command = tokio::process::Command::new(exe);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // Even if this process is SIGKILLed, the master goes with it. (The signal follows
                // the spawning thread, a runtime worker that lives as long as the process.)
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command
            .arg("master")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--bind", "127.0.0.1:0"])
            // Every simulated agent connects from this one address.
            .args(["--max-connections-per-ip", "1000000"])
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start `{} master`", exe.display()))?;
        let pid = child.id().context("the master exited at once")?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let url = tokio::time::timeout(SERVE_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("capstan master serving at ") {
                    return Ok(url.trim().to_string());
                }
            }
            anyhow::bail!("the master exited before it served")
        })
        .await
        .map_err(|_| anyhow::anyhow!("the master did not serve within {} s", SERVE_TIMEOUT.as_secs()))
        .and_then(|r| r)
        .with_context(|| format!("its log {} ends with:\n{}", log.display(), log_tail(log, 20)))?;
        // Keep reading its stdout so that a later line never meets a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(MasterProcess { child, pid, url, log: log.to_path_buf() })
    }

    /// SIGSTOP: the master stalls as a whole (every thread), as under a hung host or a long GC.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGSTOP).context("cannot SIGSTOP the master")
    }

    /// SIGCONT after [`MasterProcess::pause`].
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGCONT).context("cannot SIGCONT the master")
    }

    fn signal(&self, signal: libc::c_int) -> std::io::Result<()> {
        let pid = libc::pid_t::try_from(self.pid).map_err(|_| std::io::Error::other("pid out of range"))?;
        // SAFETY: kill has no memory preconditions; the pid is our own child's, which we have not
        // reaped (the Child is alive), so it cannot name another process.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether it still runs (it did not exit or crash).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}
