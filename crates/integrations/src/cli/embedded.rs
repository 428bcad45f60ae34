//! The embedded PostgreSQL of development mode. With no `DATABASE_URL`,
//! `serve` runs it in `--data-dir` (kept between runs); every other command
//! that needs a database ([`Target`]) uses the same one: the server `serve`
//! is running, or, when none runs, the data directory started for the
//! command and stopped after it.
//!
//! It is locked to the account that runs it ([`ClusterOptions::socket_only`]):
//! no TCP port, only a Unix socket in a `0700` directory under
//! `--data-dir/postgres` (itself `0700`) owned by the server's account (the
//! current user, or `postgres` when running as root), and peer
//! authentication for that account and the current user. Another local user
//! can neither reach it nor log in. A data directory an earlier version
//! created (trusting every connection on 127.0.0.1) is locked down the next
//! time it starts.

use std::future::Future;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use db_pool::PoolConfig;
use pg_cluster::{socket_url, ClusterError, ClusterOptions, LocalCluster};

/// Where the embedded PostgreSQL is, for commands that can use it.
#[derive(Debug, Clone, Args)]
pub struct EmbeddedArgs {
    /// Where the embedded PostgreSQL keeps its data when DATABASE_URL is not
    /// set (kept between runs), with the development encryption key beside it.
    #[arg(long, default_value = "./.integrations")]
    pub data_dir: PathBuf,
}

/// The database a command works on, decided before anything starts:
/// `DATABASE_URL`'s, or the embedded PostgreSQL in `--data-dir`.
pub enum Target {
    /// `DATABASE_URL` (validated).
    Url(Box<PoolConfig>),
    /// No `DATABASE_URL`: the embedded database.
    Embedded {
        /// `--data-dir`.
        data_dir: PathBuf,
        /// `DATABASE_PROFILE`.
        profile: Option<String>,
    },
}

impl Target {
    /// From the command line: `DATABASE_URL`'s configuration (an invalid
    /// one prints P1013 and its hint: exit 2), or, when it is not set, the
    /// embedded database (its profile checked before a server starts).
    pub fn of(db: &super::DatabaseArgs) -> Result<Target, ExitCode> {
        if db.database_url.is_some() {
            return super::pool_config(db).map(|cfg| Target::Url(Box::new(cfg)));
        }
        if let Err(e) = crate::settings::parse_profile(db.profile.as_deref()) {
            return Err(super::invalid_config(&e));
        }
        let data_dir = db.embedded.data_dir.clone();
        if !data_dir.join("postgres").exists() {
            eprintln!(
                "note: no embedded database in {} yet: creating one (is this the directory `serve` runs in? see --data-dir)",
                data_dir.display()
            );
        }
        Ok(Target::Embedded {
            data_dir,
            profile: db.profile.clone(),
        })
    }

    /// Whether this is the embedded database.
    pub fn is_embedded(&self) -> bool {
        matches!(self, Target::Embedded { .. })
    }

    /// Runs `command` on the database's pool configuration: for the
    /// embedded one, after joining the server `serve` runs or starting it
    /// (`started` true: a fresh start may need migrations), saying which on
    /// standard error, and stopping a server it started afterwards, once no
    /// other command uses it.
    pub async fn run<F, Fut>(self, command: F) -> ExitCode
    where
        F: FnOnce(PoolConfig, bool) -> Fut,
        Fut: Future<Output = ExitCode>,
    {
        let (data_dir, profile) = match self {
            Target::Url(cfg) => return command(*cfg, false).await,
            Target::Embedded { data_dir, profile } => (data_dir, profile),
        };
        let embedded = match open(&data_dir, profile.as_deref(), IfRunning::Join).await {
            Ok(embedded) => embedded,
            Err(e) => return super::report_failure(&e),
        };
        eprintln!(
            "no DATABASE_URL: using the embedded PostgreSQL in {} (socket {}): {}",
            data_dir.display(),
            embedded.socket_dir.display(),
            if embedded.cluster.is_some() {
                "started for this command"
            } else {
                "the one serve runs"
            },
        );
        let code = command(embedded.cfg, embedded.cluster.is_some()).await;
        if let Some(cluster) = embedded.cluster {
            if let Err(e) = stop_when_unused(cluster, Duration::from_secs(10)).await {
                eprintln!("warning: stopping the embedded PostgreSQL: {e:#}");
            }
        }
        code
    }
}

/// The development mode's encryption key, kept beside the embedded
/// database in `data_dir` (created on first use).
pub fn development_keyring(data_dir: &Path) -> anyhow::Result<crate::crypto::Keyring> {
    let path = data_dir.join("encryption.key");
    let (keys, created) = crate::crypto::Keyring::load_or_create(&path)?;
    if created {
        tracing::warn!(path = %path.display(), "development mode: created an encryption key; set INTEGRATIONS_ENCRYPTION_KEYS in production");
    } else {
        tracing::info!(path = %path.display(), "development mode: using the encryption key stored beside the embedded database");
    }
    Ok(keys)
}

/// The embedded database, ready for a pool.
pub struct Embedded {
    /// The server, when this process started it (stopped when dropped);
    /// `None` when it was already running (under `serve`).
    pub cluster: Option<LocalCluster>,
    /// The pool configuration for its `integrations` database.
    pub cfg: PoolConfig,
    /// The directory of its Unix socket (it has no TCP port).
    pub socket_dir: PathBuf,
}

