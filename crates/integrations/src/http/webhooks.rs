//! `/v1/webhooks`: endpoints that receive events as Standard Webhooks, their
//! deliveries, and `/v1/events/{event_id}/redeliver`. Admin scope: an
//! endpoint decides where the service sends data.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Admin, Caller};
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::AppState;

use crate::domain::{Delivery, DeliveryStatus, EventType, InvalidInput, Webhook, WebhookId};
use crate::service::TestDelivery;

/// The routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(get, delete))
        .routes(routes!(rotate_secret))
        .routes(routes!(enable))
        .routes(routes!(test))
        .routes(routes!(deliveries))
        .routes(routes!(redeliver))
}

/// Answers that carry a signing secret are never cached.
const NO_STORE: [(axum::http::HeaderName, axum::http::HeaderValue); 1] = [(
    axum::http::header::CACHE_CONTROL,
    axum::http::HeaderValue::from_static("no-store"),
)];

/// The body of `POST /v1/webhooks`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    /// Where to POST events: an absolute https URL of a public host, at
    /// most 2048 bytes, without user:pass@ or #fragment (plain http and
    /// internal addresses only with INTEGRATIONS_WEBHOOK_ALLOW_PRIVATE=true).
    #[schema(min_length = 1, example = "https://app.example.com/hooks/integrations")]
    url: String,
    /// The event types to send (all of them when left out).
    #[schema(value_type = Option<Vec<EventType>>, min_items = 1)]
    event_types: Option<Vec<String>>,
}

/// A new endpoint, with its signing secret: shown only in this answer.
#[derive(Serialize, ToSchema)]
pub struct CreatedWebhook {
    #[serde(flatten)]
    webhook: Webhook,
    /// The Standard Webhooks signing secret (`whsec_<base64>`): give it to
    /// the receiver's verification library. Not shown again.
    secret: String,
}

/// Register an endpoint (needs `admin`). Every event of its types is
/// POSTed to it with the Standard Webhooks headers `webhook-id` (the
/// event's id, the same on every retry), `webhook-timestamp` and
/// `webhook-signature`; a 2xx within 10 s is success, anything else is
/// retried for about a day and a half.
#[utoipa::path(
    post,
    path = "/v1/webhooks",
    operation_id = "create_webhook",
    request_body = NewWebhook,
    responses(
        (status = 201, description = "Registered; the answer carries the signing secret, shown only here", body = CreatedWebhook),
        (status = 400, description = "`url` or `event_types` is not accepted (naming the field and what is accepted): not https, an internal address, unknown event types", body = ErrorBody),
        (status = 409, description = "The most endpoints (100) are registered (`too_many_webhooks`)", body = ErrorBody),
    ),
    security(("api_key" = ["admin"])),
    tag = "webhooks"
)]
async fn create(
    _: Caller<Admin>,
    State(state): State<AppState>,
    ApiJson(body): ApiJson<NewWebhook>,
) -> Result<impl IntoResponse, ApiError> {
    let created = state
        .service
        .create_webhook(&body.url, body.event_types.as_deref())
        .await?;
    Ok((
        StatusCode::CREATED,
        NO_STORE,
        Json(CreatedWebhook {
            webhook: created.webhook,
            secret: created.secret.expose_secret().to_string(),
        }),
    ))
}

/// Every endpoint.
#[derive(Serialize, ToSchema)]
pub struct WebhookList {
    /// Oldest first.
    webhooks: Vec<Webhook>,
}

/// List the endpoints (needs `admin`); never their secrets.
#[utoipa::path(
    get,
    path = "/v1/webhooks",
    operation_id = "list_webhooks",
    responses((status = 200, description = "The endpoints", body = WebhookList)),
    security(("api_key" = ["admin"])),
    tag = "webhooks"
)]
async fn list(
    _: Caller<Admin>,
    State(state): State<AppState>,
) -> Result<Json<WebhookList>, ApiError> {
    Ok(Json(WebhookList {
        webhooks: state.service.webhooks().await?,
    }))
}

