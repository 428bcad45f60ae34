//! The handle callers hold while they use a pooled connection ([`Conn`],
//! [`Transaction`]); the connection itself is the manager's `ClientConn`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use deadpool::managed::Object;
use lru::LruCache;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Row, Statement};

use super::manager::{ClientConn, Flags, Manager, Shared, CANCEL_ONCE};
use super::params::{infer_types, Param};
use super::stats::{CloseReason, Counters};
use super::wire::Outcome;
use crate::error::Error;

/// What a statement should produce.
#[derive(Clone, Copy)]
pub(super) enum Want {
    Rows,
    Count,
}

enum Output {
    Rows(Vec<Row>),
    Count(u64),
}

/// A checked-out connection. Returned to the pool when dropped.
///
/// Every statement goes through the connection's prepared-statement cache
/// (or, with `pgbouncer=true`, as one unnamed typed statement), under
/// `socket_timeout`.
pub struct Conn {
    /// Always `Some` until `drop` hands it back (or discards it).
    obj: Option<Object<Manager>>,
    /// The bookkeeping of this checkout, ended after the connection is back.
    lease: Option<Lease>,
    shared: Arc<Shared>,
    /// A `Transaction` was dropped without commit or rollback: roll back
    /// before this caller's next statement.
    abandoned_transaction: bool,
}

impl Conn {
    pub(crate) fn new(obj: Object<Manager>, shared: Arc<Shared>, lease: Lease) -> Conn {
        Conn {
            obj: Some(obj),
            lease: Some(lease),
            shared,
            abandoned_transaction: false,
        }
    }

    #[allow(clippy::expect_used)]
    fn client_conn(&self) -> &ClientConn {
        self.obj
            .as_ref()
            .expect("Conn holds its connection until dropped")
    }

    /// The connection, after rolling back a transaction its caller abandoned.
    #[allow(clippy::expect_used)]
    async fn ready(&mut self) -> Result<(&Shared, &mut ClientConn), Error> {
        let conn: &mut ClientConn = self
            .obj
            .as_mut()
            .expect("Conn holds its connection until dropped");
        if self.abandoned_transaction {
            let client = &conn.client;
            let fut = std::pin::pin!(async {
                client.batch_execute("ROLLBACK").await.map_err(query_error)
            });
            guard(
                &self.shared,
                &mut conn.flags,
                client,
                conn.pid,
                "ROLLBACK",
                fut,
            )
            .await?;
            self.abandoned_transaction = false;
            conn.needs_rollback = false;
        }
        Ok((&self.shared, conn))
    }

    /// The underlying tokio-postgres client, for tools that need one (a
    /// migration runner, `COPY`). What runs through it bypasses the statement
    /// cache and `socket_timeout`; the connection is rolled back before it is
    /// reused.
    #[allow(clippy::expect_used)]
    pub fn raw_client(&mut self) -> &mut Client {
        let conn = self
            .obj
            .as_mut()
            .expect("Conn holds its connection until dropped");
        conn.needs_rollback = true;
        // What the tool sends (COPY, anything) is beyond the direct path's
        // bookkeeping: this connection stays on tokio-postgres's path.
        conn.direct = None;
        &mut conn.client
    }

    /// The server process serving this connection (`pg_backend_pid()`).
    pub fn backend_pid(&self) -> i32 {
        self.client_conn().pid
    }

    /// The client, shared by a pipelined lane (`pipeline.rs`).
    pub(super) fn client(&self) -> &Client {
        &self.client_conn().client
    }

    /// The connection's prepared statements, for a lane's life (`None`:
    /// the cache is off); given back with [`Conn::restore_statements`].
    #[allow(clippy::expect_used)]
    pub(super) fn take_statements(&mut self) -> Option<LruCache<String, Statement>> {
        self.obj
            .as_mut()
            .expect("Conn holds its connection until dropped")
            .statements
            .take()
    }

    /// Gives back what [`Conn::take_statements`] took.
    #[allow(clippy::expect_used)]
    pub(super) fn restore_statements(&mut self, cache: LruCache<String, Statement>) {
        self.obj
            .as_mut()
            .expect("Conn holds its connection until dropped")
            .statements = Some(cache);
    }

    /// A statement may still be running on it: cancelled on the server and
    /// the connection discarded when dropped.
    #[allow(clippy::expect_used)]
    pub(super) fn mark_abandoned(&mut self) {
        self.obj
            .as_mut()
            .expect("Conn holds its connection until dropped")
            .flags
            .in_flight = true;
    }