/// Whether a command may use an embedded PostgreSQL another process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfRunning {
    /// Use it (`api-key` beside a running `serve`).
    Join,
    /// Refuse: `serve` owns the server it starts and stops it on exit.
    Refuse,
}

/// Attempts at starting or joining, when `IfRunning::Join`: another
/// command may be starting or stopping the same server at the same moment.
const ATTEMPTS: u32 = 5;

/// Starts (creating on first run) the embedded PostgreSQL in `data_dir`, or
/// joins the one already running there when `if_running` allows, and
/// returns the pool configuration for its `integrations` database (created
/// when missing).
pub async fn open(
    data_dir: &Path,
    profile: Option<&str>,
    if_running: IfRunning,
) -> anyhow::Result<Embedded> {
    create_private(data_dir)?;
    let mut attempt = 1;
    loop {
        match try_open(data_dir, if_running).await {
            Ok((cluster, server, client)) => {
                ensure_database(client).await?;
                let url = format!(
                    "{}&sslmode=disable",
                    socket_url(&server.socket_dir, server.port, "integrations")
                );
                let cfg = crate::settings::pool_config(Some(&url), profile)?;
                return Ok(Embedded {
                    cluster,
                    cfg,
                    socket_dir: server.socket_dir,
                });
            }
            Err(Attempt::Final(e)) => return Err(e),
            Err(Attempt::Again(e)) if attempt >= ATTEMPTS || if_running == IfRunning::Refuse => {
                return Err(e)
            }
            Err(Attempt::Again(_)) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100 + rand::random::<u64>() % 400)).await;
            }
        }
    }
}

/// Creates `--data-dir` when missing: `0700`, or `0711` when root (the
/// `postgres` account running the server must pass through it to its own
/// `0700` directory inside). An existing directory is left as it is (it may
/// be the working directory); what matters is private below it.
fn create_private(data_dir: &Path) -> anyhow::Result<()> {
    if data_dir.exists() {
        return Ok(());
    }
    let mode = if nix::unistd::geteuid().is_root() {
        0o711
    } else {
        0o700
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))
}

/// Where a running embedded server takes connections.
struct Server {
    socket_dir: PathBuf,
    port: u16,
}

/// Why an attempt failed: for good, or perhaps because another command
/// was starting or stopping the server meanwhile.
enum Attempt {
    Final(anyhow::Error),
    Again(anyhow::Error),
}

type Connected = (db_pool::tokio_postgres::Client, tokio::task::JoinHandle<()>);

async fn try_open(
    data_dir: &Path,
    if_running: IfRunning,
) -> Result<(Option<LocalCluster>, Server, Connected), Attempt> {
    let opened = LocalCluster::open_or_init(
        &data_dir.join("postgres"),
        // Durable: the README promises the data survives, power cuts too.
        ClusterOptions::default().socket_only().durable(),
    )
    .await;
    let (cluster, server) = match opened {
        Ok(cluster) => {
            let server = Server {
                socket_dir: cluster.socket_dir().to_path_buf(),
                port: cluster.port(),
            };
            (Some(cluster), server)
        }
        // Through its socket: a server an earlier version started has one
        // too, beside its TCP port.
        Err(ClusterError::AlreadyRunning {
            port: Some(port),
            socket_dir: Some(socket_dir),
            ..
        }) if if_running == IfRunning::Join => (None, Server { socket_dir, port }),
        Err(e @ ClusterError::BinariesNotFound { .. }) => {
            return Err(Attempt::Final(anyhow::anyhow!("{e}\nno DATABASE_URL is set, so an embedded PostgreSQL would be used, but its server binaries are not installed: install Debian's `postgresql` package (apt-get install postgresql) or set DATABASE_URL")));
        }
        Err(e @ (ClusterError::AlreadyRunning { .. } | ClusterError::ForeignOwner { .. })) => {
            return Err(Attempt::Final(
                anyhow::Error::new(e).context("starting the embedded PostgreSQL"),
            ))
        }
        Err(e) => {
            return Err(Attempt::Again(
                anyhow::Error::new(e).context("starting the embedded PostgreSQL"),
            ))
        }
    };
    match connect(&server.socket_dir, server.port).await {
        Ok(connected) => Ok((cluster, server, connected)),
        Err(e) => Err(Attempt::Again(anyhow::Error::new(e).context(format!(
            "connecting to the embedded PostgreSQL through its socket in {}",
            server.socket_dir.display()
        )))),
    }
}

/// Creates the `integrations` database when missing.
async fn ensure_database((client, connection): Connected) -> anyhow::Result<()> {
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
    Ok(())
}

/// Stops a server this process started, once no other client uses it
/// (another command that joined it), waiting up to `patience`.
pub async fn stop_when_unused(mut cluster: LocalCluster, patience: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    if let Ok((client, connection)) = connect(cluster.socket_dir(), cluster.port()).await {
        while tokio::time::Instant::now() < deadline {
            let others = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .map(|row| row.get::<_, i64>(0));
            if !matches!(others, Ok(n) if n > 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(client);
        connection.abort();
    }
    cluster.stop().await?;
    Ok(())
}

/// A plain connection to the embedded server's `postgres` database through
/// its socket, its driver task running.
async fn connect(
    socket_dir: &Path,
    port: u16,
) -> Result<Connected, db_pool::tokio_postgres::Error> {
    let (client, connection) = db_pool::tokio_postgres::Config::new()
        .host_path(socket_dir)
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5))
        .connect(db_pool::tokio_postgres::NoTls)
        .await?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, task))
}
