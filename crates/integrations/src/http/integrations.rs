//! `/v1/users/{user_id}/integrations`: a user's integrations.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Caller, Read, Write};
use super::error::ApiError;
use super::extract::{ApiJson, ApiPath};
use super::AppState;

use crate::domain::{AccountId, IntegrationList, IntegrationView, ProviderName, UserId};

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
    operation_id = "list_integrations",
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
/// or `scopes`, `token_type`), plus optional `metadata`. Parsed by
/// [`crate::oauth::TokenSet::from_response`]; its schema, written out here, says what that
/// parser accepts (other fields are kept as extra token data).
pub struct TokenBody;

/// Holds a character Rust's `str::trim` keeps (one that is not Unicode
/// `White_Space`): what "not blank" means to the parser.
const NOT_BLANK: &str = r"[^\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]";

/// Seconds as text. The parser takes any finite number Rust's `f64` parser
/// reads (after trimming); documented is the plain decimal form.
const SECONDS_TEXT: &str = r"^[0-9]{1,9}(\.[0-9]+)?$";

/// Unix seconds or an RFC 3339 instant, as text (the plain forms of what
/// the parser reads).
const INSTANT_TEXT: &str = r"^([0-9]{1,9}(\.[0-9]+)?|20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-](0[0-9]|1[0-3]):[0-5][0-9]))$";

impl utoipa::PartialSchema for TokenBody {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{
            AllOfBuilder, AnyOfBuilder, ArrayBuilder, ObjectBuilder, SchemaType, Type,
        };
        let types = |t: &[Type]| SchemaType::Array(t.to_vec());
        let string = |description: &str| {
            ObjectBuilder::new()
                .schema_type(types(&[Type::String, Type::Null]))
                .description(Some(description))
        };
        // At most one of two fields is given (null counts as not given).
        let one_of = |a: &str, b: &str| {
            let null = || ObjectBuilder::new().schema_type(Type::Null);
            AnyOfBuilder::new()
                .item(ObjectBuilder::new().property(a, null()))
                .item(ObjectBuilder::new().property(b, null()))
        };
        let fields = ObjectBuilder::new()
            .schema_type(Type::Object)
            .required("access_token")
            .property(
                "access_token",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(NOT_BLANK))
                    .description(Some("The access token (not blank).")),
            )
            .property(
                "refresh_token",
                string("The refresh token, if any (omitted, null or blank: the stored one is kept)."),
            )
            .property(
                "expires_in",
                ObjectBuilder::new()
                    .schema_type(types(&[Type::Number, Type::String, Type::Null]))
                    .minimum(Some(0))
                    .maximum(Some(3_153_600_000u64))
                    .pattern(Some(SECONDS_TEXT))
                    .description(Some("Seconds until the access token expires (at most 100 years), as a number or numeric text.")),
            )
            .property(
                "expires_at",
                ObjectBuilder::new()
                    .schema_type(types(&[Type::Number, Type::String, Type::Null]))
                    .minimum(Some(0))
                    .maximum(Some(4_102_444_800u64))
                    .pattern(Some(INSTANT_TEXT))
                    .description(Some("When it expires, instead of expires_in: unix seconds (a number or numeric text) or RFC 3339 text.")),
            )
            .property("scope", string("Granted scopes, space or comma separated."))
            .property(
                "scopes",
                ArrayBuilder::new()
                    .schema_type(types(&[Type::Array, Type::Null]))
                    .items(ObjectBuilder::new().schema_type(Type::String))
                    .description(Some("Granted scopes as a list, instead of scope.")),
            )
            .property(
                "token_type",
                ObjectBuilder::new()
                    .schema_type(types(&[Type::String, Type::Null]))
                    .pattern(Some(NOT_BLANK))
                    .description(Some("Usually \"Bearer\" (the default; not blank).")),
            )
            .property(
                "metadata",
                ObjectBuilder::new()
                    .schema_type(types(&[Type::Object, Type::Null]))
                    .description(Some("Application data to store with the integration.")),
            );
        AllOfBuilder::new()
            .item(fields)
            .item(one_of("scope", "scopes"))
            .item(one_of("expires_in", "expires_at"))
            .description(Some(
                "A token response as the provider returned it, plus optional metadata; no string may hold a NUL character.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for TokenBody {}

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
    operation_id = "put_integration",
    params(
        ("user_id" = String, Path, description = "The application's user id"),
        ("provider" = String, Path, description = "Provider name, e.g. github"),
        ("account_id" = String, Path, description = "Account id on the provider"),
    ),
    request_body = TokenBody,
    responses(
        (status = 200, description = "Stored", body = IntegrationView<'static>, links(
            ("ListIntegrations" = (operation_id = "list_integrations", parameters(("user_id" = "$request.path.user_id")))),
            ("GetToken" = (operation_id = "get_token", parameters(("provider" = "$request.path.provider"), ("account_id" = "$request.path.account_id")))),
            ("RefreshIntegration" = (operation_id = "refresh_integration", parameters(("provider" = "$request.path.provider"), ("account_id" = "$request.path.account_id")))),
            ("DeleteIntegration" = (operation_id = "delete_integration", parameters(("user_id" = "$request.path.user_id"), ("provider" = "$request.path.provider"), ("account_id" = "$request.path.account_id")))),
        )),
        (status = 400, description = "A path parameter or the body is invalid (naming the field), or the body gives both `scope` and `scopes`, or both `expires_in` and `expires_at`", body = super::error::ErrorBody),
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
    let stored = state
        .service
        .connect_response(&user, &provider, &account, &body)
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
    operation_id = "delete_integration",
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
