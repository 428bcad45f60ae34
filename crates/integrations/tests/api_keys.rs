//! API keys against a real database: creation, verification and its cache
//! (what costs a query and what does not), revocation, what is stored, and
//! `integrations api-key create|list|revoke` through the binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Output;
use std::time::Duration;

use db_pool::testing::TestDatabase;
use db_pool::{Pool, PoolConfig};
use integrations::service::api_keys::{ApiKeys, AuthError, Scope, DEFAULT_VERIFY_TTL};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

#[path = "support/cli.rs"]
mod cli;
use cli::{stderr, stdout};

/// A fresh migrated database and a pool on it.
async fn setup() -> (TestDatabase, Pool) {
    let db = TestDatabase::create().await;
    let pool = Pool::new(PoolConfig::parse(&db.url).unwrap()).unwrap();
    integrations::store::migrations::run(&pool).await.unwrap();
    (db, pool)
}

fn checkouts(pool: &Pool) -> u64 {
    pool.stats().checkouts
}

/// A key of the right shape that was never issued.
const UNKNOWN_KEY: &str = "ik_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

#[tokio::test]
async fn a_created_key_verifies_with_its_name_and_scopes() {
    let (_db, pool) = setup().await;
    let keys = ApiKeys::new(pool, DEFAULT_VERIFY_TTL);
    let (key, created) = keys
        .create("ci-deploy", &[Scope::Write, Scope::Read, Scope::Write])
        .await
        .unwrap();
    assert_eq!(created.name, "ci-deploy");
    assert_eq!(created.scopes, vec![Scope::Read, Scope::Write]);

    let info = keys.verify(key.expose_secret()).await.unwrap().unwrap();
    assert_eq!(*info, created);
    assert!(info.allows(Scope::Read) && info.allows(Scope::Write));
    assert!(!info.allows(Scope::Credentials) && !info.allows(Scope::Admin));
}

#[tokio::test]
async fn wrong_and_malformed_keys_verify_as_none_and_malformed_ones_cost_nothing() {
    let (_db, pool) = setup().await;
    let keys = ApiKeys::new(pool.clone(), DEFAULT_VERIFY_TTL);
    let (key, _) = keys.create("app", &[Scope::Read]).await.unwrap();
    let key = key.expose_secret();

    assert!(keys.verify(UNKNOWN_KEY).await.unwrap().is_none());
    // The right key with one character changed.
    let mut altered = key.to_string();
    let last = if altered.ends_with('A') { "Q" } else { "A" };
    altered.replace_range(altered.len() - 1.., last);
    assert!(keys.verify(&altered).await.unwrap().is_none());

    let before = checkouts(&pool);
    for malformed in [
        "",
        "Bearer",
        &key[..key.len() - 1],
        &format!("{key}x"),
        &format!("xx{}", &key[2..]),
        &format!("{}*", &key[..key.len() - 1]),
    ] {
        assert!(
            keys.verify(malformed).await.unwrap().is_none(),
            "{malformed}"
        );
    }
    assert_eq!(checkouts(&pool), before, "a malformed key was looked up");
}

#[tokio::test]
async fn the_first_verify_costs_one_query_and_the_next_ones_none() {
    let (_db, pool) = setup().await;
    let keys = ApiKeys::new(pool.clone(), DEFAULT_VERIFY_TTL);
    let (key, _) = keys.create("app", &[Scope::Read]).await.unwrap();

    let before = checkouts(&pool);
    assert!(keys.verify(key.expose_secret()).await.unwrap().is_some());
    assert_eq!(checkouts(&pool), before + 1);
    for _ in 0..5 {
        assert!(keys.verify(key.expose_secret()).await.unwrap().is_some());
    }
    assert_eq!(
        checkouts(&pool),
        before + 1,
        "a cached answer hit the database"
    );

    // Wrong keys are remembered too.
    assert!(keys.verify(UNKNOWN_KEY).await.unwrap().is_none());
    assert!(keys.verify(UNKNOWN_KEY).await.unwrap().is_none());
    assert_eq!(checkouts(&pool), before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_one_wrong_key_costs_at_most_one_query() {
    let (_db, pool) = setup().await;
    let keys = ApiKeys::new(pool.clone(), DEFAULT_VERIFY_TTL);
    let before = checkouts(&pool);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let keys = keys.clone();
            tokio::spawn(async move { keys.verify(UNKNOWN_KEY).await })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().unwrap().is_none());
    }
    let spent = checkouts(&pool) - before;
    assert!(spent <= 1, "{spent} checkouts for one wrong key");
}

