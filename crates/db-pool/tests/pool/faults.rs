//! The pool behind a fault-injecting TCP proxy (`db_pool::testing::FaultProxy`):
//! a server that stops answering (blackhole), connections reset, added
//! latency, and the TCP keepalive settings on the pool's own sockets.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use db_pool::testing::{Fault, FaultProxy, TestDatabase};
use db_pool::Pool;

use crate::common::{eventually, pool_url, unique_app, with_params};

/// Far longer than any bound these tests expect, so a hang fails the test
/// instead of blocking the run.
const HANG: Duration = Duration::from_secs(30);

/// A pool on `db` through a new proxy.
async fn proxied(db: &TestDatabase, params: &str) -> (Pool, FaultProxy) {
    let proxy = FaultProxy::start(&db.url).await;
    let url = with_params(
        &proxy.url(&db.url),
        &format!("application_name={}&{params}", unique_app()),
    );
    (pool_url(&url), proxy)
}

async fn select_one(pool: &Pool) -> Result<i32, db_pool::Error> {
    let mut conn = pool.get().await?;
    let row = conn.query_one("SELECT 1::int4", &[]).await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn blackhole_with_socket_timeout_is_p1008_and_the_connection_is_discarded() {
    let db = TestDatabase::create().await;
    let (pool, proxy) = proxied(&db, "connection_limit=1&socket_timeout=1&pool_timeout=5").await;
    let mut conn = pool.get().await.unwrap();
    let pid = conn.backend_pid();
    conn.query_one("SELECT 1", &[]).await.unwrap();

    proxy.set(Fault::Blackhole);
    let started = Instant::now();
    let err = tokio::time::timeout(HANG, conn.query_one("SELECT 2", &[]))
        .await
        .expect("socket_timeout must bound a query the server never answers")
        .unwrap_err();
    assert_eq!(err.code(), "P1008", "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(conn);
    assert_eq!(pool.stats().socket_timeouts, 1);
    assert_eq!(
        pool.stats().closed_broken,
        1,
        "the timed-out connection is discarded"
    );

    // The server answers again: a new connection, not the one that hung.
    proxy.set(Fault::Pass);
    let conn = tokio::time::timeout(HANG, pool.get())
        .await
        .unwrap()
        .unwrap();
    assert_ne!(conn.backend_pid(), pid);
}

#[tokio::test]
async fn blackhole_without_socket_timeout_waits_until_the_caller_gives_up() {
    // The default (no socket_timeout, as in Prisma): nothing in the pool
    // bounds the wait; the caller's own deadline (serve's request timeout)
    // must. Giving up discards the connection, so the slot is free again.
    let db = TestDatabase::create().await;
    let (pool, proxy) = proxied(&db, "connection_limit=1&pool_timeout=5").await;
    let pid = pool.get().await.unwrap().backend_pid();

    proxy.set(Fault::Blackhole);
    let mut conn = pool.get().await.unwrap();
    let gave_up =
        tokio::time::timeout(Duration::from_secs(2), conn.query_one("SELECT 1", &[])).await;
    assert!(gave_up.is_err(), "no socket_timeout: the query waits");
    drop(conn);
    assert_eq!(
        pool.stats().closed_broken,
        1,
        "dropped mid-statement: discarded"
    );
    assert_eq!(pool.stats().in_use, 0);

    proxy.set(Fault::Pass);
    let conn = tokio::time::timeout(HANG, pool.get())
        .await
        .unwrap()
        .unwrap();
    assert_ne!(
        conn.backend_pid(),
        pid,
        "the connection that hung is not reused"
    );
}

#[tokio::test]
async fn reset_is_p1017_then_the_pool_recovers() {
    let db = TestDatabase::create().await;
    let (pool, proxy) = proxied(&db, "connection_limit=2&pool_timeout=5&connect_timeout=2").await;
    let mut conn = pool.get().await.unwrap();
    conn.query_one("SELECT 1", &[]).await.unwrap();

    proxy.set(Fault::Reset);
    let err = tokio::time::timeout(HANG, conn.query_one("SELECT 1", &[]))
        .await
        .expect("a reset connection fails at once")
        .unwrap_err();
    assert_eq!(err.code(), "P1017", "{err}");
    drop(conn);
    // New connections are reset too while the fault lasts.
    let err = tokio::time::timeout(HANG, select_one(&pool))
        .await
        .unwrap()
        .unwrap_err();
    assert!(["P1001", "P1017"].contains(&err.code()), "{err}");

    proxy.set(Fault::Pass);
    let recovered = eventually(Duration::from_secs(10), || async {
        matches!(select_one(&pool).await, Ok(1))
    })
    .await;
    assert!(
        recovered,
        "the pool must serve again once the server is back"
    );
    assert!(pool.stats().closed_broken >= 1);
}

#[tokio::test]
async fn latency_slows_queries_but_they_work() {
    let db = TestDatabase::create().await;
    let (pool, proxy) = proxied(&db, "connection_limit=1&socket_timeout=10").await;
    assert_eq!(select_one(&pool).await.unwrap(), 1);
    proxy.set(Fault::Latency(Duration::from_millis(100)));
    let started = Instant::now();
    let mut conn = pool.get().await.unwrap();
    let row = conn.query_one("SELECT 41 + 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    // Request and answer each waited in the proxy.
    assert!(started.elapsed() >= Duration::from_millis(200));
    drop(conn);
    assert_eq!(pool.stats().closed_broken, 0);
}

/// The keepalive timer of the socket from `local` to `remote`, as
/// `/proc/net/tcp` shows it: `Some(remaining)` when the keepalive timer is
/// the one pending, `None` when no timer is (keepalives off, idle).
///
/// A user-space proxy cannot show keepalives detecting a vanished peer (its
/// kernel answers the probes), so this checks the settings on the pool's
/// real socket instead.
fn keepalive_timer(local: SocketAddr, remote: SocketAddr) -> Result<Option<Duration>, String> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(a) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(a.ip().octets()),
            a.port()
        ),
        SocketAddr::V6(_) => unreachable!("the proxy listens on 127.0.0.1"),
    };
    let (local, remote) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let line = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 5 && f[1] == local && f[2] == remote)
        .ok_or("no such socket")?;
    let (active, when) = line[5].split_once(':').unwrap();
    let ticks = u64::from_str_radix(when, 16).unwrap();
    // Clock ticks (USER_HZ, 100 on Linux).
    let remaining = Duration::from_millis(ticks * 10);
    match active {
        "02" => Ok(Some(remaining)),
        "00" => Ok(None),
        // A retransmission or zero-window timer: the socket is not idle yet.
        other => Err(format!("timer {other} pending")),
    }
}

