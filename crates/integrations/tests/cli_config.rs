//! `integrations config`: the effective settings, without a server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Output;

#[path = "support/cli.rs"]
mod cli;

fn config(url: Option<&str>, profile: Option<&str>, json: bool) -> Output {
    let args: &[&str] = if json {
        &["config", "--json"]
    } else {
        &["config"]
    };
    let envs: Vec<(&str, &str)> = [("DATABASE_URL", url), ("DATABASE_PROFILE", profile)]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect();
    cli::run(args, &envs)
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn json_shows_effective_values_with_nulls_for_unlimited() {
    let out = config(
        Some("postgresql://app:hunter2@db:6432/prod?connection_limit=20&pool_timeout=0&pgbouncer=true&mystery=1"),
        None,
        true,
    );
    let v = json(&out);
    assert_eq!(v["host"], "db");
    assert_eq!(v["port"], 6432);
    assert_eq!(v["database"], "prod");
    assert_eq!(v["user"], "app");
    assert_eq!(v["connection_limit"], 20);
    assert_eq!(v["pool_timeout"], serde_json::Value::Null);
    assert_eq!(v["connect_timeout"], 5);
    assert_eq!(v["socket_timeout"], serde_json::Value::Null);
    assert_eq!(v["pgbouncer"], true);
    assert_eq!(v["statement_cache_size"], 0);
    assert_eq!(v["max_idle_connection_lifetime"], 300);
    assert_eq!(v["application_name"], "integrations");
    assert_eq!(v["schema"], "public");
    assert_eq!(v["sslmode"], "prefer");
    assert_eq!(v["profile"], serde_json::Value::Null);
    assert_eq!(v["ignored_parameters"], serde_json::json!(["mystery"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("mystery"),
        "unknown parameter not reported: {stderr}"
    );
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr);
    assert!(!all.contains("hunter2"), "password leaked: {all}");
}

#[test]
fn profile_fills_what_the_url_does_not_set() {
    let v = json(&config(
        Some("postgresql://h/db?connection_limit=7"),
        Some("production"),
        true,
    ));
    assert_eq!(v["profile"], "production");
    assert_eq!(v["connection_limit"], 7);
    assert_eq!(v["pool_timeout"], 30);
    assert_eq!(v["connect_timeout"], 10);
}

#[test]
fn table_names_sources_and_redacts_the_password() {
    let out = config(
        Some("postgresql://app:hunter2@db/prod?connection_limit=3"),
        Some("development"),
        false,
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("postgresql://app:****@db:5432/prod"),
        "{text}"
    );
    assert!(!text.contains("hunter2"));
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .to_string()
    };
    assert!(line("connection_limit").ends_with("url"), "{text}");
    assert!(line("pool_timeout").ends_with("profile"), "{text}");
    assert!(line("socket_timeout").ends_with("default"), "{text}");
}

#[test]
fn invalid_input_exits_2_with_p1013() {
    for (url, profile, needle) in [
        (
            Some("postgresql://u:hunter2@h/db?connection_limit=abc"),
            None,
            "connection_limit='abc'",
        ),
        (
            Some("postgresql://u:hunter2@h/db?pool_timeout=-1"),
            None,
            "pool_timeout='-1'",
        ),
        (
            Some("postgresql://u:hunter2@h/db?pgbouncer=yes"),
            None,
            "pgbouncer='yes'",
        ),
        (Some("postgresql://u:hunter2@h:99999/db"), None, "port"),
        (Some("mysql://u:hunter2@h/db"), None, "'mysql'"),
        (
            Some("postgresql://u:hunter2@h/db"),
            Some("turbo"),
            "DATABASE_PROFILE='turbo'",
        ),
    ] {
        for as_json in [false, true] {
            let out = config(url, profile, as_json);
            assert_eq!(out.status.code(), Some(2), "{url:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.starts_with("P1013: The provided database string is invalid."),
                "{stderr}"
            );
            assert!(stderr.contains(needle), "{needle}: {stderr}");
            assert!(!stderr.contains("hunter2"));
            assert!(out.stdout.is_empty());
        }
    }
}

#[test]
fn dotenv_is_read_but_the_environment_wins() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "DATABASE_URL=postgresql://fromfile@h/filedb?connection_limit=4\nDATABASE_PROFILE=production\n",
    )
    .unwrap();
    let run = |env_url: Option<&str>| {
        let envs: Vec<(&str, &str)> = env_url.map(|u| ("DATABASE_URL", u)).into_iter().collect();
        json(
            &cli::command_in(dir.path(), &["config", "--json"], &envs)
                .output()
                .unwrap(),
        )
    };
    let v = run(None);
    assert_eq!(v["database"], "filedb");
    assert_eq!(v["connection_limit"], 4);
    assert_eq!(v["profile"], "production");
    let v = run(Some("postgresql://h/envdb"));
    assert_eq!(v["database"], "envdb");
    assert_eq!(v["connection_limit"], 20, "profile from .env still applies");
}

