//! Prisma's error codes, each with a hint.

use std::time::Duration;

use db_pool::testing::TestDatabase;
use db_pool::{Error, PoolConfig};
use pg_cluster::{ClusterOptions, LocalCluster};

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
    let admin = crate::common::admin(&cluster).await;
    admin.batch_execute("CREATE ROLE app LOGIN").await.unwrap();
    let url = format!(
        "postgresql://app@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port()
    );
    (cluster, url)
}

/// The server refusing new connections (53300) is not the caller's
/// failure: the caller waits for a connection another caller returns, and
/// gets P2024 naming the refusals only when none comes within
/// `pool_timeout`. Attempts meanwhile back off, one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_make_callers_wait_for_a_returned_one_not_fail() {
    let (_cluster, url) = small_server().await;
    let pool = pool_url(&with_params(&url, "connection_limit=10&pool_timeout=2"));
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(pool.get().await.unwrap());
    }
    // Nothing comes back: P2024 after pool_timeout, naming the refusals.
    let err = pool.get().await.err().unwrap();
    assert_eq!(err.code(), "P2024", "{err}");
    assert!(
        err.to_string()
            .contains("the server refused new connections (53300): serving with 3"),
        "{err}"
    );
    let stats = pool.stats();
    assert!(stats.too_many_connections >= 1, "{stats:?}");
    assert!(
        stats.connect_attempts <= 3 + 1 + 6,
        "{} connection attempts in 2 s of refusals: the backoff is not working",
        stats.connect_attempts
    );

    // A caller refused now is served by the next connection returned.
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut c = pool.get().await?;
            c.query("SELECT 1", &[]).await.map(|_| c.backend_pid())
        }
    });
    assert!(
        crate::common::eventually(Duration::from_secs(5), || async {
            pool.stats().waiting >= 1
        })
        .await
    );
    let returned = held.pop().unwrap();
    let pid = returned.backend_pid();
    drop(returned);
    assert_eq!(waiter.await.unwrap().unwrap(), pid, "handed over");
    assert!(pool.stats().handoffs >= 1);
}

/// Issue 12's reproduction: room for 2 connections on the server, a pool
/// allowed 10, 24 callers in a loop. Every call is served, by the 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_larger_than_the_servers_room_serves_every_caller() {
    let (cluster, _) = small_server().await;
    let admin = crate::common::admin(&cluster).await;
    admin
        .batch_execute("CREATE ROLE two LOGIN CONNECTION LIMIT 2")
        .await
        .unwrap();
    let url = format!(
        "postgresql://two@127.0.0.1:{}/postgres?sslmode=disable&connection_limit=10&pool_timeout=10",
        cluster.port()
    );
    let pool = pool_url(&url);
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut errors = Vec::new();
                for _ in 0..300 {
                    let r = async {
                        let mut c = pool.get().await?;
                        c.query("SELECT 1", &[]).await
                    }
                    .await;
                    if let Err(e) = r {
                        errors.push(e.to_string());
                    }
                }
                errors
            })
        })
        .collect();
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    let stats = pool.stats();
    assert!(stats.open <= 2, "{stats:?}");
    assert!(
        stats.too_many_connections >= 1,
        "the server did refuse: {stats:?}"
    );
    assert!(stats.handoffs >= 1, "{stats:?}");
    // Handed over, never dropped on the way: no churn of connections, and
    // the refused attempts follow the backoff (one at a time, 100 ms
    // doubling), not one per caller.
    assert!(
        stats.connections_opened <= 4 && stats.closed_shutdown == 0,
        "connections churned: {stats:?}"
    );
    assert!(stats.connect_attempts <= 40, "{stats:?}");
}

/// A wrong password is P1000 naming the user, never the password, and it
/// is not mistaken for anything else.
#[tokio::test]
async fn wrong_password_is_p1000_without_the_password() {
    let mut cluster = LocalCluster::start_temporary(ClusterOptions::default())
        .await
        .unwrap();
    let admin = crate::common::admin(&cluster).await;
    admin
        .batch_execute("SET password_encryption = 'scram-sha-256'; CREATE ROLE pwuser LOGIN PASSWORD 'right-pass'")
        .await
        .unwrap();
    drop(admin);
    cluster
        .write_data_file(
            "pg_hba.conf",
            "host all pwuser 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 trust\nlocal all all trust\n",
            0o600,
        )
        .unwrap();
    cluster.reload().await.unwrap();
    let url = |password: &str| {
        format!(
            "postgresql://pwuser:{password}@127.0.0.1:{}/postgres?sslmode=disable&connect_timeout=5&pool_timeout=5",
            cluster.port()
        )
    };
    let pool = pool_url(&url("wrong-pass-0xdeadbeef"));
    let err = pool.get().await.err().expect("a wrong password connects");
    assert_eq!(err.code(), "P1000", "{err}");
    let text = format!("{err} {err:?} {}", err.hint());
    assert!(text.contains("pwuser"), "{text}");
    assert!(!text.contains("wrong-pass-0xdeadbeef"), "{text}");
    // The right one works (the failure was the password, nothing else).
    let mut conn = pool_url(&url("right-pass")).get().await.unwrap();
    conn.query("SELECT 1", &[]).await.unwrap();
}
