//! A fake OAuth provider on 127.0.0.1 shared by the test binaries
//! (`#[path]`-included): token, revoke and userinfo endpoints for any
//! provider name, with scenarios, counting what it receives.
//!
//! It is as strict as real providers: every token and revoke request must
//! authenticate the client (`client-<name>` and [`CLIENT_SECRET`], by HTTP
//! Basic or in the form, never both); an authorization code is only issued
//! by following the authorize URL the service built ([`FakeProvider::authorize`]),
//! and its exchange must present the same `client_id` and `redirect_uri`
//! and a `code_verifier` whose S256 hash is the `code_challenge` (RFC 7636).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Form, Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::json;
use sha2::{Digest, Sha256};

/// How a provider's token endpoint answers refreshes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// New access and refresh token each time; the old refresh token stops working.
    Rotate,
    /// New access token only; no refresh_token, no expires_in (the refresh
    /// token presented stays valid).
    Omit,
    /// 400 invalid_grant.
    InvalidGrant,
    /// 500.
    ServerError,
    /// 400 with a hostile error answer: markup as the code; a description
    /// quoting a prefix of the refresh token presented, a phone number, links
    /// and a bidi override.
    #[allow(dead_code)] // the service tests use it; the HTTP tests do not
    Hostile,
}

/// The hostile answer's description for a presented refresh token.
#[allow(dead_code)] // the service tests check against it; the HTTP tests do not
pub fn hostile_description(presented: &str) -> String {
    let prefix: String = presented.chars().take(12).collect();
    format!(
        "Your token {prefix} is blocked.\u{202e} Call +1 (555) 010-9999 or visit \
         https://evil.example/recover?t={prefix} or www.evil.example now"
    )
}

/// The client secret every provider expects (the tests set `FAKE_SECRET`
/// to it).
pub const CLIENT_SECRET: &str = "fake-secret";

/// What the provider remembers about a code it issued at /authorize.
struct Grant {
    provider: String,
    account: String,
    client_id: String,
    redirect_uri: String,
    challenge: String,
}

#[derive(Default)]
struct ProviderState {
    mode: HashMap<String, Mode>,
    delay: HashMap<String, Duration>,
    /// Providers whose token endpoint holds every answer until released.
    held: HashMap<String, Arc<tokio::sync::Semaphore>>,
    /// Providers answering 429 until an instant, with this Retry-After.
    throttled: HashMap<String, (std::time::Instant, u64)>,
    valid_refresh: HashSet<String>,
    issued: usize,
    codes: HashMap<String, Grant>,
    /// Every token handed out, to check none leaks into an API answer.
    issued_tokens: Vec<String>,
}

/// An OAuth provider on 127.0.0.1 (token, revoke and userinfo endpoints for
/// any provider name), counting what it receives.
#[derive(Clone)]
pub struct FakeProvider {
    pub port: u16,
    state: Arc<Mutex<ProviderState>>,
    /// Token endpoint requests, counted on arrival (before any delay).
    pub received: Arc<AtomicUsize>,
    /// Refresh grants answered.
    pub refreshes: Arc<AtomicUsize>,
    /// Token endpoint requests being answered now, and the most at once.
    pub in_flight: Arc<AtomicUsize>,
    pub max_in_flight: Arc<AtomicUsize>,
    /// Authorization code exchanges answered.
    pub exchanges: Arc<AtomicUsize>,
    /// Revocations accepted (well-formed and client-authenticated).
    pub revocations: Arc<AtomicUsize>,
    /// Tokens revoked, in order.
    pub revoked_tokens: Arc<Mutex<Vec<String>>>,
    /// Requests refused for bad client authentication, PKCE, redirect_uri
    /// or form, each with the reason (no secrets in it).
    pub refused: Arc<Mutex<Vec<String>>>,
    /// Refresh tokens presented, in order.
    pub seen_refresh_tokens: Arc<Mutex<Vec<String>>>,
    /// When set, the revoke endpoint answers 503 (a provider outage).
    pub revoke_outage: Arc<std::sync::atomic::AtomicBool>,
    /// When each token endpoint request arrived, by provider.
    pub arrivals: Arc<Mutex<Vec<(String, std::time::Instant)>>>,
    /// When each 429 was answered.
    pub throttled_at: Arc<Mutex<Vec<std::time::Instant>>>,
}

