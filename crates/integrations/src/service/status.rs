//! `status(user_id)`: the user's integrations without tokens, from a cache
//! with the seed's 5-minute TTL.
//!
//! Built on moka: bounded, and concurrent misses for one user run one load
//! (`try_get_with`). Every write for a user invalidates that user's entry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use moka::future::Cache;

use super::{IntegrationsService, ServiceError};
use crate::domain::{IntegrationList, IntegrationStatus, IntegrationView, UserId};
use crate::store;

/// A user's integrations as cached: their rendering as the API shows it,
/// `{"user_id": ..., "integrations": [...]}`, made once when loaded. A cache
/// hit is served without serializing anything, and an entry takes about the
/// size of its JSON (keeping decoded statuses beside it took twice that:
/// see BENCHMARKS.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserStatus {
    json: Bytes,
}

impl UserStatus {
    /// The rendering, as `GET /v1/users/{user_id}/integrations` answers it.
    pub fn json(&self) -> &Bytes {
        &self.json
    }

    /// The integrations, decoded from the rendering (by provider, then
    /// account).
    pub fn integrations(&self) -> Result<Vec<IntegrationStatus>, serde_json::Error> {
        #[derive(serde::Deserialize)]
        struct List {
            integrations: Vec<IntegrationStatus>,
        }
        serde_json::from_slice::<List>(&self.json).map(|l| l.integrations)
    }

    fn render<'a>(
        user_id: &'a str,
        integrations: &'a [IntegrationView<'a>],
    ) -> Result<UserStatus, serde_json::Error> {
        // About 320 bytes per integration: one allocation, no regrowth, and
        // the entry keeps no spare capacity.
        let mut json = Vec::with_capacity(64 + 384 * integrations.len());
        serde_json::to_writer(
            &mut json,
            &IntegrationList {
                user_id,
                integrations,
            },
        )?;
        json.shrink_to_fit();
        Ok(UserStatus {
            json: Bytes::from(json),
        })
    }
}

pub(super) struct StatusCache {
    /// `None` when caching is off (capacity or TTL 0): every read loads.
    cache: Option<Cache<String, Arc<UserStatus>>>,
    hits: AtomicU64,
    loads: AtomicU64,
    /// The hit and miss counters' metric handles, looked up once (at first
    /// use, when the recorder is installed): `counter!` hashes its key on
    /// every call.
    handles: OnceLock<(metrics::Counter, metrics::Counter)>,
}

impl StatusCache {
    pub fn new(ttl: Duration, capacity: u64) -> StatusCache {
        StatusCache {
            cache: (capacity > 0 && !ttl.is_zero()).then(|| {
                Cache::builder()
                    .time_to_live(ttl)
                    .max_capacity(capacity)
                    .build()
            }),
            hits: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            handles: OnceLock::new(),
        }
    }

    fn counters(&self) -> &(metrics::Counter, metrics::Counter) {
        self.handles.get_or_init(|| {
            (
                metrics::counter!("integrations_status_cache_hits_total"),
                metrics::counter!("integrations_status_cache_misses_total"),
            )
        })
    }
}

/// Cache counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that loaded from the database (concurrent misses count once).
    pub misses: u64,
    /// Users cached now (approximate).
    pub entries: u64,
}

impl IntegrationsService {
    /// The user's integrations, without tokens. Cached for
    /// `status_cache_ttl` (5 minutes by default).
    #[tracing::instrument(skip_all, fields(user_id = %user_id))]
    pub async fn status(&self, user_id: &UserId) -> Result<Arc<UserStatus>, ServiceError> {
        let cache = &self.cache;
        let Some(entries) = &cache.cache else {
            return self.load_status(user_id.as_str()).await;
        };
        if let Some(hit) = entries.get(user_id.as_str()).await {
            cache.hits.fetch_add(1, Ordering::Relaxed);
            cache.counters().0.increment(1);
            return Ok(hit);
        }
        // Boxed so the hit path's future stays small (it is moved on every
        // request); concurrent misses for one user share this one load.
        let load: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<_, ServiceError>> + Send + '_>,
        > = Box::pin(self.load_status(user_id.as_str()));
        entries
            .try_get_with(user_id.as_str().to_string(), load)
            .await
            .map_err(|shared| shared.shared())
    }

    /// Reads a user's integrations and renders them, straight from the rows.
    async fn load_status(&self, user_id: &str) -> Result<Arc<UserStatus>, ServiceError> {
        self.cache.loads.fetch_add(1, Ordering::Relaxed);
        self.cache.counters().1.increment(1);
        let mut conn = self.pool.get().await?;
        let rendered = store::integrations::show_for_user(&mut conn, user_id, |views| {
            UserStatus::render(user_id, views)
        })
        .await?;
        drop(conn);
        rendered
            .map(Arc::new)
            .map_err(|e| ServiceError::Render(e.to_string()))
    }

    /// The status of one integration (not cached).
    pub async fn integration(
        &self,
        provider: &str,
        account_id: &str,
    ) -> Result<IntegrationStatus, ServiceError> {
        let mut conn = self.pool.get().await?;
        store::integrations::get_status(&mut conn, provider, account_id)
            .await?
            .ok_or_else(|| ServiceError::NotFound {
                provider: provider.to_string(),
                account_id: account_id.to_string(),
            })
    }

    /// Forgets a user's cached status (after every write for that user).
    pub async fn invalidate(&self, user_id: &str) {
        if let Some(entries) = &self.cache.cache {
            entries.invalidate(user_id).await;
        }
    }

    /// Hits, misses and entries of the status cache; also exported as
    /// `integrations_status_cache_*` metrics.
    pub fn cache_stats(&self) -> CacheStats {
        let entries = self.cache.cache.as_ref().map_or(0, Cache::entry_count);
        metrics::gauge!("integrations_status_cache_entries").set(entries as f64);
        CacheStats {
            hits: self.cache.hits.load(Ordering::Relaxed),
            misses: self.cache.loads.load(Ordering::Relaxed),
            entries,
        }
    }
}
