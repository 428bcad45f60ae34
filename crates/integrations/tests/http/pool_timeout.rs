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