impl FakeProvider {
    pub async fn start() -> FakeProvider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let fake = FakeProvider {
            port,
            state: Arc::default(),
            received: Arc::default(),
            refreshes: Arc::default(),
            in_flight: Arc::default(),
            max_in_flight: Arc::default(),
            exchanges: Arc::default(),
            revocations: Arc::default(),
            revoked_tokens: Arc::default(),
            refused: Arc::default(),
            seen_refresh_tokens: Arc::default(),
            revoke_outage: Arc::default(),
            arrivals: Arc::default(),
            throttled_at: Arc::default(),
        };
        let app = Router::new()
            .route("/{name}/token", post(token))
            .route("/{name}/revoke", post(revoke))
            .route("/{name}/userinfo", get(userinfo))
            .with_state(fake.clone());
        // Its own thread and runtime: it outlives the test's runtime and
        // answers while a test blocks.
        let std_listener = listener.into_std().unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        fake
    }

    pub fn set_mode(&self, provider: &str, mode: Mode) {
        self.state
            .lock()
            .unwrap()
            .mode
            .insert(provider.into(), mode);
    }

    #[allow(dead_code)] // the service tests use it; the HTTP tests do not
    pub fn set_delay(&self, provider: &str, delay: Duration) {
        self.state
            .lock()
            .unwrap()
            .delay
            .insert(provider.into(), delay);
    }

    /// Holds every answer of `provider`'s token endpoint (after counting the
    /// request) until [`FakeProvider::release`].
    pub fn hold(&self, provider: &str) {
        self.state
            .lock()
            .unwrap()
            .held
            .insert(provider.into(), Arc::new(tokio::sync::Semaphore::new(0)));
    }

    /// `provider`'s token endpoint answers refreshes 429 with
    /// `Retry-After: retry_after` for the next `period`.
    pub fn throttle(&self, provider: &str, period: Duration, retry_after: u64) {
        self.state.lock().unwrap().throttled.insert(
            provider.into(),
            (std::time::Instant::now() + period, retry_after),
        );
    }

    /// Lets the held answers of `provider` go, and any later ones.
    pub fn release(&self, provider: &str) {
        if let Some(gate) = self.state.lock().unwrap().held.remove(provider) {
            gate.close();
        }
    }

    /// Registers a refresh token the provider accepts.
    pub fn accept_refresh(&self, token: &str) {
        self.state
            .lock()
            .unwrap()
            .valid_refresh
            .insert(token.into());
    }

    /// The user's browser follows `authorize_url` (as built by the service)
    /// and the user approves `account`: checks the request as a provider
    /// would (its own authorize endpoint, `response_type=code`, the client
    /// id, an S256 challenge, a redirect_uri) and issues `code` bound to
    /// them. Returns the redirect_uri the browser is sent back to.
    pub fn authorize(&self, authorize_url: &str, code: &str, account: &str) -> String {
        let url = url::Url::parse(authorize_url).expect("the authorize URL parses");
        assert_eq!(url.host_str(), Some("127.0.0.1"), "{authorize_url}");
        assert_eq!(url.port(), Some(self.port), "{authorize_url}");
        let provider = url
            .path()
            .strip_prefix('/')
            .and_then(|p| p.strip_suffix("/authorize"))
            .unwrap_or_else(|| panic!("not an authorize endpoint: {authorize_url}"))
            .to_string();
        let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
        let param = |name: &str| {
            q.get(name)
                .cloned()
                .unwrap_or_else(|| panic!("the authorize URL lacks {name}: {authorize_url}"))
        };
        assert_eq!(param("response_type"), "code");
        assert_eq!(param("client_id"), format!("client-{provider}"));
        assert_eq!(param("code_challenge_method"), "S256");
        let challenge = param("code_challenge");
        assert_eq!(challenge.len(), 43, "a base64url SHA-256: {challenge}");
        assert!(!param("state").is_empty());
        let grant = Grant {
            client_id: param("client_id"),
            redirect_uri: param("redirect_uri"),
            provider,
            account: account.into(),
            challenge,
        };
        let redirect = grant.redirect_uri.clone();
        self.state.lock().unwrap().codes.insert(code.into(), grant);
        redirect
    }

    /// Every access and refresh token the provider issued.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.state.lock().unwrap().issued_tokens.clone()
    }

    /// A provider registry file (`INTEGRATIONS_PROVIDERS`) pointing at this
    /// provider; the client secret is read from `FAKE_SECRET`.
    pub fn registry_toml(&self, names: &[&str]) -> String {
        names
            .iter()
            .map(|n| {
                format!(
                    "[{n}]\nauthorize_url = \"http://127.0.0.1:{p}/{n}/authorize\"\n\
                     token_url = \"http://127.0.0.1:{p}/{n}/token\"\n\
                     revoke_url = \"http://127.0.0.1:{p}/{n}/revoke\"\n\
                     userinfo_url = \"http://127.0.0.1:{p}/{n}/userinfo\"\n\
                     client_id = \"client-{n}\"\nclient_secret_env = \"FAKE_SECRET\"\n\
                     client_auth = \"post\"\nscopes = [\"read\"]\n\
                     expires_in_default = 3600\n\
                     account_id = {{ from = \"userinfo\", pointer = \"/id\" }}\n\n",
                    p = self.port
                )
            })
            .collect()
    }
}

