//! close(): drains, then closes everything.

use std::time::Duration;

use db_pool::testing::TestDatabase;

use crate::common::{eventually, pool, server_connections};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_waits_for_checked_out_connections_then_closes_all() {
    let db = TestDatabase::create().await;
    let admin = db.connect().await;
    let (pool, app) = pool(&db, "connection_limit=3");
    let held = pool.get().await.unwrap();
    drop(pool.get().await.unwrap()); // one idle as well
    assert_eq!(server_connections(&admin, &app).await, 2);

    let closing = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.close(Duration::from_secs(10)).await })
    };
    // Closing has begun once the idle connection is gone at the server.
    assert!(
        eventually(Duration::from_secs(5), || async {
            pool.is_closed() && server_connections(&admin, &app).await == 1
        })
        .await
    );
    let err = pool
        .get()
        .await
        .err()
        .expect("closed pool hands out nothing");
    assert_eq!(
        err.to_string(),
        "P2024: The connection pool is closed; no new connections are handed out"
    );
    assert!(
        !closing.is_finished(),
        "close waits for the checked-out connection"
    );
    drop(held);
    closing.await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_connections(&admin, &app).await == 0
        })
        .await
    );
    assert_eq!(pool.stats().closed_shutdown, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_connections_still_held_at_the_deadline() {
    let db = TestDatabase::create().await;
    let admin = db.connect().await;
    let (pool, app) = pool(&db, "connection_limit=2");
    let mut held = pool.get().await.unwrap();
    pool.close(Duration::from_millis(300)).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_connections(&admin, &app).await == 0
        })
        .await
    );
    let err = held.query("SELECT 1", &[]).await.err().unwrap();
    assert_eq!(err.code(), "P1017");
}
