//! The `webhook_endpoints` and `webhook_deliveries` tables (migration V7).
//! Deliveries are created by the trigger on `events`, in the event's
//! transaction; here they are claimed, recorded, listed and queued again.

use chrono::{DateTime, Utc};
use db_pool::{Conn, Error, Row};

use super::events::{event_columns, event_from_row};
use crate::domain::{Delivery, DeliveryStatus, Event, EventType, Webhook};

/// The channel the fan-out trigger notifies when it queued deliveries.
pub const CHANNEL: &str = "integrations_webhooks";

/// An endpoint's stored secrets, encrypted.
pub struct StoredSecrets {
    /// The current secret and its key id.
    pub current: (Vec<u8>, String),
    /// The secret before the last rotation, while it still signs.
    pub previous: Option<(Vec<u8>, String)>,
}

/// An enabled endpoint, as the dispatcher needs it.
pub struct ActiveEndpoint {
    /// `wh_...`.
    pub id: String,
    /// Where to POST.
    pub url: String,
    /// Its secrets.
    pub secrets: StoredSecrets,
}

const INSERT: &str = "INSERT INTO webhook_endpoints (id, url, event_types, secret, secret_key_id) \
     SELECT $1, $2, $3, $4, $5 WHERE (SELECT count(*) FROM webhook_endpoints) < $6 \
     RETURNING created_at";

