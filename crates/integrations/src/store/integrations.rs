//! The `integrations` table.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use db_pool::types::Json;
use db_pool::{Conn, Error, Row};
use serde_json::value::RawValue;

use crate::domain::{IntegrationStatus, IntegrationView, Metadata, Scopes, Status};

/// Columns of an [`IntegrationStatus`], in [`status_from_row`]'s order.
macro_rules! status_columns {
    () => {
        "provider, account_id, status, scopes, expires_at, last_refresh_at, \
         refresh_failures, last_error, metadata, created_at, updated_at"
    };
}

// The refresh lease, defined once: `refresh_lease_owner` (an instance id)
// holds a row until `refresh_lease_until`. Each statement below builds its
// text from these at compile time, so it stays one constant (prepared and
// cached by its text). The service's side is `service/lease.rs`.

/// SQL: nobody holds the row's lease (never taken, given back, or expired).
macro_rules! lease_free {
    () => {
        "(refresh_lease_until IS NULL OR refresh_lease_until < now())"
    };
}

/// SQL: the lease is `$owner`'s (expired or not: until another instance
/// claims it, `$owner`'s result may still be written).
macro_rules! lease_mine {
    ($owner:literal) => {
        concat!("refresh_lease_owner = ", $owner)
    };
}

/// SQL: `$owner` may claim the lease: it is free, or already `$owner`'s.
/// Its negation is "another instance's lease is running".
macro_rules! lease_free_or_mine {
    ($owner:literal) => {
        concat!("(", lease_free!(), " OR ", lease_mine!($owner), ")")
    };
}

/// SQL `SET` list: `$owner` holds the lease for `$secs` seconds from now.
macro_rules! lease_take {
    ($secs:literal, $owner:literal) => {
        concat!(
            "refresh_lease_until = now() + make_interval(secs => ",
            $secs,
            "), refresh_lease_owner = ",
            $owner
        )
    };
}

/// SQL `SET` list: the lease given back.
macro_rules! lease_give_back {
    () => {
        "refresh_lease_until = NULL, refresh_lease_owner = NULL"
    };
}

fn status_from_row(row: &Row) -> IntegrationStatus {
    status_from_row_at(row, 0)
}

/// [`status_columns!`] read from column `at` on.
fn status_from_row_at(row: &Row, at: usize) -> IntegrationStatus {
    IntegrationStatus {
        provider: row.get(at),
        account_id: row.get(at + 1),
        status: Status::from_db(row.get(at + 2)),
        scopes: row.get(at + 3),
        expires_at: row.get(at + 4),
        last_refresh_at: row.get(at + 5),
        refresh_failures: row.get(at + 6),
        last_error: row.get(at + 7),
        metadata: row.get(at + 8),
        created_at: row.get(at + 9),
        updated_at: row.get(at + 10),
    }
}

/// A token response to store, already encrypted.
pub struct NewTokens<'a> {
    /// Owner.
    pub user_id: &'a str,
    /// Provider.
    pub provider: &'a str,
    /// Account on the provider.
    pub account_id: &'a str,
    /// Granted scopes.
    pub scopes: &'a [String],
    /// `Bearer`, usually.
    pub token_type: &'a str,
    /// Encrypted access token.
    pub access_token: &'a [u8],
    /// Encrypted refresh token (`None` keeps the stored one).
    pub refresh_token: Option<&'a [u8]>,
    /// Key both are encrypted with.
    pub key_id: &'a str,
    /// Expiry (`None`: never).
    pub expires_at: Option<DateTime<Utc>>,
    /// Application data (`None` keeps the stored one).
    pub metadata: Option<&'a serde_json::Value>,
}

