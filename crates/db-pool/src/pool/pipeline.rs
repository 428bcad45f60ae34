//! [`Pool::query`](super::Pool::query): single statements outside any
//! transaction, sent on a connection shared with other callers of
//! `query`, so several statements are in flight on one connection at once
//! (tokio-postgres pipelines concurrent requests on a client: the next is
//! written before the previous answer is read). An exclusive checkout
//! pays a round trip per statement on its connection; a shared one only
//! waits for the server.
//!
//! A shared connection is a *lane*: a connection checked out of the pool
//! like any other (so `connection_limit`, `pool_timeout`, the FIFO queue
//! and the checkout metrics all hold), with a count of statements in
//! flight. A caller opens a new lane while the pool has a connection free
//! now, else joins the least busy lane; a lane goes back to the pool as
//! soon as its last statement is answered. A lane takes new statements for
//! [`LANE_AGE`] at most (then it drains: under steady load it still goes
//! back, so connection lifetimes, validation and leak detection see it
//! like any checkout), and none while callers wait for an exclusive
//! checkout: they get the drained connections first-come first-served.
//! The lane uses the connection's own prepared-statement cache, and gives
//! it back with the connection.
//!
//! Hand-written: deadpool-postgres and bb8 hand out connections
//! exclusively; sharing one is what this adds.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio_postgres::{Row, Statement};

use super::conn::{query_error, record_statement, Conn};
use super::manager::Shared;
use super::params::Param;
use super::stats::Counters;
use crate::error::Error;

/// How long a lane takes new statements.
const LANE_AGE: Duration = Duration::from_millis(500);

/// The lanes of a pool.
#[derive(Default)]
pub(crate) struct Lanes {
    lanes: Mutex<Vec<Arc<Lane>>>,
    /// Callers of `query` in the pool's queue for a connection to open a
    /// lane with (not the exclusive waiters lanes make way for).
    opening: AtomicUsize,
}

/// Counts a caller in [`Lanes::opening`] while it asks the pool for a
/// connection.
struct Opening<'a>(&'a AtomicUsize);

