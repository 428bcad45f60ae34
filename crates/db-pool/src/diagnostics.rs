//! Diagnostics: what a database's connections are doing ([`activity`]) and
//! whether a configuration is safe for the server it points at ([`doctor`]).
//!
//! Both implement the seed's "Monitoring Connection Pool" and
//! "Troubleshooting" sections: [`activity`] is its "Check Active
//! Connections" query, generalised (per application, transactions left
//! open, lock waits); [`doctor`] checks each cause its troubleshooting table
//! names (too many connections, pool exhaustion, a pooler in front) before it
//! happens.
//!
//! Diagnostics connect with [`diagnostic_config`]: the same server,
//! credentials, TLS and startup options as the pool, but their own tiny pool
//! whose statements always travel unnamed (as with `pgbouncer=true`), so they
//! work whatever sits in front of the server.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{Host, PoolConfig, Profile};
use crate::error::Error;
use crate::pool::{Conn, Pool, Transaction};

/// Query texts in [`Activity`] are cut to this many characters.
pub const QUERY_TEXT_LIMIT: usize = 200;

/// How long a diagnostic waits to open a connection when the configuration
/// sets no `connect_timeout` (a diagnostic must end).
const UNLIMITED_CONNECT_CAP: Duration = Duration::from_secs(30);

/// The whole pooler probe gives up after this long (it may queue behind
/// other clients' transactions when a pooler is saturated).
const POOLER_PROBE_LIMIT: Duration = Duration::from_secs(10);

/// A query taking longer than this while the probe's other connection holds
/// a transaction open is taken as queued by a pooler: a plain server never
/// makes `SELECT pg_backend_pid()` wait.
const POOLER_QUEUE_WAIT: Duration = Duration::from_secs(1);

/// The configuration diagnostics connect with: `cfg`'s server, credentials,
/// TLS and startup options (application_name, schema, options), with
///
/// * `connection_limit` 1,
/// * no pool wait (`pool_timeout` unlimited), so a connect failure is
///   reported as itself rather than as a pool timeout,
/// * `connect_timeout` kept, or 30 s when the configuration sets none,
/// * no `socket_timeout` (diagnostics bound their own waits),
/// * unnamed statements (`pgbouncer=true`): safe through a transaction pooler
///   whether or not `cfg` says one is there.
pub fn diagnostic_config(cfg: &PoolConfig) -> PoolConfig {
    let mut probe = cfg.clone();
    probe.connection_limit = 1;
    probe.pool_timeout = None;
    probe.connect_timeout = Some(cfg.connect_timeout.unwrap_or(UNLIMITED_CONNECT_CAP));
    probe.socket_timeout = None;
    probe.pgbouncer = true;
    probe.leak_detection_threshold = None;
    probe.slow_query_threshold = None;
    probe
}

// ---------------------------------------------------------------------------
// Activity
// ---------------------------------------------------------------------------

/// Connection counts by `pg_stat_activity.state`. `total` also counts the
/// rare other states (`fastpath function call`, `disabled`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Every client connection.
    pub total: u32,
    /// Running a statement (or waiting on a lock while doing so).
    pub active: u32,
    /// Waiting for the client's next statement, outside a transaction.
    pub idle: u32,
    /// Inside a transaction, waiting for the client: holds its locks and
    /// snapshot meanwhile (`idle in transaction`).
    pub idle_in_transaction: u32,
    /// Inside a failed transaction, waiting for the client to roll back
    /// (`idle in transaction (aborted)`; not included in
    /// `idle_in_transaction`).
    pub idle_in_transaction_aborted: u32,
}

impl Counts {
    fn add(&mut self, state: Option<&str>) {
        self.total += 1;
        match state {
            Some("active") => self.active += 1,
            Some("idle") => self.idle += 1,
            Some("idle in transaction") => self.idle_in_transaction += 1,
            Some("idle in transaction (aborted)") => self.idle_in_transaction_aborted += 1,
            _ => {}
        }
    }
}

