//! Whether a configuration is safe for the server it points at: each cause
//! the seed's troubleshooting table names (too many connections, pool
//! exhaustion, a pooler in front), checked before it happens.

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{diagnostic_config, UNLIMITED_CONNECT_CAP};
use crate::config::{Host, PoolConfig, Profile};
use crate::error::Error;
use crate::pool::{Conn, Pool, Transaction};

/// The whole pooler probe gives up after this long (it may queue behind
/// other clients' transactions when a pooler is saturated).
const POOLER_PROBE_LIMIT: Duration = Duration::from_secs(10);

/// A query taking longer than this while the probe's other connection holds
/// a transaction open is taken as queued by a pooler: a plain server never
/// makes `SELECT pg_backend_pid()` wait.
const POOLER_QUEUE_WAIT: Duration = Duration::from_secs(1);

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
    /// Connections each instance opens outside its pool, straight to the
    /// server (e.g. a `LISTEN` connection: the integrations service's change
    /// listener is one). Default 0.
    pub outside_pool: u32,
}

impl Default for DoctorOptions {
    fn default() -> Self {
        DoctorOptions {
            instances: 1,
            server_cores: None,
            spindles: 1,
            outside_pool: 0,
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
    /// `reserved_connections` (PostgreSQL 16+; `None` before).
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
    let n = text.lines().filter(|l| l.starts_with("processor")).count();
    u32::try_from(n).ok().filter(|n| *n > 0)
}

/// Whether the server runs on this machine (so this machine's core count is
/// the server's).
fn is_local(host: &Host) -> bool {
    match host {
        Host::Unix(_) => true,
        Host::Tcp(h) => {
            h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
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
pub async fn doctor(cfg: &PoolConfig, opts: &DoctorOptions) -> DoctorReport {
    let instances = opts.instances.max(1);
    let reached = reach(cfg).await;

    let cores = match (opts.server_cores, &reached) {
        (Some(n), _) => Some((n, CoreSource::Option)),
        (None, Reached::Yes { cores: Some(n), .. }) => Some((*n, CoreSource::ServerCpuinfo)),
        _ if is_local(&cfg.host) => std::thread::available_parallelism()
            .ok()
            .and_then(|n| u32::try_from(n.get()).ok())
            .map(|n| (n, CoreSource::LocalMachine)),
        _ => None,
    };
    let recommended = cores.map(|(n, _)| {
        n.saturating_mul(2)
            .saturating_add(opts.spindles)
            .div_ceil(instances)
            .max(1)
    });

    let mut checks = vec![url_check(cfg)];
    let facts = match reached {
        Reached::No(failed) => {
            checks.push(failed);
            checks.push(connection_limit_check(cfg, opts, cores, recommended));
            None
        }
        Reached::Yes {
            elapsed,
            facts,
            pooling,
            ..
        } => {
            let version = facts.as_ref().map_or("version unknown".to_string(), |f| {
                format!("PostgreSQL {}", f.version)
            });
            checks.push(Check::ok(
                "connect",
                format!(
                    "connected to {} as {} (database {}) in {} ms, {version}",
                    cfg.address(),
                    cfg.user,
                    cfg.database,
                    elapsed.as_millis()
                ),
            ));
            checks.push(max_connections_check(
                cfg,
                instances,
                opts.outside_pool,
                &facts,
                &pooling,
            ));
            checks.push(connection_limit_check(cfg, opts, cores, recommended));
            let server_port = facts.as_ref().ok().and_then(|f| f.server_port);
            checks.push(pgbouncer_check(cfg, &pooling, server_port));
            Some(facts)
        }
    };
    checks.push(statement_cache_check(cfg));
    checks.push(pool_timeout_check(cfg));
    if let Some(facts) = facts {
        checks.push(idle_in_transaction_check(cfg, &facts));
    }
    DoctorReport {
        checks,
        recommended_connection_limit: recommended,
    }
}

/// Whether the doctor got a connection, and what it learnt through it.
enum Reached {
    /// The failed `connect` check.
    No(Check),
    Yes {
        elapsed: Duration,
        facts: Result<ServerFacts, Error>,
        cores: Option<u32>,
        pooling: Pooling,
    },
}

/// Connects as the pool would and reads everything the server-side checks
/// need; closes its connections before returning.
async fn reach(cfg: &PoolConfig) -> Reached {
    let mut probe_cfg = diagnostic_config(cfg);
    // A second connection for the pooler probe, opened only for it.
    probe_cfg.connection_limit = 2;
    let started = Instant::now();
    let pool = match Pool::new(probe_cfg) {
        Ok(pool) => pool,
        Err(e) => return Reached::No(connect_failed(cfg, &e)),
    };
    let reached =
        match pool.get().await {
            Err(e) => Reached::No(connect_failed(cfg, &e)),
            Ok(mut conn) => {
                let elapsed = started.elapsed();
                let facts = server_facts(&mut conn).await;
                let cores = server_cpuinfo_cores(&mut conn).await;
                let pooling =
                    match tokio::time::timeout(POOLER_PROBE_LIMIT, probe_pooler(&pool, &mut conn))
                        .await
                    {
                        Ok(pooling) => pooling,
                        Err(_) => Pooling::Unknown(format!(
                            "the probe did not finish within {}s",
                            POOLER_PROBE_LIMIT.as_secs()
                        )),
                    };
                Reached::Yes {
                    elapsed,
                    facts,
                    cores,
                    pooling,
                }
            }
        };
    pool.close(Duration::from_secs(1)).await;
    reached
}

fn connect_failed(cfg: &PoolConfig, e: &Error) -> Check {
    let mut detail = e.to_string();
    if cfg.connect_timeout.is_none() && matches!(e, Error::Unreachable { .. }) {
        detail.push_str(&format!(
            " (connect_timeout is unlimited; the doctor gave up after {}s)",
            UNLIMITED_CONNECT_CAP.as_secs()
        ));
    }
    detail.push_str(
        "; skipped the checks that need the server: max_connections, pgbouncer, idle_in_transaction_session_timeout",
    );
    Check::fail("connect", detail, e.hint())
}

/// Runs `SELECT pg_backend_pid()` on two client connections in an order
/// that exposes a transaction pooler whether it hands out server
/// connections last-in first-out (PgBouncer's default) or round robin:
/// a lone client's consecutive statements usually land on the same server
/// connection under LIFO, so watching one client is not enough.
async fn probe_pooler(pool: &Pool, c: &mut Conn) -> Pooling {
    let mut h = match pool.get().await {
        Ok(h) => h,
        Err(e) => {
            return Pooling::Unknown(format!("a second connection could not be opened ({e})"))
        }
    };
    match pooler_rounds(c, &mut h).await {
        Ok(pooling) => pooling,
        Err(e) => Pooling::Unknown(format!("the probe failed ({e})")),
    }
}

async fn pid(conn: &mut Conn) -> Result<i32, Error> {
    conn.query_one("SELECT pg_backend_pid()", &[])
        .await?
        .try_get(0)
        .map_err(Error::Client)
}

async fn pid_in(tx: &mut Transaction<'_>) -> Result<i32, Error> {
    tx.query_one("SELECT pg_backend_pid()", &[])
        .await?
        .try_get(0)
        .map_err(Error::Client)
}

async fn pooler_rounds(c: &mut Conn, h: &mut Conn) -> Result<Pooling, Error> {
    let mut c_pids = vec![c.backend_pid()];
    let mut h_pids = vec![h.backend_pid()];
    let mut queued = false;
    for round in 0..3 {
        if round % 2 == 0 {
            // c first, then h takes a server connection (under LIFO the
            // one c just gave back) ...
            c_pids.push(pid(c).await?);
        }
        let mut tx = h.transaction().await?;
        h_pids.push(pid_in(&mut tx).await?);
        // ... and c again while h holds it.
        let query = pid(c);
        tokio::pin!(query);
        match tokio::time::timeout(POOLER_QUEUE_WAIT, &mut query).await {
            Ok(p) => {
                c_pids.push(p?);
                tx.commit().await?;
            }
            Err(_) => {
                // Queued behind h's transaction: only a pooler does that.
                queued = true;
                tx.commit().await?;
                c_pids.push(query.await?);
            }
        }
    }
    Ok(pooling_verdict(&c_pids, &h_pids, queued))
}

fn pooling_verdict(c_pids: &[i32], h_pids: &[i32], queued: bool) -> Pooling {
    let distinct: BTreeSet<i32> = c_pids.iter().copied().collect();
    if queued {
        return Pooling::Transaction(
            "a statement waited while the doctor's other connection held a transaction open"
                .to_string(),
        );
    }
    if distinct.len() > 1 {
        let pids: Vec<String> = distinct.iter().map(i32::to_string).collect();
        return Pooling::Transaction(format!(
            "one client connection ran on server processes {}",
            pids.join(", ")
        ));
    }
    if let Some(p) = h_pids.iter().find(|p| distinct.contains(p)) {
        return Pooling::Transaction(format!(
            "two client connections both ran on server process {p}"
        ));
    }
    Pooling::None
}

fn url_check(cfg: &PoolConfig) -> Check {
    // Unknown parameters' values are redacted too (they may be secrets).
    let url = cfg.redacted_url();
    if cfg.ignored_parameters.is_empty() {
        return Check::ok("url", url);
    }
    let names: Vec<String> = cfg
        .ignored_parameters
        .iter()
        .map(|p| format!("'{p}'"))
        .collect();
    let (noun, verb, them) = if names.len() == 1 {
        ("parameter", "is", "it")
    } else {
        ("parameters", "are", "them")
    };
    Check::warn(
        "url",
        format!("{url}: unknown {noun} {} {verb} ignored", names.join(", ")),
        format!("Remove or correct {them} (see the README's parameter table): a misspelt parameter silently keeps its default."),
    )
}

fn plural(n: impl Into<u64>, word: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

fn max_connections_check(
    cfg: &PoolConfig,
    instances: u32,
    outside_pool: u32,
    facts: &Result<ServerFacts, Error>,
    pooling: &Pooling,
) -> Check {
    const NAME: &str = "max_connections";
    let f = match facts {
        Ok(f) => f,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("could not read the server's connection limits: {e}"),
                e.hint(),
            )
        }
    };
    let limit = i64::try_from(cfg.connection_limit).unwrap_or(i64::MAX);
    let extra = i64::from(outside_pool);
    let need = limit
        .saturating_add(extra)
        .saturating_mul(i64::from(instances));
    let per = if outside_pool == 0 {
        format!("connection_limit {limit}")
    } else {
        format!("connection_limit {limit} + {extra} outside the pool")
    };
    let reserved = f.superuser_reserved + f.reserved.unwrap_or(0);
    let available = (f.max_connections - reserved - f.in_use).max(0);
    let reserved_text = match f.reserved {
        Some(r) => format!(
            "{reserved} reserved (superuser_reserved_connections {}, reserved_connections {r})",
            f.superuser_reserved
        ),
        None => format!("{reserved} reserved (superuser_reserved_connections)"),
    };
    let detail = format!(
        "need {need} ({per} x {}), available {available} (max_connections {} - {reserved_text} - {} in use now)",
        plural(instances, "instance"),
        f.max_connections,
        f.in_use
    );
    if let Pooling::Transaction(_) = pooling {
        return Check::ok(
            NAME,
            format!(
                "{detail}; but a transaction pooler is in front: the service's pooled connections go to the pooler, which opens at most its own pool size on the server (check its max_client_conn and default_pool_size){}",
                if outside_pool > 0 {
                    format!("; the {} outside the pools (DIRECT_URL) reach the server itself", extra * i64::from(instances))
                } else {
                    String::new()
                }
            ),
        );
    }
    let per_instance = |budget: i64| (budget / i64::from(instances) - extra).max(0);
    if need > available {
        return Check::fail(
            NAME,
            format!("{detail}: the server will refuse connections with \"too many connections\" (P2037)"),
            format!(
                "Too many connections: lower connection_limit to {} or less per instance, raise max_connections on the server (takes a restart), or put PgBouncer in front and set pgbouncer=true. Connections in use now include running instances of this service.",
                per_instance(available)
            ),
        );
    }
    if need.saturating_mul(10) > available.saturating_mul(8) {
        return Check::warn(
            NAME,
            format!("{detail}: more than 80% of what is left"),
            format!(
                "Little headroom for other clients, deploys and migrations: keep connection_limit at {} or less per instance, raise max_connections, or put PgBouncer in front (pgbouncer=true).",
                per_instance(available * 8 / 10)
            ),
        );
    }
    Check::ok(NAME, detail)
}

fn connection_limit_check(
    cfg: &PoolConfig,
    opts: &DoctorOptions,
    cores: Option<(u32, CoreSource)>,
    recommended: Option<u32>,
) -> Check {
    const NAME: &str = "connection_limit";
    let limit = cfg.connection_limit;
    let (Some((cores, source)), Some(rec)) = (cores, recommended) else {
        return Check::warn(
            NAME,
            format!(
                "configured {limit}; the server's CPU cores are unknown (it is not on this machine and pg_read_file('/proc/cpuinfo') is not permitted), so the seed's formula (cores * 2) + effective_spindle_count cannot be applied"
            ),
            "Pass the server's CPU core count with --server-cores N.",
        );
    };
    let instances = opts.instances.max(1);
    let total = cores.saturating_mul(2).saturating_add(opts.spindles);
    let formula = format!(
        "({} * 2) + {}",
        plural(cores, "core"),
        plural(opts.spindles, "spindle")
    );
    let detail = if instances > 1 {
        format!("configured {limit} per instance, recommended {rec} per instance: {formula} = {total} for {instances} instances")
    } else {
        format!("configured {limit}, recommended {rec} = {formula}")
    };
    let cores_from = format!("cores {}", source.describe());
    let rec = usize::try_from(rec).unwrap_or(usize::MAX);
    if limit > rec.saturating_mul(2) {
        return Check::warn(
            NAME,
            format!("{detail}: more connections than the server can run at once, the extra ones only queue inside it ({cores_from})"),
            format!(
                "Lower connection_limit toward {rec}; raise it only if callers wait for connections (P2024) while the server still has idle CPU."
            ),
        );
    }
    if limit.saturating_mul(2) < rec {
        return Check::ok(
            NAME,
            format!("{detail}: fewer than the formula, which is fine unless callers wait for connections (P2024) ({cores_from})"),
        );
    }
    Check::ok(NAME, format!("{detail} ({cores_from})"))
}

fn pgbouncer_check(cfg: &PoolConfig, pooling: &Pooling, server_port: Option<i32>) -> Check {
    const NAME: &str = "pgbouncer";
    let proxy = match (&cfg.host, server_port) {
        (Host::Tcp(_), Some(p)) if p != i32::from(cfg.port) => format!(
            "; the server listens on port {p} but the URL names {}: a proxy or port mapping is in between",
            cfg.port
        ),
        _ => String::new(),
    };
    match pooling {
        Pooling::Transaction(evidence) if cfg.pgbouncer => Check::ok(
            NAME,
            format!("a transaction pooler is in front ({evidence}){proxy}; pgbouncer=true, so statements travel unnamed"),
        ),
        Pooling::Transaction(evidence) => Check::fail(
            NAME,
            format!(
                "a transaction pooler (PgBouncer) is in front ({evidence}){proxy}, but pgbouncer=false: named prepared statements will fail with 'prepared statement does not exist'"
            ),
            "Add pgbouncer=true to DATABASE_URL.",
        ),
        Pooling::None if cfg.pgbouncer => Check::warn(
            NAME,
            format!(
                "pgbouncer=true, but no transaction pooler answers here{proxy}: the statement cache is disabled needlessly and every statement is planned anew"
            ),
            "Remove pgbouncer=true unless PgBouncer runs in transaction mode in front of this server.",
        ),
        Pooling::None => Check::ok(NAME, format!("no transaction pooler in front{proxy}")),
        Pooling::Unknown(why) => Check::warn(
            NAME,
            format!("could not tell whether a transaction pooler is in front: {why}{proxy}"),
            if cfg.pgbouncer {
                "Keep pgbouncer=true only if PgBouncer runs in transaction mode in front of this server."
            } else {
                "If PgBouncer runs in transaction mode in front of this server, add pgbouncer=true."
            },
        ),
    }
}

fn statement_cache_check(cfg: &PoolConfig) -> Check {
    const NAME: &str = "statement_cache_size";
    let n = cfg.statement_cache_size;
    if cfg.pgbouncer {
        return Check::ok(
            NAME,
            format!(
                "0 in effect: pgbouncer=true turns named prepared statements off (configured {n})"
            ),
        );
    }
    let (profile, (lo, hi)) = match cfg.profile {
        Some(p) => (format!("the {p} profile"), p.recommended_statement_cache()),
        None => (
            "production, as no profile is set".to_string(),
            Profile::Production.recommended_statement_cache(),
        ),
    };
    let range = format!("recommended {lo}-{hi} for {profile}");
    if (lo..=hi).contains(&n) {
        return Check::ok(NAME, format!("{n} ({range})"));
    }
    let why = if n == 0 {
        "every statement is parsed and planned again on each call"
    } else if n < lo {
        "a service with more distinct statements than this re-prepares them over and over"
    } else {
        "every cached statement holds memory in each server process"
    };
    Check::warn(
        NAME,
        format!("{n} ({range}): {why}"),
        format!("Set statement_cache_size between {lo} and {hi}."),
    )
}

fn pool_timeout_check(cfg: &PoolConfig) -> Check {
    const NAME: &str = "pool_timeout";
    match (cfg.pool_timeout, cfg.connect_timeout) {
        (None, _) => Check::warn(
            NAME,
            "0 (unlimited): when the pool is exhausted callers wait forever instead of failing with P2024",
            "Set pool_timeout, e.g. 30 (the seed's production value).",
        ),
        (Some(p), Some(c)) if p < c => Check::warn(
            NAME,
            format!(
                "{}s is shorter than connect_timeout {}s: a caller may give up before a connection could ever open",
                p.as_secs(),
                c.as_secs()
            ),
            format!(
                "Raise pool_timeout to at least {}s, or lower connect_timeout.",
                c.as_secs()
            ),
        ),
        (Some(p), Some(c)) => Check::ok(
            NAME,
            format!("{}s (connect_timeout {}s)", p.as_secs(), c.as_secs()),
        ),
        (Some(p), None) => Check::ok(
            NAME,
            format!("{}s (connect_timeout unlimited)", p.as_secs()),
        ),
    }
}

/// Quotes an SQL identifier for the hints.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn idle_in_transaction_check(cfg: &PoolConfig, facts: &Result<ServerFacts, Error>) -> Check {
    const NAME: &str = "idle_in_transaction_session_timeout";
    let f = match facts {
        Ok(f) => f,
        Err(e) => return Check::fail(NAME, format!("could not read it: {e}"), e.hint()),
    };
    let value = &f.idle_in_transaction_timeout;
    if value == "0" {
        return Check::warn(
            NAME,
            "0 (off): a leaked transaction then holds its locks forever",
            format!(
                "Set it, e.g. ALTER DATABASE {} SET idle_in_transaction_session_timeout = '60s' (new sessions get it).",
                quote_ident(&cfg.database)
            ),
        );
    }
    Check::ok(
        NAME,
        format!("{value}: the server ends sessions left idle in a transaction longer than that"),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> PoolConfig {
        PoolConfig::parse(url).unwrap()
    }

    #[test]
    fn a_pooler_is_recognised_by_moving_or_shared_backends() {
        assert!(matches!(
            pooling_verdict(&[1, 1, 1], &[2, 2], false),
            Pooling::None
        ));
        assert!(matches!(
            pooling_verdict(&[1, 2, 1], &[3, 3], false),
            Pooling::Transaction(_)
        ));
        assert!(matches!(
            pooling_verdict(&[1, 1], &[2, 1], false),
            Pooling::Transaction(_)
        ));
        assert!(matches!(
            pooling_verdict(&[1, 1], &[2, 2], true),
            Pooling::Transaction(_)
        ));
    }

    #[test]
    fn configuration_only_checks() {
        let status = |c: Check| c.status;
        assert_eq!(
            status(statement_cache_check(&cfg("postgresql://h/db"))),
            Status::Ok
        );
        assert_eq!(
            status(statement_cache_check(&cfg(
                "postgresql://h/db?statement_cache_size=0"
            ))),
            Status::Warn
        );
        assert_eq!(
            status(statement_cache_check(&cfg(
                "postgresql://h/db?statement_cache_size=0&pgbouncer=true"
            ))),
            Status::Ok
        );
        assert_eq!(
            status(statement_cache_check(&cfg(
                "postgresql://h/db?statement_cache_size=900"
            ))),
            Status::Warn
        );
        assert_eq!(
            status(pool_timeout_check(&cfg("postgresql://h/db"))),
            Status::Ok
        );
        assert_eq!(
            status(pool_timeout_check(&cfg(
                "postgresql://h/db?pool_timeout=2&connect_timeout=10"
            ))),
            Status::Warn
        );
        assert_eq!(
            status(pool_timeout_check(&cfg("postgresql://h/db?pool_timeout=0"))),
            Status::Warn
        );
    }

    #[test]
    fn unknown_parameter_values_are_hidden_too() {
        let c = cfg("postgresql://u:hunter2@h/db?api_token=hunter3&connection_limit=3");
        let check = url_check(&c);
        assert_eq!(check.status, Status::Warn);
        assert!(check.detail.contains("'api_token'"), "{}", check.detail);
        assert!(
            !check.detail.contains("hunter2") && !check.detail.contains("hunter3"),
            "{}",
            check.detail
        );
        assert!(check.detail.contains("connection_limit=3"));
    }

    #[test]
    fn local_servers_are_recognised() {
        for h in ["localhost", "127.0.0.1", "127.0.1.1", "::1"] {
            assert!(is_local(&Host::Tcp(h.into())), "{h}");
        }
        assert!(is_local(&Host::Unix("/var/run/postgresql".into())));
        for h in ["db.internal", "10.0.0.5", "127.example.com"] {
            assert!(!is_local(&Host::Tcp(h.into())), "{h}");
        }
    }

    #[test]
    fn exit_code_is_1_only_on_failure() {
        let report = |statuses: &[Status]| DoctorReport {
            checks: statuses.iter().map(|s| Check::new("x", *s, "")).collect(),
            recommended_connection_limit: None,
        };
        assert_eq!(report(&[]).exit_code(), 0);
        assert_eq!(report(&[Status::Ok, Status::Warn]).exit_code(), 0);
        assert_eq!(
            report(&[Status::Ok, Status::Fail, Status::Warn]).exit_code(),
            1
        );
        let v = serde_json::to_value(report(&[Status::Warn])).unwrap();
        assert_eq!(v["checks"][0]["status"], "warn");
        assert_eq!(v["checks"][0]["hint"], serde_json::Value::Null);
    }
}