const UPSERT: &str = concat!(
    "INSERT INTO integrations AS i (user_id, provider, account_id, scopes, token_type, access_token, \
     refresh_token, key_id, expires_at, metadata, last_refresh_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, COALESCE($10, '{}'::jsonb), now()) \
     ON CONFLICT (provider, account_id) DO UPDATE SET \
       scopes = EXCLUDED.scopes, token_type = EXCLUDED.token_type, \
       access_token = EXCLUDED.access_token, \
       refresh_token = COALESCE(EXCLUDED.refresh_token, i.refresh_token), \
       key_id = EXCLUDED.key_id, expires_at = EXCLUDED.expires_at, \
       metadata = COALESCE($10, i.metadata), status = 'connected', refresh_failures = 0, \
       last_error = NULL, last_error_code = NULL, next_refresh_at = NULL, last_refresh_at = now(), \
       updated_at = now(), refresh_generation = i.refresh_generation + 1, \
       connect_generation = i.connect_generation + 1 \
     WHERE i.user_id = EXCLUDED.user_id \
       AND (EXCLUDED.refresh_token IS NOT NULL OR i.refresh_token IS NULL OR i.key_id = EXCLUDED.key_id) \
     RETURNING ",
    status_columns!()
);

/// Stores tokens for an integration, creating or replacing it. `None` when
/// the account is connected to another user (or, when no new refresh token
/// is given, a stored one is under another key: re-encrypt first).
pub async fn upsert(
    conn: &mut Conn,
    t: &NewTokens<'_>,
) -> Result<Option<IntegrationStatus>, Error> {
    let row = conn
        .query_opt(
            UPSERT,
            &[
                &t.user_id,
                &t.provider,
                &t.account_id,
                &t.scopes,
                &t.token_type,
                &t.access_token,
                &t.refresh_token,
                &t.key_id,
                &t.expires_at,
                &t.metadata,
            ],
        )
        .await?;
    Ok(row.as_ref().map(status_from_row))
}

/// Who owns an integration (by provider and account). Public so the index test EXPLAINs the statement the
/// product runs.
pub const OWNER: &str = "SELECT user_id FROM integrations WHERE provider = $1 AND account_id = $2";

/// Who owns an integration, if it exists.
pub async fn owner(
    conn: &mut Conn,
    provider: &str,
    account_id: &str,
) -> Result<Option<String>, Error> {
    Ok(conn
        .query_opt(OWNER, &[&provider, &account_id])
        .await?
        .map(|r| r.get(0)))
}

/// The stored refresh token of an integration. Public so the index test EXPLAINs the statement the
/// product runs.
pub const STORED_REFRESH: &str =
    "SELECT refresh_token, key_id FROM integrations WHERE provider = $1 AND account_id = $2";

