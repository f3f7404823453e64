//! Hostile network clients against a real `capstan master` process: slowloris connections, more
//! connections than the master has file descriptors, a 1 GiB restore (memory measured), garbage
//! and concurrent restores, slow readers of large lists, health while the log replays, and agent
//! addresses that would turn the log proxy into a request to anywhere.

#[path = "../../cli/tests/common/mod.rs"]
mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The master's header-read timeout (capstan_api::serve::HEADER_READ_TIMEOUT_MS).
const HEADER_TIMEOUT: Duration = Duration::from_millis(capstan_api::serve::HEADER_READ_TIMEOUT_MS);

/// One `capstan master` process on the embedded store; killed on drop.
struct Master {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    nofile: Option<u64>,
}

impl Master {
    fn start() -> Master {
        Self::start_with(None)
    }

    /// With `nofile`: the master's `RLIMIT_NOFILE` (soft and hard) is set to it before it starts.
    fn start_with(nofile: Option<u64>) -> Master {
        let dir = tempfile::Builder::new().prefix("capstan-net-").tempdir().expect("temporary directory");
        let addr = free_addr();
        let mut m = Master { child: None, addr, dir, nofile };
        m.spawn();
        m.wait_serves();
        m
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("the master runs").id()
    }

    /// Starts the process and returns at once (it may still be loading its state).
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("master.log"))
            .expect("log file");
        let mut cmd = Command::new(CAPSTAN);
        cmd.args(["master", "--bind", &self.addr.to_string(), "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--heartbeat-interval", "10m", "--agent-timeout", "1h"])
            .env_remove("CAPSTAN_ADDR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        self.child = Some(cmd.spawn().expect("spawning capstan master"));
    }

    fn wait_serves(&self) {
        wait_until(SOON, "the master serves", || match get(self.addr, "/v1/jobs") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        });
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("master.log")).unwrap_or_default()
    }

    /// The master's peak resident memory (`VmHWM` in /proc/PID/status), in bytes.
    fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc/PID/status");
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("a VmHWM line");
        let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmHWM in kB");
        kib * 1024
    }

    fn create_job(&self, key: &str, instances: u32) {
        let spec = json!({
            "job": key, "type": "service", "instances": instances,
            "task": {"command": "sleep 600", "user": "nobody", "cpus": 64, "mem": "1GiB", "disk": "1GiB"},
        });
        let (status, body) = request(self.addr, "POST", "/v1/jobs", &serde_json::to_vec(&spec).unwrap())
            .unwrap_or_else(|e| panic!("creating {key}: {e}"));
        assert_eq!(status, 201, "creating {key}: {body}");
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("----- master log (last lines) -----\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        self.kill();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port")
}

/// Raises this test process's descriptor limit to at least `want` (the hard limit too, which
/// root may), or at least to its hard limit; returns the soft limit now in force.
fn raise_own_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain rlimit calls on structs we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let raised = libc::rlimit { rlim_cur: lim.rlim_max.max(want), rlim_max: lim.rlim_max.max(want) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            let soft = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// One HTTP/1.1 request on a fresh connection from `from` (a loopback address), answered within
/// 5 s: the status and the body as JSON (or text).
fn request_from(from: &str, addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Result<(u16, Value), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let exchange = async {
            let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
            socket.bind(format!("{from}:0").parse().unwrap()).map_err(|e| e.to_string())?;
            let mut s = socket.connect(addr).await.map_err(|e| format!("connect: {e}"))?;
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
            s.write_all(body).await.map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.map_err(|e| format!("read: {e}"))?;
            parse_answer(&out)
        };
        match tokio::time::timeout(Duration::from_secs(5), exchange).await {
            Ok(r) => r,
            Err(_) => Err("no answer within 5 s".into()),
        }
    })
}

fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Result<(u16, Value), String> {
    request_from("127.0.0.1", addr, method, path, body)
}

fn get(addr: SocketAddr, path: &str) -> Result<(u16, Value), String> {
    request(addr, "GET", path, b"")
}

