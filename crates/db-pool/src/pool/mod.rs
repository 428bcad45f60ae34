//! The pool: deadpool's managed pool (fair FIFO queue of callers, slot
//! accounting) around our own connection manager.

mod attempts;
mod conn;
mod listener;
mod manager;
mod observe;
mod params;
mod pipeline;
mod socket;
mod stats;
mod tls;
mod wire;

use std::future::Future;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use deadpool::managed::{PoolError, QueueMode};

pub use conn::{Conn, Transaction};
pub use listener::{ListenEvent, Listener};
pub use observe::{describe_metrics, init_metrics};
pub use params::Param;
pub use stats::{CloseReason, PoolStats};

use manager::{Manager, Shared};

use crate::config::PoolConfig;
use crate::error::Error;

/// A PostgreSQL connection pool configured by a [`PoolConfig`].
///
/// Cheap to clone; clones share the same connections. Connections open
/// lazily, on demand, up to `connection_limit`.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    pool: deadpool::managed::Pool<Manager>,
    shared: Arc<Shared>,
    lanes: pipeline::Lanes,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("url", &self.inner.shared.config.redacted_url())
            .field("stats", &self.stats())
            .finish()
    }
}

impl Pool {
    /// Builds a pool. No connection is opened yet; call [`Pool::get`] (or
    /// `get` once at start-up to fail fast). Must be called inside a tokio
    /// runtime when connection lifetimes are configured (a background task
    /// closes expired idle connections).
    pub fn new(config: PoolConfig) -> Result<Pool, Error> {
        let limit = config.connection_limit;
        let shared = Arc::new(Shared::new(config)?);
        let pool = deadpool::managed::Pool::builder(Manager {
            shared: shared.clone(),
        })
        .max_size(limit)
        // The most recently returned connection first: hot connections stay
        // hot and surplus ones age out through the idle lifetime. Callers
        // themselves queue first-come first-served (tokio's fair semaphore).
        .queue_mode(QueueMode::Lifo)
        .build()
        .map_err(|e| Error::Parameter(format!("cannot build the pool: {e}")))?;
        let inner = Arc::new(Inner {
            pool,
            shared,
            lanes: pipeline::Lanes::default(),
        });
        spawn_reaper(Arc::downgrade(&inner));
        spawn_observer(Arc::downgrade(&inner));
        Ok(Pool { inner })
    }

