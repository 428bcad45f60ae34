//! The operations: what the HTTP API and the CLI call. The seed's
//! `IntegrationsService`, done properly.
//!
//! Rules every operation keeps: no pooled connection is held while waiting
//! on a provider; every write invalidates the user's cached status; tokens
//! are decrypted only where they are used and never logged.

mod admin;
pub mod api_keys;
mod batch;
mod connect;
mod delivery;
mod encryption;
mod events;
mod lease;
mod limits;
mod redirect;
mod refresh;
mod refresher;
mod status;
mod webhooks;
mod writeback;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use db_pool::Pool;
use secrecy::zeroize::Zeroizing;
use secrecy::SecretString;

pub use admin::{Overview, StatusCount};
pub use batch::{RefreshRequest, DEFAULT_BATCH_CONCURRENCY};
pub use connect::{AuthorizedConnect, Disconnected, FinishedConnect, Revocation, StartedConnect};
pub use delivery::DeliveryOutcome;
pub use encryption::RotationReport;
pub use events::{EventPage, EventRetention};
pub use limits::{BREAKER_THRESHOLD, PAUSE_REASONS, WAIT_REASONS};
pub use redirect::{RedirectOrigins, REDIRECT_ORIGINS_ENV};
pub use refresh::REFRESH_OUTCOMES;
pub use refresher::{Refresher, ScanReport, DEFAULT_REFRESHER_CONCURRENCY};
pub use status::{CacheStats, UserStatus};
pub use webhooks::{CreatedWebhook, RotatedSecret, TestDelivery};

use crate::crypto::{CryptoError, Keyring};
use crate::domain::InvalidInput;
use crate::oauth::{
    MissingCredential, OAuthError, Provider, ProviderRegistry, TokenClient, TokenError,
    UnknownProvider,
};

/// Tunables, with the seed's figures as defaults.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// How long a user's status list is served from the cache (seed: 5 minutes).
    pub status_cache_ttl: Duration,
    /// Most users whose status is cached.
    pub status_cache_capacity: u64,
    /// Refresh an access token when it expires within this margin.
    pub refresh_margin: Duration,
    /// How long a refresh lease holds a row; longer than a provider call.
    pub lease: Duration,
    /// Consecutive transient failures that mark an integration `error`.
    pub max_failures: i32,
    /// First backoff after a transient failure (doubles, up to 1 hour).
    pub failure_backoff: Duration,
    /// This instance's name in leases (unique per process by default).
    pub instance_id: String,
    /// Where providers send users back after authorising
    /// (`.../v1/oauth/callback`), for the connect flow.
    pub callback_url: Option<String>,
    /// How long a connect-flow state stays valid (10 minutes).
    pub state_ttl: Duration,
    /// The origins the connect flow may send users back to.
    pub redirect_origins: RedirectOrigins,
    /// Webhook deliveries: timeout, retries, concurrency, addresses.
    pub webhooks: crate::webhooks::WebhookConfig,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            status_cache_ttl: Duration::from_secs(300),
            status_cache_capacity: 100_000,
            refresh_margin: Duration::from_secs(300),
            lease: Duration::from_secs(60),
            max_failures: 5,
            failure_backoff: Duration::from_secs(30),
            instance_id: format!(
                "{}-{}-{:08x}",
                hostname(),
                std::process::id(),
                rand::random::<u32>()
            ),
            callback_url: None,
            state_ttl: Duration::from_secs(600),
            redirect_origins: RedirectOrigins::default(),
            webhooks: crate::webhooks::WebhookConfig::default(),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".to_string())
}

