//! statement_cache_size: a bounded LRU per connection, closed on eviction.

use db_pool::testing::TestDatabase;
use db_pool::Conn;

use crate::common::pool;

async fn prepared_on_server(conn: &mut Conn) -> i64 {
    // pg_prepared_statements is per session: ask through the connection itself.
    conn.query_one("SELECT count(*) FROM pg_prepared_statements", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn cache_is_bounded_and_evicted_statements_are_closed_on_the_server() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "connection_limit=1&statement_cache_size=3");
    let mut conn = pool.get().await.unwrap();
    for i in 0..10 {
        let sql = format!("SELECT {i}::int4 + $1");
        let row = conn.query_one(&sql, &[&1i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1);
        assert!(prepared_on_server(&mut conn).await <= 3);
    }
    let stats = pool.stats();
    assert!(stats.statement_cache_evictions >= 8, "{stats:?}");
    assert_eq!(prepared_on_server(&mut conn).await, 3);
}

#[tokio::test]
async fn repeated_statements_are_prepared_once() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "connection_limit=1&statement_cache_size=10");
    let mut conn = pool.get().await.unwrap();
    for _ in 0..5 {
        conn.query("SELECT $1::text", &[&"x"]).await.unwrap();
    }
    let stats = pool.stats();
    assert_eq!(
        (stats.statement_cache_misses, stats.statement_cache_hits),
        (1, 4)
    );
    drop(conn);
    // The cache belongs to the connection and survives its return.
    let mut conn = pool.get().await.unwrap();
    conn.query("SELECT $1::text", &[&"y"]).await.unwrap();
    assert_eq!(pool.stats().statement_cache_hits, 5);
}

#[tokio::test]
async fn size_zero_keeps_no_statement_on_the_server() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "connection_limit=1&statement_cache_size=0");
    let mut conn = pool.get().await.unwrap();
    for i in 0..5 {
        conn.query(&format!("SELECT {i} + $1::int4"), &[&1i32])
            .await
            .unwrap();
    }
    // Only the counting statement itself, while it runs.
    assert!(prepared_on_server(&mut conn).await <= 1);
    assert_eq!(pool.stats().statement_cache_hits, 0);
}
