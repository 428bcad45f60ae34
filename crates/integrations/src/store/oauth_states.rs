//! The `oauth_states` table: single-use connect-flow states.

use chrono::{DateTime, Utc};
use db_pool::{Conn, Error};

const INSERT: &str = "INSERT INTO oauth_states (state_hash, flow_hash, user_id, provider, redirect_uri, code_verifier, key_id, expires_at) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))";

/// A stored state.
pub struct State {
    /// SHA-256 of the flow id the application keeps.
    pub flow_hash: Vec<u8>,
    /// User starting the flow.
    pub user_id: String,
    /// Provider.
    pub provider: String,
    /// Where to send the user afterwards.
    pub redirect_uri: String,
    /// Encrypted PKCE verifier.
    pub code_verifier: Option<Vec<u8>>,
    /// Its key.
    pub key_id: String,
    /// Expiry.
    pub expires_at: DateTime<Utc>,
}

/// Stores a new state (by the SHA-256 of its value, with the SHA-256 of
/// its flow id) for `ttl_secs`.
#[allow(clippy::too_many_arguments)]
pub async fn insert(
    conn: &mut Conn,
    state_hash: &[u8],
    flow_hash: &[u8],
    user_id: &str,
    provider: &str,
    redirect_uri: &str,
    code_verifier: Option<&[u8]>,
    key_id: &str,
    ttl_secs: f64,
) -> Result<(), Error> {
    conn.execute(
        INSERT,
        &[
            &state_hash,
            &flow_hash,
            &user_id,
            &provider,
            &redirect_uri,
            &code_verifier,
            &key_id,
            &ttl_secs,
        ],
    )
    .await
    .map(drop)
}

const TAKE: &str = "DELETE FROM oauth_states WHERE state_hash = $1 \
                    RETURNING flow_hash, user_id, provider, redirect_uri, code_verifier, key_id, expires_at";

/// Takes a state: deleting it in the same statement makes it single-use
/// even when two callbacks race.
pub async fn take(conn: &mut Conn, state_hash: &[u8]) -> Result<Option<State>, Error> {
    Ok(conn.query_opt(TAKE, &[&state_hash]).await?.map(|r| State {
        flow_hash: r.get(0),
        user_id: r.get(1),
        provider: r.get(2),
        redirect_uri: r.get(3),
        code_verifier: r.get(4),
        key_id: r.get(5),
        expires_at: r.get(6),
    }))
}

const PURGE: &str = "DELETE FROM oauth_states WHERE expires_at < now()";

/// Deletes expired states; returns how many.
pub async fn purge_expired(conn: &mut Conn) -> Result<u64, Error> {
    conn.execute(PURGE, &[]).await
}

/// A state whose PKCE verifier is under another key, for `rotate-keys`.
pub struct UnderOtherKey {
    /// Its hash (part of the verifier's associated data).
    pub state_hash: Vec<u8>,
    /// The encrypted verifier.
    pub code_verifier: Vec<u8>,
    /// Its key.
    pub key_id: String,
}

const UNDER_OTHER_KEY: &str = "SELECT state_hash, code_verifier, key_id FROM oauth_states \
                               WHERE key_id <> $1 AND code_verifier IS NOT NULL AND expires_at >= now()";

/// Every unexpired state with a verifier not under `key_id` (a few at most:
/// each lives minutes).
pub async fn under_other_key(conn: &mut Conn, key_id: &str) -> Result<Vec<UnderOtherKey>, Error> {
    Ok(conn
        .query(UNDER_OTHER_KEY, &[&key_id])
        .await?
        .iter()
        .map(|r| UnderOtherKey {
            state_hash: r.get(0),
            code_verifier: r.get(1),
            key_id: r.get(2),
        })
        .collect())
}

const REENCRYPT: &str = "UPDATE oauth_states SET code_verifier = $3, key_id = $4 \
                         WHERE state_hash = $1 AND key_id = $2";

/// Replaces a state's encrypted verifier unless it changed meanwhile.
pub async fn reencrypt(
    conn: &mut Conn,
    state_hash: &[u8],
    old_key: &str,
    code_verifier: &[u8],
    new_key: &str,
) -> Result<bool, Error> {
    Ok(conn
        .execute(
            REENCRYPT,
            &[&state_hash, &old_key, &code_verifier, &new_key],
        )
        .await?
        == 1)
}

const DELETE: &str = "DELETE FROM oauth_states WHERE state_hash = $1";

/// Drops a state that can no longer be read.
pub async fn delete(conn: &mut Conn, state_hash: &[u8]) -> Result<(), Error> {
    conn.execute(DELETE, &[&state_hash]).await.map(drop)
}
