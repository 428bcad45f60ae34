//! The OAuth side: the provider registry (`providers.toml`), the token
//! response parser, and the token client that exchanges, refreshes and
//! revokes tokens and learns account ids.

pub mod client;
pub mod providers;
pub mod token;

pub use client::{
    authorization_error, authorize_url, error_code, error_description, pkce_challenge, pkce_pair,
    OAuthError, TokenClient, TokenClientConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT,
};
pub use providers::{
    AccountIdFrom, AccountIdRule, ClientAuth, MissingCredential, Provider, ProviderRegistry,
    RefreshLimits, RegistryError, UnknownProvider, DEFAULT_PROVIDERS_TOML, DEFAULT_SOURCE,
    FALLBACK_EXPIRES_IN,
};
pub use token::{Expiry, TokenError, TokenSet};
