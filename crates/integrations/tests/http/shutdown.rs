//! SIGTERM: the request in flight completes, new connections are refused,
//! and the process exits 0; the background refresher finishes the refresh
//! it is doing; `--shutdown-timeout` bounds the wait.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::{eventually, TestApp, RUN_REFRESHER};

async fn refused(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(("127.0.0.1", port))
        )
        .await,
        Ok(Err(_))
    )
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let mut app = TestApp::spawn().await;
    app.seed("user-1", "slow", "acct-1", 3600).await;
    // The provider holds its answer until the test releases it.
    app.fake.hold("slow");

    let in_flight = {
        let http = app.http.clone();
        let url = app.url("/v1/integrations/slow/acct-1/refresh");
        let key = app.keys.all.clone();
        tokio::spawn(async move {
            let r = http.post(url).bearer_auth(key).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        })
    };
    // In flight: the provider has the refresh request and is slow to answer.
    let arrived = eventually(Duration::from_secs(20), || async {
        (app.fake.received.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    assert!(arrived.is_some(), "the refresh never reached the provider");

    app.server.terminate();
    app.server
        .wait_for_log(|l| l.contains("shutting down"), Duration::from_secs(10))
        .await
        .expect("the server did not log its shutdown");
    // No new connections while the request finishes.
    let port = app.server.port;
    let closed = eventually(Duration::from_secs(10), || async {
        refused(port).await.then_some(())
    })
    .await;
    assert!(
        closed.is_some(),
        "new connections still accepted after SIGTERM"
    );
    // ...while the request is still running: at the provider, unanswered.
    assert!(!in_flight.is_finished());
    assert_eq!(app.fake.in_flight.load(Ordering::SeqCst), 1);
    assert!(!app.server.has_exited());
    app.fake.release("slow");

    let (status, body) = tokio::time::timeout(Duration::from_secs(30), in_flight)
        .await
        .expect("the request in flight did not complete")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["account_id"], "acct-1");
    assert_eq!(app.fake.refreshes.load(Ordering::SeqCst), 1);

    let exit = app.server.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        exit.code(),
        Some(0),
        "{exit}:\n{}",
        app.server.logs().join("\n")
    );
    assert!(refused(port).await);
    let logs = app.server.logs();
    assert!(
        logs.iter().any(|l| l.contains("stopped")),
        "{}",
        logs.join("\n")
    );
}

/// The refresh-due tokens of a server running its background refresher:
/// SIGTERM while the refresher waits on the provider stops the HTTP side
/// at once, and the process exits 0 only after that refresh is stored.
#[tokio::test]
async fn sigterm_lets_the_background_refresher_finish_its_refresh_then_exits_0() {
    let mut app =
        TestApp::spawn_args(&[("INTEGRATIONS_REFRESH_INTERVAL", "1")], &[RUN_REFRESHER]).await;
    app.fake.hold("slow");
    // Due: expires within the refresher's margin.
    app.seed("user-1", "slow", "due-1", 60).await;
    let arrived = eventually(Duration::from_secs(20), || async {
        (app.fake.in_flight.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert!(arrived.is_some(), "the refresher never called the provider");

    app.server.terminate();
    let port = app.server.port;
    let closed = eventually(Duration::from_secs(10), || async {
        refused(port).await.then_some(())
    })
    .await;
    assert!(closed.is_some(), "new connections still accepted");
    assert!(
        !app.server.has_exited(),
        "exited with the refresh still at the provider"
    );
    app.fake.release("slow");
    let exit = app.server.wait_exit(Duration::from_secs(30)).await;
    let logs = app.server.logs();
    assert_eq!(exit.code(), Some(0), "{exit}:\n{}", logs.join("\n"));
    let position = |end: &str| {
        logs.iter()
            .position(|l| l.trim_end().ends_with(end))
            .unwrap_or_else(|| panic!("no line ending {end:?} in\n{}", logs.join("\n")))
    };
    assert!(position("background refresher stopped") < position(": stopped"));
    // The refresh was stored before the process let go of the database.
    let client = app.db.as_ref().unwrap().connect().await;
    let generation: i64 = client
        .query_one(
            "SELECT refresh_generation FROM integrations WHERE account_id = 'due-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(generation, 1, "the refresher's result was stored");
    assert_eq!(app.fake.refreshes.load(Ordering::SeqCst), 1);
}

/// `--shutdown-timeout`: a request still in flight at the deadline does not
/// keep the process alive; the server says so and exits.
#[tokio::test]
async fn shutdown_timeout_bounds_the_wait_for_requests_in_flight() {
    let mut app = TestApp::spawn_args(&[], &["--shutdown-timeout", "1"]).await;
    app.seed("user-1", "slow", "acct-1", 3600).await;
    app.fake.hold("slow");
    let in_flight = {
        let http = app.http.clone();
        let url = app.url("/v1/integrations/slow/acct-1/refresh");
        let key = app.keys.all.clone();
        tokio::spawn(async move { http.post(url).bearer_auth(key).send().await })
    };
    let arrived = eventually(Duration::from_secs(20), || async {
        (app.fake.in_flight.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert!(arrived.is_some(), "the refresh never reached the provider");

    app.server.terminate();
    // The provider never answers: only the deadline ends the wait.
    let exit = app.server.wait_exit(Duration::from_secs(30)).await;
    let logs = app.server.logs();
    assert_eq!(exit.code(), Some(0), "{exit}:\n{}", logs.join("\n"));
    assert!(
        logs.iter()
            .any(|l| l.contains("requests still in flight at the shutdown deadline")),
        "{}",
        logs.join("\n")
    );
    assert_eq!(
        app.fake.in_flight.load(Ordering::SeqCst),
        1,
        "never answered"
    );
    let answer = in_flight.await.unwrap();
    assert!(
        answer.is_err(),
        "the cut request gets no answer: {answer:?}"
    );
    app.fake.release("slow");
}