#[tokio::test]
async fn a_key_revoked_elsewhere_works_until_the_ttl_then_stops() {
    let (_db, pool) = setup().await;
    let ttl = Duration::from_millis(300);
    let here = ApiKeys::new(pool.clone(), ttl);
    let elsewhere = ApiKeys::new(pool.clone(), ttl);
    let (key, info) = here.create("app", &[Scope::Read]).await.unwrap();
    assert!(here.verify(key.expose_secret()).await.unwrap().is_some());

    assert_eq!(elsewhere.revoke("app").await.unwrap(), 1);
    // Still trusted from this instance's cache...
    assert!(here.verify(key.expose_secret()).await.unwrap().is_some());
    // ...but not by the one that revoked it,
    assert!(elsewhere
        .verify(key.expose_secret())
        .await
        .unwrap()
        .is_none());
    // ...and not here once the TTL has passed.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert!(here.verify(key.expose_secret()).await.unwrap().is_none());

    // Revoking again (by id) matches nothing.
    assert_eq!(here.revoke(&info.id.to_string()).await.unwrap(), 0);
}

#[tokio::test]
async fn revoking_clears_the_local_cache_at_once() {
    let (_db, pool) = setup().await;
    let keys = ApiKeys::new(pool, DEFAULT_VERIFY_TTL);
    let (key, info) = keys.create("app", &[Scope::Admin]).await.unwrap();
    assert!(keys.verify(key.expose_secret()).await.unwrap().is_some());
    assert_eq!(keys.revoke(&info.id.to_string()).await.unwrap(), 1);
    assert!(keys.verify(key.expose_secret()).await.unwrap().is_none());
    assert_eq!(keys.revoke("app").await.unwrap(), 0);
    assert_eq!(keys.revoke("99999999999999999999999").await.unwrap(), 0);
}

#[tokio::test]
async fn only_the_hash_and_a_short_prefix_are_stored() {
    let (db, pool) = setup().await;
    let keys = ApiKeys::new(pool, DEFAULT_VERIFY_TTL);
    let (key, _) = keys.create("app", &[Scope::Credentials]).await.unwrap();
    let key = key.expose_secret();

    let client = db.connect().await;
    let row = client
        .query_one(
            "SELECT row_to_json(k)::text, key_hash, prefix FROM api_keys k",
            &[],
        )
        .await
        .unwrap();
    let all: String = row.get(0);
    let hash: Vec<u8> = row.get(1);
    let prefix: String = row.get(2);
    assert!(!all.contains(key), "{all}");
    assert!(!all.contains(&key[10..]), "{all}");
    assert_eq!(hash, Sha256::digest(key.as_bytes()).to_vec());
    assert_eq!(prefix, key[..10]);
}

#[tokio::test]
async fn a_duplicate_active_name_is_refused_until_the_first_is_revoked() {
    let (_db, pool) = setup().await;
    let keys = ApiKeys::new(pool, DEFAULT_VERIFY_TTL);
    keys.create("app", &[Scope::Read]).await.unwrap();
    let err = keys.create("app", &[Scope::Write]).await.unwrap_err();
    assert!(matches!(err, AuthError::DuplicateName(ref n) if n == "app"));
    assert_eq!(
        err.to_string(),
        "an active key named 'app' exists; revoke it first or pick another name"
    );
    assert!(!err.is_invalid_input());

    assert_eq!(keys.revoke("app").await.unwrap(), 1);
    let (_, again) = keys.create("app", &[Scope::Write]).await.unwrap();
    assert_eq!(again.scopes, vec![Scope::Write]);
    let listed = keys.list().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed[0].revoked_at.is_some() && listed[1].revoked_at.is_none());
}

#[tokio::test]
async fn names_and_scopes_are_validated_before_the_database() {
    let (_db, pool) = setup().await;
    let keys = ApiKeys::new(pool.clone(), DEFAULT_VERIFY_TTL);
    let before = checkouts(&pool);
    for name in ["", "42", "with space", &"x".repeat(65)] {
        let err = keys.create(name, &[Scope::Read]).await.unwrap_err();
        assert!(matches!(err, AuthError::InvalidName(_)), "{name}: {err}");
        assert!(err.is_invalid_input());
    }
    let err = keys.create("app", &[]).await.unwrap_err();
    assert!(matches!(err, AuthError::NoScopes));
    assert!(err.to_string().contains("read, write, credentials, admin"));
    assert_eq!(checkouts(&pool), before);

    let err = "owner".parse::<Scope>().unwrap_err().to_string();
    assert!(
        err.contains("'owner'") && err.contains("read, write, credentials, admin"),
        "{err}"
    );
}

// ---- the binary ----

fn cli(args: &[&str], url: &str) -> Output {
    cli::run_against(url, "api-key", args)
}

/// Creates a key through the binary on a fresh (unmigrated) database and
/// returns it.
fn cli_create(url: &str, name: &str, scopes: &str) -> String {
    let out = cli(&["create", "--name", name, "--scopes", scopes], url);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.ends_with('\n'), "{text:?}");
    let last = text.lines().last().unwrap().to_string();
    assert_eq!(last.trim(), last);
    last
}