/// Status and body of a whole HTTP/1.1 answer (chunked bodies are not expected on error answers;
/// a chunked success body is returned as `Value::Null`).
fn parse_answer(raw: &[u8]) -> Result<(u16, Value), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("no HTTP answer: {text:?}"))?;
    let status: u16 =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| format!("no status in {head:?}"))?;
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let value = if chunked { Value::Null } else { serde_json::from_str(body).unwrap_or(Value::String(body.into())) };
    Ok((status, value))
}

/// Whether the server closed `s` (EOF or reset), without waiting.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue, // an answer (408, say) before the close
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    closed
}

#[test]
fn slowloris_connections_are_closed_within_the_header_timeout_and_do_not_stop_others() {
    let m = Master::start();
    const SLOW: usize = 200;
    let mut slow: Vec<Option<TcpStream>> = (0..SLOW)
        .map(|_| {
            let mut s = TcpStream::connect(m.addr).expect("connect");
            s.write_all(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n").unwrap();
            Some(s)
        })
        .collect();
    // A header byte every second from each; the server must close them all, and answer others
    // meanwhile.
    // Past the header timeout, how long the server may take to close them all before the test fails.
    const GRACE: Duration = Duration::from_secs(20);
    let deadline = Instant::now() + HEADER_TIMEOUT + GRACE;
    loop {
        let (status, _) = get(m.addr, "/v1/jobs").expect("a normal request is answered beside slowloris connections");
        assert_eq!(status, 200);
        for slot in slow.iter_mut() {
            let Some(s) = slot else { continue };
            if closed_by_server(s) || s.write_all(b"X").is_err() {
                *slot = None;
            }
        }
        let open = slow.iter().filter(|s| s.is_some()).count();
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} of {SLOW} connections sending a header byte per second are still open {} s after the header \
             timeout of {} s",
            GRACE.as_secs(),
            HEADER_TIMEOUT.as_secs()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn more_connections_than_descriptors_leave_the_master_answering() {
    // The master gets 2,048 descriptors; one client opens 2,200 idle connections.
    assert!(raise_own_nofile(4_096) >= 2_600, "this test needs 2,600 descriptors (ulimit -Hn, or root)");
    let mut m = Master::start_with(Some(2_048));
    let mut held: Vec<TcpStream> = vec![];
    for _ in 0..2_200 {
        match TcpStream::connect_timeout(&m.addr, Duration::from_secs(2)) {
            Ok(s) => held.push(s),
            Err(_) => break, // the backlog is full: that is the client's problem
        }
    }
    assert!(held.len() > 2_048, "only {} connections could be opened", held.len());
    // Another client (another address) is answered throughout: one address gets at most its
    // share of the connections.
    for _ in 0..5 {
        let answer = request_from("127.0.0.2", m.addr, "GET", "/v1/health", b"");
        assert!(matches!(answer, Ok((200, _))), "health from another client: {answer:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Connections from many addresses, beyond the total cap: the master lives, and answers a
    // fresh client once they are closed.
    for i in 3..6 {
        let from = format!("127.0.0.{i}");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for _ in 0..700 {
            let s = rt.block_on(async {
                let socket = tokio::net::TcpSocket::new_v4().ok()?;
                socket.bind(format!("{from}:0").parse().unwrap()).ok()?;
                tokio::time::timeout(Duration::from_secs(2), socket.connect(m.addr)).await.ok()?.ok()
            });
            match s.and_then(|s| s.into_std().ok()) {
                Some(s) => held.push(s),
                None => break,
            }
        }
    }
    assert!(m.alive(), "the master died with {} connections open", held.len());
    drop(held);
    wait_until(SOON, "a fresh client is answered once the others closed", || {
        ensure(matches!(get(m.addr, "/v1/health"), Ok((200, _))), get(m.addr, "/v1/health"))
    });
    assert!(m.alive());
}

/// The head of a backup whose header says its state is `state_bytes` long (the envelope's
/// checksum is left 0: the file is refused as damaged once it has arrived whole).
fn backup_head(state_bytes: u64) -> Vec<u8> {
    use capstan_state::backup::{BackupHeader, BACKUP_FORMAT_VERSION, MAGIC};
    let header = BackupHeader {
        backup_format_version: BACKUP_FORMAT_VERSION,
        created_at: capstan_model::Timestamp(1),
        capstan_version: "test".into(),
        store_index: 1,
        snapshot_format_version: capstan_state::codec::SNAPSHOT_FORMAT_VERSION,
        jobs: 0,
        tasks: 0,
        agents: 0,
        state_bytes,
        state_crc32: 0,
    };
    let json = serde_json::to_vec(&header).unwrap();
    let mut head = MAGIC.to_vec();
    head.extend_from_slice(&BACKUP_FORMAT_VERSION.to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    head.extend_from_slice(&(json.len() as u32).to_le_bytes());
    head.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
    head.extend_from_slice(&json);
    head.extend_from_slice(&capstan_state::codec::SNAPSHOT_FORMAT_VERSION.to_le_bytes());
    head
}

/// Opens a restore of `total` bytes and sends its first `first` bytes.
fn begin_restore(addr: SocketAddr, total: u64, first: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(s, "POST /v1/admin/restore?dry_run=true HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n\r\n").unwrap();
    s.write_all(first).unwrap();
    s
}

fn read_answer(s: &mut TcpStream, within: Duration) -> Result<(u16, Value), String> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if let Ok((status, v @ Value::Object(_))) = parse_answer(&out) {
                    return Ok((status, v));
                }
            }
            Err(e) => return Err(format!("no whole answer ({e}); got {:?}", String::from_utf8_lossy(&out))),
        }
    }
    parse_answer(&out)
}

#[test]
fn a_1_gib_restore_is_streamed_in_bounded_memory() {
    const BODY_BYTES: u64 = 1 << 30;
    let m = Master::start();
    // The header's length depends on the number it holds: one of the same width first.
    let width = backup_head(BODY_BYTES).len() as u64;
    let head = backup_head(BODY_BYTES - (width - 2));
    assert_eq!(head.len() as u64, width, "the head's length is what the header's state length assumes");
    let mut s = begin_restore(m.addr, BODY_BYTES, &head);
    let chunk = vec![0u8; 1 << 20];
    let mut sent = head.len() as u64;
    while sent < BODY_BYTES {
        let n = chunk.len().min((BODY_BYTES - sent) as usize);
        s.write_all(&chunk[..n]).expect("the master takes the whole body");
        sent += n as u64;
    }
    let (status, body) = read_answer(&mut s, Duration::from_secs(120)).expect("an answer");
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_backup")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("checksum mismatch"), "{body}");
    let peak = m.peak_rss_bytes();
    assert!(
        peak < BODY_BYTES / 4,
        "the master's peak resident memory was {} MiB for a {} MiB restore body",
        peak >> 20,
        BODY_BYTES >> 20
    );
    assert!(!m.dir.path().join("data").join("restore.upload").exists(), "the refused upload is removed");
}

#[test]
fn a_garbage_restore_is_refused_from_its_first_bytes() {
    let m = Master::start();
    // A 1 GiB body is announced; only 64 KiB of garbage is sent, and the answer comes anyway.
    let mut s = begin_restore(m.addr, 1 << 30, &vec![b'x'; 64 * 1024]);
    let (status, body) = read_answer(&mut s, Duration::from_secs(10)).expect("an answer before the body is sent");
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_backup")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("not a Capstan backup"), "{body}");
}

#[test]
fn restores_run_one_at_a_time() {
    let m = Master::start();
    let head = backup_head(1 << 20);
    let mut first = begin_restore(m.addr, head.len() as u64 + (1 << 20), &head);
    wait_until(SOON, "a second restore is refused while the first one is under way", || {
        match request(m.addr, "POST", "/v1/admin/restore?dry_run=true", b"garbage") {
            Ok((409, body)) if body["error"]["code"] == "restore_in_progress" => Ok(()),
            other => {
                // The probe may have come first, and the first restore been refused: begin it again.
                if closed_by_server(&mut first) {
                    first = begin_restore(m.addr, head.len() as u64 + (1 << 20), &head);
                }
                Err(format!("{other:?}"))
            }
        }
    });
    // The first one is still under way: its answer has not come.
    assert!(!closed_by_server(&mut first), "the first restore ended while it was still being sent");
    drop(first);
    wait_until(SOON, "the next restore is taken once the first one ended", || {
        match request(m.addr, "POST", "/v1/admin/restore?dry_run=true", b"garbage") {
            Ok((400, body)) if body["error"]["code"] == "bad_backup" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

#[test]
fn eight_slow_readers_of_a_large_list_do_not_lock_out_a_one_task_list() {
    let m = Master::start();
    for i in 0..3 {
        m.create_job(&format!("big/prod/j{i}"), 10_000);
    }
    m.create_job("small/prod/one", 1);
    let mut stalled = vec![];
    for _ in 0..8 {
        let mut s = TcpStream::connect(m.addr).unwrap();
        s.write_all(b"GET /v1/tasks HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        stalled.push(s);
    }
    // However long they hold their answers, the one-task list is answered every time.
    for _ in 0..30 {
        let answer = get(m.addr, "/v1/tasks?job=small/prod/one");
        match answer {
            Ok((200, Value::Array(tasks))) => assert_eq!(tasks.len(), 1),
            other => panic!("a one-task list beside eight slow readers: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Large lists come in pages.
    let (status, page) = get(m.addr, "/v1/tasks?limit=100").unwrap();
    assert_eq!(status, 200);
    assert_eq!(page.as_array().map(Vec::len), Some(100));
    drop(stalled);
}

/// The master's open sockets (its listener included).
fn sockets_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn readers_that_stop_reading_are_cut_off_after_the_write_stall_timeout() {
    let m = Master::start();
    for i in 0..3 {
        m.create_job(&format!("big/prod/j{i}"), 10_000);
    }
    let before = sockets_of(m.pid());
    let stalled: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(m.addr).unwrap();
            s.write_all(b"GET /v1/tasks HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            s
        })
        .collect();
    wait_until(SOON, "the master holds the stalled readers' connections", || {
        let now = sockets_of(m.pid());
        ensure(now >= before + stalled.len(), (before, now))
    });
    // Nothing is read: once a write has waited the write-stall timeout, the master closes them.
    let stall = Duration::from_millis(capstan_api::serve::WRITE_STALL_TIMEOUT_MS);
    wait_until(stall + Duration::from_secs(30), "the stalled readers' connections are closed", || {
        let now = sockets_of(m.pid());
        ensure(now <= before, (before, now))
    });
    drop(stalled);
}

#[test]
fn health_says_503_while_the_master_replays_its_log() {
    let mut m = Master::start();
    for i in 0..5 {
        m.create_job(&format!("big/prod/j{i}"), 20_000);
    }
    m.kill();
    m.spawn();
    // Until the master serves, health must not say 200: once it did, every other route serves.
    let mut starting_seen = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let health = get(m.addr, "/v1/health");
        let jobs = get(m.addr, "/v1/jobs?limit=1");
        match (&health, &jobs) {
            (Ok((200, _)), Ok((200, _))) => break,
            (Ok((200, h)), Ok((503, j))) => panic!("health said 200 ({h}) while /v1/jobs said 503 ({j})"),
            (Ok((503, h)), _) => {
                assert_eq!(h["error"]["code"], "starting", "{h}");
                assert!(h["error"]["message"].as_str().unwrap().contains("loading"), "{h}");
                starting_seen += 1;
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "the master did not serve again: {health:?} {jobs:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(starting_seen > 0, "the replay was never seen: make the log longer");
}

#[test]
fn an_agent_address_that_is_not_plain_http_is_refused_at_registration() {
    let m = Master::start();
    let register = |address: &str| {
        let info = json!({
            "id": "00000000000000a1", "hostname": "h", "address": address,
            "capacity": {"cpus_milli": 1000, "mem_bytes": 1u64 << 30, "disk_bytes": 1u64 << 30, "ports": []},
            "attributes": {}, "version": "test",
        });
        let body = serde_json::to_vec(&json!({"info": info, "known_tasks": []})).unwrap();
        request(m.addr, "POST", "/v1/agent/register", &body).expect("an answer")
    };
    for bad in ["http://169.254.169.254:80/latest/meta-data?", "file:///etc/shadow", "https://h:7071", "http://u:p@h:1"]
    {
        let (status, body) = register(bad);
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_agent_address")), "{bad}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("http://HOST:PORT"), "{body}");
    }
    let (status, body) = register("http://127.0.0.1:7071");
    assert_eq!(status, 200, "{body}");
}