/// Stores a new endpoint; `None` when [`crate::webhooks::MAX_ENDPOINTS`]
/// (`max`) are registered already.
#[allow(clippy::too_many_arguments)]
pub async fn insert(
    conn: &mut Conn,
    id: &str,
    url: &str,
    event_types: &[EventType],
    secret: &[u8],
    key_id: &str,
    max: i64,
) -> Result<Option<DateTime<Utc>>, Error> {
    let types: Vec<&str> = event_types.iter().map(|t| t.as_str()).collect();
    let row = conn
        .query_opt(INSERT, &[&id, &url, &types, &secret, &key_id, &max])
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// The columns of a [`Webhook`], in [`webhook_from_row`]'s order.
macro_rules! webhook_columns {
    () => {
        "id, url, event_types, created_at, failing_since, disabled_at, disabled_reason, \
         CASE WHEN previous_until > now() THEN previous_until END"
    };
}

const LIST: &str = concat!(
    "SELECT ",
    webhook_columns!(),
    " FROM webhook_endpoints ORDER BY created_at, id"
);

/// Every endpoint, oldest first.
pub async fn list(conn: &mut Conn) -> Result<Vec<Webhook>, Error> {
    Ok(conn
        .query(LIST, &[])
        .await?
        .iter()
        .map(webhook_from_row)
        .collect())
}

const GET: &str = concat!(
    "SELECT ",
    webhook_columns!(),
    " FROM webhook_endpoints WHERE id = $1"
);

/// One endpoint.
pub async fn get(conn: &mut Conn, id: &str) -> Result<Option<Webhook>, Error> {
    Ok(conn
        .query_opt(GET, &[&id])
        .await?
        .as_ref()
        .map(webhook_from_row))
}

const FAILING: &str = concat!(
    "SELECT ",
    webhook_columns!(),
    " FROM webhook_endpoints WHERE failing_since IS NOT NULL OR disabled_at IS NOT NULL \
     ORDER BY created_at, id"
);

/// The endpoints failing now or disabled.
pub async fn failing(conn: &mut Conn) -> Result<Vec<Webhook>, Error> {
    Ok(conn
        .query(FAILING, &[])
        .await?
        .iter()
        .map(webhook_from_row)
        .collect())
}

fn webhook_from_row(row: &Row) -> Webhook {
    let types: Vec<String> = row.get(2);
    let disabled_at: Option<DateTime<Utc>> = row.get(5);
    Webhook {
        id: row.get(0),
        url: row.get(1),
        event_types: types.iter().filter_map(|t| EventType::from_db(t)).collect(),
        status: if disabled_at.is_some() {
            "disabled"
        } else {
            "enabled"
        },
        created_at: row.get(3),
        failing_since: row.get(4),
        disabled_at,
        disabled_reason: row.get(6),
        previous_secret_expires_at: row.get(7),
    }
}

/// Deletes an endpoint and its deliveries; whether it existed.
pub async fn delete(conn: &mut Conn, id: &str) -> Result<bool, Error> {
    Ok(conn
        .execute("DELETE FROM webhook_endpoints WHERE id = $1", &[&id])
        .await?
        == 1)
}

const ROTATE: &str = "UPDATE webhook_endpoints SET previous_secret = secret, \
     previous_key_id = secret_key_id, previous_until = now() + make_interval(secs => $4), \
     secret = $2, secret_key_id = $3 WHERE id = $1 RETURNING previous_until";

/// Replaces the secret; the old one signs beside it for `overlap_secs`.
/// When the old one expires (`None`: no such endpoint).
pub async fn rotate(
    conn: &mut Conn,
    id: &str,
    secret: &[u8],
    key_id: &str,
    overlap_secs: f64,
) -> Result<Option<DateTime<Utc>>, Error> {
    let row = conn
        .query_opt(ROTATE, &[&id, &secret, &key_id, &overlap_secs])
        .await?;
    Ok(row.map(|r| r.get(0)))
}

const ENABLE: &str = "UPDATE webhook_endpoints SET disabled_at = NULL, disabled_reason = NULL, \
     failing_since = NULL WHERE id = $1";

/// Enables an endpoint again; whether it exists.
pub async fn enable(conn: &mut Conn, id: &str) -> Result<bool, Error> {
    Ok(conn.execute(ENABLE, &[&id]).await? == 1)
}

const SECRETS: &str = "SELECT secret, secret_key_id, \
     CASE WHEN previous_until > now() THEN previous_secret END, previous_key_id \
     FROM webhook_endpoints WHERE id = $1";

/// One endpoint's secrets (for a test delivery).
pub async fn secrets(conn: &mut Conn, id: &str) -> Result<Option<StoredSecrets>, Error> {
    Ok(conn
        .query_opt(SECRETS, &[&id])
        .await?
        .map(|r| secrets_from(&r, 0)))
}

fn secrets_from(row: &Row, at: usize) -> StoredSecrets {
    let previous: Option<Vec<u8>> = row.get(at + 2);
    let previous_key: Option<String> = row.get(at + 3);
    StoredSecrets {
        current: (row.get(at), row.get(at + 1)),
        previous: previous.zip(previous_key),
    }
}

const ACTIVE: &str = "SELECT id, url, secret, secret_key_id, \
     CASE WHEN previous_until > now() THEN previous_secret END, previous_key_id \
     FROM webhook_endpoints WHERE disabled_at IS NULL ORDER BY id";

/// The enabled endpoints, with their secrets.
pub async fn active(conn: &mut Conn) -> Result<Vec<ActiveEndpoint>, Error> {
    Ok(conn
        .query(ACTIVE, &[])
        .await?
        .iter()
        .map(|r| ActiveEndpoint {
            id: r.get(0),
            url: r.get(1),
            secrets: secrets_from(r, 2),
        })
        .collect())
}

/// Every secret, for `rotate-keys`: (id, current, current key,
/// previous, previous key).
pub struct EndpointCiphertexts {
    /// `wh_...`.
    pub id: String,
    /// The secrets as stored.
    pub secrets: StoredSecrets,
}

/// Every endpoint's secrets (the table is small: at most
/// [`crate::webhooks::MAX_ENDPOINTS`]).
pub async fn all_secrets(conn: &mut Conn) -> Result<Vec<EndpointCiphertexts>, Error> {
    const ALL: &str = "SELECT id, secret, secret_key_id, previous_secret, previous_key_id \
                       FROM webhook_endpoints ORDER BY id";
    Ok(conn
        .query(ALL, &[])
        .await?
        .iter()
        .map(|r| EndpointCiphertexts {
            id: r.get(0),
            secrets: secrets_from(r, 1),
        })
        .collect())
}

/// Writes re-encrypted secrets (the previous one only when given) unless
/// the secret changed since `read` was read (a rotation meanwhile wins);
/// whether they were written.
pub async fn store_secrets(
    conn: &mut Conn,
    id: &str,
    read: &[u8],
    secrets: &StoredSecrets,
) -> Result<bool, Error> {
    const STORE: &str = "UPDATE webhook_endpoints SET secret = $2, secret_key_id = $3, \
         previous_secret = COALESCE($4, previous_secret), \
         previous_key_id = COALESCE($5, previous_key_id) WHERE id = $1 AND secret = $6";
    let (previous, previous_key) = match &secrets.previous {
        Some((s, k)) => (Some(s.as_slice()), Some(k.as_str())),
        None => (None, None),
    };
    conn.execute(
        STORE,
        &[
            &id,
            &secrets.current.0,
            &secrets.current.1,
            &previous,
            &previous_key,
            &read,
        ],
    )
    .await
    .map(|n| n == 1)
}

/// The claim of an endpoint's due deliveries: each takes an attempt and is
/// reserved for this instance until `$3` seconds from now (its next
/// attempt time until it is recorded). Rows another instance is claiming
/// are skipped, not waited for; a delivery is due only when no earlier
/// event of its integration is still pending for this endpoint, so each
/// integration's events arrive in order.
///
/// Written so its plan does not depend on statistics, which a queue's
/// rarely has right (empty when analysed, a backlog minutes later): the
/// claimed ids are an array (`= ANY (ARRAY(...))`), not `IN (...)`, which
/// a generic plan (the limit unknown) ran as a hash join over a sequential
/// scan of every delivery; the earlier-delivery check is a scalar subquery
/// ordered like the order index with `LIMIT 1`, not `NOT EXISTS`, which
/// the planner turned into an anti join that read the endpoint's whole
/// backlog for each row (10-20 ms a claim with 10,000 pending); as it is,
/// it is one lookup of the integration in the order index. Public so the index test EXPLAINs the
/// statement the product runs.
pub const CLAIM: &str = concat!(
    "UPDATE webhook_deliveries d SET attempts = d.attempts + 1, \
       next_attempt_at = now() + make_interval(secs => $3), claimed_by = $4, \
       last_attempt_at = now() \
     FROM events e \
     WHERE e.id = d.event_id AND d.id = ANY (ARRAY( \
       SELECT c.id FROM webhook_deliveries c \
       WHERE c.endpoint_id = $1 AND c.status = 'pending' AND c.next_attempt_at <= now() \
         AND (SELECT p.id FROM webhook_deliveries p \
              WHERE p.subject = c.subject AND p.endpoint_id = c.endpoint_id \
                AND p.status = 'pending' AND (p.txid, p.event_id) < (c.txid, c.event_id) \
              ORDER BY p.txid, p.event_id LIMIT 1) IS NULL \
       ORDER BY c.next_attempt_at \
       LIMIT $2 \
       FOR UPDATE SKIP LOCKED)) \
     RETURNING d.id, ",
    event_columns!(),
    ", d.attempts, d.schedule_from"
);

/// A delivery claimed for one attempt.
pub struct Claimed {
    /// The delivery.
    pub id: i64,
    /// Its event (`None`: a type this version does not know).
    pub event: Option<Event>,
    /// The event's id, even when its type is unknown.
    pub event_id: i64,
    /// This attempt's number (1 for the first; counting every attempt
    /// ever made, so it also names this claim).
    pub attempt: i32,
    /// This attempt's number in the current schedule (1 for the first; a
    /// redelivery starts a new schedule).
    pub scheduled: i32,
}

/// Claims up to `limit` due deliveries of `endpoint` for `claim_secs`.
pub async fn claim(
    conn: &mut Conn,
    endpoint: &str,
    limit: i64,
    claim_secs: f64,
    instance: &str,
) -> Result<Vec<Claimed>, Error> {
    let rows = conn
        .query(CLAIM, &[&endpoint, &limit, &claim_secs, &instance])
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let (cursor, event) = event_from_row(r)?;
            Some(Claimed {
                id: r.get(0),
                event,
                event_id: cursor.id,
                attempt: r.get(14),
                scheduled: r.get::<_, i32>(14) - r.get::<_, i32>(15),
            })
        })
        .collect())
}

