//! `integrations serve` without DATABASE_URL: an embedded PostgreSQL in
//! `--data-dir`, a development encryption key beside it, nothing lost
//! across a restart, and a server only its own account can reach (no TCP,
//! a private socket, peer authentication), also for a data directory an
//! earlier version left trusting every local connection.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pg_cluster::{ClusterOptions, LocalCluster};

use reqwest::Method;
use serde_json::json;

use crate::common::{
    eventually, http_client, write_registry, FakeProvider, ServerProcess, CALLBACK_URL,
};

/// Starts the server on the data directory, with no DATABASE_URL and no
/// INTEGRATIONS_ENCRYPTION_KEYS.
async fn serve(data_dir: &Path, registry: &str) -> ServerProcess {
    ServerProcess::spawn(
        &[
            ("INTEGRATIONS_PROVIDERS", registry),
            ("INTEGRATIONS_CALLBACK_URL", CALLBACK_URL),
            ("FAKE_SECRET", "fake-secret"),
        ],
        &["--data-dir", data_dir.to_str().unwrap()],
    )
    .await
}

/// The embedded server's socket directory, from the log line announcing it.
fn embedded_socket_dir(server: &ServerProcess) -> PathBuf {
    let logs = server.logs();
    let line = logs
        .iter()
        .find(|l| l.contains("embedded PostgreSQL") && l.contains("socket_dir="))
        .unwrap_or_else(|| panic!("no embedded PostgreSQL line:\n{}", logs.join("\n")));
    PathBuf::from(
        line.split("socket_dir=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap(),
    )
}

/// Line `n` (0-based) of the embedded server's `postmaster.pid`: 0 the
/// pid, 3 the port, 4 the socket directory, 5 the TCP listen address.
fn postmaster_line(data_dir: &Path, n: usize) -> String {
    let pid_file = data_dir.join("postgres/pgdata/postmaster.pid");
    let text = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()));
    text.lines().nth(n).unwrap_or_default().trim().to_string()
}