/// The stored (encrypted) refresh token and its key.
pub async fn stored_refresh_token(
    conn: &mut Conn,
    provider: &str,
    account_id: &str,
) -> Result<Option<(Option<Vec<u8>>, String)>, Error> {
    Ok(conn
        .query_opt(STORED_REFRESH, &[&provider, &account_id])
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// The status read: several users' integrations, in order. Public so the index test EXPLAINs the statement the
/// product runs.
pub const LIST_FOR_USERS: &str = concat!(
    "SELECT ",
    status_columns!(),
    ", user_id FROM integrations WHERE user_id = ANY($1) ORDER BY user_id, provider, account_id"
);

/// Users' integrations, by provider and account, several users in one
/// statement (the `(user_id, provider, account_id)` index, which also gives
/// the order): `show(i, views)` for each `user_ids[i]`, in the order the
/// rows come, then with no views for users that have none. A user listed
/// twice is shown twice.
///
/// One statement for a batch, not one per user: PostgreSQL runs 16 users'
/// lookups in one execution about five times cheaper than 16 executions,
/// pipelined or not (see BENCHMARKS.md).
pub async fn show_for_users(
    conn: &mut Conn,
    user_ids: &[&str],
    mut show: impl FnMut(usize, &[IntegrationView<'_>]),
) -> Result<(), Error> {
    let rows = conn.query(LIST_FOR_USERS, &[&user_ids]).await?;
    let mut shown = vec![false; user_ids.len()];
    // ORDER BY user_id keeps each user's rows together.
    for user_rows in rows.chunk_by(|a, b| a.get::<_, &str>(11) == b.get::<_, &str>(11)) {
        let user: &str = user_rows[0].get(11);
        let views: Vec<IntegrationView<'_>> = user_rows.iter().map(view_from_row).collect();
        for (i, _) in user_ids.iter().enumerate().filter(|(_, u)| **u == user) {
            show(i, &views);
            shown[i] = true;
        }
    }
    for (i, _) in shown.iter().enumerate().filter(|(_, shown)| !**shown) {
        show(i, &[]);
    }
    Ok(())
}

/// A view of a row of [`status_columns!`].
fn view_from_row(row: &Row) -> IntegrationView<'_> {
    let status = Status::from_db(row.get(2));
    IntegrationView {
        provider: row.get(0),
        account_id: row.get(1),
        status,
        healthy: status.healthy(),
        scopes: Scopes::Borrowed(row.get(3)),
        expires_at: row.get(4),
        last_refresh_at: row.get(5),
        refresh_failures: row.get(6),
        last_error: row.get(7),
        metadata: Metadata::Raw(row.get::<_, Json<&RawValue>>(8).0),
        created_at: row.get(9),
        updated_at: row.get(10),
    }
}

/// One integration's status. Public so the index test EXPLAINs the statement the
/// product runs.
pub const GET_STATUS: &str = concat!(
    "SELECT ",
    status_columns!(),
    " FROM integrations WHERE provider = $1 AND account_id = $2"
);

/// One integration's status.
pub async fn get_status(
    conn: &mut Conn,
    provider: &str,
    account_id: &str,
) -> Result<Option<IntegrationStatus>, Error> {
    Ok(conn
        .query_opt(GET_STATUS, &[&provider, &account_id])
        .await?
        .as_ref()
        .map(status_from_row))
}

/// The encrypted tokens of a deleted integration, for revocation.
pub struct DeletedTokens {
    /// Encrypted access token.
    pub access_token: Vec<u8>,
    /// Encrypted refresh token.
    pub refresh_token: Option<Vec<u8>>,
    /// Their key.
    pub key_id: String,
}

/// Deletes a user's integration. Public so the index test EXPLAINs the statement the
/// product runs.
pub const DELETE: &str =
    "DELETE FROM integrations WHERE user_id = $1 AND provider = $2 AND account_id = $3 \
                      RETURNING access_token, refresh_token, key_id";

/// Deletes a user's integration; `None` when there was none.
pub async fn delete(
    conn: &mut Conn,
    user_id: &str,
    provider: &str,
    account_id: &str,
) -> Result<Option<DeletedTokens>, Error> {
    Ok(conn
        .query_opt(DELETE, &[&user_id, &provider, &account_id])
        .await?
        .map(|r| DeletedTokens {
            access_token: r.get(0),
            refresh_token: r.get(1),
            key_id: r.get(2),
        }))
}

/// What `access_token` needs of a row.
pub struct TokenRow {
    /// Owner (for cache invalidation).
    pub user_id: String,
    /// Status.
    pub status: Status,
    /// Encrypted access token.
    pub access_token: Vec<u8>,
    /// Whether a refresh token is stored.
    pub refreshable: bool,
    /// Key id.
    pub key_id: String,
    /// `Bearer`, usually.
    pub token_type: String,
    /// Expiry.
    pub expires_at: Option<DateTime<Utc>>,
    /// Completed refresh attempts so far.
    pub generation: i64,
    /// Last refresh error.
    pub last_error: Option<String>,
    /// Consecutive failures.
    pub refresh_failures: i32,
}

/// The access token read. Public so the index test EXPLAINs the statement the
/// product runs.
pub const TOKEN_ROW: &str =
    "SELECT user_id, status, access_token, refresh_token IS NOT NULL, key_id, token_type, \
                         expires_at, refresh_generation, last_error, refresh_failures \
                         FROM integrations WHERE provider = $1 AND account_id = $2";

/// The access token and what decides whether it must be refreshed.
pub async fn token_row(
    conn: &mut Conn,
    provider: &str,
    account_id: &str,
) -> Result<Option<TokenRow>, Error> {
    Ok(conn
        .query_opt(TOKEN_ROW, &[&provider, &account_id])
        .await?
        .map(|r| TokenRow {
            user_id: r.get(0),
            status: Status::from_db(r.get(1)),
            access_token: r.get(2),
            refreshable: r.get(3),
            key_id: r.get(4),
            token_type: r.get(5),
            expires_at: r.get(6),
            generation: r.get(7),
            last_error: r.get(8),
            refresh_failures: r.get(9),
        }))
}

/// A row whose refresh lease this instance holds.
pub struct Claimed {
    /// Row id.
    pub id: i64,
    /// Owner.
    pub user_id: String,
    /// Encrypted refresh token.
    pub refresh_token: Option<Vec<u8>>,
    /// Its key.
    pub key_id: String,
    /// The refresh generation when claimed.
    pub generation: i64,
}

/// The refresh lease claim of one row. Public so the index test EXPLAINs the statement the
/// product runs.
pub const CLAIM: &str = concat!(
    "UPDATE integrations SET ",
    lease_take!("$3", "$4"),
    " WHERE provider = $1 AND account_id = $2 AND ",
    lease_free_or_mine!("$4"),
    " RETURNING id, user_id, refresh_token, key_id, refresh_generation"
);

/// Claims the refresh lease of one row with one conditional UPDATE. `None`
/// when another instance's lease is still running (or the row is gone). This
/// instance may re-claim its own lease: within a process the single-flight
/// lock decides who refreshes.
pub async fn claim(
    conn: &mut Conn,
    provider: &str,
    account_id: &str,
    lease_secs: f64,
    owner: &str,
) -> Result<Option<Claimed>, Error> {
    Ok(conn
        .query_opt(CLAIM, &[&provider, &account_id, &lease_secs, &owner])
        .await?
        .as_ref()
        .map(|r| claimed_at(r, 0)))
}

// Rows are locked in id order first (as rotate-keys updates them), so a
// batch claim and a rotation never deadlock. The claimed rows come straight
// from the UPDATE; the others (leased by
// another instance) from a second scan excluding them with a hashed NOT IN,
// which stays a hash lookup however many rows the batch has (a join against
// the CTE is planned as a nested loop: 9 s for 10,000 rows, against 0.3 s).
/// The refresh lease claim of a batch. Public so the index test EXPLAINs the statement the
/// product runs.
pub const CLAIM_MANY: &str = concat!(
    "WITH want AS (SELECT DISTINCT * FROM unnest($1::text[], $2::text[]) AS w(provider, account_id)), \
     locked AS ( \
       SELECT i.id FROM integrations i JOIN want w ON i.provider = w.provider AND i.account_id = w.account_id \
       ORDER BY i.id FOR UPDATE OF i), \
     claimed AS ( \
       UPDATE integrations i SET ",
    lease_take!("$3", "$4"),
    " FROM locked WHERE i.id = locked.id AND ",
    lease_free_or_mine!("$4"),
    " RETURNING i.provider, i.account_id, i.id, i.user_id, i.refresh_token, i.key_id, \
                 i.refresh_generation) \
     SELECT provider, account_id, id, user_id, refresh_token, key_id, refresh_generation, true \
     FROM claimed \
     UNION ALL \
     SELECT i.provider, i.account_id, i.id, i.user_id, NULL, i.key_id, i.refresh_generation, false \
     FROM integrations i JOIN want w ON i.provider = w.provider AND i.account_id = w.account_id \
     WHERE i.id NOT IN (SELECT id FROM claimed)"
);

/// Claims the leases of many rows in one statement. Returns every requested
/// row that exists, keyed by (provider, account_id), with its refresh
/// generation at that moment and whether this instance now holds its lease
/// (when not, another instance is refreshing it).
pub async fn claim_many(
    conn: &mut Conn,
    keys: &[(String, String)],
    lease_secs: f64,
    owner: &str,
) -> Result<Vec<((String, String), Claimed, bool)>, Error> {
    let (providers, accounts): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(p, a)| (p.as_str(), a.as_str())).unzip();
    Ok(conn
        .query(CLAIM_MANY, &[&providers, &accounts, &lease_secs, &owner])
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), claimed_at(r, 2), r.get(7)))
        .collect())
}