impl<'a> Opening<'a> {
    fn new(count: &'a AtomicUsize) -> Opening<'a> {
        count.fetch_add(1, Ordering::AcqRel);
        Opening(count)
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One shared connection.
struct Lane {
    conn: Conn,
    /// The connection's prepared statements, taken for the lane's life
    /// (the cache needs exclusive access) and given back with it.
    statements: Option<Mutex<LruCache<String, Statement>>>,
    opened: Instant,
    in_flight: AtomicUsize,
    /// Takes no new statements.
    draining: AtomicBool,
    /// A statement was abandoned mid-way (its caller dropped, or past
    /// `socket_timeout`): the server may still be running it. When the
    /// lane's other statements are answered, it is cancelled there and the
    /// connection discarded, as an exclusive connection returned
    /// mid-statement is.
    abandoned: AtomicBool,
    /// The connection was found closed: discarded.
    broken: AtomicBool,
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(cache) = self.statements.take() {
            self.conn
                .restore_statements(cache.into_inner().unwrap_or_else(PoisonError::into_inner));
        }
        if self.abandoned.load(Ordering::Acquire) {
            self.conn.mark_abandoned();
        }
        if self.broken.load(Ordering::Acquire) {
            self.conn.mark_broken();
        }
        // Dropping `conn` hands it back to the pool (or discards it).
    }
}

impl Lane {
    fn takes_statements(&self) -> bool {
        !self.draining.load(Ordering::Acquire)
            && !self.broken.load(Ordering::Acquire)
            && !self.abandoned.load(Ordering::Acquire)
            && self.opened.elapsed() < LANE_AGE
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Critical sections are single pushes, removals and counter updates.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A statement counted in its lane; ends it (and retires the lane when it
/// was the last) when dropped, also when the caller's future is dropped
/// mid-statement.
struct Turn<'a> {
    lanes: &'a Lanes,
    lane: Arc<Lane>,
    answered: bool,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.lane.abandoned.store(true, Ordering::Release);
        }
        self.lanes.leave(&self.lane);
    }
}

impl Lanes {
    /// Runs one statement on a shared connection of `pool`.
    pub(crate) async fn query(
        &self,
        pool: &super::Pool,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Row>, Error> {
        let shared = &pool.inner.shared;
        self.drain_if_others_wait(pool);
        // A connection free now opens a lane; with none free the caller
        // shares the least busy lane rather than queue; with no lane
        // taking statements either, it queues like any checkout.
        let lane = {
            let opening = Opening::new(&self.opening);
            match pool.try_get().await {
                Some(conn) => self.open(conn?),
                None => match self.join_least_busy() {
                    Some(lane) => lane,
                    None => {
                        let conn = pool.get().await;
                        drop(opening);
                        self.open(conn?)
                    }
                },
            }
        };
        let mut turn = Turn {
            lanes: self,
            lane,
            answered: false,
        };
        let result = run(shared, &turn.lane, sql, params).await;
        match &result {
            // Left running on the server, maybe: abandoned, not answered.
            Err(Error::SocketTimeout(_)) => {}
            Err(Error::ConnectionClosed) => {
                turn.lane.broken.store(true, Ordering::Release);
                turn.answered = true;
            }
            _ => turn.answered = true,
        }
        result
    }

    /// While callers wait for an exclusive checkout, lanes take no new
    /// statements: they drain and go back to those callers.
    fn drain_if_others_wait(&self, pool: &super::Pool) {
        let waiting =
            pool.inner.shared.observer.waiting_count() > self.opening.load(Ordering::Acquire);
        if waiting {
            for lane in lock(&self.lanes).iter() {
                lane.draining.store(true, Ordering::Release);
            }
        }
    }

    /// A new lane on `conn`, with this caller's statement counted.
    fn open(&self, mut conn: Conn) -> Arc<Lane> {
        let lane = Arc::new(Lane {
            statements: conn.take_statements().map(Mutex::new),
            conn,
            opened: Instant::now(),
            in_flight: AtomicUsize::new(1),
            draining: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            broken: AtomicBool::new(false),
        });
        lock(&self.lanes).push(lane.clone());
        lane
    }

    /// Joins the least busy lane taking statements, if any.
    fn join_least_busy(&self) -> Option<Arc<Lane>> {
        let lanes = lock(&self.lanes);
        let lane = lanes
            .iter()
            .filter(|l| l.takes_statements())
            .min_by_key(|l| l.in_flight.load(Ordering::Acquire))?;
        lane.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(lane.clone())
    }

    /// A statement on `lane` ended: the lane goes back to the pool when it
    /// was its last.
    fn leave(&self, lane: &Arc<Lane>) {
        let mut lanes = lock(&self.lanes);
        if lane.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            lanes.retain(|l| !Arc::ptr_eq(l, lane));
        }
    }
}

/// The statement, prepared once per connection (unless the cache is off:
/// then one unnamed statement each time), timed like every statement.
/// `socket_timeout` counts from the call, time queued behind the lane's
/// other statements included; past it no cancel request is sent at once
/// (on a shared connection it could cancel another caller's statement):
/// the statement is abandoned, and cancelled once the lane's other
/// statements are answered.
async fn run(
    shared: &Shared,
    lane: &Lane,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Vec<Row>, Error> {
    let client = lane.conn.client();
    let fut = async {
        let Some(cache) = &lane.statements else {
            return client.query(sql, params).await.map_err(query_error);
        };
        let cached = lock(cache).get(sql).cloned();
        let stmt = match cached {
            Some(stmt) => {
                Counters::inc(&shared.counters.statement_cache_hits);
                stmt
            }
            None => {
                Counters::inc(&shared.counters.statement_cache_misses);
                let stmt = client.prepare(sql).await.map_err(query_error)?;
                // Only an entry pushed out for room is an eviction (two
                // callers may have prepared the same text at once).
                let pushed_out = lock(cache).push(sql.to_owned(), stmt.clone());
                if pushed_out.is_some_and(|(text, _)| text != sql) {
                    Counters::inc(&shared.counters.statement_cache_evictions);
                }
                stmt
            }
        };
        client.query(&stmt, params).await.map_err(query_error)
    };
    let started = Instant::now();
    let result = match shared.config.socket_timeout {
        Some(limit) => match tokio::time::timeout(limit, fut).await {
            Ok(result) => result,
            Err(_) => {
                Counters::inc(&shared.counters.socket_timeouts);
                Err(Error::SocketTimeout(limit))
            }
        },
        None => fut.await,
    };
    record_statement(shared, lane.conn.backend_pid(), sql, started.elapsed());
    result
}
