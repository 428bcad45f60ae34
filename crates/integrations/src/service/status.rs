//! `status(user_id)`: the user's integrations without tokens, from a cache
//! with the seed's 5-minute TTL.
//!
//! Built on moka: bounded, and concurrent misses for one user run one load
//! (`try_get_with`). Every write for a user invalidates that user's entry.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use db_pool::Conn;
use moka::future::Cache;
use tokio::sync::oneshot;

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

pub(super) struct StatusCache {
    /// `None` when caching is off (capacity or TTL 0): every read loads.
    cache: Option<Cache<String, Arc<UserStatus>>>,
    hits: AtomicU64,
    loads: AtomicU64,
    /// Misses waiting to be loaded (see `load_status`).
    misses: Arc<Misses>,
    /// Writes seen, by user hash: a load that overlapped a write for its
    /// user may have read the rows before it, and moka's `invalidate` does
    /// not stop such a load from inserting afterwards.
    writes: [AtomicU64; WRITE_STRIPES],
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
            misses: Arc::default(),
            writes: std::array::from_fn(|_| AtomicU64::new(0)),
            handles: OnceLock::new(),
        }
    }

    /// The write counter of `user_id`'s stripe.
    fn writes(&self, user_id: &str) -> &AtomicU64 {
        let hash = user_id.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        &self.writes[hash % WRITE_STRIPES]
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

/// Stripes of the write counters that detect a load overlapping a write.
const WRITE_STRIPES: usize = 64;

/// Most users loaded in one statement.
pub const MAX_BATCH: usize = 16;

/// How long a queued miss waits for a loader to take it before it starts
/// another (when the pool has room): long enough that a busy loader's next
/// batch usually takes it, short enough that a loader stuck on a slow
/// query holds nobody else back for long.
const LOADER_PATIENCE: Duration = Duration::from_millis(20);

fn loader_stopped() -> ServiceError {
    ServiceError::Internal("the status loader stopped before answering".into())
}

/// A miss waiting to be loaded, and where its answer goes.
struct Pending {
    id: u64,
    user_id: String,
    done: oneshot::Sender<Result<Arc<UserStatus>, ServiceError>>,
}

/// The misses queue and how many loaders drain it.
#[derive(Default)]
struct Misses {
    state: Mutex<MissQueue>,
}

#[derive(Default)]
struct MissQueue {
    queue: VecDeque<Pending>,
    loaders: usize,
    next_id: u64,
}

impl Misses {
    fn lock(&self) -> std::sync::MutexGuard<'_, MissQueue> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The oldest misses whose callers still wait, up to [`MAX_BATCH`];
    /// empty when there are none, and then `slot` is given back (under the
    /// same lock, so no miss is queued with no loader left).
    fn take_batch(&self, slot: &mut LoaderSlot) -> Vec<Pending> {
        let mut misses = self.lock();
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH {
            match misses.queue.pop_front() {
                Some(pending) if pending.done.is_closed() => {}
                Some(pending) => batch.push(pending),
                None => break,
            }
        }
        if batch.is_empty() {
            misses.loaders -= 1;
            slot.held = false;
        }
        batch
    }
}

/// A running loader's place in `loaders`, given back when it finds the
/// queue empty, or when the loader ends otherwise (a panic, the runtime
/// shutting down): waiters then start new loaders.
struct LoaderSlot {
    misses: Arc<Misses>,
    held: bool,
}

impl Drop for LoaderSlot {
    fn drop(&mut self) {
        if self.held {
            self.misses.lock().loaders -= 1;
        }
    }
}

/// A loader: takes a connection and loads queued misses, a batch at a
/// time, until none are left.
async fn run_loader(pool: db_pool::Pool, misses: Arc<Misses>) {
    let mut slot = LoaderSlot {
        misses: misses.clone(),
        held: true,
    };
    loop {
        let mut conn = match pool.get().await {
            Ok(conn) => conn,
            Err(e) => {
                // No connection (P2024, P1001...): the oldest waiters get
                // the error, then the next try serves the rest.
                let e = ServiceError::from(e);
                let batch = misses.take_batch(&mut slot);
                if batch.is_empty() {
                    return;
                }
                for pending in batch {
                    let _ = pending.done.send(Err(e.shared()));
                }
                continue;
            }
        };
        loop {
            let batch = misses.take_batch(&mut slot);
            if batch.is_empty() {
                return;
            }
            if !load_batch(&mut conn, batch).await {
                // The connection failed: go on with another one.
                break;
            }
        }
    }
}

/// Loads a batch of misses in one statement and answers each. `false` when
/// the statement failed (every caller then gets its error, and the loader
/// goes on with a connection checked out anew).
async fn load_batch(conn: &mut Conn, batch: Vec<Pending>) -> bool {
    let (users, mut waiting): (Vec<String>, Vec<_>) =
        batch.into_iter().map(|p| (p.user_id, Some(p.done))).unzip();
    let ids: Vec<&str> = users.iter().map(String::as_str).collect();
    let loaded = store::integrations::show_for_users(conn, &ids, |i, views| {
        let result = UserStatus::render(ids[i], views)
            .map(Arc::new)
            .map_err(|e| ServiceError::Internal(format!("rendering the status failed: {e}")));
        // Its caller may have gone: nothing to answer then.
        if let Some(done) = waiting[i].take() {
            let _ = done.send(result);
        }
    })
    .await;
    let Err(e) = loaded else {
        return true;
    };
    let e = ServiceError::from(e);
    for done in waiting.into_iter().flatten() {
        let _ = done.send(Err(e.shared()));
    }
    false
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
        let writes = cache.writes(user_id.as_str());
        let before = writes.load(Ordering::Acquire);
        let loaded = entries
            .try_get_with(user_id.as_str().to_string(), load)
            .await
            .map_err(|shared| shared.shared());
        if writes.load(Ordering::Acquire) != before {
            // A write for this user (or one sharing its stripe) overlapped
            // the load: what was cached may predate it.
            entries.invalidate(user_id.as_str()).await;
        }
        loaded
    }

    /// Reads a user's integrations and renders them, straight from the rows.
    ///
    /// Misses are loaded by loader tasks that drain one queue: a miss
    /// queues itself and waits for its answer. A loader takes up to
    /// [`MAX_BATCH`] queued users at a time and reads them in one
    /// statement, until the queue is empty. A miss starts a loader when
    /// none runs, or when the queue holds more than a full batch for each
    /// (at most half of `connection_limit`, rounded up, leaving the rest to
    /// refreshes and writes): under load, a few batches cost the server and
    /// PostgreSQL far less than one round trip per user (see
    /// BENCHMARKS.md). A lone miss is
    /// loaded alone, at once: nothing waits to fill a batch. Loaders are
    /// tasks of their own, so a caller that goes away never cancels a read
    /// (or a connection being opened) that others wait for.
    async fn load_status(&self, user_id: &str) -> Result<Arc<UserStatus>, ServiceError> {
        self.cache.loads.fetch_add(1, Ordering::Relaxed);
        self.cache.counters().1.increment(1);
        let config = self.pool.config();
        let max_loaders = config.connection_limit.div_ceil(2);
        let queued_at = Instant::now();
        let (done, mut answer) = oneshot::channel();
        let id = {
            let mut misses = self.cache.misses.lock();
            misses.next_id += 1;
            let id = misses.next_id;
            misses.queue.push_back(Pending {
                id,
                user_id: user_id.to_string(),
                done,
            });
            if misses.loaders == 0
                || (misses.loaders < max_loaders
                    && misses.queue.len() > misses.loaders * MAX_BATCH)
            {
                misses.loaders += 1;
                self.start_loader();
            }
            id
        };
        loop {
            if let Ok(loaded) = tokio::time::timeout(LOADER_PATIENCE, &mut answer).await {
                return loaded.unwrap_or_else(|_| Err(loader_stopped()));
            }
            // Not taken yet: the loaders are slow (a long query, a lock).
            // Another loader, if the pool has room; past pool_timeout, the
            // pool's own error.
            let timed_out = {
                let mut misses = self.cache.misses.lock();
                match misses.queue.iter().position(|p| p.id == id) {
                    // Taken: its loader answers (socket_timeout bounds that).
                    None => None,
                    Some(at)
                        if config
                            .pool_timeout
                            .is_some_and(|limit| queued_at.elapsed() >= limit) =>
                    {
                        misses.queue.remove(at);
                        Some(misses.queue.len() + 1)
                    }
                    Some(_) => {
                        if misses.loaders < max_loaders {
                            misses.loaders += 1;
                            self.start_loader();
                        }
                        continue;
                    }
                }
            };
            let Some(queued) = timed_out else {
                return answer.await.unwrap_or_else(|_| Err(loader_stopped()));
            };
            return Err(self.pool.gave_up_waiting(queued).into());
        }
    }

    fn start_loader(&self) {
        tokio::spawn(run_loader(self.pool.clone(), self.cache.misses.clone()));
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
            self.cache.writes(user_id).fetch_add(1, Ordering::Release);
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