/// A refusal: records the reason and answers `status` with an RFC 6749
/// error.
fn refuse(fake: &FakeProvider, status: StatusCode, error: &str, why: String) -> Response {
    fake.refused.lock().unwrap().push(why);
    (status, Json(json!({"error": error}))).into_response()
}

/// Client authentication (RFC 6749 §2.3.1): `client-<name>` and
/// [`CLIENT_SECRET`] either as HTTP Basic (each form-urlencoded) or as
/// `client_id`/`client_secret` in the form, not both. On failure, why.
fn check_client(
    name: &str,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<(), String> {
    let expected_id = format!("client-{name}");
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .map(|b64| {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_default();
            let text = String::from_utf8(raw).unwrap_or_default();
            let (id, secret) = text.split_once(':').unwrap_or_default();
            let decode = |s: &str| {
                url::form_urlencoded::parse(format!("x={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            };
            (decode(id), decode(secret))
        });
    let posted = form.get("client_secret").map(|secret| {
        (
            form.get("client_id").cloned().unwrap_or_default(),
            secret.clone(),
        )
    });
    let unauthorized = |why: &str| Err(format!("{name}: {why}"));
    let (id, secret) = match (basic, posted) {
        (Some(_), Some(_)) => return unauthorized("client authenticated twice (basic and post)"),
        (None, None) => return unauthorized("no client authentication"),
        (Some(c), None) | (None, Some(c)) => c,
    };
    if id != expected_id {
        return unauthorized(&format!("client_id {id:?} is not {expected_id:?}"));
    }
    if secret != CLIENT_SECRET {
        return unauthorized("wrong client secret");
    }
    Ok(())
}

/// Whether `verifier` is a valid RFC 7636 verifier whose S256 challenge is
/// `challenge`.
fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    let well_formed = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
    well_formed
        && base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(Sha256::digest(verifier.as_bytes()))
            == challenge
}

async fn token(
    State(fake): State<FakeProvider>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    fake.received.fetch_add(1, Ordering::SeqCst);
    fake.arrivals
        .lock()
        .unwrap()
        .push((name.clone(), std::time::Instant::now()));
    if let Err(why) = check_client(&name, &headers, &form) {
        return refuse(&fake, StatusCode::UNAUTHORIZED, "invalid_client", why);
    }
    let (mode, delay, gate, throttled) = {
        let s = fake.state.lock().unwrap();
        (
            s.mode.get(&name).copied().unwrap_or(Mode::Rotate),
            s.delay.get(&name).copied().unwrap_or_default(),
            s.held.get(&name).cloned(),
            s.throttled
                .get(&name)
                .filter(|(until, _)| std::time::Instant::now() < *until)
                .map(|(_, retry_after)| *retry_after),
        )
    };
    if let Some(retry_after) = throttled {
        fake.throttled_at
            .lock()
            .unwrap()
            .push(std::time::Instant::now());
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", retry_after.to_string())],
            Json(json!({"error": "rate_limit_exceeded"})),
        )
            .into_response();
    }
    let now = fake.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    fake.max_in_flight.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(delay).await;
    if let Some(gate) = gate {
        // Closed on release: every waiter goes on.
        let _ = gate.acquire().await;
    }
    fake.in_flight.fetch_sub(1, Ordering::SeqCst);
    match form.get("grant_type").map(String::as_str) {
        Some("refresh_token") => {
            fake.refreshes.fetch_add(1, Ordering::SeqCst);
            let presented = form.get("refresh_token").cloned().unwrap_or_default();
            fake.seen_refresh_tokens
                .lock()
                .unwrap()
                .push(presented.clone());
            match mode {
                Mode::InvalidGrant => return invalid_grant(),
                Mode::ServerError => {
                    return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()
                }
                Mode::Hostile => {
                    return (
                        StatusCode::BAD_REQUEST,
                        Json(json!({
                            "error": "<script>alert(1)</script>",
                            "error_description": hostile_description(&presented),
                        })),
                    )
                        .into_response()
                }
                Mode::Rotate | Mode::Omit => {}
            }
            let mut s = fake.state.lock().unwrap();
            // A rotating provider rejects a refresh token used twice.
            if !s.valid_refresh.contains(&presented) {
                return invalid_grant();
            }
            s.issued += 1;
            let n = s.issued;
            let access = format!("at-{name}-{n}");
            if mode == Mode::Omit {
                s.issued_tokens.push(access.clone());
                return Json(json!({"access_token": access, "token_type": "bearer"}))
                    .into_response();
            }
            s.valid_refresh.remove(&presented);
            let next = format!("rt-{name}-{n}");
            s.valid_refresh.insert(next.clone());
            s.issued_tokens.extend([access.clone(), next.clone()]);
            Json(json!({"access_token": access, "refresh_token": next,
                        "expires_in": 3600, "token_type": "Bearer", "scope": "read write"}))
            .into_response()
        }
        Some("authorization_code") => {
            fake.exchanges.fetch_add(1, Ordering::SeqCst);
            let code = form.get("code").cloned().unwrap_or_default();
            let mut s = fake.state.lock().unwrap();
            // A code is single use, whatever the outcome.
            let Some(grant) = s.codes.remove(&code) else {
                return invalid_grant();
            };
            drop(s);
            let refused = if grant.provider != name {
                Some("code issued by another provider")
            } else if form
                .get("client_id")
                .is_some_and(|id| *id != grant.client_id)
            {
                Some("code issued to another client")
            } else if form.get("redirect_uri") != Some(&grant.redirect_uri) {
                Some("redirect_uri differs from the authorization request's")
            } else if !form
                .get("code_verifier")
                .is_some_and(|v| pkce_matches(v, &grant.challenge))
            {
                Some("code_verifier does not match the code_challenge")
            } else {
                None
            };
            if let Some(why) = refused {
                return refuse(
                    &fake,
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    format!("{name}: {why}"),
                );
            }
            let account = grant.account;
            let mut s = fake.state.lock().unwrap();
            s.issued += 1;
            let rt = format!("rt-{name}-code-{}", s.issued);
            let at = format!("at-{account}");
            s.valid_refresh.insert(rt.clone());
            s.issued_tokens.extend([at.clone(), rt.clone()]);
            Json(json!({"access_token": at, "refresh_token": rt, "expires_in": 3600}))
                .into_response()
        }
        _ => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type"})),
        )
            .into_response(),
    }
}

fn invalid_grant() -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": "invalid_grant", "error_description": "token revoked"})),
    )
        .into_response()
}

