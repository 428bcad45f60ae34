//! `status(user_id)`: the user's integrations without tokens, from a cache
//! with the seed's 5-minute TTL.
//!
//! The cache is quick_cache's (bounded, S3-FIFO eviction): a hit is a shard
//! read lock and one hash lookup, about four times cheaper than moka's,
//! which records every read for its eviction policy and does its
//! housekeeping on the reader's time (14% of the server's time on the cached
//! path; see BENCHMARKS.md). quick_cache has no TTL of its own: each entry
//! keeps when it was loaded, and one older than the TTL is a miss (its next
//! load replaces it, or newer entries evict it).
//!
//! Misses are loaded by loader tasks, several users per statement;
//! concurrent misses for one user share one load, and its error. Every
//! write for a user forgets that user's entry, and a load that overlapped a
//! write is not kept.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use db_pool::Conn;
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

/// A cache entry: the status and when it was loaded.
#[derive(Clone)]
struct Cached {
    status: Arc<UserStatus>,
    loaded_at: Instant,
}

/// The status cache and its loaders' queue, shared with the loader tasks.
pub(super) struct StatusCache {
    /// `None` when caching is off (capacity or TTL 0): every read loads.
    entries: Option<quick_cache::sync::Cache<String, Cached>>,
    ttl: Duration,
    hits: AtomicU64,
    loads: AtomicU64,
    /// Loads queued or running (see `load_status`).
    misses: Mutex<MissQueue>,
    /// Writes seen, by user hash: a load that overlapped a write for its
    /// user may have read the rows before it, and is not kept.
    writes: [AtomicU64; WRITE_STRIPES],
    /// The hit and miss counters' metric handles, looked up once (at first
    /// use, when the recorder is installed): `counter!` hashes its key on
    /// every call.
    handles: OnceLock<(metrics::Counter, metrics::Counter)>,
    /// Whether entries may be served and kept: false while the change feed
    /// is not connected (another instance's write would go unnoticed), so
    /// every read goes to the database.
    live: AtomicBool,
}

impl StatusCache {
    pub fn new(ttl: Duration, capacity: u64) -> StatusCache {
        StatusCache {
            entries: (capacity > 0 && !ttl.is_zero()).then(|| {
                quick_cache::sync::Cache::new(usize::try_from(capacity).unwrap_or(usize::MAX))
            }),
            ttl,
            hits: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            misses: Mutex::default(),
            writes: std::array::from_fn(|_| AtomicU64::new(0)),
            handles: OnceLock::new(),
            live: AtomicBool::new(true),
        }
    }

    /// The cached status of `user_id`, unless absent or older than the TTL
    /// (or the cache is not live).
    fn get(&self, user_id: &str) -> Option<Arc<UserStatus>> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        let cached = self.entries.as_ref()?.get(user_id)?;
        (cached.loaded_at.elapsed() < self.ttl).then_some(cached.status)
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

    fn lock(&self) -> std::sync::MutexGuard<'_, MissQueue> {
        self.misses.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The oldest queued loads that someone still waits for, up to
    /// [`MAX_BATCH`], as `(id, user_id)`; empty when there are none, and
    /// then `slot` is given back (under the same lock, so no load is queued
    /// with no loader left).
    fn take_batch(&self, slot: &mut LoaderSlot) -> Vec<(u64, String)> {
        let mut misses = self.lock();
        let misses = &mut *misses;
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH {
            let Some(id) = misses.queue.pop_front() else {
                break;
            };
            let Some(load) = misses.loads.get_mut(&id) else {
                continue;
            };
            load.waiters.retain(|w| !w.done.is_closed());
            if load.waiters.is_empty() {
                // Everyone who asked went away.
                misses.forget(id);
                continue;
            }
            load.taken = true;
            batch.push((id, load.user_id.clone()));
        }
        if batch.is_empty() {
            misses.loaders -= 1;
            slot.held = false;
        }
        batch
    }

