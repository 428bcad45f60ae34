//! Every endpoint's happy path, through the real server.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{Mode, TestApp, CALLBACK_URL};

/// The operations `/openapi.json` documents: method and path template.
const DOCUMENTED: [(&str, &str); 23] = [
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/users/{user_id}/integrations"),
    (
        "PUT",
        "/v1/users/{user_id}/integrations/{provider}/{account_id}",
    ),
    (
        "DELETE",
        "/v1/users/{user_id}/integrations/{provider}/{account_id}",
    ),
    ("GET", "/v1/integrations/{provider}/{account_id}/token"),
    ("POST", "/v1/integrations/{provider}/{account_id}/refresh"),
    ("POST", "/v1/integrations/refresh"),
    ("POST", "/v1/connect/{provider}"),
    ("POST", "/v1/connect/complete"),
    ("GET", "/v1/oauth/callback"),
    ("GET", "/v1/admin/pool"),
    ("GET", "/v1/events"),
    ("POST", "/v1/events/{event_id}/redeliver"),
    ("POST", "/v1/webhooks"),
    ("GET", "/v1/webhooks"),
    ("GET", "/v1/webhooks/{webhook_id}"),
    ("DELETE", "/v1/webhooks/{webhook_id}"),
    ("POST", "/v1/webhooks/{webhook_id}/rotate-secret"),
    ("POST", "/v1/webhooks/{webhook_id}/enable"),
    ("POST", "/v1/webhooks/{webhook_id}/test"),
    ("GET", "/v1/webhooks/{webhook_id}/deliveries"),
];

fn accounts(list: &Value) -> BTreeSet<String> {
    list["integrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["account_id"].as_str().unwrap().to_string())
        .collect()
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn health_readiness_and_metrics_answer_without_a_key() {
    let app = TestApp::spawn().await;
    let health = app.get("/healthz", None).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), json!({"status": "ok"}));
    let ready = app.get("/readyz", None).await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    assert_eq!(ready.json(), json!({"status": "ready"}));

    // A request on a templated route, so the counter has that label.
    let list = app
        .get("/v1/users/user-1/integrations", Some(&app.keys.read))
        .await;
    assert_eq!(list.status, 200, "{}", list.text);

    let metrics = app.get("/metrics", None).await;
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    for name in [
        "db_pool_connections_open",
        "integrations_status_cache",
        "http_requests_total",
        r#"route="/v1/users/{user_id}/integrations""#,
    ] {
        assert!(
            metrics.text.contains(name),
            "/metrics lacks {name}:\n{}",
            metrics.text
        );
    }
    // Labelled by template, never by the concrete path.
    assert!(!metrics.text.contains("user-1"), "{}", metrics.text);
    // Every series is described.
    let typed: Vec<&str> = metrics
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(typed.len() > 20, "{}", metrics.text);
    for name in typed {
        assert!(
            metrics.text.contains(&format!("# HELP {name} ")),
            "/metrics has no HELP for {name}"
        );
    }
    app.assert_no_leaks();
}