/// RFC 7009: an authenticated client, a `token`, an optional
/// `token_type_hint` among the two defined; an unknown token is still 200.
/// A revoked refresh token stops working.
async fn revoke(
    State(fake): State<FakeProvider>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Err(why) = check_client(&name, &headers, &form) {
        return refuse(&fake, StatusCode::UNAUTHORIZED, "invalid_client", why);
    }
    if fake.revoke_outage.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "temporarily_unavailable"})),
        )
            .into_response();
    }
    let Some(token) = form.get("token").filter(|t| !t.is_empty()) else {
        return refuse(
            &fake,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{name}: revoke without a token"),
        );
    };
    if let Some(hint) = form.get("token_type_hint") {
        if !["refresh_token", "access_token"].contains(&hint.as_str()) {
            return refuse(
                &fake,
                StatusCode::BAD_REQUEST,
                "unsupported_token_type",
                format!("{name}: token_type_hint {hint:?}"),
            );
        }
    }
    fake.state.lock().unwrap().valid_refresh.remove(token);
    fake.revoked_tokens.lock().unwrap().push(token.clone());
    fake.revocations.fetch_add(1, Ordering::SeqCst);
    StatusCode::OK.into_response()
}

async fn userinfo(headers: axum::http::HeaderMap) -> Response {
    // The account id is the part of the access token after "at-".
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let account = auth
        .trim_start_matches("Bearer ")
        .trim_start_matches("at-")
        .to_string();
    Json(json!({"id": account})).into_response()
}
