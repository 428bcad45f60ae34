//! What a database's connections are doing: the seed's "Check Active
//! Connections" query, generalised (per application, transactions left
//! open, lock waits).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::pool::Conn;

/// Query texts in [`Activity`] are cut to this many characters.
pub const QUERY_TEXT_LIMIT: usize = 200;

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
    applications.sort_by_key(|a| std::cmp::Reverse(a.connections.total));

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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn backend(pid: i32, app: &str, state: &str) -> Backend {
        Backend {
            pid,
            application_name: app.to_string(),
            state: Some(state.to_string()),
            ..Backend::default()
        }
    }

    #[test]
    fn activity_counts_states_per_application_and_picks_the_longest() {
        let mut tx = backend(10, "api", "idle in transaction");
        tx.xact_secs = Some(12.34567);
        tx.query_secs = Some(12.0);
        let mut running = backend(11, "api", "active");
        running.xact_secs = Some(3.0);
        running.query_secs = Some(3.0);
        let mut waiting = backend(12, "worker", "active");
        waiting.xact_secs = Some(1.0);
        waiting.query_secs = Some(1.0);
        waiting.wait_event_type = Some("Lock".into());
        waiting.blocked_by = Some(vec![10]);
        let aborted = backend(13, "worker", "idle in transaction (aborted)");
        let idle = backend(14, "", "idle");
        let a = summarize("db", "t".into(), &[tx, running, waiting, aborted, idle]);
        assert_eq!(
            a.connections,
            Counts {
                total: 5,
                active: 2,
                idle: 1,
                idle_in_transaction: 1,
                idle_in_transaction_aborted: 1
            }
        );
        let names: Vec<&str> = a
            .applications
            .iter()
            .map(|x| x.application_name.as_str())
            .collect();
        assert_eq!(names, ["api", "worker", ""]);
        assert_eq!(a.applications[0].connections.total, 2);
        let t = a.longest_transaction.unwrap();
        assert_eq!((t.pid, t.duration_secs), (10, 12.346));
        assert_eq!(a.longest_query.unwrap().pid, 11, "only active statements");
        assert_eq!(a.lock_waits.len(), 1);
        assert_eq!(a.lock_waits[0].blocked_by, vec![10]);
    }

    #[test]
    fn activity_json_has_the_counts_at_the_top() {
        let a = summarize("db", "t".into(), &[backend(1, "x", "idle")]);
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v["total"], 1);
        assert_eq!(v["idle"], 1);
        assert_eq!(v["idle_in_transaction"], 0);
        assert_eq!(v["applications"][0]["application_name"], "x");
        assert_eq!(v["applications"][0]["idle"], 1);
        assert_eq!(v["longest_transaction"], serde_json::Value::Null);
        let back: Activity = serde_json::from_value(v).unwrap();
        assert_eq!(back, a);
    }
}
