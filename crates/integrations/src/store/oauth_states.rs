//! The `oauth_states` table: single-use connect-flow states.

use chrono::{DateTime, Utc};
use db_pool::{Conn, Error};

const INSERT: &str = "INSERT INTO oauth_states (state_hash, user_id, provider, redirect_uri, code_verifier, key_id, expires_at) \
                      VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))";

/// A stored state.
pub struct State {
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

/// Stores a new state (by the SHA-256 of its value) for `ttl_secs`.
#[allow(clippy::too_many_arguments)]
pub async fn insert(
    conn: &mut Conn,
    state_hash: &[u8],
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
                    RETURNING user_id, provider, redirect_uri, code_verifier, key_id, expires_at";

/// Takes a state: deleting it in the same statement makes it single-use
/// even when two callbacks race.
pub async fn take(conn: &mut Conn, state_hash: &[u8]) -> Result<Option<State>, Error> {
    Ok(conn.query_opt(TAKE, &[&state_hash]).await?.map(|r| State {
        user_id: r.get(0),
        provider: r.get(1),
        redirect_uri: r.get(2),
        code_verifier: r.get(3),
        key_id: r.get(4),
        expires_at: r.get(5),
    }))
}

const PURGE: &str = "DELETE FROM oauth_states WHERE expires_at < now()";

/// Deletes expired states; returns how many.
pub async fn purge_expired(conn: &mut Conn) -> Result<u64, Error> {
    conn.execute(PURGE, &[]).await
}
