//! pgbouncer=true through a real PgBouncer in transaction mode.

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use db_pool::testing::TestDatabase;

use crate::common::{closed_port, eventually, pool_url};

/// A PgBouncer in transaction mode with 2 server connections per database,
/// in front of the test server. Killed on drop.
struct PgBouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary() -> &'static str {
    if std::path::Path::new("/usr/sbin/pgbouncer").exists() {
        "/usr/sbin/pgbouncer"
    } else {
        "pgbouncer"
    }
}

async fn pgbouncer(db: &TestDatabase) -> PgBouncer {
    let server = url::Url::parse(&db.url).unwrap();
    let (host, port) = (
        server.host_str().unwrap().to_string(),
        server.port().unwrap_or(5432),
    );
    let user = if server.username().is_empty() {
        "postgres"
    } else {
        server.username()
    };
    let dir = tempfile::tempdir().unwrap();
    // PgBouncer drops root privileges (-u postgres): let it read and log here.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let listen = closed_port();
    std::fs::write(dir.path().join("users.txt"), format!("\"{user}\" \"\"\n")).unwrap();
    let ini = format!(
        "[databases]\n* = host={host} port={port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {listen}\n\
         unix_socket_dir =\nauth_type = trust\nauth_file = {dir}/users.txt\npool_mode = transaction\n\
         default_pool_size = 2\nmax_client_conn = 200\nignore_startup_parameters = extra_float_digits,options\n\
         logfile = {dir}/pgbouncer.log\n",
        dir = dir.path().display()
    );
    let ini_path = dir.path().join("pgbouncer.ini");
    std::fs::write(&ini_path, ini).unwrap();
    for f in ["users.txt", "pgbouncer.ini"] {
        std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(0o644))
            .unwrap();
    }
    let mut cmd = Command::new(binary());
    if nix::unistd::geteuid().is_root() {
        cmd.args(["-u", "postgres"]);
    }
    let child = cmd
        .arg(&ini_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start pgbouncer ({e}); install Debian's pgbouncer package")
        });
    let bouncer = PgBouncer {
        child,
        port: listen,
        _dir: dir,
    };
    let up = eventually(Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", listen))
            .await
            .is_ok()
    })
    .await;
    assert!(up, "pgbouncer did not start listening");
    bouncer
}

/// Runs a mixed, concurrent load through PgBouncer; returns the errors.
async fn load(url: String) -> Vec<String> {
    let pool = pool_url(&url);
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|task| {
            let (pool, errors, done) = (pool.clone(), errors.clone(), done.clone());
            tokio::spawn(async move {
                for i in 0..40i64 {
                    let result = async {
                        let mut conn = pool.get().await?;
                        let name = format!("task{task}");
                        let none: Option<String> = None;
                        let row = conn
                            .query_one(
                                "SELECT $1::int8 + 1, $2::text, $3::text IS NULL",
                                &[&i, &name, &none],
                            )
                            .await?;
                        assert_eq!(row.get::<_, i64>(0), i + 1);
                        let n = conn
                            .execute("SELECT * FROM generate_series(1, $1)", &[&(task + 1)])
                            .await?;
                        assert_eq!(n, u64::try_from(task).unwrap() + 1);
                        let mut tx = conn.transaction().await?;
                        tx.query("SELECT $1::int4", &[&(i as i32)]).await?;
                        tx.commit().await?;
                        Ok::<_, db_pool::Error>(())
                    }
                    .await;
                    if let Err(e) = result {
                        errors.lock().unwrap().push(e.to_string());
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(done.load(Ordering::Relaxed), 16 * 40);
    let errors = errors.lock().unwrap().clone();
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_transaction_mode_under_concurrent_load_has_no_prepared_statement_errors() {
    let db = TestDatabase::create().await;
    let bouncer = pgbouncer(&db).await;
    let url = format!(
        "postgresql://postgres@127.0.0.1:{}/{}?sslmode=disable&connection_limit=10",
        bouncer.port, db.name
    );

    let errors = load(format!("{url}&pgbouncer=true")).await;
    assert!(errors.is_empty(), "with pgbouncer=true: {errors:?}");

    // The control: named prepared statements do break in transaction mode,
    // so the load above really exercised the problem.
    let errors = load(format!("{url}&pgbouncer=false")).await;
    assert!(
        errors
            .iter()
            .any(|e| e.contains("prepared statement") || e.contains("26000")),
        "expected the named-statement control to fail through PgBouncer: {errors:?}"
    );
}
