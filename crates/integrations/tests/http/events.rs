//! `GET /v1/events` through the real server: the events of PUT, a refresh
//! answered `invalid_grant`, PUT again and DELETE; pages that return every
//! event exactly once, across two instances and with a writer that commits
//! a lower id later; parameters refused naming themselves.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

use crate::common::{with_params, Mode, TestApp};

/// One page: (events, next_cursor).
async fn page(app: &TestApp, query: &str) -> (Vec<Value>, String) {
    let reply = app
        .get(&format!("/v1/events{query}"), Some(&app.keys.read))
        .await;
    assert_eq!(reply.status, 200, "{query}: {}", reply.text);
    let body = reply.json();
    let cursor = body["next_cursor"].as_str().unwrap().to_string();
    assert!(!cursor.is_empty());
    (body["events"].as_array().unwrap().clone(), cursor)
}

/// Pages (each call to `next` picks the instance) from `after` with
/// `limit` until `want` events came or 20 s passed; every page at most
/// `limit` long.
async fn poll(
    apps: &[&TestApp],
    mut after: Option<String>,
    limit: usize,
    want: usize,
) -> (Vec<Value>, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let mut i = 0;
    loop {
        let query = match &after {
            Some(a) => format!("?limit={limit}&after={a}"),
            None => format!("?limit={limit}"),
        };
        let (events, cursor) = page(apps[i % apps.len()], &query).await;
        i += 1;
        assert!(events.len() <= limit);
        let empty = events.is_empty();
        seen.extend(events);
        after = Some(cursor.clone());
        if seen.len() >= want || (empty && Instant::now() > deadline) {
            return (seen, cursor);
        }
        if empty {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Every event id in the database, in order.
async fn all_ids(app: &TestApp) -> Vec<i64> {
    app.db
        .as_ref()
        .unwrap()
        .connect()
        .await
        .query("SELECT id FROM events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn put_refresh_put_again_and_delete_are_events_paged_exactly_once() {
    let app = TestApp::spawn().await;
    app.seed("u1", "good", "acct", 3600).await;
    // Refused by the provider: revoked.
    app.fake.set_mode("good", Mode::InvalidGrant);
    let reply = app
        .send(
            Method::POST,
            "/v1/integrations/good/acct/refresh",
            Some(&app.keys.all),
            None,
        )
        .await;
    assert_eq!(reply.status, 409, "{}", reply.text);
    // The application connects it again, then deletes it.
    app.seed("u1", "good", "acct", 3600).await;
    for i in 0..4 {
        app.seed("u2", "good", &format!("other{i}"), 3600).await;
    }
    let reply = app
        .send(
            Method::DELETE,
            "/v1/users/u1/integrations/good/acct",
            Some(&app.keys.all),
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    let (events, cursor) = poll(&[&app], None, 3, 8).await;
    let ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, all_ids(&app).await, "every event once, in order");
    let mine: Vec<(&str, &str, &str)> = events
        .iter()
        .filter(|e| e["data"]["account_id"] == "acct")
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["data"]["status"].as_str().unwrap_or("null"),
                e["data"]["previous_status"].as_str().unwrap_or("null"),
            )
        })
        .collect();
    assert_eq!(
        mine,
        [
            ("integration.connected", "connected", "null"),
            ("integration.revoked", "revoked", "connected"),
            ("integration.reconnected", "connected", "revoked"),
            ("integration.deleted", "null", "connected"),
        ]
    );
    let revoked = &events[1];
    assert_eq!(revoked["data"]["error"]["code"], "invalid_grant");
    assert!(revoked["data"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("token revoked"));
    // Caught up: an empty page still gives a cursor to go on with.
    let (empty, next) = page(&app, &format!("?after={cursor}")).await;
    assert!(empty.is_empty(), "{empty:?}");
    app.seed("u3", "good", "late", 3600).await;
    let (late, _) = poll(&[&app], Some(next), 100, 1).await;
    assert_eq!(late.len(), 1);
    assert_eq!(late[0]["data"]["account_id"], "late");
    // Only one type.
    let (deleted, _) = page(&app, "?type=integration.deleted").await;
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0]["type"], "integration.deleted");
    // No token, key or secret in any answer or log line.
    app.assert_no_leaks();
}