// When the background refresher refreshes a row, defined once (the claim
// and the backlog gauges): within the margin (`$margin` seconds before it
// expires), at a point of the margin's first half drawn from a hash of the
// row's id and refresh generation. Tokens stored together (a launch, an
// import) would otherwise all come due together, every token lifetime,
// for ever; spread over half the margin, each round spreads them further.
// Every instance computes the same point, and a new one each refresh.
// The outer `expires_at <` bound keeps the claim on the due index.
macro_rules! refresh_point {
    ($margin:literal) => {
        concat!(
            "(expires_at - make_interval(secs => ",
            $margin,
            " * (1 - 0.5 * (hashint8extended(id, refresh_generation) & 65535)::float8 / 65536)))"
        )
    };
}

/// SQL: a row the background refresher should refresh now (of the
/// providers `$providers`), whoever holds its lease.
macro_rules! refresh_due {
    ($margin:literal, $providers:literal) => {
        concat!(
            "status = 'connected' AND refresh_token IS NOT NULL \
             AND expires_at < now() + make_interval(secs => ",
            $margin,
            ") AND ",
            refresh_point!($margin),
            " < now() AND provider = ANY(",
            $providers,
            ") AND (next_refresh_at IS NULL OR next_refresh_at <= now())"
        )
    };
}

