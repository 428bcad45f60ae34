//! `integrations migrate`, `generate-key` and `rotate-keys` through the binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use db_pool::testing::TestDatabase;
use db_pool::{Pool, PoolConfig};
use integrations::crypto::Keyring;
use integrations::domain::{AccountId, ProviderName, UserId};
use integrations::oauth::{Expiry, ProviderRegistry, TokenClient, TokenClientConfig, TokenSet};
use integrations::service::{IntegrationsService, ServiceConfig};

#[path = "support/cli.rs"]
mod cli;
use cli::{run, stdout};

#[tokio::test]
async fn migrate_applies_once_then_reports_up_to_date() {
    let db = TestDatabase::create().await;
    let first = run(&["migrate"], &[("DATABASE_URL", &db.url)]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        stdout(&first).contains("applied V1__integrations"),
        "{}",
        stdout(&first)
    );
    let second = run(&["migrate"], &[("DATABASE_URL", &db.url)]);
    assert_eq!(stdout(&second).trim(), "schema up to date");
    let tables: i64 = db
        .connect()
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('integrations', 'oauth_states')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 2);
}

#[tokio::test]
async fn migrate_against_no_server_exits_1_with_the_code_and_hint() {
    let out = run(
        &["migrate"],
        &[(
            "DATABASE_URL",
            "postgresql://postgres@127.0.0.1:1/db?sslmode=disable",
        )],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("P1001") && err.contains("hint:"), "{err}");
}

