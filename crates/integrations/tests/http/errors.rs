//! Every failure answers the one JSON error shape with the right status,
//! and no answer carries a token, SQL or a panic.

use reqwest::Method;
use serde_json::json;

use crate::common::TestApp;

fn token_body() -> Vec<u8> {
    json!({"access_token": "at-errors-1", "refresh_token": "rt-errors-1", "expires_in": 3600})
        .to_string()
        .into_bytes()
}

#[tokio::test]
async fn malformed_json_is_400_in_the_error_shape() {
    let app = TestApp::spawn().await;
    let key = Some(app.keys.all.as_str());
    let path = "/v1/users/user-1/integrations/good/acct-1";
    for body in [
        &b"{\"access_token\": "[..],
        b"not json at all",
        b"[1, 2, 3]",
        b"{\"refresh_token\": \"rt-errors-x\"}",
    ] {
        let reply = app
            .send_raw(
                Method::PUT,
                path,
                key,
                Some(("application/json", body.to_vec())),
                &[],
            )
            .await;
        reply.assert_error(400, "invalid_request");
    }
    let batch = app
        .send_raw(
            Method::POST,
            "/v1/integrations/refresh",
            key,
            Some(("application/json", b"{\"requests\": 5}".to_vec())),
            &[],
        )
        .await;
    batch.assert_error(400, "invalid_request");
    let connect = app
        .send_raw(
            Method::POST,
            "/v1/connect/good",
            key,
            Some(("application/json", b"{\"user_id\":".to_vec())),
            &[],
        )
        .await;
    connect.assert_error(400, "invalid_request");
    app.assert_no_leaks();
}

#[tokio::test]
async fn a_nul_character_anywhere_in_a_body_is_400_naming_the_field() {
    // PostgreSQL's text and jsonb cannot store NUL: it used to reach the
    // database and come back as 500 (22P05).
    let app = TestApp::spawn().await;
    let key = Some(app.keys.all.as_str());
    let put = "/v1/users/user-1/integrations/good/acct-1";
    for (path, body, field) in [
        (
            put,
            r#"{"access_token":"AT","metadata":{"k":"\u0000"}}"#,
            "'metadata.k'",
        ),
        (
            put,
            r#"{"access_token":"AT","metadata":{"k\u0000":1}}"#,
            "a key in 'metadata'",
        ),
        (
            put,
            r#"{"access_token":"AT","scopes":["a","b\u0000"]}"#,
            "'scopes[1]'",
        ),
        (
            put,
            r#"{"access_token":"AT","scope":"a\u0000b"}"#,
            "'scope'",
        ),
        (
            put,
            r#"{"access_token":"AT","token_type":"Bea\u0000rer"}"#,
            "'token_type'",
        ),
        (
            "/v1/connect/good",
            r#"{"user_id":"user-1","redirect_uri":"https://app.example/done\u0000"}"#,
            "'redirect_uri'",
        ),
    ] {
        let method = if path.starts_with("/v1/connect") {
            Method::POST
        } else {
            Method::PUT
        };
        let reply = app
            .send_raw(
                method,
                path,
                key,
                Some(("application/json", body.as_bytes().to_vec())),
                &[],
            )
            .await;
        let message = reply.assert_error(400, "invalid_request");
        assert!(
            message.contains(field) && message.contains("NUL"),
            "{body}: {message}"
        );
    }
    // An escaped backslash before "u0000" is no NUL: stored as sent.
    let reply = app
        .send_raw(
            Method::PUT,
            put,
            key,
            Some((
                "application/json",
                br#"{"access_token":"AT","metadata":{"k":"\\u0000"}}"#.to_vec(),
            )),
            &[],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["metadata"]["k"], "\\u0000");
    app.assert_no_leaks();
}

#[tokio::test]
async fn a_body_that_is_not_json_is_415() {
    let app = TestApp::spawn().await;
    let key = Some(app.keys.all.as_str());
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let reply = app
            .send_raw(
                Method::PUT,
                "/v1/users/user-1/integrations/good/acct-1",
                key,
                Some((content_type, token_body())),
                &[],
            )
            .await;
        let message = reply.assert_error(415, "invalid_request");
        assert!(message.contains("application/json"), "{message}");
    }
    // No content type at all.
    let reply = app
        .send_raw(Method::POST, "/v1/integrations/refresh", key, None, &[])
        .await;
    reply.assert_error(415, "invalid_request");
    app.assert_no_leaks();
}

