//! `integrations bench` against a real server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Output;

use db_pool::testing::TestDatabase;

#[path = "support/cli.rs"]
mod cli;

fn bench(url: &str, args: &[&str]) -> Output {
    cli::run_against(url, "bench", args)
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_lookup_report_has_every_field() {
    let db = TestDatabase::create().await;
    let client = db.connect().await;
    client
        .batch_execute(
            "CREATE TABLE t (user_id text PRIMARY KEY, n int); \
             INSERT INTO t SELECT 'user' || i, i FROM generate_series(1, 100) i",
        )
        .await
        .unwrap();
    let url = format!("{}?connection_limit=3", db.url);
    let v = json(&bench(
        &url,
        &[
            "--sql",
            "SELECT n FROM t WHERE user_id = 'user' || $1",
            "--param-range",
            "1..100",
            "--concurrency",
            "8",
            "--duration",
            "1",
            "--json",
        ],
    ));
    assert!(v["ops_per_sec"].as_f64().unwrap() > 0.0);
    for k in ["p50", "p99", "max"] {
        assert!(v["latency_ms"][k].as_f64().unwrap() > 0.0, "{k}");
    }
    for k in ["p50", "p99"] {
        assert!(v["pool_wait_ms"][k].as_f64().is_some(), "{k}");
    }
    assert_eq!(v["errors"], serde_json::json!({}));
    assert_eq!(v["connection_limit"], 3);
    assert_eq!(v["max_in_use"], 3, "8 callers keep all 3 connections busy");

    // An integer parameter is bound as an integer.
    let v = json(&bench(
        &url,
        &[
            "--sql",
            "SELECT n FROM t WHERE n = $1",
            "--param-range",
            "1..100",
            "--duration",
            "1",
            "--json",
        ],
    ));
    assert_eq!(v["errors"], serde_json::json!({}));

    // Split over 3 runtimes, each with its own pool: the connections are
    // dealt out (2, 1, 1 of 4 here), every caller runs, and together they
    // keep every connection busy, never more.
    let url4 = format!("{}?connection_limit=4", db.url);
    let v = json(&bench(
        &url4,
        &[
            "--sql",
            "SELECT n FROM t WHERE n = $1 AND pg_sleep(0.001) IS NOT NULL",
            "--param-range",
            "1..100",
            "--concurrency",
            "9",
            "--duration",
            "1",
            "--runtimes",
            "3",
            "--json",
        ],
    ));
    assert_eq!(v["errors"], serde_json::json!({}));
    assert_eq!(v["runtimes"], 3);
    assert_eq!(v["connection_limit"], 4);
    assert_eq!(v["max_in_use"], 4, "9 callers keep all 4 connections busy");
    assert!(v["ops"].as_u64().unwrap() > 9, "{v}");
    let out = bench(
        &url4,
        &["--sql", "SELECT 1", "--runtimes", "2", "--threads", "0"],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "--runtimes with --threads is refused"
    );
}

#[tokio::test]
async fn sweep_runs_once_per_size_and_plots() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("sweep.svg");
    let out = bench(
        &db.url,
        &[
            "--sql",
            "SELECT 1",
            "--concurrency",
            "4",
            "--duration",
            "1",
            "--sweep",
            "1,3",
            "--plot",
            svg.to_str().unwrap(),
            "--json",
        ],
    );
    let v = json(&out);
    let runs = v.as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["connection_limit"], 1);
    assert_eq!(runs[1]["connection_limit"], 3);
    assert_eq!(runs[0]["max_in_use"], 1);
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("connection_limit"));
    assert!(chart.contains("p99 pool wait (ms)"), "the pool wait line");
    assert_eq!(
        x_tick_labels(&chart),
        ["1", "3"],
        "ticks at the swept sizes"
    );

    // The table form.
    let out = bench(
        &db.url,
        &["--sql", "SELECT 1", "--duration", "1", "--sweep", "2"],
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("p99 pool wait ms"), "{text}");
}

/// The labels of the chart's x axis: the numeric `<text>` elements of the
/// lowest row (the y axes' labels all sit above it), left to right.
fn x_tick_labels(svg: &str) -> Vec<String> {
    let attr = |tag: &str, name: &str| -> f64 {
        let start = tag.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
        let len = tag[start..].find('"').unwrap();
        tag[start..start + len].parse().unwrap()
    };
    let texts: Vec<(f64, f64, String)> = svg
        .split("<text")
        .skip(1)
        .filter_map(|t| {
            let open = t.find('>')?;
            let label = t[open + 1..t.find("</text>")?].trim().to_string();
            label
                .parse::<f64>()
                .ok()
                .map(|_| (attr(&t[..open], "x"), attr(&t[..open], "y"), label))
        })
        .collect();
    let bottom = texts.iter().map(|t| t.1).fold(f64::MIN, f64::max);
    let mut row: Vec<_> = texts.into_iter().filter(|t| t.1 == bottom).collect();
    row.sort_by(|a, b| a.0.total_cmp(&b.0));
    row.into_iter().map(|t| t.2).collect()
}

/// The pool's warnings reach standard error: a connection held past
/// leak_detection_threshold and a statement past slow_query_threshold.
#[tokio::test]
async fn pool_warnings_are_printed() {
    let db = TestDatabase::create().await;
    let url = format!(
        "{}?connection_limit=1&leak_detection_threshold=1&slow_query_threshold=1000",
        db.url
    );
    let out = bench(
        &url,
        &[
            "--sql",
            "SELECT pg_sleep(2.5)",
            "--concurrency",
            "1",
            "--duration",
            "1",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("possible leak"), "{stderr}");
    assert!(stderr.contains("slow query"), "{stderr}");
}

#[tokio::test]
async fn errors_are_counted_not_fatal() {
    let db = TestDatabase::create().await;
    let url = format!("{}?connection_limit=1&pool_timeout=1", db.url);
    let out = bench(
        &url,
        &[
            "--sql",
            "SELECT pg_sleep(3)",
            "--concurrency",
            "4",
            "--duration",
            "2",
            "--json",
        ],
    );
    let v = json(&out);
    assert!(v["errors"]["P2024"].as_u64().unwrap() >= 3, "{v}");
}

#[test]
fn invalid_arguments_exit_2() {
    let url = "postgresql://postgres@127.0.0.1:1/db";
    for args in [
        vec!["--sql", "SELECT 1", "--param-range", "10..1"],
        vec!["--sql", "SELECT 1", "--concurrency", "0"],
        vec!["--sql", "SELECT 1", "--duration", "abc"],
        vec!["--concurrency", "4"],
    ] {
        let out = bench(url, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    let out = bench(
        "postgresql://u@h/db?connection_limit=x",
        &["--sql", "SELECT 1"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("P1013"));
}
