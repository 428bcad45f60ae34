//! A pool with no free connection answers 503 P2024 with Retry-After, and
//! the request holding the connection still completes.

use std::time::Duration;

use crate::common::{eventually, TestApp};

#[tokio::test]
async fn pool_timeout_is_503_p2024_with_retry_after() {
    let app = TestApp::spawn_with_params("connection_limit=1&pool_timeout=1").await;
    let db = app.db.as_ref().unwrap();
    let key = app.keys.read.clone();
    // Verifies (and caches) the key while the pool is free.
    let warm = app.get("/v1/users/user-c/integrations", Some(&key)).await;
    assert_eq!(warm.status, 200, "{}", warm.text);

    // Another session locks the table: a status load blocks inside the
    // database, holding the pool's only connection.
    let locker = db.connect().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE integrations IN ACCESS EXCLUSIVE MODE;")
        .await
        .unwrap();
    let a = {
        let http = app.http.clone();
        let url = app.url("/v1/users/user-a/integrations");
        let key = key.clone();
        tokio::spawn(async move {
            let r = http.get(url).bearer_auth(key).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        })
    };
    // A is in flight once the server's session waits for the lock.
    let watcher = db.connect().await;
    let waiting = eventually(Duration::from_secs(20), || async {
        let row = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock' \
                 AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0) > 0).then_some(())
    })
    .await;
    assert!(waiting.is_some(), "request A never reached the lock");
    assert!(!a.is_finished());

    let b = app.get("/v1/users/user-b/integrations", Some(&key)).await;
    b.assert_error(503, "P2024");
    assert_eq!(
        b.header("retry-after").as_deref(),
        Some("1"),
        "{:?}",
        b.headers
    );
    let hint = b.json()["error"]["hint"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!hint.is_empty(), "{}", b.text);

    locker.batch_execute("ROLLBACK").await.unwrap();
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), a)
        .await
        .expect("request A did not complete after the lock was released")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["user_id"],
        "user-a"
    );
    // The server recovered: B's user loads now.
    let again = app.get("/v1/users/user-b/integrations", Some(&key)).await;
    assert_eq!(again.status, 200, "{}", again.text);
    app.assert_no_leaks();
}

/// The server refusing new connections (53300, too many clients) is not the
/// caller's failure to see as a 500: the pool waits for a returned
/// connection, then P2024 names the refusals, answered 503 with
/// Retry-After. A small private server: 5 slots for roles other than
/// superusers once the admin session has one (the service's pool of 3,
/// its change listener and, at start-up, the test's own key creation while
/// the event purge and the webhook dispatcher run).
#[tokio::test]
async fn a_server_refusing_connections_is_503_p2024_naming_it_with_retry_after() {
    use pg_cluster::{ClusterOptions, LocalCluster};
    let cluster = LocalCluster::start_temporary(
        ClusterOptions::default()
            .setting("max_connections", "9")
            .setting("superuser_reserved_connections", "3"),
    )
    .await
    .unwrap();
    let (admin, connection) =
        db_pool::tokio_postgres::connect(&cluster.url("postgres"), db_pool::tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    for sql in ["CREATE ROLE app LOGIN", "CREATE DATABASE app OWNER app"] {
        admin.batch_execute(sql).await.unwrap();
    }
    let app_url = format!(
        "postgresql://app@127.0.0.1:{}/app?sslmode=disable",
        cluster.port()
    );
    let app = TestApp::spawn_on(
        &format!("{app_url}&connection_limit=3&pool_timeout=2&connect_timeout=2"),
        None,
        &[],
    )
    .await;
    let key = app.keys.read.clone();
    let warm = app.get("/v1/users/user-1/integrations", Some(&key)).await;
    assert_eq!(warm.status, 200, "{}", warm.text);

    // The service's connections end; others take every slot its role has
    // (repeated until the service holds none: it may reconnect meanwhile).
    let filler_url = format!("{app_url}&application_name=filler");
    let mut fillers = Vec::new();
    let mut service: Vec<String> = Vec::new();
    for _ in 0..50 {
        admin
            .execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
                 WHERE usename = 'app' AND application_name <> 'filler' \
                 AND query NOT LIKE 'LISTEN%'",
                &[],
            )
            .await
            .unwrap();
        loop {
            match db_pool::tokio_postgres::connect(&filler_url, db_pool::tokio_postgres::NoTls)
                .await
            {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    fillers.push(client);
                }
                Err(e) => {
                    let code = e.as_db_error().map(|d| d.code().code().to_string());
                    assert_eq!(code.as_deref(), Some("53300"), "{e}");
                    break;
                }
            }
        }
        // A session that connected between the termination and the fill
        // (the change listener before its LISTEN, a pool connection) is
        // ended on the next round; with every slot taken none comes back.
        service = admin
            .query(
                "SELECT query FROM pg_stat_activity WHERE usename = 'app' AND application_name <> 'filler'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if service.iter().all(|q| q.starts_with("LISTEN")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The admin session takes one of the 6 slots too. The service's change
    // listener, terminated with its pool's connections, reconnects at once
    // and may win a slot back: the pool itself holds none.
    assert!(
        service.iter().all(|q| q.starts_with("LISTEN")),
        "only the listener: {service:?}"
    );
    assert_eq!(
        fillers.len() + service.len(),
        5,
        "the fillers (and the listener) hold every slot left"
    );

    let refused = app.get("/v1/users/user-2/integrations", Some(&key)).await;
    let message = refused.assert_error(503, "P2024");
    assert!(
        message.contains("refused new connections (53300)"),
        "{message}"
    );
    let retry: u64 = refused
        .header("retry-after")
        .expect("a Retry-After header")
        .parse()
        .unwrap();
    assert!(retry >= 1, "{retry}");

    // Slots free (two: the change listener may take one as it reconnects):
    // the service serves again.
    fillers.truncate(1);
    let back = crate::common::eventually(Duration::from_secs(20), || async {
        let r = app.get("/v1/users/user-2/integrations", Some(&key)).await;
        (r.status == 200).then_some(())
    })
    .await;
    assert!(back.is_some(), "not served once a slot was free");
    app.assert_no_leaks();
}
