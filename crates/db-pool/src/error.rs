//! The library's one error type, with Prisma's error codes so runbooks written
//! for Prisma (and the seed's troubleshooting table) map onto it.

use std::time::Duration;

use crate::config::ConfigError;

/// Everything the pool can fail with. `code()` gives the Prisma code and
/// `hint()` what to do; the Display text never contains a password, a
/// statement parameter or a token.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL or a parameter is invalid (`P1013`).
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// The server could not be reached: refused, unresolvable, or no answer
    /// within `connect_timeout` (`P1001`).
    #[error("P1001: Can't reach database server at {address} ({reason})")]
    Unreachable {
        /// `host:port` or the socket directory.
        address: String,
        /// What happened, e.g. "connection refused" or "no answer within 5s".
        reason: String,
    },

    /// The server refused the credentials (`P1000`).
    #[error("P1000: Authentication failed against database server at {address}, the provided database credentials for `{user}` are not valid")]
    AuthenticationFailed {
        /// `host:port`.
        address: String,
        /// The role name.
        user: String,
    },

    /// The database does not exist (`P1003`).
    #[error("P1003: Database `{database}` does not exist on the database server at {address}")]
    DatabaseDoesNotExist {
        /// The database name.
        database: String,
        /// `host:port`.
        address: String,
    },

    /// TLS could not be set up as `sslmode` demands (`P1011`).
    #[error("P1011: Error opening a TLS connection: {0}")]
    Tls(String),

    /// No connection became free within `pool_timeout` (`P2024`).
    #[error("P2024: Timed out fetching a new connection from the connection pool (pool timeout: {timeout_secs}s, connection limit: {connection_limit}, in use: {in_use}, waiting: {waiting}){}", .cause.as_deref().map(|c| format!("; {c}")).unwrap_or_default())]
    PoolTimeout {
        /// The configured `pool_timeout` in seconds.
        timeout_secs: u64,
        /// The configured `connection_limit`.
        connection_limit: usize,
        /// Connections checked out when the wait gave up.
        in_use: usize,
        /// Callers waiting when the wait gave up (this one included).
        waiting: usize,
        /// Why no connection could be opened meanwhile, when the server
        /// refused new ones ("the server refused new connections (53300):
        /// serving with 2").
        cause: Option<String>,
    },

    /// The server has no connection slot left (SQLSTATE 53300, `P2037`).
    #[error("P2037: Too many database connections opened: {0}")]
    TooManyConnections(String),

    /// A query ran longer than `socket_timeout`; it was cancelled on the
    /// server and the connection discarded (`P1008`).
    #[error("P1008: Operations timed out after {}s", .0.as_secs())]
    SocketTimeout(Duration),

    /// The server closed the connection, e.g. it restarted or the backend was
    /// terminated (`P1017`).
    #[error("P1017: Server has closed the connection")]
    ConnectionClosed,

    /// The pool was closed with [`crate::Pool::close`].
    #[error("P2024: The connection pool is closed; no new connections are handed out")]
    PoolClosed,

    /// The statement failed on the server (`P2010`): syntax, constraint,
    /// permission... The SQLSTATE, the server's message and the names of
    /// the constraint, table and column it concerns are kept; the server's
    /// DETAIL is not, since it quotes row values ("Failing row contains
    /// (...)", "Key (...)=(...)"): tokens, even encrypted, and ids never
    /// reach an error, a log or `Debug` through it.
    #[error("P2010: Raw query failed. Code: `{sqlstate}`. Message: `{message}`")]
    Query {
        /// The five-character SQLSTATE.
        sqlstate: String,
        /// The server's message (statement parameters are never in it).
        message: String,
        /// The violated constraint, for integrity errors.
        constraint: Option<String>,
        /// The table concerned, when the server names one.
        table: Option<String>,
        /// The column concerned, when the server names one.
        column: Option<String>,
    },

    /// `query_one`/`query_opt` got another number of rows.
    #[error("P2010: expected one row, the statement returned {0}")]
    RowCount(usize),

    /// A parameter could not be sent.
    #[error("P2010: {0}")]
    Parameter(String),

    /// A client-side failure: a row column of the wrong type, a parameter
    /// that cannot be encoded, a protocol error.
    #[error("P2010: {0}")]
    Client(#[source] tokio_postgres::Error),
}

impl Error {
    /// The Prisma error code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Config(e) => e.code(),
            Error::Unreachable { .. } => "P1001",
            Error::AuthenticationFailed { .. } => "P1000",
            Error::DatabaseDoesNotExist { .. } => "P1003",
            Error::Tls(_) => "P1011",
            Error::PoolTimeout { .. } | Error::PoolClosed => "P2024",
            Error::TooManyConnections(_) => "P2037",
            Error::SocketTimeout(_) => "P1008",
            Error::ConnectionClosed => "P1017",
            Error::Query { .. } | Error::Client(_) | Error::RowCount(_) | Error::Parameter(_) => {
                "P2010"
            }
        }
    }

    /// What to do about it, from the seed's Troubleshooting section.
    pub fn hint(&self) -> &'static str {
        match self {
            Error::Config(e) => e.hint(),
            Error::Unreachable { .. } => "Check that the database server is running and reachable from here (host, port, firewall); raise connect_timeout if the network is slow.",
            Error::AuthenticationFailed { .. } => "Check the user name and password in DATABASE_URL (percent-encode special characters).",
            Error::DatabaseDoesNotExist { .. } => "Create the database, or fix its name in DATABASE_URL.",
            Error::Tls(_) => "Check sslmode and the certificate parameters (sslrootcert, sslcert); sslmode=prefer falls back to plain connections.",
            Error::PoolTimeout { .. } => "Connection pool exhausted: increase connection_limit, look for connection leaks (connections held across slow work), optimize slow queries, or raise pool_timeout.",
            Error::PoolClosed => "The service is shutting down; retry against another instance.",
            Error::TooManyConnections(_) => "The server refused a new connection: check max_connections on the server, reduce connection_limit per instance, or put PgBouncer in front (pgbouncer=true).",
            Error::SocketTimeout(_) => "A query ran longer than socket_timeout: optimize it (EXPLAIN ANALYZE) or raise socket_timeout.",
            Error::ConnectionClosed => "The server closed the connection (restart, failover, or a terminated backend); retry the operation.",
            Error::Query { .. } | Error::Client(_) | Error::RowCount(_) | Error::Parameter(_) => "The statement failed; see the message and SQLSTATE.",
        }
    }

    /// Whether retrying the same operation later may succeed (pool
    /// exhaustion, server unreachable or restarting).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Unreachable { .. }
                | Error::PoolTimeout { .. }
                | Error::TooManyConnections(_)
                | Error::ConnectionClosed
                | Error::SocketTimeout(_)
        )
    }

    /// The constraint a server-side error violated, if it names one.
    pub fn constraint(&self) -> Option<&str> {
        match self {
            Error::Query { constraint, .. } => constraint.as_deref(),
            _ => None,
        }
    }

    /// The SQLSTATE of a server-side error, if there is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Query { sqlstate, .. } => Some(sqlstate),
            Error::TooManyConnections(_) => Some("53300"),
            _ => None,
        }
    }
}
