//! What the pool tells about itself: waiters, checked-out connections,
//! leak reports and the `metrics` facade export.
//!
//! The hot path touches only atomics, one short mutex section per checkout
//! (the waiter registry, which gives PgBouncer's `maxwait`) and histogram
//! handles; gauges and counters are copied into the `metrics` recorder by
//! [`Observer::export`], on a timer and on demand, so the export costs
//! nothing per checkout.

use std::collections::{BTreeMap, HashMap};
use std::panic::Location;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use metrics::Histogram;

use super::stats::{CloseReason, PoolStats};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single insert/remove/read: consistent
    // even after a panic elsewhere.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A checkout watched for leaks.
struct Held {
    at: Instant,
    location: &'static Location<'static>,
    span: tracing::Span,
    backend_pid: i32,
    reported: bool,
}

pub(crate) struct Observer {
    pub name: String,
    waiters: Mutex<BTreeMap<u64, Instant>>,
    next_waiter: AtomicU64,
    pub in_use: AtomicUsize,
    leak_threshold: Option<Duration>,
    held: Mutex<HashMap<u64, Held>>,
    next_checkout: AtomicU64,
    pub leaks: AtomicU64,
    pub slow_queries: AtomicU64,
    pub connect_failures_by_code: Mutex<BTreeMap<&'static str, u64>>,
    pub checkout_wait: Histogram,
    pub hold_time: Histogram,
    pub connect_time: Histogram,
    pub query_time: Histogram,
}

/// Removes a caller from the waiter registry when its checkout ends, however
/// it ends (success, error, timeout, or the caller's future dropped).
pub(crate) struct Waiting<'a> {
    observer: &'a Observer,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.observer.waiters).remove(&self.id);
    }
}

impl Observer {
    pub fn new(name: &str, leak_threshold: Option<Duration>) -> Observer {
        let label = [("pool", name.to_string())];
        Observer {
            name: name.to_string(),
            waiters: Mutex::new(BTreeMap::new()),
            next_waiter: AtomicU64::new(0),
            in_use: AtomicUsize::new(0),
            leak_threshold,
            held: Mutex::new(HashMap::new()),
            next_checkout: AtomicU64::new(1),
            leaks: AtomicU64::new(0),
            slow_queries: AtomicU64::new(0),
            connect_failures_by_code: Mutex::new(BTreeMap::new()),
            checkout_wait: metrics::histogram!("db_pool_checkout_wait_seconds", &label),
            hold_time: metrics::histogram!("db_pool_connection_hold_seconds", &label),
            connect_time: metrics::histogram!("db_pool_connect_seconds", &label),
            query_time: metrics::histogram!("db_pool_query_seconds", &label),
        }
    }

