//! `Authorization: Bearer <key>`: 401 without a valid key, 403 without the
//! scope, and neither tells whether a user or integration exists.

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{Reply, TestApp};

/// A string shaped like a key (`ik_` and 43 base64url characters) that was
/// never issued.
const WRONG_KEY: &str = "ik_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// Every protected operation, on an integration that exists.
fn operations(account: &str, user: &str) -> Vec<(Method, String, Option<Value>)> {
    vec![
        (Method::GET, format!("/v1/users/{user}/integrations"), None),
        (
            Method::PUT,
            format!("/v1/users/{user}/integrations/good/{account}"),
            Some(json!({"access_token": "at-auth-put", "expires_in": 3600})),
        ),
        (
            Method::DELETE,
            format!("/v1/users/{user}/integrations/good/{account}"),
            None,
        ),
        (
            Method::GET,
            format!("/v1/integrations/good/{account}/token"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/integrations/good/{account}/refresh"),
            None,
        ),
        (
            Method::POST,
            "/v1/integrations/refresh".into(),
            Some(json!({"requests": [{"provider": "good", "account_id": account}]})),
        ),
        (
            Method::POST,
            "/v1/connect/good".into(),
            Some(json!({"user_id": user, "redirect_uri": "https://app.example/done"})),
        ),
        (Method::GET, "/v1/admin/pool".into(), None),
    ]
}

/// Sends with a raw Authorization header (or none).
async fn send_with(
    app: &TestApp,
    method: Method,
    path: &str,
    authorization: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let headers: Vec<(&str, &str)> = authorization
        .map(|a| ("authorization", a))
        .into_iter()
        .collect();
    let body = body.map(|b| ("application/json", b.to_string().into_bytes()));
    app.send_raw(method, path, None, body, &headers).await
}

#[tokio::test]
async fn no_key_or_a_wrong_key_is_401_with_www_authenticate_and_one_body() {
    let app = TestApp::spawn().await;
    app.seed("user-1", "good", "acct-1", 3600).await;
    let wrong_bearer = format!("Bearer {WRONG_KEY}");
    let basic = "Basic dXNlcjpwYXNz";
    let malformed = "Bearer not-a-key";
    let mut first: Option<String> = None;
    for (method, path, body) in operations("acct-1", "user-1") {
        for authorization in [
            None,
            Some(wrong_bearer.as_str()),
            Some(basic),
            Some(malformed),
            Some("Bearer "),
        ] {
            let reply = send_with(&app, method.clone(), &path, authorization, body.clone()).await;
            reply.assert_error(401, "unauthorized");
            assert_eq!(
                reply.header("www-authenticate").as_deref(),
                Some("Bearer"),
                "{method} {path} with {authorization:?}"
            );
            // The same answer whatever was wrong.
            match &first {
                None => first = Some(reply.text.clone()),
                Some(body) => {
                    assert_eq!(&reply.text, body, "{method} {path} with {authorization:?}")
                }
            }
        }
    }
    let body: Value = serde_json::from_str(first.as_deref().unwrap()).unwrap();
    assert!(
        body["error"]["hint"].as_str().unwrap().contains("Bearer"),
        "{body}"
    );
    // Nothing changed: the integration is still there and was not refreshed.
    assert_eq!(
        app.fake.refreshes.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let list = app
        .get("/v1/users/user-1/integrations", Some(&app.keys.read))
        .await
        .json();
    assert_eq!(list["integrations"].as_array().unwrap().len(), 1);
    app.assert_no_leaks();
}

#[tokio::test]
async fn a_read_only_key_is_403_naming_the_missing_scope() {
    let app = TestApp::spawn().await;
    app.seed("user-1", "good", "acct-1", 3600).await;
    let read = Some(app.keys.read.as_str());
    let mut checked = 0;
    for (method, path, body) in operations("acct-1", "user-1") {
        let reply = app.send(method.clone(), &path, read, body).await;
        let needed = match (&method, path.as_str()) {
            (&Method::GET, p) if p.starts_with("/v1/users/") => {
                assert_eq!(reply.status, 200, "the read scope lists: {}", reply.text);
                continue;
            }
            (&Method::GET, p) if p.ends_with("/token") => "credentials",
            (_, "/v1/admin/pool") => "admin",
            _ => "write",
        };
        let message = reply.assert_error(403, "forbidden");
        assert!(
            message.contains(&format!("'{needed}' scope")),
            "{method} {path}: {message}"
        );
        assert!(reply.header("www-authenticate").is_none());
        checked += 1;
    }
    assert_eq!(checked, 7);
    // Nothing was done on the key's behalf.
    assert_eq!(
        app.fake.refreshes.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(
        app.fake
            .revocations
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    app.assert_no_leaks();
}

#[tokio::test]
async fn auth_failures_do_not_reveal_whether_a_user_or_integration_exists() {
    let app = TestApp::spawn().await;
    app.seed("user-1", "good", "acct-1", 3600).await;
    let read_key = format!("Bearer {}", app.keys.read);
    let wrong = format!("Bearer {WRONG_KEY}");
    let existing = operations("acct-1", "user-1");
    let missing = operations("no-such-account", "no-such-user");
    for ((method, path, body), (_, missing_path, missing_body)) in existing.into_iter().zip(missing)
    {
        for authorization in [None, Some(wrong.as_str()), Some(read_key.as_str())] {
            let a = send_with(&app, method.clone(), &path, authorization, body.clone()).await;
            let b = send_with(
                &app,
                method.clone(),
                &missing_path,
                authorization,
                missing_body.clone(),
            )
            .await;
            if a.status == 200 {
                // The read key may list; listings of anyone are allowed.
                continue;
            }
            assert!(
                [401, 403].contains(&a.status.as_u16()),
                "{method} {path}: {}",
                a.text
            );
            assert_eq!(
                (a.status, &a.text, a.header("www-authenticate")),
                (b.status, &b.text, b.header("www-authenticate")),
                "{method} {path} vs {missing_path} with {authorization:?}"
            );
        }
    }
    app.assert_no_leaks();
}

/// Sends a body on a connection of its own: a server that answers before
/// reading the body (as it must, on a refused request) closes the
/// connection afterwards, and a pooled client could reuse it mid-close.
async fn send_once(
    app: &TestApp,
    method: Method,
    path: &str,
    key: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> Reply {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut req = client
        .request(method.clone(), app.url(path))
        .header("content-type", content_type)
        .body(body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let response = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e:?}"));
    Reply {
        status: response.status(),
        headers: response.headers().clone(),
        text: response.text().await.unwrap(),
    }
}

#[tokio::test]
async fn a_read_only_key_is_403_on_write_routes_whatever_body_it_sends() {
    let app = TestApp::spawn().await;
    let oversize = vec![b'x'; 64 * 1024 + 1];
    let bodies: [(&str, &str, Vec<u8>); 4] = [
        ("invalid JSON", "application/json", b"{not json".to_vec()),
        ("wrong shape", "application/json", b"[1, 2]".to_vec()),
        ("wrong content type", "text/plain", b"hello".to_vec()),
        ("oversize", "application/json", oversize),
    ];
    let routes = [
        (Method::PUT, "/v1/users/user-1/integrations/good/acct-1"),
        (Method::POST, "/v1/integrations/refresh"),
        (Method::POST, "/v1/connect/good"),
    ];
    for (method, path) in routes {
        for (what, content_type, bytes) in &bodies {
            let reply = send_once(
                &app,
                method.clone(),
                path,
                Some(&app.keys.read),
                content_type,
                bytes.clone(),
            )
            .await;
            let message = reply.assert_error(403, "forbidden");
            assert!(
                message.contains("'write' scope"),
                "{method} {path} ({what}): {message}"
            );
            // Without a key: 401, before the body too.
            let reply = send_once(
                &app,
                method.clone(),
                path,
                None,
                content_type,
                bytes.clone(),
            )
            .await;
            reply.assert_error(401, "unauthorized");
        }
    }
    // The same bodies with the write scope are the body's errors.
    let put = "/v1/users/user-1/integrations/good/acct-1";
    for (what, content_type, bytes, status) in [
        (
            "invalid JSON",
            "application/json",
            b"{not json".to_vec(),
            400,
        ),
        ("wrong content type", "text/plain", b"hello".to_vec(), 415),
        (
            "oversize",
            "application/json",
            vec![b'x'; 64 * 1024 + 1],
            413,
        ),
    ] {
        let reply = send_once(
            &app,
            Method::PUT,
            put,
            Some(&app.keys.all),
            content_type,
            bytes,
        )
        .await;
        assert_eq!(reply.status.as_u16(), status, "{what}: {}", reply.text);
    }
    app.assert_no_leaks();
}
