//! `/v1/admin/pool`: the pool's numbers and what the database's
//! connections are doing.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Admin, Caller};
use super::error::{ApiError, ErrorBody};
use super::AppState;

/// The routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(pool))
}

/// Pool statistics, the status cache, `pg_stat_activity` for the database,
/// and an overview of integrations, events and webhooks.
#[derive(Serialize, ToSchema)]
pub struct PoolReport {
    /// `Pool::stats()`: gauges and counters.
    #[schema(value_type = Object)]
    pool: db_pool::PoolStats,
    /// The status cache.
    #[schema(value_type = Object)]
    cache: crate::service::CacheStats,
    /// The activity view (`integrations activity`).
    #[schema(value_type = Object)]
    activity: db_pool::diagnostics::Activity,
    /// Integrations by provider and status, the next expiry, the latest
    /// events and failing webhook endpoints (at most 5 s old).
    overview: crate::service::Overview,
}

/// The pool's statistics and the database's activity (needs `admin`).
#[utoipa::path(
    get,
    path = "/v1/admin/pool",
    responses(
        (status = 200, description = "Pool statistics and activity", body = PoolReport),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the admin scope", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    ),
    security(("api_key" = ["admin"])),
    tag = "admin"
)]
async fn pool(
    _: Caller<Admin>,
    State(state): State<AppState>,
) -> Result<Json<PoolReport>, ApiError> {
    let stats = state.service.pool().stats();
    let activity = state.service.database_activity().await?;
    let overview = state.service.overview().await?.as_ref().clone();
    Ok(Json(PoolReport {
        pool: stats,
        cache: state.service.cache_stats(),
        activity,
        overview,
    }))
}