    /// Gives `slot` back if no load is queued (under the lock, as in
    /// `take_batch`); whether it did.
    fn release_if_idle(&self, slot: &mut LoaderSlot) -> bool {
        let mut misses = self.lock();
        // Loads whose callers all went away do not count.
        let abandoned: Vec<u64> = misses
            .queue
            .iter()
            .copied()
            .filter(|id| {
                misses
                    .loads
                    .get(id)
                    .is_none_or(|load| load.waiters.iter().all(|w| w.done.is_closed()))
            })
            .collect();
        for id in abandoned {
            misses.queue.retain(|queued| *queued != id);
            misses.forget(id);
        }
        if !misses.queue.is_empty() {
            return false;
        }
        misses.loaders -= 1;
        slot.held = false;
        true
    }

    /// Gives each load's answer to everyone waiting for it, and keeps the
    /// statuses loaded with no write for their user since they were queued.
    fn answer(
        &self,
        answers: impl IntoIterator<Item = (u64, Result<Arc<UserStatus>, ServiceError>)>,
    ) {
        let done: Vec<_> = {
            let mut misses = self.lock();
            answers
                .into_iter()
                .filter_map(|(id, answer)| Some((misses.forget(id)?, answer)))
                .collect()
        };
        for (load, answer) in done {
            if let (Some(entries), Ok(status)) = (&self.entries, &answer) {
                let writes = self.writes(&load.user_id);
                if writes.load(Ordering::Acquire) == load.writes_seen
                    && self.live.load(Ordering::Acquire)
                {
                    let user_id = load.user_id.clone();
                    entries.insert(
                        user_id,
                        Cached {
                            status: status.clone(),
                            loaded_at: Instant::now(),
                        },
                    );
                    // Checked again after inserting: a write that counted
                    // itself in between may have removed the entry before
                    // it was there.
                    if writes.load(Ordering::Acquire) != load.writes_seen {
                        entries.remove(&load.user_id);
                    }
                }
            }
            for waiter in load.waiters {
                let _ = waiter.done.send(match &answer {
                    Ok(status) => Ok(status.clone()),
                    Err(e) => Err(e.shared()),
                });
            }
        }
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

/// A user's load, queued or running, and who waits for it.
struct Load {
    user_id: String,
    /// The user's write counter when the load was queued.
    writes_seen: u64,
    /// Whether a loader took it: its rows may have been read already.
    taken: bool,
    waiters: Vec<Waiter>,
}

/// A caller waiting for a load, since it asked.
struct Waiter {
    done: oneshot::Sender<Result<Arc<UserStatus>, ServiceError>>,
    since: Instant,
}

/// The loads and the loaders that run them.
#[derive(Default)]
struct MissQueue {
    /// Ids of the loads no loader took yet, oldest first.
    queue: VecDeque<u64>,
    /// Every load queued or running.
    loads: HashMap<u64, Load>,
    /// Each user's newest load, which later misses for the user join.
    by_user: HashMap<String, u64>,
    loaders: usize,
    next_id: u64,
}

impl MissQueue {
    /// Removes a load (answered, abandoned or timed out).
    fn forget(&mut self, id: u64) -> Option<Load> {
        let load = self.loads.remove(&id)?;
        if self.by_user.get(&load.user_id) == Some(&id) {
            self.by_user.remove(&load.user_id);
        }
        Some(load)
    }
}

/// A running loader's place in `loaders`, given back when it finds the
/// queue empty, or when the loader ends otherwise (a panic, the runtime
/// shutting down): waiters then start new loaders.
struct LoaderSlot {
    cache: Arc<StatusCache>,
    held: bool,
}

impl Drop for LoaderSlot {
    fn drop(&mut self) {
        if self.held {
            self.cache.lock().loaders -= 1;
        }
    }
}

/// A loader: takes a connection and loads queued misses, a batch at a
/// time, until none are left.
async fn run_loader(pool: db_pool::Pool, cache: Arc<StatusCache>) {
    let mut slot = LoaderSlot {
        cache: cache.clone(),
        held: true,
    };
    loop {
        let mut conn = match pool.get().await {
            Ok(conn) => conn,
            Err(db_pool::Error::PoolTimeout { .. }) => {
                // The pool stays busy: each caller gives up on its own
                // clock (see `load_status`); try again for the others.
                if cache.release_if_idle(&mut slot) {
                    return;
                }
                continue;
            }
            Err(e) => {
                // No connection (P1001...): the oldest waiters get the
                // error, then the next try serves the rest.
                let e = ServiceError::from(e);
                let batch = cache.take_batch(&mut slot);
                if batch.is_empty() {
                    return;
                }
                cache.answer(batch.into_iter().map(|(id, _)| (id, Err(e.shared()))));
                continue;
            }
        };
        loop {
            let batch = cache.take_batch(&mut slot);
            if batch.is_empty() {
                return;
            }
            match load_batch(&cache, &mut conn, batch, true).await {
                Loaded::Done => {}
                // The statement failed: go on with a connection checked
                // out anew (the pool drops this one if it is broken).
                Loaded::Failed => break,
                Loaded::Dead(batch) => {
                    if !reload_on_fresh(&pool, &cache, &mut conn, batch).await {
                        break;
                    }
                }
            }
        }
    }
}

/// Reads a batch whose connection was dead before any row came (its
/// backend terminated, the server restarted) again, each time on another
/// connection, up to [`super::READ_ATTEMPTS`] in all: one dead connection
/// does not fail a batch of callers. Every load is answered. Whether
/// `conn`, the last connection checked out, may serve the next batch.
async fn reload_on_fresh(
    pool: &db_pool::Pool,
    cache: &StatusCache,
    conn: &mut Conn,
    mut batch: Vec<(u64, String)>,
) -> bool {
    for attempt in 2..=super::READ_ATTEMPTS {
        // Answered if the loader stops while it waits for a connection.
        let guard = Taken {
            cache,
            ids: batch.iter().map(|(id, _)| *id).collect(),
        };
        let fresh = pool.get().await;
        guard.disarm();
        *conn = match fresh {
            Ok(fresh) => fresh,
            Err(e) => {
                let e = ServiceError::from(e);
                cache.answer(batch.iter().map(|(id, _)| (*id, Err(e.shared()))));
                return false;
            }
        };
        match load_batch(cache, conn, batch, attempt < super::READ_ATTEMPTS).await {
            Loaded::Done => return true,
            Loaded::Failed => return false,
            Loaded::Dead(again) => batch = again,
        }
    }
    // Only with READ_ATTEMPTS below 2: nothing tried, answer anyway.
    cache.answer(batch.iter().map(|(id, _)| (*id, Err(loader_stopped()))));
    false
}

/// Loads taken by a loader and not answered yet: if the loader stops
/// without answering them (a panic, its task dropped), their waiters get
/// an error instead of waiting for ever, and later misses do not join them.
struct Taken<'a> {
    cache: &'a StatusCache,
    ids: Vec<u64>,
}

impl Taken<'_> {
    /// Its loads are answered elsewhere.
    fn disarm(mut self) {
        self.ids.clear();
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            self.cache
                .answer(self.ids.drain(..).map(|id| (id, Err(loader_stopped()))));
        }
    }
}