/// The background refresher's claim of due rows. Public so the index test EXPLAINs the statement the
/// product runs.
pub const CLAIM_DUE: &str = concat!(
    "UPDATE integrations i SET ",
    lease_take!("$3", "$4"),
    " FROM (SELECT id FROM integrations WHERE ",
    refresh_due!("$1", "$5"),
    " AND ",
    lease_free!(),
    " ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) due \
     WHERE i.id = due.id \
     RETURNING i.provider, i.account_id, i.id, i.user_id, i.refresh_token, i.key_id, \
               i.refresh_generation"
);

/// Claims up to `page` integrations of `providers` that expire within
/// `margin_secs`, for the background refresher. Two instances never claim
/// the same row.
pub async fn claim_due(
    conn: &mut Conn,
    margin_secs: f64,
    page: i64,
    lease_secs: f64,
    owner: &str,
    providers: &[&str],
) -> Result<Vec<((String, String), Claimed)>, Error> {
    Ok(conn
        .query(
            CLAIM_DUE,
            &[&margin_secs, &page, &lease_secs, &owner, &providers],
        )
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), claimed_at(r, 2)))
        .collect())
}

fn claimed_at(r: &Row, at: usize) -> Claimed {
    Claimed {
        id: r.get(at),
        user_id: r.get(at + 1),
        refresh_token: r.get(at + 2),
        key_id: r.get(at + 3),
        generation: r.get(at + 4),
    }
}

/// The due backlog: rows the refresher should have refreshed by now and
/// has not (claimed or not), and how long ago the oldest came due. Public
/// so the index test EXPLAINs the statement the product runs.
pub const DUE_BACKLOG: &str = concat!(
    "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(",
    refresh_point!("$1"),
    ")), 0)::float8 FROM integrations WHERE ",
    refresh_due!("$1", "$2")
);

