//! Events: written by the triggers in the same transaction as each change,
//! one per change that is news (none per routine refresh), and paged with
//! a cursor that never skips one, even when a transaction holding a lower
//! id commits after a later one.

use std::time::{Duration, Instant};

use integrations::crypto::Keyring;
use integrations::domain::{Event, EventCursor, EventType};
use integrations::service::{IntegrationsService, ServiceConfig};

use crate::common::{account_id, provider_name, user_id, Mode, TestService};

/// Every event in the table, by id: (type, status, previous_status,
/// refresh_failures, error code, error message). Read directly, so what
/// is (or is not) there does not depend on the poll's horizon.
async fn recorded(
    t: &TestService,
) -> Vec<(
    String,
    Option<String>,
    Option<String>,
    i32,
    Option<String>,
    Option<String>,
)> {
    t.db.connect()
        .await
        .query(
            "SELECT type, status, previous_status, refresh_failures, error_code, error_message \
             FROM events ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect()
}

async fn types(t: &TestService) -> Vec<String> {
    recorded(t).await.into_iter().map(|e| e.0).collect()
}

/// Polls from `after` with pages of `limit` until `want` events came (or
/// 20 s passed: another test's transaction on the same server can hold
/// the horizon back for a moment); returns them and the last cursor.
async fn poll_until(
    service: &IntegrationsService,
    mut after: Option<EventCursor>,
    limit: i64,
    want: usize,
) -> (Vec<Event>, EventCursor) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let page = service.events(after, limit, None).await.unwrap();
        assert!(page.events.len() as i64 <= limit);
        if let Some(a) = after {
            assert!(page.next_cursor >= a, "the cursor never goes back");
        }
        after = Some(page.next_cursor);
        let empty = page.events.is_empty();
        seen.extend(page.events);
        if seen.len() >= want || (empty && Instant::now() > deadline) {
            return (seen, page.next_cursor);
        }
        if empty {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn invalid_grant_produces_revoked_with_the_providers_error() {
    let t = TestService::start().await;
    t.seed("u1", "good", "gone", 3600).await;
    t.fake.set_mode("good", Mode::InvalidGrant);
    let (p, a) = (provider_name("good"), account_id("gone"));
    t.service.refresh(&p, &a).await.unwrap_err();
    let events = recorded(&t).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].0, "integration.connected");
    let (kind, status, previous, failures, code, message) = events[1].clone();
    assert_eq!(kind, "integration.revoked");
    assert_eq!(
        (status.as_deref(), previous.as_deref(), failures),
        (Some("revoked"), Some("connected"), 1)
    );
    assert_eq!(code.as_deref(), Some("invalid_grant"));
    let message = message.unwrap();
    assert!(message.contains("token revoked"), "{message}");
    assert!(!message.contains("rt-seed"), "never a token: {message}");

    // The same, as the API pages it.
    let (page, _) = poll_until(&t.service, None, 100, 2).await;
    let revoked = serde_json::to_value(&page[1]).unwrap();
    assert_eq!(revoked["type"], "integration.revoked");
    assert_eq!(revoked["data"]["user_id"], "u1");
    assert_eq!(revoked["data"]["provider"], "good");
    assert_eq!(revoked["data"]["account_id"], "gone");
    assert_eq!(revoked["data"]["status"], "revoked");
    assert_eq!(revoked["data"]["previous_status"], "connected");
    assert_eq!(revoked["data"]["refresh_failures"], 1);
    assert_eq!(revoked["data"]["error"]["code"], "invalid_grant");
    assert!(revoked["data"]["expires_at"].is_string(), "{revoked}");
    assert!(revoked["id"].is_i64() && revoked["created_at"].is_string());
    let keys: Vec<&String> = revoked["data"].as_object().unwrap().keys().collect();
    assert_eq!(
        keys.len(),
        8,
        "user_id, provider, account_id, status, previous_status, refresh_failures, error, expires_at: {keys:?}"
    );
}

