//! The pool's numbers: stats and Prometheus export under concurrency and
//! failure, leak detection and slow-query logs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use db_pool::testing::{with_params, TestDatabase};
use db_pool::{Pool, PoolConfig};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use pg_cluster::{ClusterOptions, LocalCluster};

fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().unwrap())
}

fn app() -> String {
    format!("m_{:08x}", rand::random::<u32>())
}

fn pool(url: &str, params: &str) -> (Pool, String) {
    prometheus();
    let app = app();
    let cfg = PoolConfig::parse(&with_params(
        url,
        &format!("application_name={app}&{params}"),
    ))
    .unwrap();
    (Pool::new(cfg).unwrap(), app)
}

/// The value of one sample line, e.g. `db_pool_waiting{pool="x"} 2`.
fn sample(name_and_labels: &str) -> Option<f64> {
    prometheus()
        .render()
        .lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn wait_until(mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_callers_on_two_connections_show_two_waiting_then_none() {
    let db = TestDatabase::create().await;
    let (pool, app) = pool(&db.url, "connection_limit=2&pool_timeout=0");
    let holders: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut conn = pool.get().await.unwrap();
                conn.query("SELECT pg_sleep(0.5)", &[]).await.unwrap();
            })
        })
        .collect();
    // Steady state: two hold a connection, two wait (not the moment when
    // only the first two tasks have started and are still connecting).
    wait_until(|| {
        let s = pool.stats();
        s.waiting == 2 && s.in_use == 2
    })
    .await;
    let s = pool.stats();
    assert_eq!((s.open, s.in_use, s.idle, s.max), (2, 2, 0, 2));
    assert!(s.oldest_wait_secs > 0.0);
    pool.export_metrics();
    assert_eq!(
        sample(&format!("db_pool_waiting{{pool=\"{app}\"}}")),
        Some(2.0)
    );
    assert_eq!(
        sample(&format!("db_pool_connections_in_use{{pool=\"{app}\"}}")),
        Some(2.0)
    );
    assert_eq!(
        sample(&format!("db_pool_connections_max{{pool=\"{app}\"}}")),
        Some(2.0)
    );
    for h in holders {
        h.await.unwrap();
    }
    let s = pool.stats();
    assert_eq!((s.waiting, s.in_use, s.idle, s.open), (0, 0, 2, 2));
    assert_eq!(s.oldest_wait_secs, 0.0);
    assert_eq!(s.checkouts, 4);
    pool.export_metrics();
    assert_eq!(
        sample(&format!("db_pool_waiting{{pool=\"{app}\"}}")),
        Some(0.0)
    );
    assert_eq!(
        sample(&format!("db_pool_checkouts_total{{pool=\"{app}\"}}")),
        Some(4.0)
    );
    let text = prometheus().render();
    for name in [
        "db_pool_connections_open",
        "db_pool_connections_idle",
        "db_pool_oldest_wait_seconds",
        "db_pool_checkout_timeouts_total",
        "db_pool_connections_opened_total",
        "db_pool_connections_closed_total",
        "db_pool_statement_cache_hits_total",
        "db_pool_statement_cache_misses_total",
        "db_pool_statement_cache_evictions_total",
        "db_pool_leaks_detected_total",
        "db_pool_slow_queries_total",
        "db_pool_checkout_wait_seconds",
        "db_pool_connection_hold_seconds",
        "db_pool_connect_seconds",
        "db_pool_query_seconds",
    ] {
        assert!(
            text.contains(&format!("{name}{{pool=\"{app}\"")),
            "{name} missing from\n{text}"
        );
    }
}

/// How many connections the server has for `app` (from a fresh admin
/// connection: the server restarts during the test); `None` while it is
/// down.
async fn server_count(admin_url: &str, app: &str) -> Option<i64> {
    let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .ok()?;
    Some(row.get(0))
}

