//! Opening, checking and closing server connections: the deadpool `Manager`
//! and the connection it keeps ([`ClientConn`]).
//!
//! Hand-written rather than deadpool-postgres's manager because that one has
//! no bounded statement cache, no connection lifetimes, no socket timeout, no
//! TLS policy from the URL, no backoff on "too many connections" and no
//! protection against connections returned mid-query or mid-transaction.

use std::collections::HashMap;
use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use std::future::Future;
use std::pin::Pin;

use deadpool::managed::{Metrics, RecycleError, RecycleResult};
use lru::LruCache;
use rand::Rng;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, NoTls, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::attempts::{Attempts, Gate, Handoff};
use super::observe::Observer;
use super::socket::Socket;
use super::stats::{CloseReason, Counters};
use super::tls;
use super::wire::{self, Direct, TlsBeneath};
use crate::config::{Host, PoolConfig};
use crate::error::Error;

/// Connections returned to the pool less than this long ago are handed out
/// again without a round trip to check them (HikariCP's
/// `aliveBypassWindowMs`); older ones are pinged first. A connection the
/// server closed is caught before that by `Client::is_closed`, once its
/// driver has read the closing; and after any connection was found dead,
/// every connection returned before that is pinged too (see
/// [`Shared::connection_died`]).
const VALIDATION_BYPASS: Duration = Duration::from_millis(500);

/// What the pool, the manager and every connection share.
pub(crate) struct Shared {
    pub config: PoolConfig,
    pub counters: Counters,
    pub observer: Observer,
    /// The TLS connector for TCP hosts. A Unix socket connects without TLS
    /// (as libpq does): rustls needs a server name a socket path is not.
    pub tls: MakeRustlsConnect,
    pg: tokio_postgres::Config,
    /// How connection attempts are going (one in flight while failing).
    pub attempts: Attempts,
    /// Refused callers waiting for a returned connection.
    pub handoff: Handoff,
    /// The driver task of every open connection, so `close()` can end the
    /// ones still checked out when its deadline passes.
    drivers: Mutex<HashMap<u64, AbortHandle>>,
    next_id: AtomicU64,
    /// When a connection was last found dead, in nanoseconds after
    /// `created` (0: never).
    last_death: AtomicU64,
    created: Instant,
}