#[tokio::test]
async fn integrations_are_stored_listed_and_deleted() {
    let app = TestApp::spawn().await;
    let key = Some(app.keys.all.as_str());

    // expires_in, a scope string, token_type and metadata.
    let stored = app
        .put_integration(
            "user-1",
            "good",
            "acct-1",
            json!({"access_token": "at-put-1", "refresh_token": "rt-put-1", "expires_in": 3600,
                   "scope": "read write", "token_type": "Bearer", "metadata": {"team": "blue"}}),
        )
        .await;
    assert_eq!(stored["provider"], "good");
    assert_eq!(stored["account_id"], "acct-1");
    assert_eq!(stored["status"], "connected");
    assert_eq!(stored["healthy"], true);
    assert_eq!(stored["scopes"], json!(["read", "write"]));
    assert_eq!(stored["metadata"], json!({"team": "blue"}));
    let expires = time(&stored["expires_at"]);
    assert!(
        expires > Utc::now() + chrono::Duration::minutes(55),
        "{stored}"
    );

    // expires_at (RFC 3339) and a scopes list.
    let at = (Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    let second = app
        .put_integration(
            "user-1",
            "good",
            "acct-2",
            json!({"access_token": "at-put-2", "refresh_token": "rt-put-2", "expires_at": at,
                   "scopes": ["read", "admin"], "token_type": "Bearer"}),
        )
        .await;
    assert_eq!(second["scopes"], json!(["read", "admin"]));
    assert_eq!(
        time(&second["expires_at"]).timestamp(),
        time(&json!(at)).timestamp()
    );

    let list = app.get("/v1/users/user-1/integrations", key).await;
    assert_eq!(list.status, 200, "{}", list.text);
    let list = list.json();
    assert_eq!(list["user_id"], "user-1");
    assert_eq!(
        accounts(&list),
        BTreeSet::from(["acct-1".into(), "acct-2".into()])
    );
    // Another user sees nothing.
    let other = app.get("/v1/users/user-2/integrations", key).await.json();
    assert_eq!(other["integrations"], json!([]));

    let deleted = app
        .send(
            Method::DELETE,
            "/v1/users/user-1/integrations/good/acct-1",
            key,
            None,
        )
        .await;
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    assert_eq!(
        deleted.json(),
        json!({"deleted": true, "revoked_at_provider": true, "revocation": "revoked", "revoke_error": null})
    );
    assert_eq!(app.fake.revocations.load(Ordering::SeqCst), 1);
    let list = app.get("/v1/users/user-1/integrations", key).await.json();
    assert_eq!(accounts(&list), BTreeSet::from(["acct-2".into()]));

    let again = app
        .send(
            Method::DELETE,
            "/v1/users/user-1/integrations/good/acct-1",
            key,
            None,
        )
        .await;
    again.assert_error(404, "not_found");

    // The provider cannot revoke: the integration is deleted all the same,
    // and the answer says the grant may still work there.
    app.fake
        .revoke_outage
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let deleted = app
        .send(
            Method::DELETE,
            "/v1/users/user-1/integrations/good/acct-2",
            key,
            None,
        )
        .await;
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    let body = deleted.json();
    assert_eq!(body["deleted"], true);
    assert_eq!(body["revoked_at_provider"], false);
    assert_eq!(body["revocation"], "failed");
    assert!(
        body["revoke_error"]["message"]
            .as_str()
            .unwrap()
            .contains("503"),
        "{body}"
    );
    let list = app.get("/v1/users/user-1/integrations", key).await.json();
    assert_eq!(list["integrations"], json!([]));
    app.assert_no_leaks();
}

#[tokio::test]
async fn token_is_refreshed_first_only_when_it_expires_within_5_minutes() {
    let app = TestApp::spawn().await;
    let creds = Some(app.keys.all.as_str());
    app.seed("user-1", "good", "fresh", 3600).await;
    app.seed("user-1", "good", "soon", 120).await;

    // Fresh: the stored token, no refresh.
    let fresh = app.get("/v1/integrations/good/fresh/token", creds).await;
    assert_eq!(fresh.status, 200, "{}", fresh.text);
    assert_eq!(fresh.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(fresh.json()["access_token"], "at-seed-good-fresh");
    assert_eq!(fresh.json()["token_type"], "Bearer");
    assert_eq!(app.fake.refreshes.load(Ordering::SeqCst), 0);

    // Expiring in 2 minutes: refreshed first, exactly once.
    let soon = app.get("/v1/integrations/good/soon/token", creds).await;
    assert_eq!(soon.status, 200, "{}", soon.text);
    assert_eq!(soon.header("cache-control").as_deref(), Some("no-store"));
    let body = soon.json();
    assert_eq!(body["access_token"], "at-good-1", "{body}");
    assert!(time(&body["expires_at"]) > Utc::now() + chrono::Duration::minutes(55));
    assert_eq!(app.fake.refreshes.load(Ordering::SeqCst), 1);

    // Now fresh: asked again, no second refresh.
    let again = app.get("/v1/integrations/good/soon/token", creds).await;
    assert_eq!(again.json()["access_token"], "at-good-1");
    assert_eq!(app.fake.refreshes.load(Ordering::SeqCst), 1);
    app.assert_no_leaks();
}

/// A provider answering 429: the refresh answers 503 `provider_paused`
/// with the provider's Retry-After, and the integration stays healthy.
#[tokio::test]
async fn a_refresh_the_provider_rate_limits_is_503_provider_paused_with_retry_after() {
    let app = TestApp::spawn().await;
    let key = Some(app.keys.all.as_str());
    app.seed("user-1", "good", "acct-1", 3600).await;
    app.fake
        .throttle("good", std::time::Duration::from_secs(120), 40);
    for _ in 0..2 {
        let paused = app
            .send(
                Method::POST,
                "/v1/integrations/good/acct-1/refresh",
                key,
                None,
            )
            .await;
        let message = paused.assert_error(503, "provider_paused");
        assert!(message.contains("'good'"), "{message}");
        let retry: u64 = paused
            .header("retry-after")
            .expect("a Retry-After header")
            .parse()
            .unwrap();
        assert!((30..=40).contains(&retry), "{retry}");
    }
    assert_eq!(
        app.fake.received.load(Ordering::SeqCst),
        1,
        "the second call waited for nothing and sent nothing"
    );
    let listed = app.get("/v1/users/user-1/integrations", key).await.json();
    let status = &listed["integrations"][0];
    assert_eq!(status["status"], "connected", "{listed}");
    assert_eq!(status["refresh_failures"], 0, "{listed}");
    app.assert_no_leaks();
}

#[tokio::test]
async fn refresh_and_batch_refresh_answer_per_item_in_order() {
    let app = TestApp::spawn().await;
    let key = Some(app.keys.all.as_str());
    app.seed("user-1", "good", "acct-1", 3600).await;
    app.seed("user-1", "good", "acct-2", 3600).await;
    app.seed("user-2", "bad", "acct-3", 3600).await;
    app.fake.set_mode("bad", Mode::InvalidGrant);

    let one = app
        .send(
            Method::POST,
            "/v1/integrations/good/acct-1/refresh",
            key,
            None,
        )
        .await;
    assert_eq!(one.status, 200, "{}", one.text);
    let one = one.json();
    assert_eq!(one["account_id"], "acct-1");
    assert_eq!(one["status"], "connected");
    assert_eq!(one["refresh_failures"], 0);
    assert!(!one["last_refresh_at"].is_null(), "{one}");
    assert_eq!(app.fake.refreshes.load(Ordering::SeqCst), 1);

    let batch = app
        .send(
            Method::POST,
            "/v1/integrations/refresh",
            key,
            Some(json!({"requests": [
                {"provider": "good", "account_id": "acct-1"},
                {"provider": "good", "account_id": "missing"},
                {"provider": "bad", "account_id": "acct-3"},
                {"provider": "good", "account_id": "acct-2"},
            ], "concurrency": 2})),
        )
        .await;
    assert_eq!(batch.status, 200, "{}", batch.text);
    let results = batch.json()["results"].as_array().unwrap().clone();
    let summary: Vec<(String, bool)> = results
        .iter()
        .map(|r| {
            (
                r["account_id"].as_str().unwrap().to_string(),
                r["ok"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("acct-1".to_string(), true),
            ("missing".to_string(), false),
            ("acct-3".to_string(), false),
            ("acct-2".to_string(), true),
        ]
    );
    assert_eq!(results[0]["integration"]["status"], "connected");
    assert_eq!(results[1]["error"]["code"], "not_found");
    assert_eq!(results[2]["error"]["code"], "reconnect_required");
    assert_eq!(results[3]["integration"]["account_id"], "acct-2");
    assert!(results[0].get("error").is_none() && results[1].get("integration").is_none());
    app.assert_no_leaks();
}

/// Starts a connect flow for `user` over HTTP: (state, flow_id, authorize URL).
async fn start_flow(app: &TestApp, user: &str) -> (String, String, String) {
    let started = app
        .send(
            Method::POST,
            "/v1/connect/good",
            Some(&app.keys.all),
            Some(json!({"user_id": user, "redirect_uri": "https://app.example/done?from=test&status=forged&error=x"})),
        )
        .await;
    assert_eq!(started.status, 200, "{}", started.text);
    let body = started.json();
    assert!(time(&body["expires_at"]) > Utc::now());
    let authorize = url::Url::parse(body["authorize_url"].as_str().unwrap()).unwrap();
    assert_eq!(
        authorize.as_str().split('?').next().unwrap(),
        format!("http://127.0.0.1:{}/good/authorize", app.fake.port)
    );
    let q: HashMap<String, String> = authorize.query_pairs().into_owned().collect();
    assert_eq!(q["redirect_uri"], CALLBACK_URL);
    assert_eq!(q["client_id"], "client-good");
    let flow_id = body["flow_id"].as_str().unwrap().to_string();
    assert!(flow_id.len() >= 43, "a 256-bit flow id: {flow_id}");
    (q["state"].clone(), flow_id, authorize.to_string())
}

/// The browser at the callback: the query the application's redirect_uri
/// receives, after checking the callback's headers.
async fn callback(app: &TestApp, query: &str) -> HashMap<String, String> {
    let done = app.get(&format!("/v1/oauth/callback?{query}"), None).await;
    assert_eq!(done.status, 303, "{}", done.text);
    assert_eq!(
        done.header("referrer-policy").as_deref(),
        Some("no-referrer")
    );
    assert_eq!(done.header("cache-control").as_deref(), Some("no-store"));
    let location = url::Url::parse(&done.header("location").unwrap()).unwrap();
    assert_eq!(location.host_str(), Some("app.example"));
    assert_eq!(location.path(), "/done");
    let pairs: Vec<(String, String)> = location.query_pairs().into_owned().collect();
    let query: HashMap<String, String> = pairs.iter().cloned().collect();
    assert_eq!(query.len(), pairs.len(), "each parameter once: {location}");
    query
}

#[tokio::test]
async fn connect_flow_connects_when_the_application_confirms_and_refuses_replays() {
    let app = TestApp::spawn().await;
    let (state, flow_id, authorize) = start_flow(&app, "user-3").await;

    // The test plays the browser: the provider sends it to the callback.
    let back_to = app.fake.authorize(&authorize, "code-1", "gh-777");
    assert_eq!(back_to, CALLBACK_URL);
    let back = callback(&app, &format!("state={state}&code=code-1")).await;
    assert_eq!(back["from"], "test");
    assert_eq!(back["status"], "authorized");
    assert_eq!(back["provider"], "good");
    assert_eq!(back["account_id"], "gh-777");
    assert!(!back.contains_key("code"), "never the provider's code");
    assert!(
        !back.contains_key("flow_id"),
        "the flow id comes from the session"
    );
    let completion_code = back["completion_code"].clone();
    let list = app
        .get("/v1/users/user-3/integrations", Some(&app.keys.read))
        .await
        .json();
    assert_eq!(
        list["integrations"],
        json!([]),
        "not before the confirmation"
    );

    // The application confirms with the flow id from its user's session.
    let read_only = app
        .send(
            Method::POST,
            "/v1/connect/complete",
            Some(&app.keys.read),
            Some(json!({"flow_id": flow_id, "completion_code": completion_code})),
        )
        .await;
    read_only.assert_error(403, "forbidden");
    let done = app
        .send(
            Method::POST,
            "/v1/connect/complete",
            Some(&app.keys.all),
            Some(json!({"flow_id": flow_id, "completion_code": completion_code, "user_id": "user-3"})),
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.text);
    assert_eq!(done.json()["status"], "connected");
    assert_eq!(done.json()["account_id"], "gh-777");
    let list = app
        .get("/v1/users/user-3/integrations", Some(&app.keys.read))
        .await
        .json();
    assert_eq!(accounts(&list), BTreeSet::from(["gh-777".into()]));
    let again = app
        .send(
            Method::POST,
            "/v1/connect/complete",
            Some(&app.keys.all),
            Some(json!({"flow_id": flow_id, "completion_code": completion_code})),
        )
        .await;
    again.assert_error(400, "invalid_flow");

    // The same state again: refused, and the provider is not asked.
    app.fake.authorize(&authorize, "code-2", "gh-888");
    let replay = app
        .get(
            &format!("/v1/oauth/callback?state={state}&code=code-2"),
            None,
        )
        .await;
    replay.assert_error(400, "invalid_request");
    assert_eq!(
        replay.header("referrer-policy").as_deref(),
        Some("no-referrer")
    );
    assert_eq!(app.fake.exchanges.load(Ordering::SeqCst), 1);

    // The user refuses at the provider: back to the application with the
    // reason, and the state is used up.
    let (state, _, authorize) = start_flow(&app, "user-4").await;
    let back = callback(&app, &format!("state={state}&error=access_denied")).await;
    assert_eq!(back["status"], "error");
    assert_eq!(back["error"], "access_denied");
    let list = app
        .get("/v1/users/user-4/integrations", Some(&app.keys.read))
        .await
        .json();
    assert_eq!(list["integrations"], json!([]));
    app.fake.authorize(&authorize, "code-3", "gh-999");
    let used = app
        .get(
            &format!("/v1/oauth/callback?state={state}&code=code-3"),
            None,
        )
        .await;
    used.assert_error(400, "invalid_request");
    app.assert_no_leaks();
}

/// Issue 11's reproduction: the attacker's application session starts a
/// flow for `attacker` and sends the authorize URL to a victim, who opens
/// it. The victim's account must not be listed under the attacker, and
/// the attacker, holding only the flow id, cannot finish the flow.
#[tokio::test]
async fn an_authorize_url_sent_to_a_victim_does_not_link_the_victims_account() {
    let app = TestApp::spawn().await;
    let (state, attackers_flow, authorize) = start_flow(&app, "attacker").await;
    app.fake.authorize(&authorize, "victim-code", "victim-acct");
    let victims_browser = callback(&app, &format!("state={state}&code=victim-code")).await;
    assert_eq!(victims_browser["status"], "authorized");
    // The victim's application session holds no such flow, so the
    // application does not confirm; the attacker tries without the code.
    for guess in ["", "x", attackers_flow.as_str()] {
        let r = app
            .send(
                Method::POST,
                "/v1/connect/complete",
                Some(&app.keys.all),
                Some(json!({"flow_id": attackers_flow, "completion_code": guess})),
            )
            .await;
        r.assert_error(400, "invalid_flow");
    }
    let list = app
        .get("/v1/users/attacker/integrations", Some(&app.keys.read))
        .await
        .json();
    assert_eq!(list["integrations"], json!([]));
}

/// Only RFC 6749 error codes reach the application's redirect; anything
/// else a provider (or an attacker crafting the callback URL) sends
/// becomes `provider_error`.
#[tokio::test]
async fn callback_passes_on_only_rfc6749_error_codes() {
    let app = TestApp::spawn().await;
    for (sent, passed) in [
        ("temporarily_unavailable", "temporarily_unavailable"),
        ("%3Cscript%3Ealert(1)%3C%2Fscript%3E", "provider_error"),
        ("access_denied%26status%3Dconnected", "provider_error"),
        ("call%20%2B1%20555%200100", "provider_error"),
    ] {
        let (state, _, _) = start_flow(&app, "user-5").await;
        let back = callback(&app, &format!("state={state}&error={sent}")).await;
        assert_eq!(back["status"], "error");
        assert_eq!(back["error"], passed, "for {sent}");
        assert_eq!(
            back.len(),
            3,
            "from, status, error and nothing else: {back:?}"
        );
    }
}

#[tokio::test]
async fn admin_pool_reports_pool_stats_cache_and_activity() {
    let app = TestApp::spawn().await;
    app.get("/v1/users/user-1/integrations", Some(&app.keys.read))
        .await;
    let report = app.get("/v1/admin/pool", Some(&app.keys.all)).await;
    assert_eq!(report.status, 200, "{}", report.text);
    let report = report.json();
    assert_eq!(report["pool"]["max"], 5, "{report}");
    assert!(report["pool"]["open"].as_u64().unwrap() >= 1, "{report}");
    assert!(
        report["pool"]["checkouts"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert!(report["cache"]["misses"].as_u64().unwrap() >= 1, "{report}");
    assert!(report["activity"].is_object(), "{report}");
    app.assert_no_leaks();
}

#[tokio::test]
async fn openapi_documents_exactly_the_routes_the_server_answers() {
    let app = TestApp::spawn().await;
    let doc = app.get("/openapi.json", None).await;
    assert_eq!(doc.status, 200);
    let doc = doc.json();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());

    let methods = [
        "get", "put", "post", "delete", "patch", "head", "options", "trace",
    ];
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if methods.contains(&method.as_str()) {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let expected: BTreeSet<(String, String)> = DOCUMENTED
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, expected);

    // Every documented operation is routed (without a key: 401 on /v1,
    // 400 on the callback without state, 200 on health).
    for (method, template) in &documented {
        let path = template
            .replace("{user_id}", "user-1")
            .replace("{provider}", "good")
            .replace("{account_id}", "acct-1")
            .replace("{webhook_id}", "wh_0123456789abcdef01234567")
            .replace("{event_id}", "42");
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let body = matches!(method, Method::PUT | Method::POST).then(|| json!({}));
        let reply = app.send(method.clone(), &path, None, body).await;
        assert!(
            ![404, 405].contains(&reply.status.as_u16()),
            "{method} {path} answered {}: {}",
            reply.status,
            reply.text
        );
    }
    // The 24th route: the document itself. (`/dashboard` and its two
    // assets are a page, not API operations: left out, see dashboard.rs.)
    assert_eq!(documented.len() + 1, 24);

    // What is not documented is not routed.
    for (method, path, status) in [
        (
            Method::GET,
            "/v1/users/user-1/integrations/good/acct-1",
            405,
        ),
        (
            Method::PATCH,
            "/v1/users/user-1/integrations/good/acct-1",
            405,
        ),
        (Method::POST, "/healthz", 405),
        (Method::GET, "/v1/connect/good", 405),
        (Method::GET, "/v1/integrations", 404),
        (Method::GET, "/v2/users/user-1/integrations", 404),
    ] {
        let reply = app.send(method.clone(), path, None, None).await;
        let code = if status == 405 {
            "method_not_allowed"
        } else {
            "not_found"
        };
        reply.assert_error(status, code);
    }
    app.assert_no_leaks();
}

#[tokio::test]
async fn openapi_documents_every_shared_answer_limit_and_link() {
    let app = TestApp::spawn().await;
    let doc = app.get("/openapi.json", None).await.json();
    let mut operation_ids = BTreeSet::new();
    let mut link_targets = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let name = format!("{method} {path}");
            operation_ids.insert(op["operationId"].as_str().unwrap().to_string());
            let responses = op["responses"].as_object().unwrap();
            let has = |status: &str| responses.contains_key(status);
            let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
            if secured {
                for status in ["401", "403", "500", "503"] {
                    assert!(has(status), "{name} lacks {status}");
                }
            }
            if op.get("requestBody").is_some() {
                for status in ["400", "413", "415"] {
                    assert!(has(status), "{name} lacks {status}");
                }
            }
            for param in op["parameters"].as_array().into_iter().flatten() {
                assert!(has("400"), "{name} lacks 400");
                let schema = &param["schema"];
                match param["name"].as_str().unwrap() {
                    "user_id" => assert_eq!(schema["maxLength"], 128, "{name}"),
                    "account_id" => assert_eq!(schema["maxLength"], 256, "{name}"),
                    "provider" => {
                        assert_eq!(schema["maxLength"], 64, "{name}");
                        // The test registry's providers, and no other.
                        assert!(schema["enum"].as_array().unwrap().contains(&json!("good")));
                    }
                    "state" => assert_eq!(param["required"], true, "{name}"),
                    _ => {}
                }
                if param["in"] == "path" {
                    assert!(schema["pattern"].is_string(), "{name}: {param}");
                }
            }
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        response["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{name} {status}"
                    );
                }
                for link in response["links"].as_object().into_iter().flatten() {
                    let target = link.1["operationId"].as_str();
                    assert!(target.is_some(), "{name} {status}: {link:?}");
                    link_targets.push(target.unwrap().to_string());
                }
            }
        }
    }
    assert!(!link_targets.is_empty());
    for target in link_targets {
        assert!(operation_ids.contains(&target), "a link to {target}");
    }
    let batch = &doc["components"]["schemas"]["BatchRequest"]["properties"];
    assert_eq!(batch["concurrency"]["minimum"], 1);
    assert_eq!(batch["concurrency"]["maximum"], 50);
    assert_eq!(batch["requests"]["maxItems"], 1000);
}

#[tokio::test]
async fn batch_concurrency_is_an_integer_from_1_to_50_written_either_way() {
    let app = TestApp::spawn().await;
    let key = Some(app.keys.all.as_str());
    for (concurrency, status) in [
        (json!(5), 200),
        // JSON Schema's integer: the document promises 5.0 is one.
        (json!(5.0), 200),
        (json!(null), 200),
        (json!(5.5), 400),
        (json!(0), 400),
        (json!(51), 400),
        (json!(-1), 400),
        (json!("5"), 400),
    ] {
        let reply = app
            .send(
                Method::POST,
                "/v1/integrations/refresh",
                key,
                Some(json!({"requests": [], "concurrency": concurrency})),
            )
            .await;
        assert_eq!(reply.status, status, "{concurrency}: {}", reply.text);
        if status == 400 {
            assert!(reply.text.contains("concurrency"), "{}", reply.text);
        }
    }
}
