//! The request deadline (`INTEGRATIONS_REQUEST_TIMEOUT`): a request stuck
//! in the database is answered 503 `request_timeout` when it passes, the
//! statement it was running is cancelled on the server and its connection
//! discarded; a frozen server (blackhole) cannot hold requests longer.

use std::time::{Duration, Instant};

use db_pool::testing::{Fault, FaultProxy, TestDatabase};
use integrations::crypto::Keyring;
use integrations::service::api_keys::Scope;
use reqwest::Method;
use serde_json::json;

use crate::common::{
    create_key, eventually, http_client, with_params, write_registry, FakeProvider, ServerProcess,
    TestApp, CALLBACK_URL, REDIRECT_ORIGINS,
};

fn tokens(n: u32) -> serde_json::Value {
    json!({"access_token": format!("at-deadline-{n}"), "refresh_token": format!("rt-deadline-{n}"),
           "expires_in": 3600, "scope": "read", "token_type": "Bearer"})
}

#[tokio::test]
async fn request_deadline_is_503_and_cancels_the_statement_on_the_server() {
    let app = TestApp::spawn_with(&[("INTEGRATIONS_REQUEST_TIMEOUT", "2")], &[]).await;
    let db = app.db.as_ref().unwrap();
    let path = "/v1/users/user-d/integrations/good/acct";
    // Verifies (and caches) the key while nothing is locked.
    app.put_integration("user-d", "good", "acct", tokens(1))
        .await;

    // Another session locks the table: the next write waits inside the
    // database, longer than the deadline.
    let locker = db.connect().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE integrations IN ACCESS EXCLUSIVE MODE;")
        .await
        .unwrap();
    let watcher = db.connect().await;
    let blocked = || async {
        let rows = watcher
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>()
    };
    let started = Instant::now();
    let (reply, waiting) = tokio::join!(
        app.send(Method::PUT, path, Some(&app.keys.all), Some(tokens(2))),
        eventually(Duration::from_secs(20), || async {
            Some(blocked().await).filter(|pids| !pids.is_empty())
        }),
    );
    let took = started.elapsed();
    let waiting = waiting.expect("the write never reached the lock");

    let message = reply.assert_error(503, "request_timeout");
    assert!(message.contains("2s"), "{message}");
    assert_eq!(reply.header("retry-after").as_deref(), Some("1"));
    let hint = reply.json()["error"]["hint"].as_str().unwrap().to_string();
    assert!(
        hint.contains("INTEGRATIONS_REQUEST_TIMEOUT") && hint.contains("socket_timeout"),
        "{hint}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "{took:?}"
    );

    // The lock is still held, yet the statement is gone from the server
    // (cancelled, not left waiting for the lock) and so is its session (the
    // connection was discarded, not returned to the pool).
    let gone = eventually(Duration::from_secs(10), || async {
        let rows = watcher
            .query(
                "SELECT pid, state, wait_event_type FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&waiting],
            )
            .await
            .unwrap();
        rows.is_empty().then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "the cancelled statement's session {waiting:?} is still there"
    );
    assert!(
        blocked().await.is_empty(),
        "a statement still waits for the lock"
    );
    let idle_in_transaction: i64 = watcher
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Only the locker's own session.
    assert_eq!(idle_in_transaction, 1);

    locker.batch_execute("ROLLBACK").await.unwrap();
    let again = app
        .send(Method::PUT, path, Some(&app.keys.all), Some(tokens(3)))
        .await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert!(app
        .server
        .logs()
        .iter()
        .any(|l| l.contains("request deadline passed")));
    app.assert_no_leaks();
}

#[tokio::test]
async fn a_frozen_database_cannot_hold_requests_past_the_deadline() {
    // The reproduction: the server stops answering (here a proxy
    // that forwards nothing, as SIGSTOP does), with no socket_timeout.
    let db = TestDatabase::create().await;
    let proxy = FaultProxy::start(&db.url).await;
    let url = with_params(&proxy.url(&db.url), "connection_limit=2&pool_timeout=30");
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeProvider::start().await;
    let registry = write_registry(dir.path(), &fake);
    let keys = Keyring::generate_spec("k1");
    let server = ServerProcess::spawn(
        &[
            ("DATABASE_URL", url.as_str()),
            ("INTEGRATIONS_ENCRYPTION_KEYS", keys.as_str()),
            ("INTEGRATIONS_PROVIDERS", registry.as_str()),
            ("INTEGRATIONS_CALLBACK_URL", CALLBACK_URL),
            ("INTEGRATIONS_REDIRECT_ORIGINS", REDIRECT_ORIGINS),
            ("INTEGRATIONS_REQUEST_TIMEOUT", "2"),
            ("FAKE_SECRET", "fake-secret"),
        ],
        &[],
    )
    .await;
    let key = create_key(&db.url, "all", &Scope::ALL).await;
    let http = http_client();
    let put = |n: u32| {
        http.put(format!(
            "{}/v1/users/user-f/integrations/good/acct",
            server.base_url
        ))
        .bearer_auth(&key)
        .json(&tokens(n))
        .send()
    };
    assert_eq!(put(1).await.unwrap().status(), 200);

    proxy.set(Fault::Blackhole);
    let started = Instant::now();
    let reply = put(2).await.unwrap();
    let took = started.elapsed();
    assert_eq!(reply.status(), 503);
    let body: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    assert!(took < Duration::from_secs(15), "{took:?}");

    // The server answers again: so does the service, on a new connection.
    proxy.set(Fault::Pass);
    let recovered = eventually(Duration::from_secs(20), || async {
        let status = put(3).await.ok()?.status();
        (status == 200).then_some(())
    })
    .await;
    assert!(recovered.is_some(), "the service did not recover");
    drop(server);
}