/// A connection's driver: runs until the session ends.
type Driver = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (every
    // critical section is a single insert/remove/assignment).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub fn new(config: PoolConfig) -> Result<Shared, Error> {
        let tls = tls::connector(&config)?;
        let pg = pg_config(&config);
        let observer = Observer::new(&config.application_name, config.leak_detection_threshold);
        Ok(Shared {
            config,
            counters: Counters::default(),
            observer,
            tls,
            pg,
            attempts: Attempts::default(),
            handoff: Handoff::default(),
            drivers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            last_death: AtomicU64::new(0),
            created: Instant::now(),
        })
    }

    /// Ends every connection's driver task: sockets close at once.
    pub fn abort_all(&self) {
        for (_, handle) in lock(&self.drivers).drain() {
            handle.abort();
        }
    }

    /// The configured lifetime with up to 10% taken off at random, so
    /// connections opened together do not all reconnect together.
    fn jittered_lifetime(&self) -> Option<Duration> {
        self.config.max_connection_lifetime.map(jitter)
    }

    /// Opens one connection: TCP or socket, TLS, authentication and the
    /// backend pid, all within `connect_timeout`.
    pub async fn connect(self: &Arc<Self>) -> Result<ClientConn, Error> {
        let probe = match self.attempts.gate() {
            Gate::Go { probe } => probe,
            Gate::Failing(e) => return Err(e),
        };
        // Cancelled (the caller gave up) before the outcome: the gate must
        // open again for the next caller.
        let mut outcome = Outcome {
            attempts: &self.attempts,
            probe,
            done: false,
        };
        Counters::inc(&self.counters.connect_attempts);
        let started = Instant::now();
        let attempt = async {
            let (client, connection, direct) = self.open().await?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let shared = Arc::downgrade(self);
            let driver = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(connection = id, error = %e, "database connection ended");
                }
                if let Some(shared) = shared.upgrade() {
                    lock(&shared.drivers).remove(&id);
                }
            });
            lock(&self.drivers).insert(id, driver.abort_handle());
            // tokio-postgres keeps the backend pid private; one simple query
            // (no prepared statement, so PgBouncer-safe) fetches it for
            // logs, leak reports and tests.
            let pid = backend_pid(&client)
                .await
                .map_err(|e| self.connect_error(e))?;
            Ok::<_, Error>(ClientConn::new(
                Arc::downgrade(self),
                client,
                Some(direct),
                id,
                pid,
                self.config.effective_statement_cache_size(),
                self.jittered_lifetime(),
            ))
        };
        let result = within_connect_timeout(&self.config, attempt).await;
        outcome.done = true;
        match &result {
            Ok(_) => {
                self.attempts.finished(probe, Ok(()));
                Counters::inc(&self.counters.connections_opened);
                self.observer.connect_time.record(started.elapsed());
            }
            Err(e) => {
                self.attempts.finished(probe, Err(e));
                Counters::inc(&self.counters.connect_failures);
                self.observer.connect_failed(e.code());
                if let Error::TooManyConnections(_) = e {
                    Counters::inc(&self.counters.too_many_connections);
                }
            }
        }
        result
    }

    /// A new connection for a caller inside `create`. Refused by the server
    /// (53300), the caller does not fail: it waits for a connection another
    /// caller returns (handed over directly) or for its next own attempt
    /// after the backoff, until its checkout gives up (`pool_timeout`).
    pub async fn connection_for_caller(self: &Arc<Self>) -> Result<ClientConn, Error> {
        loop {
            match self.connect().await {
                Err(Error::TooManyConnections(_)) => {}
                other => return other,
            }
            let mut waiter = self.handoff.wait();
            // Not before the next attempt is due, and not in a loop while
            // another caller's attempt is in flight.
            let soon = Instant::now() + Duration::from_millis(50);
            let retry_at = self.attempts.refusing().map_or(soon, |at| at.max(soon));
            let handed = tokio::select! {
                handed = waiter.conn() => match handed {
                    Some(conn) => Some(conn),
                    None => return Err(Error::PoolClosed),
                },
                // Time for another attempt: leave the line first, and keep
                // a connection handed over in the meantime.
                () = tokio::time::sleep_until(retry_at.into()) => waiter.leave(),
            };
            if let Some(mut conn) = handed {
                match self.recycle(&mut conn).await {
                    Ok(()) => {
                        Counters::inc(&self.counters.handoffs);
                        return Ok(conn);
                    }
                    Err(reason) => conn.closing(reason),
                }
            }
        }
    }

    /// A connection was found dead (closed mid-statement, or at checkout).
    /// Its backend was terminated or the server restarted: the others may
    /// have died at the same moment without their drivers having read it
    /// yet, so each connection returned before now is pinged before it is
    /// handed out again, even within [`VALIDATION_BYPASS`]. Without this, a
    /// caller retrying after every backend was killed at once could be
    /// handed one dead connection after another.
    pub fn connection_died(&self) {
        let at = u64::try_from(self.created.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_death.fetch_max(at.max(1), Ordering::Relaxed);
    }

    /// Whether `conn` was returned before the last connection was found
    /// dead.
    fn returned_before_a_death(&self, conn: &ClientConn) -> bool {
        let died = self.last_death.load(Ordering::Relaxed);
        died != 0
            && conn
                .returned
                .checked_duration_since(self.created)
                .is_none_or(|at| at.as_nanos() < u128::from(died))
    }

    fn connect_error(&self, e: tokio_postgres::Error) -> Error {
        connect_error(&self.config, e)
    }

    /// Checks a connection about to be handed out again.
    pub async fn recycle(&self, conn: &mut ClientConn) -> Result<(), CloseReason> {
        if self.unusable(conn) {
            self.connection_died();
            return Err(CloseReason::Broken);
        }
        if conn.lifetime.is_some_and(|l| conn.created.elapsed() >= l) {
            return Err(CloseReason::MaxLifetime);
        }
        if self
            .config
            .max_idle_connection_lifetime
            .is_some_and(|l| conn.returned.elapsed() >= l)
        {
            return Err(CloseReason::IdleLifetime);
        }
        if conn.needs_rollback {
            // Returned inside an open transaction (or after raw SQL that may
            // have opened one): never hand it out "idle in transaction".
            conn.client
                .batch_execute("ROLLBACK")
                .await
                .map_err(|_| CloseReason::Broken)?;
            conn.needs_rollback = false;
        }
        let validate =
            conn.returned.elapsed() >= VALIDATION_BYPASS || self.returned_before_a_death(conn);
        if validate && conn.client.check_connection().await.is_err() {
            self.connection_died();
            return Err(CloseReason::Broken);
        }
        Ok(())
    }

    /// Whether a returned connection must be discarded: broken, closed, or
    /// returned mid-statement (its caller was cancelled: the server may
    /// still be running the statement, so it is cancelled there too).
    pub fn unusable(&self, conn: &ClientConn) -> bool {
        if conn.flags.in_flight {
            // Also when the session is already closed on this side (a
            // direct statement abandoned halfway closes it): the server
            // does not notice until its statement ends.
            self.cancel(&conn.client, CANCEL_DISCARDED);
            return true;
        }
        conn.flags.broken || conn.client.is_closed()
    }

    /// Sends cancel requests for whatever the connection is running: one
    /// after each wait in `schedule` ([`CANCEL_ONCE`], [`CANCEL_DISCARDED`]).
    pub fn cancel(&self, client: &tokio_postgres::Client, schedule: &'static [Duration]) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let token = client.cancel_token();
        let tls = self.tls.clone();
        let config = self.config.clone();
        runtime.spawn(async move {
            for wait in schedule {
                tokio::time::sleep(*wait).await;
                if let Err(e) = send_cancel(&token, &config, &tls).await {
                    tracing::debug!(error = %e, "cancel request failed");
                }
            }
        });
    }

    /// Opens the session on a socket the pool opens itself: TLS as
    /// configured over TCP (negotiated by tokio-postgres), none over a Unix
    /// socket. Returns the client, its connection's driver future and the
    /// direct statement path on its socket (`wire.rs`).
    async fn open(&self) -> Result<(Client, Driver, Direct), Error> {
        let socket = Socket::open(&self.config)
            .await
            .map_err(|e| self.unreachable(&e))?;
        let (wire, direct) = wire::split(socket);
        let opened = match &self.config.host {
            Host::Unix(_) => self
                .pg
                .connect_raw(wire, NoTls)
                .await
                .map(|(client, connection)| (client, Box::pin(connection) as Driver)),
            Host::Tcp(host) => {
                let tls =
                    MakeTlsConnect::<TcpStream>::make_tls_connect(&mut self.tls.clone(), host)
                        .map_err(|e| {
                            Error::Tls(format!("{host} is not a valid server name: {e}"))
                        })?;
                self.pg
                    .connect_raw(wire, TlsBeneath(tls))
                    .await
                    .map(|(client, connection)| (client, Box::pin(connection) as Driver))
            }
        };
        let (client, driver) = opened.map_err(|e| self.connect_error(e))?;
        direct.start();
        Ok((client, driver, direct))
    }

    /// P1001 for a socket that could not be opened, worded as
    /// tokio-postgres words it.
    fn unreachable(&self, e: &io::Error) -> Error {
        Error::Unreachable {
            address: self.config.address(),
            reason: format!("error connecting to server: {e}"),
        }
    }

    /// Whether an idle connection has outlived a lifetime (for the reaper).
    pub fn expired(&self, conn: &ClientConn) -> Option<CloseReason> {
        if conn.client.is_closed() {
            Some(CloseReason::Broken)
        } else if conn.lifetime.is_some_and(|l| conn.created.elapsed() >= l) {
            Some(CloseReason::MaxLifetime)
        } else if self
            .config
            .max_idle_connection_lifetime
            .is_some_and(|l| conn.returned.elapsed() >= l)
        {
            Some(CloseReason::IdleLifetime)
        } else {
            None
        }
    }
}