#[test]
fn direct_url_is_validated_shown_and_required_behind_pgbouncer() {
    let main = "postgresql://app:s3cret@db.internal:6432/app?pgbouncer=true";
    // Shown, password redacted.
    let out = cli::run(
        &["config"],
        &[
            ("DATABASE_URL", main),
            ("DIRECT_URL", "postgresql://app:dir3ct@db.internal:5432/app"),
        ],
    );
    assert!(out.status.success(), "{}", cli::stderr(&out));
    let text = cli::stdout(&out);
    let line = text.lines().find(|l| l.starts_with("DIRECT_URL")).unwrap();
    assert!(
        line.contains("db.internal:5432") && !text.contains("dir3ct"),
        "{text}"
    );

    // Invalid: P1013 naming DIRECT_URL, exit 2, no password.
    for bad in [
        "postgresql://app:dir3ct@db.internal:5432/app?connection_limit=zero",
        "postgresql://app:dir3ct@db.internal:5432/app?pgbouncer=true",
    ] {
        for cmd in ["config", "serve", "migrate"] {
            let out = cli::run(&[cmd], &[("DATABASE_URL", main), ("DIRECT_URL", bad)]);
            let err = cli::stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{cmd} {bad}: {err}");
            assert!(err.contains("P1013") && err.contains("DIRECT_URL"), "{err}");
            assert!(!err.contains("dir3ct"), "{err}");
        }
    }

    // pgbouncer=true without DIRECT_URL: serve and migrate refuse, naming it
    // and why; config says so.
    for cmd in ["serve", "migrate"] {
        let out = cli::run(
            &[cmd],
            &[
                ("DATABASE_URL", main),
                (
                    "INTEGRATIONS_ENCRYPTION_KEYS",
                    "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                ),
            ],
        );
        let err = cli::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(
            err.contains("DIRECT_URL") && err.contains("pgbouncer=true") && err.contains("LISTEN"),
            "{err}"
        );
    }
    let out = cli::run(&["config"], &[("DATABASE_URL", main)]);
    assert!(cli::stdout(&out).contains("required with pgbouncer=true"));
}

#[test]
fn help_shows_the_variables_without_their_values() {
    let out = cli::run(
        &["config", "--help"],
        &[
            ("DATABASE_PROFILE", "production"),
            ("DIRECT_URL", "postgresql://a:s3cret@h/db"),
        ],
    );
    let text = cli::stdout(&out);
    assert!(text.contains("[env: DATABASE_PROFILE]"), "{text}");
    assert!(text.contains("[env: DIRECT_URL]"), "{text}");
    assert!(
        !text.contains("=production") && !text.contains("s3cret"),
        "{text}"
    );
    let out = cli::run(&["config", "--help"], &[]);
    assert!(!cli::stdout(&out).contains("DATABASE_PROFILE=]"));
}

#[test]
fn sslaccept_shows_its_default_strict() {
    let out = config(Some("postgresql://u@db.internal/app"), None, true);
    assert_eq!(json(&out)["sslaccept"], "strict");
    let out = config(Some("postgresql://u@db.internal/app"), None, false);
    let text = cli::stdout(&out);
    let line = text.lines().find(|l| l.starts_with("sslaccept")).unwrap();
    assert!(
        line.contains("strict") && line.contains("default"),
        "{line}"
    );
}

/// With the connect flow on (a callback URL) and a DATABASE_URL, `serve`
/// refuses to start without the allow-list of redirect origins, and an
/// invalid list is named with what is accepted.
#[test]
fn serve_requires_the_redirect_origins_with_the_connect_flow() {
    let base = [
        ("DATABASE_URL", "postgresql://app@127.0.0.1:9/app"),
        (
            "INTEGRATIONS_ENCRYPTION_KEYS",
            "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ),
        (
            "INTEGRATIONS_CALLBACK_URL",
            "https://integrations.example/v1/oauth/callback",
        ),
    ];
    let out = cli::run(&["serve"], &base);
    let err = cli::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("INTEGRATIONS_REDIRECT_ORIGINS"), "{err}");

    let mut bad = base.to_vec();
    bad.push(("INTEGRATIONS_REDIRECT_ORIGINS", "https://u:p@app.example"));
    let out = cli::run(&["serve"], &bad);
    let err = cli::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("INTEGRATIONS_REDIRECT_ORIGINS") && err.contains("without path or user:pass@"),
        "{err}"
    );
}
