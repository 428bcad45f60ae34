//! Logs through `tracing`: human-readable text, or one JSON object per line
//! for production (`--log-format json`). `RUST_LOG` filters (default
//! `info`). Logs go to standard error.

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the span fields (request id...).
    Json,
}

/// Installs the global subscriber for `serve` (once; later calls do
/// nothing): `info` and above unless `RUST_LOG` says otherwise.
pub fn init(format: LogFormat) {
    init_with(format, "info,tokio_postgres=warn");
}

/// Installs the global subscriber for the other commands: warnings and
/// errors (the pool's leak, slow query and closing warnings among them)
/// on standard error, beside the command's own output on standard output.
pub fn init_for_command() {
    init_with(LogFormat::Text, "warn,tokio_postgres=error");
}

fn init_with(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only for a person at a terminal: a log file or pipe gets
    // plain text (and NO_COLOR turns them off anywhere).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}

/// The service's counters, with help.
const COUNTERS: &[(&str, &str)] = &[
    (
        "http_requests_total",
        "HTTP requests answered, by route template, method and status.",
    ),
    (
        "http_accept_errors_total",
        "Failed accepts of new HTTP connections (e.g. out of file descriptors).",
    ),
    (
        "http_connection_timeouts_total",
        "HTTP connections closed by the header or idle timeout.",
    ),
    (
        "integrations_api_key_lookups_total",
        "API key verifications that queried the database.",
    ),
    (
        "integrations_api_key_verifications_total",
        "API key verifications, by result.",
    ),
    (
        "integrations_invalidations_received_total",
        "Change-feed notifications from other writers, by kind.",
    ),
    (
        "integrations_refreshes_total",
        "Token refreshes, by provider and outcome (rate_limited: the provider answered 429 or Retry-After; not counted against the integration).",
    ),
    (
        "integrations_refresh_limit_waits_total",
        "Refreshes that waited before calling their provider, by provider and reason: paused (429 or circuit breaker), concurrency (max_concurrent_refreshes), rate (max_refreshes_per_second).",
    ),
    (
        "integrations_refresh_pauses_total",
        "Times a provider's refreshes were paused, by provider and reason: rate_limited (429 / Retry-After), circuit_open (transient failures in a row).",
    ),
    (
        "integrations_refresh_result_writes_total",
        "Statements that wrote successful refresh results (one per batch of results finished together).",
    ),
    (
        "integrations_status_cache_hits_total",
        "Status reads served from the cache.",
    ),
    (
        "integrations_status_cache_misses_total",
        "Status reads loaded from the database.",
    ),
    (
        "integrations_webhook_deliveries_total",
        "Webhook delivery attempts, by outcome: delivered (a 2xx), retry (failed, another attempt scheduled), failed (failed, the schedule spent).",
    ),
    (
        "integrations_webhook_endpoints_disabled_total",
        "Webhook endpoints disabled after failing every attempt for INTEGRATIONS_WEBHOOK_DISABLE_AFTER.",
    ),
];

/// The service's gauges, with help.
const GAUGES: &[(&str, &str)] = &[
    ("http_connections_open", "Open HTTP connections."),
    (
        "http_connections_max",
        "Most HTTP connections served at once.",
    ),
    (
        "integrations_change_listener_connected",
        "1 while the change listener is connected (caches in use), else 0.",
    ),
    (
        "integrations_status_cache_entries",
        "Users whose status is cached.",
    ),
    (
        "integrations_refresh_in_flight",
        "Refresh requests this instance has out to a provider now, by provider.",
    ),
    (
        "integrations_refresh_due",
        "Integrations the background refresher should have refreshed by now and has not (all instances): growing means it does not keep up.",
    ),
    (
        "integrations_refresh_due_oldest_seconds",
        "How long ago the longest-waiting due integration came due (0 when none).",
    ),
    (
        "integrations_webhook_pending",
        "Webhook deliveries not delivered yet (due, being sent or waiting for a retry), all instances.",
    ),
    (
        "integrations_webhook_oldest_pending_seconds",
        "Age of the oldest pending webhook delivery (0 when none).",
    ),
];

/// The service's histograms, in seconds, with help.
const HISTOGRAMS: &[(&str, &str)] = &[
    (
        "http_request_duration_seconds",
        "HTTP request duration, by route template, method and status.",
    ),
    (
        "integrations_invalidation_lag_seconds",
        "From a change's transaction start to the entry dropped on this instance.",
    ),
    (
        "integrations_refresh_seconds",
        "Token refresh duration, by provider.",
    ),
    (
        "integrations_webhook_delivery_lag_seconds",
        "From an event's transaction start to its webhook's 2xx.",
    ),
];

/// Describes every series the service exports (Prometheus `# HELP` lines),
/// the pool's included. Call once after installing the metrics recorder.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    db_pool::describe_metrics();
    for (name, help) in COUNTERS {
        describe_counter!(*name, *help);
    }
    for (name, help) in GAUGES {
        describe_gauge!(*name, *help);
    }
    for (name, help) in HISTOGRAMS {
        describe_histogram!(*name, Unit::Seconds, *help);
    }
}