#[tokio::test]
async fn a_body_over_64_kib_is_413() {
    let app = TestApp::spawn().await;
    let big = json!({"access_token": "x".repeat(70 * 1024)}).to_string();
    let reply = app
        .send_raw(
            Method::PUT,
            "/v1/users/user-1/integrations/good/acct-1",
            Some(&app.keys.all),
            Some(("application/json", big.into_bytes())),
            &[],
        )
        .await;
    let message = reply.assert_error(413, "payload_too_large");
    assert!(message.contains("65536"), "{message}");
    // Just under the limit is accepted (as a body; the token is refused
    // for other reasons or stored).
    let fits =
        json!({"access_token": "at-fits", "metadata": {"pad": "y".repeat(60 * 1024)}}).to_string();
    let reply = app
        .send_raw(
            Method::PUT,
            "/v1/users/user-1/integrations/good/acct-1",
            Some(&app.keys.all),
            Some(("application/json", fits.into_bytes())),
            &[],
        )
        .await;
    assert_ne!(reply.status, 413, "{}", reply.text);
    app.assert_no_leaks();
}

#[tokio::test]
async fn bad_path_segments_are_400_naming_the_field() {
    let app = TestApp::spawn().await;
    let key = Some(app.keys.all.as_str());
    let long_user = "u".repeat(200);
    let cases = [
        (
            Method::GET,
            format!("/v1/users/{long_user}/integrations"),
            "user_id",
        ),
        (
            Method::PUT,
            format!("/v1/users/{long_user}/integrations/good/acct-1"),
            "user_id",
        ),
        (
            Method::DELETE,
            format!("/v1/users/{long_user}/integrations/good/acct-1"),
            "user_id",
        ),
        (
            Method::PUT,
            "/v1/users/user-1/integrations/good/acct%201".into(),
            "account_id",
        ),
        (
            Method::PUT,
            "/v1/users/user-1/integrations/GitHub/acct-1".into(),
            "provider",
        ),
        (
            Method::GET,
            "/v1/integrations/good/acct%201/token".into(),
            "account_id",
        ),
        (
            Method::GET,
            "/v1/integrations/GitHub/acct-1/token".into(),
            "provider",
        ),
        (
            Method::POST,
            "/v1/integrations/GitHub/acct-1/refresh".into(),
            "provider",
        ),
        (
            Method::POST,
            "/v1/integrations/good/acct%201/refresh".into(),
            "account_id",
        ),
    ];
    for (method, path, field) in cases {
        let body = (method == Method::PUT).then(|| ("application/json", token_body()));
        let reply = app.send_raw(method.clone(), &path, key, body, &[]).await;
        let message = reply.assert_error(400, "invalid_request");
        assert!(
            message.contains(field),
            "{method} {path}: the message does not name {field}: {message}"
        );
    }
    // A batch item and the connect body are checked the same way.
    let batch = app
        .send(
            Method::POST,
            "/v1/integrations/refresh",
            key,
            Some(json!({"requests": [{"provider": "good", "account_id": "a b"}]})),
        )
        .await;
    assert!(batch
        .assert_error(400, "invalid_request")
        .contains("requests[0]"));
    let connect = app
        .send(
            Method::POST,
            "/v1/connect/good",
            key,
            Some(json!({"user_id": long_user, "redirect_uri": "https://app.example/done"})),
        )
        .await;
    assert!(connect
        .assert_error(400, "invalid_request")
        .contains("user_id"));
    app.assert_no_leaks();
}

