//! API keys: created once, stored as SHA-256 hashes, verified without a
//! database round trip per request.
//!
//! A key is `ik_` followed by the unpadded base64url encoding of 32 random
//! bytes (46 characters). The database holds only its SHA-256 and its first
//! [`DISPLAY_PREFIX_LEN`] characters (to recognise it in listings); the key
//! itself is shown once, when it is created.
//!
//! [`ApiKeys::verify`] caches its answers, valid and invalid, by the SHA-256
//! of the presented key for a TTL ([`DEFAULT_VERIFY_TTL`]): repeated requests
//! with one key, and floods of one wrong key, cost one query per TTL.
//! Concurrent verifications of a key not cached yet run one query.
//! Strings that are not shaped like a key are refused without a lookup.
//!
//! Scopes are independent: `admin` does not imply `read`; grant each scope a
//! key needs.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use db_pool::Pool;
use moka::future::Cache;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::store;

/// What every key starts with.
pub const KEY_PREFIX: &str = "ik_";

/// Random bytes in a key.
const KEY_RANDOM_BYTES: usize = 32;

/// Length of a key: the prefix and 43 base64url characters.
pub const KEY_LEN: usize = 46;

/// How many leading characters of a key are stored and listed (the `ik_`
/// prefix and 7 random characters): enough to tell keys apart, far too few
/// to guess the rest.
pub const DISPLAY_PREFIX_LEN: usize = 10;

/// How long [`ApiKeys::verify`] trusts a cached answer by default. A revoked
/// key keeps working for at most this long on instances that verified it
/// recently: `revoke` clears only the cache of the process that runs it.
pub const DEFAULT_VERIFY_TTL: Duration = Duration::from_secs(30);

/// How many verification answers are cached at most. moka's admission
/// policy (TinyLFU) keeps keys in regular use cached when a flood of
/// distinct wrong keys passes through.
pub const VERIFY_CACHE_CAPACITY: u64 = 10_000;

/// Longest key name, in characters.
pub const MAX_NAME_LEN: usize = 64;

/// What a key may do. Scopes are independent: `Admin` does not imply the
/// others.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read integrations and their status.
    Read,
    /// Connect, change and delete integrations.
    Write,
    /// Read access tokens.
    Credentials,
    /// Administrative operations.
    Admin,
}

impl Scope {
    /// Every scope, in their canonical order.
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Write, Scope::Credentials, Scope::Admin];

    /// The scope's name: `read`, `write`, `credentials` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Credentials => "credentials",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scope name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope '{}'; accepted: read, write, credentials, admin", shown(.0))]
pub struct UnknownScope(pub String);

impl FromStr for Scope {
    type Err = UnknownScope;

    /// Parses a scope name (surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Scope, UnknownScope> {
        let s = s.trim();
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| UnknownScope(s.to_string()))
    }
}

/// A verified key: who is calling and what it may do. Holds no key material.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApiKeyInfo {
    /// The key's id.
    pub id: i64,
    /// The key's name.
    pub name: String,
    /// What it may do, in canonical order.
    pub scopes: Vec<Scope>,
}

impl ApiKeyInfo {
    /// Whether the key was granted `scope` (exactly: no scope implies
    /// another).
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// A key as listed: never the key or its hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApiKeySummary {
    /// The key's id.
    pub id: i64,
    /// The key's name.
    pub name: String,
    /// Its first [`DISPLAY_PREFIX_LEN`] characters.
    pub prefix: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was revoked (`None`: active).
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What creating, listing or revoking keys failed with. Never contains a key.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The name is empty, too long or has other characters.
    #[error("invalid API key name '{}': use 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.', not only digits, not starting with 'ik_'", shown(.0))]
    InvalidName(String),
    /// No scope was given.
    #[error("an API key needs at least one scope; accepted: read, write, credentials, admin")]
    NoScopes,
    /// An active key has this name.
    #[error("an active key named '{0}' exists; revoke it first or pick another name")]
    DuplicateName(String),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] db_pool::Error),
}

impl AuthError {
    /// Whether the request itself was wrong (name or scopes), as opposed to a
    /// conflict or a database failure.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, AuthError::InvalidName(_) | AuthError::NoScopes)
    }
}

/// A user-supplied value for an error message; a value shaped like a key
/// (pasted in the wrong place) is not repeated.
pub(crate) fn shown(value: &str) -> &str {
    if value.starts_with(KEY_PREFIX) && value.len() >= DISPLAY_PREFIX_LEN {
        "<redacted: looks like an API key>"
    } else {
        value
    }
}