    /// The configuration the pool runs with.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.shared.config
    }

    /// Checks out a connection, opening one if none is free and the limit
    /// allows. Waits at most `pool_timeout`, measured from this call, then
    /// fails with `P2024`. With `leak_detection_threshold` set, the caller's
    /// file and line and tracing span are remembered for the leak report.
    #[track_caller]
    pub fn get(&self) -> impl std::future::Future<Output = Result<Conn, Error>> + Send + '_ {
        let location = std::panic::Location::caller();
        self.checkout(location)
    }

    async fn checkout(
        &self,
        location: &'static std::panic::Location<'static>,
    ) -> Result<Conn, Error> {
        let shared = &self.inner.shared;
        let started = Instant::now();
        let mut checkout = std::pin::pin!(self.inner.pool.get());
        // Most checkouts find a connection free at once: those never wait,
        // so they are not registered as waiting and arm no timer (both cost
        // a clock read and a lock per checkout otherwise). The first poll
        // uses this task's waker, so nothing is lost when it is pending.
        let first = std::future::poll_fn(|cx| Poll::Ready(checkout.as_mut().poll(cx))).await;
        let result = match first {
            Poll::Ready(result) => result,
            Poll::Pending => {
                // Counted waiting until this block ends, however it ends.
                let _waiting = shared.observer.waiting(started);
                // What is left of the limit (tokio's clock, whose timeout
                // reads a limit past what it can represent as none).
                match shared.config.pool_timeout {
                    Some(limit) => {
                        let left = limit.saturating_sub(started.elapsed());
                        match tokio::time::timeout(left, checkout).await {
                            Ok(result) => result,
                            Err(_) => return Err(self.gave_up_waiting(0)),
                        }
                    }
                    None => checkout.await,
                }
            }
        };
        self.checked_out(result, started, location)
    }

    /// A connection if one is free (or may be opened) now, without
    /// queueing behind waiting callers; `None` when the caller would wait.
    pub(crate) async fn try_get(&self) -> Option<Result<Conn, Error>> {
        let location = std::panic::Location::caller();
        let started = Instant::now();
        let now = deadpool::managed::Timeouts {
            wait: Some(Duration::ZERO),
            create: None,
            recycle: None,
        };
        // No queueing, but opening a connection (or waiting for one the
        // server refused to come back) is bounded by `pool_timeout` as in
        // any checkout.
        let result = match self.inner.shared.config.pool_timeout {
            Some(limit) => {
                match tokio::time::timeout(limit, self.inner.pool.timeout_get(&now)).await {
                    Ok(result) => result,
                    Err(_) => return Some(Err(self.gave_up_waiting(0))),
                }
            }
            None => self.inner.pool.timeout_get(&now).await,
        };
        match result {
            Err(PoolError::Timeout(_)) => None,
            result => Some(self.checked_out(result, started, location)),
        }
    }

    /// The bookkeeping of a checkout's outcome.
    fn checked_out(
        &self,
        result: Result<deadpool::managed::Object<Manager>, PoolError<Error>>,
        started: Instant,
        location: &'static std::panic::Location<'static>,
    ) -> Result<Conn, Error> {
        let shared = &self.inner.shared;
        match result {
            Ok(obj) => {
                stats::Counters::inc(&shared.counters.checkouts);
                shared.observer.checkout_wait.record(started.elapsed());
                let watch = shared.observer.watch(location, obj.pid);
                let lease = conn::Lease::new(shared.clone(), watch);
                Ok(Conn::new(obj, shared.clone(), lease))
            }
            Err(PoolError::Backend(e)) => Err(e),
            Err(PoolError::Closed) => Err(Error::PoolClosed),
            Err(PoolError::Timeout(_)) => Err(self.gave_up_waiting(0)),
            Err(other) => Err(Error::Parameter(format!("pool failure: {other}"))),
        }
    }

    /// Runs one statement outside any transaction and returns its rows, on
    /// a connection shared with other callers of `query`: statements of
    /// concurrent callers are pipelined (sent before the previous answers
    /// arrive) instead of each waiting for a connection of its own. For
    /// point reads under concurrency; a transaction, `SET`, `LISTEN` or
    /// anything that must see its own session needs [`Pool::get`].
    ///
    /// The guarantees of a checkout hold: the shared connections are
    /// checked out of this pool (`connection_limit`, `pool_timeout`: P2024,
    /// and the checkout metrics count them), each statement runs under
    /// `socket_timeout` and is timed and logged like any other, and a
    /// caller waiting in [`Pool::get`] is served first-come first-served
    /// (shared connections take no new statements while anyone waits, and
    /// go back as they drain; a shared connection takes new statements for
    /// half a second at most, then goes back when drained). Cancel-safe: a
    /// caller dropped mid-statement, or past `socket_timeout` (counted from
    /// the call), costs its connection: once the other statements on it
    /// are answered, the abandoned one is cancelled on the server and the
    /// connection discarded, like an exclusive one returned mid-statement;
    /// never another caller's answer. For short statements: one that runs
    /// long delays the statements queued behind it on its connection.
    /// Statements that leave session state (`BEGIN`, `SET`, temporary
    /// tables) would leak it to the other callers: use [`Pool::get`]. With
    /// `pgbouncer=true` each call is an exclusive checkout.
    pub async fn query(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<tokio_postgres::Row>, Error> {
        if self.inner.shared.config.pgbouncer {
            return self.get().await?.query(sql, params).await;
        }
        self.inner.lanes.query(self, sql, params).await
    }

    /// The P2024 error for a caller that waited `pool_timeout` for a
    /// connection, through this pool or through a queue of its own in front
    /// of it (`queued_elsewhere` callers waiting there, this one included),
    /// counted in
    /// `checkout_timeouts` like a checkout that timed out.
    pub fn gave_up_waiting(&self, queued_elsewhere: usize) -> Error {
        let shared = &self.inner.shared;
        stats::Counters::inc(&shared.counters.checkout_timeouts);
        let s = self.stats();
        let cause = shared.attempts.refusing().map(|_| {
            format!(
                "the server refused new connections (53300): serving with {}",
                s.open
            )
        });
        Error::PoolTimeout {
            cause,
            timeout_secs: self.config().pool_timeout.unwrap_or_default().as_secs(),
            connection_limit: self.config().connection_limit,
            in_use: s.in_use,
            // Counted while the caller was still registered as waiting.
            waiting: s.waiting + queued_elsewhere,
        }
    }

    /// A snapshot of the pool's gauges and counters. `in_use` is the raw
    /// count of checkouts not yet ended, not clamped to `open`: a drifted or
    /// wrapped count shows rather than hides. While connections move, a
    /// snapshot may catch one discarded (no longer `open`) whose checkout
    /// has not ended yet; at rest `in_use + idle == open`.
    pub fn stats(&self) -> PoolStats {
        let shared = &self.inner.shared;
        let open = self.inner.pool.status().size;
        let in_use = shared
            .observer
            .in_use
            .load(std::sync::atomic::Ordering::Relaxed);
        let (waiting, oldest) = shared.observer.waiters();
        let mut s = PoolStats {
            max: self.config().connection_limit,
            open,
            in_use,
            idle: open.saturating_sub(in_use),
            waiting,
            oldest_wait_secs: oldest.as_secs_f64(),
            leaks_detected: shared
                .observer
                .leaks
                .load(std::sync::atomic::Ordering::Relaxed),
            slow_queries: shared
                .observer
                .slow_queries
                .load(std::sync::atomic::Ordering::Relaxed),
            connect_failures_by_code: shared.observer.failures_by_code(),
            ..PoolStats::default()
        };
        shared.counters.fill(&mut s);
        s
    }

    /// Copies the current gauges and counters into the `metrics` recorder
    /// (names `db_pool_*`, label `pool` = application_name). Also done every
    /// second in the background; call it right before rendering a scrape
    /// for exact figures.
    pub fn export_metrics(&self) {
        self.inner.shared.observer.export(&self.stats());
    }

    /// Closes the pool: new checkouts fail at once (`P2024`, pool closed),
    /// idle connections close now, checked-out ones close when returned or,
    /// at `deadline`, by force.
    pub async fn close(&self, deadline: Duration) {
        let shared = &self.inner.shared;
        self.inner.pool.close();
        shared.handoff.close();
        // A deadline past what the clock can represent: wait for them all.
        let until = Instant::now().checked_add(deadline);
        while self.inner.pool.status().size > 0 && until.is_none_or(|at| Instant::now() < at) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.inner.pool.status().size;
        if left > 0 {
            tracing::warn!(
                connections = left,
                "pool closed with connections still checked out after {}s; closing them",
                deadline.as_secs_f64()
            );
        }
        shared.abort_all();
    }

    /// Whether [`Pool::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.pool.is_closed()
    }
}

