//! `/v1/users/{user_id}/integrations`: a user's integrations.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::error::ApiError;
use super::extract::{ApiJson, ApiPath};
use super::AppState;
use crate::auth::Scope;
use crate::domain::{AccountId, IntegrationStatus, ProviderName, Status, UserId};
use crate::oauth::TokenSet;

/// The routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(put, delete))
}

/// An integration as the API shows it: never its tokens. Borrows from the
/// cached status, so serving from the cache copies nothing.
#[derive(Debug, Serialize, ToSchema)]
pub struct IntegrationView<'a> {
    /// Provider name.
    provider: &'a str,
    /// Account on the provider.
    account_id: &'a str,
    /// `connected`, `expired`, `error` or `revoked`.
    #[schema(value_type = String, example = "connected")]
    status: Status,
    /// Whether it works now (or will after a refresh).
    healthy: bool,
    /// Granted scopes.
    scopes: &'a [String],
    /// When the access token expires; null when it never does.
    #[serde(serialize_with = "rfc3339_opt")]
    expires_at: Option<DateTime<Utc>>,
    /// Last refresh.
    #[serde(serialize_with = "rfc3339_opt")]
    last_refresh_at: Option<DateTime<Utc>>,
    /// Refresh failures in a row.
    refresh_failures: i32,
    /// The last refresh error, if the last attempt failed.
    last_error: Option<&'a str>,
    /// Application data stored with it.
    #[schema(value_type = Object)]
    metadata: &'a serde_json::Value,
    /// First connected.
    #[serde(serialize_with = "rfc3339")]
    created_at: DateTime<Utc>,
    /// Last changed.
    #[serde(serialize_with = "rfc3339")]
    updated_at: DateTime<Utc>,
}

/// Timestamps as RFC 3339 in UTC, formatted into one string first: chrono's
/// `Serialize` goes through `Display` a character at a time, which was the
/// largest cost of rendering a status list.
fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
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

fn rfc3339_opt<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