/// One cancel request, at once: for a statement past its `socket_timeout`,
/// whose caller may go on using the connection until it is returned.
pub(crate) const CANCEL_ONCE: &[Duration] = &[Duration::ZERO];

/// Cancel requests for a connection discarded with a statement in flight:
/// at once, and twice more, 0.25 s and 1 s later. The server ignores a
/// cancel that arrives between statements, and the statement may not have
/// started yet (a pipelined one waits for those ahead of it; the server
/// may not have read it). The connection is never used again, so a later
/// request cancels nothing a caller still wants.
const CANCEL_DISCARDED: &[Duration] = &[
    Duration::ZERO,
    Duration::from_millis(250),
    Duration::from_millis(750),
];

/// One cancel request on a socket the pool opens (tokio-postgres does not
/// know where the session's socket went), TLS negotiated on it as for the
/// session.
async fn send_cancel(
    token: &tokio_postgres::CancelToken,
    config: &PoolConfig,
    tls: &MakeRustlsConnect,
) -> Result<(), String> {
    let socket = Socket::open(config).await.map_err(|e| e.to_string())?;
    let sent = match &config.host {
        Host::Unix(_) => token.cancel_query_raw(socket, NoTls).await,
        Host::Tcp(host) => {
            let tls = MakeTlsConnect::<Socket>::make_tls_connect(&mut tls.clone(), host)
                .map_err(|e| e.to_string())?;
            token.cancel_query_raw(socket, tls).await
        }
    };
    sent.map_err(|e| e.to_string())
}

