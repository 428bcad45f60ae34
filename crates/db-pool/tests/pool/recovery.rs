//! Server restarts and terminated backends: the pool heals itself.

use std::time::{Duration, Instant};

use db_pool::Pool;
use pg_cluster::{ClusterOptions, LocalCluster};

use crate::common::{eventually, pool_url};

async fn private_server() -> LocalCluster {
    LocalCluster::start_temporary(ClusterOptions::default())
        .await
        .unwrap()
}

fn url(cluster: &LocalCluster, params: &str) -> String {
    format!(
        "postgresql://postgres@127.0.0.1:{}/postgres?sslmode=disable&{params}",
        cluster.port()
    )
}

/// Checks out `n` connections at once and runs a statement on each.
async fn use_each_connection(pool: &Pool, n: usize) {
    let conns = futures_util::future::join_all((0..n).map(|_| pool.get())).await;
    for c in conns {
        c.unwrap().query("SELECT 1", &[]).await.unwrap();
    }
}

async fn works(pool: &Pool) -> bool {
    match pool.get().await {
        Ok(mut c) => c.query("SELECT 1", &[]).await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_serves_again_after_a_server_restart_without_leaking_capacity() {
    let mut cluster = private_server().await;
    let pool = pool_url(&url(
        &cluster,
        "connection_limit=4&pool_timeout=2&connect_timeout=2",
    ));
    let warm: Vec<_> = futures_util::future::join_all((0..4).map(|_| pool.get())).await;
    let old_pids: Vec<i32> = warm
        .iter()
        .map(|c| c.as_ref().unwrap().backend_pid())
        .collect();
    drop(warm);
    assert_eq!(pool.stats().open, 4);

    cluster.stop().await.unwrap();
    let err = pool.get().await.err().expect("no server, no connection");
    assert!(["P1001", "P1017"].contains(&err.code()), "{err}");
    cluster.start().await.unwrap();
    let up = Instant::now();
    assert!(eventually(Duration::from_secs(10), || works(&pool)).await);
    eprintln!(
        "pool served again {:?} after the server accepted connections",
        up.elapsed()
    );

    // Every slot usable, none handed out twice, gauges consistent.
    let conns: Vec<_> = futures_util::future::join_all((0..4).map(|_| pool.get())).await;
    let mut pids = Vec::new();
    for c in conns {
        let mut c = c.unwrap();
        c.query("SELECT 1", &[]).await.unwrap();
        pids.push(c.backend_pid());
        let s = pool.stats();
        assert_eq!(s.in_use + s.idle, s.open);
        assert!(s.open <= 4);
        drop(c);
    }
    pids.sort_unstable();
    pids.dedup();
    assert!(
        pids.iter().all(|p| !old_pids.contains(p)),
        "a pre-restart connection was reused"
    );
    let s = pool.stats();
    assert!(s.closed_broken >= 4, "{s:?}");
    assert_eq!(s.in_use, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_pooled_backend_is_never_handed_out() {
    let cluster = private_server().await;
    let admin = crate::common::admin(&cluster).await;
    let pool = pool_url(&url(
        &cluster,
        "connection_limit=3&application_name=victims",
    ));
    for round in 0..5 {
        // A statement on each first: run on the socket directly, it must
        // leave the connection's driver watching the socket again.
        use_each_connection(&pool, 3).await;
        // Kill every idle pooled backend, waiting until each has exited.
        admin
            .execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = 'victims'",
                &[],
            )
            .await
            .unwrap();
        // The very next checkouts, at once: each must work on first try.
        let conns: Vec<_> = futures_util::future::join_all((0..3).map(|_| pool.get())).await;
        for c in conns {
            let mut c = c.unwrap_or_else(|e| panic!("round {round}: {e}"));
            c.query("SELECT 1", &[])
                .await
                .unwrap_or_else(|e| panic!("round {round}: a dead connection was handed out: {e}"));
        }
    }
}

/// Issue 12: while the server is down, callers do not each open a
/// connection attempt. At most one attempt is in flight, after a backoff
/// capped at 1 s; callers meanwhile get the last P1001 at once, saying
/// when the next attempt is. The pool serves again once the server does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_under_load_costs_a_few_attempts_not_a_storm() {
    let mut cluster = private_server().await;
    let pool = pool_url(&url(
        &cluster,
        "connection_limit=10&pool_timeout=2&connect_timeout=2",
    ));
    assert!(works(&pool).await);
    cluster.stop().await.unwrap();
    let before = pool.stats().connect_attempts;

    // 24 callers in a loop for 3 s against the stopped server.
    let until = Instant::now() + Duration::from_secs(3);
    let callers: Vec<_> = (0..24)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut codes = std::collections::BTreeMap::<String, u32>::new();
                let mut said_when = false;
                while Instant::now() < until {
                    if let Err(e) = pool.get().await {
                        said_when |= e.to_string().contains("the pool tries again in");
                        *codes.entry(e.code().to_string()).or_default() += 1;
                    }
                    tokio::task::yield_now().await;
                }
                (codes, said_when)
            })
        })
        .collect();
    let mut calls = 0;
    let mut said_when = false;
    for c in callers {
        let (codes, when) = c.await.unwrap();
        assert!(
            codes.keys().all(|c| c == "P1001"),
            "only P1001 while the server is down: {codes:?}"
        );
        calls += codes.values().sum::<u32>();
        said_when |= when;
    }
    let attempts = pool.stats().connect_attempts - before;
    assert!(calls > 1000, "the callers did ask ({calls})");
    // 50 ms doubling to 1 s over 3 s: about 8, plus the callers that
    // started together when the server went away.
    assert!(
        attempts <= 10 + 12,
        "{attempts} connection attempts for {calls} checkouts in 3 s: a storm"
    );
    assert!(said_when, "the error says when the next attempt is");

    cluster.start().await.unwrap();
    assert!(eventually(Duration::from_secs(5), || works(&pool)).await);
}

/// Every backend killed at once while the connections' drivers cannot run
/// (the kill runs on another thread and this single-threaded runtime waits
/// for it), so none of them has read its closing yet: the first statement
/// finds its connection dead (P1017). From then on each connection
/// returned before that death is pinged before it is handed out, so the
/// caller's retry gets a live one, not the next dead one.
#[tokio::test(flavor = "current_thread")]
async fn after_a_dead_connection_the_next_checkout_is_a_live_one() {
    let cluster = private_server().await;
    let pool = pool_url(&url(
        &cluster,
        "connection_limit=3&application_name=mass_kill",
    ));
    for round in 0..3 {
        use_each_connection(&pool, 3).await;
        let admin_url = cluster.url("postgres");
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (admin, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                admin
                    .execute(
                        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = 'mass_kill'",
                        &[],
                    )
                    .await
                    .unwrap();
            });
        })
        .join()
        .unwrap();
        let mut dead = 0;
        loop {
            let mut conn = pool.get().await.unwrap();
            match conn.query("SELECT 1", &[]).await {
                Ok(_) => break,
                Err(e) => {
                    assert_eq!(e.code(), "P1017", "{e}");
                    dead += 1;
                }
            }
        }
        assert!(
            dead <= 1,
            "round {round}: {dead} dead connections handed out one after another"
        );
    }
}
