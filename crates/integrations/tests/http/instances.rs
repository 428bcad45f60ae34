//! Two `serve` processes on one database behave like one: the change feed
//! (LISTEN/NOTIFY) drops what another instance changed from each cache, and
//! while an instance's listener is down its caches are not used.

use std::time::Duration;

use db_pool::testing::{with_params, Fault, FaultProxy, PgBouncer};
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{eventually, metric, TestApp};

/// Far longer than any of these conditions takes, so a failure shows
/// instead of hanging the run.
const WAIT: Duration = Duration::from_secs(15);

async fn value(app: &TestApp, name: &str) -> f64 {
    metric(app, name).await.unwrap_or(0.0)
}

async fn listening(app: &TestApp, connected: bool) -> bool {
    let want = if connected { 1.0 } else { 0.0 };
    eventually(WAIT, || async {
        (metric(app, "integrations_change_listener_connected").await == Some(want)).then_some(())
    })
    .await
    .is_some()
}

/// The accounts `user` has, as `app` lists them.
async fn accounts(app: &TestApp, user: &str) -> Vec<String> {
    let reply = app
        .get(
            &format!("/v1/users/{user}/integrations"),
            Some(&app.keys.read),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json()["integrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["account_id"].as_str().unwrap().to_string())
        .collect()
}

async fn hits(app: &TestApp) -> f64 {
    value(app, "integrations_status_cache_hits_total").await
}

async fn received(app: &TestApp, kind: &str) -> f64 {
    value(
        app,
        &format!("integrations_invalidations_received_total{{kind=\"{kind}\"}}"),
    )
    .await
}

/// Waits until `app` has received more than `before` notifications of `kind`.
async fn heard(app: &TestApp, kind: &str, before: f64) -> bool {
    eventually(WAIT, || async {
        (received(app, kind).await > before).then_some(())
    })
    .await
    .is_some()
}

/// Reads `user`'s list on `app` until a read is a cache hit (so what `app`
/// shows next would come from its cache, were it stale). A notification of
/// a write just made may still arrive and drop the first read's entry:
/// then the next pair of reads caches it again.
async fn cached(app: &TestApp, user: &str) -> Vec<String> {
    let hit = eventually(WAIT, || async {
        let first = accounts(app, user).await;
        let before = hits(app).await;
        let again = accounts(app, user).await;
        (again == first && hits(app).await > before).then_some(first)
    })
    .await;
    hit.expect("a second read is served from the cache")
}

async fn two_instances() -> (TestApp, TestApp) {
    let a = TestApp::spawn_with_params("connection_limit=5&application_name=inst_a").await;
    let url = with_params(
        &a.db.as_ref().unwrap().url,
        "connection_limit=5&application_name=inst_b",
    );
    let b = a.spawn_beside(&url, &[], &[]).await;
    assert!(listening(&a, true).await && listening(&b, true).await);
    (a, b)
}

#[tokio::test]
async fn writes_through_one_instance_are_seen_by_the_other() {
    let (a, b) = two_instances().await;
    a.seed("user-1", "good", "acct-1", 3600).await;
    a.seed("user-1", "good", "acct-2", 3600).await;
    assert_eq!(cached(&b, "user-1").await, ["acct-1", "acct-2"]);

    // A delete through A: B hears it and no longer lists the account.
    let before = received(&b, "integration").await;
    let reply = a
        .send(
            Method::DELETE,
            "/v1/users/user-1/integrations/good/acct-1",
            Some(&a.keys.all),
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(heard(&b, "integration", before).await);
    assert_eq!(accounts(&b, "user-1").await, ["acct-2"]);
    // A does not count its own write as news (it forgot the entry itself).
    assert_eq!(received(&a, "integration").await, 0.0);

    // A refresh through A changes the expiry B shows.
    let shown = |list: Value| list["integrations"][0]["expires_at"].clone();
    let path = "/v1/users/user-1/integrations";
    cached(&b, "user-1").await;
    let expiry_before = shown(b.get(path, Some(&b.keys.read)).await.json());
    let before = received(&b, "integration").await;
    let reply = a
        .send(
            Method::POST,
            "/v1/integrations/good/acct-2/refresh",
            Some(&a.keys.all),
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(heard(&b, "integration", before).await);
    let expiry_after = shown(b.get(path, Some(&b.keys.read)).await.json());
    assert_ne!(expiry_after, expiry_before, "B shows the refreshed expiry");

    // A key revoked through the CLI stops working on B, which had it cached.
    let key = crate::common::create_key(
        &a.db.as_ref().unwrap().url,
        "short-lived",
        &[integrations::service::api_keys::Scope::Read],
    )
    .await;
    for _ in 0..2 {
        assert_eq!(b.get(path, Some(&key)).await.status, 200);
    }
    let before = received(&b, "api_key").await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_integrations"))
        .args(["api-key", "revoke", "short-lived"])
        .env("DATABASE_URL", &a.db.as_ref().unwrap().url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(heard(&b, "api_key", before).await);
    assert_eq!(b.get(path, Some(&key)).await.status, 401);
}

#[tokio::test]
async fn while_its_listener_is_down_an_instance_reads_through_then_caches_again() {
    let a = TestApp::spawn_with_params("connection_limit=5").await;
    let db_url = a.db.as_ref().unwrap().url.clone();
    // B listens through a proxy the test can cut; its pool goes direct.
    let proxy = FaultProxy::start(&db_url).await;
    let b = a
        .spawn_beside(
            &with_params(&db_url, "connection_limit=5"),
            &[("DIRECT_URL", &proxy.url(&db_url))],
            &[],
        )
        .await;
    assert!(listening(&b, true).await);
    a.seed("user-1", "good", "acct-1", 3600).await;
    assert_eq!(cached(&b, "user-1").await, ["acct-1"]);

    // The listener is lost and cannot come back.
    proxy.set(Fault::Reset);
    assert!(listening(&b, false).await);
    assert!(b
        .server
        .wait_for_log(|l| l.contains("change listener lost"), WAIT)
        .await
        .is_some());
    // A write B cannot hear of is visible on B at once: B reads through.
    a.seed("user-1", "good", "acct-2", 3600).await;
    let before = hits(&b).await;
    assert_eq!(accounts(&b, "user-1").await, ["acct-1", "acct-2"]);
    assert_eq!(accounts(&b, "user-1").await, ["acct-1", "acct-2"]);
    assert_eq!(hits(&b).await, before, "no read is served from the cache");

    // Back: B listens again, forgets what it had, and serves hits again.
    proxy.set(Fault::Pass);
    assert!(listening(&b, true).await);
    assert_eq!(cached(&b, "user-1").await, ["acct-1", "acct-2"]);
}

#[tokio::test]
async fn a_terminated_listener_reconnects() {
    let (a, b) = two_instances().await;
    let admin = a.db.as_ref().unwrap().connect().await;
    let terminated: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'inst_b' \
             AND query LIKE 'LISTEN %'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(terminated, 1, "B has one listening connection");
    assert!(b
        .server
        .wait_for_log(|l| l.contains("change listener connected again"), WAIT)
        .await
        .is_some());
    // And hears writes again.
    a.seed("user-1", "good", "acct-1", 3600).await;
    assert_eq!(cached(&b, "user-1").await, ["acct-1"]);
    let before = received(&b, "integration").await;
    a.put_integration(
        "user-1",
        "good",
        "acct-1",
        json!({"access_token": "at-new", "expires_in": 60, "scope": "write"}),
    )
    .await;
    assert!(heard(&b, "integration", before).await);
}

#[tokio::test]
async fn behind_pgbouncer_with_direct_url_instances_stay_consistent() {
    let a = TestApp::spawn_with_params("connection_limit=5").await;
    let db = a.db.as_ref().unwrap();
    let bouncer = PgBouncer::start(&db.url, "transaction", 5).await;
    let database = db
        .url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap();
    let pooled = bouncer.url(database, "pgbouncer=true&connection_limit=5");
    let b = a
        .spawn_beside(&pooled, &[("DIRECT_URL", &db.url)], &[])
        .await;
    let c = a
        .spawn_beside(&pooled, &[("DIRECT_URL", &db.url)], &[])
        .await;
    assert!(listening(&b, true).await && listening(&c, true).await);

    // Writes through one PgBouncer'd instance, reads cached on the other.
    b.seed("user-1", "good", "acct-1", 3600).await;
    b.seed("user-1", "good", "acct-2", 3600).await;
    assert_eq!(cached(&c, "user-1").await, ["acct-1", "acct-2"]);
    let before = received(&c, "integration").await;
    let reply = b
        .send(
            Method::DELETE,
            "/v1/users/user-1/integrations/good/acct-2",
            Some(&b.keys.all),
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(heard(&c, "integration", before).await);
    assert_eq!(accounts(&c, "user-1").await, ["acct-1"]);
}

#[tokio::test]
async fn a_refresh_by_another_instances_background_refresher_is_seen() {
    let (a, b) = two_instances().await;
    // Due for refresh (inside the 5-minute margin), but no instance runs
    // the refresher yet.
    a.seed("user-1", "good", "acct-1", 120).await;
    let path = "/v1/users/user-1/integrations";
    let expiry = |list: Value| list["integrations"][0]["expires_at"].clone();
    cached(&b, "user-1").await;
    let seeded = expiry(b.get(path, Some(&b.keys.read)).await.json());
    let refreshed = |list: Value| expiry(list) != seeded;

    // A third instance whose background refresher refreshes it.
    let before = received(&b, "integration").await;
    let url = with_params(&a.db.as_ref().unwrap().url, "connection_limit=5");
    let _refresher = a
        .spawn_beside(
            &url,
            &[("INTEGRATIONS_REFRESH_INTERVAL", "1")],
            &[crate::common::RUN_REFRESHER],
        )
        .await;
    assert!(heard(&b, "integration", before).await);
    let shown = eventually(WAIT, || async {
        let list = b.get(path, Some(&b.keys.read)).await.json();
        refreshed(list.clone()).then_some(list)
    })
    .await;
    assert!(shown.is_some(), "B shows the background refresh");
}
