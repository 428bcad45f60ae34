//! `integrations activity` against a real server with connections left idle
//! in a transaction and waiting on a lock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use db_pool::testing::{with_params, TestDatabase};
use db_pool::{Conn, Pool, PoolConfig};
use serde_json::Value;

#[path = "support/cli.rs"]
mod cli;

fn command(url: &str, args: &[&str]) -> (Command, tempfile::TempDir) {
    cli::against(url, "activity", args)
}

fn activity(url: &str, args: &[&str]) -> Output {
    let (mut cmd, _dir) = command(url, args);
    cmd.output().unwrap()
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A pool whose connections show `app` as their application_name.
fn pool(db: &TestDatabase, app: &str) -> Pool {
    let url = with_params(&db.url, &format!("application_name={app}"));
    Pool::new(PoolConfig::parse(&url).unwrap()).unwrap()
}

fn application<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["applications"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["application_name"] == name)
        .unwrap_or_else(|| panic!("no application {name} in {v}"))
}

/// Connections in every interesting state, kept open while the test runs.
struct Scene {
    holder_pid: i32,
    waiter_pid: i32,
    apps: [String; 3],
    _conns: Vec<Conn>,
    _pools: Vec<Pool>,
    waiter: tokio::task::JoinHandle<()>,
}

/// `holder` holds a table lock inside an open transaction (idle in
/// transaction), `waiter` waits for it, `idle` has one connection idle and
/// one idle in transaction.
async fn scene(db: &TestDatabase) -> Scene {
    let suffix = format!("{:08x}", rand::random::<u32>());
    let apps = ["holder", "waiter", "idle"].map(|a| format!("{a}_{suffix}"));
    let pools: Vec<Pool> = apps.iter().map(|a| pool(db, a)).collect();

    let mut holder = pools[0].get().await.unwrap();
    holder
        .batch_execute("CREATE TABLE t (n int)")
        .await
        .unwrap();
    holder
        .batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let holder_pid = holder.backend_pid();

    let mut waiter = pools[1].get().await.unwrap();
    let waiter_pid = waiter.backend_pid();
    let waiter = tokio::spawn(async move {
        waiter
            .batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE; ROLLBACK")
            .await
            .unwrap();
    });

    let mut in_tx = pools[2].get().await.unwrap();
    in_tx.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let mut idle = pools[2].get().await.unwrap();
    idle.execute("SELECT 1", &[]).await.unwrap();

    Scene {
        holder_pid,
        waiter_pid,
        apps,
        _conns: vec![holder, in_tx, idle],
        _pools: pools,
        waiter,
    }
}

