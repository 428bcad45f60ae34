//! The OAuth connect flow over HTTP.

use axum::extract::State;
use axum::http::{header, HeaderValue};
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
use super::openapi::PROVIDER_UNAVAILABLE;
use super::AppState;
use crate::domain::{IntegrationView, ProviderName, UserId};
use secrecy::ExposeSecret;

/// The routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(start))
        .routes(routes!(callback))
        .routes(routes!(complete))
}

/// Who connects, and where to send them afterwards.
#[derive(Deserialize, ToSchema)]
pub struct ConnectRequest {
    /// The application's user id.
    #[schema(schema_with = user_schema)]
    user_id: String,
    /// Where the user is sent when the provider answered (absolute http(s)
    /// URL); it receives
    /// `status=authorized&provider=..&account_id=..&completion_code=..`
    /// (then confirm with `POST /v1/connect/complete`) or
    /// `status=error&error=<code>`. Its origin must be one of
    /// INTEGRATIONS_REDIRECT_ORIGINS, and it may not carry userinfo.
    #[schema(min_length = 1, example = "https://app.example.com/integrations/done")]
    redirect_uri: String,
}

fn user_schema() -> utoipa::openapi::Object {
    super::openapi::id_schema(UserId::MAX_LEN, UserId::PATTERN, "user-1")
}

fn optional_user_schema() -> utoipa::openapi::Object {
    let mut schema = user_schema();
    schema.schema_type = utoipa::openapi::schema::SchemaType::Array(vec![
        utoipa::openapi::Type::String,
        utoipa::openapi::Type::Null,
    ]);
    schema
}

/// Where to send the user, and the flow to keep.
#[derive(Serialize, ToSchema)]
pub struct ConnectStarted {
    /// The provider's authorize URL, with a single-use state and PKCE.
    authorize_url: String,
    /// Keep it in the session of the user you are connecting; only a
    /// browser that comes back holding it may complete the flow.
    flow_id: String,
    /// When the state expires (10 minutes).
    expires_at: DateTime<Utc>,
}

/// Start connecting a provider: returns the authorize URL to send the user to.
#[utoipa::path(
    post,
    path = "/v1/connect/{provider}",
    operation_id = "start_connect",
    params(("provider" = String, Path, description = "Provider name")),
    request_body = ConnectRequest,
    responses(
        (status = 200, description = "The authorize URL", body = ConnectStarted, links(
            ("CompleteConnect" = (operation_id = "complete_connect", request_body = json!({"flow_id": "$response.body#/flow_id", "completion_code": "unknown", "user_id": "$request.body#/user_id"}))),
        )),
        (status = 400, description = "The provider name or the body is invalid (naming the field); redirect_uri is not an absolute http(s) URL, its origin is not in INTEGRATIONS_REDIRECT_ORIGINS, or it carries userinfo; or the service has no INTEGRATIONS_CALLBACK_URL", body = ErrorBody),
        (status = 502, description = "The provider's registry entry cannot build an authorize URL (`oauth_failed`)", body = ErrorBody),
        (status = 503, description = PROVIDER_UNAVAILABLE, body = ErrorBody),
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
        flow_id: started.flow_id.expose_secret().to_string(),
        expires_at: started.expires_at,
    }))
}

/// What the provider sends back.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallbackQuery {
    /// The state from the authorize URL.
    #[param(required = true, value_type = String)]
    state: Option<String>,
    /// The authorization code.
    code: Option<String>,
    /// Set when the user or provider refused.
    error: Option<String>,
}