#[tokio::test]
async fn keepalive_parameters_are_set_on_the_pool_sockets() {
    let db = TestDatabase::create().await;
    for (params, expected) in [
        (
            "keepalives_idle=7&keepalives_interval=2&keepalives_count=2",
            Some(7),
        ),
        ("keepalives=0", None),
        ("", Some(30)),
    ] {
        let (pool, proxy) = proxied(&db, &format!("connection_limit=1&{params}")).await;
        assert_eq!(select_one(&pool).await.unwrap(), 1);
        let client = *proxy.clients().first().unwrap();
        let mut last = Err(String::new());
        let settled = eventually(Duration::from_secs(10), || {
            last = keepalive_timer(client, proxy.addr());
            let ok = last.is_ok();
            async move { ok }
        })
        .await;
        assert!(settled, "{params}: {last:?}");
        let timer = last.unwrap();
        match expected {
            None => assert_eq!(timer, None, "{params}: keepalives are off"),
            Some(idle) => {
                let left = timer.unwrap_or_else(|| panic!("{params}: no keepalive timer"));
                assert!(
                    left > Duration::ZERO && left <= Duration::from_secs(idle),
                    "{params}: the first probe is due in {left:?}, expected within {idle}s"
                );
            }
        }
    }
}

/// Waits until the server sleeps in `query` (a `pg_sleep`) for `app`, so
/// the statement has been sent and acknowledged before the test cuts the
/// network. Not merely `active`: with the extended protocol a statement is
/// shown active while it is parsed, before the client has sent its
/// Bind/Execute; a cut then leaves those bytes unacknowledged, and
/// keepalives never probe a socket with data in flight.
async fn sleeping(db: &TestDatabase, app: &str, query: &str) -> bool {
    let (admin, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    eventually(Duration::from_secs(10), || async {
        let row = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = $1 AND state = 'active' AND query = $2 \
                 AND wait_event = 'PgSleep'",
                &[&app, &query],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) == 1
    })
    .await
}