/// Waits (at most 10 s) until the pool's raw counts agree with themselves
/// and with the server: `checkouts - returns == in_use == in_use_now`,
/// `in_use + idle == open`, and `open` equals the server's own count of
/// the pool's connections in `pg_stat_activity`.
async fn counts_match_the_server(
    pool: &Pool,
    admin_url: &str,
    app: &str,
    in_use_now: usize,
) -> db_pool::PoolStats {
    let mut last = None;
    for _ in 0..200 {
        let s = pool.stats();
        let server = server_count(admin_url, app).await;
        let outstanding = s.checkouts.checked_sub(s.returns);
        if outstanding == Some(in_use_now as u64)
            && s.in_use == in_use_now
            && s.in_use + s.idle == s.open
            && server == Some(s.open as i64)
        {
            return s;
        }
        last = Some((s, server));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("pool and server disagree (expected {in_use_now} in use): {last:#?}");
}

/// The gauges are the raw counts, checked against the server: through
/// load with cancelled queries and cancelled checkouts, a server restart,
/// and a cancelled query on a held connection, `checkouts - returns` is
/// what is in use and `open` is what `pg_stat_activity` shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_match_the_servers_count_through_restarts_and_cancellations() {
    let mut cluster = LocalCluster::start_temporary(ClusterOptions::default())
        .await
        .unwrap();
    let url = format!(
        "postgresql://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port()
    );
    let admin_url = cluster.url("postgres");
    let (pool, app) = pool(&url, "connection_limit=4&pool_timeout=1&connect_timeout=1");

    let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| pool.get())).await;
    let held: Vec<_> = held.into_iter().map(Result::unwrap).collect();
    counts_match_the_server(&pool, &admin_url, &app, 3).await;
    drop(held);
    counts_match_the_server(&pool, &admin_url, &app, 0).await;

    const TASKS: usize = 8;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cancelled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load: Vec<_> = (0..TASKS)
        .map(|i| {
            let (pool, stop, cancelled) = (pool.clone(), stop.clone(), cancelled.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // A third give up waiting for a connection now and then.
                    let patience = if i % 3 == 2 { 2 } else { 1000 };
                    let got =
                        tokio::time::timeout(Duration::from_millis(patience), pool.get()).await;
                    let Ok(Ok(mut c)) = got else {
                        if got.is_err() {
                            cancelled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        tokio::task::yield_now().await;
                        continue;
                    };
                    if i % 3 == 1 {
                        // Another third gives up in the middle of a query.
                        let q = c.query("SELECT pg_sleep(1)", &[]);
                        if tokio::time::timeout(Duration::from_millis(5), q)
                            .await
                            .is_err()
                        {
                            cancelled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    } else {
                        let _ = c.query("SELECT 1", &[]).await;
                    }
                }
            })
        })
        .collect();
    let sampler = {
        let (pool, stop) = (pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut samples = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let s = pool.stats();
                // Each task holds at most one checkout at a time: a
                // drifted or wrapped count shows here (no clamp hides it).
                assert!(s.in_use <= TASKS && s.open <= 4, "{s:?}");
                samples += 1;
                tokio::task::yield_now().await;
            }
            samples
        })
    };
    let progress = |more: u64| {
        let from = pool.stats().checkouts;
        let pool = pool.clone();
        async move { wait_until(|| pool.stats().checkouts >= from + more).await }
    };
    progress(50).await;
    let failures = pool.stats().connect_failures;
    cluster.stop().await.unwrap();
    wait_until(|| pool.stats().connect_failures > failures).await;
    cluster.start().await.unwrap();
    progress(50).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert!(sampler.await.unwrap() > 0);
    assert!(
        cancelled.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "some callers gave up"
    );
    let s = counts_match_the_server(&pool, &admin_url, &app, 0).await;
    assert!(s.closed_broken >= 1, "the restart broke connections: {s:?}");

    // A held connection whose query is cancelled: discarded, its backend
    // gone from the server, the other one still counted.
    let mut a = pool.get().await.unwrap();
    let mut b = pool.get().await.unwrap();
    b.query("SELECT 1", &[]).await.unwrap();
    counts_match_the_server(&pool, &admin_url, &app, 2).await;
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        a.query("SELECT pg_sleep(60)", &[]),
    )
    .await;
    assert!(gave_up.is_err());
    drop(a);
    counts_match_the_server(&pool, &admin_url, &app, 1).await;
    drop(b);
    let s = counts_match_the_server(&pool, &admin_url, &app, 0).await;

    pool.export_metrics();
    for (gauge, value) in [
        ("db_pool_connections_in_use", 0.0),
        ("db_pool_connections_idle", s.idle as f64),
        ("db_pool_connections_open", s.open as f64),
        ("db_pool_waiting", 0.0),
    ] {
        let v = sample(&format!("{gauge}{{pool=\"{app}\"}}")).unwrap();
        assert_eq!(v, value, "{gauge}");
    }
    let broken = sample(&format!(
        "db_pool_connections_closed_total{{pool=\"{app}\",reason=\"broken\"}}"
    ))
    .unwrap();
    assert!(broken >= 1.0);
}