#[tokio::test]
async fn five_failures_produce_refresh_failed_events_then_error_then_recovered() {
    let config = ServiceConfig {
        max_failures: 5,
        failure_backoff: Duration::from_millis(1),
        ..Default::default()
    };
    let t = TestService::start_with("connection_limit=5", config).await;
    t.seed("u1", "bad", "flaky", 3600).await;
    t.fake.set_mode("bad", Mode::ServerError);
    let (p, a) = (provider_name("bad"), account_id("flaky"));
    for _ in 0..5 {
        t.service.refresh(&p, &a).await.unwrap_err();
    }
    let events = recorded(&t).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "integration.connected",
            "integration.refresh_failed",
            "integration.refresh_failed",
            "integration.refresh_failed",
            "integration.refresh_failed",
            "integration.error",
        ]
    );
    for (i, e) in events[1..].iter().enumerate() {
        assert_eq!(e.3, i as i32 + 1, "failures counted: {e:?}");
        assert_eq!(e.4.as_deref(), Some("temporary_failure"), "{e:?}");
        assert!(e.5.as_deref().unwrap().contains("500"), "{e:?}");
    }
    assert_eq!(
        (events[5].1.as_deref(), events[5].2.as_deref()),
        (Some("error"), Some("connected"))
    );
    // The provider is back: one refresh recovers it.
    t.fake.set_mode("bad", Mode::Rotate);
    t.service.refresh(&p, &a).await.unwrap();
    let events = recorded(&t).await;
    assert_eq!(events.len(), 7, "{events:?}");
    assert_eq!(
        events[6],
        (
            "integration.recovered".to_string(),
            Some("connected".to_string()),
            Some("error".to_string()),
            0,
            None,
            None
        )
    );
}

#[tokio::test]
async fn a_success_after_failures_produces_recovered() {
    let config = ServiceConfig {
        failure_backoff: Duration::from_millis(1),
        ..Default::default()
    };
    let t = TestService::start_with("connection_limit=5", config).await;
    t.seed("u1", "bad", "flaky", 3600).await;
    t.fake.set_mode("bad", Mode::ServerError);
    let (p, a) = (provider_name("bad"), account_id("flaky"));
    t.service.refresh(&p, &a).await.unwrap_err();
    t.service.refresh(&p, &a).await.unwrap_err();
    t.fake.set_mode("bad", Mode::Rotate);
    t.service.refresh(&p, &a).await.unwrap();
    let events = recorded(&t).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "integration.connected",
            "integration.refresh_failed",
            "integration.refresh_failed",
            "integration.recovered",
        ]
    );
    let recovered = &events[3];
    assert_eq!(
        (recovered.1.as_deref(), recovered.2.as_deref(), recovered.3),
        (Some("connected"), Some("connected"), 0)
    );
    assert_eq!(
        (recovered.4.as_deref(), recovered.5.as_deref()),
        (None, None)
    );
}

#[tokio::test]
async fn storing_again_after_revoked_is_reconnected_and_a_healthy_restore_is_no_event() {
    let t = TestService::start().await;
    t.seed("u1", "good", "acct", 3600).await;
    assert_eq!(types(&t).await, ["integration.connected"]);
    // Stored again while healthy: traffic, not news.
    t.seed("u1", "good", "acct", 3600).await;
    assert_eq!(types(&t).await, ["integration.connected"]);
    t.fake.set_mode("good", Mode::InvalidGrant);
    t.service
        .refresh(&provider_name("good"), &account_id("acct"))
        .await
        .unwrap_err();
    t.seed("u1", "good", "acct", 3600).await;
    let events = recorded(&t).await;
    assert_eq!(
        events.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        [
            "integration.connected",
            "integration.revoked",
            "integration.reconnected"
        ]
    );
    assert_eq!(
        events[2],
        (
            "integration.reconnected".to_string(),
            Some("connected".to_string()),
            Some("revoked".to_string()),
            0,
            None,
            None
        )
    );
    assert_eq!(
        (events[0].1.as_deref(), events[0].2.as_deref()),
        (Some("connected"), None),
        "connected: no previous status"
    );
}

#[tokio::test]
async fn delete_produces_deleted() {
    let t = TestService::start().await;
    t.seed("u1", "good", "acct", 3600).await;
    t.service
        .disconnect(&user_id("u1"), &provider_name("good"), &account_id("acct"))
        .await
        .unwrap()
        .unwrap();
    let events = recorded(&t).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        events[1],
        (
            "integration.deleted".to_string(),
            None,
            Some("connected".to_string()),
            0,
            None,
            None
        )
    );
}

#[tokio::test]
async fn a_successful_refresh_or_a_key_rotation_produces_no_event() {
    let t = TestService::start().await;
    t.seed("u1", "good", "acct", 3600).await;
    let (p, a) = (provider_name("good"), account_id("acct"));
    for _ in 0..3 {
        t.service.refresh(&p, &a).await.unwrap();
    }
    // The background refresher's path too.
    t.seed("u1", "good", "due", 60).await;
    let report = t
        .service
        .refresh_due(&Default::default(), &Default::default())
        .await
        .unwrap();
    assert!(report.refreshed >= 1, "{report:?}");
    // Nor does rewriting every row under a new key.
    let keys = format!("{},{}", Keyring::generate_spec("k2"), t.keys);
    let rotated = t.with_keys(&keys, ServiceConfig::default()).await;
    assert_eq!(rotated.rotate_keys(10).await.unwrap().reencrypted, 2);
    assert_eq!(
        types(&t).await,
        ["integration.connected", "integration.connected"]
    );
}

