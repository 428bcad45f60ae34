//! A fake OAuth provider (axum on 127.0.0.1) and services built on fresh
//! databases.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Form, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use db_pool::testing::TestDatabase;
use db_pool::{Pool, PoolConfig};
use integrations::crypto::Keyring;
use integrations::domain::{AccountId, ProviderName, UserId};
use integrations::oauth::{Expiry, ProviderRegistry, TokenClient, TokenClientConfig, TokenSet};
use integrations::service::{IntegrationsService, ServiceConfig};
use secrecy::SecretString;
use serde_json::json;

/// How a provider's token endpoint answers refreshes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// New access and refresh token each time; the old refresh token stops working.
    Rotate,
    /// New access token only; no refresh_token, no expires_in.
    Omit,
    /// 400 invalid_grant.
    InvalidGrant,
    /// 500.
    ServerError,
}

#[derive(Default)]
struct ProviderState {
    mode: HashMap<String, Mode>,
    delay: HashMap<String, Duration>,
    valid_refresh: HashSet<String>,
    issued: usize,
    codes: HashMap<String, String>,
}

/// The fake provider: counts what it receives.
#[derive(Clone)]
pub struct FakeProvider {
    pub port: u16,
    state: Arc<Mutex<ProviderState>>,
    pub refreshes: Arc<AtomicUsize>,
    pub exchanges: Arc<AtomicUsize>,
    pub revocations: Arc<AtomicUsize>,
    /// Refresh tokens received, in order.
    pub seen_refresh_tokens: Arc<Mutex<Vec<String>>>,
}

impl FakeProvider {
    pub async fn start() -> FakeProvider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let fake = FakeProvider {
            port,
            state: Arc::default(),
            refreshes: Arc::default(),
            exchanges: Arc::default(),
            revocations: Arc::default(),
            seen_refresh_tokens: Arc::default(),
        };
        let app = Router::new()
            .route("/{name}/token", post(token))
            .route("/{name}/revoke", post(revoke))
            .route("/{name}/userinfo", get(userinfo))
            .with_state(fake.clone());
        // The server lives on its own thread and runtime, so it outlives the
        // test's runtime shutting down mid-request.
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

    /// Registers an authorization code.
    pub fn accept_code(&self, code: &str, account: &str) {
        self.state
            .lock()
            .unwrap()
            .codes
            .insert(code.into(), account.into());
    }

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
    Path(name): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let (mode, delay) = {
        let s = fake.state.lock().unwrap();
        (
            s.mode.get(&name).copied().unwrap_or(Mode::Rotate),
            s.delay.get(&name).copied().unwrap_or_default(),
        )
    };
    tokio::time::sleep(delay).await;
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
                _ => {}
            }
            let mut s = fake.state.lock().unwrap();
            if !s.valid_refresh.contains(&presented) {
                // A rotating provider rejects a refresh token used twice.
                return invalid_grant();
            }
            s.issued += 1;
            let n = s.issued;
            if mode == Mode::Rotate {
                s.valid_refresh.remove(&presented);
                let next = format!("rt-{name}-{n}");
                s.valid_refresh.insert(next.clone());
                Json(
                    json!({"access_token": format!("at-{name}-{n}"), "refresh_token": next,
                            "expires_in": 3600, "token_type": "Bearer", "scope": "read write"}),
                )
                .into_response()
            } else {
                Json(json!({"access_token": format!("at-{name}-{n}"), "token_type": "bearer"}))
                    .into_response()
            }
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
            s.valid_refresh.insert(rt.clone());
            Json(json!({"access_token": format!("at-{account}"), "refresh_token": rt, "expires_in": 3600}))
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

/// A service on a fresh database, talking to the fake provider.
pub struct TestService {
    pub service: Arc<IntegrationsService>,
    pub db: Arc<TestDatabase>,
    pub fake: FakeProvider,
    pub keys: String,
}

pub const PROVIDERS: &[&str] = &["good", "bad", "slow"];

impl TestService {
    pub async fn start() -> TestService {
        Self::start_with("connection_limit=5", ServiceConfig::default()).await
    }

    pub async fn start_with(params: &str, config: ServiceConfig) -> TestService {
        let db = Arc::new(TestDatabase::create().await);
        let fake = FakeProvider::start().await;
        let keys = Keyring::generate_spec("k1");
        let service = build(&db, &fake, &keys, params, config).await;
        integrations::store::migrations::run(service.pool())
            .await
            .unwrap();
        TestService {
            service,
            db,
            fake,
            keys,
        }
    }

    /// A second instance (its own pool and instance id) on the same database.
    pub async fn another_instance(&self, params: &str) -> Arc<IntegrationsService> {
        build(
            &self.db,
            &self.fake,
            &self.keys,
            params,
            ServiceConfig::default(),
        )
        .await
    }

    /// Stores an integration whose token expires in `expires_in` seconds.
    pub async fn seed(&self, user: &str, provider: &str, account: &str, expires_in: i64) -> String {
        let refresh = format!("rt-seed-{provider}-{account}");
        self.fake.accept_refresh(&refresh);
        let tokens = TokenSet::from_response(
            &json!({"access_token": format!("at-seed-{account}"), "refresh_token": refresh, "expires_in": expires_in, "scope": "read"}),
            Utc::now(),
            Expiry::Default(Duration::from_secs(3600)),
        )
        .unwrap();
        self.service
            .connect(
                &user_id(user),
                &provider_name(provider),
                &account_id(account),
                &tokens,
                None,
            )
            .await
            .unwrap();
        refresh
    }
}

async fn build(
    db: &TestDatabase,
    fake: &FakeProvider,
    keys: &str,
    params: &str,
    config: ServiceConfig,
) -> Arc<IntegrationsService> {
    let sep = if db.url.contains('?') { '&' } else { '?' };
    let pool = Pool::new(PoolConfig::parse(&format!("{}{sep}{params}", db.url)).unwrap()).unwrap();
    let env = |name: &str| (name == "FAKE_SECRET").then(|| "fake-secret".to_string());
    let registry =
        ProviderRegistry::from_toml(&fake.registry_toml(PROVIDERS), "test providers", &env)
            .unwrap();
    let tokens = TokenClient::new(&TokenClientConfig::default()).unwrap();
    Arc::new(IntegrationsService::new(
        pool,
        Keyring::parse(keys).unwrap(),
        registry,
        tokens,
        config,
    ))
}

pub fn user_id(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

pub fn provider_name(s: &str) -> ProviderName {
    ProviderName::parse(s).unwrap()
}

pub fn account_id(s: &str) -> AccountId {
    AccountId::parse(s).unwrap()
}

pub fn secret_text(s: &SecretString) -> String {
    secrecy::ExposeSecret::expose_secret(s).to_string()
}
