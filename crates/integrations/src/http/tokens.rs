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
use super::openapi::PROVIDER_UNAVAILABLE;
use super::AppState;
use crate::domain::IntegrationView;
use crate::domain::{AccountId, ProviderName};
use crate::service::{RefreshRequest, DEFAULT_BATCH_CONCURRENCY};

/// Most requests in one batch (`maxItems` in the document).
const MAX_BATCH: usize = 1000;

/// Most refreshes in flight in one batch (`maximum` in the document).
const MAX_BATCH_CONCURRENCY: usize = 50;

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
    operation_id = "get_token",
    params(
        ("provider" = String, Path, description = "Provider name"),
        ("account_id" = String, Path, description = "Account id on the provider"),
    ),
    responses(
        (status = 200, description = "A valid access token", body = TokenView),
        (status = 400, description = "A path parameter is invalid (naming it)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the credentials scope", body = ErrorBody),
        (status = 404, description = "No such integration or provider", body = ErrorBody),
        (status = 409, description = "Revoked or expired: the user must reconnect (`reconnect_required`)", body = ErrorBody),
        (status = 502, description = "The provider failed to refresh (`refresh_failed`; `Retry-After` when worth retrying)", body = ErrorBody),
        (status = 503, description = PROVIDER_UNAVAILABLE, body = ErrorBody),
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
    operation_id = "refresh_integration",
    params(
        ("provider" = String, Path, description = "Provider name"),
        ("account_id" = String, Path, description = "Account id on the provider"),
    ),
    responses(
        (status = 200, description = "Refreshed", body = IntegrationView<'static>, links(
            ("GetToken" = (operation_id = "get_token", parameters(("provider" = "$request.path.provider"), ("account_id" = "$request.path.account_id")))),
        )),
        (status = 400, description = "A path parameter is invalid (naming it)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the write scope", body = ErrorBody),
        (status = 404, description = "No such integration or provider", body = ErrorBody),
        (status = 409, description = "Revoked or expired: the user must reconnect (`reconnect_required`); or stored without a refresh token (`no_refresh_token`): it stays valid until it expires", body = ErrorBody),
        (status = 502, description = "The provider failed (`refresh_failed`; `Retry-After` when worth retrying); the stored tokens are unchanged", body = ErrorBody),
        (status = 503, description = PROVIDER_UNAVAILABLE, body = ErrorBody),
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
    #[schema(schema_with = provider_schema)]
    provider: String,
    /// Account id on the provider.
    #[schema(schema_with = account_schema)]
    account_id: String,
}

fn provider_schema() -> utoipa::openapi::Object {
    super::openapi::id_schema(ProviderName::MAX_LEN, ProviderName::PATTERN, "github")
}

fn account_schema() -> utoipa::openapi::Object {
    super::openapi::id_schema(AccountId::MAX_LEN, AccountId::PATTERN, "12345")
}

/// A batch of refreshes.
#[derive(Deserialize, ToSchema)]
pub struct BatchRequest {
    /// What to refresh.
    #[schema(max_items = 1000)]
    requests: Vec<BatchItem>,
    /// Refreshes in flight (default 5). A number: JSON Schema counts `5.0`
    /// as the integer 5, and so does the server.
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 50)]
    concurrency: Option<serde_json::Number>,
}

/// `concurrency` as a count, when it is an integer from 1 to
/// [`MAX_BATCH_CONCURRENCY`] (`5.0` included).
fn concurrency(n: &serde_json::Number) -> Option<usize> {
    let n = match n.as_u64() {
        Some(n) => n,
        None => n
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0)
            .map(|f| f as u64)?,
    };
    usize::try_from(n)
        .ok()
        .filter(|n| (1..=MAX_BATCH_CONCURRENCY).contains(n))
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
        (status = 400, description = "The body is invalid (naming the field)", body = ErrorBody),
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
    let concurrency = match &body.concurrency {
        None => DEFAULT_BATCH_CONCURRENCY,
        Some(n) => concurrency(n).ok_or_else(|| {
            ApiError::bad_request(format!(
                "concurrency is invalid: it is {n}; accepted: an integer from 1 to {MAX_BATCH_CONCURRENCY}"
            ))
        })?,
    };
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