const SUCCEEDED: &str = "WITH d AS ( \
       UPDATE webhook_deliveries SET status = 'succeeded', delivered_at = now(), \
         last_status = $3, last_error = NULL, claimed_by = NULL \
       WHERE id = $1 AND attempts = $2 AND status = 'pending' RETURNING endpoint_id) \
     UPDATE webhook_endpoints w SET failing_since = NULL FROM d \
     WHERE w.id = d.endpoint_id AND w.failing_since IS NOT NULL";

/// Records a 2xx for attempt `attempt` (a later claim of the same delivery,
/// after this instance's claim ran out, wins) and clears the endpoint's
/// failing streak.
pub async fn succeeded(conn: &mut Conn, id: i64, attempt: i32, status: i32) -> Result<(), Error> {
    conn.execute(SUCCEEDED, &[&id, &attempt, &status]).await?;
    Ok(())
}

const FAILED: &str = "WITH d AS ( \
       UPDATE webhook_deliveries SET status = CASE WHEN $3 THEN 'failed' ELSE 'pending' END, \
         next_attempt_at = now() + make_interval(secs => $4), last_status = $5, \
         last_error = $6, claimed_by = NULL \
       WHERE id = $1 AND attempts = $2 AND status = 'pending' RETURNING endpoint_id) \
     UPDATE webhook_endpoints w SET failing_since = COALESCE(w.failing_since, now()), \
       disabled_at = CASE WHEN w.failing_since <= now() - make_interval(secs => $7) THEN now() END, \
       disabled_reason = CASE WHEN w.failing_since <= now() - make_interval(secs => $7) \
         THEN $8 END \
     FROM d \
     WHERE w.id = d.endpoint_id AND w.disabled_at IS NULL \
       AND (w.failing_since IS NULL OR w.failing_since <= now() - make_interval(secs => $7)) \
     RETURNING w.disabled_at IS NOT NULL";