fn webhook_id(value: &str) -> Result<WebhookId, ApiError> {
    Ok(WebhookId::parse("webhook_id", value)?)
}

/// One endpoint (needs `admin`): whether it is enabled, and since when it
/// has been failing.
#[utoipa::path(
    get,
    path = "/v1/webhooks/{webhook_id}",
    operation_id = "get_webhook",
    params(("webhook_id" = String, Path, description = "The endpoint's id")),
    responses(
        (status = 200, description = "The endpoint", body = Webhook),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ),
    security(("api_key" = ["admin"])),
    tag = "webhooks"
)]
async fn get(
    _: Caller<Admin>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Webhook>, ApiError> {
    Ok(Json(state.service.webhook(&webhook_id(&id)?).await?))
}

/// Delete an endpoint and its deliveries (needs `admin`).
#[utoipa::path(
    delete,
    path = "/v1/webhooks/{webhook_id}",
    operation_id = "delete_webhook",
    params(("webhook_id" = String, Path, description = "The endpoint's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ),
    security(("api_key" = ["admin"])),
    tag = "webhooks"
)]
async fn delete(
    _: Caller<Admin>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    state.service.delete_webhook(&webhook_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A rotated secret.
#[derive(Serialize, ToSchema)]
pub struct RotatedSecret {
    /// The new signing secret (`whsec_<base64>`), shown only here.
    secret: String,
    /// Until then deliveries carry a signature with the old secret too,
    /// so receivers can switch without a gap.
    #[schema(value_type = String, format = DateTime)]
    previous_secret_expires_at: String,
}

/// Rotate the signing secret (needs `admin`): the old one keeps signing
/// beside the new one for 24 hours (`webhook-signature` then carries two
/// signatures).
#[utoipa::path(
    post,
    path = "/v1/webhooks/{webhook_id}/rotate-secret",
    operation_id = "rotate_webhook_secret",
    params(("webhook_id" = String, Path, description = "The endpoint's id")),
    responses(
        (status = 200, description = "The new secret, shown only here", body = RotatedSecret),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ),
    security(("api_key" = ["admin"])),
    tag = "webhooks"
)]
async fn rotate_secret(
    _: Caller<Admin>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let rotated = state
        .service
        .rotate_webhook_secret(&webhook_id(&id)?)
        .await?;
    Ok((
        NO_STORE,
        Json(RotatedSecret {
            secret: rotated.secret.expose_secret().to_string(),
            previous_secret_expires_at: rotated
                .previous_secret_expires_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }),
    ))
}

/// Enable a disabled endpoint (needs `admin`): its pending deliveries go
/// out again, and new events are queued for it.
#[utoipa::path(
    post,
    path = "/v1/webhooks/{webhook_id}/enable",
    operation_id = "enable_webhook",
    params(("webhook_id" = String, Path, description = "The endpoint's id")),
    responses(
        (status = 200, description = "Enabled", body = Webhook),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ),
    security(("api_key" = ["admin"])),
    tag = "webhooks"
)]
async fn enable(
    _: Caller<Admin>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Webhook>, ApiError> {
    Ok(Json(state.service.enable_webhook(&webhook_id(&id)?).await?))
}

/// Send a `webhook.test` event now (needs `admin`), signed like any
/// delivery, and say what the endpoint answered. Nothing is stored or
/// retried.
#[utoipa::path(
    post,
    path = "/v1/webhooks/{webhook_id}/test",
    operation_id = "test_webhook",
    params(("webhook_id" = String, Path, description = "The endpoint's id")),
    responses(
        (status = 200, description = "What the endpoint answered (`delivered` false with the reason when it was not a 2xx in time)", body = TestDelivery),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ),
    security(("api_key" = ["admin"])),
    tag = "webhooks"
)]
async fn test(
    _: Caller<Admin>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<TestDelivery>, ApiError> {
    Ok(Json(state.service.test_webhook(&webhook_id(&id)?).await?))
}

/// The query of `GET /v1/webhooks/{webhook_id}/deliveries`, as text.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// Only deliveries in this status: `pending`, `succeeded` or `failed`.
    #[param(value_type = Option<DeliveryStatus>)]
    status: Option<String>,
    /// The `next_after` of an earlier answer (a delivery id).
    #[param(value_type = Option<i64>, minimum = 0)]
    after: Option<String>,
    /// Most deliveries in the answer: 1 to 1000 (default 100).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// A page of deliveries.
#[derive(Serialize, ToSchema)]
pub struct DeliveryList {
    /// Oldest first.
    deliveries: Vec<Delivery>,
    /// Pass as `after` for the next page (null: this page was the last).
    next_after: Option<i64>,
}

/// An endpoint's deliveries (needs `admin`), e.g. `?status=failed` for
/// those that ran out of retries (`POST /v1/events/{event_id}/redeliver`
/// sends one again).
#[utoipa::path(
    get,
    path = "/v1/webhooks/{webhook_id}/deliveries",
    operation_id = "list_webhook_deliveries",
    params(("webhook_id" = String, Path, description = "The endpoint's id"), DeliveriesQuery),
    responses(
        (status = 200, description = "A page of deliveries", body = DeliveryList),
        (status = 400, description = "`status`, `after` or `limit` is not accepted (naming it and what is accepted)", body = ErrorBody),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ),
    security(("api_key" = ["admin"])),
    tag = "webhooks"
)]
async fn deliveries(
    _: Caller<Admin>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<DeliveriesQuery>,
) -> Result<Json<DeliveryList>, ApiError> {
    let id = webhook_id(&id)?;
    let status = q
        .status
        .as_deref()
        .map(|s| DeliveryStatus::parse("status", s))
        .transpose()?;
    let after = match q.after.as_deref() {
        None => 0,
        Some(a) => a.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            InvalidInput::new(
                "after",
                "accepted: the next_after of an earlier answer (a whole number >= 0)",
            )
        })?,
    };
    let limit = crate::domain::event_limit("limit", q.limit.as_deref())?;
    let page = state
        .service
        .webhook_deliveries(&id, status, after, limit)
        .await?;
    let next_after = (page.len() as i64 >= limit)
        .then(|| page.last().map(|d| d.id))
        .flatten();
    Ok(Json(DeliveryList {
        deliveries: page,
        next_after,
    }))
}

