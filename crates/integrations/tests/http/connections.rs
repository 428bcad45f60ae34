//! Connection limits, driven with raw TCP sockets: a connection that sends
//! nothing, a trickled request head and an idle keep-alive connection are
//! closed by their timeouts; at the connection cap new connections wait
//! and are served once a slot frees; out of file descriptors, the server
//! backs off and recovers.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{eventually, metric, TestApp};

/// Generous: how long a timeout of a second or two may take to show.
const CLOSE_WITHIN: Duration = Duration::from_secs(20);

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(("127.0.0.1", app.server.port))
        .await
        .unwrap()
}

/// Reads (discarding) until the server closes the connection; how long
/// that took, or `None` if it is still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// Reads one response with a `content-length` body; returns its status
/// line. `None` when nothing complete arrives within `within`.
async fn read_response(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if got.len() >= end + 4 + length {
                    return Some(head.lines().next().unwrap_or_default().to_string());
                }
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .flatten()
}

const HEALTHZ_KEEP_ALIVE: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n";
const HEALTHZ_CLOSE: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";

/// `GET /healthz` on a new connection: its status line.
async fn healthz(app: &TestApp, within: Duration) -> Option<String> {
    let mut s = connect(app).await;
    s.write_all(HEALTHZ_CLOSE).await.unwrap();
    read_response(&mut s, within).await
}
#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let app = TestApp::spawn_with(&[("INTEGRATIONS_HTTP_HEADER_TIMEOUT", "1")], &[]).await;
    let mut silent = connect(&app).await;
    let took = closed_within(&mut silent, CLOSE_WITHIN)
        .await
        .expect("a silent connection was kept open");
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    let timeouts = metric(&app, r#"http_connection_timeouts_total{kind="header"}"#).await;
    assert!(timeouts >= Some(1.0), "{timeouts:?}");
}

#[tokio::test]
async fn a_trickled_request_head_is_closed_after_the_header_timeout() {
    let app = TestApp::spawn_with(&[("INTEGRATIONS_HTTP_HEADER_TIMEOUT", "1")], &[]).await;
    let stream = connect(&app).await;
    let (mut reader, mut writer) = stream.into_split();
    let started = Instant::now();
    // A byte every 100 ms of a head that never ends.
    let trickle = tokio::spawn(async move {
        let head = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ";
        let mut sent = writer.write_all(head).await;
        while sent.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            sent = writer.write_all(b"a").await;
        }
    });
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(CLOSE_WITHIN, async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    trickle.abort();
    assert!(closed.is_ok(), "a trickled head was kept open");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_not_the_header_timeout() {
    let app = TestApp::spawn_with(
        &[
            ("INTEGRATIONS_HTTP_HEADER_TIMEOUT", "1"),
            ("INTEGRATIONS_HTTP_IDLE_TIMEOUT", "3"),
        ],
        &[],
    )
    .await;
    let mut s = connect(&app).await;
    s.write_all(HEALTHZ_KEEP_ALIVE).await.unwrap();
    let status = read_response(&mut s, CLOSE_WITHIN).await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 200 OK"));
    // Idle for longer than the header timeout, less than the idle one:
    // still open, and the next request is answered.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    s.write_all(HEALTHZ_KEEP_ALIVE).await.unwrap();
    let status = read_response(&mut s, CLOSE_WITHIN).await;
    assert_eq!(
        status.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "the keep-alive connection was closed before the idle timeout"
    );
    // Then left idle: closed after the idle timeout.
    let took = closed_within(&mut s, CLOSE_WITHIN)
        .await
        .expect("an idle keep-alive connection was kept open");
    assert!(took >= Duration::from_millis(2800), "closed after {took:?}");
    let timeouts = metric(&app, r#"http_connection_timeouts_total{kind="idle"}"#).await;
    assert!(timeouts >= Some(1.0), "{timeouts:?}");
}

#[tokio::test]
async fn at_the_connection_cap_new_connections_wait_and_are_served_once_a_slot_frees() {
    const CAP: usize = 2;
    let app = TestApp::spawn_with(
        &[
            ("INTEGRATIONS_HTTP_MAX_CONNECTIONS", "2"),
            ("INTEGRATIONS_HTTP_HEADER_TIMEOUT", "2"),
            ("INTEGRATIONS_HTTP_IDLE_TIMEOUT", "2"),
        ],
        &[],
    )
    .await;
    let header_timeout = Duration::from_secs(2);

    // The cap is taken by two silent connections: a third waits.
    let a = connect(&app).await;
    let mut b = connect(&app).await;
    let mut c = connect(&app).await;
    c.write_all(HEALTHZ_CLOSE).await.unwrap();
    assert_eq!(
        read_response(&mut c, Duration::from_secs(1)).await,
        None,
        "a connection beyond the cap was served"
    );
    // A slot frees: the waiting request is answered.
    drop(a);
    let status = read_response(&mut c, CLOSE_WITHIN).await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 200 OK"));
    closed_within(&mut b, CLOSE_WITHIN)
        .await
        .expect("the silent connection was kept open");
    drop(c);

    // cap + 4 silent connections: each holds a slot for the header timeout,
    // so with at most CAP served at once the last one cannot be closed
    // before 3 header timeouts (6 / CAP rounds).
    let opened = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..CAP + 4 {
        idle.push(connect(&app).await);
    }
    let mut last = Duration::ZERO;
    for s in &mut idle {
        closed_within(s, CLOSE_WITHIN * 2)
            .await
            .expect("a silent connection was kept open");
        last = opened.elapsed();
    }
    assert!(
        last >= header_timeout * 3 - Duration::from_millis(300),
        "6 silent connections were all closed within {last:?}: more than {CAP} served at once"
    );
    // Once they are gone, /healthz answers at once.
    assert_eq!(
        healthz(&app, CLOSE_WITHIN).await.as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    assert_eq!(metric(&app, "http_connections_max").await, Some(2.0));
}

#[tokio::test]
async fn out_of_file_descriptors_the_server_backs_off_and_recovers() {
    // 128 files for the whole process, and a cap that does not protect it.
    let app = TestApp::spawn_with(
        &[
            ("INTEGRATIONS_HTTP_MAX_CONNECTIONS", "1000"),
            ("INTEGRATIONS_HTTP_HEADER_TIMEOUT", "2"),
        ],
        &["prlimit", "--nofile=128", "--"],
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(connect(&app).await);
    }
    let failing = |l: &str| l.contains("accepting a connection failed");
    let line = app
        .server
        .wait_for_log(failing, CLOSE_WITHIN)
        .await
        .unwrap_or_else(|| {
            panic!(
                "the server never ran out of files:\n{}",
                app.server.logs().join("\n")
            )
        });
    assert!(line.contains("Too many open files"), "{line}");
    // Every silent connection is eventually taken and timed out.
    for s in &mut idle {
        closed_within(s, Duration::from_secs(60))
            .await
            .expect("a silent connection was kept open");
    }
    drop(idle);
    let answered = eventually(CLOSE_WITHIN, || async {
        healthz(&app, Duration::from_secs(5))
            .await
            .filter(|s| s == "HTTP/1.1 200 OK")
    })
    .await;
    assert!(answered.is_some(), "/healthz did not answer after recovery");
    // Backing off (5 ms doubling to 1 s) keeps the failures to a few per
    // second; retrying at once would fail thousands of times.
    let failures = app.server.logs().iter().filter(|l| failing(l)).count();
    assert!(failures < 200, "{failures} accept failures logged");
}