#[tokio::test]
async fn cli_create_prints_the_key_alone_on_the_last_line_and_it_verifies() {
    let db = TestDatabase::create().await;
    let key = cli_create(&db.url, "ci", "read,credentials");
    let pool = Pool::new(PoolConfig::parse(&db.url).unwrap()).unwrap();
    let info = ApiKeys::new(pool, DEFAULT_VERIFY_TTL)
        .verify(&key)
        .await
        .unwrap()
        .expect("the printed key verifies");
    assert_eq!(info.name, "ci");
    assert_eq!(info.scopes, vec![Scope::Read, Scope::Credentials]);

    let dup = cli(&["create", "--name", "ci", "--scopes", "read"], &db.url);
    assert_eq!(dup.status.code(), Some(1));
    assert!(
        stderr(&dup).contains("an active key named 'ci' exists"),
        "{}",
        stderr(&dup)
    );
    assert!(stdout(&dup).is_empty());
}

#[tokio::test]
async fn cli_list_shows_names_and_prefixes_never_the_key() {
    let db = TestDatabase::create().await;
    let key = cli_create(&db.url, "ci", "read");
    cli_create(&db.url, "ops", "admin,write");

    let out = cli(&["list"], &db.url);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let all = table.clone() + &stderr(&out);
    assert!(!all.contains(&key[10..]), "{all}");
    assert!(
        table.contains("NAME") && table.contains("PREFIX"),
        "{table}"
    );
    let ci = table.lines().find(|l| l.contains(" ci ")).expect("ci row");
    assert!(ci.contains(&key[..10]) && ci.contains("read"), "{ci}");
    let ops = table
        .lines()
        .find(|l| l.contains(" ops "))
        .expect("ops row");
    assert!(ops.contains("write,admin"), "{ops}");

    let out = cli(&["list", "--json"], &db.url);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains(&key[10..]));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["name"], "ci");
    assert_eq!(json[0]["prefix"], key[..10]);
    assert_eq!(json[0]["scopes"], serde_json::json!(["read"]));
    assert_eq!(json[0]["revoked_at"], serde_json::Value::Null);
    assert_eq!(json[1]["scopes"], serde_json::json!(["write", "admin"]));
}

#[tokio::test]
async fn cli_revoke_works_once_and_then_exits_1() {
    let db = TestDatabase::create().await;
    let key = cli_create(&db.url, "ci", "read");
    let out = cli(&["revoke", "ci"], &db.url);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("revoked API key 'ci'"));

    let again = cli(&["revoke", "ci"], &db.url);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("no active API key has the id or name 'ci'"),
        "{}",
        stderr(&again)
    );

    let pool = Pool::new(PoolConfig::parse(&db.url).unwrap()).unwrap();
    let keys = ApiKeys::new(pool, DEFAULT_VERIFY_TTL);
    assert!(keys.verify(&key).await.unwrap().is_none());
    let listed = keys.list().await.unwrap();
    assert!(listed[0].revoked_at.is_some());

    // By id.
    cli_create(&db.url, "ci", "read");
    let id = keys.list().await.unwrap()[1].id.to_string();
    assert!(cli(&["revoke", &id], &db.url).status.success());
    assert_eq!(cli(&["revoke", &id], &db.url).status.code(), Some(1));
}

#[test]
fn cli_bad_scopes_and_names_exit_2_before_connecting() {
    // Nothing listens on port 1: input errors must come first.
    let url = "postgresql://postgres@127.0.0.1:1/db?sslmode=disable";
    let out = cli(&["create", "--name", "ci", "--scopes", "read,owner"], url);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("'owner'") && err.contains("read, write, credentials, admin"),
        "{err}"
    );

    let out = cli(&["create", "--name", "bad name", "--scopes", "read"], url);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid API key name"),
        "{}",
        stderr(&out)
    );

    let out = cli(&["create", "--name", "ci"], url);
    assert_eq!(out.status.code(), Some(2));

    let out = cli(&["create", "--name", "ci", "--scopes", "read"], url);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("P1001"), "{}", stderr(&out));
}

#[test]
fn cli_help_explains_each_option() {
    let help = stdout(&cli(&["create", "--help"], "postgresql://h/db"));
    for word in ["--name", "--scopes", "credentials", "--database-url"] {
        assert!(help.contains(word), "{help}");
    }
    let help = stdout(&cli(&["--help"], "postgresql://h/db"));
    for word in ["create", "list", "revoke"] {
        assert!(help.contains(word), "{help}");
    }
}

#[test]
fn without_database_url_an_invalid_profile_is_refused_before_any_server_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let out = cli::run(
        &["api-key", "list", "--data-dir", data_dir.to_str().unwrap()],
        &[("DATABASE_PROFILE", "bogus")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("bogus"), "{}", stderr(&out));
    assert!(
        !data_dir.exists(),
        "no database created for an invalid command"
    );
}