    /// A caller waiting for a connection since `since`.
    pub fn waiting(&self, since: Instant) -> Waiting<'_> {
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        lock(&self.waiters).insert(id, since);
        Waiting { observer: self, id }
    }

    /// Callers waiting now.
    pub fn waiting_count(&self) -> usize {
        lock(&self.waiters).len()
    }

    /// (callers waiting, how long the oldest has waited)
    pub fn waiters(&self) -> (usize, Duration) {
        let waiters = lock(&self.waiters);
        let oldest = waiters
            .values()
            .next()
            .map_or(Duration::ZERO, Instant::elapsed);
        (waiters.len(), oldest)
    }

    pub fn connect_failed(&self, code: &'static str) {
        *lock(&self.connect_failures_by_code)
            .entry(code)
            .or_default() += 1;
    }

    pub fn failures_by_code(&self) -> BTreeMap<String, u64> {
        lock(&self.connect_failures_by_code)
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect()
    }

    pub fn leak_detection(&self) -> Option<Duration> {
        self.leak_threshold
    }

    /// Registers a checkout for leak detection (only when it is on).
    pub fn watch(&self, location: &'static Location<'static>, backend_pid: i32) -> Option<u64> {
        self.leak_threshold?;
        let id = self.next_checkout.fetch_add(1, Ordering::Relaxed);
        lock(&self.held).insert(
            id,
            Held {
                at: Instant::now(),
                location,
                span: tracing::Span::current(),
                backend_pid,
                reported: false,
            },
        );
        Some(id)
    }

    /// A watched connection came back.
    pub fn returned(&self, id: u64) {
        let Some(held) = lock(&self.held).remove(&id) else {
            return;
        };
        if held.reported {
            held.span.in_scope(|| {
                tracing::info!(
                    pool = %self.name,
                    checked_out_at = %held.location,
                    held_secs = held.at.elapsed().as_secs_f64(),
                    backend_pid = held.backend_pid,
                    "connection reported as a possible leak was returned"
                );
            });
        }
    }

    /// Reports every checkout held longer than the threshold, once.
    pub fn scan_for_leaks(&self) {
        let Some(threshold) = self.leak_threshold else {
            return;
        };
        let mut held = lock(&self.held);
        for h in held.values_mut() {
            let age = h.at.elapsed();
            if h.reported || age < threshold {
                continue;
            }
            h.reported = true;
            self.leaks.fetch_add(1, Ordering::Relaxed);
            h.span.in_scope(|| {
                tracing::warn!(
                    pool = %self.name,
                    checked_out_at = %h.location,
                    held_secs = age.as_secs_f64(),
                    backend_pid = h.backend_pid,
                    leak_detection_threshold_secs = threshold.as_secs(),
                    "connection held longer than leak_detection_threshold: possible leak (held across slow work, or never returned)"
                );
            });
        }
    }

    /// Copies a stats snapshot into the `metrics` recorder.
    pub fn export(&self, s: &PoolStats) {
        let pool = self.name.clone();
        let gauge =
            |name: &'static str, v: f64| metrics::gauge!(name, "pool" => pool.clone()).set(v);
        gauge("db_pool_connections_open", s.open as f64);
        gauge("db_pool_connections_in_use", s.in_use as f64);
        gauge("db_pool_connections_idle", s.idle as f64);
        gauge("db_pool_connections_max", s.max as f64);
        gauge("db_pool_waiting", s.waiting as f64);
        gauge("db_pool_oldest_wait_seconds", s.oldest_wait_secs);
        let counter = |name: &'static str, v: u64| {
            metrics::counter!(name, "pool" => pool.clone()).absolute(v);
        };
        counter("db_pool_checkouts_total", s.checkouts);
        counter("db_pool_connect_attempts_total", s.connect_attempts);
        counter("db_pool_checkout_timeouts_total", s.checkout_timeouts);
        counter("db_pool_connections_opened_total", s.connections_opened);
        counter("db_pool_statement_cache_hits_total", s.statement_cache_hits);
        counter(
            "db_pool_statement_cache_misses_total",
            s.statement_cache_misses,
        );
        counter(
            "db_pool_statement_cache_evictions_total",
            s.statement_cache_evictions,
        );
        counter("db_pool_leaks_detected_total", s.leaks_detected);
        counter("db_pool_slow_queries_total", s.slow_queries);
        counter("db_pool_socket_timeouts_total", s.socket_timeouts);
        counter("db_pool_handoffs_total", s.handoffs);
        for (reason, v) in [
            (CloseReason::Broken.as_str(), s.closed_broken),
            (CloseReason::MaxLifetime.as_str(), s.closed_max_lifetime),
            (CloseReason::IdleLifetime.as_str(), s.closed_idle_lifetime),
            ("too_many_connections", s.too_many_connections),
            (CloseReason::Shutdown.as_str(), s.closed_shutdown),
        ] {
            metrics::counter!("db_pool_connections_closed_total", "pool" => pool.clone(), "reason" => reason)
                .absolute(v);
        }
        for (code, v) in &s.connect_failures_by_code {
            metrics::counter!("db_pool_connect_failures_total", "pool" => pool.clone(), "code" => code.clone())
                .absolute(*v);
        }
    }
}

/// The pool's gauges (besides `db_pool_oldest_wait_seconds`), with help.
const GAUGES: [(&str, &str); 5] = [
    (
        "db_pool_connections_open",
        "Connections the pool holds open (in use and idle).",
    ),
    ("db_pool_connections_in_use", "Connections checked out now."),
    (
        "db_pool_connections_idle",
        "Open connections waiting in the pool.",
    ),
    ("db_pool_connections_max", "The pool's connection_limit."),
    ("db_pool_waiting", "Callers waiting for a connection now."),
];

/// The pool's gauge in seconds.
const OLDEST_WAIT: &str = "db_pool_oldest_wait_seconds";