/// Whether everything the pool sent through `proxy` has been acknowledged
/// (`ss` shows `unacked:` for a socket with data in flight). Keepalives
/// probe only a socket with nothing in flight: a cut before the proxy's
/// kernel acknowledged the statement (a delayed ACK, on a busy machine)
/// leaves retransmission, not keepalives, to notice.
async fn acknowledged(proxy: &FaultProxy) -> bool {
    let filter = format!("( dport = :{} )", proxy.addr().port());
    eventually(Duration::from_secs(10), || {
        let filter = filter.clone();
        async move {
            let out = std::process::Command::new("ss")
                .args(["-Htni", "state", "established", &filter])
                .output()
                .unwrap_or_else(|e| panic!("ss (Debian's iproute2): {e}"));
            let text = String::from_utf8_lossy(&out.stdout);
            !text.is_empty() && !text.contains("unacked:")
        }
    })
    .await
}

/// A statement on a vanished host under the setting being tested.
type Cut = tokio::task::JoinHandle<Result<(), db_pool::Error>>;

/// The bounded statement fails P1017 (within [`HANG`]) and its connection
/// is discarded, while the control's, on the same cut, still waits.
async fn fails_beside_a_waiting_control(
    (bounded, bounded_query): (&Pool, Cut),
    (control, control_query): (&Pool, Cut),
    why: &str,
) {
    let err = tokio::time::timeout(HANG, bounded_query)
        .await
        .expect(why)
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), "P1017", "{err}");
    assert_eq!(
        bounded.stats().closed_broken,
        1,
        "the dead connection is discarded"
    );
    assert_eq!(bounded.stats().in_use, 0);
    assert!(
        !control_query.is_finished(),
        "control: without the setting the same statement still waits"
    );
    assert_eq!(control.stats().closed_broken, 0);
    control_query.abort();
}

#[tokio::test]
async fn keepalives_detect_a_host_that_vanished_during_a_statement() {
    // A network partition while a statement runs: the answer never comes
    // and the client has nothing to send, so only keepalive probes can
    // notice. With them the connection fails and is discarded; without
    // them (the control, same statement, same cut) it still waits.
    let db = TestDatabase::create().await;
    const SLEEP: &str = "SELECT pg_sleep(2)";
    let start = |params: &'static str| {
        let db = &db;
        async move {
            let proxy = FaultProxy::start(&db.url).await;
            let app = unique_app();
            let url = with_params(
                &proxy.url(&db.url),
                &format!("application_name={app}&connection_limit=1&{params}"),
            );
            let pool = pool_url(&url);
            let query = {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let mut conn = pool.get().await?;
                    conn.query_one(SLEEP, &[]).await.map(|_| ())
                })
            };
            assert!(
                sleeping(db, &app, SLEEP).await,
                "{params}: the statement runs"
            );
            assert!(
                acknowledged(&proxy).await,
                "{params}: the statement is acknowledged"
            );
            let cut = proxy.vanish().unwrap_or_else(|e| panic!("{e}"));
            (pool, proxy, query, cut)
        }
    };
    let (probed, _p1, probed_query, _cut1) =
        start("keepalives_idle=1&keepalives_interval=1&keepalives_count=2&tcp_user_timeout=0")
            .await;
    let (unprobed, _p2, unprobed_query, _cut2) = start("keepalives=0&tcp_user_timeout=0").await;

    fails_beside_a_waiting_control(
        (&probed, probed_query),
        (&unprobed, unprobed_query),
        "keepalives must notice the vanished host",
    )
    .await;
}

#[tokio::test]
async fn tcp_user_timeout_bounds_a_statement_sent_to_a_host_that_vanished() {
    // The cut comes first, then a statement on an idle pooled connection:
    // its bytes are never acknowledged, which keepalives do not cover (they
    // probe only an idle socket) but tcp_user_timeout does. The control
    // (tcp_user_timeout=0, the kernel's retransmissions: about 15 minutes)
    // still waits when the bounded one has failed.
    let db = TestDatabase::create().await;
    let start = |params: &'static str| {
        let db = &db;
        async move {
            let (pool, proxy) = proxied(db, &format!("connection_limit=1&{params}")).await;
            let mut conn = pool.get().await.unwrap();
            conn.query_one("SELECT 1", &[]).await.unwrap();
            let cut = proxy.vanish().unwrap_or_else(|e| panic!("{e}"));
            let query =
                tokio::spawn(async move { conn.query_one("SELECT 2", &[]).await.map(|_| ()) });
            (pool, proxy, query, cut)
        }
    };
    let (bounded, _p1, bounded_query, _cut1) = start("keepalives=0&tcp_user_timeout=1500").await;
    let (unbounded, _p2, unbounded_query, _cut2) = start("keepalives=0&tcp_user_timeout=0").await;

    fails_beside_a_waiting_control(
        (&bounded, bounded_query),
        (&unbounded, unbounded_query),
        "tcp_user_timeout must bound the unacknowledged statement",
    )
    .await;
}
