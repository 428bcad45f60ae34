//! Test harness: a fresh database per test on a shared PostgreSQL server.
//!
//! The server is, in order of preference:
//!
//! 1. the one `TEST_DATABASE_URL` points to,
//! 2. the one `DATABASE_URL` points to,
//! 3. a private [`LocalCluster`] started once per test process from the
//!    locally installed PostgreSQL server binaries (Debian's `postgresql`
//!    package). It is shut down when the process exits, however it exits.
//!
//! Each [`TestDatabase`] is a uniquely named database created on that server
//! and dropped again when the value is dropped, so tests can run in parallel
//! without seeing each other's tables.
//!
//! These helpers panic with an explanation when the server cannot be reached
//! or started.

use std::time::Duration;

use tokio::sync::OnceCell;
use tokio_postgres::{Client, NoTls};
use url::Url;

use pg_cluster::{ClusterOptions, LocalCluster};

mod proxy;
pub use proxy::{Fault, FaultProxy, Vanished};

/// The environment variable naming the server tests run against.
pub const TEST_DATABASE_URL: &str = "TEST_DATABASE_URL";

/// What to do when no server is available, appended to panic messages.
const HINT: &str = "set TEST_DATABASE_URL (or DATABASE_URL) to \
    postgresql://USER:PASSWORD@HOST:PORT/postgres for a server where USER may create databases, \
    or install the PostgreSQL server binaries (`apt-get install postgresql`) so the tests can \
    start a private one";

/// Query parameters `tokio_postgres` understands and that still make sense
/// without TLS; the others (pool parameters such as `connection_limit`,
/// `sslmode`, ...) are removed before connecting.
const TOKIO_POSTGRES_PARAMS: &[&str] = &[
    "user",
    "password",
    "options",
    "application_name",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "load_balance_hosts",
];

/// The process-wide private server, started on first use and never dropped
/// (the cluster's parent-death signal stops it when the process exits).
struct SharedCluster {
    url: String,
    _cluster: LocalCluster,
}

static SHARED: OnceCell<SharedCluster> = OnceCell::const_new();

fn env_url(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|url| !url.trim().is_empty())
}

/// The URL of the server tests run against: `TEST_DATABASE_URL`, else
/// `DATABASE_URL`, else a private cluster started once per process (its URL
/// names the `postgres` database).
///
/// # Panics
///
/// When the private cluster cannot be started.
pub async fn server_url() -> String {
    if let Some(url) = env_url(TEST_DATABASE_URL).or_else(|| env_url("DATABASE_URL")) {
        return url;
    }
    SHARED
        .get_or_init(|| async {
            let cluster = LocalCluster::start_temporary(ClusterOptions::default())
                .await
                .unwrap_or_else(|error| {
                    panic!("could not start a private PostgreSQL server for the tests: {error}\n\n{HINT}")
                });
            SharedCluster {
                url: cluster.url("postgres"),
                _cluster: cluster,
            }
        })
        .await
        .url
        .clone()
}

/// `url` with its path (the database name) replaced by `database`; the
/// query string is kept.
///
/// # Panics
///
/// When `url` is not a valid URL.
pub fn with_database(url: &str, database: &str) -> String {
    let mut url = parse(url);
    url.set_path(&format!("/{database}"));
    url.into()
}

/// `url` with `params` (`a=1&b=2`, may be empty) added to its query string.
pub fn with_params(url: &str, params: &str) -> String {
    if params.is_empty() {
        return url.to_string();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

/// `url` with only the query parameters `tokio_postgres` accepts, so it can
/// be passed to [`tokio_postgres::connect`].
///
/// # Panics
///
/// When `url` is not a valid URL.
pub fn tokio_postgres_url(url: &str) -> String {
    let mut url = parse(url);
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(name, _)| TOKIO_POSTGRES_PARAMS.contains(&name.as_ref()))
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect();
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    url.into()
}

fn parse(url: &str) -> Url {
    // Not printing the URL: it may hold a password.
    Url::parse(url).unwrap_or_else(|error| {
        panic!("the test database URL is not a valid URL ({error}); {HINT}")
    })
}

/// Connects with `tokio_postgres` (without TLS), driving the connection on a
/// spawned task of the current runtime.
async fn try_connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(&tokio_postgres_url(url), NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Quotes an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A fresh, uniquely named database on the test server, dropped (with
/// `DROP DATABASE ... WITH (FORCE)`) when this value is dropped.
pub struct TestDatabase {
    /// The database's URL: the server URL with the database name replaced
    /// (query parameters kept).
    pub url: String,
    /// The database name (`test_<random hex>`).
    pub name: String,
    /// The URL used to create and drop the database.
    admin_url: String,
}

/// Shows the database name only: the URLs may hold the server's password.
impl std::fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDatabase")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TestDatabase {
    /// Creates a fresh database on the test server (see [`server_url`]).
    ///
    /// # Panics
    ///
    /// When the server cannot be reached or the database cannot be created.
    pub async fn create() -> TestDatabase {
        let server = server_url().await;
        let name = format!("test_{:016x}", rand::random::<u64>());
        // Prefer the maintenance database; fall back to the one in the URL.
        let mut admin_url = with_database(&server, "postgres");
        let client = match try_connect(&admin_url).await {
            Ok(client) => client,
            Err(first) => {
                admin_url = server.clone();
                try_connect(&admin_url).await.unwrap_or_else(|error| {
                    panic!(
                        "could not connect to the test PostgreSQL server: {first} \
                         (and through the URL's own database: {error}); {HINT}"
                    )
                })
            }
        };
        client
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .unwrap_or_else(|error| {
                panic!("could not create test database {name}: {error}; {HINT}")
            });
        TestDatabase {
            url: with_database(&server, &name),
            name,
            admin_url,
        }
    }

    /// Connects to this database with `tokio_postgres` (without TLS).
    ///
    /// # Panics
    ///
    /// When the connection fails.
    pub async fn connect(&self) -> Client {
        try_connect(&self.url).await.unwrap_or_else(|error| {
            panic!("could not connect to test database {}: {error}", self.name)
        })
    }
}

async fn drop_database(admin_url: &str, name: &str) -> Result<(), tokio_postgres::Error> {
    let client = try_connect(admin_url).await?;
    let quoted = quote_ident(name);
    let forced = client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
        .await;
    if forced.is_ok() {
        return Ok(());
    }
    // Servers before PostgreSQL 13 have no FORCE option.
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&name],
        )
        .await?;
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {quoted}"))
        .await
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // A separate thread with its own runtime: this may run inside a
        // (possibly single-threaded) tokio runtime, which must not block_on.
        let dropper = std::thread::Builder::new()
            .name("db-pool-drop-test-db".to_owned())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async {
                    let dropped = tokio::time::timeout(
                        Duration::from_secs(30),
                        drop_database(&admin_url, &name),
                    )
                    .await;
                    if !matches!(dropped, Ok(Ok(()))) {
                        tracing::warn!(database = %name, "could not drop test database");
                    }
                });
            });
        if let Ok(dropper) = dropper {
            let _ = dropper.join();
        }
    }
}

