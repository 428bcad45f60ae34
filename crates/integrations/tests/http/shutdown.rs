//! SIGTERM: the request in flight completes, new connections are refused,
//! and the process exits 0.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::{eventually, TestApp};

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
    app.fake.set_delay("slow", Duration::from_secs(2));

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