/// (rows due, seconds since the oldest came due) for `providers` with the
/// refresher's `margin_secs`.
pub async fn due_backlog(
    conn: &mut Conn,
    margin_secs: f64,
    providers: &[&str],
) -> Result<(i64, f64), Error> {
    let row = conn
        .query_one(DUE_BACKLOG, &[&margin_secs, &providers])
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// A successful refresh, encrypted, to store for a row this instance leases.
#[derive(Clone)]
pub struct Refreshed {
    /// Row id.
    pub id: i64,
    /// Encrypted access token.
    pub access_token: Vec<u8>,
    /// Encrypted refresh token: the new one, or the old one re-encrypted
    /// under the same key as the access token.
    pub refresh_token: Vec<u8>,
    /// Key of both.
    pub key_id: String,
    /// New expiry.
    pub expires_at: Option<DateTime<Utc>>,
    /// New scopes, when the response named them.
    pub scopes: Option<Vec<String>>,
    /// Token type.
    pub token_type: String,
}

// One statement for a batch of finished refreshes (the refresher finishes
// hundreds a second): the rows arrive as arrays and are locked in id order
// (as rotate-keys and the batch claim lock them: no deadlock). Scopes travel
// as JSON text, one array per row (a text[][] would have to be
// rectangular). Only rows whose lease is still this instance's are written.
/// Stores refresh results. Public so the index test EXPLAINs the statement
/// the product runs.
pub const STORE_REFRESHED: &str = concat!(
    "WITH v AS (SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::bytea[], $4::text[], \
                $5::timestamptz[], $6::text[], $7::text[]) \
                AS v(v_id, v_access, v_refresh, v_key, v_expires, v_scopes, v_type)), \
     locked AS (SELECT i.id FROM integrations i JOIN v ON i.id = v.v_id WHERE i.",
    lease_mine!("$8"),
    " ORDER BY i.id FOR UPDATE OF i) \
     UPDATE integrations i SET access_token = v.v_access, refresh_token = v.v_refresh, \
       key_id = v.v_key, expires_at = v.v_expires, \
       scopes = CASE WHEN v.v_scopes IS NULL THEN i.scopes \
                     ELSE ARRAY(SELECT jsonb_array_elements_text(v.v_scopes::jsonb)) END, \
       token_type = v.v_type, status = 'connected', \
       refresh_failures = 0, last_error = NULL, last_error_code = NULL, next_refresh_at = NULL, \
       last_refresh_at = now(), updated_at = now(), \
       refresh_generation = refresh_generation + 1, ",
    lease_give_back!(),
    " FROM v JOIN locked ON locked.id = v.v_id WHERE i.id = v.v_id AND i.",
    lease_mine!("$8"),
    " RETURNING i.id, ",
    status_columns!()
);

/// Stores the results of successful refreshes and gives their leases back,
/// in one statement. Returns the new state of each row written, by id; a
/// row missing from the answer had lost its lease (another instance took
/// it over, and its result stands).
pub async fn store_refreshed(
    conn: &mut Conn,
    owner: &str,
    batch: &[&Refreshed],
) -> Result<HashMap<i64, IntegrationStatus>, Error> {
    let ids: Vec<i64> = batch.iter().map(|r| r.id).collect();
    let access: Vec<&[u8]> = batch.iter().map(|r| r.access_token.as_slice()).collect();
    let refresh: Vec<&[u8]> = batch.iter().map(|r| r.refresh_token.as_slice()).collect();
    let keys: Vec<&str> = batch.iter().map(|r| r.key_id.as_str()).collect();
    let expires: Vec<Option<DateTime<Utc>>> = batch.iter().map(|r| r.expires_at).collect();
    let scopes: Vec<Option<String>> = batch
        .iter()
        .map(|r| {
            r.scopes
                .as_ref()
                .map(|s| serde_json::Value::from(s.clone()).to_string())
        })
        .collect();
    let types: Vec<&str> = batch.iter().map(|r| r.token_type.as_str()).collect();
    Ok(conn
        .query(
            STORE_REFRESHED,
            &[
                &ids, &access, &refresh, &keys, &expires, &scopes, &types, &owner,
            ],
        )
        .await?
        .iter()
        .map(|r| (r.get::<_, i64>(0), status_from_row_at(r, 1)))
        .collect())
}

/// How a refresh failed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Failure {
    /// `invalid_grant`: the user must reconnect.
    Revoked,
    /// Network, timeout, 5xx: retry after a backoff (`backoff_secs`
    /// doubling per failure in a row, at most an hour); `error` status after
    /// `max_failures` in a row.
    Transient {
        /// Seconds until the next attempt after the first failure.
        backoff_secs: f64,
        /// Consecutive failures that mark the integration `error`.
        max_failures: i32,
    },
    /// The provider rejected the request (e.g. `invalid_client`): a
    /// configuration problem; `error` at once.
    Rejected,
}