/// Closes idle connections past their lifetime (and ones the server
/// closed) in the background, so an idle pool really lets go of its server
/// connections rather than noticing at the next checkout.
fn spawn_reaper(inner: Weak<Inner>) {
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let cfg = &strong.shared.config;
    let shortest = [
        cfg.max_idle_connection_lifetime,
        cfg.max_connection_lifetime,
    ]
    .into_iter()
    .flatten()
    .min();
    let Some(shortest) = shortest else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let period = (shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(15));
    drop(strong);
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            if inner.pool.is_closed() {
                return;
            }
            let shared = &inner.shared;
            let removed = inner.pool.retain(|conn, _| match shared.expired(conn) {
                Some(reason) => {
                    conn.closing(reason);
                    false
                }
                None => true,
            });
            if !removed.removed.is_empty() {
                tracing::debug!(
                    closed = removed.removed.len(),
                    "closed expired idle connections"
                );
            }
        }
    });
}

/// Exports metrics every second and, with leak detection on, looks for
/// connections held past the threshold (a quarter of it between scans, so a
/// leak is reported at most 25% late).
fn spawn_observer(inner: Weak<Inner>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let leak_period = inner
        .upgrade()
        .and_then(|i| i.shared.observer.leak_detection())
        .map(|t| (t / 4).clamp(Duration::from_millis(25), Duration::from_secs(1)));
    let period = leak_period.unwrap_or(Duration::from_secs(1));
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_export = Instant::now();
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let pool = Pool { inner };
            pool.inner.shared.observer.scan_for_leaks();
            if last_export.elapsed() >= Duration::from_secs(1) {
                pool.export_metrics();
                last_export = Instant::now();
            }
            if pool.is_closed() {
                pool.export_metrics();
                return;
            }
        }
    });
}