/// The connections of one `application_name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplicationActivity {
    /// The application name (empty when the client set none).
    pub application_name: String,
    /// Its connections by state.
    #[serde(flatten)]
    pub connections: Counts,
}

/// One connection singled out: the longest transaction or query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Server process id (`pg_backend_pid()` on that connection).
    pub pid: i32,
    /// Its `application_name`.
    pub application_name: String,
    /// Its `pg_stat_activity.state` (`null` when the server hides it).
    pub state: Option<String>,
    /// Seconds since the transaction (or, for the longest query, the
    /// statement) began.
    pub duration_secs: f64,
    /// The current or last statement, cut to [`QUERY_TEXT_LIMIT`] characters
    /// (`<insufficient privilege>` for other roles' sessions unless the role
    /// has `pg_read_all_stats`).
    pub query: String,
}

/// A connection waiting for a lock (`wait_event_type = 'Lock'`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockWait {
    /// Server process id of the waiting connection.
    pub pid: i32,
    /// Its `application_name`.
    pub application_name: String,
    /// Seconds since the waiting statement began: it has waited at most this
    /// long (`pg_stat_activity` records no wait start).
    pub waiting_secs: f64,
    /// The server processes holding (or queued ahead for) the lock, from
    /// `pg_blocking_pids()`.
    pub blocked_by: Vec<i32>,
    /// The waiting statement, cut to [`QUERY_TEXT_LIMIT`] characters.
    pub query: String,
}

/// What one database's client connections are doing, from one sample of
/// `pg_stat_activity` (the sampling connection itself excluded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    /// The database sampled.
    pub database: String,
    /// When, by the server's clock (UTC, RFC 3339).
    pub sampled_at: String,
    /// All its client connections by state.
    #[serde(flatten)]
    pub connections: Counts,
    /// The same per `application_name`, most connections first.
    pub applications: Vec<ApplicationActivity>,
    /// The oldest open transaction, if any.
    pub longest_transaction: Option<Session>,
    /// The longest-running statement still running (`state = 'active'`).
    pub longest_query: Option<Session>,
    /// Connections waiting for a lock, longest wait first.
    pub lock_waits: Vec<LockWait>,
}

/// One statement: a row per client connection of the database (the sampling
/// one excluded), or a single row of NULLs when there is none, so the
/// server's clock is always read.
const ACTIVITY_SQL: &str = r#"
SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS sampled_at,
       a.pid, a.application_name, a.state, a.wait_event_type,
       a.xact_secs, a.query_secs, a.blocked_by, a.query
FROM (SELECT 1) AS one
LEFT JOIN (
    SELECT pid,
           application_name,
           state,
           wait_event_type,
           extract(epoch FROM now() - xact_start)::float8 AS xact_secs,
           extract(epoch FROM now() - query_start)::float8 AS query_secs,
           CASE WHEN wait_event_type = 'Lock' THEN pg_blocking_pids(pid) END AS blocked_by,
           CASE WHEN length(query) > 200 THEN left(query, 197) || '...' ELSE query END AS query
    FROM pg_stat_activity
    WHERE datname = $1::text
      AND backend_type = 'client backend'
      AND pid <> pg_backend_pid()
) AS a ON true
"#;

/// One row of [`ACTIVITY_SQL`].
#[derive(Debug, Clone, Default)]
struct Backend {
    pid: i32,
    application_name: String,
    state: Option<String>,
    wait_event_type: Option<String>,
    xact_secs: Option<f64>,
    query_secs: Option<f64>,
    blocked_by: Option<Vec<i32>>,
    query: String,
}

