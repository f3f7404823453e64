//! The HTTP server loop of the master and the agent: accepts connections under a cap (in total
//! and per client address), serves each with HTTP/1.1 under timeouts for headers, idle
//! keep-alive, stalled writes and stalled request bodies, and never stops accepting because the
//! process ran out of file descriptors (it backs off and keeps serving).
//!
//! hyper does the HTTP (its header-read timeout also closes idle keep-alive connections: the
//! timer starts whenever the connection waits for the next request's head); tower-http bounds the
//! gaps in a request body. Only the accept loop and the write-stall guard are written here.

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt as _;
use tower_http::timeout::TimeoutBody;

/// A client must send a request's whole head (request line and headers) within this time, and
/// an idle keep-alive connection is closed after it (slowloris connections end here).
pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// A response write that makes no progress for this long (the client does not read) closes the
/// connection, and with it whatever the answer held.
pub const WRITE_STALL_TIMEOUT_MS: u64 = 30_000;
/// A request body that sends nothing for this long fails (its request is answered with an error).
pub const BODY_READ_STALL_TIMEOUT_MS: u64 = 30_000;
/// Open connections at most, in total (lowered to what the file descriptor limit allows).
pub const CONNECTIONS_MAX: usize = 16_384;
/// Open connections at most from one client address; more are answered 503 and closed.
pub const CONNECTIONS_PER_IP_MAX: usize = 1_024;
/// File descriptors kept for everything but client connections (store, logs, outgoing calls):
/// at least this many, or an eighth of the limit when that is more.
pub const FDS_RESERVED_MIN: usize = 128;
/// After an accept error (out of descriptors, say): the first wait, doubled up to the longest.
pub const ACCEPT_BACKOFF_MIN_MS: u64 = 10;
pub const ACCEPT_BACKOFF_MAX_MS: u64 = 1_000;

/// The limits of one server. `Default` is the constants above.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    pub header_read_timeout_ms: u64,
    pub write_stall_timeout_ms: u64,
    pub body_read_stall_timeout_ms: u64,
    pub connections_max: usize,
    pub connections_per_ip_max: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            header_read_timeout_ms: HEADER_READ_TIMEOUT_MS,
            write_stall_timeout_ms: WRITE_STALL_TIMEOUT_MS,
            body_read_stall_timeout_ms: BODY_READ_STALL_TIMEOUT_MS,
            connections_max: CONNECTIONS_MAX,
            connections_per_ip_max: CONNECTIONS_PER_IP_MAX,
        }
    }
}

impl ServeConfig {
    /// Checks the settings; an error names the setting.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("header read timeout", self.header_read_timeout_ms),
            ("write stall timeout", self.write_stall_timeout_ms),
            ("body read stall timeout", self.body_read_stall_timeout_ms),
        ] {
            if v == 0 {
                return Err(format!("the {name} must be longer than 0 ms"));
            }
        }
        if self.connections_max == 0 || self.connections_per_ip_max == 0 {
            return Err("--max-connections and --max-connections-per-ip must be at least 1".into());
        }
        Ok(())
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (as Go's runtime does), and
/// returns the soft limit now in force (`None` if it cannot be read).
pub fn raise_nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    Some(lim.rlim_cur)
}

/// The total connection cap: `configured`, lowered so that the descriptor limit `nofile` keeps
/// its reserve for everything else.
pub fn connection_cap(configured: usize, nofile: Option<u64>) -> usize {
    let Some(nofile) = nofile else { return configured };
    let nofile = usize::try_from(nofile).unwrap_or(usize::MAX);
    let reserve = FDS_RESERVED_MIN.max(nofile / 8);
    configured.min(nofile.saturating_sub(reserve)).max(1)
}

/// Open connections per client address, released by `IpSlot`'s drop.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot { table: self.clone(), ip })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut t = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.ip);
            }
        }
    }
}