/// Checks a key name: 1 to [`MAX_NAME_LEN`] ASCII letters, digits, `-`, `_`
/// or `.`, not only digits (so `revoke 42` always means the id), and not
/// starting with `ik_` (a pasted key would end up in listings and logs).
pub fn validate_name(name: &str) -> Result<(), AuthError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.bytes().all(|b| b.is_ascii_digit())
        && !name.starts_with(KEY_PREFIX);
    if valid {
        Ok(())
    } else {
        Err(AuthError::InvalidName(name.to_string()))
    }
}

/// The scopes sorted into canonical order without duplicates; at least one.
fn canonical_scopes(scopes: &[Scope]) -> Result<Vec<Scope>, AuthError> {
    let mut scopes = scopes.to_vec();
    scopes.sort_unstable();
    scopes.dedup();
    if scopes.is_empty() {
        return Err(AuthError::NoScopes);
    }
    Ok(scopes)
}

/// Scopes as stored; names this version does not know are dropped (a key
/// never gains a permission from a newer schema).
fn scopes_from_db(names: &[String]) -> Vec<Scope> {
    let mut scopes: Vec<Scope> = names
        .iter()
        .filter_map(|name| match name.parse() {
            Ok(scope) => Some(scope),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unknown scope stored for an API key");
                None
            }
        })
        .collect();
    scopes.sort_unstable();
    scopes.dedup();
    scopes
}

/// A new random key.
fn generate_key() -> SecretString {
    let mut bytes = [0u8; KEY_RANDOM_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(KEY_PREFIX);
    URL_SAFE_NO_PAD.encode_string(bytes, &mut key);
    bytes.fill(0);
    SecretString::from(key)
}

/// Whether `presented` is shaped like one of our keys: the prefix and the
/// base64url encoding of exactly 32 bytes.
fn looks_like_key(presented: &str) -> bool {
    let Some(encoded) = presented.strip_prefix(KEY_PREFIX) else {
        return false;
    };
    presented.len() == KEY_LEN
        && URL_SAFE_NO_PAD
            .decode(encoded)
            .is_ok_and(|bytes| bytes.len() == KEY_RANDOM_BYTES)
}

/// The SHA-256 of a key: what is stored and what the cache is keyed by.
fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Compares two hashes in constant time (for equal lengths).
fn hashes_match(stored: &[u8], computed: &[u8]) -> bool {
    stored.ct_eq(computed).into()
}

/// Keys found valid, by hash, with when the database said so.
type Verified = HashMap<[u8; 32], (Arc<ApiKeyInfo>, Instant)>;

/// Cached verification answers by key hash: `None` for keys that are
/// unknown or revoked.
type VerifyCache = Cache<[u8; 32], Option<Arc<ApiKeyInfo>>>;

/// Creates, lists, revokes and verifies API keys. Cheap to clone; clones
/// share the cache.
#[derive(Clone)]
pub struct ApiKeys {
    pool: Pool,
    ttl: Duration,
    /// `None` when the TTL is zero: every verification queries.
    cache: Option<VerifyCache>,
    /// Keys found valid, with when the database said so: checked before
    /// `cache` on every request. Written by hand because a request's moka
    /// lookup (its read log and housekeeping) was a measurable share of the
    /// cached status path, and this map only ever holds the few keys in
    /// use (answers for anything else stay in `cache`, bounded).
    verified: Arc<RwLock<Verified>>,
    /// Verification counters by result, looked up once (at first use, when
    /// the recorder is installed): `counter!` hashes its labels per call.
    counters: std::sync::OnceLock<VerifyCounters>,
    /// Whether cached answers may be used: false while the change feed is
    /// not connected (a revocation elsewhere would go unnoticed), so every
    /// request is verified in the database.
    live: Arc<AtomicBool>,
    /// Bumped by every [`ApiKeys::forget_all`]: an answer read before it is
    /// not kept.
    generation: Arc<AtomicU64>,
}

#[derive(Clone)]
struct VerifyCounters {
    valid: metrics::Counter,
    rejected: metrics::Counter,
    malformed: metrics::Counter,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("verify_ttl", &self.ttl)
            .field(
                "cached_answers",
                &self.cache.as_ref().map_or(0, Cache::entry_count),
            )
            .finish_non_exhaustive()
    }
}

