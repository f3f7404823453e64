//! Health checks of running tasks (`[health_check]` in the job file): one tokio task per checked
//! task probes it over HTTP, TCP or a command and reports state changes as [`HealthEvent`]s.
//!
//! Semantics of [`spawn`] (call it when the task starts running; time counts from the call):
//! - The first check runs at once, then one every `interval` (a slow check delays the next one,
//!   checks never overlap). Each check is bounded by `timeout`.
//! - **Grace period.** A check that *starts* within `grace_period` of the call never counts as a
//!   failure. Checks still run during the grace period, and a success there makes the task
//!   healthy at once.
//! - **Healthy.** [`HealthEvent::Healthy`] on the first success, and again on the first success
//!   after an `Unhealthy`. Successes in between send nothing; a success resets the failure count.
//! - **Unhealthy.** [`HealthEvent::Unhealthy`] once `consecutive_failures` checks in a row have
//!   failed after the grace period (and not again until a success intervenes). A shorter run of
//!   failures sends nothing. The reason names the check and how its last attempt failed, e.g.
//!   `http GET http://127.0.0.1:31005/health returned 500 Internal Server Error (3 checks in a
//!   row)`. The checker keeps checking afterwards; the agent kills the task on `Unhealthy`, so
//!   in practice that is the last event.
//! - It runs until its `JoinHandle` is aborted or the event receiver is dropped (noticed at
//!   once, even mid-check). Dropping the `JoinHandle` alone detaches the task, as with any tokio
//!   task; it then stops when the receiver goes.
//!
//! Kinds of check ([`check_once`]):
//! - `http`: `GET path` on the named port of `target.host` over HTTP/1.1. 2xx and 3xx are healthy.
//!   The client is our own, on purpose: a check reads only the status line (a general client
//!   waits for and parses the whole answer, headers and all, of a server that may be sick), never
//!   follows redirects or proxies, and reports failures in the operator's words ("connection
//!   refused", "the answer is not HTTP: …") rather than a client library's error chain.
//! - `tcp`: a connection to the named port is accepted.
//! - `command`: `/bin/sh -c COMMAND` in the sandbox as the task's user with the task's
//!   environment, inside the task's cgroup, exits with 0 (run by the containerizer, the only
//!   crate that spawns: [`capstan_containerizer::check::run_command_check`]).
//!
//! The agent passes every spec from its orders through [`bounded`] first: checks run at most once
//! per [`HEALTH_CHECK_INTERVAL_MIN_MS`] and each is bounded by [`HEALTH_CHECK_TIMEOUT_MAX_MS`].
//! The job decoder refuses specs outside these limits; `bounded` also holds them for jobs stored
//! before the limits existed. ([`spawn`] itself follows the spec it is given, so that its tests
//! can be quick.)
//!
//! Architecture invariant: this module only observes; killing the task on `Unhealthy` is the
//! caller's decision (`TaskExit::HealthCheckFailed { reason }` with the event's reason).

use capstan_containerizer::check::run_command_check;
use capstan_model::decode::{HEALTH_CHECK_INTERVAL_MIN_MS, HEALTH_CHECK_TIMEOUT_MAX_MS};
use capstan_model::spec::{HealthCheckSpec, HealthCheckType};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::{Instant, MissedTickBehavior};

/// Where and as whom a task is checked.
#[derive(Clone, Debug)]
pub struct CheckTarget {
    /// Where the task's ports listen; `127.0.0.1` for tasks on this host.
    pub host: IpAddr,
    /// The task's ports by name (`[task] ports`), as placed.
    pub ports: BTreeMap<String, u16>,
    /// The task's sandbox: the working directory of command checks.
    pub sandbox: PathBuf,
    /// The task's user: command checks run as this user.
    pub user: String,
    /// The task's environment: command checks get exactly this (plus PATH, HOME, USER, LOGNAME).
    pub env: Vec<(String, String)>,
    /// Whether the agent allows root tasks (a command check as root is refused otherwise).
    pub allow_root: bool,
    /// The task's cgroup directories (one per v1 hierarchy, or the v2 one): command checks run
    /// inside them, so they count against the task's limits and die with it.
    pub cgroup: Vec<PathBuf>,
}

/// A change of a task's health, as seen by its checker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthEvent {
    /// A check passed (the first one, or the first after `Unhealthy`). `detail` says which.
    Healthy { detail: String },
    /// `consecutive_failures` checks in a row failed after the grace period. `reason` is meant
    /// for people and for `TaskExit::HealthCheckFailed`.
    Unhealthy { reason: String },
}