/// A failed attempt to record.
pub struct Failure<'a> {
    /// The delivery.
    pub id: i64,
    /// The attempt that failed.
    pub attempt: i32,
    /// No retry is left: the delivery is `failed`.
    pub give_up: bool,
    /// The pause before the next attempt.
    pub retry_in_secs: f64,
    /// The HTTP status, when an answer came.
    pub status: Option<i32>,
    /// Why.
    pub error: &'a str,
    /// The endpoint is disabled when it has failed for this long.
    pub disable_after_secs: f64,
    /// What a disabled endpoint says.
    pub disabled_reason: &'a str,
}

/// Records a failed attempt, starting the endpoint's failing streak or
/// disabling it when the streak is old enough; whether it was disabled now.
pub async fn failed(conn: &mut Conn, f: &Failure<'_>) -> Result<bool, Error> {
    let row = conn
        .query_opt(
            FAILED,
            &[
                &f.id,
                &f.attempt,
                &f.give_up,
                &f.retry_in_secs,
                &f.status,
                &f.error,
                &f.disable_after_secs,
                &f.disabled_reason,
            ],
        )
        .await?;
    Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
}

// The listing, defined once; `$filter` narrows it by status.
macro_rules! deliveries {
    ($filter:literal) => {
        concat!(
            "SELECT d.id, d.event_id, e.type, d.status, d.attempts, \
               CASE WHEN d.status = 'pending' THEN d.next_attempt_at END, d.last_attempt_at, \
               d.last_status, d.last_error, d.delivered_at, d.created_at \
             FROM webhook_deliveries d JOIN events e ON e.id = d.event_id \
             WHERE d.endpoint_id = $1 AND d.id > $2 ",
            $filter,
            " ORDER BY d.id LIMIT $3"
        )
    };
}

const DELIVERIES: &str = deliveries!("");
const DELIVERIES_OF_STATUS: &str = deliveries!("AND d.status = $4::text");

/// Up to `limit` deliveries to `endpoint` after the delivery `after`, of
/// `status` when given, oldest first.
pub async fn deliveries(
    conn: &mut Conn,
    endpoint: &str,
    after: i64,
    limit: i64,
    status: Option<DeliveryStatus>,
) -> Result<Vec<Delivery>, Error> {
    let rows = match status {
        None => conn.query(DELIVERIES, &[&endpoint, &after, &limit]).await?,
        Some(s) => {
            conn.query(
                DELIVERIES_OF_STATUS,
                &[&endpoint, &after, &limit, &s.as_str()],
            )
            .await?
        }
    };
    Ok(rows
        .iter()
        .map(|r| Delivery {
            id: r.get(0),
            event_id: r.get(1),
            event_type: r.get(2),
            status: DeliveryStatus::from_db(r.get(3)),
            attempts: r.get(4),
            next_attempt_at: r.get(5),
            last_attempt_at: r.get(6),
            last_status: r.get(7),
            last_error: r.get(8),
            delivered_at: r.get(9),
            created_at: r.get(10),
        })
        .collect())
}

const REDELIVER: &str =
    "WITH ev AS (SELECT id, type, hashtextextended(provider || ':' || account_id, 0) AS subject, txid \
                FROM events WHERE id = $1), \
     queued AS ( \
       INSERT INTO webhook_deliveries (endpoint_id, event_id, subject, txid) \
       SELECT w.id, ev.id, ev.subject, ev.txid FROM ev \
       JOIN webhook_endpoints w ON ev.type = ANY (w.event_types) \
       ON CONFLICT (endpoint_id, event_id) DO UPDATE SET status = 'pending', \
         schedule_from = webhook_deliveries.attempts, \
         next_attempt_at = now(), claimed_by = NULL, delivered_at = NULL \
       WHERE webhook_deliveries.status <> 'pending' \
       RETURNING 1), \
     woken AS (SELECT pg_notify('integrations_webhooks', '') FROM queued LIMIT 1) \
     SELECT (SELECT count(*) FROM ev), (SELECT count(*) FROM queued), (SELECT count(*) FROM woken)";

/// Queues event `event_id` again for every endpoint subscribed to
/// its type (a delivery still pending is left to run). `None` when the
/// event does not exist (never, or purged); else how many were queued.
pub async fn redeliver(conn: &mut Conn, event_id: i64) -> Result<Option<i64>, Error> {
    let row = conn.query_one(REDELIVER, &[&event_id]).await?;
    let found: i64 = row.get(0);
    Ok((found > 0).then(|| row.get(1)))
}

/// The backlog: pending deliveries, and the age in seconds of the oldest.
pub async fn backlog(conn: &mut Conn) -> Result<(i64, f64), Error> {
    const BACKLOG: &str = "SELECT count(*), \
         COALESCE(EXTRACT(epoch FROM now() - min(created_at)), 0)::float8 \
         FROM webhook_deliveries WHERE status = 'pending'";
    let row = conn.query_one(BACKLOG, &[]).await?;
    Ok((row.get(0), row.get(1)))
}