impl ApiKeys {
    /// Keys in `pool`'s database; verification answers are trusted for
    /// `ttl` (zero: not cached). See [`DEFAULT_VERIFY_TTL`].
    pub fn new(pool: Pool, ttl: Duration) -> ApiKeys {
        ApiKeys {
            pool,
            ttl,
            cache: (!ttl.is_zero()).then(|| {
                Cache::builder()
                    .time_to_live(ttl)
                    .max_capacity(VERIFY_CACHE_CAPACITY)
                    .build()
            }),
            verified: Arc::default(),
            counters: std::sync::OnceLock::new(),
            live: Arc::new(AtomicBool::new(true)),
            generation: Arc::default(),
        }
    }

    /// Forgets every cached answer (a key changed: created, revoked, or
    /// changed by another instance). Answers being read now are not kept.
    pub fn forget_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.verified
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        if let Some(cache) = &self.cache {
            cache.invalidate_all();
        }
    }

    /// Whether cached answers are used (see the `live` field); turning it
    /// on again should follow a [`ApiKeys::forget_all`].
    pub fn set_cache_live(&self, live: bool) {
        self.live.store(live, Ordering::Release);
    }

    fn counters(&self) -> &VerifyCounters {
        self.counters.get_or_init(|| {
            let counter = |result: &'static str| {
                metrics::counter!("integrations_api_key_verifications_total", "result" => result)
            };
            VerifyCounters {
                valid: counter("valid"),
                rejected: counter("rejected"),
                malformed: counter("malformed"),
            }
        })
    }

    /// How long verification answers are trusted.
    pub fn verify_ttl(&self) -> Duration {
        self.ttl
    }

    /// The key's identity and scopes when `presented` is an active key,
    /// `None` otherwise (malformed, unknown or revoked). Answers are cached
    /// for the TTL, so a key revoked by another process keeps working here
    /// for at most that long. A database failure is shared by every
    /// verification that waited on the same lookup.
    pub async fn verify(
        &self,
        presented: &str,
    ) -> Result<Option<Arc<ApiKeyInfo>>, Arc<db_pool::Error>> {
        if !looks_like_key(presented) {
            self.counters().malformed.increment(1);
            return Ok(None);
        }
        let hash = hash_key(presented);
        let live = self.live.load(Ordering::Acquire);
        if live {
            if let Some(info) = self.recently_verified(&hash) {
                self.counters().valid.increment(1);
                return Ok(Some(info));
            }
        }
        let answer = match &self.cache {
            Some(cache) if live => match cache.get(&hash).await {
                Some(hit) => hit,
                // Boxed: the lookup's future is large and the hit path
                // (every request) should not carry and move it.
                None => {
                    let generation = self.generation.load(Ordering::Acquire);
                    let load: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>> =
                        Box::pin(self.load(&hash));
                    let answer = cache.try_get_with(hash, load).await?;
                    if self.generation.load(Ordering::Acquire) != generation {
                        // Forgotten while it was read: not kept.
                        cache.invalidate(&hash).await;
                    }
                    answer
                }
            },
            _ => self.load(&hash).await.map_err(Arc::new)?,
        };
        let counters = self.counters();
        match answer {
            Some(_) => counters.valid.increment(1),
            None => counters.rejected.increment(1),
        }
        Ok(answer)
    }

    /// A valid key's identity, when the database said so less than the TTL
    /// ago.
    fn recently_verified(&self, hash: &[u8; 32]) -> Option<Arc<ApiKeyInfo>> {
        let verified = self.verified.read().unwrap_or_else(PoisonError::into_inner);
        let (info, at) = verified.get(hash)?;
        (at.elapsed() < self.ttl).then(|| info.clone())
    }

    /// Looks a key hash up in the database.
    async fn load(&self, hash: &[u8; 32]) -> Result<Option<Arc<ApiKeyInfo>>, db_pool::Error> {
        metrics::counter!("integrations_api_key_lookups_total").increment(1);
        let asked = Instant::now();
        let generation = self.generation.load(Ordering::Acquire);
        let mut conn = self.pool.get().await?;
        let found = store::api_keys::find_active(&mut conn, hash).await?;
        drop(conn);
        let found = found
            .filter(|key| hashes_match(&key.key_hash, hash))
            .map(|key| {
                Arc::new(ApiKeyInfo {
                    id: key.id,
                    name: key.name,
                    scopes: scopes_from_db(&key.scopes),
                })
            });
        if !self.ttl.is_zero() && self.live.load(Ordering::Acquire) {
            let mut verified = self
                .verified
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if self.generation.load(Ordering::Acquire) != generation {
                // Forgotten while it was read: the answer may be stale.
                return Ok(found);
            }
            // Forget what has expired (revoked elsewhere, or not used since).
            verified.retain(|_, (_, at)| at.elapsed() < self.ttl);
            match &found {
                Some(info) => verified.insert(*hash, (info.clone(), asked)),
                None => verified.remove(hash),
            };
        }
        Ok(found)
    }

    /// Creates a key named `name` (1 to 64 letters, digits, `-`, `_` or `.`,
    /// not only digits; unique among active keys) with `scopes` (at least
    /// one). Returns the key, which is not stored and cannot be shown again,
    /// and what it grants.
    #[tracing::instrument(skip_all, fields(name = %name))]
    pub async fn create(
        &self,
        name: &str,
        scopes: &[Scope],
    ) -> Result<(SecretString, ApiKeyInfo), AuthError> {
        validate_name(name)?;
        let scopes = canonical_scopes(scopes)?;
        let key = generate_key();
        let hash = hash_key(key.expose_secret());
        let prefix = key
            .expose_secret()
            .get(..DISPLAY_PREFIX_LEN)
            .unwrap_or_default();
        let scope_names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
        let mut conn = self.pool.get().await?;
        let (id, _) = store::api_keys::insert(&mut conn, name, &hash, prefix, &scope_names)
            .await
            .map_err(|e| {
                if store::api_keys::is_duplicate_active_name(&e) {
                    AuthError::DuplicateName(name.to_string())
                } else {
                    AuthError::Db(e)
                }
            })?;
        tracing::info!(id, scopes = ?scope_names, "API key created");
        Ok((
            key,
            ApiKeyInfo {
                id,
                name: name.to_string(),
                scopes,
            },
        ))
    }

    /// Every key, active and revoked, oldest first (never the key itself).
    pub async fn list(&self) -> Result<Vec<ApiKeySummary>, AuthError> {
        let mut conn = self.pool.get().await?;
        let rows = store::api_keys::list(&mut conn).await?;
        Ok(rows
            .into_iter()
            .map(|row| ApiKeySummary {
                id: row.id,
                scopes: scopes_from_db(&row.scopes),
                name: row.name,
                prefix: row.prefix,
                created_at: row.created_at,
                revoked_at: row.revoked_at,
            })
            .collect())
    }

    /// Revokes the active key with this id (all digits) or name; returns how
    /// many were revoked (0 when none matched). Clears this instance's whole
    /// verification cache; other instances hear of it through the change
    /// feed (or, without one, within their TTL).
    #[tracing::instrument(skip_all, fields(key = %id_or_name))]
    pub async fn revoke(&self, id_or_name: &str) -> Result<u64, AuthError> {
        let by_id = !id_or_name.is_empty() && id_or_name.bytes().all(|b| b.is_ascii_digit());
        let mut conn = self.pool.get().await?;
        let revoked = match id_or_name.parse::<i64>() {
            Ok(id) if by_id => store::api_keys::revoke_by_id(&mut conn, id).await?,
            // All digits but beyond i64: no such id.
            Err(_) if by_id => 0,
            _ => store::api_keys::revoke_by_name(&mut conn, id_or_name).await?,
        };
        drop(conn);
        if revoked > 0 {
            self.forget_all();
            tracing::info!(revoked, "API key revoked");
        }
        Ok(revoked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_print_their_lowercase_names() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>(), Ok(scope));
            assert_eq!(scope.to_string(), scope.as_str());
        }
        assert_eq!(" write ".parse::<Scope>(), Ok(Scope::Write));
        assert_eq!(
            serde_json::to_string(&Scope::ALL).unwrap(),
            r#"["read","write","credentials","admin"]"#
        );
    }

    #[test]
    fn unknown_scope_error_names_the_value_and_the_accepted_ones() {
        let err = "READ".parse::<Scope>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown scope 'READ'; accepted: read, write, credentials, admin"
        );
        assert!("".parse::<Scope>().is_err());
    }

    #[test]
    fn an_error_never_repeats_something_shaped_like_a_key() {
        let key = generate_key();
        let key = key.expose_secret();
        let scope_err = key.parse::<Scope>().unwrap_err().to_string();
        let name_err = AuthError::InvalidName(format!("{key}!")).to_string();
        for err in [scope_err, name_err] {
            assert!(!err.contains(&key[KEY_PREFIX.len()..]), "{err}");
            assert!(err.contains("redacted"), "{err}");
        }
    }

    #[test]
    fn allows_only_granted_scopes() {
        let info = ApiKeyInfo {
            id: 1,
            name: "ci".into(),
            scopes: vec![Scope::Read, Scope::Admin],
        };
        assert!(info.allows(Scope::Read) && info.allows(Scope::Admin));
        assert!(!info.allows(Scope::Write) && !info.allows(Scope::Credentials));
    }

    #[test]
    fn keys_are_prefixed_base64url_of_32_random_bytes() {
        let a = generate_key();
        let b = generate_key();
        let a = a.expose_secret();
        assert_eq!(a.len(), KEY_LEN);
        assert!(a.starts_with(KEY_PREFIX));
        let decoded = URL_SAFE_NO_PAD.decode(&a[KEY_PREFIX.len()..]).unwrap();
        assert_eq!(decoded.len(), 32);
        assert!(looks_like_key(a));
        assert_ne!(a, b.expose_secret());
    }

    #[test]
    fn malformed_keys_are_recognised_without_a_lookup() {
        let good = generate_key();
        let good = good.expose_secret();
        assert!(looks_like_key(good));
        let body = &good[KEY_PREFIX.len()..];
        for bad in [
            String::new(),
            "ik_".to_string(),
            format!("xx_{body}"),
            format!("{good}A"),
            good[..KEY_LEN - 1].to_string(),
            format!("ik_{}=", &body[..42]),
            format!("ik_{}+", &body[..42]),
            format!("ik_{}", "A".repeat(44)),
            // 43 characters whose last one carries bits beyond 32 bytes.
            format!("ik_{}B", "A".repeat(42)),
        ] {
            assert!(!looks_like_key(&bad), "{bad}");
        }
    }

    #[test]
    fn the_hash_is_the_sha256_of_the_whole_key() {
        // FIPS 180-2 test vector.
        assert_eq!(
            hex(&hash_key("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(hash_key("ik_a"), hash_key("ik_b"));
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn hash_comparison_is_exact() {
        let a = hash_key("ik_a");
        let mut b = a;
        assert!(hashes_match(&a, &b));
        b[31] ^= 1;
        assert!(!hashes_match(&a, &b));
        assert!(!hashes_match(&a, &a[..31]));
        assert!(!hashes_match(&a, &[]));
    }

    #[test]
    fn names_are_short_plain_and_not_numbers() {
        for ok in ["ci", "deploy-bot_2.prod", "-5", &"a".repeat(64)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "42", "has space", "é", "a/b", &"a".repeat(65)] {
            assert!(
                matches!(validate_name(bad), Err(AuthError::InvalidName(_))),
                "{bad}"
            );
        }
        // A pasted key is refused, and the error does not repeat it.
        let key = generate_key();
        let err = validate_name(key.expose_secret()).unwrap_err();
        assert!(!err.to_string().contains(key.expose_secret()), "{err}");
    }

    #[test]
    fn scopes_are_deduplicated_and_required() {
        assert_eq!(
            canonical_scopes(&[Scope::Admin, Scope::Read, Scope::Admin]).unwrap(),
            vec![Scope::Read, Scope::Admin]
        );
        assert!(matches!(canonical_scopes(&[]), Err(AuthError::NoScopes)));
        assert_eq!(
            scopes_from_db(&["admin".into(), "future".into(), "read".into()]),
            vec![Scope::Read, Scope::Admin]
        );
    }

    #[tokio::test]
    async fn debug_output_holds_no_key_material() {
        let key = generate_key();
        assert!(!format!("{key:?}").contains(&key.expose_secret()[KEY_PREFIX.len()..]));
        let pool = Pool::new(db_pool::PoolConfig::parse("postgresql://u:pw@localhost/db").unwrap())
            .unwrap();
        let keys = ApiKeys::new(pool, DEFAULT_VERIFY_TTL);
        let hash = hash_key(key.expose_secret());
        if let Some(cache) = &keys.cache {
            cache.insert(hash, None).await;
        }
        let debug = format!("{keys:?}");
        assert!(!debug.contains(&hex(&hash)), "{debug}");
        assert!(!debug.contains("pw"), "{debug}");
    }
}
