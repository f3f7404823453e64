//! Health checks against real sockets and processes: an HTTP server that turns bad, a listener
//! that goes away, `test -f ready` in a sandbox, the grace period, timeouts, and stopping.

use axum::http::StatusCode;
use capstan_agent::health::{self, check_once, CheckTarget, HealthEvent};
use capstan_model::spec::{DurationMs, HealthCheckSpec, HealthCheckType};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// True when this test may run (it runs a command as another user, so it needs root).
/// Otherwise it says loudly why it skips — or, with `CAPSTAN_REQUIRE_PRIVILEGED_TESTS=1`, fails.
fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let why = "it must run as root (command checks run as the task's user)";
    if std::env::var("CAPSTAN_REQUIRE_PRIVILEGED_TESTS").as_deref() == Ok("1") {
        panic!("{test}: {why}, and CAPSTAN_REQUIRE_PRIVILEGED_TESTS=1 forbids skipping");
    }
    // Straight to fd 2: libtest would capture (and hide) an `eprintln!` of a passing test.
    let _ =
        std::io::Write::write_all(&mut std::io::stderr(), format!("\n!!!!! SKIPPED {test}: {why} !!!!!\n").as_bytes());
    false
}

fn spec(check_type: HealthCheckType) -> HealthCheckSpec {
    HealthCheckSpec {
        check_type,
        port: Some("main".into()),
        path: Some("/health".into()),
        command: None,
        interval: DurationMs(100),
        timeout: DurationMs(100),
        grace_period: DurationMs(0),
        consecutive_failures: 3,
    }
}

fn target(port: u16) -> CheckTarget {
    CheckTarget {
        host: Ipv4Addr::LOCALHOST.into(),
        ports: BTreeMap::from([("main".to_string(), port)]),
        sandbox: PathBuf::from("/nonexistent"),
        user: "nobody".into(),
        env: Vec::new(),
        allow_root: false,
        cgroup: Vec::new(),
    }
}

/// The next event, or a panic naming what was awaited.
async fn next(events: &mut mpsc::UnboundedReceiver<HealthEvent>, within: Duration, what: &str) -> HealthEvent {
    match tokio::time::timeout(within, events.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("the checker stopped while waiting for {what}"),
        Err(_) => panic!("no event within {within:?} while waiting for {what}"),
    }
}

async fn nothing_for(events: &mut mpsc::UnboundedReceiver<HealthEvent>, quiet: Duration) {
    if let Ok(event) = tokio::time::timeout(quiet, events.recv()).await {
        panic!("expected no event for {quiet:?}, got {event:?}");
    }
}

/// An HTTP server on 127.0.0.1 whose `/health` answers with the status in the returned cell;
/// `/moved` redirects to `/broken`, which answers 500.
async fn http_server() -> (u16, Arc<AtomicU16>) {
    let status = Arc::new(AtomicU16::new(200));
    let cell = status.clone();
    let app = axum::Router::new()
        .route(
            "/health",
            axum::routing::get(move || {
                let cell = cell.clone();
                async move { StatusCode::from_u16(cell.load(Ordering::SeqCst)).unwrap() }
            }),
        )
        .route("/moved", axum::routing::get(|| async { (StatusCode::FOUND, [("location", "/broken")]) }))
        .route("/broken", axum::routing::get(|| async { StatusCode::INTERNAL_SERVER_ERROR }));
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, status)
}

/// A port on 127.0.0.1 where nothing listens (bound, then closed).
fn closed_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

const SOON: Duration = Duration::from_secs(3);

#[tokio::test]
async fn http_healthy_then_unhealthy_then_healthy_again() {
    let (port, status) = http_server().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let checker = health::spawn(spec(HealthCheckType::Http), target(port), tx);
    let url = format!("http://127.0.0.1:{port}/health");

    assert_eq!(
        next(&mut rx, SOON, "healthy").await,
        HealthEvent::Healthy { detail: format!("http GET {url} returned 200 OK") }
    );
    status.store(500, Ordering::SeqCst);
    let turned = Instant::now();
    assert_eq!(
        next(&mut rx, SOON, "unhealthy").await,
        HealthEvent::Unhealthy {
            reason: format!("http GET {url} returned 500 Internal Server Error (3 checks in a row)")
        }
    );
    // Three failures at 100ms apart: not before the third check.
    assert!(turned.elapsed() >= Duration::from_millis(150), "unhealthy after only {:?}", turned.elapsed());
    // It keeps checking, says nothing more while still failing, and notices a recovery.
    nothing_for(&mut rx, Duration::from_millis(400)).await;
    status.store(204, Ordering::SeqCst);
    assert_eq!(
        next(&mut rx, SOON, "healthy again").await,
        HealthEvent::Healthy { detail: format!("http GET {url} returned 204 No Content") }
    );
    checker.abort();
}