/// How a batch's read went.
enum Loaded {
    /// Every load answered.
    Done,
    /// The statement failed; every load answered with the error.
    Failed,
    /// The connection was closed before any row came: nothing answered,
    /// the batch is given back to be read on another connection.
    Dead(Vec<(u64, String)>),
}

/// Loads a batch of misses in one statement and answers each, unless the
/// connection was dead before any row came and `may_retry`.
async fn load_batch(
    cache: &StatusCache,
    conn: &mut Conn,
    batch: Vec<(u64, String)>,
    may_retry: bool,
) -> Loaded {
    let mut taken = Taken {
        cache,
        ids: batch.iter().map(|(id, _)| *id).collect(),
    };
    let ids: Vec<&str> = batch.iter().map(|(_, user)| user.as_str()).collect();
    let mut answers = Vec::with_capacity(batch.len());
    let loaded = store::integrations::show_for_users(conn, &ids, |i, views| {
        let rendered = UserStatus::render(ids[i], views)
            .map(Arc::new)
            .map_err(|e| ServiceError::Internal(format!("rendering the status failed: {e}")));
        answers.push((batch[i].0, rendered));
    })
    .await;
    taken.ids.clear();
    match loaded {
        Ok(()) => {
            cache.answer(answers);
            Loaded::Done
        }
        Err(db_pool::Error::ConnectionClosed) if may_retry && answers.is_empty() => {
            Loaded::Dead(batch)
        }
        Err(e) => {
            let e = ServiceError::from(e);
            cache.answer(batch.iter().map(|(id, _)| (*id, Err(e.shared()))));
            Loaded::Failed
        }
    }
}

