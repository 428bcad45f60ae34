//! The `api_keys` table. Only a SHA-256 hash of each key is stored, with its
//! first characters (`prefix`) to recognise it in listings.

use chrono::{DateTime, Utc};
use db_pool::{Conn, Error};

/// The unique index allowing one active key per name.
pub const NAME_ACTIVE_INDEX: &str = "api_keys_name_active";

/// Whether `e` is the unique violation (SQLSTATE 23505) of
/// [`NAME_ACTIVE_INDEX`]: an active key with that name exists.
pub fn is_duplicate_active_name(e: &Error) -> bool {
    e.sqlstate() == Some("23505") && e.constraint() == Some(NAME_ACTIVE_INDEX)
}

const INSERT: &str = "INSERT INTO api_keys (name, key_hash, prefix, scopes) \
                      VALUES ($1, $2, $3, $4) RETURNING id, created_at";

/// Stores a new key by its hash; returns its id and creation time. Fails
/// with a unique violation of [`NAME_ACTIVE_INDEX`] when an active key has
/// that name (see [`is_duplicate_active_name`]).
pub async fn insert(
    conn: &mut Conn,
    name: &str,
    key_hash: &[u8],
    prefix: &str,
    scopes: &[&str],
) -> Result<(i64, DateTime<Utc>), Error> {
    let row = conn
        .query_one(INSERT, &[&name, &key_hash, &prefix, &scopes])
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// An active key, as verification needs it.
pub struct ActiveKey {
    /// Row id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Granted scopes, as stored.
    pub scopes: Vec<String>,
    /// The stored SHA-256 of the key.
    pub key_hash: Vec<u8>,
}

const FIND_ACTIVE: &str =
    "SELECT id, name, scopes, key_hash FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL";

/// The active (not revoked) key with this hash, if any.
pub async fn find_active(conn: &mut Conn, key_hash: &[u8]) -> Result<Option<ActiveKey>, Error> {
    Ok(conn
        .query_opt(FIND_ACTIVE, &[&key_hash])
        .await?
        .map(|r| ActiveKey {
            id: r.get(0),
            name: r.get(1),
            scopes: r.get(2),
            key_hash: r.get(3),
        }))
}

/// A key as listed: never the key or its hash.
pub struct KeyRow {
    /// Row id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// The key's first characters.
    pub prefix: String,
    /// Granted scopes, as stored.
    pub scopes: Vec<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was revoked (`None`: active).
    pub revoked_at: Option<DateTime<Utc>>,
}

const LIST: &str =
    "SELECT id, name, prefix, scopes, created_at, revoked_at FROM api_keys ORDER BY id";

/// Every key, active and revoked, oldest first.
pub async fn list(conn: &mut Conn) -> Result<Vec<KeyRow>, Error> {
    Ok(conn
        .query(LIST, &[])
        .await?
        .iter()
        .map(|r| KeyRow {
            id: r.get(0),
            name: r.get(1),
            prefix: r.get(2),
            scopes: r.get(3),
            created_at: r.get(4),
            revoked_at: r.get(5),
        })
        .collect())
}

const REVOKE_BY_ID: &str =
    "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL";

/// Revokes the key with this id if it is active; returns how many were
/// revoked (0 or 1).
pub async fn revoke_by_id(conn: &mut Conn, id: i64) -> Result<u64, Error> {
    conn.execute(REVOKE_BY_ID, &[&id]).await
}

const REVOKE_BY_NAME: &str =
    "UPDATE api_keys SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL";

/// Revokes the active key with this name; returns how many were revoked (0
/// or 1: names are unique among active keys).
pub async fn revoke_by_name(conn: &mut Conn, name: &str) -> Result<u64, Error> {
    conn.execute(REVOKE_BY_NAME, &[&name]).await
}