    /// Not to be reused: discarded when dropped.
    #[allow(clippy::expect_used)]
    pub(super) fn mark_broken(&mut self) {
        self.obj
            .as_mut()
            .expect("Conn holds its connection until dropped")
            .flags
            .broken = true;
    }

    /// Runs a statement and returns its rows.
    pub async fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, Error> {
        match self.run(sql, params, Want::Rows).await? {
            Output::Rows(rows) => Ok(rows),
            Output::Count(_) => Ok(Vec::new()),
        }
    }

    /// Runs a statement that returns exactly one row.
    pub async fn query_one(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Row, Error> {
        let mut rows = self.query(sql, params).await?;
        match rows.len() {
            1 => Ok(rows.swap_remove(0)),
            n => Err(Error::RowCount(n)),
        }
    }

    /// Runs a statement that returns at most one row.
    pub async fn query_opt(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Option<Row>, Error> {
        let mut rows = self.query(sql, params).await?;
        match rows.len() {
            0 => Ok(None),
            1 => Ok(Some(rows.swap_remove(0))),
            n => Err(Error::RowCount(n)),
        }
    }

    /// Runs a statement and returns the number of rows it affected.
    pub async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, Error> {
        match self.run(sql, params, Want::Count).await? {
            Output::Count(n) => Ok(n),
            Output::Rows(rows) => Ok(rows.len() as u64),
        }
    }

    /// Runs a statement with explicitly typed parameters as one unnamed
    /// statement (never cached, PgBouncer-safe).
    pub async fn query_typed(
        &mut self,
        sql: &str,
        params: &[(Param<'_>, Type)],
    ) -> Result<Vec<Row>, Error> {
        let (shared, conn) = self.ready().await?;
        let client = &conn.client;
        let fut =
            std::pin::pin!(async { client.query_typed(sql, params).await.map_err(query_error) });
        guard(shared, &mut conn.flags, client, conn.pid, sql, fut).await
    }

    /// The parameter types the server infers for a statement.
    pub async fn param_types(&mut self, sql: &str) -> Result<Vec<Type>, Error> {
        let (shared, conn) = self.ready().await?;
        let client = &conn.client;
        let pgbouncer = shared.config.pgbouncer;
        let fut = std::pin::pin!(async {
            if pgbouncer {
                // A named statement is safe inside one transaction even
                // under PgBouncer: describe it there and let it go.
                client.batch_execute("BEGIN").await.map_err(query_error)?;
                let types = client.prepare(sql).await.map(|s| s.params().to_vec());
                client.batch_execute("COMMIT").await.map_err(query_error)?;
                types.map_err(query_error)
            } else {
                Ok(client
                    .prepare(sql)
                    .await
                    .map_err(query_error)?
                    .params()
                    .to_vec())
            }
        });
        guard(shared, &mut conn.flags, client, conn.pid, sql, fut).await
    }

    /// Runs SQL text with the simple protocol (several statements allowed,
    /// no parameters, nothing returned).
    pub async fn batch_execute(&mut self, sql: &str) -> Result<(), Error> {
        // Raw SQL may open a transaction the pool does not know about.
        self.ready().await?.1.needs_rollback = true;
        self.simple(sql).await
    }

    /// Begins a transaction. It rolls back unless committed, also when the
    /// handle is dropped (the rollback then runs before the connection is
    /// used again).
    pub async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        self.simple("BEGIN").await?;
        self.ready().await?.1.needs_rollback = true;
        Ok(Transaction {
            conn: self,
            done: false,
        })
    }

    async fn simple(&mut self, sql: &str) -> Result<(), Error> {
        let (shared, conn) = self.ready().await?;
        let client = &conn.client;
        let fut = std::pin::pin!(async { client.batch_execute(sql).await.map_err(query_error) });
        guard(shared, &mut conn.flags, client, conn.pid, sql, fut).await
    }

    async fn run(&mut self, sql: &str, params: &[Param<'_>], want: Want) -> Result<Output, Error> {
        let (shared, conn) = self.ready().await?;
        let counters = &shared.counters;
        let client = &conn.client;
        let statements = &mut conn.statements;
        // The caller gave up on its previous statement: tokio-postgres may
        // not have written it yet, and this one must not overtake it.
        let abandoned = conn.flags.in_flight;
        let direct = &mut conn.direct;
        let pgbouncer = shared.config.pgbouncer;
        let fut = std::pin::pin!(async {
            if pgbouncer {
                let typed = infer_types(params).map_err(|n| {
                    Error::Parameter(format!(
                        "pgbouncer=true: cannot tell the PostgreSQL type of parameter ${n}; pass it with query_typed"
                    ))
                })?;
                return match want {
                    Want::Rows => client.query_typed(sql, &typed).await.map(Output::Rows),
                    Want::Count => client.execute_typed(sql, &typed).await.map(Output::Count),
                }
                .map_err(query_error);
            }
            let Some(cache) = statements else {
                return match want {
                    Want::Rows => client.query(sql, params).await.map(Output::Rows),
                    Want::Count => client.execute(sql, params).await.map(Output::Count),
                }
                .map_err(query_error);
            };
            let (stmt, evicted) = cached_statement(cache, counters, client, sql).await?;
            if let (Some(direct), Some(_)) = (direct.as_ref(), &evicted) {
                // Told before the evicted statement is dropped, which has
                // tokio-postgres queue its Close.
                direct.closing_statement();
            }
            drop(evicted);
            if let Some(direct) = direct.as_mut().filter(|_| !abandoned) {
                if let Some(outcome) = direct.run(&stmt, params, want).await {
                    return match outcome {
                        Outcome::Done(rows, count) => Ok(match want {
                            Want::Rows => Output::Rows(rows),
                            Want::Count => Output::Count(count),
                        }),
                        Outcome::Server(e) => Err(query_error(e)),
                        Outcome::Lost(e) => {
                            tracing::debug!(error = %e, backend_pid = conn.pid, "database connection lost");
                            Err(Error::ConnectionClosed)
                        }
                    };
                }
            }
            match want {
                Want::Rows => client.query(&stmt, params).await.map(Output::Rows),
                Want::Count => client.execute(&stmt, params).await.map(Output::Count),
            }
            .map_err(query_error)
        });
        guard(shared, &mut conn.flags, client, conn.pid, sql, fut).await
    }
}

/// `sql`'s prepared statement from the connection's cache, prepared (and
/// cached, evicting the least recently used) on a miss; and the statement
/// evicted, whose drop closes it on the server.
async fn cached_statement(
    cache: &mut LruCache<String, Statement>,
    counters: &Counters,
    client: &Client,
    sql: &str,
) -> Result<(Statement, Option<(String, Statement)>), Error> {
    if let Some(stmt) = cache.get(sql) {
        Counters::inc(&counters.statement_cache_hits);
        return Ok((stmt.clone(), None));
    }
    Counters::inc(&counters.statement_cache_misses);
    let stmt = client.prepare(sql).await.map_err(query_error)?;
    // Only pushed after a miss, so what comes back is an eviction.
    let evicted = cache.push(sql.to_owned(), stmt.clone());
    if evicted.is_some() {
        Counters::inc(&counters.statement_cache_evictions);
    }
    Ok((stmt, evicted))
}

/// Runs one statement's future under `socket_timeout`, keeping the
/// connection's state honest: `in_flight` stays set if the caller's future
/// is dropped mid-statement; a timeout sends a real cancel request and marks
/// the connection broken; a closed connection is marked broken. Records the
/// statement's duration and logs it when slower than `slow_query_threshold`
/// (the SQL text only: parameter values may be tokens).
async fn guard<T>(
    shared: &Shared,
    flags: &mut Flags,
    client: &Client,
    backend_pid: i32,
    sql: &str,
    // Pinned by the caller: the statement's future is large, and moving it
    // into this one and then into the timeout cost two copies of it per
    // statement (measured with callgrind: about 300 instructions).
    fut: std::pin::Pin<&mut impl std::future::Future<Output = Result<T, Error>>>,
) -> Result<T, Error> {
    flags.in_flight = true;
    let started = Instant::now();
    let result = match shared.config.socket_timeout {
        Some(limit) => match tokio::time::timeout(limit, fut).await {
            Ok(result) => result,
            Err(_) => {
                Counters::inc(&shared.counters.socket_timeouts);
                shared.cancel(client, CANCEL_ONCE);
                flags.broken = true;
                Err(Error::SocketTimeout(limit))
            }
        },
        None => fut.await,
    };
    flags.in_flight = false;
    record_statement(shared, backend_pid, sql, started.elapsed());
    if matches!(result, Err(Error::ConnectionClosed)) {
        flags.broken = true;
        shared.connection_died();
    }
    result
}

/// Records a statement's duration and logs it when slower than
/// `slow_query_threshold` (the SQL text only: parameter values may be
/// tokens).
pub(super) fn record_statement(
    shared: &Shared,
    backend_pid: i32,
    sql: &str,
    took: std::time::Duration,
) {
    shared.observer.query_time.record(took);
    if let Some(threshold) = shared.config.slow_query_threshold {
        if took >= threshold {
            shared
                .observer
                .slow_queries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                pool = %shared.observer.name,
                duration_ms = took.as_secs_f64() * 1000.0,
                backend_pid,
                statement = sql,
                slow_query_threshold_ms = threshold.as_millis() as u64,
                "slow query (run EXPLAIN ANALYZE on it)"
            );
        }
    }
}

/// Maps a statement's failure: a closed connection is P1017, a server error
/// keeps its SQLSTATE, anything else is client-side.
pub(crate) fn query_error(e: tokio_postgres::Error) -> Error {
    if e.is_closed() {
        return Error::ConnectionClosed;
    }
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        // admin_shutdown, crash_shutdown: the backend is going away.
        if code == "57P01" || code == "57P02" {
            return Error::ConnectionClosed;
        }
        return Error::Query {
            sqlstate: code.to_string(),
            message: db.message().to_string(),
            constraint: db.constraint().map(str::to_string),
            table: db.table().map(str::to_string),
            column: db.column().map(str::to_string),
        };
    }
    if e.to_string().contains("closed") {
        return Error::ConnectionClosed;
    }
    Error::Client(e)
}

impl Drop for Conn {
    /// Hands the connection back. One that may be unusable (mid-statement,
    /// broken) is discarded at once, freeing its slot; one left inside a
    /// transaction is rolled back first, so it never waits in the pool
    /// "idle in transaction" holding locks.
    fn drop(&mut self) {
        let (Some(mut obj), lease) = (self.obj.take(), self.lease.take()) else {
            return;
        };
        obj.returned = Instant::now();
        if self.shared.unusable(&obj) {
            let conn = Object::take(obj);
            conn.closing(CloseReason::Broken);
            drop(conn);
            drop(lease);
            return;
        }
        if !(obj.needs_rollback || self.abandoned_transaction) {
            if self.shared.handoff.wanted() {
                // A caller the server refused a connection is waiting:
                // this one goes to it directly (deadpool's idle queue
                // cannot reach a caller inside `create`).
                if let Some(conn) = self.shared.handoff.offer(*Object::take(obj)) {
                    conn.closing(CloseReason::Shutdown);
                }
                drop(lease);
                return;
            }
            drop(obj);
            drop(lease);
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    match obj.client.batch_execute("ROLLBACK").await {
                        Ok(()) => obj.needs_rollback = false,
                        Err(_) => obj.flags.broken = true,
                    }
                    obj.returned = Instant::now();
                    drop(obj);
                    drop(lease);
                });
            }
            Err(_) => Object::take(obj).closing(CloseReason::Broken),
        }
    }
}

