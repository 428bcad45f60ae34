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

/// Describes every series the service exports (Prometheus `# HELP` lines),
/// the pool's included. Call once after installing the metrics recorder.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    db_pool::describe_metrics();
    for (name, help) in [
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
            "Token refreshes, by provider and outcome.",
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
    ] {
        describe_counter!(name, help);
    }
    for (name, help) in [
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
            "integrations_webhook_pending",
            "Webhook deliveries not delivered yet (due, being sent or waiting for a retry), all instances.",
        ),
        (
            "integrations_webhook_oldest_pending_seconds",
            "Age of the oldest pending webhook delivery (0 when none).",
        ),
    ] {
        describe_gauge!(name, help);
    }
    for (name, help) in [
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
    ] {
        describe_histogram!(name, Unit::Seconds, help);
    }
}