/// What a redelivery queued.
#[derive(Serialize, ToSchema)]
pub struct Redelivered {
    /// Deliveries queued again (one per endpoint subscribed to the
    /// event's type; one still pending is left to run and not counted).
    queued: i64,
}

/// Send an event again (needs `admin`) to every endpoint
/// subscribed to its type, with a fresh retry schedule; e.g. after fixing
/// a receiver whose deliveries failed. It may arrive after later events of
/// its integration.
#[utoipa::path(
    post,
    path = "/v1/events/{event_id}/redeliver",
    operation_id = "redeliver_event",
    params(("event_id" = String, Path, description = "The event's id (`webhook-id`): a whole number >= 1")),
    responses(
        (status = 202, description = "Queued", body = Redelivered),
        (status = 400, description = "`event_id` is not a whole number", body = ErrorBody),
        (status = 404, description = "No such event (never written, or purged after INTEGRATIONS_EVENT_RETENTION)", body = ErrorBody),
    ),
    security(("api_key" = ["admin"])),
    tag = "webhooks"
)]
async fn redeliver(
    _: Caller<Admin>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<Redelivered>), ApiError> {
    let id = id.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
        InvalidInput::new(
            "event_id",
            format!(
                "{:?} is not an event id; accepted: a whole number >= 1, an event's id",
                id.chars().take(32).collect::<String>()
            ),
        )
    })?;
    let queued = state.service.redeliver_event(id).await?;
    Ok((StatusCode::ACCEPTED, Json(Redelivered { queued })))
}