/// Reopens the gate when an attempt is dropped before its outcome.
struct Outcome<'a> {
    attempts: &'a Attempts,
    probe: bool,
    done: bool,
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if !self.done && self.probe {
            self.attempts.cancelled();
        }
    }
}

/// A lifetime shortened by a random 0-10%.
fn jitter(lifetime: Duration) -> Duration {
    lifetime.mul_f64(1.0 - rand::thread_rng().gen_range(0.0..0.1))
}

/// The deadpool manager: thin, all logic lives in [`Shared`].
pub(crate) struct Manager {
    pub shared: Arc<Shared>,
}

impl deadpool::managed::Manager for Manager {
    // Boxed: deadpool moves the object it keeps several times per checkout
    // and return (idle queue, checkout future, `Object`); a pointer moves
    // for the hundreds of bytes of the connection (measured with
    // callgrind: 1,900 of the 3,900 instructions of a checkout and return).
    type Type = Box<ClientConn>;
    type Error = Error;

    async fn create(&self) -> Result<Box<ClientConn>, Error> {
        // Boxed: deadpool's checkout future embeds this one, and every
        // checkout (most of which never create) would otherwise carry and
        // move its several kilobytes (measured: +0.5 us per checkout).
        Box::pin(self.shared.connection_for_caller())
            .await
            .map(Box::new)
    }

    async fn recycle(&self, conn: &mut Box<ClientConn>, _: &Metrics) -> RecycleResult<Error> {
        self.shared.recycle(conn).await.map_err(|reason| {
            conn.closing(reason);
            RecycleError::message(reason.as_str())
        })
    }
}

async fn backend_pid(client: &tokio_postgres::Client) -> Result<i32, tokio_postgres::Error> {
    let rows = client.simple_query("SELECT pg_backend_pid()").await?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .unwrap_or(0))
}