#[tokio::test]
async fn an_unknown_provider_is_404() {
    let app = TestApp::spawn().await;
    let key = Some(app.keys.all.as_str());
    let put = app
        .send_raw(
            Method::PUT,
            "/v1/users/user-1/integrations/nosuch/acct-1",
            key,
            Some(("application/json", token_body())),
            &[],
        )
        .await;
    assert!(
        put.assert_error(404, "not_found").contains("nosuch"),
        "{}",
        put.text
    );
    for (method, path) in [
        (Method::GET, "/v1/integrations/nosuch/acct-1/token"),
        (Method::POST, "/v1/integrations/nosuch/acct-1/refresh"),
    ] {
        app.send(method, path, key, None)
            .await
            .assert_error(404, "not_found");
    }
    let connect = app
        .send(
            Method::POST,
            "/v1/connect/nosuch",
            key,
            Some(json!({"user_id": "user-1", "redirect_uri": "https://app.example/done"})),
        )
        .await;
    connect.assert_error(404, "not_found");
    app.assert_no_leaks();
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let app = TestApp::spawn().await;
    for path in [
        "/",
        "/v1",
        "/v1/nothing",
        "/v1/users/user-1",
        "/healthz/extra",
    ] {
        let reply = app.get(path, Some(&app.keys.all)).await;
        reply.assert_error(404, "not_found");
    }
    // A route that exists, with a method it does not have.
    let reply = app
        .send(
            Method::PATCH,
            "/v1/users/user-1/integrations/good/acct-1",
            Some(&app.keys.all),
            None,
        )
        .await;
    reply.assert_error(405, "method_not_allowed");
    let allow = reply.header("allow").unwrap_or_default();
    assert!(
        allow.contains("PUT") && allow.contains("DELETE"),
        "allow: {allow}"
    );
    app.assert_no_leaks();
}

#[tokio::test]
async fn refreshing_an_integration_without_a_refresh_token_says_so() {
    let app = TestApp::spawn().await;
    let stored = app
        .put_integration(
            "user-1",
            "good",
            "acct-1",
            json!({"access_token": "at-no-refresh", "expires_in": 3600}),
        )
        .await;
    let reply = app
        .send(
            Method::POST,
            "/v1/integrations/good/acct-1/refresh",
            Some(&app.keys.all),
            None,
        )
        .await;
    let message = reply.assert_error(409, "no_refresh_token");
    let expires_at = stored["expires_at"].as_str().unwrap();
    let shown = chrono::DateTime::parse_from_rfc3339(expires_at).unwrap();
    assert!(
        message.contains("cannot be refreshed")
            && message.contains(&shown.with_timezone(&chrono::Utc).to_rfc3339()),
        "{message}"
    );
    // Nothing about it changed: still connected, healthy, no failure.
    let now = app
        .get("/v1/users/user-1/integrations", Some(&app.keys.read))
        .await
        .json();
    let it = &now["integrations"][0];
    assert_eq!(it["status"], "connected");
    assert_eq!(it["healthy"], true);
    assert_eq!(it["refresh_failures"], 0);
    app.assert_no_leaks();
}

#[tokio::test]
async fn contradictory_fields_and_bad_batch_items_are_400_naming_them() {
    let app = TestApp::spawn().await;
    let key = Some(app.keys.all.as_str());
    for (body, named) in [
        (
            json!({"access_token": "AT", "scope": "a", "scopes": ["b"]}),
            ["scope", "scopes"],
        ),
        (
            json!({"access_token": "AT", "expires_in": 60, "expires_at": 1893456000}),
            ["expires_in", "expires_at"],
        ),
    ] {
        let reply = app
            .send(
                Method::PUT,
                "/v1/users/user-1/integrations/good/acct-1",
                key,
                Some(body),
            )
            .await;
        let message = reply.assert_error(400, "invalid_request");
        assert!(
            message.contains(&format!("both {} and {}", named[0], named[1])),
            "{message}"
        );
    }
    // Nothing was stored.
    let list = app.get("/v1/users/user-1/integrations", key).await.json();
    assert_eq!(list["integrations"], json!([]));

    let reply = app
        .send(
            Method::POST,
            "/v1/integrations/refresh",
            key,
            Some(json!({"requests": [
                {"provider": "good", "account_id": "ok"},
                {"provider": "good", "account_id": "has space"},
            ]})),
        )
        .await;
    let message = reply.assert_error(400, "invalid_request");
    assert!(
        message.starts_with("requests[1].account_id: ") && message.contains("accepted"),
        "{message}"
    );
    app.assert_no_leaks();
}