/// Where the provider redirects the user (no API key: the user's browser
/// comes here). Exchanges the code, keeps the answer pending and redirects
/// to the application's redirect_uri with `status=authorized` and a
/// single-use completion code (never the provider's code), or
/// `status=error`. Nothing is connected until the application confirms.
/// The redirect carries no flow id on purpose: the application must take
/// it from its user's session, so it cannot skip that check.
#[utoipa::path(
    get,
    path = "/v1/oauth/callback",
    operation_id = "oauth_callback",
    params(CallbackQuery),
    responses(
        (status = 303, description = "Back to the application's redirect_uri with status=authorized (then POST /v1/connect/complete) or status=error and error=<code> (`access_denied`, `oauth_failed`, `provider_not_configured`, ...)"),
        (status = 400, description = "state is missing, unknown, used or expired, or the query is malformed", body = ErrorBody),
        (status = 503, description = PROVIDER_UNAVAILABLE, body = ErrorBody),
    ),
    tag = "connect"
)]
async fn callback(State(state): State<AppState>, ApiQuery(q): ApiQuery<CallbackQuery>) -> Response {
    let mut response = callback_outcome(&state, q).await;
    // The redirect's query carries the completion code: no Referer may
    // take it (or this page's URL, which carried the provider's code)
    // elsewhere, and no cache may keep it.
    let headers = response.headers_mut();
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn callback_outcome(state: &AppState, q: CallbackQuery) -> Response {
    let Some(state_value) = q.state else {
        return ApiError::bad_request("state is missing from the callback").into_response();
    };
    let code = match (q.code, q.error) {
        (Some(code), None) => code,
        (_, error) => {
            // The user refused (or the provider failed): end the flow.
            let redirect = state.service.abandon_connect(&state_value).await;
            let reason = crate::oauth::authorization_error(error.as_deref());
            return match redirect {
                Some(uri) => {
                    Redirect::to(&with_query(&uri, &[("status", "error"), ("error", reason)]))
                        .into_response()
                }
                None => ApiError::bad_request("the OAuth state is unknown or already used")
                    .into_response(),
            };
        }
    };
    let finished = state.service.finish_connect(&state_value, &code).await;
    match (finished.redirect_uri, finished.result) {
        (Some(uri), Ok(a)) => Redirect::to(&with_query(
            &uri,
            &[
                ("status", "authorized"),
                ("provider", &a.provider),
                ("account_id", &a.account_id),
                ("completion_code", a.completion_code.expose_secret()),
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

/// The application's confirmation.
#[derive(Deserialize, ToSchema)]
pub struct CompleteRequest {
    /// The flow id `POST /v1/connect/{provider}` returned, read from the
    /// session of the user whose browser came back (never from the URL
    /// alone).
    #[schema(min_length = 1)]
    flow_id: String,
    /// The `completion_code` the browser brought back to the redirect_uri.
    #[schema(min_length = 1)]
    completion_code: String,
    /// Optional: the application's user; when given it must be the user
    /// the flow was started for.
    #[serde(default)]
    #[schema(schema_with = optional_user_schema)]
    user_id: Option<String>,
}

/// Confirm a connect flow: stores the integration the provider authorised.
/// Call it only after checking that the browser that came back to your
/// redirect_uri holds `flow_id` in its session. Single use; the answer
/// waits 10 minutes at most.
#[utoipa::path(
    post,
    path = "/v1/connect/complete",
    operation_id = "complete_connect",
    request_body = CompleteRequest,
    responses(
        (status = 200, description = "The integration, connected", body = IntegrationView<'static>, links(
            ("GetToken" = (operation_id = "get_token", parameters(("provider" = "$response.body#/provider"), ("account_id" = "$response.body#/account_id")))),
        )),
        (status = 400, description = "Unknown, completed, expired or mismatched flow (`invalid_flow`), or an invalid body (naming the field)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the write scope", body = ErrorBody),
        (status = 409, description = "The account is connected to another user", body = ErrorBody),
    ),
    security(("api_key" = ["write"])),
    tag = "connect"
)]
async fn complete(
    _: Caller<Write>,
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CompleteRequest>,
) -> Result<Response, ApiError> {
    let user = body.user_id.as_deref().map(UserId::parse).transpose()?;
    let status = state
        .service
        .complete_connect(&body.flow_id, &body.completion_code, user.as_ref())
        .await?;
    Ok(Json(IntegrationView::from(&status)).into_response())
}

fn with_query(uri: &str, pairs: &[(&str, &str)]) -> String {
    match url::Url::parse(uri) {
        Ok(mut u) => {
            // The outcome is ours to say: parameters of the same names the
            // application's redirect_uri already carried are replaced, so
            // the page reads one status, not the first of two.
            let kept: Vec<(String, String)> = u
                .query_pairs()
                .into_owned()
                .filter(|(k, _)| !OUTCOME_PARAMS.contains(&k.as_str()))
                .collect();
            u.set_query(None);
            u.query_pairs_mut().extend_pairs(kept).extend_pairs(pairs);
            u.to_string()
        }
        Err(_) => uri.to_string(),
    }
}

/// The parameters the callback adds to the application's redirect_uri.
const OUTCOME_PARAMS: [&str; 5] = [
    "status",
    "provider",
    "account_id",
    "error",
    "completion_code",
];
