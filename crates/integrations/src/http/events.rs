//! `/v1/events`: what happened to integrations, by polling with a cursor.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Caller, Read};
use super::error::{ApiError, ErrorBody};
use super::extract::ApiQuery;
use super::AppState;

use crate::domain::{event_limit, Event, EventCursor, EventType};

/// The routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// The query of `GET /v1/events`, as text: each value is parsed here so a
/// bad one is answered naming its parameter and what is accepted.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// The `next_cursor` of an earlier answer; leave it out to start from
    /// the oldest event kept.
    #[param(value_type = Option<String>, pattern = "^[A-Za-z0-9_-]{21}[AQgw]$")]
    after: Option<String>,
    /// Most events in the answer: 1 to 1000 (default 100).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// Only events of this type.
    #[param(value_type = Option<EventType>, rename = "type")]
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// A page of events.
#[derive(Serialize, ToSchema)]
pub struct EventList {
    /// The events, in the order their transactions committed before the
    /// page was read (by cursor): every event exactly once across pages.
    pub events: Vec<Event>,
    /// Pass as `after` for the next page: given even when `events` is
    /// empty, so a poller keeps polling with it.
    pub next_cursor: String,
}

/// Events after a cursor, oldest first: `integration.connected`,
/// `.reconnected`, `.refresh_failed`, `.error`, `.revoked`, `.recovered`,
/// `.deleted`, each written in the same transaction as its change. Paging
/// with `next_cursor` returns every event exactly once, on any instance;
/// an event shows once every transaction that started writing before it
/// has ended. Events are kept INTEGRATIONS_EVENT_RETENTION (7 days).
#[utoipa::path(
    get,
    path = "/v1/events",
    operation_id = "list_events",
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of events and the cursor of the next", body = EventList),
        (status = 400, description = "`after`, `limit` or `type` is not accepted (`invalid_request`, naming the parameter and what is accepted)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the read scope", body = ErrorBody),
    ),
    security(("api_key" = ["read"])),
    tag = "events"
)]
async fn list(
    _: Caller<Read>,
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Json<EventList>, ApiError> {
    let after = q
        .after
        .as_deref()
        .map(|a| EventCursor::parse("after", a))
        .transpose()?;
    let limit = event_limit("limit", q.limit.as_deref())?;
    let kind = q
        .kind
        .as_deref()
        .map(|t| EventType::parse("type", t))
        .transpose()?;
    let page = state.service.events(after, limit, kind).await?;
    Ok(Json(EventList {
        events: page.events,
        next_cursor: page.next_cursor.encode(),
    }))
}