/// The error and its causes on one line ("error connecting to server:
/// Connection refused (os error 111)").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// `attempt` (opening a connection to `config`'s server), bounded by
/// `connect_timeout`: P1001 naming the limit when it passes.
pub(super) async fn within_connect_timeout<T>(
    config: &PoolConfig,
    attempt: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match config.connect_timeout {
        Some(limit) => tokio::time::timeout(limit, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Unreachable {
                    address: config.address(),
                    reason: format!("no answer within connect_timeout={}s", limit.as_secs()),
                })
            }),
        None => attempt.await,
    }
}

/// The pool's error for a failed connection attempt to `config`'s server.
pub(super) fn connect_error(config: &PoolConfig, e: tokio_postgres::Error) -> Error {
    let address = config.address();
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        if *code == SqlState::TOO_MANY_CONNECTIONS {
            return Error::TooManyConnections(db.message().to_string());
        }
        if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            return Error::AuthenticationFailed {
                address,
                user: config.user.clone(),
            };
        }
        if *code == SqlState::INVALID_CATALOG_NAME {
            return Error::DatabaseDoesNotExist {
                database: config.database.clone(),
                address,
            };
        }
        return Error::Unreachable {
            address,
            reason: db.message().to_string(),
        };
    }
    let text = error_chain(&e);
    if text.contains("TLS") || text.contains("tls") {
        return Error::Tls(text);
    }
    Error::Unreachable {
        address,
        reason: text,
    }
}

/// The tokio-postgres configuration for a pool configuration. The schema
/// travels in the startup packet (`-c search_path=...`), so no connection
/// needs an extra round trip to set it.
pub(super) fn pg_config(cfg: &PoolConfig) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    let ssl_mode = match &cfg.host {
        Host::Tcp(h) => {
            pg.host(h);
            tls::negotiation(cfg.sslmode)
        }
        // No TLS over a Unix socket (libpq ignores sslmode there too).
        Host::Unix(dir) => {
            pg.host_path(dir);
            tokio_postgres::config::SslMode::Disable
        }
    };
    pg.port(cfg.port)
        .user(&cfg.user)
        .dbname(&cfg.database)
        .application_name(&cfg.application_name)
        .ssl_mode(ssl_mode)
        // TCP only: tokio-postgres ignores them on a Unix socket.
        .keepalives(cfg.keepalives)
        .keepalives_idle(cfg.keepalives_idle)
        .keepalives_interval(cfg.keepalives_interval)
        .keepalives_retries(cfg.keepalives_count);
    if let Some(limit) = cfg.tcp_user_timeout {
        pg.tcp_user_timeout(limit);
    }
    if let Some(pw) = cfg.password() {
        pg.password(pw);
    }
    let mut options = String::new();
    if cfg.schema != "public" {
        options.push_str("-c search_path=");
        options.push_str(&escape_option(&cfg.schema));
    }
    if let Some(extra) = &cfg.options {
        if !options.is_empty() {
            options.push(' ');
        }
        options.push_str(extra);
    }
    if !options.is_empty() {
        pg.options(&options);
    }
    pg
}