/// A provider whose client secret is not set: every route that would call
/// it answers 503 `provider_not_configured` naming the variable, nothing
/// reaches the provider, and the integration's health and failure count
/// are left alone. A token that needs no refresh is still served.
#[tokio::test]
async fn an_unconfigured_provider_is_named_and_counts_no_failure() {
    let app = TestApp::spawn_args(&[("FAKE_SECRET", "")], &[]).await;
    let key = Some(app.keys.all.as_str());
    // Expires within the refresh margin: a token read must refresh first.
    app.seed("user-1", "good", "soon", 60).await;
    app.seed("user-1", "good", "later", 3600).await;

    let named = |reply: &crate::common::Reply| {
        let message = reply.assert_error(503, "provider_not_configured");
        assert!(message.contains("FAKE_SECRET"), "{message}");
    };
    for _ in 0..6 {
        named(
            &app.send(
                Method::POST,
                "/v1/integrations/good/soon/refresh",
                key,
                None,
            )
            .await,
        );
    }
    named(&app.get("/v1/integrations/good/soon/token", key).await);
    named(
        &app.send(
            Method::POST,
            "/v1/connect/good",
            key,
            Some(json!({"user_id": "user-1", "redirect_uri": "https://app.example/done"})),
        )
        .await,
    );
    let batch = app
        .send(
            Method::POST,
            "/v1/integrations/refresh",
            key,
            Some(json!({"requests": [{"provider": "good", "account_id": "soon"}]})),
        )
        .await;
    assert_eq!(batch.status, 200, "{}", batch.text);
    assert_eq!(
        batch.json()["results"][0]["error"]["code"],
        "provider_not_configured"
    );
    let fresh = app.get("/v1/integrations/good/later/token", key).await;
    assert_eq!(
        fresh.status, 200,
        "a fresh token needs no provider: {}",
        fresh.text
    );

    let list = app.get("/v1/users/user-1/integrations", key).await.json();
    let soon = list["integrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["account_id"] == "soon")
        .unwrap()
        .clone();
    assert_eq!(soon["status"], "connected", "{soon}");
    assert_eq!(soon["healthy"], true, "{soon}");
    assert_eq!(soon["refresh_failures"], 0, "{soon}");
    assert_eq!(
        app.fake.refreshes.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing was sent to the provider"
    );
    app.assert_no_leaks();
}

/// The connect flow sends users back only to the allowed origins, never to
/// a URL with a user name or password, and the service's own outcome
/// parameters replace any the redirect_uri already carried.
#[tokio::test]
async fn connect_redirects_only_to_allowed_origins() {
    let app = TestApp::spawn().await;
    let key = Some(app.keys.all.as_str());
    for (redirect, says) in [
        ("https://evil.example/done", "https://app.example"),
        (
            "https://app.example.evil.example/done",
            "https://app.example",
        ),
        ("http://app.example/done", "https://app.example"),
        (
            "https://user:pass@app.example/done",
            "user name or password",
        ),
        ("http://localhost:3000/done", "https://app.example"),
    ] {
        let reply = app
            .send(
                Method::POST,
                "/v1/connect/good",
                key,
                Some(json!({"user_id": "user-1", "redirect_uri": redirect})),
            )
            .await;
        let message = reply.assert_error(400, "invalid_request");
        assert!(
            message.contains("redirect_uri") && message.contains(says),
            "{redirect}: {message}"
        );
    }
}

/// Metadata with the largest finite numbers is stored and read back (the
/// server keeps numbers as exact decimals; read back, they must parse to the
/// same doubles, not overflow: a fuzzer's find, which answered by closing
/// the connection, and then on every later read of that integration).
#[tokio::test]
async fn metadata_with_extreme_numbers_round_trips() {
    let app = TestApp::spawn().await;
    let metadata = serde_json::json!({"max": f64::MAX, "min": -f64::MAX, "tiny": f64::MIN_POSITIVE, "sub": 5e-324});
    let stored = app
        .put_integration(
            "u1",
            "good",
            "acct",
            serde_json::json!({"access_token": "at-extreme", "metadata": metadata}),
        )
        .await;
    assert_eq!(stored["metadata"], metadata, "{stored}");
    let list = app
        .get("/v1/users/u1/integrations", Some(&app.keys.read))
        .await;
    assert_eq!(list.status, 200, "{}", list.text);
    assert_eq!(list.json()["integrations"][0]["metadata"], metadata);
}
