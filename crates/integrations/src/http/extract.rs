//! Extractors whose rejections use the API's error shape: malformed JSON,
//! oversized bodies and bad path segments all answer
//! `{"error": {...}}`, never axum's plain-text defaults.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use super::error::ApiError;

/// `Json<T>` with API errors.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Read as raw JSON first (axum's content type, size and syntax
        // checks), so a NUL can be named before the typed parse.
        let raw = match axum::Json::<Box<RawValue>>::from_request(req, state).await {
            Ok(axum::Json(raw)) => raw,
            Err(JsonRejection::BytesRejection(e))
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!(
                        "the request body is larger than {} bytes",
                        super::BODY_LIMIT
                    ),
                ))
            }
            Err(JsonRejection::MissingJsonContentType(_)) => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "invalid_request",
                    "the body must be JSON: send Content-Type: application/json",
                ))
            }
            Err(e) => return Err(not_valid_for_request(&e)),
        };
        if let Some(field) = nul_in(raw.get().as_bytes()) {
            return Err(ApiError::bad_request(format!(
                "{field} contains a NUL character (\\u0000), which cannot be stored; accepted: text without NUL characters"
            )));
        }
        axum::Json::<T>::from_bytes(raw.get().as_bytes())
            .map(|axum::Json(v)| ApiJson(v))
            .map_err(|e| not_valid_for_request(&e))
    }
}

fn not_valid_for_request(e: &JsonRejection) -> ApiError {
    ApiError::bad_request(format!(
        "the body is not valid JSON for this request: {}",
        e.body_text()
    ))
}

/// Where a JSON body holds a NUL character (`\u0000`, in a string or a key):
/// PostgreSQL's `text` and `jsonb` cannot store one, so it would fail in the
/// database (22P05) instead of here. Returns the first such field's path
/// (`metadata.k`, `scopes[0]`, `a key in metadata`); `None` when there is
/// none. A body without the escape at all (almost every one) costs one scan.
fn nul_in(body: &[u8]) -> Option<String> {
    const ESCAPE: &[u8] = b"\\u0000";
    if !body.windows(ESCAPE.len()).any(|w| w == ESCAPE) {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    fn walk(value: &serde_json::Value, path: &str) -> Option<String> {
        let name = |p: &str| {
            if p.is_empty() {
                "the body".to_string()
            } else {
                format!("'{p}'")
            }
        };
        match value {
            serde_json::Value::String(s) if s.contains('\0') => Some(name(path)),
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, v)| walk(v, &format!("{path}[{i}]"))),
            serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| {
                let here = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if k.contains('\0') {
                    return Some(format!("a key in {}", name(path)));
                }
                walk(v, &here)
            }),
            _ => None,
        }
    }
    walk(&value, "")
}

/// `Path<T>` with API errors.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| ApiPath(v))
            .map_err(|e: PathRejection| {
                ApiError::bad_request(format!("bad path segment: {}", e.body_text()))
            })
    }
}

/// `Query<T>` with API errors.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| ApiQuery(v))
            .map_err(|e: QueryRejection| {
                ApiError::bad_request(format!("bad query string: {}", e.body_text()))
            })
    }
}
