//! A fake OAuth provider on 127.0.0.1 shared by the test binaries
//! (`#[path]`-included): token, revoke and userinfo endpoints for any
//! provider name, with scenarios, counting what it receives.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Form, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

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

#[derive(Default)]
struct ProviderState {
    mode: HashMap<String, Mode>,
    delay: HashMap<String, Duration>,
    valid_refresh: HashSet<String>,
    issued: usize,
    codes: HashMap<String, String>,
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
    /// Revocations received.
    pub revocations: Arc<AtomicUsize>,
    /// Refresh tokens presented, in order.
    pub seen_refresh_tokens: Arc<Mutex<Vec<String>>>,
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
            seen_refresh_tokens: Arc::default(),
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

    pub fn set_delay(&self, provider: &str, delay: Duration) {
        self.state
            .lock()
            .unwrap()
            .delay
            .insert(provider.into(), delay);
    }

    /// Registers a refresh token the provider accepts.
    pub fn accept_refresh(&self, token: &str) {
        self.state
            .lock()
            .unwrap()
            .valid_refresh
            .insert(token.into());
    }

    /// Registers an authorization code for an account.
    pub fn accept_code(&self, code: &str, account: &str) {
        self.state
            .lock()
            .unwrap()
            .codes
            .insert(code.into(), account.into());
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

async fn token(
    State(fake): State<FakeProvider>,
    UrlPath(name): UrlPath<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    fake.received.fetch_add(1, Ordering::SeqCst);
    let (mode, delay) = {
        let s = fake.state.lock().unwrap();
        (
            s.mode.get(&name).copied().unwrap_or(Mode::Rotate),
            s.delay.get(&name).copied().unwrap_or_default(),
        )
    };
    let now = fake.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    fake.max_in_flight.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(delay).await;
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
            let Some(account) = s.codes.remove(&code) else {
                return invalid_grant();
            };
            if form.get("code_verifier").is_none_or(|v| v.len() < 43) {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "invalid_request"})),
                )
                    .into_response();
            }
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

async fn revoke(State(fake): State<FakeProvider>) -> StatusCode {
    fake.revocations.fetch_add(1, Ordering::SeqCst);
    StatusCode::OK
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
