//! An etcd server as a child process on free 127.0.0.1 ports, for tests and benchmarks (not for production).
//!
//! The server runs with etcd's request limits pinned to their defaults (`--max-request-bytes
//! 1572864`, `--max-txn-ops 128`), so the store is tested against the limits a stock etcd has, and
//! with auto-compaction off (`--auto-compaction-retention 0`): the store compacts after each
//! snapshot itself. Its output goes to `<data dir>.log` next to the data directory, never to the
//! test's stdout.
//!
//! The binary is `etcd` from `PATH`, or the one named by the `CAPSTAN_ETCD_BIN` environment
//! variable.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the etcd binary to run instead of `etcd` from `PATH`.
pub const ETCD_BIN_ENV: &str = "CAPSTAN_ETCD_BIN";

/// How long [`EtcdProcess::start`] and [`EtcdProcess::restart`] wait for the server to answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A single-member etcd cluster running as a child process; SIGKILLed when dropped.
pub struct EtcdProcess {
    data_dir: PathBuf,
    log_path: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

fn etcd_bin() -> String {
    std::env::var(ETCD_BIN_ENV).unwrap_or_else(|_| "etcd".to_string())
}

/// `Some(reason)` when no usable `etcd` binary is found. Tests print the reason loudly and skip,
/// except when `CI=true`, where they must fail.
pub fn etcd_missing() -> Option<String> {
    let bin = etcd_bin();
    match Command::new(&bin).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(status) if status.success() => None,
        Ok(status) => Some(format!("`{bin} --version` failed ({status}); install etcd (Debian: etcd-server)")),
        Err(error) => Some(format!(
            "cannot run `{bin}` ({error}); install etcd (Debian: `apt-get install etcd-server`) \
             or set {ETCD_BIN_ENV} to its path"
        )),
    }
}

/// For tests that need etcd: true when it can run. Otherwise says loudly that `test` skips and
/// returns false — except under `CI=true`, where a missing etcd fails the test.
pub fn etcd_or_skip(test: &str) -> bool {
    let Some(why) = etcd_missing() else { return true };
    assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{test}: etcd is needed in CI: {why}");
    eprintln!("\n!!!!! SKIPPED {test}: {why} !!!!!\n");
    false
}

fn free_port() -> std::io::Result<u16> {
    // Bind to port 0 and release it: racy in theory, good enough for tests on one machine.
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdProcess {
    /// Starts etcd with its data in `data_dir` (created by etcd) on two free ports, and waits
    /// until it answers `/health`.
    pub fn start(data_dir: &Path) -> std::io::Result<EtcdProcess> {
        let client_port = free_port()?;
        let mut peer_port = free_port()?;
        while peer_port == client_port {
            peer_port = free_port()?;
        }
        let name = data_dir.file_name().map_or_else(|| "etcd".into(), |n| n.to_string_lossy().into_owned());
        let log_path = match data_dir.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.join(format!("{name}.log")),
            _ => std::env::temp_dir().join(format!("capstan-etcd-{client_port}.log")),
        };
        let mut process =
            EtcdProcess { data_dir: data_dir.to_path_buf(), log_path, client_port, peer_port, child: None };
        process.spawn_and_wait()?;
        Ok(process)
    }

    /// "etcd://127.0.0.1:PORT", for [`EtcdConfig::from_url`](crate::EtcdConfig::from_url).
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    /// "http://127.0.0.1:PORT", the client endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The file etcd's output goes to.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGKILL and reaps the process. Nothing happens if it is not running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean it already exited; wait reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again with the same data directory and ports (after [`kill9`](Self::kill9));
    /// waits until it answers. Kills a still running server first.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill9();
        self.spawn_and_wait()
    }

    fn spawn_and_wait(&mut self) -> std::io::Result<()> {
        let log = OpenOptions::new().create(true).append(true).open(&self.log_path).map_err(|error| {
            std::io::Error::new(error.kind(), format!("opening etcd log {}: {error}", self.log_path.display()))
        })?;
        let log_err = log.try_clone()?;
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(etcd_bin())
            .arg("--name=n1")
            .arg(format!("--data-dir={}", self.data_dir.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=n1={peer}"))
            .arg("--max-request-bytes=1572864")
            .arg("--max-txn-ops=128")
            .arg("--auto-compaction-retention=0")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .map_err(|error| std::io::Error::new(error.kind(), format!("starting `{}`: {error}", etcd_bin())))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Err(std::io::Error::other(format!(
                        "etcd exited at start ({status}); its log {}:\n{}",
                        self.log_path.display(),
                        log_tail(&self.log_path)
                    )));
                }
            }
            if healthy(self.client_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill9();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "etcd did not answer on port {} within {START_TIMEOUT:?}; its log {}:\n{}",
                        self.client_port,
                        self.log_path.display(),
                        log_tail(&self.log_path)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// True when `GET /health` on the client port says the member is healthy.
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

/// The last few lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