#[tokio::test]
async fn a_short_run_of_failures_is_not_unhealthy() {
    let (port, status) = http_server().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let checker =
        health::spawn(HealthCheckSpec { interval: DurationMs(200), ..spec(HealthCheckType::Http) }, target(port), tx);
    assert!(matches!(next(&mut rx, SOON, "healthy").await, HealthEvent::Healthy { .. }));
    status.store(503, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await; // one or two failures, never three
    status.store(200, Ordering::SeqCst);
    nothing_for(&mut rx, Duration::from_millis(1000)).await;
    checker.abort();
}

#[tokio::test]
async fn http_redirects_are_healthy_and_not_followed() {
    let (port, _) = http_server().await;
    let check = HealthCheckSpec { path: Some("/moved".into()), ..spec(HealthCheckType::Http) };
    assert_eq!(
        check_once(&check, &target(port)).await,
        Ok(format!("http GET http://127.0.0.1:{port}/moved returned 302 Found"))
    );
}

#[tokio::test]
async fn http_refused_and_unknown_ports_fail_in_words() {
    let port = closed_port();
    assert_eq!(
        check_once(&spec(HealthCheckType::Http), &target(port)).await,
        Err(format!("http GET http://127.0.0.1:{port}/health failed: connection refused"))
    );
    let check = HealthCheckSpec { port: Some("admin".into()), ..spec(HealthCheckType::Http) };
    assert_eq!(check_once(&check, &target(port)).await, Err("http check: the task has no port named \"admin\"".into()));
}

#[tokio::test]
async fn http_timeout_when_the_server_never_answers() {
    // Accepts connections and holds them without a word.
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let check = HealthCheckSpec { timeout: DurationMs(200), interval: DurationMs(200), ..spec(HealthCheckType::Http) };
    let started = Instant::now();
    assert_eq!(
        check_once(&check, &target(port)).await,
        Err(format!("http GET http://127.0.0.1:{port}/health timed out after 200ms"))
    );
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());

    let (tx, mut rx) = mpsc::unbounded_channel();
    let checker = health::spawn(HealthCheckSpec { consecutive_failures: 2, ..check }, target(port), tx);
    assert_eq!(
        next(&mut rx, SOON, "unhealthy").await,
        HealthEvent::Unhealthy {
            reason: format!("http GET http://127.0.0.1:{port}/health timed out after 200ms (2 checks in a row)")
        }
    );
    checker.abort();
}

#[tokio::test]
async fn http_garbage_is_a_failure() {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut socket, b"SSH-2.0-OpenSSH_9.6\r\n").await;
        }
    });
    let result = check_once(&spec(HealthCheckType::Http), &target(port)).await;
    assert_eq!(
        result,
        Err(format!("http GET http://127.0.0.1:{port}/health failed: the answer is not HTTP: \"SSH-2.0-OpenSSH_9.6\""))
    );
}

#[tokio::test]
async fn tcp_healthy_while_listening_then_unhealthy_once_closed() {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let checker = health::spawn(spec(HealthCheckType::Tcp), target(port), tx);
    assert_eq!(
        next(&mut rx, SOON, "healthy").await,
        HealthEvent::Healthy { detail: format!("tcp connect to 127.0.0.1:{port} succeeded") }
    );
    drop(listener);
    assert_eq!(
        next(&mut rx, SOON, "unhealthy").await,
        HealthEvent::Unhealthy {
            reason: format!("tcp connect to 127.0.0.1:{port} failed: connection refused (3 checks in a row)")
        }
    );
    checker.abort();
}

#[tokio::test]
async fn failures_during_the_grace_period_do_not_count() {
    let port = closed_port();
    let check =
        HealthCheckSpec { grace_period: DurationMs(700), consecutive_failures: 2, ..spec(HealthCheckType::Tcp) };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let checker = health::spawn(check, target(port), tx);
    // Seven failed checks within the grace period: no event.
    nothing_for(&mut rx, Duration::from_millis(600)).await;
    let event = next(&mut rx, SOON, "unhealthy after the grace period").await;
    assert_eq!(
        event,
        HealthEvent::Unhealthy {
            reason: format!("tcp connect to 127.0.0.1:{port} failed: connection refused (2 checks in a row)")
        }
    );
    // The first check that counts starts at 700ms and the second 100ms later.
    assert!(started.elapsed() >= Duration::from_millis(800), "unhealthy after only {:?}", started.elapsed());
    checker.abort();
}

