//! An integration as callers see it: everything but the tokens.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where an integration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Tokens valid or refreshable.
    Connected,
    /// The access token expired and cannot be refreshed (no refresh token).
    Expired,
    /// Refreshing failed repeatedly; retried with backoff.
    Error,
    /// The provider revoked the grant (`invalid_grant`): reconnect.
    Revoked,
}

impl Status {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Connected => "connected",
            Status::Expired => "expired",
            Status::Error => "error",
            Status::Revoked => "revoked",
        }
    }

    /// Whether an integration in this state works now, or will after a
    /// refresh.
    pub fn healthy(self) -> bool {
        self == Status::Connected
    }

    /// Parses the database spelling (unknown values read as `error`).
    pub fn from_db(s: &str) -> Status {
        match s {
            "connected" => Status::Connected,
            "expired" => Status::Expired,
            "revoked" => Status::Revoked,
            _ => Status::Error,
        }
    }
}

/// One integration's state, without tokens: what `status(user_id)` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntegrationStatus {
    /// Provider name.
    pub provider: String,
    /// Account on the provider.
    pub account_id: String,
    /// Connected, expired, error or revoked.
    pub status: Status,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// When the access token expires (`None`: never).
    pub expires_at: Option<DateTime<Utc>>,
    /// When the token was last refreshed.
    pub last_refresh_at: Option<DateTime<Utc>>,
    /// Refresh failures in a row.
    pub refresh_failures: i32,
    /// The last refresh error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Application data stored with the integration.
    pub metadata: serde_json::Value,
    /// When it was first connected.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

impl IntegrationStatus {
    /// Whether the integration works now, or will after a refresh.
    pub fn healthy(&self) -> bool {
        self.status.healthy()
    }
}
