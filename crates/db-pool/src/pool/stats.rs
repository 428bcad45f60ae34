//! Counters the pool keeps about itself. Plain atomics, updated on the paths
//! where the events happen, so a snapshot never drifts from what happened
//! (the gauges are derived from deadpool's own slot count, not kept apart).

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The server closed it, a query timed out, or a check failed.
    Broken,
    /// Older than `max_connection_lifetime`.
    MaxLifetime,
    /// Idle longer than `max_idle_connection_lifetime`.
    IdleLifetime,
    /// The pool was closed.
    Shutdown,
}

impl CloseReason {
    pub(crate) fn from_index(n: u8) -> CloseReason {
        match n {
            0 => CloseReason::Broken,
            1 => CloseReason::MaxLifetime,
            2 => CloseReason::IdleLifetime,
            _ => CloseReason::Shutdown,
        }
    }

    /// The label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Broken => "broken",
            CloseReason::MaxLifetime => "max_lifetime",
            CloseReason::IdleLifetime => "idle_lifetime",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub checkouts: AtomicU64,
    pub returns: AtomicU64,
    pub checkout_timeouts: AtomicU64,
    pub connect_attempts: AtomicU64,
    pub connections_opened: AtomicU64,
    pub connect_failures: AtomicU64,
    pub too_many_connections: AtomicU64,
    pub closed_broken: AtomicU64,
    pub closed_max_lifetime: AtomicU64,
    pub closed_idle_lifetime: AtomicU64,
    pub closed_shutdown: AtomicU64,
    pub statement_cache_hits: AtomicU64,
    pub statement_cache_misses: AtomicU64,
    pub statement_cache_evictions: AtomicU64,
    pub socket_timeouts: AtomicU64,
    pub handoffs: AtomicU64,
}

impl Counters {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed(&self, reason: CloseReason) {
        Self::inc(match reason {
            CloseReason::Broken => &self.closed_broken,
            CloseReason::MaxLifetime => &self.closed_max_lifetime,
            CloseReason::IdleLifetime => &self.closed_idle_lifetime,
            CloseReason::Shutdown => &self.closed_shutdown,
        });
    }
}

/// A snapshot of the pool: gauges and counters since the pool was created.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PoolStats {
    /// The configured `connection_limit`.
    pub max: usize,
    /// Connections open (idle + in use).
    pub open: usize,
    /// Connections checked out by callers.
    pub in_use: usize,
    /// Connections open and free.
    pub idle: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
    /// How long the longest-waiting caller has waited, in seconds
    /// (PgBouncer's `maxwait`); 0 when nobody waits.
    pub oldest_wait_secs: f64,
    /// Successful checkouts.
    pub checkouts: u64,
    /// Checkouts ended: the connection is back in the pool or discarded.
    /// `checkouts - returns` is the raw count behind `in_use`.
    pub returns: u64,
    /// Checkouts that gave up with P2024.
    pub checkout_timeouts: u64,
    /// Attempts to open a connection (successful or not).
    pub connect_attempts: u64,
    /// Connections opened.
    pub connections_opened: u64,
    /// Attempts to open a connection that failed.
    pub connect_failures: u64,
    /// Connection attempts the server refused with "too many connections".
    pub too_many_connections: u64,
    /// Connections closed because they were broken.
    pub closed_broken: u64,
    /// Connections closed at `max_connection_lifetime`.
    pub closed_max_lifetime: u64,
    /// Connections closed at `max_idle_connection_lifetime`.
    pub closed_idle_lifetime: u64,
    /// Connections closed by `close()`.
    pub closed_shutdown: u64,
    /// Statements found in a connection's cache.
    pub statement_cache_hits: u64,
    /// Statements prepared because they were not cached.
    pub statement_cache_misses: u64,
    /// Statements evicted (and closed on the server).
    pub statement_cache_evictions: u64,
    /// Queries cancelled at `socket_timeout`.
    pub socket_timeouts: u64,
    /// Connections handed straight from the caller returning them to a
    /// caller the server had refused a new one (53300).
    pub handoffs: u64,
    /// Checkouts held longer than `leak_detection_threshold`.
    pub leaks_detected: u64,
    /// Statements slower than `slow_query_threshold`.
    pub slow_queries: u64,
    /// Failed connection attempts by error code (P1001, P2037, ...).
    pub connect_failures_by_code: std::collections::BTreeMap<String, u64>,
}

impl Counters {
    pub fn fill(&self, s: &mut PoolStats) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        s.checkouts = get(&self.checkouts);
        s.returns = get(&self.returns);
        s.checkout_timeouts = get(&self.checkout_timeouts);
        s.connect_attempts = get(&self.connect_attempts);
        s.connections_opened = get(&self.connections_opened);
        s.connect_failures = get(&self.connect_failures);
        s.too_many_connections = get(&self.too_many_connections);
        s.closed_broken = get(&self.closed_broken);
        s.closed_max_lifetime = get(&self.closed_max_lifetime);
        s.closed_idle_lifetime = get(&self.closed_idle_lifetime);
        s.closed_shutdown = get(&self.closed_shutdown);
        s.statement_cache_hits = get(&self.statement_cache_hits);
        s.statement_cache_misses = get(&self.statement_cache_misses);
        s.statement_cache_evictions = get(&self.statement_cache_evictions);
        s.socket_timeouts = get(&self.socket_timeouts);
        s.handoffs = get(&self.handoffs);
    }
}