#[test]
fn generated_keys_get_distinct_ids_so_a_rotation_can_list_both() {
    // The README's rotation: a new key first, the old one after it.
    let ids: Vec<String> = (0..2)
        .map(|_| {
            let out = run(&["generate-key"], &[]);
            assert!(out.status.success());
            stdout(&out).trim().to_string()
        })
        .collect();
    let both = format!("{},{}", ids[0], ids[1]);
    assert!(Keyring::parse(&both).is_ok(), "{both}");
    assert!(
        ids[0].starts_with('k') && ids[0].contains('-'),
        "{}",
        ids[0]
    );
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let out = run(
        &["serve", "--listen", "127.0.0.1:0"],
        &[
            (
                "DATABASE_URL",
                "postgresql://postgres@127.0.0.1:1/db?sslmode=disable&connect_timeout=1",
            ),
            (
                "INTEGRATIONS_ENCRYPTION_KEYS",
                "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ERROR"), "a log line was written: {err}");
    assert!(!err.contains('\u{1b}'), "colour codes in a pipe: {err:?}");
}

#[test]
fn generate_key_prints_a_usable_key_alone_on_stdout() {
    let out = run(&["generate-key", "--id", "2026-11"], &[]);
    assert!(out.status.success());
    let spec = stdout(&out);
    assert!(spec.trim().starts_with("2026-11:"));
    assert!(Keyring::parse(spec.trim()).is_ok());
}

/// `n` GitHub integrations of user `u` (accounts `acct0`...), encrypted
/// with the keys of `spec`.
async fn seed_encrypted(db: &TestDatabase, spec: &str, n: usize) {
    let pool = Pool::new(PoolConfig::parse(&db.url).unwrap()).unwrap();
    integrations::store::migrations::run(&pool).await.unwrap();
    let env = |_: &str| Some("x".to_string());
    let service = IntegrationsService::new(
        pool.clone(),
        Keyring::parse(spec).unwrap(),
        ProviderRegistry::load(None, &env).unwrap(),
        TokenClient::new(&TokenClientConfig::default()).unwrap(),
        ServiceConfig::default(),
    );
    for i in 0..n {
        let tokens = TokenSet::from_response(
            &serde_json::json!({"access_token": format!("a{i}"), "refresh_token": format!("r{i}")}),
            chrono::Utc::now(),
            Expiry::Never,
        )
        .unwrap();
        service
            .connect(
                &UserId::parse("u").unwrap(),
                &ProviderName::parse("github").unwrap(),
                &AccountId::parse(&format!("acct{i}")).unwrap(),
                &tokens,
                None,
            )
            .await
            .unwrap();
    }
    pool.close(std::time::Duration::from_secs(5)).await;
}

#[tokio::test]
async fn rotate_keys_leaves_an_unreadable_row_names_it_and_fails() {
    let db = TestDatabase::create().await;
    let old = Keyring::generate_spec("old");
    seed_encrypted(&db, &old, 5).await;
    let client = db.connect().await;
    let corrupt: i64 = client
        .query_one(
            "UPDATE integrations SET access_token = set_byte(access_token, 20, 0) \
             WHERE account_id = 'acct2' RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let keys = format!("{},{old}", Keyring::generate_spec("new"));
    let out = run(
        &["rotate-keys", "--batch", "2"],
        &[
            ("DATABASE_URL", &db.url),
            ("INTEGRATIONS_ENCRYPTION_KEYS", &keys),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stdout(&out).contains("re-encrypted 4 integration(s) with key 'new'"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr.contains(&format!(
            "1 integration(s) could not be decrypted and were left as they are (ids {corrupt})"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("could not be decrypted with key 'old'"),
        "{stderr}"
    );
    assert!(stderr.contains("hint: keep their key"), "{stderr}");
    let left: Vec<String> = client
        .query(
            "SELECT account_id FROM integrations WHERE key_id <> 'new'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        left,
        ["acct2"],
        "only the unreadable row is left under the old key"
    );
}

#[tokio::test]
async fn rotate_keys_reencrypts_with_the_first_key() {
    let db = TestDatabase::create().await;
    let old = Keyring::generate_spec("old");
    seed_encrypted(&db, &old, 7).await;
    let keys = format!("{},{old}", Keyring::generate_spec("new"));
    let out = run(
        &["rotate-keys", "--batch", "3"],
        &[
            ("DATABASE_URL", &db.url),
            ("INTEGRATIONS_ENCRYPTION_KEYS", &keys),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).contains("re-encrypted 7 integration(s) with key 'new' in 3 batch(es)"),
        "{}",
        stdout(&out)
    );
    let all = String::from_utf8_lossy(&out.stderr).to_string() + &stdout(&out);
    assert!(
        !all.contains(keys.split(':').nth(1).unwrap().split(',').next().unwrap()),
        "key material printed"
    );
    let left: i64 = db
        .connect()
        .await
        .query_one(
            "SELECT count(*) FROM integrations WHERE key_id <> 'new'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[test]
fn rotate_keys_without_a_key_says_how_to_make_one() {
    let out = run(&["rotate-keys"], &[("DATABASE_URL", "postgresql://h/db")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("INTEGRATIONS_ENCRYPTION_KEYS") && err.contains("generate-key"),
        "{err}"
    );
}

/// Progress is drawn on a terminal only: `rotate-keys` under a
/// pseudo-terminal (util-linux `script`) shows rows done of the total; the
/// same command in a pipe prints no bar, no carriage return, no escape.
#[tokio::test]
async fn rotate_keys_shows_progress_on_a_terminal_only() {
    let db = TestDatabase::create().await;
    let old = Keyring::generate_spec("old");
    seed_encrypted(&db, &old, 40).await;
    let keys = format!("{},{old}", Keyring::generate_spec("new"));
    let envs = [
        ("DATABASE_URL", db.url.as_str()),
        ("INTEGRATIONS_ENCRYPTION_KEYS", keys.as_str()),
    ];
    // In a pipe (stdout and stderr captured): the result line only.
    let piped = run(&["rotate-keys", "--batch", "10"], &envs);
    assert!(
        piped.status.success(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(
        !err.contains('\r') && !err.contains('\u{1b}') && !err.contains("rows"),
        "progress in a pipe: {err:?}"
    );
    // The rows are under the new key now: put them back under the old one.
    seed_encrypted(&db, &old, 40).await;
    let bin = env!("CARGO_BIN_EXE_integrations");
    let dir = tempfile::tempdir().unwrap();
    let terminal = std::process::Command::new("script")
        .args([
            "-qec",
            &format!("{bin} rotate-keys --batch 10"),
            "/dev/null",
        ])
        .current_dir(dir.path())
        .env_remove("DIRECT_URL")
        .env_remove("DATABASE_PROFILE")
        .env("DATABASE_URL", &db.url)
        .env("INTEGRATIONS_ENCRYPTION_KEYS", &keys)
        .env("TERM", "xterm")
        .output()
        .expect("util-linux script runs");
    let screen = String::from_utf8_lossy(&terminal.stdout);
    assert!(terminal.status.success(), "{screen}");
    assert!(
        screen.contains("/40 rows"),
        "no progress on a terminal: {screen:?}"
    );
    assert!(
        screen.contains("re-encrypted 40 integration(s)"),
        "{screen}"
    );
}
