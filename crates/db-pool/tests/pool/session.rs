//! application_name, schema (search_path) and options, as the server sees them.

use db_pool::testing::TestDatabase;

use crate::common::pool;

#[tokio::test]
async fn application_name_schema_and_options_reach_the_server() {
    let db = TestDatabase::create().await;
    let admin = db.connect().await;
    admin
        .batch_execute(
            "CREATE SCHEMA app; CREATE TABLE app.t (v int); INSERT INTO app.t VALUES (42)",
        )
        .await
        .unwrap();
    let (pool, app) = pool(&db, "schema=app&options=-c%20statement_timeout%3D4321");
    let mut conn = pool.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT current_setting('application_name'), current_setting('search_path'), \
             current_setting('statement_timeout'), (SELECT v FROM t)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), app);
    assert_eq!(row.get::<_, String>(1), "app");
    assert_eq!(row.get::<_, String>(2), "4321ms");
    assert_eq!(
        row.get::<_, i32>(3),
        42,
        "unqualified names resolve in the schema"
    );
}

#[tokio::test]
async fn transactions_commit_and_roll_back() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "connection_limit=1");
    let mut conn = pool.get().await.unwrap();
    conn.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    let mut tx = conn.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES ($1)", &[&1i32])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = conn.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES ($1)", &[&2i32])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let n: i64 = conn
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

/// A statement that is not a query (`COPY ... TO STDOUT` through
/// `query`) is refused as a failed statement (P2010), the connection kept:
/// the next statement on it works, on the same backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_through_query_is_refused_and_the_connection_kept() {
    let db = TestDatabase::create().await;
    let (pool, _app) = pool(&db, "connection_limit=1");
    let mut conn = pool.get().await.unwrap();
    let pid = conn.backend_pid();
    // Twice: prepared and run, then run from the statement cache.
    for _ in 0..2 {
        let err = conn
            .query("COPY (SELECT 1) TO STDOUT", &[])
            .await
            .unwrap_err();
        assert_eq!(err.code(), "P2010", "{err}");
        let row = conn.query_one("SELECT 41 + 1 AS n", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>("n"), 42);
    }
    drop(conn);
    assert_eq!(pool.get().await.unwrap().backend_pid(), pid);
}