#[tokio::test]
async fn two_instances_page_every_event_once_even_when_a_lower_id_commits_later() {
    let one = TestApp::spawn().await;
    let url = with_params(&one.db.as_ref().unwrap().url, "connection_limit=5");
    let two = one.spawn_beside(&url, &[], &[]).await;
    for i in 0..5 {
        one.seed("u1", "good", &format!("a{i}"), 3600).await;
        two.seed("u2", "good", &format!("b{i}"), 3600).await;
    }
    // Pages alternate between the instances: one cursor for both.
    let (first, cursor) = poll(&[&one, &two], None, 3, 10).await;
    assert_eq!(first.len(), 10);
    // A writer takes the next id and stays open; instance two's write
    // takes a higher one and commits first.
    let writer = one.db.as_ref().unwrap().connect().await;
    writer
        .batch_execute(
            "BEGIN; UPDATE integrations SET status = 'revoked', refresh_failures = 1 \
             WHERE account_id = 'a0'",
        )
        .await
        .unwrap();
    two.seed("u2", "good", "b-late", 3600).await;
    let (meanwhile, cursor) = page(&one, &format!("?after={cursor}")).await;
    assert!(
        meanwhile.is_empty(),
        "nothing past the open transaction: {meanwhile:?}"
    );
    writer.batch_execute("COMMIT").await.unwrap();
    let (rest, _) = poll(&[&two, &one], Some(cursor), 3, 2).await;
    let got: Vec<(&str, &str)> = rest
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["data"]["account_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("integration.revoked", "a0"),
            ("integration.connected", "b-late")
        ]
    );
    let ids: BTreeSet<i64> = first
        .iter()
        .chain(&rest)
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 12, "no event twice");
    assert_eq!(
        ids.into_iter().collect::<Vec<_>>(),
        all_ids(&one).await,
        "and none missed"
    );
}

#[tokio::test]
async fn bad_parameters_are_refused_naming_them() {
    let app = TestApp::spawn().await;
    let key = Some(app.keys.read.as_str());
    for (query, names) in [
        ("?after=not-a-cursor", "after"),
        ("?after=", "after"),
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=ten", "limit"),
        ("?type=connected", "type"),
        ("?type=integration.bogus", "type"),
    ] {
        let reply = app.get(&format!("/v1/events{query}"), key).await;
        let message = reply.assert_error(400, "invalid_request");
        assert!(message.starts_with(names), "{query}: {message}");
        assert!(message.contains("accepted"), "{query}: {message}");
    }
    // What the document promises is what the server takes.
    let doc = app.get("/openapi.json", None).await.json();
    let params = doc["paths"]["/v1/events"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .clone();
    let param = |name: &str| {
        params
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {params:?}"))
            .clone()
    };
    assert_eq!(
        param("after")["schema"]["pattern"],
        integrations::domain::EventCursor::PATTERN
    );
    assert_eq!(param("limit")["schema"]["maximum"], 1000);
    let types = param("type").to_string();
    for t in integrations::domain::EventType::ALL {
        assert!(
            types.contains(t.as_str()) || doc.to_string().contains(t.as_str()),
            "{t:?}"
        );
    }
    let (events, _) = page(&app, "?limit=1000&type=integration.recovered").await;
    assert!(events.is_empty());
    app.get("/v1/events", None)
        .await
        .assert_error(401, "unauthorized");
    app.assert_no_leaks();
}

#[tokio::test]
async fn serve_purges_events_older_than_integrations_event_retention() {
    let one = TestApp::spawn().await;
    one.seed("u1", "good", "recent", 3600).await;
    let db = one.db.as_ref().unwrap();
    db.connect()
        .await
        .batch_execute(
            "INSERT INTO events (type, created_at, integration_id, user_id, provider, account_id, status, refresh_failures) \
             SELECT 'integration.connected', now() - interval '2 hours', i, 'old', 'good', 'old' || i, 'connected', 0 \
             FROM generate_series(1, 2500) i",
        )
        .await
        .unwrap();
    // The first instance keeps 7 days; one keeping an hour purges at start.
    let url = with_params(&db.url, "connection_limit=5");
    let two = one
        .spawn_beside(&url, &[("INTEGRATIONS_EVENT_RETENTION", "3600")], &[])
        .await;
    let line = two
        .server
        .wait_for_log(
            |l| l.contains("expired events purged"),
            Duration::from_secs(30),
        )
        .await
        .expect("the purge ran");
    assert!(line.contains("purged=2500"), "{line}");
    let left: Vec<String> = db
        .connect()
        .await
        .query("SELECT account_id FROM events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["recent"]);
}