#[tokio::test]
async fn a_transaction_that_rolls_back_produces_no_event_and_one_that_commits_does() {
    let t = TestService::start().await;
    t.seed("u1", "good", "acct", 3600).await;
    let client = t.db.connect().await;
    client
        .batch_execute(
            "BEGIN; UPDATE integrations SET status = 'revoked' WHERE account_id = 'acct'; \
             DELETE FROM integrations WHERE account_id = 'acct'; ROLLBACK",
        )
        .await
        .unwrap();
    assert_eq!(types(&t).await, ["integration.connected"]);
    // An operator's own SQL, committed: the trigger records it.
    client
        .batch_execute(
            "UPDATE integrations SET status = 'revoked', refresh_failures = 1, \
             last_error = 'revoked by hand' WHERE account_id = 'acct'",
        )
        .await
        .unwrap();
    let events = recorded(&t).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1].0, "integration.revoked");
    // A message without a code (written by hand, or before codes were
    // kept): a generic one.
    assert_eq!(
        (events[1].4.as_deref(), events[1].5.as_deref()),
        (Some("refresh_failed"), Some("revoked by hand"))
    );
}

#[tokio::test]
async fn paging_returns_every_event_exactly_once() {
    let t = TestService::start().await;
    for i in 0..12 {
        t.seed(&format!("u{i}"), "good", &format!("a{i}"), 3600)
            .await;
    }
    for i in 0..5 {
        t.service
            .disconnect(
                &user_id(&format!("u{i}")),
                &provider_name("good"),
                &account_id(&format!("a{i}")),
            )
            .await
            .unwrap();
    }
    let (seen, cursor) = poll_until(&t.service, None, 5, 17).await;
    let ids: Vec<i64> = seen.iter().map(|e| e.id).collect();
    let all: Vec<i64> =
        t.db.connect()
            .await
            .query("SELECT id FROM events ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    assert_eq!(ids, all, "every event once, in order");
    // Nothing new: an empty page, and a cursor to keep polling with.
    let page = t.service.events(Some(cursor), 5, None).await.unwrap();
    assert!(page.events.is_empty(), "{:?}", page.events);
    assert!(page.next_cursor >= cursor);
    t.seed("u99", "good", "late", 3600).await;
    let (late, _) = poll_until(&t.service, Some(page.next_cursor), 5, 1).await;
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].data.account_id, "late");
    // A type filter pages only that type.
    let deleted = t
        .service
        .events(None, 100, Some(EventType::Deleted))
        .await
        .unwrap();
    assert_eq!(deleted.events.len(), 5);
    assert!(deleted.events.iter().all(|e| e.kind == EventType::Deleted));
}

#[tokio::test]
async fn an_event_committed_later_with_a_lower_id_is_not_skipped() {
    let t = TestService::start().await;
    t.seed("u1", "good", "early", 3600).await;
    let (start, cursor) = poll_until(&t.service, None, 100, 1).await;
    assert_eq!(start.len(), 1);
    // Writer A takes the next event id and stays open.
    let a = t.db.connect().await;
    a.batch_execute(
        "BEGIN; UPDATE integrations SET status = 'revoked', refresh_failures = 1 \
         WHERE account_id = 'early'",
    )
    .await
    .unwrap();
    // Writer B takes a higher id and commits first.
    t.seed("u2", "good", "later", 3600).await;
    let ids: Vec<i64> =
        t.db.connect()
            .await
            .query("SELECT id FROM events ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    assert_eq!(ids.len(), 2, "B's event committed; A's is not visible yet");
    // A poll now must not hand out B's event and move past A's id.
    let page = t.service.events(Some(cursor), 100, None).await.unwrap();
    assert!(page.events.is_empty(), "{:?}", page.events);
    a.batch_execute("COMMIT").await.unwrap();
    let (after, _) = poll_until(&t.service, Some(page.next_cursor), 100, 2).await;
    let got: Vec<(&str, EventType)> = after
        .iter()
        .map(|e| (e.data.account_id.as_str(), e.kind))
        .collect();
    assert_eq!(
        got,
        [
            ("early", EventType::Revoked),
            ("later", EventType::Connected)
        ],
        "A's event (lower id) arrives, first: its transaction started writing first"
    );
    assert!(
        after[0].id < after[1].id,
        "A's event holds the lower id: {after:?}"
    );
}

#[tokio::test]
async fn events_older_than_the_retention_are_purged_in_batches() {
    let t = TestService::start().await;
    t.seed("u1", "good", "acct", 3600).await;
    let client = t.db.connect().await;
    client
        .batch_execute(
            "INSERT INTO events (type, created_at, integration_id, user_id, provider, account_id, status, refresh_failures) \
             SELECT 'integration.connected', now() - interval '8 days', i, 'old', 'good', 'old' || i, 'connected', 0 \
             FROM generate_series(1, 25) i",
        )
        .await
        .unwrap();
    let week = Duration::from_secs(7 * 24 * 3600);
    let purged = t
        .service
        .purge_events(week, 10, &Default::default())
        .await
        .unwrap();
    assert_eq!(purged, 25, "three batches of at most 10");
    let left: Vec<String> = client
        .query("SELECT user_id FROM events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["u1"], "the recent event stays");
    // Stopped: nothing is deleted.
    client
        .batch_execute("UPDATE events SET created_at = now() - interval '8 days'")
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    stop.cancel();
    assert_eq!(t.service.purge_events(week, 10, &stop).await.unwrap(), 0);
}

#[tokio::test]
async fn one_integrations_events_page_in_the_order_they_happened() {
    let t = TestService::start().await;
    t.seed("u1", "good", "acct", 3600).await;
    // Transaction A gets its id first (as a write elsewhere would give
    // it), B changes the integration and commits, then A changes it too:
    // A's id is the lower, its change the later.
    let a = t.db.connect().await;
    a.batch_execute("BEGIN; SELECT pg_current_xact_id()")
        .await
        .unwrap();
    let b = t.db.connect().await;
    b.batch_execute(
        "UPDATE integrations SET status = 'revoked', refresh_failures = 1, \
         last_error = 'gone', last_error_code = 'invalid_grant' WHERE account_id = 'acct'",
    )
    .await
    .unwrap();
    a.batch_execute(
        "UPDATE integrations SET status = 'connected', refresh_failures = 0, last_error = NULL, \
         last_error_code = NULL, connect_generation = connect_generation + 1 \
         WHERE account_id = 'acct'; COMMIT",
    )
    .await
    .unwrap();
    let (events, _) = poll_until(&t.service, None, 2, 3).await;
    let kinds: Vec<EventType> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventType::Connected,
            EventType::Revoked,
            EventType::Reconnected
        ],
        "{events:?}"
    );
}

