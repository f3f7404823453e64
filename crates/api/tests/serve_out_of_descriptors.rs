//! The server loop keeps serving when the process runs out of file descriptors: accept fails
//! with EMFILE, the loop backs off, and the waiting connection is served once descriptors are free.
//! (Its own test binary: it lowers this process's descriptor limit.)

use capstan_api::serve::{serve, ServeConfig};
use std::io::{Read, Write};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_survives_running_out_of_descriptors() {
    let lim = libc::rlimit { rlim_cur: 256, rlim_max: 256 };
    // SAFETY: setrlimit reads the struct we own.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = tower::service_fn(|_req: http::Request<_>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(String::from("ok")))
    });
    let server = tokio::spawn(serve(listener, service, ServeConfig::default()));
    // Every descriptor of this process taken, but one for the client's socket.
    let mut hog = vec![];
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hog.push(f);
    }
    hog.pop();
    let mut client = std::net::TcpStream::connect(addr).expect("the kernel completes the connection");
    client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    // The server cannot accept it (EMFILE) and keeps trying.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!server.is_finished(), "the server loop ended when it ran out of descriptors");
    drop(hog);
    let answer = tokio::task::spawn_blocking(move || {
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = String::new();
        let _ = client.read_to_string(&mut out);
        out
    })
    .await
    .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the waiting connection is served once descriptors are free: {answer:?}"
    );
    assert!(!server.is_finished());
}