/// Samples what `database`'s client connections are doing, in one query on
/// `pg_stat_activity` (the seed's "Check Active Connections", generalised).
///
/// `conn` itself is left out. Only client backends count (not autovacuum or
/// parallel workers). Needs no privilege beyond connecting; without
/// `pg_read_all_stats` other roles' query texts read
/// `<insufficient privilege>`.
pub async fn activity(conn: &mut Conn, database: &str) -> Result<Activity, Error> {
    let rows = conn.query(ACTIVITY_SQL, &[&database]).await?;
    let mut sampled_at = String::new();
    let mut backends = Vec::with_capacity(rows.len());
    for row in rows {
        sampled_at = row.try_get(0).map_err(Error::Client)?;
        let Some(pid) = row.try_get::<_, Option<i32>>(1).map_err(Error::Client)? else {
            continue;
        };
        backends.push(Backend {
            pid,
            application_name: row
                .try_get::<_, Option<String>>(2)
                .map_err(Error::Client)?
                .unwrap_or_default(),
            state: row.try_get(3).map_err(Error::Client)?,
            wait_event_type: row.try_get(4).map_err(Error::Client)?,
            xact_secs: row.try_get(5).map_err(Error::Client)?,
            query_secs: row.try_get(6).map_err(Error::Client)?,
            blocked_by: row.try_get(7).map_err(Error::Client)?,
            query: row
                .try_get::<_, Option<String>>(8)
                .map_err(Error::Client)?
                .unwrap_or_default(),
        });
    }
    Ok(summarize(database, sampled_at, &backends))
}

/// Seconds rounded to milliseconds; never negative (a connection may start
/// its statement after the sample's clock was read).
fn secs(x: f64) -> f64 {
    (x.max(0.0) * 1000.0).round() / 1000.0
}

fn summarize(database: &str, sampled_at: String, backends: &[Backend]) -> Activity {
    let mut connections = Counts::default();
    let mut by_app: BTreeMap<&str, Counts> = BTreeMap::new();
    for b in backends {
        connections.add(b.state.as_deref());
        by_app
            .entry(b.application_name.as_str())
            .or_default()
            .add(b.state.as_deref());
    }
    let mut applications: Vec<ApplicationActivity> = by_app
        .into_iter()
        .map(|(name, counts)| ApplicationActivity {
            application_name: name.to_string(),
            connections: counts,
        })
        .collect();
    // Most connections first; names break ties (the map gave name order and
    // the sort is stable).
    applications.sort_by(|a, b| b.connections.total.cmp(&a.connections.total));

    let session = |b: &Backend, duration: f64| Session {
        pid: b.pid,
        application_name: b.application_name.clone(),
        state: b.state.clone(),
        duration_secs: secs(duration),
        query: b.query.clone(),
    };
    let longest = |key: &dyn Fn(&Backend) -> Option<f64>| {
        backends
            .iter()
            .filter_map(|b| key(b).map(|d| (b, d)))
            .max_by(|(_, x), (_, y)| x.total_cmp(y))
            .map(|(b, d)| session(b, d))
    };
    let longest_transaction = longest(&|b| b.xact_secs);
    let longest_query = longest(&|b| {
        if b.state.as_deref() == Some("active") {
            b.query_secs
        } else {
            None
        }
    });

    let mut lock_waits: Vec<LockWait> = backends
        .iter()
        .filter(|b| b.wait_event_type.as_deref() == Some("Lock"))
        .map(|b| LockWait {
            pid: b.pid,
            application_name: b.application_name.clone(),
            waiting_secs: secs(b.query_secs.unwrap_or(0.0)),
            blocked_by: b.blocked_by.clone().unwrap_or_default(),
            query: b.query.clone(),
        })
        .collect();
    lock_waits.sort_by(|a, b| b.waiting_secs.total_cmp(&a.waiting_secs));

    Activity {
        database: database.to_string(),
        sampled_at,
        connections,
        applications,
        longest_transaction,
        longest_query,
        lock_waits,
    }
}

// ---------------------------------------------------------------------------
// Doctor
// ---------------------------------------------------------------------------

/// What [`doctor`] cannot learn from the configuration or the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoctorOptions {
    /// How many instances of the service run with this configuration at
    /// once (each opens up to `connection_limit` connections). Default 1.
    pub instances: u32,
    /// The database server's CPU cores, when the doctor cannot read them
    /// (or reads a wrong number, e.g. a container limited to fewer cores
    /// than its host has). Wins over what the doctor finds.
    pub server_cores: Option<u32>,
    /// The formula's `effective_spindle_count`: disks the server can read
    /// from in parallel (1 for a single SSD or a volume; 0 when the data
    /// fits in memory). Default 1.
    pub spindles: u32,
}

