//! pool_timeout, connect_timeout and socket_timeout.

use std::time::Duration;

use db_pool::testing::TestDatabase;
use db_pool::Error;

use crate::common::{eventually, pool, pool_url, silent_listener};

#[tokio::test]
async fn pool_timeout_returns_p2024_with_pool_stats() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "connection_limit=1&pool_timeout=1");
    let _held = pool.get().await.unwrap();
    let err = pool
        .get()
        .await
        .err()
        .expect("second checkout must time out");
    assert_eq!(err.code(), "P2024");
    assert!(matches!(err, Error::PoolTimeout { .. }));
    assert_eq!(
        err.to_string(),
        "P2024: Timed out fetching a new connection from the connection pool \
         (pool timeout: 1s, connection limit: 1, in use: 1, waiting: 1)"
    );
    assert!(err.hint().contains("connection_limit"));
    assert_eq!(pool.stats().checkout_timeouts, 1);
    assert_eq!(
        pool.stats().waiting,
        0,
        "the timed-out caller no longer waits"
    );
}

#[tokio::test]
async fn pool_timeout_zero_waits_forever() {
    waits_until_a_connection_is_returned("pool_timeout=0").await;
}

#[tokio::test]
async fn a_pool_timeout_too_far_for_the_clock_waits_without_one() {
    waits_until_a_connection_is_returned("pool_timeout=18446744073709551615").await;
}

/// With `params` (no usable limit), a caller queued behind the only
/// connection neither times out nor fails: it gets that connection back.
async fn waits_until_a_connection_is_returned(params: &str) {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, &format!("connection_limit=1&{params}"));
    let held = pool.get().await.unwrap();
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get().await.map(|c| c.backend_pid()) })
    };
    // Well past the 10 s default would be slow; past any short timeout is enough
    // to show there is none: the waiter is still queued, not failed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiter.is_finished(), "{params}: the waiting caller ended");
    assert_eq!(pool.stats().waiting, 1);
    let pid = held.backend_pid();
    drop(held);
    assert_eq!(waiter.await.unwrap().unwrap(), pid);
}

#[tokio::test]
async fn pool_timeout_is_measured_from_the_call_not_the_connect() {
    // The server never answers; connect_timeout alone would give up after
    // 30 s. The caller asked to wait at most 1 s, so it gets P2024.
    let port = silent_listener();
    let pool = pool_url(&format!(
        "postgresql://postgres@127.0.0.1:{port}/db?connect_timeout=30&pool_timeout=1&sslmode=disable"
    ));
    let err = pool.get().await.err().unwrap();
    assert_eq!(err.code(), "P2024", "{err}");
}

#[tokio::test]
async fn connect_timeout_gives_p1001_for_a_silent_server() {
    let port = silent_listener();
    let pool = pool_url(&format!(
        "postgresql://postgres@127.0.0.1:{port}/db?connect_timeout=1&pool_timeout=0&sslmode=disable"
    ));
    let err = pool.get().await.err().unwrap();
    assert_eq!(err.code(), "P1001", "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "P1001: Can't reach database server at 127.0.0.1:{port}"
        )),
        "{text}"
    );
    assert!(text.contains("connect_timeout=1s"), "{text}");
    assert_eq!(pool.stats().connect_failures, 1);
    assert_eq!(
        pool.stats().open,
        0,
        "a failed connect must not take a slot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_timeout_cancels_the_query_on_the_server_and_discards_the_connection() {
    let db = TestDatabase::create().await;
    let admin = db.connect().await;
    let (pool, _) = pool(&db, "connection_limit=1&socket_timeout=1");
    let mut conn = pool.get().await.unwrap();
    let pid = conn.backend_pid();
    let err = conn.query("SELECT pg_sleep(60)", &[]).await.err().unwrap();
    assert_eq!(err.code(), "P1008");
    assert_eq!(err.to_string(), "P1008: Operations timed out after 1s");
    drop(conn);

    // A real cancel request reached the server: the backend stops sleeping.
    let stopped = eventually(Duration::from_secs(5), || async {
        let rows = admin
            .query(
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
                &[&pid],
            )
            .await
            .unwrap();
        rows.is_empty()
    })
    .await;
    assert!(stopped, "the query kept running on the server");

    // The connection was discarded: the next checkout is a new backend.
    let mut next = pool.get().await.unwrap();
    assert_ne!(next.backend_pid(), pid);
    next.query("SELECT 1", &[]).await.unwrap();
    let stats = pool.stats();
    assert_eq!(stats.socket_timeouts, 1);
    assert_eq!(stats.closed_broken, 1);
}

#[tokio::test]
async fn queries_within_socket_timeout_are_untouched() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "connection_limit=1&socket_timeout=5");
    let mut conn = pool.get().await.unwrap();
    let pid = conn.backend_pid();
    conn.query("SELECT pg_sleep(0.2)", &[]).await.unwrap();
    drop(conn);
    assert_eq!(pool.get().await.unwrap().backend_pid(), pid);
}