impl<'a> From<&'a IntegrationStatus> for IntegrationView<'a> {
    fn from(s: &'a IntegrationStatus) -> Self {
        IntegrationView {
            provider: &s.provider,
            account_id: &s.account_id,
            status: s.status,
            healthy: s.healthy(),
            scopes: &s.scopes,
            expires_at: s.expires_at,
            last_refresh_at: s.last_refresh_at,
            refresh_failures: s.refresh_failures,
            last_error: s.last_error.as_deref(),
            metadata: &s.metadata,
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

/// A user's integrations.
#[derive(Debug, Serialize, ToSchema)]
pub struct IntegrationList<'a> {
    /// The user.
    user_id: &'a str,
    /// Their integrations, by provider and account.
    integrations: Vec<IntegrationView<'a>>,
}

/// List a user's integrations and their health (served from a cache with a
/// 5-minute TTL, invalidated by every write for the user).
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/integrations",
    params(("user_id" = String, Path, description = "The application's user id")),
    responses(
        (status = 200, description = "The user's integrations", body = IntegrationList<'static>),
        (status = 400, description = "Invalid user_id", body = super::error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = super::error::ErrorBody),
        (status = 403, description = "The key lacks the read scope", body = super::error::ErrorBody),
        (status = 503, description = "Database unavailable (P2024, P2037, P1001)", body = super::error::ErrorBody),
    ),
    security(("api_key" = ["read"])),
    tag = "integrations"
)]
async fn list(
    caller: Caller,
    State(state): State<AppState>,
    ApiPath(user_id): ApiPath<String>,
) -> Result<axum::response::Response, ApiError> {
    caller.require(Scope::Read)?;
    let user = UserId::parse(&user_id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let list = state.service.status(&user).await?;
    let body = serde_json::to_vec(&IntegrationList {
        user_id: &user_id,
        integrations: list.iter().map(IntegrationView::from).collect(),
    })
    .map_err(|e| ApiError::internal(&e))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// The body of `PUT`: the token response as the provider returned it
/// (`access_token`, `refresh_token`, `expires_in` or `expires_at`, `scope`
/// or `scopes`, `token_type`), plus optional `metadata`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct TokenBody {
    /// The access token.
    access_token: String,
    /// The refresh token, if any (omitted: the stored one is kept).
    refresh_token: Option<String>,
    /// Seconds until the access token expires.
    expires_in: Option<u64>,
    /// When it expires (unix seconds or RFC 3339), instead of expires_in.
    #[schema(value_type = Option<String>)]
    expires_at: Option<serde_json::Value>,
    /// Granted scopes, space or comma separated.
    scope: Option<String>,
    /// Granted scopes as a list.
    scopes: Option<Vec<String>>,
    /// Usually "Bearer".
    token_type: Option<String>,
    /// Application data to store with the integration (a JSON object).
    #[schema(value_type = Option<Object>)]
    metadata: Option<serde_json::Value>,
}

fn ids(
    user: &str,
    provider: &str,
    account: &str,
) -> Result<(UserId, ProviderName, AccountId), ApiError> {
    let bad = |e: crate::domain::InvalidInput| ApiError::bad_request(e.to_string());
    Ok((
        UserId::parse(user).map_err(bad)?,
        ProviderName::parse(provider).map_err(bad)?,
        AccountId::parse(account).map_err(bad)?,
    ))
}

/// Store tokens the application obtained itself (creates or replaces the
/// integration).
#[utoipa::path(
    put,
    path = "/v1/users/{user_id}/integrations/{provider}/{account_id}",
    params(
        ("user_id" = String, Path, description = "The application's user id"),
        ("provider" = String, Path, description = "Provider name, e.g. github"),
        ("account_id" = String, Path, description = "Account id on the provider"),
    ),
    request_body = TokenBody,
    responses(
        (status = 200, description = "Stored", body = IntegrationView<'static>),
        (status = 400, description = "Invalid body or path", body = super::error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = super::error::ErrorBody),
        (status = 403, description = "The key lacks the write scope", body = super::error::ErrorBody),
        (status = 404, description = "Unknown provider", body = super::error::ErrorBody),
        (status = 409, description = "The account belongs to another user", body = super::error::ErrorBody),
        (status = 413, description = "Body too large", body = super::error::ErrorBody),
    ),
    security(("api_key" = ["write"])),
    tag = "integrations"
)]
async fn put(
    caller: Caller,
    State(state): State<AppState>,
    ApiPath((user_id, provider, account_id)): ApiPath<(String, String, String)>,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<axum::response::Response, ApiError> {
    caller.require(Scope::Write)?;
    let (user, provider, account) = ids(&user_id, &provider, &account_id)?;
    let registered = state
        .service
        .providers()
        .get(provider.as_str())
        .map_err(crate::service::ServiceError::from)?;
    let tokens = TokenSet::from_response(&body, Utc::now(), registered.expiry)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let metadata = body.get("metadata").filter(|m| !m.is_null());
    let stored = state
        .service
        .connect(&user, &provider, &account, &tokens, metadata)
        .await?;
    Ok(Json(IntegrationView::from(&stored)).into_response())
}

/// Delete an integration, revoking its tokens at the provider where it has
/// a revoke URL.
#[utoipa::path(
    delete,
    path = "/v1/users/{user_id}/integrations/{provider}/{account_id}",
    params(
        ("user_id" = String, Path, description = "The application's user id"),
        ("provider" = String, Path, description = "Provider name"),
        ("account_id" = String, Path, description = "Account id on the provider"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid API key", body = super::error::ErrorBody),
        (status = 403, description = "The key lacks the write scope", body = super::error::ErrorBody),
        (status = 404, description = "No such integration", body = super::error::ErrorBody),
    ),
    security(("api_key" = ["write"])),
    tag = "integrations"
)]
async fn delete(
    caller: Caller,
    State(state): State<AppState>,
    ApiPath((user_id, provider, account_id)): ApiPath<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Write)?;
    let (user, provider, account) = ids(&user_id, &provider, &account_id)?;
    if state.service.disconnect(&user, &provider, &account).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such integration",
        ))
    }
}