impl Default for DoctorOptions {
    fn default() -> Self {
        DoctorOptions {
            instances: 1,
            server_cores: None,
            spindles: 1,
        }
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Nothing to do.
    Ok,
    /// Works, but is risky or wasteful; the hint says what to change.
    Warn,
    /// Will fail (or already fails) in production; the hint says what to do.
    Fail,
}

impl Status {
    /// `ok`, `warn` or `fail`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of the doctor's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// What was checked: `url`, `connect`, `max_connections`,
    /// `connection_limit`, `pgbouncer`, `statement_cache_size`,
    /// `pool_timeout`, `idle_in_transaction_session_timeout`.
    pub name: String,
    /// The outcome.
    pub status: Status,
    /// What was found, with the numbers behind the verdict. Never contains
    /// a password.
    pub detail: String,
    /// What to do about a warning or failure.
    pub hint: Option<String>,
}

impl Check {
    fn new(name: &str, status: Status, detail: impl Into<String>) -> Check {
        Check {
            name: name.to_string(),
            status,
            detail: detail.into(),
            hint: None,
        }
    }

    fn ok(name: &str, detail: impl Into<String>) -> Check {
        Check::new(name, Status::Ok, detail)
    }

    fn warn(name: &str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Status::Warn, detail).hint(hint)
    }

    fn fail(name: &str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Status::Fail, detail).hint(hint)
    }

    fn hint(mut self, hint: impl Into<String>) -> Check {
        self.hint = Some(hint.into());
        self
    }
}

/// The doctor's findings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoctorReport {
    /// One entry per check, in a fixed order; checks that need the server
    /// are left out when it cannot be reached.
    pub checks: Vec<Check>,
    /// `connection_limit` per instance from the seed's formula
    /// `(CPU cores * 2) + effective_spindle_count`, shared among the
    /// instances; `None` when the server's cores are unknown.
    pub recommended_connection_limit: Option<u32>,
}

impl DoctorReport {
    /// The check with this name, if it ran.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// The worst status of any check.
    pub fn status(&self) -> Status {
        self.checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Ok)
    }

    /// The process exit status: 0 when no check fails (warnings included),
    /// 1 when one does.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.status() == Status::Fail)
    }
}

/// What the doctor reads from the server in one statement.
#[derive(Debug, Clone)]
struct ServerFacts {
    version: String,
    max_connections: i64,
    superuser_reserved: i64,
    /// `reserved_connections` (PostgreSQL 16+), 0 before.
    reserved: Option<i64>,
    /// Client connections on the whole server, the doctor's own excluded.
    in_use: i64,
    idle_in_transaction_timeout: String,
    /// `inet_server_port()`: `None` over a Unix socket.
    server_port: Option<i32>,
}

const FACTS_SQL: &str = "\
SELECT current_setting('server_version'),
       current_setting('max_connections')::int8,
       current_setting('superuser_reserved_connections')::int8,
       current_setting('reserved_connections', true)::int8,
       (SELECT count(*) FROM pg_stat_activity
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid())::int8,
       current_setting('idle_in_transaction_session_timeout'),
       inet_server_port()";

async fn server_facts(conn: &mut Conn) -> Result<ServerFacts, Error> {
    let row = conn.query_one(FACTS_SQL, &[]).await?;
    Ok(ServerFacts {
        version: row.try_get(0).map_err(Error::Client)?,
        max_connections: row.try_get(1).map_err(Error::Client)?,
        superuser_reserved: row.try_get(2).map_err(Error::Client)?,
        reserved: row.try_get(3).map_err(Error::Client)?,
        in_use: row.try_get(4).map_err(Error::Client)?,
        idle_in_transaction_timeout: row.try_get(5).map_err(Error::Client)?,
        server_port: row.try_get(6).map_err(Error::Client)?,
    })
}

