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
//! flight. A caller joins the least busy lane, or opens a new one while
//! the pool has a connection to spare; a lane goes back to the pool as soon
//! as its last statement is answered. While callers wait for an exclusive
//! checkout, lanes take no new statements: they drain and go back, and the
//! waiters get them first-come first-served.
//!
//! Hand-written: deadpool-postgres and bb8 hand out connections
//! exclusively; sharing one is what this adds.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use lru::LruCache;
use tokio_postgres::{Row, Statement};

use super::conn::{query_error, record_statement, Conn};
use super::manager::Shared;
use super::params::Param;
use super::stats::Counters;
use crate::error::Error;

/// Statements in flight on one lane before a caller prefers opening
/// another lane (when the pool has a connection to spare).
const OPEN_AT: usize = 1;

/// The lanes of a pool.
#[derive(Default)]
pub(crate) struct Lanes {
    lanes: Mutex<Vec<Arc<Lane>>>,
    /// Callers of `query` waiting in the pool for a connection to open a
    /// lane with (not the exclusive waiters lanes make way for).
    opening: AtomicUsize,
}

/// Counts a caller in [`Lanes::opening`] while it waits for a connection.
struct Opening<'a>(&'a AtomicUsize);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One shared connection.
struct Lane {
    conn: Conn,
    /// Its own prepared statements (the connection's cache needs exclusive
    /// access): by SQL text, bounded like the connection's.
    statements: Option<Mutex<LruCache<String, Statement>>>,
    in_flight: AtomicUsize,
    /// Takes no new statements (callers wait for exclusive checkouts).
    draining: AtomicBool,
    /// A statement on it timed out, was abandoned mid-way or found it
    /// closed: discarded when its last statement ends.
    broken: AtomicBool,
}

impl Drop for Lane {
    fn drop(&mut self) {
        if self.broken.load(Ordering::Acquire) {
            self.conn.mark_broken();
        }
        // Dropping `conn` hands it back to the pool (or discards it).
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Critical sections are single pushes, removals and counter updates.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a caller does.
enum Pick {
    Join(Arc<Lane>),
    Open,
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
            // The answer may still be on its way; the server may still be
            // running it. Like an exclusive connection returned
            // mid-statement, the connection is not reused.
            self.lane.broken.store(true, Ordering::Release);
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
        let lane = match self.pick(pool) {
            Pick::Join(lane) => lane,
            // A connection free now opens a lane; with none free the
            // caller shares the least busy lane rather than queue; with no
            // lane either (or every lane draining), it queues like any
            // checkout.
            Pick::Open => match pool.try_get().await {
                Some(conn) => self.open(conn?),
                None => match self.join_least_busy() {
                    Some(lane) => lane,
                    None => {
                        self.opening.fetch_add(1, Ordering::AcqRel);
                        let opening = Opening(&self.opening);
                        let conn = pool.get().await;
                        drop(opening);
                        self.open(conn?)
                    }
                },
            },
        };
        let mut turn = Turn {
            lanes: self,
            lane,
            answered: false,
        };
        let result = run(shared, &turn.lane, sql, params).await;
        turn.answered = true;
        if matches!(
            result,
            Err(Error::ConnectionClosed | Error::SocketTimeout(_))
        ) {
            turn.lane.broken.store(true, Ordering::Release);
        }
        result
    }

    /// A new lane on `conn`, with this caller's statement counted.
    fn open(&self, conn: Conn) -> Arc<Lane> {
        let lane = Arc::new(Lane {
            statements: conn
                .statement_cache_size()
                .map(|n| Mutex::new(LruCache::new(n))),
            conn,
            in_flight: AtomicUsize::new(1),
            draining: AtomicBool::new(false),
            broken: AtomicBool::new(false),
        });
        lock(&self.lanes).push(lane.clone());
        lane
    }

    /// Joins a lane with nothing in flight, or asks for a new one. While
    /// callers wait for an exclusive checkout, lanes drain instead.
    fn pick(&self, pool: &super::Pool) -> Pick {
        let waiting =
            pool.inner.shared.observer.waiting_count() > self.opening.load(Ordering::Acquire);
        let lanes = lock(&self.lanes);
        if waiting {
            for lane in lanes.iter() {
                lane.draining.store(true, Ordering::Release);
            }
            return Pick::Open;
        }
        match least_busy(&lanes) {
            Some(lane) if lane.in_flight.load(Ordering::Acquire) < OPEN_AT => {
                lane.in_flight.fetch_add(1, Ordering::AcqRel);
                Pick::Join(lane.clone())
            }
            _ => Pick::Open,
        }
    }

    /// Joins the least busy lane taking statements, if any.
    fn join_least_busy(&self) -> Option<Arc<Lane>> {
        let lanes = lock(&self.lanes);
        let lane = least_busy(&lanes)?;
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

fn least_busy(lanes: &[Arc<Lane>]) -> Option<&Arc<Lane>> {
    lanes
        .iter()
        .filter(|l| !l.draining.load(Ordering::Acquire) && !l.broken.load(Ordering::Acquire))
        .min_by_key(|l| l.in_flight.load(Ordering::Acquire))
}

/// The statement, prepared once per lane (unless the cache is off, or
/// `pgbouncer=true`, where it is one unnamed statement each time), under
/// `socket_timeout`, timed like every statement.
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
                if lock(cache).push(sql.to_owned(), stmt.clone()).is_some() {
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
                shared.cancel(client);
                Err(Error::SocketTimeout(limit))
            }
        },
        None => fut.await,
    };
    record_statement(shared, lane.conn.backend_pid(), sql, started.elapsed());
    result
}