/// What a client over its address's cap of `max` reads before the connection closes.
fn too_many_from_you(max: usize) -> Vec<u8> {
    let body = serde_json::json!({"error": {
        "code": "too_many_connections",
        "message": format!("more than {max} open connections from your address; close idle ones and retry"),
        "details": [],
    }})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\nconnection: close\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Whether an accept error is about one connection (go on at once) rather than the process
/// (out of descriptors or memory: wait, then go on).
fn connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// Serves `service` on `listener` until the task is aborted. Never returns on its own.
pub async fn serve<S, B>(listener: TcpListener, service: S, config: ServeConfig)
where
    S: tower::Service<
            http::Request<TimeoutBody<Incoming>>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let cap = connection_cap(config.connections_max, raise_nofile_limit());
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    let per_ip = Arc::new(PerIp::default());
    let mut backoff_ms = ACCEPT_BACKOFF_MIN_MS;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(config.header_read_timeout_ms))
        .keep_alive(true);
    let body_stall = Duration::from_millis(config.body_read_stall_timeout_ms);
    let write_stall = Duration::from_millis(config.write_stall_timeout_ms);
    let mut capped_said = false;
    let refusal = too_many_from_you(config.connections_per_ip_max);
    loop {
        // A slot first: at the cap, connections wait in the kernel's backlog, not in our memory.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(s) => s,
            Err(_) => {
                if !capped_said {
                    tracing::warn!("{cap} connections are open (the cap): new ones wait until some close");
                    capped_said = true;
                }
                slots.clone().acquire_owned().await.expect("the semaphore is never closed")
            }
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff_ms = ACCEPT_BACKOFF_MIN_MS;
                capped_said = false;
                accepted
            }
            Err(e) if connection_error(&e) => continue,
            Err(e) => {
                tracing::error!("cannot accept a connection: {e}; retrying in {backoff_ms} ms");
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(ACCEPT_BACKOFF_MAX_MS);
                continue;
            }
        };
        let Some(ip_slot) = per_ip.take(peer.ip(), config.connections_per_ip_max) else {
            // Best effort, never waiting: the answer fits the socket's buffer.
            let _ = stream.try_write(&refusal);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(WriteStall::new(stream, write_stall));
        let service = service.clone();
        let hyper_service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
            service.clone().oneshot(req.map(|body| TimeoutBody::new(body_stall, body)))
        });
        let conn = http.serve_connection(io, hyper_service);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection from {peer} ended: {e}");
            }
            drop((slot, ip_slot));
        });
    }
}

/// A stream whose writes fail (`TimedOut`) once one waited `limit` without progress.
struct WriteStall {
    io: TcpStream,
    limit: Duration,
    stalled_since: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteStall {
    fn new(io: TcpStream, limit: Duration) -> WriteStall {
        WriteStall { io, limit, stalled_since: None }
    }

    /// Passes a write's outcome on, arming the deadline while it waits and clearing it on progress.
    fn watch<T>(&mut self, cx: &mut Context<'_>, outcome: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match outcome {
            Poll::Ready(r) => {
                self.stalled_since = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let limit = self.limit;
                let deadline = self.stalled_since.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client read nothing for {} ms", limit.as_millis()),
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncRead for WriteStall {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteStall {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let outcome = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, outcome)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let outcome = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, outcome)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let outcome = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, outcome)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let outcome = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_keeps_a_reserve_of_descriptors() {
        assert_eq!(connection_cap(CONNECTIONS_MAX, None), CONNECTIONS_MAX);
        assert_eq!(connection_cap(CONNECTIONS_MAX, Some(1024)), 1024 - 128);
        assert_eq!(connection_cap(CONNECTIONS_MAX, Some(8192)), 8192 - 1024);
        assert_eq!(connection_cap(100, Some(1 << 20)), 100);
        assert_eq!(connection_cap(100, Some(10)), 1);
    }

    #[test]
    fn the_refusal_is_a_whole_http_answer() {
        let bytes = too_many_from_you(7);
        let text = std::str::from_utf8(&bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head} / {}", body.len());
        let _: serde_json::Value = serde_json::from_str(body).unwrap();
    }

    #[test]
    fn per_ip_slots_are_counted_and_given_back() {
        let t = Arc::new(PerIp::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = t.take(ip, 2).unwrap();
        let _b = t.take(ip, 2).unwrap();
        assert!(t.take(ip, 2).is_none());
        assert!(t.take("10.0.0.2".parse().unwrap(), 2).is_some());
        drop(a);
        assert!(t.take(ip, 2).is_some());
    }
}
