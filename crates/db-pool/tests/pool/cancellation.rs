//! Callers that give up (their future dropped) leave the pool whole.

use std::time::Duration;

use db_pool::testing::TestDatabase;

use crate::common::{eventually, pool, server_connections};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_dropped_mid_query_frees_its_slot_and_stops_the_query() {
    let db = TestDatabase::create().await;
    let admin = db.connect().await;
    let (pool, app) = pool(&db, "connection_limit=2");
    let mut conn = pool.get().await.unwrap();
    let pid = conn.backend_pid();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        conn.query("SELECT pg_sleep(60)", &[]),
    )
    .await;
    assert!(gave_up.is_err());
    drop(conn);

    let stopped = eventually(Duration::from_secs(5), || async {
        admin
            .query("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    assert!(stopped, "the abandoned backend is still there");
    // Both slots usable, neither is the abandoned backend.
    let mut a = pool.get().await.unwrap();
    let mut b = pool.get().await.unwrap();
    assert!(a.backend_pid() != pid && b.backend_pid() != pid);
    a.query("SELECT 1", &[]).await.unwrap();
    b.query("SELECT 1", &[]).await.unwrap();
    assert!(server_connections(&admin, &app).await <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_returned_inside_a_transaction_is_rolled_back() {
    let db = TestDatabase::create().await;
    let admin = db.connect().await;
    admin.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    let (pool, app) = pool(&db, "connection_limit=1");
    let mut conn = pool.get().await.unwrap();
    let pid = conn.backend_pid();
    let mut tx = conn.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    drop(tx);
    drop(conn);

    // Not left "idle in transaction" in the pool, holding its locks.
    let idle = eventually(Duration::from_secs(5), || async {
        let state: Option<String> = admin
            .query_one(
                "SELECT state FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .await
            .unwrap()
            .get(0);
        state.as_deref() == Some("idle")
    })
    .await;
    assert!(idle, "connection left idle in transaction");
    let mut conn = pool.get().await.unwrap();
    assert_eq!(conn.backend_pid(), pid, "rolled back, not discarded");
    let n: i64 = conn
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn abandoned_transaction_is_rolled_back_before_the_next_statement() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "connection_limit=1");
    let mut conn = pool.get().await.unwrap();
    conn.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    {
        let mut tx = conn.transaction().await.unwrap();
        tx.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    }
    let n: i64 = conn
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    // Inside the abandoned transaction the row would be visible: it is not.
    // And the session is not in a transaction block any more.
    let open: Option<String> = conn
        .query_one("SELECT txid_current_if_assigned()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_dropped_while_waiting_leaves_no_trace() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "connection_limit=1&pool_timeout=0");
    let held = pool.get().await.unwrap();
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get().await.map(|_| ()) })
    };
    while pool.stats().waiting == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    waiter.abort();
    let _ = waiter.await;
    assert_eq!(pool.stats().waiting, 0);
    drop(held);
    let mut conn = pool.get().await.unwrap();
    conn.query("SELECT 1", &[]).await.unwrap();
    let s = pool.stats();
    assert_eq!((s.open, s.in_use, s.idle), (1, 1, 0));
}

/// A statement whose caller gave up is still answered on the wire: the
/// next statement on the same connection gets its own rows, not that
/// answer (a cached statement runs on the socket directly only while
/// nothing else is being answered there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_statement_after_a_cancelled_one_gets_its_own_rows() {
    let db = TestDatabase::create().await;
    let (pool, _app) = pool(&db, "connection_limit=1");
    let mut conn = pool.get().await.unwrap();
    // Prepared and cached by the first run.
    conn.query("SELECT $1::int AS n", &[&1i32]).await.unwrap();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        conn.query_typed("SELECT 7 AS n FROM pg_sleep(0.5)", &[]),
    )
    .await;
    assert!(gave_up.is_err());
    for n in 2..5i32 {
        let row = conn.query_one("SELECT $1::int AS n", &[&n]).await.unwrap();
        assert_eq!(row.get::<_, i32>("n"), n);
    }
}

/// A statement given up before tokio-postgres even wrote it (its future
/// polled once, then dropped, the connection's driver not yet run) still
/// reaches the server before the caller's next statement: they run in the
/// order the caller issued them.
#[tokio::test(flavor = "current_thread")]
async fn a_statement_given_up_before_it_was_sent_is_not_overtaken() {
    let db = TestDatabase::create().await;
    let (pool, _app) = pool(&db, "connection_limit=1");
    let mut conn = pool.get().await.unwrap();
    let setting = "SELECT current_setting('application_name') AS v";
    conn.query(setting, &[]).await.unwrap();
    {
        let mut set = std::pin::pin!(conn.batch_execute("SET application_name = 'given_up'"));
        let polled = futures_util::poll!(set.as_mut());
        assert!(polled.is_pending());
    }
    let row = conn.query_one(setting, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>("v"), "given_up");
}

/// A caller that gives up on a statement already sent, and goes on with
/// the same connection, gets its next statements' own rows: the answer it
/// gave up on passes unseen, as with tokio-postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_giving_up_on_a_sent_statement_the_connection_answers_the_next() {
    let db = TestDatabase::create().await;
    let (pool, _app) = pool(&db, "connection_limit=1");
    let mut conn = pool.get().await.unwrap();
    let slow = "SELECT $1::int AS n FROM pg_sleep($2::float8)";
    // Prepared and cached, so the next run goes out on the socket directly.
    conn.query(slow, &[&1i32, &0.0f64]).await.unwrap();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        conn.query(slow, &[&2i32, &0.5f64]),
    )
    .await;
    assert!(gave_up.is_err());
    for n in 3..6i32 {
        let row = conn.query_one(slow, &[&n, &0.0f64]).await.unwrap();
        assert_eq!(row.get::<_, i32>("n"), n);
    }
}