/// The connect flow, from start to the application's confirmation, for
/// `account` of `user` on `good`.
async fn connect_through_the_flow(t: &TestService, user: &str, account: &str, code: &str) {
    use secrecy::ExposeSecret;
    let started = t
        .service
        .start_connect(
            &user_id(user),
            &provider_name("good"),
            "https://app.example/done",
        )
        .await
        .unwrap();
    let state = url::Url::parse(&started.authorize_url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    t.fake.authorize(&started.authorize_url, code, account);
    let authorized = t.service.finish_connect(&state, code).await.result.unwrap();
    t.service
        .complete_connect(
            started.flow_id.expose_secret(),
            authorized.completion_code.expose_secret(),
            Some(&user_id(user)),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn the_connect_flow_records_connected_then_reconnected() {
    let config = ServiceConfig {
        callback_url: Some("https://integrations.example/v1/oauth/callback".into()),
        redirect_origins: integrations::service::RedirectOrigins::parse("https://app.example")
            .unwrap(),
        ..ServiceConfig::default()
    };
    let t = TestService::start_with("connection_limit=3", config).await;
    connect_through_the_flow(&t, "u1", "gh-1", "code-1").await;
    t.fake.set_mode("good", Mode::InvalidGrant);
    t.service
        .refresh(&provider_name("good"), &account_id("gh-1"))
        .await
        .unwrap_err();
    t.fake.set_mode("good", Mode::Rotate);
    connect_through_the_flow(&t, "u1", "gh-1", "code-2").await;
    assert_eq!(
        types(&t).await,
        [
            "integration.connected",
            "integration.revoked",
            "integration.reconnected"
        ]
    );
}

/// An event of a type this version does not know (written by a newer one
/// during a rolling upgrade) is left out of the page, but still counts
/// towards it: a page full of rows continues after the last one read,
/// instead of jumping to the horizon past the events it did not return.
#[tokio::test]
async fn an_unknown_event_type_is_skipped_without_skipping_the_events_after_it() {
    let t = TestService::start().await;
    for i in 0..3 {
        t.seed(&format!("u{i}"), "good", &format!("a{i}"), 3600)
            .await;
    }
    let db = t.db.connect().await;
    db.batch_execute(
        "ALTER TABLE events DROP CONSTRAINT events_type_check; \
         UPDATE events SET type = 'integration.from_a_newer_version' \
         WHERE id = (SELECT id FROM events ORDER BY id OFFSET 1 LIMIT 1)",
    )
    .await
    .unwrap();
    let (seen, _) = poll_until(&t.service, None, 2, 2).await;
    let accounts: Vec<&str> = seen.iter().map(|e| e.data.account_id.as_str()).collect();
    assert_eq!(
        accounts,
        ["a0", "a2"],
        "the unknown one left out, none after it"
    );
}
