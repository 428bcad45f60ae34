//! One JSON error shape for every failure, and the one place that maps
//! errors to HTTP statuses:
//! `{"error": {"code": "...", "message": "...", "hint": "..."}}`.
//!
//! Internal causes are logged here, inside the request's span; the client
//! sees a fixed message. Never a stack trace, SQL, token or password.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::service::ServiceError;

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
    hint: Option<String>,
    retry_after: Option<u32>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

/// The error object of every failed request.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorDetail {
    /// Stable machine-readable code: `invalid_request`, `unauthorized`,
    /// `forbidden`, `not_found`, `method_not_allowed`, `conflict`,
    /// `reconnect_required`, `refresh_failed`, `invalid_flow`, `request_timeout`, `payload_too_large`,
    /// `internal`, or a Prisma code (`P2024`, `P2037`, `P1001`, ...) for
    /// database errors.
    code: String,
    /// What went wrong.
    message: String,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
            hint: None,
            retry_after: None,
        }
    }

    /// Adds a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> ApiError {
        self.hint = Some(hint.into());
        self
    }

    /// 400 naming what is wrong.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 401: no key, or a key that is not valid (indistinguishable).
    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid API key is required",
        )
        .hint("send Authorization: Bearer <key>; create keys with `integrations api-key create`")
    }

    /// 403: the key lacks a scope.
    pub fn forbidden(scope: &str) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this API key does not have the '{scope}' scope"),
        )
        .hint("create a key with the scope it needs: integrations api-key create --scopes ...")
    }

    /// 500 with a fixed message; the cause is logged, not sent.
    pub fn internal(cause: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the request id identifies it in the logs",
        )
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The JSON body's `error` object, for per-item results of a batch.
    pub(crate) fn detail(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code, "message": self.message, "hint": self.hint })
    }
}

impl From<db_pool::Error> for ApiError {
    fn from(e: db_pool::Error) -> ApiError {
        ApiError::from(&e)
    }
}

/// By reference, so an error shared by every caller of one failed cache
/// load maps the same way as an owned one.
impl From<&db_pool::Error> for ApiError {
    fn from(e: &db_pool::Error) -> ApiError {
        use db_pool::Error as E;
        let (status, retry) = match e {
            E::PoolTimeout { .. } | E::TooManyConnections(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, Some(1))
            }
            E::Unreachable { .. } | E::ConnectionClosed | E::PoolClosed => {
                (StatusCode::SERVICE_UNAVAILABLE, Some(5))
            }
            E::SocketTimeout(_) => (StatusCode::SERVICE_UNAVAILABLE, Some(1)),
            _ => return ApiError::internal(e),
        };
        tracing::warn!(code = e.code(), error = %e, "database unavailable");
        // The pool's messages name no secret. The database's address stays
        // in the log: clients learn the code and when to retry.
        let message = match e {
            E::Unreachable { .. } => {
                "P1001: Can't reach the database server; the request id finds the details in the logs".to_string()
            }
            _ => e.to_string(),
        };
        ApiError {
            status,
            code: e.code().to_string(),
            message,
            hint: Some(e.hint().to_string()),
            retry_after: retry,
        }
    }
}

/// A path or body value that failed validation: 400 naming the field.
impl From<crate::domain::InvalidInput> for ApiError {
    fn from(e: crate::domain::InvalidInput) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        match e {
            ServiceError::Invalid(e) => ApiError::from(e),
            ServiceError::Tokens(e) => ApiError::bad_request(e.to_string()),
            ServiceError::UnknownProvider(e) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            ServiceError::NotFound { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such integration")
            }
            ServiceError::Conflict { .. } => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            ServiceError::NeedsReconnect { .. } => {
                ApiError::new(StatusCode::CONFLICT, "reconnect_required", e.to_string())
                    .hint("send the user through POST /v1/connect/{provider} again")
            }
            ServiceError::NoRefreshToken { .. } => {
                ApiError::new(StatusCode::CONFLICT, "no_refresh_token", e.to_string()).hint(
                    "use the stored access token until it expires; for tokens that refresh, connect the account again with offline access (POST /v1/connect/{provider})",
                )
            }
            ServiceError::RefreshFailed { transient, .. } => {
                let mut err =
                    ApiError::new(StatusCode::BAD_GATEWAY, "refresh_failed", e.to_string());
                if transient {
                    err.retry_after = Some(30);
                    err.hint("the provider or the network failed; the stored tokens are unchanged, retry later")
                } else {
                    err.hint("the provider refused the request: check the provider's client id and secret")
                }
            }
            ServiceError::ProviderBusy { retry_after, .. } => {
                let mut err = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "provider_paused",
                    e.to_string(),
                );
                err.retry_after = Some(u32::try_from(retry_after.as_secs().max(1)).unwrap_or(u32::MAX));
                err.hint("the stored tokens are unchanged and usable until they expire; retry after the pause (Retry-After); max_refreshes_per_second and max_concurrent_refreshes in the provider registry bound this instance's refreshes")
            }
            ServiceError::InvalidState(_) => ApiError::bad_request(e.to_string()),
            ServiceError::InvalidFlow(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_flow", e.to_string()).hint(
                    "send the flow_id kept in the user's session with the completion_code the browser brought back, within 10 minutes, once",
                )
            }
            ServiceError::ProviderNotConfigured(m) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "provider_not_configured",
                m.to_string(),
            )
            .hint(format!(
                "set {} in the service's environment and restart it; nothing was sent to the provider and the integration is unchanged",
                m.var
            )),
            ServiceError::OAuth(o) => {
                tracing::warn!(error = %o, "OAuth request failed");
                ApiError::new(StatusCode::BAD_GATEWAY, "oauth_failed", o.to_string())
            }
            ServiceError::WebhookNotFound | ServiceError::EventNotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            ServiceError::TooManyWebhooks => {
                ApiError::new(StatusCode::CONFLICT, "too_many_webhooks", e.to_string())
            }
            ServiceError::Crypto(c) => ApiError::internal(&c),
            ServiceError::Internal(_) => ApiError::internal(&e),
            ServiceError::Db(db) => ApiError::from(db.as_ref()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                hint: self.hint,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
