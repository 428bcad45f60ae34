//! The embedded PostgreSQL of development mode. With no `DATABASE_URL`,
//! `serve` runs it in `--data-dir` (kept between runs); `api-key` uses the
//! same one: the server `serve` is running, or, when none runs, the data
//! directory started for the command and stopped after it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use db_pool::cluster::{ClusterError, ClusterOptions, LocalCluster};
use db_pool::PoolConfig;

/// Where the embedded PostgreSQL is, for commands that can use it.
#[derive(Debug, Clone, Args)]
pub struct EmbeddedArgs {
    /// Where the embedded PostgreSQL keeps its data when DATABASE_URL is not
    /// set (kept between runs), with the development encryption key beside it.
    #[arg(long, default_value = "./.integrations")]
    pub data_dir: PathBuf,
}

/// The embedded database, ready for a pool.
pub struct Embedded {
    /// The server, when this process started it (stopped when dropped);
    /// `None` when it was already running (under `serve`).
    pub cluster: Option<LocalCluster>,
    /// The pool configuration for its `integrations` database.
    pub cfg: PoolConfig,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
}

/// Whether a command may use an embedded PostgreSQL another process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfRunning {
    /// Use it (`api-key` beside a running `serve`).
    Join,
    /// Refuse: `serve` owns the server it starts and stops it on exit.
    Refuse,
}

/// Starts (creating on first run) the embedded PostgreSQL in `data_dir`, or
/// joins the one already running there when `if_running` allows, and
/// returns the pool configuration for its `integrations` database (created
/// when missing).
pub async fn open(
    data_dir: &Path,
    profile: Option<&str>,
    if_running: IfRunning,
) -> anyhow::Result<Embedded> {
    let (cluster, port) = match LocalCluster::open_or_init(
        &data_dir.join("postgres"),
        ClusterOptions::default(),
    )
    .await
    {
        Ok(cluster) => {
            let port = cluster.port();
            (Some(cluster), port)
        }
        Err(ClusterError::AlreadyRunning {
            port: Some(port), ..
        }) if if_running == IfRunning::Join => (None, port),
        Err(e @ ClusterError::BinariesNotFound { .. }) => {
            anyhow::bail!("{e}\nno DATABASE_URL is set, so an embedded PostgreSQL would be used, but its server binaries are not installed: install Debian's `postgresql` package (apt-get install postgresql) or set DATABASE_URL")
        }
        Err(e) => return Err(e).context("starting the embedded PostgreSQL"),
    };
    let server = format!("postgresql://postgres@127.0.0.1:{port}");
    let (client, connection) = db_pool::tokio_postgres::connect(
        &format!("{server}/postgres?sslmode=disable"),
        db_pool::tokio_postgres::NoTls,
    )
    .await
    .with_context(|| format!("connecting to the embedded PostgreSQL on port {port}"))?;
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_database WHERE datname = 'integrations'",
            &[],
        )
        .await?
        .is_some();
    if !exists {
        client.batch_execute("CREATE DATABASE integrations").await?;
    }
    drop(client);
    connection.abort();
    let url = format!("{server}/integrations?sslmode=disable");
    let cfg = crate::settings::pool_config(Some(&url), profile)?;
    Ok(Embedded { cluster, cfg, port })
}
