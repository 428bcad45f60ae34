//! `/v1/integrations/...`: access tokens and refreshes.

use axum::extract::State;
use axum::http::header::CACHE_CONTROL;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Caller, Credentials, Write};
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath};
use super::AppState;
use crate::domain::IntegrationView;
use crate::domain::{AccountId, ProviderName};
use crate::service::{RefreshRequest, DEFAULT_BATCH_CONCURRENCY};

/// Most requests in one batch.
const MAX_BATCH: usize = 1000;

/// The routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(token))
        .routes(routes!(refresh))
        .routes(routes!(batch_refresh))
}

fn key(provider: &str, account: &str) -> Result<(ProviderName, AccountId), ApiError> {
    Ok((ProviderName::parse(provider)?, AccountId::parse(account)?))
}

/// A usable access token.
#[derive(Serialize, ToSchema)]
pub struct TokenView {
    /// The access token.
    access_token: String,
    /// When it expires; null when it never does.
    expires_at: Option<DateTime<Utc>>,
    /// Usually "Bearer".
    token_type: String,
}

/// A valid access token, refreshed first when it expires within the margin
/// (5 minutes). Needs the `credentials` scope.
#[utoipa::path(
    get,
    path = "/v1/integrations/{provider}/{account_id}/token",
    params(
        ("provider" = String, Path, description = "Provider name"),
        ("account_id" = String, Path, description = "Account id on the provider"),
    ),
    responses(
        (status = 200, description = "A valid access token", body = TokenView),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the credentials scope", body = ErrorBody),
        (status = 404, description = "No such integration or provider", body = ErrorBody),
        (status = 409, description = "Revoked or expired: the user must reconnect", body = ErrorBody),
        (status = 502, description = "The provider failed to refresh", body = ErrorBody),
    ),
    security(("api_key" = ["credentials"])),
    tag = "tokens"
)]
async fn token(
    _: Caller<Credentials>,
    State(state): State<AppState>,
    ApiPath((provider, account_id)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let (p, a) = key(&provider, &account_id)?;
    let t = state.service.access_token(&p, &a).await?;
    let mut response = Json(TokenView {
        access_token: t.token.expose_secret().to_string(),
        expires_at: t.expires_at,
        token_type: t.token_type,
    })
    .into_response();
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Refresh one integration's token now.
#[utoipa::path(
    post,
    path = "/v1/integrations/{provider}/{account_id}/refresh",
    params(
        ("provider" = String, Path, description = "Provider name"),
        ("account_id" = String, Path, description = "Account id on the provider"),
    ),
    responses(
        (status = 200, description = "Refreshed", body = IntegrationView<'static>),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the write scope", body = ErrorBody),
        (status = 404, description = "No such integration or provider", body = ErrorBody),
        (status = 409, description = "Revoked: the user must reconnect", body = ErrorBody),
        (status = 502, description = "The provider failed; the stored tokens are unchanged", body = ErrorBody),
    ),
    security(("api_key" = ["write"])),
    tag = "tokens"
)]
async fn refresh(
    _: Caller<Write>,
    State(state): State<AppState>,
    ApiPath((provider, account_id)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let (p, a) = key(&provider, &account_id)?;
    let status = state.service.refresh(&p, &a).await?;
    Ok(Json(IntegrationView::from(&status)).into_response())
}

/// One integration to refresh.
#[derive(Deserialize, ToSchema)]
pub struct BatchItem {
    /// Provider name.
    provider: String,
    /// Account id on the provider.
    account_id: String,
}

/// A batch of refreshes.
#[derive(Deserialize, ToSchema)]
pub struct BatchRequest {
    /// What to refresh (at most 1000).
    requests: Vec<BatchItem>,
    /// Refreshes in flight (default 5, at most 50).
    concurrency: Option<usize>,
}

/// One result per request, in order.
#[derive(Serialize, ToSchema)]
pub struct BatchResponse {
    /// Results, in request order.
    results: Vec<BatchResult>,
}

/// One request's outcome.
#[derive(Serialize, ToSchema)]
pub struct BatchResult {
    /// Provider.
    provider: String,
    /// Account.
    account_id: String,
    /// Whether it was refreshed.
    ok: bool,
    /// The new state, when ok (an integration as in the list).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    integration: Option<serde_json::Value>,
    /// Why not, when not ok (same shape as an error response's `error`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    error: Option<serde_json::Value>,
}

/// Refresh many integrations: a sliding window of `concurrency` refreshes,
/// one result per request in order; one failure does not fail the batch.
#[utoipa::path(
    post,
    path = "/v1/integrations/refresh",
    request_body = BatchRequest,
    responses(
        (status = 200, description = "Per-item results", body = BatchResponse),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the write scope", body = ErrorBody),
    ),
    security(("api_key" = ["write"])),
    tag = "tokens"
)]
async fn batch_refresh(
    _: Caller<Write>,
    State(state): State<AppState>,
    ApiJson(body): ApiJson<BatchRequest>,
) -> Result<Json<BatchResponse>, ApiError> {
    if body.requests.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!(
            "requests has {} items; accepted: at most {MAX_BATCH}",
            body.requests.len()
        )));
    }
    let concurrency = body.concurrency.unwrap_or(DEFAULT_BATCH_CONCURRENCY);
    if !(1..=50).contains(&concurrency) {
        return Err(ApiError::bad_request(
            "concurrency is invalid: accepted 1 to 50",
        ));
    }
    let mut parsed = Vec::with_capacity(body.requests.len());
    for (i, item) in body.requests.iter().enumerate() {
        let (provider, account_id) = ProviderName::parse(&item.provider)
            .map_err(|e| format!("requests[{i}].provider: {e}"))
            .and_then(|p| {
                AccountId::parse(&item.account_id)
                    .map(|a| (p, a))
                    .map_err(|e| format!("requests[{i}].account_id: {e}"))
            })
            .map_err(ApiError::bad_request)?;
        parsed.push(RefreshRequest {
            provider,
            account_id,
        });
    }
    let results = state.service.batch_refresh(parsed, concurrency).await;
    let results = body
        .requests
        .into_iter()
        .zip(results)
        .map(|(item, result)| match result {
            Ok(status) => BatchResult {
                provider: item.provider,
                account_id: item.account_id,
                ok: true,
                integration: serde_json::to_value(IntegrationView::from(&status)).ok(),
                error: None,
            },
            Err(e) => BatchResult {
                provider: item.provider,
                account_id: item.account_id,
                ok: false,
                integration: None,
                error: Some(ApiError::from(e).detail()),
            },
        })
        .collect();
    Ok(Json(BatchResponse { results }))
}
