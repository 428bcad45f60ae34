//! Unauthenticated endpoints for load balancers and Prometheus.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::AppState;

/// How long `/readyz` waits for a connection.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// The routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// A health answer.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `ready`.
    status: &'static str,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)), tag = "health")]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Ready when a database connection can be checked out within 1 s.
#[utoipa::path(
    get,
    path = "/readyz",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 500, description = "The readiness query failed (`internal`)", body = ErrorBody),
        (status = 503, description = "No database connection within 1 s (`not_ready`), the database is unavailable (a `P` code), or the request deadline passed (`request_timeout`)", body = ErrorBody),
    ),
    tag = "health"
)]
async fn readyz(State(state): State<AppState>) -> Response {
    let pool = state.service.pool();
    match tokio::time::timeout(READY_TIMEOUT, async {
        let mut conn = pool.get().await?;
        conn.query("SELECT 1", &[]).await.map(drop)
    })
    .await
    {
        Ok(Ok(())) => Json(Health { status: "ready" }).into_response(),
        Ok(Err(e)) => ApiError::from(e).into_response(),
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no database connection within 1 s",
        )
        .hint("check the database (integrations doctor) and the pool (/v1/admin/pool)")
        .into_response(),
    }
}

/// Prometheus text format: pool, status cache, refreshes, HTTP requests.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")), tag = "health")]
async fn metrics(State(state): State<AppState>) -> Response {
    state.service.pool().export_metrics();
    state.service.cache_stats();
    let body = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
