//! The HTTP API: one file per resource, each exporting `router()`; errors in
//! one shape (`error.rs`); API keys and scopes (`auth.rs`); the listener
//! with its timeouts and connection cap (`server.rs`).
//!
//! Every request gets a request id (`x-request-id`: the client's when it is
//! 1 to 128 of `A-Za-z0-9._:-`, else generated; echoed back) recorded in its tracing span, so every log line of the
//! request, the pool's leak warnings included, carries it. Latency and
//! counts are recorded per route template and a fixed set of method names,
//! so label sets stay bounded whatever clients send.

mod admin;
mod auth;
mod connect;
mod dashboard;
mod error;
mod events;
mod extract;
mod health;
mod integrations;
mod openapi;
mod server;
mod tokens;
mod webhooks;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub use error::ApiError;
pub use server::{
    connection_cap, serve, ServerLimits, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
};

use crate::service::api_keys::ApiKeys;
use crate::service::IntegrationsService;

/// Largest request body accepted (token responses are a few KiB).
pub const BODY_LIMIT: usize = 64 * 1024;

/// Default longest time a request may take before it is answered 503
/// (`INTEGRATIONS_REQUEST_TIMEOUT`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What every handler can reach: cloned for every request, so one `Arc`.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The contents of [`AppState`].
pub struct Shared {
    /// The operations.
    pub service: Arc<IntegrationsService>,
    /// API key verification.
    pub keys: Arc<ApiKeys>,
    /// The Prometheus recorder, when installed.
    pub metrics: Option<PrometheusHandle>,
}

impl AppState {
    /// The state of an application over `service`.
    pub fn new(
        service: Arc<IntegrationsService>,
        keys: Arc<ApiKeys>,
        metrics: Option<PrometheusHandle>,
    ) -> AppState {
        AppState(Arc::new(Shared {
            service,
            keys,
            metrics,
        }))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Integrations Management System",
        description = "Users' third-party OAuth integrations: stored encrypted, refreshed before they expire, and their health at a glance."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "integrations", description = "A user's integrations"),
        (name = "tokens", description = "Access tokens and refreshes"),
        (name = "connect", description = "The OAuth connect flow"),
        (name = "events", description = "What happened to integrations, by polling"),
        (name = "webhooks", description = "Events pushed to the application's endpoints, signed as Standard Webhooks"),
        (name = "admin", description = "Operations"),
        (name = "health", description = "Health and metrics"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key from `integrations api-key create`; scopes: read, write, credentials, admin",
                    ))
                    .build(),
            ),
        );
    }
}

/// The routes and the OpenAPI document, built from the same handlers so
/// they cannot drift apart.
pub fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let router = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(integrations::router())
        .merge(tokens::router())
        .merge(connect::router())
        .merge(events::router())
        .merge(webhooks::router())
        .merge(admin::router())
        .merge(health::router());
    let (router, mut doc) = router.split_for_parts();
    openapi::complete(&mut doc);
    (router, doc)
}

/// The application with the default request deadline
/// ([`DEFAULT_REQUEST_TIMEOUT`]).
pub fn app(state: AppState) -> Router {
    app_with_deadline(state, DEFAULT_REQUEST_TIMEOUT)
}

/// The application: routes, `/openapi.json`, and the middleware stack; a
/// request still running after `request_timeout` is stopped and answered
/// 503 `request_timeout`.
pub fn app_with_deadline(state: AppState, request_timeout: Duration) -> Router {
    let (router, mut openapi) = routes();
    openapi::name_providers(&mut openapi, &state.service.providers().names());
    let openapi = Arc::new(openapi);
    let request_id = HeaderName::from_static("x-request-id");
    router
        .route(
            "/openapi.json",
            get(move || {
                let doc = openapi.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .merge(dashboard::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            RequestTimeout(request_timeout),
            deadline,
        ))
        // Outside the deadline, so requests it answers 503 are counted.
        .layer(middleware::from_fn(record_metrics))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            tracing::info_span!(
                "request",
                request_id = %id,
                method = %req.method(),
                path = %req.uri().path(),
                api_key = tracing::field::Empty,
            )
        }))
        .layer(SetRequestIdLayer::new(request_id, SequentialIds::new()))
        // Outermost: a hostile id is gone before anything sees it.
        .layer(tower::util::MapRequestLayer::new(drop_invalid_request_id))
}

/// Longest `x-request-id` kept from a client.
const REQUEST_ID_MAX: usize = 128;

