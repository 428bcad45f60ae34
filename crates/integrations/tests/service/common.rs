//! A fake OAuth provider (axum on 127.0.0.1) and services built on fresh
//! databases.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use db_pool::testing::{with_params, TestDatabase};
use db_pool::{Pool, PoolConfig};
use integrations::crypto::Keyring;
use integrations::domain::{AccountId, ProviderName, UserId};
use integrations::oauth::{Expiry, ProviderRegistry, TokenClient, TokenClientConfig, TokenSet};
use integrations::service::{IntegrationsService, ServiceConfig};
use secrecy::SecretString;
use serde_json::json;

#[path = "../support/fake_provider.rs"]
mod fake_provider;
pub use fake_provider::{hostile_description, FakeProvider, Mode};

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

    /// Another instance whose provider registry is the test providers plus
    /// `extra` (TOML tables), with these pool parameters.
    pub async fn instance_with_providers(
        &self,
        extra: &str,
        params: &str,
    ) -> Arc<IntegrationsService> {
        let env = |name: &str| (name == "FAKE_SECRET").then(|| "fake-secret".to_string());
        let registry = format!("{}{extra}", self.fake.registry_toml(PROVIDERS));
        build_from(
            &self.db,
            &self.keys,
            params,
            ServiceConfig::default(),
            &registry,
            &env,
        )
        .await
    }

    /// Another instance with its own keys (for key rotation) and config.
    pub async fn with_keys(&self, keys: &str, config: ServiceConfig) -> Arc<IntegrationsService> {
        build(&self.db, &self.fake, keys, "connection_limit=3", config).await
    }

    /// Another instance on the same database whose providers' client
    /// secret variable (FAKE_SECRET) is not set.
    pub async fn without_client_secret(&self) -> Arc<IntegrationsService> {
        build_with_env(
            &self.db,
            &self.fake,
            &self.keys,
            "connection_limit=3",
            ServiceConfig::default(),
            &|_| None,
        )
        .await
    }

    /// Stores an integration whose token expires in `expires_in` seconds.
    pub async fn seed(&self, user: &str, provider: &str, account: &str, expires_in: i64) -> String {
        self.seed_via(&self.service, user, provider, account, expires_in)
            .await
    }

    /// [`TestService::seed`] through another instance (one whose registry
    /// knows `provider`).
    pub async fn seed_via(
        &self,
        service: &IntegrationsService,
        user: &str,
        provider: &str,
        account: &str,
        expires_in: i64,
    ) -> String {
        let refresh = format!("rt-seed-{provider}-{account}");
        self.fake.accept_refresh(&refresh);
        let tokens = TokenSet::from_response(
            &json!({"access_token": format!("at-seed-{account}"), "refresh_token": refresh, "expires_in": expires_in, "scope": "read"}),
            Utc::now(),
            Expiry::Default(Duration::from_secs(3600)),
        )
        .unwrap();
        service
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
    let env = |name: &str| (name == "FAKE_SECRET").then(|| "fake-secret".to_string());
    build_with_env(db, fake, keys, params, config, &env).await
}

async fn build_with_env(
    db: &TestDatabase,
    fake: &FakeProvider,
    keys: &str,
    params: &str,
    config: ServiceConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Arc<IntegrationsService> {
    build_from(
        db,
        keys,
        params,
        config,
        &fake.registry_toml(PROVIDERS),
        env,
    )
    .await
}

async fn build_from(
    db: &TestDatabase,
    keys: &str,
    params: &str,
    config: ServiceConfig,
    registry: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Arc<IntegrationsService> {
    let pool = Pool::new(PoolConfig::parse(&with_params(&db.url, params)).unwrap()).unwrap();
    let registry = ProviderRegistry::from_toml(registry, "test providers", env).unwrap();
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
