//! `diagnostics::activity` and `diagnostics::doctor` against real servers:
//! the shared test server, private clusters configured for one check each,
//! and a real PgBouncer in transaction mode.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use db_pool::diagnostics::{self, Activity, DoctorOptions, DoctorReport, Status};
use db_pool::testing::{tokio_postgres_url, with_params, TestDatabase};
use db_pool::{Pool, PoolConfig};
use pg_cluster::{ClusterOptions, LocalCluster};
use tokio_postgres::{Client, NoTls};

/// A plain tokio-postgres client showing `app` as its application_name.
async fn client(db: &TestDatabase, app: &str) -> Client {
    let url = tokio_postgres_url(&with_params(&db.url, &format!("application_name={app}")));
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

async fn backend_pid(client: &Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

async fn sample(pool: &Pool, database: &str) -> Activity {
    let mut conn = pool.get().await.unwrap();
    diagnostics::activity(&mut conn, database).await.unwrap()
}

fn app<'a>(a: &'a Activity, name: &str) -> &'a diagnostics::Counts {
    &a.applications
        .iter()
        .find(|x| x.application_name == name)
        .unwrap_or_else(|| panic!("no application {name} in {a:#?}"))
        .connections
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_shows_idle_transactions_lock_waiters_and_their_blockers() {
    let db = TestDatabase::create().await;
    let suffix = format!("{:08x}", rand::random::<u32>());
    let (holder_app, waiter_app, idle_app) = (
        format!("holder_{suffix}"),
        format!("waiter_{suffix}"),
        format!("idle_{suffix}"),
    );
    let holder = client(&db, &holder_app).await;
    holder
        .batch_execute("CREATE TABLE t (n int)")
        .await
        .unwrap();
    holder
        .batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let holder_pid = backend_pid(&holder).await;

    let waiter = client(&db, &waiter_app).await;
    let waiter_pid = backend_pid(&waiter).await;
    let blocked = tokio::spawn(async move {
        waiter
            .batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE; ROLLBACK")
            .await
    });

    let idle_in_tx = client(&db, &idle_app).await;
    idle_in_tx.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let idle = client(&db, &idle_app).await;
    idle.batch_execute("SELECT 1").await.unwrap();

    let pool = Pool::new(diagnostics::diagnostic_config(
        &PoolConfig::parse(&db.url).unwrap(),
    ))
    .unwrap();
    let mut a = sample(&pool, &db.name).await;
    for _ in 0..100 {
        if !a.lock_waits.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        a = sample(&pool, &db.name).await;
    }

    assert_eq!(a.database, db.name);
    assert_eq!(
        a.connections.total, 4,
        "the sampling connection is left out: {a:#?}"
    );
    assert_eq!(a.connections.idle_in_transaction, 2, "{a:#?}");
    assert_eq!(a.connections.active, 1, "{a:#?}");
    assert_eq!(a.connections.idle, 1, "{a:#?}");

    assert_eq!(app(&a, &holder_app).idle_in_transaction, 1);
    assert_eq!(app(&a, &waiter_app).active, 1);
    let idle_counts = app(&a, &idle_app);
    assert_eq!(
        (
            idle_counts.total,
            idle_counts.idle,
            idle_counts.idle_in_transaction
        ),
        (2, 1, 1)
    );
    assert_eq!(a.applications[0].application_name, idle_app, "most first");

    assert_eq!(a.lock_waits.len(), 1, "{a:#?}");
    let wait = &a.lock_waits[0];
    assert_eq!(wait.pid, waiter_pid);
    assert_eq!(wait.application_name, waiter_app);
    assert_eq!(wait.blocked_by, vec![holder_pid]);
    assert!(wait.query.contains("LOCK TABLE t"), "{}", wait.query);

    let longest = a.longest_transaction.as_ref().unwrap();
    assert_eq!(longest.pid, holder_pid, "the lock holder began first");
    assert_eq!(longest.state.as_deref(), Some("idle in transaction"));
    assert_eq!(a.longest_query.as_ref().unwrap().pid, waiter_pid);
    assert!(!a.sampled_at.is_empty());

    holder.batch_execute("ROLLBACK").await.unwrap();
    blocked.await.unwrap().unwrap();
    pool.close(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn activity_cuts_long_query_texts() {
    let db = TestDatabase::create().await;
    let other = client(&db, "long").await;
    let long = format!("SELECT 1 /* {} */", "x".repeat(500));
    other.batch_execute(&long).await.unwrap();
    let pool = Pool::new(diagnostics::diagnostic_config(
        &PoolConfig::parse(&db.url).unwrap(),
    ))
    .unwrap();
    let a = sample(&pool, &db.name).await;
    let q = &a.longest_query;
    assert!(q.is_none(), "the other connection is idle: {q:?}");
    assert_eq!(a.connections.idle, 1);
    assert!(a.longest_transaction.is_none());
    // The idle connection's last statement is not reported anywhere but the
    // text limit holds for what is: run a long one that is still active.
    let running = format!("SELECT pg_sleep(5) /* {} */", "y".repeat(500));
    let handle = tokio::spawn(async move { other.batch_execute(&running).await });
    let mut found = None;
    for _ in 0..100 {
        found = sample(&pool, &db.name).await.longest_query;
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let q = found.unwrap().query;
    assert_eq!(q.chars().count(), diagnostics::QUERY_TEXT_LIMIT, "{q}");
    assert!(q.ends_with("..."));
    handle.abort();
    pool.close(Duration::from_secs(1)).await;
}

fn cfg(url: &str) -> PoolConfig {
    PoolConfig::parse(url).unwrap()
}

fn status(report: &DoctorReport, name: &str) -> Status {
    report
        .check(name)
        .unwrap_or_else(|| panic!("no {name} check in {report:#?}"))
        .status
}

fn everything(report: &DoctorReport) -> String {
    serde_json::to_string(report).unwrap()
}

#[tokio::test]
async fn doctor_passes_a_sane_configuration() {
    let db = TestDatabase::create().await;
    let report = diagnostics::doctor(&cfg(&db.url), &DoctorOptions::default()).await;
    let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "url",
            "connect",
            "max_connections",
            "connection_limit",
            "pgbouncer",
            "statement_cache_size",
            "pool_timeout",
            "idle_in_transaction_session_timeout"
        ]
    );
    assert_eq!(report.exit_code(), 0, "{report:#?}");
    for name in [
        "url",
        "connect",
        "max_connections",
        "pgbouncer",
        "pool_timeout",
    ] {
        assert_eq!(status(&report, name), Status::Ok, "{report:#?}");
    }
    // The test server runs on this machine: its cores are known.
    assert!(report.recommended_connection_limit.is_some());
}

/// A private server with few connection slots; `extra` settings on top.
async fn small_server(extra: &[(&str, &str)]) -> LocalCluster {
    let mut opts = ClusterOptions::default()
        .setting("max_connections", "20")
        .setting("superuser_reserved_connections", "3");
    for (k, v) in extra {
        opts = opts.setting(*k, *v);
    }
    LocalCluster::start_temporary(opts).await.unwrap()
}

#[tokio::test]
async fn doctor_fails_when_the_instances_need_more_connections_than_the_server_has() {
    let server = small_server(&[]).await;
    let url = with_params(&server.url("postgres"), "connection_limit=10");
    let opts = DoctorOptions {
        instances: 3,
        ..DoctorOptions::default()
    };
    let report = diagnostics::doctor(&cfg(&url), &opts).await;
    let check = report.check("max_connections").unwrap();
    assert_eq!(check.status, Status::Fail, "{report:#?}");
    assert!(
        check.detail.contains("need 30") && check.detail.contains("max_connections 20"),
        "{}",
        check.detail
    );
    assert!(check.detail.contains("3 reserved"), "{}", check.detail);
    let hint = check.hint.as_deref().unwrap();
    assert!(
        hint.contains("lower connection_limit")
            && hint.contains("max_connections")
            && hint.contains("PgBouncer"),
        "{hint}"
    );
    assert_eq!(report.exit_code(), 1);

    // A connection outside each pool (serve's change listener) counts too.
    let opts = DoctorOptions {
        instances: 3,
        outside_pool: 1,
        ..DoctorOptions::default()
    };
    let report = diagnostics::doctor(&cfg(&url), &opts).await;
    let detail = &report.check("max_connections").unwrap().detail;
    assert!(
        detail.contains("need 33 (connection_limit 10 + 1 outside the pool x 3 instances)"),
        "{detail}"
    );

    // One instance fits (10 of 17), two are close to the edge (20 of 17: no).
    let report = diagnostics::doctor(&cfg(&url), &DoctorOptions::default()).await;
    assert_eq!(
        status(&report, "max_connections"),
        Status::Ok,
        "{report:#?}"
    );
    let url = with_params(&server.url("postgres"), "connection_limit=14");
    let report = diagnostics::doctor(&cfg(&url), &DoctorOptions::default()).await;
    assert_eq!(
        status(&report, "max_connections"),
        Status::Warn,
        "{report:#?}"
    );
}

#[tokio::test]
async fn doctor_warns_about_idle_in_transaction_timeout_only_when_it_is_off() {
    let db = TestDatabase::create().await;
    let report = diagnostics::doctor(&cfg(&db.url), &DoctorOptions::default()).await;
    let check = report.check("idle_in_transaction_session_timeout").unwrap();
    assert_eq!(check.status, Status::Warn);
    assert!(
        check
            .hint
            .as_deref()
            .unwrap()
            .contains(&format!("ALTER DATABASE \"{}\"", db.name)),
        "{check:?}"
    );

    let server = small_server(&[("idle_in_transaction_session_timeout", "60s")]).await;
    let report =
        diagnostics::doctor(&cfg(&server.url("postgres")), &DoctorOptions::default()).await;
    let check = report.check("idle_in_transaction_session_timeout").unwrap();
    assert_eq!(check.status, Status::Ok, "{check:?}");
    assert!(check.detail.starts_with("1min"), "{check:?}");
}

#[tokio::test]
async fn doctor_warns_about_unknown_parameters_and_never_shows_the_password() {
    let db = TestDatabase::create().await;
    // Trust authentication accepts any password.
    let url = db.url.replacen(
        "postgresql://postgres@",
        "postgresql://postgres:hunter2@",
        1,
    );
    assert!(url.contains("hunter2"), "unexpected test server URL shape");
    let url = with_params(&url, "conection_limit=5&sslpassword=hunter3");
    let report = diagnostics::doctor(&cfg(&url), &DoctorOptions::default()).await;
    let check = report.check("url").unwrap();
    assert_eq!(check.status, Status::Warn);
    assert!(check.detail.contains("'conection_limit'"), "{check:?}");
    assert_eq!(status(&report, "connect"), Status::Ok, "{report:#?}");
    let all = format!("{} {report:?}", everything(&report));
    assert!(
        !all.contains("hunter2") && !all.contains("hunter3"),
        "{all}"
    );
}

#[tokio::test]
async fn doctor_reports_an_unreachable_server_and_skips_the_server_checks() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("postgresql://postgres:hunter2@127.0.0.1:{port}/db");
    let report = diagnostics::doctor(&cfg(&url), &DoctorOptions::default()).await;
    let check = report.check("connect").unwrap();
    assert_eq!(check.status, Status::Fail);
    assert!(check.detail.starts_with("P1001: "), "{check:?}");
    assert!(check.hint.is_some());
    for name in [
        "max_connections",
        "pgbouncer",
        "idle_in_transaction_session_timeout",
    ] {
        assert!(report.check(name).is_none(), "{name} should be skipped");
    }
    assert!(report.check("pool_timeout").is_some());
    assert_eq!(report.exit_code(), 1);
    assert!(!everything(&report).contains("hunter2"));
}

#[tokio::test]
async fn doctor_uses_the_given_server_cores_for_the_recommendation() {
    let db = TestDatabase::create().await;
    let url = with_params(&db.url, "connection_limit=40");
    let opts = DoctorOptions {
        server_cores: Some(4),
        spindles: 2,
        instances: 1,
        outside_pool: 0,
    };
    let report = diagnostics::doctor(&cfg(&url), &opts).await;
    assert_eq!(report.recommended_connection_limit, Some(10));
    let check = report.check("connection_limit").unwrap();
    assert_eq!(check.status, Status::Warn, "40 > 2 x 10: {check:?}");
    let opts = DoctorOptions {
        instances: 4,
        ..opts
    };
    let report = diagnostics::doctor(&cfg(&db.url), &opts).await;
    assert_eq!(
        report.recommended_connection_limit,
        Some(3),
        "10 / 4 rounded up"
    );
}

#[tokio::test]
async fn doctor_warns_when_pgbouncer_is_set_but_no_pooler_is_there() {
    let db = TestDatabase::create().await;
    let url = with_params(&db.url, "pgbouncer=true");
    let report = diagnostics::doctor(&cfg(&url), &DoctorOptions::default()).await;
    let check = report.check("pgbouncer").unwrap();
    assert_eq!(check.status, Status::Warn, "{check:?}");
    assert!(check.detail.contains("no transaction pooler"), "{check:?}");
    assert_eq!(status(&report, "statement_cache_size"), Status::Ok);
}

async fn pgbouncer(db: &TestDatabase, pool_mode: &str) -> db_pool::testing::PgBouncer {
    db_pool::testing::PgBouncer::start(&db.url, pool_mode, 4).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_detects_a_transaction_pooler_in_front() {
    let db = TestDatabase::create().await;
    let bouncer = pgbouncer(&db, "transaction").await;
    let url = format!(
        "postgresql://postgres@127.0.0.1:{}/{}?sslmode=disable",
        bouncer.port, db.name
    );

    let report = diagnostics::doctor(&cfg(&url), &DoctorOptions::default()).await;
    let check = report.check("pgbouncer").unwrap();
    assert_eq!(check.status, Status::Fail, "{report:#?}");
    assert!(
        check.detail.contains("prepared statement does not exist"),
        "{check:?}"
    );
    assert!(
        check.detail.contains("a proxy or port mapping"),
        "{check:?}"
    );
    assert_eq!(
        check.hint.as_deref(),
        Some("Add pgbouncer=true to DATABASE_URL.")
    );
    assert_eq!(report.exit_code(), 1);

    let report = diagnostics::doctor(
        &cfg(&with_params(&url, "pgbouncer=true")),
        &DoctorOptions {
            instances: 50,
            ..DoctorOptions::default()
        },
    )
    .await;
    assert_eq!(status(&report, "pgbouncer"), Status::Ok, "{report:#?}");
    // 50 x 10 client connections go to PgBouncer, not to the server.
    let check = report.check("max_connections").unwrap();
    assert_eq!(check.status, Status::Ok, "{check:?}");
    assert!(check.detail.contains("transaction pooler"), "{check:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_sees_no_transaction_pooler_behind_a_session_pooler() {
    let db = TestDatabase::create().await;
    let bouncer = pgbouncer(&db, "session").await;
    let url = format!(
        "postgresql://postgres@127.0.0.1:{}/{}?sslmode=disable",
        bouncer.port, db.name
    );
    let report = diagnostics::doctor(&cfg(&url), &DoctorOptions::default()).await;
    let check = report.check("pgbouncer").unwrap();
    assert_eq!(check.status, Status::Ok, "{report:#?}");
    assert!(
        check.detail.contains("a proxy or port mapping"),
        "{check:?}"
    );
}
