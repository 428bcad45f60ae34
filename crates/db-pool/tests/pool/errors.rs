//! Prisma's error codes, each with a hint.

use std::time::Duration;

use db_pool::cluster::{ClusterOptions, LocalCluster};
use db_pool::testing::TestDatabase;
use db_pool::{Error, PoolConfig};

use crate::common::{closed_port, pool, pool_url, with_params};

#[tokio::test]
async fn refused_connection_is_p1001() {
    let port = closed_port();
    let pool = pool_url(&format!(
        "postgresql://postgres@127.0.0.1:{port}/db?sslmode=disable"
    ));
    let err = pool.get().await.err().unwrap();
    assert_eq!(err.code(), "P1001");
    assert!(err.to_string().starts_with(&format!(
        "P1001: Can't reach database server at 127.0.0.1:{port}"
    )));
    assert!(err.hint().contains("running"));
}

#[tokio::test]
async fn unresolvable_host_is_p1001() {
    let pool = pool_url(
        "postgresql://postgres@no-such-host.invalid:5432/db?sslmode=disable&connect_timeout=3",
    );
    let err = pool.get().await.err().unwrap();
    assert_eq!(err.code(), "P1001", "{err}");
    assert!(
        err.to_string().contains("no-such-host.invalid:5432"),
        "{err}"
    );
}

#[tokio::test]
async fn invalid_url_is_p1013() {
    let err = PoolConfig::parse("postgresql://u:secret@h/db?connection_limit=0").unwrap_err();
    let err = Error::from(err);
    assert_eq!(err.code(), "P1013");
    assert!(!err.to_string().contains("secret"));
}

#[tokio::test]
async fn missing_database_is_p1003() {
    let db = TestDatabase::create().await;
    let url = db.url.replace(&db.name, "no_such_database");
    let err = pool_url(&url).get().await.err().unwrap();
    assert_eq!(err.code(), "P1003", "{err}");
    assert!(err.to_string().contains("no_such_database"));
}

#[tokio::test]
async fn terminated_backend_mid_use_is_p1017() {
    let db = TestDatabase::create().await;
    let admin = db.connect().await;
    let (pool, _) = pool(&db, "connection_limit=1");
    let mut conn = pool.get().await.unwrap();
    let pid = conn.backend_pid();
    admin
        .execute("SELECT pg_terminate_backend($1, 5000)", &[&pid])
        .await
        .unwrap();
    let err = conn.query("SELECT 1", &[]).await.err().unwrap();
    assert_eq!(err.code(), "P1017", "{err}");
    assert_eq!(err.to_string(), "P1017: Server has closed the connection");
    drop(conn);
    let mut next = pool.get().await.unwrap();
    assert_ne!(next.backend_pid(), pid);
    next.query("SELECT 1", &[]).await.unwrap();
}

#[tokio::test]
async fn server_errors_keep_their_sqlstate() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "");
    let mut conn = pool.get().await.unwrap();
    let err = conn
        .query("SELECT * FROM no_such_table", &[])
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), "P2010");
    assert_eq!(err.sqlstate(), Some("42P01"));
    // The connection is fine afterwards.
    conn.query("SELECT 1", &[]).await.unwrap();
}

#[tokio::test]
async fn server_errors_never_carry_row_values() {
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db, "");
    let mut conn = pool.get().await.unwrap();
    conn.batch_execute(
        "CREATE TABLE vault (name text UNIQUE, secret text CHECK (length(secret) < 5))",
    )
    .await
    .unwrap();
    conn.execute(
        "INSERT INTO vault VALUES ($1, $2)",
        &[&"only-name-1", &"abc"],
    )
    .await
    .unwrap();
    // PostgreSQL's DETAIL quotes the failing row and the duplicate key.
    let check = conn
        .execute(
            "INSERT INTO vault VALUES ($1, $2)",
            &[&"only-name-2", &"tok-SECRET-value"],
        )
        .await
        .unwrap_err();
    let unique = conn
        .execute("INSERT INTO vault VALUES ($1, $2)", &[&"only-name-1", &"x"])
        .await
        .unwrap_err();
    for (err, sqlstate, constraint) in [
        (&check, "23514", "vault_secret_check"),
        (&unique, "23505", "vault_name_key"),
    ] {
        assert_eq!(err.sqlstate(), Some(sqlstate));
        assert_eq!(err.constraint(), Some(constraint));
        let mut shown = format!("{err} {err:?}");
        let mut source = std::error::Error::source(err);
        while let Some(s) = source {
            shown.push_str(&format!(" {s} {s:?}"));
            source = s.source();
        }
        assert!(shown.contains(constraint), "{shown}");
        for value in ["tok-SECRET-value", "only-name-1", "only-name-2"] {
            assert!(!shown.contains(value), "{value} in: {shown}");
        }
    }
}

/// A private server with 3 connection slots for ordinary roles.
async fn small_server() -> (LocalCluster, String) {
    let cluster = LocalCluster::start_temporary(
        ClusterOptions::default()
            .setting("max_connections", "6")
            .setting("superuser_reserved_connections", "3"),
    )
    .await
    .unwrap();
    let (admin, connection) =
        tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    admin.batch_execute("CREATE ROLE app LOGIN").await.unwrap();
    let url = format!(
        "postgresql://app@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port()
    );
    (cluster, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_connections_is_p2037_and_backs_off() {
    let (_cluster, url) = small_server().await;
    let pool = pool_url(&with_params(&url, "connection_limit=10&pool_timeout=2"));
    let mut held = Vec::new();
    let mut first_error = None;
    for _ in 0..10 {
        match pool.get().await {
            Ok(c) => held.push(c),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    assert_eq!(held.len(), 3, "the server has 3 slots for this role");
    let err = first_error.unwrap();
    assert_eq!(err.code(), "P2037", "{err}");
    assert!(
        err.to_string()
            .starts_with("P2037: Too many database connections opened: "),
        "{err}"
    );
    assert!(err.hint().contains("max_connections"));

    // Callers keep asking for a second; the pool must not storm the server.
    let start = tokio::time::Instant::now();
    let mut calls = 0;
    while start.elapsed() < Duration::from_secs(1) {
        let e = pool.get().await.err().unwrap();
        assert_eq!(e.code(), "P2037");
        calls += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let attempts = pool.stats().connect_attempts;
    assert!(calls > 50, "the callers did ask ({calls})");
    assert!(
        attempts <= 3 + 1 + 8,
        "{attempts} connection attempts for {calls} checkouts: backoff is not working"
    );

    // Once a slot frees, the pool serves again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut conn = pool.get().await.unwrap();
    conn.query("SELECT 1", &[]).await.unwrap();
}