/// Everything an operation can fail with. Messages never contain tokens.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A parameter failed validation.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The provider is not in the registry.
    #[error(transparent)]
    UnknownProvider(#[from] UnknownProvider),
    /// No such integration.
    #[error("no integration for provider '{provider}' and account '{account_id}'")]
    NotFound {
        /// Provider.
        provider: String,
        /// Account.
        account_id: String,
    },
    /// The account is connected to another user.
    #[error("account '{account_id}' on '{provider}' is already connected to another user")]
    Conflict {
        /// Provider.
        provider: String,
        /// Account.
        account_id: String,
    },
    /// The integration cannot give a token: revoked, or expired without a
    /// refresh token. The user must reconnect.
    #[error("the integration is {status}: the user must reconnect {provider}")]
    NeedsReconnect {
        /// Provider.
        provider: String,
        /// `revoked` or `expired`.
        status: &'static str,
    },
    /// A refresh was asked of an integration stored without a refresh
    /// token: it cannot be refreshed, and stays usable until it expires.
    #[error("this {provider} integration has no refresh token, so it cannot be refreshed; its access token stays valid until {}", .expires_at.map_or("it is revoked (it has no expiry)".to_string(), |at| at.to_rfc3339()))]
    NoRefreshToken {
        /// Provider.
        provider: String,
        /// When the access token expires (`None`: never).
        expires_at: Option<DateTime<Utc>>,
    },
    /// The refresh failed; the stored tokens are unchanged.
    #[error("refreshing the token failed: {message}")]
    RefreshFailed {
        /// What the provider or the network said (never a token).
        message: String,
        /// Worth retrying later.
        transient: bool,
    },
    /// The connect flow's state is unknown, used or expired.
    #[error("the OAuth state is {0}; start the connection again")]
    InvalidState(&'static str),
    /// The connect flow to confirm is unknown, completed, expired or not
    /// the caller's.
    #[error("the connect flow is {0}; start the connection again")]
    InvalidFlow(&'static str),
    /// The provider's client id or secret is not set: nothing was sent to
    /// it, and the integration's health is left alone.
    #[error(transparent)]
    ProviderNotConfigured(#[from] MissingCredential),
    /// A token response the application sent does not parse.
    #[error(transparent)]
    Tokens(#[from] TokenError),
    /// The provider refused an OAuth request.
    #[error(transparent)]
    OAuth(#[from] OAuthError),
    /// Keys or ciphertexts.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The database (pool errors keep their Prisma codes). Shared because
    /// one failed cache load answers every caller that waited for it.
    #[error(transparent)]
    Db(Arc<db_pool::Error>),
    /// The provider is paused: it answered 429 or `Retry-After` (or kept
    /// failing), and this refresh could not wait that long. Nothing was
    /// sent; the stored tokens and the integration's health are unchanged.
    #[error("provider '{provider}' is paused ({}) for {}s more; the refresh was not sent", if *.reason == "circuit_open" { "it kept failing" } else { "it asked to slow down" }, .retry_after.as_secs().max(1))]
    ProviderBusy {
        /// Provider.
        provider: String,
        /// How long until it is tried again.
        retry_after: Duration,
        /// `rate_limited`, `circuit_open` or `limit`.
        reason: &'static str,
    },
    /// No webhook endpoint with that id.
    #[error("no such webhook endpoint")]
    WebhookNotFound,
    /// No event with that id (never written, or purged after
    /// INTEGRATIONS_EVENT_RETENTION).
    #[error("no event {0}: it never existed or was purged after INTEGRATIONS_EVENT_RETENTION")]
    EventNotFound(i64),
    /// The most webhook endpoints are registered.
    #[error(
        "{} webhook endpoints are registered, the most accepted; delete one first",
        crate::webhooks::MAX_ENDPOINTS
    )]
    TooManyWebhooks,
    /// A failure of our own (a bug): a status that did not render, a
    /// status loader gone before answering.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// This error again, for each caller that shared one failed load.
    pub(crate) fn shared(&self) -> ServiceError {
        match self {
            ServiceError::Db(db) => ServiceError::Db(db.clone()),
            ServiceError::Internal(message) => ServiceError::Internal(message.clone()),
            // Loads fail only with the two above.
            other => ServiceError::Internal(other.to_string()),
        }
    }
}

impl ServiceError {
    /// No integration for this provider and account.
    fn not_found(provider: &str, account_id: &str) -> ServiceError {
        ServiceError::NotFound {
            provider: provider.to_string(),
            account_id: account_id.to_string(),
        }
    }
}

impl From<db_pool::Error> for ServiceError {
    fn from(e: db_pool::Error) -> Self {
        ServiceError::Db(Arc::new(e))
    }
}

/// How many times a read whose connection turned out dead (P1017 before
/// any row came) is tried in all, each on another connection.
pub(crate) const READ_ATTEMPTS: u32 = 3;

/// `$read`, a read using `$conn` (a `&mut Conn` checked out of
/// `$service`'s pool), as a `Result<_, db_pool::Error>`. A read whose
/// connection turned out dead (its backend terminated, the server
/// restarted) is tried again on another connection, up to
/// [`READ_ATTEMPTS`] in all: it changed nothing, and when every backend
/// dies at once the next connection may be dead too. Only for statements
/// that write nothing. A macro, not a function taking a closure: the read
/// borrows its arguments beside the connection, which a closure returning
/// a future cannot express without boxing it.
macro_rules! retried_read {
    ($service:expr, |$conn:ident| $read:expr) => {{
        let mut attempt = 1;
        loop {
            let mut checked_out = $service.pool.get().await?;
            let $conn = &mut checked_out;
            match $read.await {
                Err(db_pool::Error::ConnectionClosed)
                    if attempt < $crate::service::READ_ATTEMPTS =>
                {
                    attempt += 1;
                }
                result => break result,
            }
        }
    }};
}
pub(crate) use retried_read;

/// A usable access token.
#[derive(Clone)]
pub struct AccessToken {
    /// The token.
    pub token: SecretString,
    /// When it expires (`None`: never).
    pub expires_at: Option<DateTime<Utc>>,
    /// `Bearer`, usually.
    pub token_type: String,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"[REDACTED]")
            .field("expires_at", &self.expires_at)
            .field("token_type", &self.token_type)
            .finish()
    }
}

/// The service. Cheap to share behind an `Arc`.
pub struct IntegrationsService {
    pool: Pool,
    keys: Arc<Keyring>,
    providers: Arc<ProviderRegistry>,
    tokens: TokenClient,
    cache: Arc<status::StatusCache>,
    flights: Mutex<lease::Flights>,
    /// Per-provider limits, pauses and circuit breakers of refreshes.
    gates: limits::ProviderGates,
    /// Successful refreshes waiting to be written.
    writes: writeback::WriteBack,
    config: ServiceConfig,
    /// The webhook client, built on first use.
    webhook_sender: tokio::sync::OnceCell<crate::webhooks::Sender>,
    /// Wakes the webhook dispatcher.
    webhook_wake: Arc<delivery::Wake>,
    /// The dashboard's overview, reused for a few seconds.
    overview: admin::OverviewCache,
}

impl std::fmt::Debug for IntegrationsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntegrationsService")
            .field("pool", &self.pool)
            .field("keys", &self.keys)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl IntegrationsService {
    /// Builds the service over a pool (migrations already applied).
    pub fn new(
        pool: Pool,
        keys: Keyring,
        providers: ProviderRegistry,
        tokens: TokenClient,
        config: ServiceConfig,
    ) -> IntegrationsService {
        IntegrationsService {
            cache: Arc::new(status::StatusCache::new(
                config.status_cache_ttl,
                config.status_cache_capacity,
            )),
            pool,
            keys: Arc::new(keys),
            gates: limits::ProviderGates::new(&providers),
            writes: writeback::WriteBack::default(),
            providers: Arc::new(providers),
            tokens,
            flights: Mutex::new(HashMap::new()),
            config,
            webhook_sender: tokio::sync::OnceCell::new(),
            webhook_wake: Arc::default(),
            overview: admin::OverviewCache::default(),
        }
    }

    /// The pool the service runs on.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The provider registry.
    pub fn providers(&self) -> &ProviderRegistry {
        &self.providers
    }

    /// The provider, when its client id and secret are both set. Checked
    /// before anything is claimed or sent: a missing variable is the
    /// operator's to fix, not a failure to count against an integration.
    fn configured(&self, p: &str) -> Result<&Provider, ServiceError> {
        let provider = self.providers.get(p)?;
        provider.credentials()?;
        Ok(provider)
    }

    /// The tunables.
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    fn aad(provider: &str, account_id: &str, field: &str) -> String {
        format!("integration:{provider}:{account_id}:{field}")
    }
}

/// A decrypted token as a secret: its bytes are moved, not copied (a
/// copy would be freed without being cleared).
fn secret(mut plain: Zeroizing<Vec<u8>>) -> SecretString {
    match String::from_utf8(std::mem::take(&mut *plain)) {
        Ok(text) => SecretString::from(text),
        Err(e) => {
            let bytes = Zeroizing::new(e.into_bytes());
            SecretString::from(String::from_utf8_lossy(&bytes).into_owned())
        }
    }
}
