//! `integrations doctor` against real servers: the shared test server and a
//! private one with few connection slots.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Output;

use db_pool::testing::{with_params, TestDatabase};
use pg_cluster::{ClusterOptions, LocalCluster};
use serde_json::Value;

#[path = "support/cli.rs"]
mod cli;
use cli::stdout;

fn doctor(url: &str, args: &[&str]) -> Output {
    cli::run_against(url, "doctor", args)
}

fn all_output(out: &Output) -> String {
    format!("{}{}", stdout(out), cli::stderr(out))
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", all_output(out)))
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {report}"))
}

/// The line of the text report for one check.
fn line<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find(|l| {
            l.get(5..)
                .is_some_and(|rest| rest.starts_with(&format!("{name} ")))
        })
        .unwrap_or_else(|| panic!("no {name} line in\n{text}"))
}

/// A private server with 20 connection slots, 3 of them reserved.
async fn small_server() -> LocalCluster {
    LocalCluster::start_temporary(
        ClusterOptions::default()
            .setting("max_connections", "20")
            .setting("superuser_reserved_connections", "3")
            .setting("idle_in_transaction_session_timeout", "60s"),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_sane_configuration_passes() {
    let db = TestDatabase::create().await;
    let out = doctor(&db.url, &[]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    for name in [
        "url",
        "connect",
        "max_connections",
        "pgbouncer",
        "statement_cache_size",
        "pool_timeout",
    ] {
        assert!(line(&text, name).starts_with("ok   "), "{text}");
    }
    assert!(!text.contains("\nfail "), "{text}");
    assert!(
        text.contains("connection_limit: configured 10, recommended "),
        "{text}"
    );

    let v = json(&doctor(&db.url, &["--json"]));
    assert_eq!(
        v.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["checks", "recommended_connection_limit"]
    );
    for c in v["checks"].as_array().unwrap() {
        assert_eq!(
            c.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["detail", "hint", "name", "status"],
            "serde_json sorts keys"
        );
        assert!(
            ["ok", "warn"].contains(&c["status"].as_str().unwrap()),
            "{c}"
        );
    }
    assert!(v["recommended_connection_limit"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn too_many_connections_for_the_server_fails_with_the_hint() {
    let server = small_server().await;
    // Trust authentication ignores the password; it must not be printed.
    let url = server
        .url("postgres")
        .replacen("postgres@", "postgres:hunter2@", 1);
    let url = with_params(&url, "connection_limit=10&mystery=hunter3");

    let out = doctor(&url, &["--instances", "3"]);
    assert_eq!(out.status.code(), Some(1), "{}", all_output(&out));
    let text = stdout(&out);
    let max = line(&text, "max_connections");
    assert!(max.starts_with("fail "), "{text}");
    assert!(
        // 10 pooled + serve's change listener, per instance.
        max.contains("need 33 (connection_limit 10 + 1 outside the pool x 3 instances)")
            && max.contains("available 17"),
        "{max}"
    );
    assert!(
        text.contains("-> Too many connections: lower connection_limit to 4 or less per instance"),
        "{text}"
    );
    assert!(line(&text, "url").starts_with("warn "), "{text}");
    assert!(line(&text, "url").contains("'mystery'"), "{text}");
    assert!(
        line(&text, "idle_in_transaction_session_timeout").starts_with("ok   "),
        "{text}"
    );
    assert!(!all_output(&out).contains("hunter"), "{}", all_output(&out));

    let out = doctor(&url, &["--instances", "3", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    let max = check(&v, "max_connections");
    assert_eq!(max["status"], "fail");
    assert!(
        max["hint"]
            .as_str()
            .unwrap()
            .contains("raise max_connections"),
        "{max}"
    );
    let url_check = check(&v, "url");
    assert_eq!(url_check["status"], "warn");
    assert!(url_check["detail"].as_str().unwrap().contains("mystery"));
    assert_eq!(
        check(&v, "idle_in_transaction_session_timeout")["status"],
        "ok"
    );
    assert!(!all_output(&out).contains("hunter"), "{}", all_output(&out));

    // One instance fits.
    let out = doctor(&url, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
}

#[tokio::test]
async fn idle_in_transaction_timeout_off_is_a_warning() {
    let db = TestDatabase::create().await;
    let out = doctor(&db.url, &["--json"]);
    assert_eq!(out.status.code(), Some(0));
    let c = check(&json(&out), "idle_in_transaction_session_timeout").clone();
    assert_eq!(c["status"], "warn");
    assert!(
        c["hint"]
            .as_str()
            .unwrap()
            .contains("idle_in_transaction_session_timeout = '60s'"),
        "{c}"
    );
}

#[tokio::test]
async fn pgbouncer_true_without_a_pooler_is_a_warning() {
    let db = TestDatabase::create().await;
    let out = doctor(&with_params(&db.url, "pgbouncer=true"), &["--json"]);
    assert_eq!(out.status.code(), Some(0));
    let c = check(&json(&out), "pgbouncer").clone();
    assert_eq!(c["status"], "warn", "{c}");
    assert!(c["hint"]
        .as_str()
        .unwrap()
        .contains("Remove pgbouncer=true"));
}

#[test]
fn an_unreachable_server_fails_the_connect_check() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgresql://app:hunter2@127.0.0.1:{port}/db");
    let out = doctor(&url, &[]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let connect = line(&text, "connect");
    assert!(connect.starts_with("fail "), "{text}");
    assert!(
        connect.contains("P1001: Can't reach database server"),
        "{text}"
    );
    assert!(
        text.contains("-> Check that the database server is running"),
        "{text}"
    );
    assert!(!text.contains("max_connections "), "skipped: {text}");
    assert!(!all_output(&out).contains("hunter2"));

    let v = json(&doctor(&url, &["--json"]));
    assert_eq!(check(&v, "connect")["status"], "fail");
}

#[test]
fn invalid_input_exits_2() {
    let out = doctor("postgresql://u:hunter2@h/db?connection_limit=abc", &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("P1013: "), "{stderr}");
    assert!(!stderr.contains("hunter2"));
    assert!(out.stdout.is_empty());
    let url = "postgresql://postgres@127.0.0.1:1/db";
    for args in [
        &["--instances", "0"][..],
        &["--instances", "many"],
        &["--server-cores", "0"],
        &["--spindles", "-1"],
        &["--bogus"],
    ] {
        assert_eq!(doctor(url, args).status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn help_explains_every_option() {
    let out = doctor("postgresql://h/db", &["--help"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for option in [
        "--instances",
        "--server-cores",
        "--spindles",
        "--json",
        "--database-url",
    ] {
        assert!(text.contains(option), "{option} missing from\n{text}");
    }
}

/// The providers check lists the providers whose client id or secret is
/// not set, with the variables to set, and warns when integrations of one
/// are stored (they cannot be refreshed).
#[tokio::test]
async fn unconfigured_providers_are_listed_and_stored_ones_warn() {
    let db = TestDatabase::create().await;
    let migrated = cli::run_against(&db.url, "migrate", &[]);
    assert!(migrated.status.success(), "{}", all_output(&migrated));
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("providers.toml");
    let entry = |name: &str| {
        format!(
            "[{name}]\nauthorize_url = \"https://{name}.example/authorize\"\n\
             token_url = \"https://{name}.example/token\"\nclient_id = \"id-{name}\"\n\
             client_secret_env = \"{}_SECRET\"\nclient_auth = \"post\"\n\n",
            name.to_uppercase()
        )
    };
    std::fs::write(&registry, entry("alpha") + &entry("beta")).unwrap();
    let run = || {
        let (mut cmd, _dir) = cli::command(
            &["doctor", "--json"],
            &[
                ("DATABASE_URL", db.url.as_str()),
                ("INTEGRATIONS_PROVIDERS", registry.to_str().unwrap()),
                ("ALPHA_SECRET", "s"),
            ],
        );
        cmd.env_remove("BETA_SECRET");
        json(&cmd.output().unwrap())
    };
    let report = run();
    let providers = check(&report, "providers");
    assert_eq!(providers["status"], "ok", "{providers}");
    let detail = providers["detail"].as_str().unwrap();
    assert!(
        detail.contains("configured: alpha") && detail.contains("beta (set BETA_SECRET)"),
        "{detail}"
    );

    let client = db.connect().await;
    client
        .batch_execute(
            "INSERT INTO integrations (user_id, provider, account_id, access_token, key_id) \
             VALUES ('u1', 'beta', 'a1', '\\x00', 'k1'), ('u2', 'beta', 'a2', '\\x00', 'k1')",
        )
        .await
        .unwrap();
    let report = run();
    let providers = check(&report, "providers");
    assert_eq!(providers["status"], "warn", "{providers}");
    assert!(
        providers["hint"]
            .as_str()
            .unwrap()
            .contains("beta (2 stored)"),
        "{providers}"
    );
}