/// Samples until the waiter shows up as waiting on the lock.
fn sample_with_lock_wait(url: &str) -> Value {
    for _ in 0..100 {
        let v = json(&activity(url, &["--json"]));
        if !v["lock_waits"].as_array().unwrap().is_empty() {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the lock waiter never showed up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_shows_idle_transactions_lock_waiters_and_applications() {
    let db = TestDatabase::create().await;
    let s = scene(&db).await;
    let url = db.url.clone();
    let v = tokio::task::spawn_blocking(move || sample_with_lock_wait(&url))
        .await
        .unwrap();

    assert_eq!(v["database"], db.name.as_str());
    assert_eq!(v["total"], 4, "the sampling connection is left out: {v}");
    assert!(v["idle_in_transaction"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["idle_in_transaction"], 2, "{v}");
    assert_eq!(v["active"], 1, "{v}");
    assert_eq!(v["idle"], 1, "{v}");

    let [holder, waiter, idle] = &s.apps;
    assert_eq!(application(&v, holder)["total"], 1);
    assert_eq!(application(&v, holder)["idle_in_transaction"], 1);
    assert_eq!(application(&v, waiter)["total"], 1);
    assert_eq!(application(&v, waiter)["active"], 1);
    assert_eq!(application(&v, idle)["total"], 2);
    assert_eq!(application(&v, idle)["idle"], 1);
    assert_eq!(application(&v, idle)["idle_in_transaction"], 1);

    let waits = v["lock_waits"].as_array().unwrap();
    assert_eq!(waits.len(), 1, "{v}");
    assert_eq!(waits[0]["pid"], s.waiter_pid);
    assert_eq!(waits[0]["application_name"], waiter.as_str());
    assert_eq!(waits[0]["blocked_by"], serde_json::json!([s.holder_pid]));
    assert!(waits[0]["waiting_secs"].as_f64().unwrap() >= 0.0);
    assert_eq!(v["longest_transaction"]["pid"], s.holder_pid);
    assert_eq!(v["longest_query"]["pid"], s.waiter_pid);

    drop(s._conns);
    s.waiter.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_lists_applications_and_who_blocks_whom() {
    let db = TestDatabase::create().await;
    let s = scene(&db).await;
    let url = db.url.clone();
    tokio::task::spawn_blocking(move || sample_with_lock_wait(&url))
        .await
        .unwrap();
    let out = activity(&db.url, &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(
            "connections: 4 total, 1 active, 1 idle, 2 idle in transaction, 0 idle in transaction (aborted)"
        ),
        "{text}"
    );
    let idle_row = text
        .lines()
        .find(|l| l.starts_with(&s.apps[2]))
        .unwrap_or_else(|| panic!("{text}"));
    let numbers: Vec<&str> = idle_row.split_whitespace().skip(1).collect();
    assert_eq!(numbers, ["2", "0", "1", "1", "0"], "{text}");
    assert!(
        text.contains(&format!(
            "longest transaction: pid {} ({}), idle in transaction",
            s.holder_pid, s.apps[0]
        )),
        "{text}"
    );
    assert!(text.contains("waiting on locks: 1"), "{text}");
    assert!(
        text.contains(&format!("  pid {} ({}) waiting ", s.waiter_pid, s.apps[1])),
        "{text}"
    );
    assert!(
        text.contains(&format!("blocked by {}: BEGIN; LOCK TABLE t", s.holder_pid)),
        "{text}"
    );
    drop(s._conns);
    s.waiter.await.unwrap();
}

#[tokio::test]
async fn watch_prints_one_json_line_per_refresh_until_ctrl_c() {
    let db = TestDatabase::create().await;
    let (mut cmd, _dir) = command(&db.url, &["--json", "--watch", "1"]);
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .take(2)
            .map(Result::unwrap)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(lines.len(), 2);
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    let second: Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(first["database"], db.name.as_str());
    assert!(second["sampled_at"].as_str().unwrap() > first["sampled_at"].as_str().unwrap());
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "Ctrl-C ends the watch normally");
}

#[test]
fn unreachable_server_exits_1_with_the_hint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgresql://app:hunter2@127.0.0.1:{port}/db");
    for args in [&[][..], &["--json"], &["--watch", "1"]] {
        let out = activity(&url, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("P1001: "), "{stderr}");
        assert!(stderr.contains("hint: "), "{stderr}");
        assert!(!stderr.contains("hunter2"));
    }
}

#[test]
fn invalid_input_exits_2() {
    let out = activity("postgresql://u@h/db?pool_timeout=soon", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("P1013: "));
    let url = "postgresql://postgres@127.0.0.1:1/db";
    for args in [&["--watch", "0"][..], &["--watch", "x"], &["--bogus"]] {
        assert_eq!(activity(url, args).status.code(), Some(2), "{args:?}");
    }
}

/// Lines of a child's output, as they come, on a channel.
fn lines_of(output: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `--watch` outlives a server restart: while the server is down it says
/// so on standard error and keeps going; once the server is back the
/// samples resume.
#[tokio::test]
async fn watch_survives_a_server_restart() {
    use pg_cluster::{ClusterOptions, LocalCluster};
    let mut cluster = LocalCluster::start_temporary(ClusterOptions::default())
        .await
        .unwrap();
    let url = format!(
        "{}?sslmode=disable&connect_timeout=2&pool_timeout=2",
        cluster.url("postgres")
    );
    let (mut cmd, _dir) = command(&url, &["--json", "--watch", "1"]);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines_of(child.stdout.take().unwrap());
    let err = lines_of(child.stderr.take().unwrap());
    let wait = Duration::from_secs(30);
    let before: Value = serde_json::from_str(&out.recv_timeout(wait).unwrap()).unwrap();

    cluster.stop().await.unwrap();
    // It reports the outage (an error code and a hint) and keeps running.
    let mut said = Vec::new();
    let deadline = std::time::Instant::now() + wait;
    while !said.iter().any(|l: &String| l.starts_with("hint: ")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no error reported: {said:?}"
        );
        if let Ok(line) = err.recv_timeout(Duration::from_millis(100)) {
            said.push(line);
        }
    }
    assert!(said.iter().any(|l| l.starts_with('P')), "{said:?}");
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited with the server down"
    );

    cluster.start().await.unwrap();
    let restarted = chrono::Utc::now();
    // The next sample taken after the restart (any line still in the pipe
    // from before the stop is older).
    let after = loop {
        let line: Value = serde_json::from_str(&out.recv_timeout(wait).unwrap()).unwrap();
        let at =
            chrono::DateTime::parse_from_rfc3339(line["sampled_at"].as_str().unwrap()).unwrap();
        if at >= restarted {
            break line;
        }
    };
    assert_eq!(after["database"], before["database"]);

    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