/// `spec` with its interval raised to at least [`HEALTH_CHECK_INTERVAL_MIN_MS`] and its timeout
/// lowered to at most [`HEALTH_CHECK_TIMEOUT_MAX_MS`] and the interval (a spec the decoder
/// accepted today is returned as it is).
pub fn bounded(mut spec: HealthCheckSpec) -> HealthCheckSpec {
    spec.interval.0 = spec.interval.0.max(HEALTH_CHECK_INTERVAL_MIN_MS);
    spec.timeout.0 = spec.timeout.0.min(HEALTH_CHECK_TIMEOUT_MAX_MS).min(spec.interval.0);
    spec
}

/// The longest HTTP status line read before giving up on the answer.
const STATUS_LINE_MAX_BYTES: usize = 8 * 1024;

/// Starts checking the task described by `target` as `spec` says (see the module doc for the
/// timing) and sends every change of health to `events`.
pub fn spawn(
    spec: HealthCheckSpec,
    target: CheckTarget,
    events: UnboundedSender<HealthEvent>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let grace_end = Instant::now() + spec.grace_period.as_std();
        let threshold = spec.consecutive_failures.max(1);
        let mut ticker = tokio::time::interval(spec.interval.as_std().max(std::time::Duration::from_millis(1)));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut state = State::Unknown;
        let mut failures: u32 = 0;
        loop {
            tokio::select! {
                _ = events.closed() => return,
                _ = ticker.tick() => {}
            }
            let started = Instant::now();
            let result = tokio::select! {
                _ = events.closed() => return,
                result = check_once(&spec, &target) => result,
            };
            let event = match result {
                Ok(detail) => {
                    failures = 0;
                    (state != State::Healthy).then(|| {
                        state = State::Healthy;
                        HealthEvent::Healthy { detail }
                    })
                }
                Err(_) if started < grace_end => None,
                Err(failure) => {
                    failures = failures.saturating_add(1);
                    (failures >= threshold && state != State::Unhealthy).then(|| {
                        state = State::Unhealthy;
                        let reason =
                            if threshold > 1 { format!("{failure} ({threshold} checks in a row)") } else { failure };
                        HealthEvent::Unhealthy { reason }
                    })
                }
            };
            if let Some(event) = event {
                if events.send(event).is_err() {
                    return;
                }
            }
        }
    })
}

/// What the checker last reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Unknown,
    Healthy,
    Unhealthy,
}

/// Runs one check now, bounded by `spec.timeout`. `Ok` says what passed, `Err` what failed and
/// how, both in words naming the check (`tcp connect to 127.0.0.1:31005 failed: connection
/// refused`, `command "test -f ready" exited with code 1`, `... timed out after 2s`).
pub async fn check_once(spec: &HealthCheckSpec, target: &CheckTarget) -> Result<String, String> {
    let timeout = spec.timeout.as_std();
    match spec.check_type {
        HealthCheckType::Http => {
            let addr = SocketAddr::new(target.host, port(spec, target, "http")?);
            let path = spec.path.as_deref().unwrap_or("/");
            let what = format!("http GET http://{addr}{path}");
            match tokio::time::timeout(timeout, http_get(addr, path)).await {
                Err(_) => Err(format!("{what} timed out after {}", spec.timeout)),
                Ok(Err(e)) => Err(format!("{what} failed: {}", describe_io(&e))),
                Ok(Ok((code, reason))) => {
                    let status = match axum::http::StatusCode::from_u16(code).ok().and_then(|s| s.canonical_reason()) {
                        Some(canonical) => format!("{code} {canonical}"),
                        None if reason.is_empty() => code.to_string(),
                        None => format!("{code} {reason}"),
                    };
                    let message = format!("{what} returned {status}");
                    if (200..400).contains(&code) {
                        Ok(message)
                    } else {
                        Err(message)
                    }
                }
            }
        }
        HealthCheckType::Tcp => {
            let addr = SocketAddr::new(target.host, port(spec, target, "tcp")?);
            let what = format!("tcp connect to {addr}");
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Err(_) => Err(format!("{what} timed out after {}", spec.timeout)),
                Ok(Err(e)) => Err(format!("{what} failed: {}", describe_io(&e))),
                Ok(Ok(_stream)) => Ok(format!("{what} succeeded")),
            }
        }
        HealthCheckType::Command => {
            let Some(command) = spec.command.as_deref() else {
                return Err("command check without a command".into());
            };
            let outcome = run_command_check(
                command,
                &target.user,
                &target.sandbox,
                &target.env,
                timeout,
                target.allow_root,
                &target.cgroup,
            )
            .await;
            // The containerizer's detail starts with "command "; name the command there.
            let rest = outcome.detail.strip_prefix("command ").unwrap_or(&outcome.detail);
            let message = format!("command {command:?} {rest}");
            if outcome.ok {
                Ok(message)
            } else {
                Err(message)
            }
        }
    }
}