/// Log lines captured from a tracing subscriber.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }
}

// Single-threaded runtime: the pool's background tasks log on this thread,
// into this test's subscriber.
#[tokio::test]
async fn a_leak_is_reported_once_with_where_and_in_which_request() {
    let logs = Logs::default();
    let _guard = logs.install();
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db.url, "connection_limit=2&leak_detection_threshold=1");
    let span = tracing::info_span!("request", request_id = "req-4711");
    let conn = {
        let _entered = span.enter();
        pool.get().await.unwrap()
    };
    let line = line!() - 2;
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_eq!(
        pool.stats().leaks_detected,
        1,
        "reported once, not every scan"
    );
    let text = logs.text();
    let warnings: Vec<_> = text
        .lines()
        .filter(|l| l.contains("possible leak"))
        .collect();
    assert_eq!(warnings.len(), 1, "{text}");
    let w = warnings[0];
    assert!(w.contains("WARN"), "{w}");
    assert!(
        w.contains(&format!("tests/metrics.rs:{line}")),
        "checkout location missing: {w}"
    );
    assert!(w.contains("req-4711"), "request span missing: {w}");
    assert!(w.contains("held_secs"), "{w}");
    drop(conn);
    assert!(logs
        .text()
        .contains("connection reported as a possible leak was returned"));
    // A connection returned in time is never reported.
    let c = pool.get().await.unwrap();
    drop(c);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(pool.stats().leaks_detected, 1);
}

#[tokio::test]
async fn slow_statements_are_logged_without_their_parameters() {
    let logs = Logs::default();
    let _guard = logs.install();
    let db = TestDatabase::create().await;
    let (pool, _) = pool(&db.url, "slow_query_threshold=150");
    let mut conn = pool.get().await.unwrap();
    let pid = conn.backend_pid();
    conn.query(
        "SELECT $1::text WHERE pg_sleep(0.3) IS NOT NULL",
        &[&"token-s3cr3t"],
    )
    .await
    .unwrap();
    conn.query("SELECT $1::text", &[&"fast"]).await.unwrap();
    let text = logs.text();
    let slow: Vec<_> = text.lines().filter(|l| l.contains("slow query")).collect();
    assert_eq!(slow.len(), 1, "{text}");
    assert!(
        slow[0].contains("pg_sleep(0.3)"),
        "statement text missing: {}",
        slow[0]
    );
    assert!(
        slow[0].contains(&format!("backend_pid={pid}")),
        "{}",
        slow[0]
    );
    assert!(slow[0].contains("duration_ms="), "{}", slow[0]);
    assert!(
        !text.contains("token-s3cr3t"),
        "a parameter value was logged"
    );
    assert_eq!(pool.stats().slow_queries, 1);
}