const STORE_FAILURE: &str = concat!(
    "UPDATE integrations SET \
       refresh_failures = refresh_failures + 1, last_error = $3, last_error_code = $7, \
       status = CASE WHEN $4 = 'revoked' THEN 'revoked' \
                     WHEN $4 = 'rejected' OR refresh_failures + 1 >= $5 THEN 'error' \
                     ELSE status END, \
       next_refresh_at = now() + make_interval(secs => LEAST(3600, $6 * power(2, refresh_failures))), \
       updated_at = now(), \
       refresh_generation = refresh_generation + 1, ",
    lease_give_back!(),
    " WHERE id = $1 AND ",
    lease_mine!("$2"),
    " RETURNING ",
    status_columns!()
);

/// Records a failed refresh (the stored tokens stay), releases the lease
/// and returns the new state. `code` is the error's code (what events
/// carry beside the message, `error`).
pub async fn store_failure(
    conn: &mut Conn,
    id: i64,
    owner: &str,
    failure: Failure,
    code: &str,
    error: &str,
) -> Result<Option<IntegrationStatus>, Error> {
    let (kind, backoff, max) = match failure {
        Failure::Revoked => ("revoked", 0.0, 1),
        Failure::Rejected => ("rejected", 0.0, 1),
        Failure::Transient {
            backoff_secs,
            max_failures,
        } => ("transient", backoff_secs, max_failures),
    };
    Ok(conn
        .query_opt(
            STORE_FAILURE,
            &[&id, &owner, &error, &kind, &max, &backoff, &code],
        )
        .await?
        .as_ref()
        .map(status_from_row))
}

const RELEASE: &str = concat!(
    "UPDATE integrations SET ",
    lease_give_back!(),
    " WHERE id = $1 AND ",
    lease_mine!("$2")
);

/// Gives a lease back without a result (the refresh was not needed).
pub async fn release(conn: &mut Conn, id: i64, owner: &str) -> Result<(), Error> {
    conn.execute(RELEASE, &[&id, &owner]).await.map(drop)
}

const LEASE_STATE: &str = concat!(
    "SELECT refresh_generation, NOT ",
    lease_free_or_mine!("$3"),
    " FROM integrations WHERE provider = $1 AND account_id = $2"
);

/// (generation, whether another instance's lease is running), to wait for
/// another holder.
pub async fn lease_state(
    conn: &mut Conn,
    provider: &str,
    account_id: &str,
    owner: &str,
) -> Result<Option<(i64, bool)>, Error> {
    Ok(conn
        .query_opt(LEASE_STATE, &[&provider, &account_id, &owner])
        .await?
        .map(|r| (r.get(0), r.get::<_, Option<bool>>(1).unwrap_or(false))))
}

/// A row still encrypted under an old key or in the old format.
pub struct Encrypted {
    /// Row id.
    pub id: i64,
    /// Provider (part of the associated data).
    pub provider: String,
    /// Account (part of the associated data).
    pub account_id: String,
    /// Encrypted access token.
    pub access_token: Vec<u8>,
    /// Encrypted refresh token.
    pub refresh_token: Option<Vec<u8>>,
    /// The key it is encrypted with.
    pub key_id: String,
}