/// A real PgBouncer in front of the test server, started on a free port and
/// killed when dropped. Needs Debian's `pgbouncer` package (installed by
/// `scripts/install-deps`).
pub struct PgBouncer {
    child: std::process::Child,
    /// The port PgBouncer listens on (127.0.0.1).
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PgBouncer {
    /// Starts PgBouncer for the server of `server_url` with `pool_mode`
    /// (`transaction` or `session`) and `pool_size` server connections per
    /// database; returns once it accepts connections.
    ///
    /// # Panics
    ///
    /// When PgBouncer is not installed or does not start.
    pub async fn start(server_url: &str, pool_mode: &str, pool_size: u32) -> PgBouncer {
        use std::os::unix::fs::PermissionsExt;

        let server = parse(server_url);
        let host = server.host_str().unwrap_or("127.0.0.1").to_string();
        let port = server.port().unwrap_or(5432);
        let user = match server.username() {
            "" => "postgres",
            u => u,
        };
        let dir = tempfile::tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        // PgBouncer drops root privileges (-u postgres): let it read and log here.
        let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777));
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port: {e}"));
        let ini = format!(
            "[databases]\n* = host={host} port={port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
             listen_port = {listen}\nunix_socket_dir =\nauth_type = trust\nauth_file = {dir}/users.txt\n\
             pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = 200\n\
             ignore_startup_parameters = extra_float_digits,options\nlogfile = {dir}/pgbouncer.log\n",
            dir = dir.path().display()
        );
        let ini_path = dir.path().join("pgbouncer.ini");
        for (name, contents) in [
            ("users.txt", format!("\"{user}\" \"\"\n")),
            ("pgbouncer.ini", ini),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, contents).unwrap_or_else(|e| panic!("cannot write {name}: {e}"));
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644));
        }
        let binary = if std::path::Path::new("/usr/sbin/pgbouncer").exists() {
            "/usr/sbin/pgbouncer"
        } else {
            "pgbouncer"
        };
        let mut cmd = std::process::Command::new(binary);
        if nix::unistd::geteuid().is_root() {
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(&ini_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start pgbouncer ({e}); install Debian's pgbouncer package")
            });
        let bouncer = PgBouncer {
            child,
            port: listen,
            _dir: dir,
        };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", listen))
                .await
                .is_ok()
            {
                return bouncer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("pgbouncer did not start listening on {listen}");
    }

    /// A URL for `database` through PgBouncer (TLS off), with extra query
    /// parameters.
    pub fn url(&self, database: &str, params: &str) -> String {
        let sep = if params.is_empty() { "" } else { "&" };
        format!(
            "postgresql://postgres@127.0.0.1:{}/{database}?sslmode=disable{sep}{params}",
            self.port
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn database_is_replaced_and_query_kept() {
        assert_eq!(
            with_database(
                "postgresql://u:p@h:5432/app?connection_limit=5&schema=x",
                "test_1"
            ),
            "postgresql://u:p@h:5432/test_1?connection_limit=5&schema=x"
        );
        assert_eq!(with_database("postgres://h/", "d"), "postgres://h/d");
    }

    #[test]
    fn unknown_parameters_are_stripped_for_tokio_postgres() {
        assert_eq!(
            tokio_postgres_url("postgresql://h/db?connection_limit=5&application_name=a"),
            "postgresql://h/db?application_name=a"
        );
        assert_eq!(
            tokio_postgres_url("postgresql://h/db?pool_timeout=5"),
            "postgresql://h/db"
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
