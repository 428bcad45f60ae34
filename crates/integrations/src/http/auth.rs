//! `Authorization: Bearer <key>` on every `/v1` route. The key is checked
//! before anything else, so a caller without access learns nothing about
//! which users or integrations exist.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::error::ApiError;
use super::AppState;
use crate::auth::{ApiKeyInfo, Scope};

/// The verified caller.
pub struct Caller(pub Arc<ApiKeyInfo>);

impl Caller {
    /// Fails with 403 unless the key has `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.0.allows(scope) {
            Ok(())
        } else {
            Err(ApiError::forbidden(scope.as_str()))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(ApiError::unauthorized)?;
        let verified = state
            .keys
            .verify(presented)
            .await
            .map_err(|e| ApiError::from(e.as_ref()))?;
        match verified {
            Some(info) => {
                tracing::Span::current().record("api_key", info.name.as_str());
                Ok(Caller(info))
            }
            None => Err(ApiError::unauthorized()),
        }
    }
}
