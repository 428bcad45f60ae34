//! The `oauth_pending` table: a provider's answer to a connect flow,
//! waiting for the application's confirmation (`POST /v1/connect/complete`).

use chrono::{DateTime, Utc};
use db_pool::{Conn, Error};

/// A pending answer to store.
pub struct NewPending<'a> {
    /// SHA-256 of the flow id the start returned.
    pub flow_hash: &'a [u8],
    /// SHA-256 of the completion code the callback gave the browser.
    pub completion_hash: &'a [u8],
    /// The user the flow was started for.
    pub user_id: &'a str,
    /// Provider.
    pub provider: &'a str,
    /// The account the provider's tokens belong to.
    pub account_id: &'a str,
    /// The token response, encrypted.
    pub tokens: &'a [u8],
    /// Its key.
    pub key_id: &'a str,
    /// How long it may wait for the application.
    pub ttl_secs: f64,
}

const INSERT: &str = "INSERT INTO oauth_pending \
                      (flow_hash, completion_hash, user_id, provider, account_id, tokens, key_id, expires_at) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))";

/// Stores a pending answer.
pub async fn insert(conn: &mut Conn, p: &NewPending<'_>) -> Result<(), Error> {
    conn.execute(
        INSERT,
        &[
            &p.flow_hash,
            &p.completion_hash,
            &p.user_id,
            &p.provider,
            &p.account_id,
            &p.tokens,
            &p.key_id,
            &p.ttl_secs,
        ],
    )
    .await
    .map(drop)
}

/// A pending answer taken for completion.
pub struct Pending {
    /// The user the flow was started for.
    pub user_id: String,
    /// Provider.
    pub provider: String,
    /// Account.
    pub account_id: String,
    /// The encrypted token response.
    pub tokens: Vec<u8>,
    /// Its key.
    pub key_id: String,
    /// Expiry.
    pub expires_at: DateTime<Utc>,
}

// Deleting in the statement that reads makes the completion single-use even
// when two completions race; a wrong completion code (or another user)
// matches nothing and leaves the flow for its rightful owner.
const TAKE: &str = "DELETE FROM oauth_pending \
                    WHERE flow_hash = $1 AND completion_hash = $2 AND ($3::text IS NULL OR user_id = $3) \
                    RETURNING user_id, provider, account_id, tokens, key_id, expires_at";

/// Takes the pending answer of a flow when the completion code (and the
/// user, when given) match.
pub async fn take(
    conn: &mut Conn,
    flow_hash: &[u8],
    completion_hash: &[u8],
    user_id: Option<&str>,
) -> Result<Option<Pending>, Error> {
    Ok(conn
        .query_opt(TAKE, &[&flow_hash, &completion_hash, &user_id])
        .await?
        .map(|r| Pending {
            user_id: r.get(0),
            provider: r.get(1),
            account_id: r.get(2),
            tokens: r.get(3),
            key_id: r.get(4),
            expires_at: r.get(5),
        }))
}

const PURGE: &str = "DELETE FROM oauth_pending WHERE expires_at < now()";

/// Deletes answers nobody confirmed in time; returns how many.
pub async fn purge_expired(conn: &mut Conn) -> Result<u64, Error> {
    conn.execute(PURGE, &[]).await
}

/// One pending answer under another key, for `rotate-keys`.
pub struct UnderOtherKey {
    /// Its flow hash.
    pub flow_hash: Vec<u8>,
    /// Its user, provider and account (in the associated data).
    pub user_id: String,
    /// Provider.
    pub provider: String,
    /// Account.
    pub account_id: String,
    /// The encrypted token response.
    pub tokens: Vec<u8>,
    /// Its key.
    pub key_id: String,
}

const UNDER_OTHER_KEY: &str = "SELECT flow_hash, user_id, provider, account_id, tokens, key_id \
                               FROM oauth_pending WHERE key_id <> $1 AND expires_at >= now()";

/// Every unexpired pending answer not under `key_id` (a few at most: each
/// lives minutes).
pub async fn under_other_key(conn: &mut Conn, key_id: &str) -> Result<Vec<UnderOtherKey>, Error> {
    Ok(conn
        .query(UNDER_OTHER_KEY, &[&key_id])
        .await?
        .iter()
        .map(|r| UnderOtherKey {
            flow_hash: r.get(0),
            user_id: r.get(1),
            provider: r.get(2),
            account_id: r.get(3),
            tokens: r.get(4),
            key_id: r.get(5),
        })
        .collect())
}

const REENCRYPT: &str = "UPDATE oauth_pending SET tokens = $3, key_id = $4 \
                         WHERE flow_hash = $1 AND key_id = $2";

/// Replaces a pending answer's ciphertext unless it changed meanwhile.
pub async fn reencrypt(
    conn: &mut Conn,
    flow_hash: &[u8],
    old_key: &str,
    tokens: &[u8],
    new_key: &str,
) -> Result<bool, Error> {
    Ok(conn
        .execute(REENCRYPT, &[&flow_hash, &old_key, &tokens, &new_key])
        .await?
        == 1)
}

const DELETE: &str = "DELETE FROM oauth_pending WHERE flow_hash = $1";

/// Drops a pending answer that can no longer be read.
pub async fn delete(conn: &mut Conn, flow_hash: &[u8]) -> Result<(), Error> {
    conn.execute(DELETE, &[&flow_hash]).await.map(drop)
}
