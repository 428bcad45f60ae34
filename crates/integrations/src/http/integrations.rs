//! `/v1/users/{user_id}/integrations`: a user's integrations.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::Utc;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Caller, Read, Write};
use super::error::ApiError;
use super::extract::{ApiJson, ApiPath};
use super::AppState;

use crate::domain::{AccountId, IntegrationList, IntegrationView, ProviderName, UserId};
use crate::oauth::TokenSet;

/// The routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(put, delete))
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
    _: Caller<Read>,
    State(state): State<AppState>,
    ApiPath(user_id): ApiPath<String>,
) -> Result<axum::response::Response, ApiError> {
    let user = UserId::parse(&user_id)?;
    // The cache keeps each user's rendering: a hit writes the kept bytes.
    let list = state.service.status(&user).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        list.json().clone(),
    )
        .into_response())
}

/// The body of `PUT`: the token response as the provider returned it
/// (`access_token`, `refresh_token`, `expires_in` or `expires_at`, `scope`
/// or `scopes`, `token_type`), plus optional `metadata`.
#[derive(ToSchema)]
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
    Ok((
        UserId::parse(user)?,
        ProviderName::parse(provider)?,
        AccountId::parse(account)?,
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
    _: Caller<Write>,
    State(state): State<AppState>,
    ApiPath((user_id, provider, account_id)): ApiPath<(String, String, String)>,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<axum::response::Response, ApiError> {
    let (user, provider, account) = ids(&user_id, &provider, &account_id)?;
    // A provider's response may carry both forms; a client's request that
    // does is ambiguous: say so rather than pick one.
    for (a, b) in [("scope", "scopes"), ("expires_in", "expires_at")] {
        let given = |f: &str| body.get(f).is_some_and(|v| !v.is_null());
        if given(a) && given(b) {
            return Err(ApiError::bad_request(format!(
                "both {a} and {b} are given; accepted: one of them"
            )));
        }
    }
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

/// What `DELETE` answers: the integration is gone here; `revocation` says
/// whether the provider confirmed the grant is gone there too.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct DeletedBody {
    /// Always true: the integration and its tokens are deleted here.
    pub deleted: bool,
    /// Whether the provider confirmed the revocation.
    pub revoked_at_provider: bool,
    /// `revoked`, `not_supported` (the provider has no revocation
    /// endpoint) or `failed` (the grant may still work at the provider:
    /// revoke it there, or retry by connecting and deleting again).
    pub revocation: crate::service::Revocation,
    /// Why revoking failed, when it did (never a token).
    pub revoke_error: Option<RevokeError>,
}

/// Why revoking at the provider failed.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct RevokeError {
    /// What the provider or the network said.
    pub message: String,
}

/// Delete an integration, revoking its tokens at the provider where it has
/// a revoke URL. The integration is deleted even when revoking fails; the
/// answer says which happened.
#[utoipa::path(
    delete,
    path = "/v1/users/{user_id}/integrations/{provider}/{account_id}",
    params(
        ("user_id" = String, Path, description = "The application's user id"),
        ("provider" = String, Path, description = "Provider name"),
        ("account_id" = String, Path, description = "Account id on the provider"),
    ),
    responses(
        (status = 200, description = "Deleted; `revocation` says what the provider did", body = DeletedBody),
        (status = 400, description = "A path segment is invalid", body = super::error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = super::error::ErrorBody),
        (status = 403, description = "The key lacks the write scope", body = super::error::ErrorBody),
        (status = 404, description = "No such integration", body = super::error::ErrorBody),
    ),
    security(("api_key" = ["write"])),
    tag = "integrations"
)]
async fn delete(
    _: Caller<Write>,
    State(state): State<AppState>,
    ApiPath((user_id, provider, account_id)): ApiPath<(String, String, String)>,
) -> Result<Json<DeletedBody>, ApiError> {
    let (user, provider, account) = ids(&user_id, &provider, &account_id)?;
    match state.service.disconnect(&user, &provider, &account).await? {
        Some(done) => Ok(Json(DeletedBody {
            deleted: true,
            revoked_at_provider: done.revocation == crate::service::Revocation::Revoked,
            revocation: done.revocation,
            revoke_error: done.revoke_error.map(|message| RevokeError { message }),
        })),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such integration",
        )),
    }
}