/// The server's CPU cores from its `/proc/cpuinfo` (superusers and
/// `pg_read_server_files` only; Linux servers only).
async fn server_cpuinfo_cores(conn: &mut Conn) -> Option<u32> {
    let row = conn
        .query_one("SELECT pg_read_file('/proc/cpuinfo')", &[])
        .await
        .ok()?;
    let text: String = row.try_get(0).ok()?;
    let n = text
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    u32::try_from(n).ok().filter(|n| *n > 0)
}

/// Whether the server runs on this machine (so this machine's core count is
/// the server's).
fn is_local(host: &Host) -> bool {
    match host {
        Host::Unix(_) => true,
        Host::Tcp(h) => h == "localhost" || h == "::1" || h.starts_with("127."),
    }
}

/// Where the core count came from.
#[derive(Debug, Clone, Copy)]
enum CoreSource {
    Option,
    ServerCpuinfo,
    LocalMachine,
}

impl CoreSource {
    fn describe(self) -> &'static str {
        match self {
            CoreSource::Option => "as given with --server-cores",
            CoreSource::ServerCpuinfo => "from the server's /proc/cpuinfo",
            CoreSource::LocalMachine => "of this machine, where the server runs",
        }
    }
}

/// What the pooler probe found.
#[derive(Debug, Clone)]
enum Pooling {
    /// Consecutive transactions of one client run on different server
    /// processes: a transaction (or statement) pooler.
    Transaction(String),
    /// Every client kept its own server process.
    None,
    /// The probe could not finish.
    Unknown(String),
}

/// Checks a configuration against the server it points at, one line per
/// check (see [`Check::name`]):
///
/// * `url`: the URL parses (it did: `cfg` exists); warns naming unknown
///   parameters, which are ignored.
/// * `connect`: one connection opens within `connect_timeout` with these
///   credentials and this database (see [`diagnostic_config`]). When it
///   fails (with the error's Prisma code, message and hint) the checks that
///   need the server are left out.
/// * `max_connections`: `connection_limit × instances` must fit in
///   `max_connections − superuser_reserved_connections −
///   reserved_connections − connections in use now` (the doctor's own
///   excluded; running instances of the service included): fail when it
///   does not, warn above 80%. Behind a transaction pooler the service's
///   connections go to the pooler, not the server: reported, never failed.
/// * `connection_limit`: the seed's formula `(CPU cores × 2) +
///   effective_spindle_count` is how many statements the server can run at
///   once, for all instances together; the recommended `connection_limit`
///   is that shared among the instances (rounded up). Cores come from
///   [`DoctorOptions::server_cores`], else the server's `/proc/cpuinfo`,
///   else this machine when the server runs here; warns when unknown. Warns
///   when the configured value exceeds twice the recommendation (the extra
///   connections only queue inside the server, where nobody measures the
///   wait); a smaller pool is fine as long as callers do not wait for
///   connections (P2024), which the formula cannot know, so it is reported,
///   not warned.
/// * `pgbouncer`: a transaction pooler is detected when one client
///   connection's consecutive transactions run on different server
///   processes, or two client connections share one, or a query waits
///   while the doctor's other connection holds a transaction open (a plain
///   server or a session pooler does none of these). The server's port
///   (`inet_server_port()`) differing from the URL's shows a proxy or port
///   mapping. Fails when a transaction pooler is there and
///   `pgbouncer=false` (named prepared statements break); warns when
///   `pgbouncer=true` and none is (the statement cache is off for nothing).
/// * `statement_cache_size`: within the seed's recommendation for the
///   profile (100-500; 0-500 for development); 0 is right with
///   `pgbouncer=true`.
/// * `pool_timeout`: warns when unlimited (callers queue forever instead of
///   failing with P2024) or shorter than `connect_timeout` (a caller may
///   give up before a connection could ever open).
/// * `idle_in_transaction_session_timeout`: the value this role and database
///   get; warns when 0 (a leaked transaction then holds its locks forever).
