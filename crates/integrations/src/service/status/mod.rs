//! `status(user_id)`: the user's integrations without tokens, read through
//! a cache with the seed's 5-minute TTL.
//!
//! Two parts with one direction between them:
//!
//! - [`cache`]: what is kept (each user's rendered status), for how long,
//!   what forgets it (every write for the user, by this instance or heard
//!   through the change feed), and the hit and miss counters;
//! - [`loader`]: how misses are read (a queue drained by loader tasks,
//!   several users per statement; concurrent misses for one user share one
//!   load, and its error) and how long a caller waits.
//!
//! The loader asks the cache for a user's write mark when it queues a load
//! and gives it back with what it read; the cache keeps it only if no write
//! for the user came in between. The cache knows nothing of the loader.

mod cache;
mod loader;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{IntegrationsService, ServiceError};
use crate::domain::{IntegrationList, IntegrationStatus, IntegrationView, UserId};
use crate::store;

pub use cache::CacheStats;

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

    fn render(
        user_id: &str,
        integrations: &[IntegrationView<'_>],
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

/// The status cache as the service reads it: the kept statuses, and the
/// loader that reads misses into them.
pub(super) struct StatusCache {
    kept: Arc<cache::Cache>,
    loader: loader::Loader,
}

impl StatusCache {
    /// Keeps at most `capacity` users for `ttl`; with either 0, nothing is
    /// kept and every read loads.
    pub fn new(ttl: Duration, capacity: u64) -> StatusCache {
        let kept = Arc::new(cache::Cache::new(ttl, capacity));
        StatusCache {
            loader: loader::Loader::new(kept.clone()),
            kept,
        }
    }
}

impl IntegrationsService {
    /// The user's integrations, without tokens. Cached for
    /// `status_cache_ttl` (5 minutes by default); a miss is read by the
    /// status loader (`service/status/loader.rs`).
    #[tracing::instrument(skip_all, fields(user_id = %user_id))]
    pub async fn status(&self, user_id: &UserId) -> Result<Arc<UserStatus>, ServiceError> {
        if let Some(hit) = self.cache.kept.get(user_id.as_str()) {
            return Ok(hit);
        }
        self.cache.loader.load(&self.pool, user_id.as_str()).await
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

    /// Forgets a user's cached status: after every write for that user, by
    /// this instance or (heard through the change feed) another. A load that
    /// overlapped it is not kept.
    pub fn forget_status(&self, user_id: &str) {
        self.cache.kept.forget(user_id);
    }

    /// Forgets every user's cached status (the change feed lost
    /// notifications, or a write named no user). Loads in flight are not
    /// kept.
    pub fn forget_all_statuses(&self) {
        self.cache.kept.forget_all();
    }

    /// Whether the status cache serves and keeps entries (see
    /// [`crate::changes`]): off, every read goes to the database. Turning it
    /// on again should follow [`IntegrationsService::forget_all_statuses`].
    pub fn set_status_cache_live(&self, live: bool) {
        self.cache.kept.set_live(live);
    }

    /// Hits, misses and entries of the status cache; also exported as
    /// `integrations_status_cache_*` metrics.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.kept.stats()
    }
}