/// Escapes a value for the `options` startup parameter, where spaces
/// separate arguments and backslash escapes.
fn escape_option(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == ' ' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One server connection as the pool keeps it.
pub struct ClientConn {
    pub(crate) client: Client,
    /// Cached statements run on the socket directly.
    pub(super) direct: Option<Direct>,
    /// Prepared statements by SQL text, least recently used evicted. Written
    /// by hand over `lru` because tokio-postgres caches nothing and
    /// deadpool-postgres's cache is unbounded; evicting drops the
    /// `Statement`, which makes tokio-postgres close it on the server.
    pub(super) statements: Option<LruCache<String, Statement>>,
    pub(crate) id: u64,
    pub(crate) pid: i32,
    pub(crate) created: Instant,
    /// When it was last returned to the pool (for the idle lifetime).
    pub(crate) returned: Instant,
    pub(crate) lifetime: Option<Duration>,
    /// Whether a statement is in flight, and whether the connection broke.
    pub(crate) flags: Flags,
    /// A transaction may be open: roll back before anyone else uses it.
    pub(crate) needs_rollback: bool,
    /// Why it is being closed, set by whoever decides to close it and
    /// counted when it is dropped (`shutdown` when nobody said).
    close_reason: AtomicU8,
    shared: Weak<Shared>,
}

impl ClientConn {
    /// Records why this connection is about to be dropped.
    pub(crate) fn closing(&self, reason: CloseReason) {
        self.close_reason.store(reason as u8 + 1, Ordering::Relaxed);
    }
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        let reason = match self.close_reason.load(Ordering::Relaxed) {
            0 => CloseReason::Shutdown,
            n => CloseReason::from_index(n - 1),
        };
        tracing::debug!(
            connection = self.id,
            backend_pid = self.pid,
            reason = reason.as_str(),
            "closing database connection"
        );
        if let Some(shared) = self.shared.upgrade() {
            shared.counters.closed(reason);
        }
    }
}

impl ClientConn {
    pub(super) fn new(
        shared: Weak<Shared>,
        client: Client,
        direct: Option<Direct>,
        id: u64,
        pid: i32,
        cache_size: usize,
        lifetime: Option<Duration>,
    ) -> ClientConn {
        let now = Instant::now();
        ClientConn {
            client,
            direct,
            statements: NonZeroUsize::new(cache_size).map(LruCache::new),
            id,
            pid,
            created: now,
            returned: now,
            lifetime,
            flags: Flags::default(),
            needs_rollback: false,
            close_reason: AtomicU8::new(0),
            shared,
        }
    }
}

/// What a connection's owner must know before reusing it.
#[derive(Debug, Default)]
pub(crate) struct Flags {
    /// A statement was sent and its answer not yet read: a caller dropped
    /// mid-statement leaves this set.
    pub in_flight: bool,
    /// Unusable: discard on return.
    pub broken: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_are_spread_over_the_last_tenth() {
        let l = Duration::from_secs(100);
        let samples: Vec<Duration> = (0..200).map(|_| jitter(l)).collect();
        assert!(samples.iter().all(|d| *d <= l && *d >= l.mul_f64(0.9)));
        let distinct: std::collections::HashSet<_> = samples.iter().collect();
        assert!(
            distinct.len() > 150,
            "jitter must differ between connections"
        );
    }

    #[test]
    fn keepalive_parameters_reach_the_driver() {
        let pg =
            pg_config(&PoolConfig::parse("postgresql://h/db").unwrap_or_else(|e| panic!("{e}")));
        assert!(pg.get_keepalives());
        assert_eq!(pg.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(pg.get_keepalives_interval(), Some(Duration::from_secs(10)));
        assert_eq!(pg.get_keepalives_retries(), Some(3));
        assert_eq!(pg.get_tcp_user_timeout(), Some(&Duration::from_secs(60)));
        let cfg = PoolConfig::parse(
            "postgresql://h/db?keepalives=0&keepalives_idle=1&keepalives_interval=2&keepalives_count=5&tcp_user_timeout=0",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let pg = pg_config(&cfg);
        assert!(!pg.get_keepalives());
        assert_eq!(pg.get_keepalives_idle(), Duration::from_secs(1));
        assert_eq!(pg.get_keepalives_interval(), Some(Duration::from_secs(2)));
        assert_eq!(pg.get_keepalives_retries(), Some(5));
        assert_eq!(pg.get_tcp_user_timeout(), None);
    }

    #[test]
    fn schema_and_options_travel_in_the_startup_packet() {
        let cfg = PoolConfig::parse(
            "postgresql://h/db?schema=my%20app&options=-c%20statement_timeout%3D5000",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let pg = pg_config(&cfg);
        assert_eq!(
            pg.get_options(),
            Some("-c search_path=my\\ app -c statement_timeout=5000")
        );
    }
}
