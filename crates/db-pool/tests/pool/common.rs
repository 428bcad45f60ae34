//! Shared helpers: pools on fresh databases, and counting what the server sees.

use std::time::Duration;

pub use db_pool::testing::with_params;
use db_pool::testing::TestDatabase;
use db_pool::{Pool, PoolConfig};
use tokio_postgres::Client;

/// A unique application_name, so a test counts only its own connections.
pub fn unique_app() -> String {
    format!("t_{:08x}", rand::random::<u32>())
}

/// A pool on `db` with extra URL parameters and a unique application_name.
pub fn pool(db: &TestDatabase, params: &str) -> (Pool, String) {
    let app = unique_app();
    let url = with_params(&db.url, &format!("application_name={app}&{params}"));
    let cfg = PoolConfig::parse(&url).unwrap();
    (Pool::new(cfg).unwrap(), app)
}

/// A superuser session on a private cluster (its driver spawned).
pub async fn admin(cluster: &pg_cluster::LocalCluster) -> Client {
    let (client, connection) =
        tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    client
}

/// A pool on any URL.
pub fn pool_url(url: &str) -> Pool {
    Pool::new(PoolConfig::parse(url).unwrap()).unwrap()
}

/// How many connections the server has with this application_name.
pub async fn server_connections(admin: &Client, app: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0)
}

/// Polls `check` every 50 ms until it is true or `limit` passes; returns
/// whether it became true.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP listener that accepts connections and never says a word.
pub fn silent_listener() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    port
}

/// A port nothing listens on.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