#[tokio::test]
async fn a_success_during_the_grace_period_is_healthy_at_once() {
    let (port, _) = http_server().await;
    let check = HealthCheckSpec { grace_period: DurationMs(60_000), ..spec(HealthCheckType::Http) };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let checker = health::spawn(check, target(port), tx);
    assert!(matches!(next(&mut rx, Duration::from_millis(500), "healthy").await, HealthEvent::Healthy { .. }));
    checker.abort();
}

#[tokio::test]
async fn the_checker_stops_when_the_receiver_goes() {
    let (port, _) = http_server().await;
    let (tx, rx) = mpsc::unbounded_channel();
    let checker = health::spawn(spec(HealthCheckType::Http), target(port), tx);
    drop(rx);
    tokio::time::timeout(Duration::from_secs(1), checker).await.expect("the checker outlived its receiver").unwrap();
}

/// A sandbox the task user can enter (a tempdir itself is 0700), in a parent it can traverse.
fn sandbox() -> (tempfile::TempDir, PathBuf) {
    let parent = tempfile::tempdir().unwrap();
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = parent.path().join("sandbox");
    std::fs::create_dir(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    (parent, path)
}

fn command_check(command: &str) -> HealthCheckSpec {
    HealthCheckSpec {
        command: Some(command.into()),
        port: None,
        path: None,
        timeout: DurationMs(1000),
        interval: DurationMs(1000),
        ..spec(HealthCheckType::Command)
    }
}

#[tokio::test]
async fn command_test_f_ready_as_the_task_user() {
    if !privileged("command_test_f_ready_as_the_task_user") {
        return;
    }
    let (_parent, dir) = sandbox();
    let target = CheckTarget { sandbox: dir.clone(), ..target(0) };
    let check =
        HealthCheckSpec { interval: DurationMs(100), consecutive_failures: 2, ..command_check("test -f ready") };
    assert_eq!(check_once(&check, &target).await, Err("command \"test -f ready\" exited with code 1".into()));

    let (tx, mut rx) = mpsc::unbounded_channel();
    let checker = health::spawn(check.clone(), target.clone(), tx);
    assert_eq!(
        next(&mut rx, SOON, "unhealthy").await,
        HealthEvent::Unhealthy { reason: "command \"test -f ready\" exited with code 1 (2 checks in a row)".into() }
    );
    std::fs::write(dir.join("ready"), b"").unwrap();
    assert_eq!(
        next(&mut rx, SOON, "healthy").await,
        HealthEvent::Healthy { detail: "command \"test -f ready\" exited with code 0".into() }
    );
    checker.abort();
    assert_eq!(check_once(&check, &target).await, Ok("command \"test -f ready\" exited with code 0".into()));
}

#[tokio::test]
async fn command_checks_get_the_task_env_and_user_and_time_out() {
    if !privileged("command_checks_get_the_task_env_and_user_and_time_out") {
        return;
    }
    let (_parent, dir) = sandbox();
    let target = CheckTarget { sandbox: dir.clone(), env: vec![("PORT_MAIN".into(), "31005".into())], ..target(31005) };
    let check = command_check("echo \"$(id -un) $PORT_MAIN\" >&2; exit 7");
    assert_eq!(
        check_once(&check, &target).await,
        Err("command \"echo \\\"$(id -un) $PORT_MAIN\\\" >&2; exit 7\" exited with code 7: nobody 31005".into())
    );

    let check = HealthCheckSpec { timeout: DurationMs(200), ..command_check("sleep 10") };
    let started = Instant::now();
    assert_eq!(check_once(&check, &target).await, Err("command \"sleep 10\" timed out after 200ms".into()));
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn command_checks_as_root_need_allow_root() {
    let (_parent, dir) = sandbox();
    let target = CheckTarget { sandbox: dir, user: "root".into(), ..target(0) };
    let refused = check_once(&command_check("true"), &target).await.unwrap_err();
    assert!(refused.starts_with("command \"true\" not run: refusing to run it as \"root\""), "{refused}");
    if !privileged("command_checks_as_root_need_allow_root") {
        return;
    }
    let allowed = CheckTarget { allow_root: true, ..target };
    assert_eq!(check_once(&command_check("true"), &allowed).await, Ok("command \"true\" exited with code 0".into()));
}

#[tokio::test]
async fn ipv6_hosts_are_bracketed() {
    let Ok(listener) = tokio::net::TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0)).await else {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"\n!!!!! SKIPPED ipv6_hosts_are_bracketed: no ::1 !!!!!\n",
        );
        return;
    };
    let port = listener.local_addr().unwrap().port();
    let target = CheckTarget { host: std::net::Ipv6Addr::LOCALHOST.into(), ..target(port) };
    assert_eq!(
        check_once(&spec(HealthCheckType::Tcp), &target).await,
        Ok(format!("tcp connect to [::1]:{port} succeeded"))
    );
}
