//! connection_limit: the server never sees more, and callers queue in order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use db_pool::testing::TestDatabase;

use crate::common::{pool, server_connections};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_never_sees_more_than_connection_limit() {
    let db = TestDatabase::create().await;
    let admin = db.connect().await;
    let (pool, app) = pool(&db, "connection_limit=3");

    let load: Vec<_> = (0..32)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    let mut conn = pool.get().await.unwrap();
                    conn.query("SELECT pg_sleep(0.002)", &[]).await.unwrap();
                }
            })
        })
        .collect();
    let mut most = 0;
    while !load.iter().all(|t| t.is_finished()) {
        most = most.max(server_connections(&admin, &app).await);
        assert!(
            most <= 3,
            "the server saw {most} connections with connection_limit=3"
        );
        assert!(pool.stats().open <= 3);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(
        most, 3,
        "under this load all 3 connections should have been used"
    );
    assert_eq!(pool.stats().checkouts, 32 * 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_callers_are_served_first_come_first_served() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "connection_limit=1&pool_timeout=0");
    let held = pool.get().await.unwrap();

    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..6 {
        let (waiter_pool, order) = (pool.clone(), order.clone());
        waiters.push(tokio::spawn(async move {
            let mut conn = waiter_pool.get().await.unwrap();
            order.lock().unwrap().push(i);
            conn.query("SELECT 1", &[]).await.unwrap();
        }));
        // Each waiter is queued before the next one starts.
        let want = i + 1;
        while pool.stats().waiting < want {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    drop(held);
    for w in waiters {
        w.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4, 5]);
}