// What `rotate-keys` rewrites, defined once: rows not under the current
// key ($1) or not in the current format (their ciphertexts not starting with
// the marker, $4).
macro_rules! stale_encryption {
    () => {
        "key_id <> $1 OR substring(access_token FROM 1 FOR 4) <> $4 \
         OR substring(refresh_token FROM 1 FOR 4) <> $4"
    };
}

/// rotate-keys: the next rows to rewrite. $4: the current format's marker
/// ([`crate::crypto::FORMAT_MARKER`]). Public so the index test EXPLAINs
/// the statement the product runs.
pub const TO_REENCRYPT: &str = concat!(
    "SELECT id, provider, account_id, access_token, refresh_token, key_id \
     FROM integrations WHERE (",
    stale_encryption!(),
    ") AND id > $2 ORDER BY id LIMIT $3"
);

/// How many rows `rotate-keys` must rewrite (the condition of
/// [`TO_REENCRYPT`]).
pub async fn count_to_reencrypt(conn: &mut Conn, current_key: &str) -> Result<i64, Error> {
    // The rows TO_REENCRYPT pages through, from the start, all of them.
    const COUNT: &str = concat!(
        "SELECT count(*) FROM (SELECT 1 FROM integrations WHERE (",
        stale_encryption!(),
        ") AND id > $2 LIMIT $3) stale"
    );
    let marker: &[u8] = crate::crypto::FORMAT_MARKER;
    Ok(conn
        .query_one(COUNT, &[&current_key, &0i64, &i64::MAX, &marker])
        .await?
        .get(0))
}

/// The next `limit` rows (by id, after `after`) that `rotate-keys` must
/// rewrite: not under `current_key`, or not in the current encryption
/// format.
pub async fn to_reencrypt(
    conn: &mut Conn,
    current_key: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<Encrypted>, Error> {
    let marker: &[u8] = crate::crypto::FORMAT_MARKER;
    Ok(conn
        .query(TO_REENCRYPT, &[&current_key, &after, &limit, &marker])
        .await?
        .iter()
        .map(|r| Encrypted {
            id: r.get(0),
            provider: r.get(1),
            account_id: r.get(2),
            access_token: r.get(3),
            refresh_token: r.get(4),
            key_id: r.get(5),
        })
        .collect())
}

/// Replaces a row's ciphertexts if it still holds the ones that were read
/// ($2, $6): a refresh in between wrote newer tokens (under the current
/// key, or under the old one by an instance not restarted with the new
/// keys yet), which must not be overwritten with the older ones.
/// Parameters: id, old key, access token, refresh token, new key, the
/// access token ciphertext that was read.
pub const REENCRYPT: &str =
    "UPDATE integrations SET access_token = $3, refresh_token = $4, key_id = $5 \
                             WHERE id = $1 AND key_id = $2 AND access_token = $6";

/// Integrations per provider and status: (provider, status, count), for the
/// dashboard (a scan of the table: the caller caches it).
pub async fn counts_by_status(conn: &mut Conn) -> Result<Vec<(String, String, i64)>, Error> {
    const COUNTS: &str = "SELECT provider, status, count(*) FROM integrations \
                          GROUP BY provider, status ORDER BY provider, status";
    Ok(conn
        .query(COUNTS, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// When the next refreshable token expires (the refresher's own index).
pub async fn next_expiry(conn: &mut Conn) -> Result<Option<chrono::DateTime<chrono::Utc>>, Error> {
    const NEXT: &str = "SELECT min(expires_at) FROM integrations \
                        WHERE status = 'connected' AND refresh_token IS NOT NULL";
    Ok(conn.query_one(NEXT, &[]).await?.get(0))
}
