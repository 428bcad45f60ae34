//! Server restarts and terminated backends: the pool heals itself.

use std::time::{Duration, Instant};

use db_pool::cluster::{ClusterOptions, LocalCluster};
use db_pool::Pool;

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
    let (admin, connection) =
        tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let pool = pool_url(&url(
        &cluster,
        "connection_limit=3&application_name=victims",
    ));
    for round in 0..5 {
        let conns: Vec<_> = futures_util::future::join_all((0..3).map(|_| pool.get())).await;
        drop(conns);
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