/// The TCP ports process `pid` listens on: its socket inodes matched
/// against the kernel's TCP tables (IPv4 and IPv6) in the LISTEN state.
fn tcp_listen_ports(pid: u32) -> Vec<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().to_string();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    assert!(!inodes.is_empty(), "process {pid} has no sockets at all");
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
        for row in text.lines().skip(1) {
            let fields: Vec<&str> = row.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (local, state, inode) = (fields[1], fields[3], fields[9]);
            if state == "0A" && inodes.contains(inode) {
                let port = local.rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

/// The uid the embedded server runs as: `postgres` when the tests run as
/// root, else the current user.
fn server_uid() -> u32 {
    if nix::unistd::geteuid().is_root() {
        nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("a postgres account")
            .uid
            .as_raw()
    } else {
        nix::unistd::geteuid().as_raw()
    }
}

/// Asserts `path` is a directory with mode 0700 owned by `uid`.
fn assert_private_dir(path: &Path, uid: u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(meta.is_dir(), "{}", path.display());
    assert_eq!(
        (meta.mode() & 0o777, meta.uid()),
        (0o700, uid),
        "{}: mode {:o}, owner {}",
        path.display(),
        meta.mode() & 0o777,
        meta.uid()
    );
}

/// Asserts the embedded server of `data_dir` (running) listens on no TCP
/// port and keeps its socket in a 0700 directory owned by its account,
/// below a 0700 base directory.
fn assert_locked_down(data_dir: &Path) -> PathBuf {
    let pid: u32 = postmaster_line(data_dir, 0).parse().unwrap();
    assert_eq!(
        tcp_listen_ports(pid),
        Vec::<u16>::new(),
        "the embedded PostgreSQL listens on TCP"
    );
    assert_eq!(
        postmaster_line(data_dir, 5),
        "",
        "a TCP listen address in postmaster.pid"
    );
    let socket_dir = PathBuf::from(postmaster_line(data_dir, 4));
    let uid = server_uid();
    assert_private_dir(&socket_dir, uid);
    assert_private_dir(&data_dir.join("postgres"), uid);
    assert_private_dir(&data_dir.join("postgres/pgdata"), uid);
    let socket = socket_dir.join(format!(".s.PGSQL.{}", postmaster_line(data_dir, 3)));
    let mode = std::fs::metadata(&socket).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}: mode {mode:o}", socket.display());
    socket_dir
}

/// `integrations api-key create --scopes credentials` run as the `nobody`
/// account against `database_url`: what another local user would try.
fn api_key_as_nobody(database_url: &str, cwd: &Path) -> std::process::Output {
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("a nobody account");
    // The build's own copy may sit under a directory only root can enter
    // (a checkout in a 0700 temporary directory): run a copy `nobody` can
    // reach.
    let bin_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = bin_dir.path().join("integrations");
    std::fs::copy(env!("CARGO_BIN_EXE_integrations"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    Command::new(&bin)
        .current_dir(cwd)
        .args([
            "api-key",
            "create",
            "--name",
            "intruder",
            "--scopes",
            "read,write,credentials",
        ])
        .env_clear()
        .env("DATABASE_URL", database_url)
        .env("PATH", "/usr/bin:/bin")
        .uid(nobody.uid.as_raw())
        .gid(nobody.gid.as_raw())
        .output()
        .unwrap()
}

/// Processes whose command line names `dir` (a postmaster runs with
/// `-D <dir>/...`).
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_str().unwrap();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && !cmdline.contains("integrations serve") {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// `integrations api-key <args> --data-dir <data_dir>`, with no DATABASE_URL.
fn api_key(data_dir: &Path, args: &[&str]) -> std::process::Output {
    let args: Vec<&str> = std::iter::once("api-key")
        .chain(args.iter().copied())
        .collect();
    command(data_dir, &args)
}

/// `integrations <args> --data-dir <data_dir>`, with no DATABASE_URL.
fn command(data_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_integrations"))
        .current_dir(data_dir.parent().unwrap())
        .args(args)
        .args(["--data-dir", data_dir.to_str().unwrap()])
        .env_remove("DATABASE_URL")
        .env_remove("INTEGRATIONS_ENCRYPTION_KEYS")
        .output()
        .unwrap()
}

/// The lines logged before the "listening" line.
fn startup_lines(server: &ServerProcess) -> Vec<String> {
    server
        .logs()
        .into_iter()
        .take_while(|l| !l.contains("listening on"))
        .collect()
}

#[tokio::test]
async fn embedded_mode_keeps_integrations_and_its_key_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    // The server runs PostgreSQL as another account when this is root: the
    // directory must be traversable.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_dir = dir.path().join("data");
    let fake = FakeProvider::start().await;
    let registry = write_registry(dir.path(), &fake);
    let http = http_client();

    let mut first = serve(&data_dir, &registry).await;
    // PostgreSQL's durable defaults, not the test launcher's fast ones
    // (postmaster.opts holds the server's command line).
    let opts = std::fs::read_to_string(data_dir.join("postgres/pgdata/postmaster.opts")).unwrap();
    for setting in ["fsync", "synchronous_commit", "full_page_writes"] {
        assert!(opts.contains(&format!("{setting}=on")), "{opts}");
        assert!(!opts.contains(&format!("{setting}=off")), "{opts}");
    }
    let startup = startup_lines(&first);
    assert!(
        startup.iter().any(|l| l.contains("embedded PostgreSQL")),
        "the first lines do not say the database is embedded:\n{}",
        startup.join("\n")
    );
    assert!(
        startup
            .iter()
            .any(|l| l.contains("created an encryption key")),
        "{}",
        startup.join("\n")
    );
    let key_file = data_dir.join("encryption.key");
    let key_bytes = std::fs::read(&key_file).expect("an encryption key file in the data dir");
    assert!(!key_bytes.is_empty());

    let ready = http
        .get(format!("{}/readyz", first.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // An API key through the command line, with no DATABASE_URL: the
    // embedded database the server runs.
    let out = api_key(
        &data_dir,
        &[
            "create",
            "--name",
            "embedded",
            "--scopes",
            "read,write,credentials",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "(socket {})",
            embedded_socket_dir(&first).display()
        )),
        "not the server's database: {stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.lines().last().unwrap().trim().to_string();
    assert!(key.starts_with("ik_"), "{stdout}");

    let put = http
        .request(
            Method::PUT,
            format!(
                "{}/v1/users/user-1/integrations/good/acct-1",
                first.base_url
            ),
        )
        .bearer_auth(&key)
        .json(
            &json!({"access_token": "at-embedded-1", "refresh_token": "rt-embedded-1",
                      "expires_in": 3600, "metadata": {"kept": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200, "{}", put.text().await.unwrap());

    // Every command that needs a database uses the one serve runs, and
    // says so; rotate-keys uses the development key beside it.
    let socket = format!(
        "(socket {}): the one serve runs",
        embedded_socket_dir(&first).display()
    );
    for (args, says) in [
        (
            &["config"][..],
            "DATABASE_URL  not set: the embedded PostgreSQL",
        ),
        (&["doctor"], "result: 0 fail"),
        (&["activity"], "integrations"),
        (&["migrate"], "schema up to date"),
        (&["rotate-keys"], "with key 'dev1'"),
        (&["bench", "--sql", "SELECT 1", "--duration", "1"], "ops/s"),
    ] {
        let out = command(&data_dir, args);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(&socket), "{args:?}: {stderr}");
        assert!(stdout.contains(says), "{args:?}: {stdout}");
    }
    // Development mode lets the connect flow send users back to localhost.
    let started = http
        .post(format!("{}/v1/connect/good", first.base_url))
        .bearer_auth(&key)
        .json(&json!({"user_id": "user-1", "redirect_uri": "http://localhost:3000/done"}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 200, "{}", started.text().await.unwrap());

    first.terminate();
    let exit = first.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(exit.code(), Some(0), "{exit}:\n{}", first.logs().join("\n"));
    drop(first);

    // Again, on the same directory.
    let second = serve(&data_dir, &registry).await;
    let startup = startup_lines(&second);
    assert!(
        startup
            .iter()
            .any(|l| l.contains("using the encryption key stored beside")),
        "{}",
        startup.join("\n")
    );
    assert_eq!(
        std::fs::read(&key_file).unwrap(),
        key_bytes,
        "the key file was replaced"
    );

    let list = http
        .get(format!("{}/v1/users/user-1/integrations", second.base_url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 200);
    let list: serde_json::Value = list.json().await.unwrap();
    assert_eq!(list["integrations"][0]["account_id"], "acct-1", "{list}");
    assert_eq!(list["integrations"][0]["metadata"], json!({"kept": true}));
    // The token decrypts with the reused key.
    let token = http
        .get(format!(
            "{}/v1/integrations/good/acct-1/token",
            second.base_url
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(token.status(), 200);
    let token: serde_json::Value = token.json().await.unwrap();
    assert_eq!(token["access_token"], "at-embedded-1");

    let mut second = second;
    second.terminate();
    let exit = second.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(
        exit.code(),
        Some(0),
        "{exit}:\n{}",
        second.logs().join("\n")
    );

    // With no server running, the command starts the embedded database for
    // itself, and stops it.
    let out = api_key(&data_dir, &["list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("embedded"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = command(&data_dir, &["migrate"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("started for this command"), "{stderr}");

    // No PostgreSQL left running on the data directory.
    let left = eventually(Duration::from_secs(10), || async {
        let found = processes_using(&data_dir);
        found.is_empty().then_some(())
    })
    .await;
    assert!(
        left.is_some(),
        "still running: {:?}",
        processes_using(&data_dir)
    );
    let pid_files: Vec<_> = walk(&data_dir)
        .into_iter()
        .filter(|p| p.ends_with("postmaster.pid"))
        .collect();
    assert!(pid_files.is_empty(), "{pid_files:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn embedded_server_listens_on_no_tcp_port_and_admits_only_its_own_account() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_dir = dir.path().join("data");
    let fake = FakeProvider::start().await;
    let registry = write_registry(dir.path(), &fake);

    // No server running: the command starts the embedded database itself.
    let out = api_key(
        &data_dir,
        &["create", "--name", "first", "--scopes", "read"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut server = serve(&data_dir, &registry).await;
    let socket_dir = assert_locked_down(&data_dir);
    assert_eq!(socket_dir, embedded_socket_dir(&server));
    // This user (root, when the tests run as root: the directories belong
    // to `postgres`) joins the running server through the socket.
    let out = api_key(
        &data_dir,
        &["create", "--name", "owner", "--scopes", "read"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("(socket {})", socket_dir.display())),
        "{stderr}"
    );

    if nix::unistd::geteuid().is_root() {
        // Another local user, going for a credentials-scoped key.
        let port: u16 = postmaster_line(&data_dir, 3).parse().unwrap();
        let url = format!(
            "{}&sslmode=disable",
            pg_cluster::socket_url(&socket_dir, port, "integrations")
        );
        let out = api_key_as_nobody(&url, dir.path());
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "another user got in: {stderr}");
        assert!(stderr.contains("Permission denied"), "{stderr}");

        // Even with the directories and the socket opened to everyone,
        // peer authentication turns that user away.
        let open = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let socket = socket_dir.join(format!(".s.PGSQL.{port}"));
        open(&data_dir.join("postgres"), 0o755);
        open(&socket_dir, 0o755);
        open(&socket, 0o777);
        let out = api_key_as_nobody(&url, dir.path());
        open(&socket, 0o700);
        open(&socket_dir, 0o700);
        open(&data_dir.join("postgres"), 0o700);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "another user got in: {stderr}");
        assert!(
            stderr.contains("authentication failed") || stderr.contains("Authentication failed"),
            "{stderr}"
        );
    } else {
        eprintln!("not root: cannot run a command as another user; skipping that part");
    }

    let out = api_key(&data_dir, &["list"]);
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        listed.contains("owner") && listed.contains("first"),
        "{listed}"
    );
    assert!(!listed.contains("intruder"), "{listed}");

    server.terminate();
    let exit = server.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(
        exit.code(),
        Some(0),
        "{exit}:\n{}",
        server.logs().join("\n")
    );
}

#[tokio::test]
async fn data_dir_left_trusting_tcp_by_an_earlier_version_is_locked_down_at_next_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_dir = dir.path().join("data");
    let fake = FakeProvider::start().await;
    let registry = write_registry(dir.path(), &fake);

    // What earlier versions left: the same layout, a server on 127.0.0.1
    // trusting every local connection, a world-readable base directory.
    let mut old = LocalCluster::open_or_init(&data_dir.join("postgres"), ClusterOptions::default())
        .await
        .unwrap();
    let (client, connection) = db_pool::tokio_postgres::connect(
        &format!("{}?sslmode=disable", old.url("postgres")),
        db_pool::tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let driver = tokio::spawn(connection);
    client
        .batch_execute("CREATE DATABASE integrations")
        .await
        .unwrap();
    drop(client);
    let _ = driver.await;
    // A key made then, over TCP (as any local user could).
    let out = Command::new(env!("CARGO_BIN_EXE_integrations"))
        .current_dir(dir.path())
        .args(["api-key", "create", "--name", "before", "--scopes", "read"])
        .env(
            "DATABASE_URL",
            format!("{}?sslmode=disable", old.url("integrations")),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    let hba_path = data_dir.join("postgres/pgdata/pg_hba.conf");
    let old_hba = std::fs::read_to_string(&hba_path).unwrap();
    assert!(
        old_hba.contains("host") && old_hba.contains("trust"),
        "{old_hba}"
    );
    let base_mode = std::fs::metadata(data_dir.join("postgres")).unwrap().mode() & 0o777;
    assert_ne!(base_mode, 0o700, "not the old layout");

    // A command of this version joins such a server, still running,
    // through its socket, and leaves its configuration to its next start.
    let out = api_key(&data_dir, &["list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("before"));
    assert_eq!(std::fs::read_to_string(&hba_path).unwrap(), old_hba);
    old.stop().await.unwrap();
    drop(old);

    // The next start (a command, with no server running) locks it down.
    let out = api_key(
        &data_dir,
        &["create", "--name", "after", "--scopes", "read"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hba = std::fs::read_to_string(&hba_path).unwrap();
    let rules: Vec<&str> = hba
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(
        rules,
        [
            "local all all peer map=local_cluster",
            "host all all all reject"
        ],
        "{hba}"
    );

    // And so does `serve`, with the data kept.
    let mut server = serve(&data_dir, &registry).await;
    assert_locked_down(&data_dir);
    let list = http_client()
        .get(format!("{}/v1/users/user-1/integrations", server.base_url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 200, "{}", list.text().await.unwrap());
    server.terminate();
    let exit = server.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(
        exit.code(),
        Some(0),
        "{exit}:\n{}",
        server.logs().join("\n")
    );
}