/// Whether a client's request id is kept: 1 to [`REQUEST_ID_MAX`]
/// characters from `A-Z a-z 0-9 . _ : -`. Anything else (spaces, quotes,
/// `=`, braces, control characters) could forge fields or lines in text
/// logs, where the id is printed as it is.
fn valid_request_id(id: &[u8]) -> bool {
    (1..=REQUEST_ID_MAX).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Removes the client's `x-request-id` unless it is one valid value, so
/// [`SetRequestIdLayer`] generates one instead. A plain function under
/// tower's `MapRequestLayer`: axum's `map_request` boxes a future for every
/// request.
fn drop_invalid_request_id(mut req: Request) -> Request {
    let headers = req.headers_mut();
    let mut ids = headers.get_all("x-request-id").iter();
    let keep = match (ids.next(), ids.next()) {
        (None, _) => true,
        (Some(id), None) => valid_request_id(id.as_bytes()),
        // Several: none is more the request's id than another.
        (Some(_), Some(_)) => false,
    };
    if !keep {
        headers.remove("x-request-id");
    }
    req
}

/// Request ids: a random per-process prefix and a counter
/// (`3f9a1c2e-000000000042`): unique across instances in practice, and no
/// random-number syscall per request as a UUID per request would cost.
#[derive(Clone)]
struct SequentialIds {
    prefix: u32,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl SequentialIds {
    fn new() -> SequentialIds {
        SequentialIds {
            prefix: rand::random(),
            next: Arc::default(),
        }
    }
}

impl MakeRequestId for SequentialIds {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        axum::http::HeaderValue::from_str(&format!("{:08x}-{n:012}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}

/// The request deadline, as the deadline middleware's state.
#[derive(Clone, Copy)]
struct RequestTimeout(Duration);

/// Answers 503 `request_timeout` in the API's error shape when a request
/// takes longer than the deadline (tower-http's timeout answers with an
/// empty body). The handler's future is dropped: a database connection it
/// held mid-statement is discarded by the pool, which first sends the
/// server a cancel request, so the statement stops there too and no
/// session is left "idle in transaction".
async fn deadline(
    axum::extract::State(RequestTimeout(limit)): axum::extract::State<RequestTimeout>,
    req: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            let secs = limit.as_secs();
            tracing::warn!(
                request_timeout_secs = secs,
                "request deadline passed: stopped; a statement it was running is cancelled on the server"
            );
            let mut response = axum::response::IntoResponse::into_response(
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "request_timeout",
                    format!(
                        "the request did not finish within {secs}s (INTEGRATIONS_REQUEST_TIMEOUT) and was stopped; a database statement it was running was cancelled"
                    ),
                )
                .hint(
                    "retry later; if it persists, check the database's health (GET /v1/admin/pool, `integrations doctor`), \
                     set socket_timeout in DATABASE_URL below this deadline so slow statements fail fast with P1008, \
                     or raise INTEGRATIONS_REQUEST_TIMEOUT",
                ),
            );
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
            response
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see /openapi.json",
    )
}

/// A route that exists, with a method it does not have (axum adds `Allow`).
async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept this method; see the Allow header and /openapi.json",
    )
}

/// The `method` label: one of a fixed set, whatever the client sent (a
/// method is any token up to the header size limit, and each distinct
/// label value would be kept for the life of the process).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The `route` label of a request no route matched: one value, never the
/// path it asked for.
const UNMATCHED: &str = "unmatched";

/// Metric handles per (route template, method label, status), created once:
/// the `metrics!` macros would build and hash label strings on every
/// request. Every key is bounded: route templates, [`method_label`], and
/// the statuses this server answers with.
type Handles = std::collections::HashMap<
    String,
    std::collections::HashMap<(&'static str, u16), (metrics::Histogram, metrics::Counter)>,
>;

fn handles(
    route: &str,
    method: &'static str,
    status: u16,
) -> (metrics::Histogram, metrics::Counter) {
    static HANDLES: std::sync::OnceLock<std::sync::RwLock<Handles>> = std::sync::OnceLock::new();
    let all = HANDLES.get_or_init(Default::default);
    // Read-locked on every request; written once per new (route, method,
    // status).
    if let Some(h) = all
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(route)
        .and_then(|m| m.get(&(method, status)))
    {
        return h.clone();
    }
    let mut all = all
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let labels = [("method", method.to_string()), ("route", route.to_string())];
    let histogram = metrics::histogram!("http_request_duration_seconds", &labels);
    let counter = metrics::counter!(
        "http_requests_total",
        "method" => method,
        "route" => route.to_string(),
        "status" => status.to_string()
    );
    all.entry(route.to_string())
        .or_default()
        .insert((method, status), (histogram.clone(), counter.clone()));
    (histogram, counter)
}

/// Creates the request counter and duration histogram of (`method`,
/// `route` template, `status`) at zero, before any such request (see
/// `telemetry::init_metrics`).
pub(crate) fn init_request_metrics(method: &'static str, route: &str, status: u16) {
    let (_histogram, counter) = handles(route, method, status);
    counter.increment(0);
}

/// Counts and times requests per route template (`/v1/users/{user_id}/...`,
/// never the concrete path) and method label, so label sets stay bounded.
async fn record_metrics(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().cloned();
    let method = method_label(req.method());
    let started = Instant::now();
    let response = next.run(req).await;
    let route = route.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
    let (histogram, counter) = handles(route, method, response.status().as_u16());
    histogram.record(started.elapsed());
    counter.increment(1);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_only_when_short_and_plain() {
        for ok in [
            "a",
            "test-123",
            "3f9a1c2e-000000000042",
            "a.b_c:d-E",
            &"x".repeat(128),
        ] {
            assert!(valid_request_id(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            &"x".repeat(129),
            "1 api_key=k-admin}: FAKE LINE",
            "a b",
            "a\"b",
            "a=b",
            "a{b}",
            "a\tb",
            "é",
        ] {
            assert!(!valid_request_id(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn methods_map_to_a_fixed_set_of_labels() {
        use axum::http::Method;
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        for odd in ["CONNECT", "TRACE", "get", "PROPFIND", &"X".repeat(2000)] {
            let m = Method::from_bytes(odd.as_bytes()).unwrap();
            assert_eq!(method_label(&m), "other", "{odd}");
        }
    }
}
