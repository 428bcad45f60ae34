//! max_connection_lifetime and max_idle_connection_lifetime.

use std::time::Duration;

use db_pool::testing::TestDatabase;

use crate::common::{eventually, pool, server_connections};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_lifetime_are_replaced() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "connection_limit=1&max_connection_lifetime=1");
    let first = pool.get().await.unwrap().backend_pid();
    assert_eq!(
        pool.get().await.unwrap().backend_pid(),
        first,
        "young: reused"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut conn = pool.get().await.unwrap();
    assert_ne!(conn.backend_pid(), first, "old: replaced");
    conn.query("SELECT 1", &[]).await.unwrap();
    assert!(pool.stats().closed_max_lifetime >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_on_the_server_without_a_checkout() {
    let db = TestDatabase::create().await;
    let admin = db.connect().await;
    let (pool, app) = pool(&db, "connection_limit=3&max_idle_connection_lifetime=1");
    let conns = vec![
        pool.get().await.unwrap(),
        pool.get().await.unwrap(),
        pool.get().await.unwrap(),
    ];
    drop(conns);
    assert_eq!(server_connections(&admin, &app).await, 3);
    let closed = eventually(Duration::from_secs(5), || async {
        server_connections(&admin, &app).await == 0
    })
    .await;
    assert!(closed, "idle connections still open on the server");
    let stats = pool.stats();
    assert_eq!(stats.closed_idle_lifetime, 3);
    assert_eq!((stats.open, stats.idle, stats.in_use), (0, 0, 0));
    // And the pool still serves.
    pool.get()
        .await
        .unwrap()
        .query("SELECT 1", &[])
        .await
        .unwrap();
}
