//! `Pool::query`: statements of concurrent callers pipelined on shared
//! connections, within the pool's limits and guarantees.

use std::sync::Arc;
use std::time::Duration;

use db_pool::testing::TestDatabase;
use db_pool::Error;

use crate::common::{eventually, pool, server_connections};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_connections_and_each_gets_its_own_answer() {
    let db = TestDatabase::create().await;
    let admin = db.connect().await;
    let (pool, app) = pool(&db, "connection_limit=3");
    let most = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let watcher = {
        let (most, app) = (most.clone(), app.clone());
        let admin = db.connect().await;
        tokio::spawn(async move {
            loop {
                let n = server_connections(&admin, &app).await;
                most.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let tasks: Vec<_> = (0..200i64)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for j in 0..20i64 {
                    let v = i * 1000 + j;
                    let rows = pool
                        .query("SELECT $1::int8 * 2, pg_backend_pid()", &[&v])
                        .await
                        .unwrap();
                    assert_eq!(rows[0].get::<_, i64>(0), v * 2);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    watcher.abort();
    let most = most.load(std::sync::atomic::Ordering::Relaxed);
    assert!(most <= 3, "{most} server connections for a limit of 3");
    let s = pool.stats();
    assert_eq!(s.in_use, 0, "every shared connection went back: {s:?}");
    assert!(s.open <= 3, "{s:?}");
    // Statements were shared: far fewer checkouts than statements.
    assert!(
        s.checkouts < 4000,
        "{} checkouts for 4000 statements",
        s.checkouts
    );
    assert!(server_connections(&admin, &app).await <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_waiting_for_an_exclusive_connection_is_served_under_pipelined_load() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "connection_limit=2&pool_timeout=5");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..32)
        .map(|_| {
            let (pool, stop) = (pool.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    pool.query("SELECT pg_sleep(0.001)", &[]).await.unwrap();
                }
            })
        })
        .collect();
    // Let the shared connections take both slots.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        let mut conn = pool
            .get()
            .await
            .expect("an exclusive checkout within pool_timeout");
        let mut tx = conn.transaction().await.unwrap();
        tx.execute("SELECT 1", &[]).await.unwrap();
        tx.commit().await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(pool.stats().in_use, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_dropped_mid_statement_costs_its_connection_not_the_others_answers() {
    let db = TestDatabase::create().await;
    let admin = db.connect().await;
    let (pool, app) = pool(&db, "connection_limit=1");
    // Statements prepared beforehand: each call below is sent at once.
    pool.query("SELECT pg_sleep($1::float8)", &[&0.0f64])
        .await
        .unwrap();
    pool.query("SELECT $1::int8", &[&0i64]).await.unwrap();
    // One connection: the sleeper and the others share it.
    let sleeper = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.query("SELECT pg_sleep(0.5)", &[]).await })
    };
    let others: Vec<_> = (0..5i64)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let rows = pool.query("SELECT $1::int8", &[&i]).await.unwrap();
                rows[0].get::<_, i64>(0) == i
            })
        })
        .collect();
    // All sent before the caller below.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pid: i32 = admin
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    // A caller that gives up mid-statement (which would run 30 s; its
    // statement is prepared already, so it is sent at once, queued behind
    // the others).
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        pool.query("SELECT pg_sleep($1::float8)", &[&30.0f64]),
    )
    .await;
    assert!(gave_up.is_err());
    for o in others {
        assert!(o.await.unwrap(), "an answer went to the wrong caller");
    }
    sleeper.await.unwrap().unwrap();
    // The shared connection is not reused, and the abandoned statement is
    // cancelled: its backend goes away long before the 30 s.
    let gone = eventually(Duration::from_secs(5), || async {
        admin
            .query("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    assert!(
        gone,
        "the abandoned statement was not cancelled (or its connection was reused)"
    );
    let rows = pool.query("SELECT 7::int8", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 7);
    assert_eq!(pool.stats().in_use, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_timeout_holds_for_pipelined_statements() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "connection_limit=1&socket_timeout=1");
    let slow = pool.query("SELECT pg_sleep(30)", &[]).await;
    assert!(matches!(slow, Err(Error::SocketTimeout(_))), "{slow:?}");
    assert_eq!(slow.unwrap_err().code(), "P1008");
    let rows = pool.query("SELECT 1::int8", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 1);
    assert!(pool.stats().socket_timeouts >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_answers_p2024_after_pool_timeout() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "connection_limit=1&pool_timeout=1");
    let _held = pool.get().await.unwrap();
    let e = pool.query("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(e.code(), "P2024", "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_connections_keep_the_connections_prepared_statements() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "connection_limit=1");
    for i in 0..5i64 {
        let rows = pool.query("SELECT $1::int8 + 1", &[&i]).await.unwrap();
        assert_eq!(rows[0].get::<_, i64>(0), i + 1);
    }
    let mut conn = pool.get().await.unwrap();
    conn.query("SELECT $1::int8 + 1", &[&1i64]).await.unwrap();
    drop(conn);
    let s = pool.stats();
    assert_eq!(
        (s.statement_cache_misses, s.statement_cache_hits),
        (1, 5),
        "prepared once, on the one connection, whoever used it"
    );
}
