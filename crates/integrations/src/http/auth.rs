//! `Authorization: Bearer <key>` on every `/v1` route, and the scope the
//! route needs. Both are checked by the [`Caller`] extractor, before any
//! other extractor reads the path or the body, so a caller without access
//! learns nothing about which users or integrations exist, and a key
//! without the scope gets 403 whatever it sends (never 400, 413 or 415).
//!
//! A handler states its scope in its signature (`_: Caller<Write>`); there
//! is no other way to check one.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use std::marker::PhantomData;

use super::error::ApiError;
use super::AppState;
use crate::service::api_keys::Scope;

/// A scope a route needs, as a type: [`Read`], [`Write`], [`Credentials`]
/// or [`Admin`].
pub trait RequiredScope {
    /// The scope.
    const SCOPE: Scope;
}

/// Needs the `read` scope.
pub struct Read;
/// Needs the `write` scope.
pub struct Write;
/// Needs the `credentials` scope.
pub struct Credentials;
/// Needs the `admin` scope.
pub struct Admin;

impl RequiredScope for Read {
    const SCOPE: Scope = Scope::Read;
}
impl RequiredScope for Write {
    const SCOPE: Scope = Scope::Write;
}
impl RequiredScope for Credentials {
    const SCOPE: Scope = Scope::Credentials;
}
impl RequiredScope for Admin {
    const SCOPE: Scope = Scope::Admin;
}

/// The verified caller, holding scope `S`: 401 without a valid key, 403
/// when the key lacks `S`. Put it first among a handler's arguments.
/// (Its name is recorded on the request's span, as `api_key`.)
pub struct Caller<S: RequiredScope>(PhantomData<S>);

impl<S: RequiredScope> FromRequestParts<AppState> for Caller<S> {
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
        let Some(key) = verified else {
            return Err(ApiError::unauthorized());
        };
        tracing::Span::current().record("api_key", key.name.as_str());
        if !key.allows(S::SCOPE) {
            return Err(ApiError::forbidden(S::SCOPE.as_str()));
        }
        Ok(Caller(PhantomData))
    }
}