/// The number of the check's named port.
fn port(spec: &HealthCheckSpec, target: &CheckTarget, kind: &str) -> Result<u16, String> {
    let Some(name) = spec.port.as_deref() else {
        return Err(format!("{kind} check without a port"));
    };
    target.ports.get(name).copied().ok_or_else(|| format!("{kind} check: the task has no port named {name:?}"))
}

/// `GET path` over HTTP/1.1; returns the status code and reason phrase of the answer.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: capstan-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        request_target(path)
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let line_end = loop {
        if let Some(i) = head.iter().position(|&b| b == b'\n') {
            break i;
        }
        if head.len() >= STATUS_LINE_MAX_BYTES {
            return Err(invalid("the answer's first line is longer than 8 KiB"));
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(invalid(if head.is_empty() {
                "the connection closed without an answer"
            } else {
                "the connection closed in the middle of the status line"
            }));
        }
        head.extend_from_slice(&buf[..n]);
    };
    parse_status_line(&head[..line_end])
}

/// `HTTP/1.1 200 OK` → (200, "OK").
fn parse_status_line(line: &[u8]) -> std::io::Result<(u16, String)> {
    let line = String::from_utf8_lossy(line);
    let line = line.trim_end_matches('\r');
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    let reason = parts.next().unwrap_or_default().trim();
    if !version.starts_with("HTTP/") || code.len() != 3 {
        let shown: String = line.chars().take(80).collect();
        return Err(invalid(format!("the answer is not HTTP: {shown:?}")));
    }
    let code = code.parse::<u16>().map_err(|_| invalid(format!("the answer has a bad status code: {code:?}")))?;
    Ok((code, reason.to_owned()))
}

/// The path as a request target: bytes that would break the request line are percent-encoded.
fn request_target(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        if b.is_ascii_graphic() {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn invalid(message: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message.into())
}

/// `connection refused`, not `Connection refused (os error 111)`.
fn describe_io(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => {
            let desc = nix::errno::Errno::from_raw(code).desc();
            let mut chars = desc.chars();
            match chars.next() {
                Some(first) => first.to_lowercase().chain(chars).collect(),
                None => e.to_string(),
            }
        }
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_from_before_the_limits_are_bounded() {
        use capstan_model::DurationMs;
        let spec = HealthCheckSpec {
            check_type: HealthCheckType::Command,
            port: None,
            path: None,
            command: Some("true".into()),
            interval: DurationMs(1),
            timeout: DurationMs(1),
            grace_period: DurationMs(0),
            consecutive_failures: 1,
        };
        let b = bounded(spec.clone());
        assert_eq!((b.interval, b.timeout), (DurationMs(HEALTH_CHECK_INTERVAL_MIN_MS), DurationMs(1)));
        let long = bounded(HealthCheckSpec { interval: DurationMs(600_000), timeout: DurationMs(600_000), ..spec });
        assert_eq!((long.interval, long.timeout), (DurationMs(600_000), DurationMs(HEALTH_CHECK_TIMEOUT_MAX_MS)));
        let fine = bounded(HealthCheckSpec { interval: DurationMs(5_000), timeout: DurationMs(2_000), ..long });
        assert_eq!((fine.interval, fine.timeout), (DurationMs(5_000), DurationMs(2_000)));
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r").unwrap(), (200, "OK".into()));
        assert_eq!(
            parse_status_line(b"HTTP/1.0 503 Service Unavailable").unwrap(),
            (503, "Service Unavailable".into())
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 204").unwrap(), (204, String::new()));
        assert!(parse_status_line(b"SSH-2.0-OpenSSH_9.6").unwrap_err().to_string().contains("not HTTP"));
        assert!(parse_status_line(b"HTTP/1.1 2x0 OK").is_err());
    }

    #[test]
    fn request_targets_never_break_the_request_line() {
        assert_eq!(request_target("/health?full=1"), "/health?full=1");
        assert_eq!(request_target("/a b\r\n"), "/a%20b%0D%0A");
        assert_eq!(request_target("/é"), "/%C3%A9");
    }

    #[test]
    fn io_errors_read_in_lower_case() {
        let e = std::io::Error::from_raw_os_error(libc_econnrefused());
        assert_eq!(describe_io(&e), "connection refused");
    }

    fn libc_econnrefused() -> i32 {
        nix::errno::Errno::ECONNREFUSED as i32
    }
}