/// Cache counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that loaded from the database (concurrent misses count once).
    pub misses: u64,
    /// Users cached now (expired entries included until replaced or
    /// evicted).
    pub entries: u64,
}

impl IntegrationsService {
    /// The user's integrations, without tokens. Cached for
    /// `status_cache_ttl` (5 minutes by default).
    #[tracing::instrument(skip_all, fields(user_id = %user_id))]
    pub async fn status(&self, user_id: &UserId) -> Result<Arc<UserStatus>, ServiceError> {
        if let Some(hit) = self.cache.get(user_id.as_str()) {
            self.cache.hits.fetch_add(1, Ordering::Relaxed);
            self.cache.counters().0.increment(1);
            return Ok(hit);
        }
        self.load_status(user_id.as_str()).await
    }

    /// Reads a user's integrations and renders them, straight from the rows.
    ///
    /// Misses are loaded by loader tasks that drain one queue: a miss
    /// queues a load and waits for its answer, or joins the user's load
    /// already queued (or running, when no write for the user came since it
    /// was queued). A loader takes up to [`MAX_BATCH`] queued loads at a
    /// time and reads them in one statement, until the queue is empty. A
    /// miss starts a loader when none runs, or when the queue holds more
    /// than a full batch for each (at most half of `connection_limit`,
    /// rounded up, leaving the rest to refreshes and writes): under load, a
    /// few batches cost the server and PostgreSQL far less than one round
    /// trip per user (see BENCHMARKS.md). A lone miss is loaded alone, at
    /// once: nothing waits to fill a batch. Loaders are tasks of their own,
    /// so a caller that goes away never cancels a read (or a connection
    /// being opened) that others wait for.
    async fn load_status(&self, user_id: &str) -> Result<Arc<UserStatus>, ServiceError> {
        let cache = &self.cache;
        let config = self.pool.config();
        let max_loaders = config.connection_limit.div_ceil(2);
        let (done, mut answer) = oneshot::channel();
        let since = Instant::now();
        let id = {
            let mut misses = cache.lock();
            let writes_now = cache.writes(user_id).load(Ordering::Acquire);
            let joinable = misses.by_user.get(user_id).copied().filter(|id| {
                misses
                    .loads
                    .get(id)
                    .is_some_and(|load| !load.taken || load.writes_seen == writes_now)
            });
            match joinable.and_then(|id| Some((id, misses.loads.get_mut(&id)?))) {
                Some((id, load)) => {
                    if !load.taken {
                        // Its rows are not read yet: they will show every
                        // write counted so far, and may be kept.
                        load.writes_seen = writes_now;
                    }
                    load.waiters.push(Waiter { done, since });
                    id
                }
                None => {
                    cache.loads.fetch_add(1, Ordering::Relaxed);
                    cache.counters().1.increment(1);
                    misses.next_id += 1;
                    let id = misses.next_id;
                    misses.loads.insert(
                        id,
                        Load {
                            user_id: user_id.to_string(),
                            writes_seen: writes_now,
                            taken: false,
                            waiters: vec![Waiter { done, since }],
                        },
                    );
                    misses.by_user.insert(user_id.to_string(), id);
                    misses.queue.push_back(id);
                    if misses.loaders == 0
                        || (misses.loaders < max_loaders
                            && misses.queue.len() > misses.loaders * MAX_BATCH)
                    {
                        misses.loaders += 1;
                        self.start_loader();
                    }
                    id
                }
            }
        };
        loop {
            if let Ok(loaded) = tokio::time::timeout(LOADER_PATIENCE, &mut answer).await {
                return loaded.unwrap_or_else(|_| Err(loader_stopped()));
            }
            // Not answered yet. Not taken either: the loaders are slow (a
            // long query, a lock): another loader, if the pool has room;
            // once this caller has waited pool_timeout, the pool's own error
            // for it and every caller of the load who waited as long (those
            // who came later wait their own time).
            let gave_up = {
                let mut misses = cache.lock();
                let queued = misses.queue.len();
                match misses.loads.get_mut(&id) {
                    // Taken (its loader answers; socket_timeout bounds
                    // that), or answered meanwhile.
                    None => None,
                    Some(load) if load.taken => None,
                    Some(load)
                        if config
                            .pool_timeout
                            .is_some_and(|limit| since.elapsed() >= limit) =>
                    {
                        let limit = config.pool_timeout.unwrap_or_default();
                        let (expired, waiting): (Vec<_>, Vec<_>) =
                            std::mem::take(&mut load.waiters)
                                .into_iter()
                                .partition(|w| w.since.elapsed() >= limit);
                        load.waiters = waiting;
                        if load.waiters.is_empty() {
                            misses.queue.retain(|queued| *queued != id);
                            misses.forget(id);
                        }
                        Some((expired, queued))
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
            if let Some((expired, queued)) = gave_up {
                let e = ServiceError::from(self.pool.gave_up_waiting(queued));
                for waiter in expired {
                    let _ = waiter.done.send(Err(e.shared()));
                }
            }
            return answer.await.unwrap_or_else(|_| Err(loader_stopped()));
        }
    }

    fn start_loader(&self) {
        tokio::spawn(run_loader(self.pool.clone(), self.cache.clone()));
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
        // Counted with the cache off too: a later miss must not join a load
        // that may have read the rows before this write.
        self.cache.writes(user_id).fetch_add(1, Ordering::Release);
        if let Some(entries) = &self.cache.entries {
            entries.remove(user_id);
        }
    }

    /// Forgets every user's cached status (the change feed lost
    /// notifications, or a write named no user). Loads in flight are not
    /// kept.
    pub fn forget_all_statuses(&self) {
        for stripe in &self.cache.writes {
            stripe.fetch_add(1, Ordering::Release);
        }
        if let Some(entries) = &self.cache.entries {
            entries.clear();
        }
    }

    /// Whether the status cache serves and keeps entries (see
    /// [`crate::changes`]): off, every read goes to the database. Turning it
    /// on again should follow [`IntegrationsService::forget_all_statuses`].
    pub fn set_status_cache_live(&self, live: bool) {
        self.cache.live.store(live, Ordering::Release);
    }

    /// Hits, misses and entries of the status cache; also exported as
    /// `integrations_status_cache_*` metrics.
    pub fn cache_stats(&self) -> CacheStats {
        let entries = self
            .cache
            .entries
            .as_ref()
            .map_or(0, |entries| entries.len() as u64);
        metrics::gauge!("integrations_status_cache_entries").set(entries as f64);
        CacheStats {
            hits: self.cache.hits.load(Ordering::Relaxed),
            misses: self.cache.loads.load(Ordering::Relaxed),
            entries,
        }
    }
}