/// One checkout's bookkeeping: counted in use until dropped, which happens
/// only once the connection is back in the pool (or discarded).
pub(crate) struct Lease {
    shared: Arc<Shared>,
    at: Instant,
    leak_watch: Option<u64>,
}

impl Lease {
    pub(crate) fn new(shared: Arc<Shared>, leak_watch: Option<u64>) -> Lease {
        shared.observer.in_use.fetch_add(1, Ordering::Relaxed);
        Lease {
            shared,
            at: Instant::now(),
            leak_watch,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let observer = &self.shared.observer;
        observer.in_use.fetch_sub(1, Ordering::Relaxed);
        super::stats::Counters::inc(&self.shared.counters.returns);
        observer.hold_time.record(self.at.elapsed());
        if let Some(id) = self.leak_watch {
            observer.returned(id);
        }
    }
}

/// A transaction on a checked-out connection; rolls back unless committed.
pub struct Transaction<'a> {
    conn: &'a mut Conn,
    done: bool,
}

impl Transaction<'_> {
    /// See [`Conn::query`].
    pub async fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, Error> {
        self.conn.query(sql, params).await
    }

    /// See [`Conn::query_one`].
    pub async fn query_one(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Row, Error> {
        self.conn.query_one(sql, params).await
    }

    /// See [`Conn::query_opt`].
    pub async fn query_opt(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Option<Row>, Error> {
        self.conn.query_opt(sql, params).await
    }

    /// See [`Conn::execute`].
    pub async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, Error> {
        self.conn.execute(sql, params).await
    }

    /// Commits.
    pub async fn commit(mut self) -> Result<(), Error> {
        self.done = true;
        self.conn.simple("COMMIT").await?;
        self.conn.ready().await?.1.needs_rollback = false;
        Ok(())
    }

    /// Rolls back.
    pub async fn rollback(mut self) -> Result<(), Error> {
        self.done = true;
        self.conn.simple("ROLLBACK").await?;
        self.conn.ready().await?.1.needs_rollback = false;
        Ok(())
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Left open: rolled back before the caller's next statement,
            // or when the connection goes back to the pool.
            self.conn.abandoned_transaction = true;
        }
    }
}