/// The pool's counters, with help (the two labelled ones last).
const COUNTERS: [(&str, &str); 13] = [
    ("db_pool_checkouts_total", "Successful checkouts."),
    (
        "db_pool_connect_attempts_total",
        "Attempts to open a connection, successful or not.",
    ),
    (
        "db_pool_checkout_timeouts_total",
        "Checkouts that gave up after pool_timeout (P2024).",
    ),
    ("db_pool_connections_opened_total", "Connections opened."),
    (
        "db_pool_statement_cache_hits_total",
        "Statements found prepared on their connection.",
    ),
    (
        "db_pool_statement_cache_misses_total",
        "Statements prepared because they were not cached.",
    ),
    (
        "db_pool_statement_cache_evictions_total",
        "Prepared statements evicted from a connection's cache.",
    ),
    (
        "db_pool_leaks_detected_total",
        "Checkouts held longer than leak_detection_threshold.",
    ),
    (
        "db_pool_slow_queries_total",
        "Statements slower than slow_query_threshold.",
    ),
    (
        "db_pool_socket_timeouts_total",
        "Statements cancelled at socket_timeout (P1008).",
    ),
    (
        "db_pool_handoffs_total",
        "Connections handed straight to a caller the server had refused one (53300).",
    ),
    (CLOSED, "Connections closed, by reason."),
    (
        CONNECT_FAILURES,
        "Failed connection attempts, by error code.",
    ),
];

/// Labelled `reason`: [`CLOSE_REASONS`].
const CLOSED: &str = "db_pool_connections_closed_total";

/// Every `reason` of [`CLOSED`] (as [`Observer::export`] writes them).
const CLOSE_REASONS: [&str; 5] = [
    "broken",
    "max_lifetime",
    "idle_lifetime",
    "too_many_connections",
    "shutdown",
];

/// Labelled `code`: the Prisma code of the failed attempt.
const CONNECT_FAILURES: &str = "db_pool_connect_failures_total";

/// The codes a connection attempt fails with (see `Error::code`):
/// unreachable, authentication, no such database, TLS, too many
/// connections.
const CONNECT_FAILURE_CODES: [&str; 5] = ["P1001", "P1000", "P1003", "P1011", "P2037"];

/// The pool's histograms, in seconds, with help.
const HISTOGRAMS: [(&str, &str); 4] = [
    (
        "db_pool_checkout_wait_seconds",
        "Time from asking for a connection to getting it.",
    ),
    (
        "db_pool_connection_hold_seconds",
        "Time a connection stays checked out.",
    ),
    (
        "db_pool_connect_seconds",
        "Time to open a connection (TCP, TLS, authentication).",
    ),
    ("db_pool_query_seconds", "Statement duration."),
];

/// Describes every series the pool exports (Prometheus `# HELP` lines).
/// Call once after installing the metrics recorder.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    for (name, help) in GAUGES {
        describe_gauge!(name, help);
    }
    describe_gauge!(
        OLDEST_WAIT,
        Unit::Seconds,
        "How long the longest-waiting caller has waited."
    );
    for (name, help) in COUNTERS {
        describe_counter!(name, help);
    }
    for (name, help) in HISTOGRAMS {
        describe_histogram!(name, Unit::Seconds, help);
    }
}

/// Creates every series of the pool named `pool` (its application_name, the
/// `pool` label) at zero: each gauge, counter and histogram, the closed
/// counter for every reason and the connect-failure counter for every code
/// an attempt can fail with. So they are all in the first scrape, for
/// `rate()` and absence alerts. Registering leaves a value already
/// recorded alone. Call once after installing the metrics recorder.
pub fn init_metrics(pool: &str) {
    let label = || ("pool", pool.to_string());
    for (name, _) in GAUGES {
        metrics::gauge!(name, &[label()]).increment(0.0);
    }
    metrics::gauge!(OLDEST_WAIT, &[label()]).increment(0.0);
    for (name, _) in COUNTERS {
        match name {
            CLOSED => {
                for reason in CLOSE_REASONS {
                    metrics::counter!(name, &[label(), ("reason", reason.to_string())])
                        .increment(0);
                }
            }
            CONNECT_FAILURES => {
                for code in CONNECT_FAILURE_CODES {
                    metrics::counter!(name, &[label(), ("code", code.to_string())]).increment(0);
                }
            }
            _ => {
                metrics::counter!(name, &[label()]).increment(0);
            }
        }
    }
    for (name, _) in HISTOGRAMS {
        let _ = metrics::histogram!(name, &[label()]);
    }
}
