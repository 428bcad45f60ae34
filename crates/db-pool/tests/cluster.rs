//! Tests of the private PostgreSQL cluster launcher and the test harness,
//! against real servers started from the local PostgreSQL binaries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use db_pool::testing::{server_url, tokio_postgres_url, with_database, TestDatabase};
use pg_cluster::{ClusterError, ClusterOptions, LocalCluster};
use tokio_postgres::{Client, NoTls};

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

fn port_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// Whether `pid` is a live (not zombie) process.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 1..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned();
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// Waits up to `timeout` for `condition`.
fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}

/// A directory the `postgres` account can enter even when the tests run as
/// root, whatever the umask.
fn traversable_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_cluster_accepts_connections_and_is_removed_on_drop() {
    let cluster = LocalCluster::start_temporary(ClusterOptions::default())
        .await
        .unwrap();
    assert_eq!(cluster.host(), Some("127.0.0.1"));
    assert_eq!(
        cluster.url("postgres"),
        format!(
            "postgresql://postgres@127.0.0.1:{}/postgres",
            cluster.port()
        )
    );
    assert!(cluster.is_temporary());
    assert!(cluster.data_dir().join("PG_VERSION").is_file());
    let socket = cluster
        .socket_dir()
        .join(format!(".s.PGSQL.{}", cluster.port()));
    assert!(socket.exists(), "no socket at {}", socket.display());

    let client = connect(&cluster.url("postgres")).await;
    let row = client
        .query_one(
            "SELECT current_user::text, current_setting('server_encoding'), \
             current_setting('fsync'), current_setting('max_connections')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "postgres");
    assert_eq!(row.get::<_, String>(1), "UTF8");
    assert_eq!(row.get::<_, String>(2), "off");
    assert_eq!(row.get::<_, String>(3), "200");
    assert!(!cluster.log_tail().is_empty());
    drop(client);

    let base = cluster.base_dir().to_path_buf();
    let port = cluster.port();
    let pid = cluster.pid().unwrap();
    drop(cluster);
    assert!(!base.exists(), "{} was not removed", base.display());
    assert!(!port_accepts(port));
    assert!(!process_alive(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_then_start_keeps_data_and_port() {
    let mut cluster = LocalCluster::start_temporary(ClusterOptions::default())
        .await
        .unwrap();
    let port = cluster.port();
    let client = connect(&cluster.url("postgres")).await;
    client
        .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42);")
        .await
        .unwrap();

    cluster.stop().await.unwrap();
    assert!(!cluster.is_running());
    assert!(!port_accepts(port));
    assert!(client.simple_query("SELECT 1").await.is_err());
    // Stopping twice is harmless.
    cluster.stop().await.unwrap();

    cluster.start().await.unwrap();
    assert!(cluster.is_running());
    assert_eq!(cluster.port(), port);
    let client = connect(&cluster.url("postgres")).await;
    let v: i32 = client
        .query_one("SELECT v FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 42);

    cluster.restart().await.unwrap();
    let client = connect(&cluster.url("postgres")).await;
    client.simple_query("SELECT 1").await.unwrap();
    cluster.reload().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_are_applied() {
    let mut cluster =
        LocalCluster::start_temporary(ClusterOptions::new().setting("max_connections", "17"))
            .await
            .unwrap();
    let show = |client: Client| async move {
        client
            .query_one("SHOW max_connections", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    assert_eq!(show(connect(&cluster.url("postgres")).await).await, "17");

    cluster.set_setting("max_connections", "23");
    cluster.set_setting("application_name", "cluster-test");
    // Not before the next start.
    assert_eq!(show(connect(&cluster.url("postgres")).await).await, "17");
    cluster.restart().await.unwrap();
    assert_eq!(show(connect(&cluster.url("postgres")).await).await, "23");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_port_is_used() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cluster = LocalCluster::start_temporary(ClusterOptions::new().port(port))
        .await
        .unwrap();
    assert_eq!(cluster.port(), port);
    connect(&cluster.url("postgres")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_cluster_keeps_data_between_opens() {
    let dir = traversable_tempdir();
    let data_dir = dir.path().join("embedded");

    let cluster = LocalCluster::open_or_init(&data_dir, ClusterOptions::default())
        .await
        .unwrap();
    assert!(!cluster.is_temporary());
    assert!(data_dir.join("pgdata").join("PG_VERSION").is_file());
    let client = connect(&cluster.url("postgres")).await;
    client
        .batch_execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('persisted');")
        .await
        .unwrap();
    drop(client);
    let pid = cluster.pid().unwrap();
    drop(cluster);
    assert!(!process_alive(pid));
    assert!(data_dir.join("pgdata").join("PG_VERSION").is_file());

    // A lock file left by a crash, naming a dead process...
    let lock = data_dir.join("pgdata").join("postmaster.pid");
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    std::fs::write(&lock, format!("{dead_pid}\n{}\n", data_dir.display())).unwrap();
    let cluster = LocalCluster::open_or_init(&data_dir, ClusterOptions::default())
        .await
        .unwrap();
    let client = connect(&cluster.url("postgres")).await;
    let v: String = client
        .query_one("SELECT v FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "persisted");
    drop(client);
    drop(cluster);

    // ... or a live process that is not a server for this directory.
    std::fs::write(&lock, "1\n/elsewhere\n").unwrap();
    let cluster = LocalCluster::open_or_init(&data_dir, ClusterOptions::default())
        .await
        .unwrap();
    connect(&cluster.url("postgres")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_open_of_a_running_cluster_is_refused() {
    let dir = traversable_tempdir();
    let first = LocalCluster::open_or_init(dir.path(), ClusterOptions::default())
        .await
        .unwrap();
    let second = LocalCluster::open_or_init(dir.path(), ClusterOptions::default()).await;
    match second {
        Err(ClusterError::AlreadyRunning { pid, port, .. }) => {
            assert_eq!(Some(u32::try_from(pid).unwrap()), first.pid());
            assert_eq!(port, Some(first.port()), "where to reach it");
        }
        other => panic!("expected AlreadyRunning, got {other:?}"),
    }
    connect(&first.url("postgres")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_data_file_and_reload_apply_configuration() {
    let mut cluster = LocalCluster::start_temporary(ClusterOptions::default())
        .await
        .unwrap();
    // Only TCP connections as `postgres` are trusted from now on; the new
    // rules apply to new sessions after a reload.
    cluster
        .write_data_file(
            "pg_hba.conf",
            "local all all reject\nhost all postgres 127.0.0.1/32 trust\n",
            0o600,
        )
        .unwrap();
    cluster.reload().await.unwrap();
    let socket_dir = cluster.socket_dir().to_path_buf();
    let port = cluster.port();
    let rejected = eventually(Duration::from_secs(10), || {
        let socket_dir = socket_dir.clone();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    tokio_postgres::Config::new()
                        .host_path(&socket_dir)
                        .port(port)
                        .user("postgres")
                        .dbname("postgres")
                        .connect(NoTls)
                        .await
                        .is_err()
                })
        })
        .join()
        .unwrap()
    });
    assert!(rejected, "socket connections still accepted after reload");
    connect(&cluster.url("postgres")).await;
}

/// Child half of `server_does_not_outlive_a_killed_process`: does nothing
/// unless run by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_starts_cluster_then_aborts() {
    if std::env::var_os("DB_POOL_CLUSTER_TEST_CHILD").is_none() {
        return;
    }
    let cluster = LocalCluster::start_temporary(ClusterOptions::default())
        .await
        .unwrap();
    println!(
        "CLUSTER {} {} {}",
        cluster.port(),
        cluster.pid().unwrap(),
        cluster.base_dir().display()
    );
    use std::io::Write as _;
    std::io::stdout().flush().unwrap();
    std::process::abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_does_not_outlive_a_killed_process() {
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_starts_cluster_then_aborts",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DB_POOL_CLUSTER_TEST_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "the child did not abort");
    let line = stdout
        .lines()
        .find_map(|line| line.split_once("CLUSTER ").map(|(_, rest)| rest))
        .unwrap_or_else(|| {
            panic!(
                "child printed no cluster line; stdout:\n{stdout}\nstderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    let mut fields = line.splitn(3, ' ');
    let port: u16 = fields.next().unwrap().parse().unwrap();
    let pid: u32 = fields.next().unwrap().parse().unwrap();
    let base = Path::new(fields.next().unwrap()).to_path_buf();

    assert!(
        eventually(Duration::from_secs(15), || !process_alive(pid)
            && !port_accepts(port)),
        "the server (pid {pid}, port {port}) outlived the process that started it"
    );

    // The next temporary cluster removes the dead process's directory (a
    // concurrently starting one may already have done so).
    let _cluster = LocalCluster::start_temporary(ClusterOptions::default())
        .await
        .unwrap();
    assert!(!base.exists(), "stale {} was not removed", base.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_database_is_fresh_and_dropped() {
    let first = TestDatabase::create().await;
    let second = TestDatabase::create().await;
    assert_ne!(first.name, second.name);
    assert_ne!(first.url, second.url);
    assert!(first.name.starts_with("test_"));
    assert!(first.url.ends_with(&format!("/{}", first.name)));

    let client = first.connect().await;
    let current: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(current, first.name);
    client
        .batch_execute("CREATE TABLE t (v int)")
        .await
        .unwrap();
    let other = second.connect().await;
    assert!(other.simple_query("SELECT * FROM t").await.is_err());

    let admin = connect(&tokio_postgres_url(&with_database(
        &server_url().await,
        "postgres",
    )))
    .await;
    let exists = |name: String| {
        let admin = &admin;
        async move {
            admin
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
                .await
                .unwrap()
                .is_some()
        }
    };
    let name = first.name.clone();
    assert!(exists(name.clone()).await);
    // Dropped even with a session still open.
    drop(first);
    assert!(!exists(name).await);
    drop(client);
    let name = second.name.clone();
    drop(other);
    drop(second);
    assert!(!exists(name).await);
}

#[tokio::test(flavor = "current_thread")]
async fn test_database_works_in_a_current_thread_runtime() {
    let db = TestDatabase::create().await;
    db.connect().await.simple_query("SELECT 1").await.unwrap();
    let name = db.name.clone();
    let url = tokio_postgres_url(&db.url);
    drop(db);
    assert!(
        tokio_postgres::connect(&url, NoTls).await.is_err(),
        "{name} still exists"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_binaries_are_reported_with_a_remedy() {
    let error = LocalCluster::start_temporary(ClusterOptions::new().bin_dir("/nonexistent/bin"))
        .await
        .unwrap_err();
    assert!(matches!(error, ClusterError::BinariesNotFound { .. }));
    let message = error.to_string();
    assert!(message.contains("apt-get install postgresql"), "{message}");
    assert!(message.contains("DATABASE_URL"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_data_dir_paths_get_a_short_socket_dir() {
    let dir = traversable_tempdir();
    let data_dir = dir.path().join("a".repeat(60)).join("b".repeat(60));
    let cluster = LocalCluster::open_or_init(&data_dir, ClusterOptions::default())
        .await
        .unwrap();
    let socket_dir = cluster.socket_dir().to_path_buf();
    assert!(
        socket_dir.as_os_str().len() < 90,
        "{}",
        socket_dir.display()
    );
    assert!(socket_dir
        .join(format!(".s.PGSQL.{}", cluster.port()))
        .exists());
    connect(&cluster.url("postgres")).await;
    drop(cluster);
    assert!(!socket_dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_data_dir_is_reported_when_root() {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    // A root-owned 0700 directory the `postgres` account cannot enter.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let error = LocalCluster::open_or_init(&dir.path().join("data"), ClusterOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ClusterError::Inaccessible { path, .. } if path == dir.path()),
        "{error:?}"
    );
    assert!(error.to_string().contains("chmod o+x"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_only_cluster_serves_a_pool_over_its_socket_and_no_tcp() {
    use std::os::unix::fs::MetadataExt;
    let dir = traversable_tempdir();
    let data_dir = dir.path().join("data");
    let mut cluster = LocalCluster::open_or_init(&data_dir, ClusterOptions::new().socket_only())
        .await
        .unwrap();
    assert!(cluster.is_socket_only());
    assert_eq!(cluster.host(), None);
    assert!(
        cluster.url("postgres").contains("?host=%2F"),
        "{}",
        cluster.url("postgres")
    );
    let listen = std::fs::read_to_string(cluster.data_dir().join("postmaster.pid")).unwrap();
    assert_eq!(listen.lines().nth(5).map(str::trim), Some(""), "{listen}");
    for private in [cluster.base_dir(), cluster.socket_dir(), cluster.data_dir()] {
        let mode = std::fs::metadata(private).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", private.display());
    }
    // The pool connects through the socket (without TLS).
    let pool = db_pool::Pool::new(
        db_pool::PoolConfig::parse(&format!("{}&connection_limit=2", cluster.url("postgres")))
            .unwrap(),
    )
    .unwrap();
    let mut conn = pool.get().await.unwrap();
    let row = conn
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "postgres");
    drop(conn);
    pool.close(Duration::from_secs(5)).await;
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_only_cluster_refuses_a_directory_of_another_account() {
    use std::os::unix::fs::chown;
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let dir = traversable_tempdir();
    let data_dir = dir.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    chown(
        &data_dir,
        Some(nobody.uid.as_raw()),
        Some(nobody.gid.as_raw()),
    )
    .unwrap();
    let error = LocalCluster::open_or_init(&data_dir, ClusterOptions::new().socket_only())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ClusterError::ForeignOwner { owner, .. } if *owner == nobody.uid.as_raw()),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("account that created it"),
        "{error}"
    );
}

#[test]
fn socket_urls_parse_to_the_socket_directory_and_port() {
    use db_pool::Host;
    let dir = Path::new("/tmp/a dir/sock");
    let cfg =
        db_pool::PoolConfig::parse(&pg_cluster::socket_url(dir, 5432, "integrations")).unwrap();
    assert_eq!(cfg.host, Host::Unix(dir.to_path_buf()));
    assert_eq!((cfg.port, cfg.database.as_str()), (5432, "integrations"));
    assert_eq!(cfg.user, "postgres");
    let cfg = db_pool::PoolConfig::parse(&pg_cluster::socket_url(dir, 41234, "postgres")).unwrap();
    assert_eq!(cfg.host, Host::Unix(dir.to_path_buf()));
    assert_eq!((cfg.port, cfg.database.as_str()), (41234, "postgres"));
    // What a log shows names the directory, never a TCP address.
    let shown = db_pool::PoolConfig::parse(&pg_cluster::socket_url(dir, 5432, "integrations"))
        .unwrap()
        .redacted_url();
    assert!(!shown.contains("127.0.0.1"), "{shown}");
    assert!(shown.contains("%2Ftmp%2Fa+dir%2Fsock"), "{shown}");
}