/// `integrations_invalidations_received_total`'s `kind`s (`changes.rs`).
const INVALIDATION_KINDS: [&str; 3] = ["integration", "api_key", "unknown"];

/// `integrations_api_key_verifications_total`'s `result`s
/// (`service/api_keys.rs`).
const VERIFICATION_RESULTS: [&str; 3] = ["valid", "rejected", "malformed"];

/// `http_connection_timeouts_total`'s `kind`s (`http/server.rs`).
const CONNECTION_TIMEOUT_KINDS: [&str; 2] = ["header", "idle"];

/// The `http_requests_total` and `http_request_duration_seconds` series
/// created before any request: those the alert rules and the dashboard in
/// `deploy/` select by route (method, route template, status). Other
/// routes and statuses appear with their first request.
const HTTP_SERIES: [(&str, &str, u16); 5] = [
    ("GET", "/readyz", 200),
    ("GET", "/readyz", 500),
    ("GET", "/readyz", 503),
    ("GET", "/healthz", 200),
    ("GET", "/metrics", 200),
];

/// Creates every series the service exports at zero, the pool's (`pool`:
/// its application_name) included, so all of them are in the first scrape
/// of a fresh `serve` (as Prometheus recommends: `rate()` and absence
/// alerts work from the start). Labelled counters get each of their fixed
/// label values; provider labels, each provider in `providers` (the
/// registry's); HTTP requests, [`HTTP_SERIES`]. Registering leaves a value
/// already recorded alone (a gauge set meanwhile keeps its value). Call
/// once after [`describe_metrics`], before the background tasks start.
pub fn init_metrics(pool: &str, providers: &[&str]) {
    db_pool::init_metrics(pool);
    let labels = |pairs: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
        pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
    };
    let per_provider = |reasons: &[&str]| -> Vec<Vec<(&'static str, String)>> {
        providers
            .iter()
            .flat_map(|p| {
                reasons
                    .iter()
                    .map(|r| labels(&[("provider", p), ("reason", r)]))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    for (name, _) in COUNTERS {
        let values: Vec<Vec<(&'static str, String)>> = match *name {
            // With its histogram, by crate::http, which owns their handles.
            "http_requests_total" => continue,
            "http_connection_timeouts_total" => CONNECTION_TIMEOUT_KINDS
                .iter()
                .map(|k| labels(&[("kind", k)]))
                .collect(),
            "integrations_api_key_verifications_total" => VERIFICATION_RESULTS
                .iter()
                .map(|r| labels(&[("result", r)]))
                .collect(),
            "integrations_invalidations_received_total" => INVALIDATION_KINDS
                .iter()
                .map(|k| labels(&[("kind", k)]))
                .collect(),
            "integrations_refreshes_total" => providers
                .iter()
                .flat_map(|p| {
                    crate::service::REFRESH_OUTCOMES
                        .iter()
                        .map(move |o| labels(&[("provider", p), ("outcome", o)]))
                })
                .collect(),
            "integrations_refresh_limit_waits_total" => per_provider(&crate::service::WAIT_REASONS),
            "integrations_refresh_pauses_total" => per_provider(&crate::service::PAUSE_REASONS),
            "integrations_webhook_deliveries_total" => crate::service::DeliveryOutcome::ALL
                .iter()
                .map(|o| labels(&[("outcome", o.label())]))
                .collect(),
            _ => vec![Vec::new()],
        };
        for v in values {
            metrics::counter!(*name, &v).increment(0);
        }
    }
    for (name, _) in GAUGES {
        if *name == "integrations_refresh_in_flight" {
            for p in providers {
                metrics::gauge!(*name, "provider" => p.to_string()).increment(0.0);
            }
        } else {
            metrics::gauge!(*name).increment(0.0);
        }
    }
    for (name, _) in HISTOGRAMS {
        match *name {
            "http_request_duration_seconds" => continue,
            "integrations_refresh_seconds" => {
                for p in providers {
                    let _ = metrics::histogram!(*name, "provider" => p.to_string());
                }
            }
            _ => {
                let _ = metrics::histogram!(*name);
            }
        }
    }
    for (method, route, status) in HTTP_SERIES {
        crate::http::init_request_metrics(method, route, status);
    }
}
