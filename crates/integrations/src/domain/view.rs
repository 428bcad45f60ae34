//! How an integration is shown (the API's JSON, and the status cache's
//! rendering of a user's list): everything but its tokens. One shape, built
//! from a stored [`IntegrationStatus`] or borrowed straight from a database
//! row (the status path renders rows without building statuses first).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::{IntegrationStatus, Status};

/// An integration as the API shows it: never its tokens. Borrows what it
/// shows, so rendering copies nothing first.
#[derive(Debug, Serialize, ToSchema)]
pub struct IntegrationView<'a> {
    /// Provider name.
    pub provider: &'a str,
    /// Account on the provider.
    pub account_id: &'a str,
    /// `connected`, `expired`, `error` or `revoked`.
    #[schema(value_type = String, example = "connected")]
    pub status: Status,
    /// Whether it works now (or will after a refresh).
    pub healthy: bool,
    /// Granted scopes.
    #[schema(value_type = Vec<String>)]
    pub scopes: Scopes<'a>,
    /// When the access token expires; null when it never does.
    #[serde(serialize_with = "rfc3339_opt")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Last refresh.
    #[serde(serialize_with = "rfc3339_opt")]
    pub last_refresh_at: Option<DateTime<Utc>>,
    /// Refresh failures in a row.
    pub refresh_failures: i32,
    /// The last refresh error, if the last attempt failed.
    pub last_error: Option<&'a str>,
    /// Application data stored with it.
    #[schema(value_type = Object)]
    pub metadata: Metadata<'a>,
    /// First connected.
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    /// Last changed.
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: DateTime<Utc>,
}

/// Scopes, owned by a status or borrowed from a row.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Scopes<'a> {
    /// A status's scopes.
    Owned(&'a [String]),
    /// A row's scopes.
    Borrowed(Vec<&'a str>),
}

/// Metadata, parsed in a status or raw from a row (written as it is).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Metadata<'a> {
    /// A status's metadata.
    Value(&'a serde_json::Value),
    /// A row's `jsonb`, as PostgreSQL printed it.
    Raw(&'a RawValue),
}

/// A user's integrations.
#[derive(Debug, Serialize, ToSchema)]
pub struct IntegrationList<'a> {
    /// The user.
    pub user_id: &'a str,
    /// Their integrations, by provider and account.
    pub integrations: &'a [IntegrationView<'a>],
}

impl<'a> From<&'a IntegrationStatus> for IntegrationView<'a> {
    fn from(s: &'a IntegrationStatus) -> Self {
        IntegrationView {
            provider: &s.provider,
            account_id: &s.account_id,
            status: s.status,
            healthy: s.healthy(),
            scopes: Scopes::Owned(&s.scopes),
            expires_at: s.expires_at,
            last_refresh_at: s.last_refresh_at,
            refresh_failures: s.refresh_failures,
            last_error: s.last_error.as_deref(),
            metadata: Metadata::Value(&s.metadata),
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

/// Timestamps as RFC 3339 in UTC, formatted into one string first: chrono's
/// `Serialize` goes through `Display` a character at a time, which was the
/// largest cost of rendering a status list.
pub(crate) fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    use chrono::{Datelike, Timelike};
    // YYYY-MM-DDTHH:MM:SS.ffffffZ, digits written directly.
    let mut buf = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (0..width).rev() {
            buf[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, t.year().clamp(0, 9999) as u32);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    put(20, 6, t.nanosecond() % 1_000_000_000 / 1000);
    s.serialize_str(std::str::from_utf8(&buf).unwrap_or_default())
}

pub(crate) fn rfc3339_opt<S: serde::Serializer>(
    t: &Option<DateTime<Utc>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}
