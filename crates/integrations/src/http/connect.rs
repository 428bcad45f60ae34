//! The OAuth connect flow over HTTP.

use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Caller, Write};
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::AppState;
use crate::domain::{ProviderName, UserId};

/// The routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(start))
        .routes(routes!(callback))
}

/// Who connects, and where to send them afterwards.
#[derive(Deserialize, ToSchema)]
pub struct ConnectRequest {
    /// The application's user id.
    user_id: String,
    /// Where the user is sent when the flow ends (absolute http(s) URL);
    /// it receives `status=connected&provider=..&account_id=..` or
    /// `status=error&error=<code>`.
    redirect_uri: String,
}

/// Where to send the user.
#[derive(Serialize, ToSchema)]
pub struct ConnectStarted {
    /// The provider's authorize URL, with a single-use state and PKCE.
    authorize_url: String,
    /// When the state expires (10 minutes).
    expires_at: DateTime<Utc>,
}

/// Start connecting a provider: returns the authorize URL to send the user to.
#[utoipa::path(
    post,
    path = "/v1/connect/{provider}",
    params(("provider" = String, Path, description = "Provider name")),
    request_body = ConnectRequest,
    responses(
        (status = 200, description = "The authorize URL", body = ConnectStarted),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the write scope", body = ErrorBody),
        (status = 404, description = "Unknown provider", body = ErrorBody),
    ),
    security(("api_key" = ["write"])),
    tag = "connect"
)]
async fn start(
    _: Caller<Write>,
    State(state): State<AppState>,
    ApiPath(provider): ApiPath<String>,
    ApiJson(body): ApiJson<ConnectRequest>,
) -> Result<Json<ConnectStarted>, ApiError> {
    let provider = ProviderName::parse(&provider)?;
    let user = UserId::parse(&body.user_id)?;
    let started = state
        .service
        .start_connect(&user, &provider, &body.redirect_uri)
        .await?;
    Ok(Json(ConnectStarted {
        authorize_url: started.authorize_url,
        expires_at: started.expires_at,
    }))
}

/// What the provider sends back.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallbackQuery {
    /// The state from the authorize URL.
    state: Option<String>,
    /// The authorization code.
    code: Option<String>,
    /// Set when the user or provider refused.
    error: Option<String>,
}

/// Where the provider redirects the user (no API key: the user's browser
/// comes here). Finishes the flow and redirects to the application's
/// redirect_uri with the outcome.
#[utoipa::path(
    get,
    path = "/v1/oauth/callback",
    params(CallbackQuery),
    responses(
        (status = 303, description = "Back to the application's redirect_uri with status=connected or status=error"),
        (status = 400, description = "Unknown, used or expired state", body = ErrorBody),
    ),
    tag = "connect"
)]
async fn callback(State(state): State<AppState>, ApiQuery(q): ApiQuery<CallbackQuery>) -> Response {
    let Some(state_value) = q.state else {
        return ApiError::bad_request("state is missing from the callback").into_response();
    };
    let code = match (q.code, q.error) {
        (Some(code), None) => code,
        (_, error) => {
            // The user refused (or the provider failed): end the flow.
            let redirect = state.service.abandon_connect(&state_value).await;
            let reason = error.unwrap_or_else(|| "missing_code".into());
            return match redirect {
                Some(uri) => Redirect::to(&with_query(
                    &uri,
                    &[("status", "error"), ("error", &reason)],
                ))
                .into_response(),
                None => ApiError::bad_request("the OAuth state is unknown or already used")
                    .into_response(),
            };
        }
    };
    let finished = state.service.finish_connect(&state_value, &code).await;
    match (finished.redirect_uri, finished.result) {
        (Some(uri), Ok(i)) => Redirect::to(&with_query(
            &uri,
            &[
                ("status", "connected"),
                ("provider", &i.provider),
                ("account_id", &i.account_id),
            ],
        ))
        .into_response(),
        (Some(uri), Err(e)) => {
            let api = ApiError::from(e);
            let code = api.detail()["code"].as_str().unwrap_or("error").to_string();
            Redirect::to(&with_query(&uri, &[("status", "error"), ("error", &code)]))
                .into_response()
        }
        (None, Err(e)) => ApiError::from(e).into_response(),
        (None, Ok(_)) => ApiError::bad_request("the OAuth state is unknown").into_response(),
    }
}

fn with_query(uri: &str, pairs: &[(&str, &str)]) -> String {
    match url::Url::parse(uri) {
        Ok(mut u) => {
            u.query_pairs_mut().extend_pairs(pairs);
            u.to_string()
        }
        Err(_) => uri.to_string(),
    }
}
