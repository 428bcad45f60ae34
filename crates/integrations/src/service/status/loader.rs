//! How misses are read: one queue, loader tasks that read it in batches of
//! up to [`MAX_BATCH`] users per statement, one load per user for every
//! caller that misses at once (its error included), and each caller's
//! deadline.
//!
//! A miss queues a load and waits for its answer, or joins the user's load
//! already queued (or running, when no write for the user came since it was
//! queued). A loader takes up to [`MAX_BATCH`] queued loads at a time and
//! reads them in one statement, until the queue is empty. A miss starts a
//! loader when none runs, or when the queue holds more than a full batch
//! for each (at most half of `connection_limit`, rounded up, leaving the
//! rest to refreshes and writes): under load, a few batches cost the server
//! and PostgreSQL far less than one round trip per user (see
//! BENCHMARKS.md). A lone miss is loaded alone, at once: nothing waits to
//! fill a batch. Loaders are tasks of their own, so a caller that goes away
//! never cancels a read (or a connection being opened) that others wait
//! for.
//!
//! Deadlines: a caller whose load no loader took within
//! [`LOADER_PATIENCE`] starts another loader (if the pool has room); one
//! that waited `pool_timeout` for its load to be taken gets the pool's own
//! P2024, as if it had waited in the pool. A load taken is answered by its
//! loader (`socket_timeout` bounds the read).
//!
//! The loader uses two things of the cache: a user's [`WriteMark`], taken
//! when the user's load is queued (or joined before it is taken), and
//! [`Cache::keep`] with what was read.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use db_pool::{Conn, Pool};
use tokio::sync::oneshot;

use super::cache::{Cache, WriteMark};
use super::UserStatus;
use crate::service::{ServiceError, READ_ATTEMPTS};
use crate::store;

/// Most users loaded in one statement.
pub const MAX_BATCH: usize = 16;

/// How long a queued miss waits for a loader to take it before it starts
/// another (when the pool has room): long enough that a busy loader's next
/// batch usually takes it, short enough that a loader stuck on a slow
/// query holds nobody else back for long.
const LOADER_PATIENCE: Duration = Duration::from_millis(20);

/// What a load answers.
type Answer = Result<Arc<UserStatus>, ServiceError>;

/// The status loader: its queue, shared with the loader tasks.
pub(super) struct Loader {
    shared: Arc<Shared>,
}

impl Loader {
    /// A loader that keeps what it reads in `cache`.
    pub fn new(cache: Arc<Cache>) -> Loader {
        Loader {
            shared: Arc::new(Shared {
                cache,
                queue: Mutex::default(),
            }),
        }
    }

    /// `user_id`'s status read from the database through `pool` (and kept
    /// in the cache, unless a write for the user overlapped the read).
    pub async fn load(&self, pool: &Pool, user_id: &str) -> Answer {
        let config = pool.config();
        let max_loaders = config.connection_limit.div_ceil(2);
        let (done, mut answer) = oneshot::channel();
        let since = Instant::now();
        let queued = self.shared.lock().enqueue(
            &self.shared.cache,
            user_id,
            Waiter { done, since },
            max_loaders,
        );
        let (id, start) = match queued {
            Enqueued::Kept(status) => return Ok(status),
            Enqueued::Queued { id, start } => (id, start),
        };
        if start {
            self.start_loader(pool);
        }
        loop {
            if let Ok(loaded) = tokio::time::timeout(LOADER_PATIENCE, &mut answer).await {
                return loaded.unwrap_or_else(|_| Err(loader_stopped()));
            }
            // Not answered yet.
            let lapsed = self
                .shared
                .lock()
                .lapsed(id, since, config.pool_timeout, max_loaders);
            match lapsed {
                Lapsed::Taken => break,
                Lapsed::Queued { start } => {
                    if start {
                        self.start_loader(pool);
                    }
                }
                Lapsed::Expired { expired, queued } => {
                    let e = ServiceError::from(pool.gave_up_waiting(queued));
                    for waiter in expired {
                        let _ = waiter.done.send(Err(e.shared()));
                    }
                    break;
                }
            }
        }
        answer.await.unwrap_or_else(|_| Err(loader_stopped()))
    }

    /// Starts a loader task in the place reserved for it in the queue.
    fn start_loader(&self, pool: &Pool) {
        let slot = LoaderSlot {
            shared: self.shared.clone(),
            held: true,
        };
        tokio::spawn(run_loader(pool.clone(), slot));
    }
}

fn loader_stopped() -> ServiceError {
    ServiceError::Internal("the status loader stopped before answering".into())
}

/// The cache the loads go to, and the queue.
struct Shared {
    cache: Arc<Cache>,
    queue: Mutex<MissQueue>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, MissQueue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The oldest queued loads that someone still waits for, up to
    /// [`MAX_BATCH`], as `(id, user_id)`; empty when there are none, and
    /// then `slot` is given back (under the same lock, so no load is queued
    /// with no loader left).
    fn take_batch(&self, slot: &mut LoaderSlot) -> Vec<(u64, String)> {
        let mut queue = self.lock();
        let queue = &mut *queue;
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH {
            let Some(id) = queue.queue.pop_front() else {
                break;
            };
            let Some(load) = queue.loads.get_mut(&id) else {
                continue;
            };
            load.waiters.retain(|w| !w.done.is_closed());
            if load.waiters.is_empty() {
                // Everyone who asked went away.
                queue.forget(id);
                continue;
            }
            load.taken = true;
            batch.push((id, load.user_id.clone()));
        }
        if batch.is_empty() {
            queue.loaders -= 1;
            slot.held = false;
        }
        batch
    }

    /// Gives `slot` back if no load is queued (under the lock, as in
    /// `take_batch`); whether it did.
    fn release_if_idle(&self, slot: &mut LoaderSlot) -> bool {
        let mut queue = self.lock();
        // Loads whose callers all went away do not count.
        let abandoned: Vec<u64> = queue
            .queue
            .iter()
            .copied()
            .filter(|id| {
                queue
                    .loads
                    .get(id)
                    .is_none_or(|load| load.waiters.iter().all(|w| w.done.is_closed()))
            })
            .collect();
        for id in abandoned {
            queue.queue.retain(|queued| *queued != id);
            queue.forget(id);
        }
        if !queue.queue.is_empty() {
            return false;
        }
        queue.loaders -= 1;
        slot.held = false;
        true
    }

    /// Gives each load's answer to everyone waiting for it, and keeps the
    /// statuses loaded in the cache (which keeps those with no write for
    /// their user since their mark). A status is kept before its load
    /// leaves the queue, under the queue's lock, so a miss for the user
    /// finds one or the other (see [`MissQueue::enqueue`]), never neither.
    fn answer(&self, answers: impl IntoIterator<Item = (u64, Answer)>) {
        let done: Vec<_> = {
            let mut queue = self.lock();
            answers
                .into_iter()
                .filter_map(|(id, answer)| {
                    let load = queue.loads.get(&id)?;
                    if let Ok(status) = &answer {
                        self.cache.keep(&load.user_id, load.mark, status);
                    }
                    Some((queue.forget(id)?, answer))
                })
                .collect()
        };
        for (load, answer) in done {
            for waiter in load.waiters {
                let _ = waiter.done.send(match &answer {
                    Ok(status) => Ok(status.clone()),
                    Err(e) => Err(e.shared()),
                });
            }
        }
    }
}

/// A user's load, queued or running, and who waits for it.
struct Load {
    user_id: String,
    /// The user's writes when the load was queued (or last joined before a
    /// loader took it).
    mark: WriteMark,
    /// Whether a loader took it: its rows may have been read already.
    taken: bool,
    waiters: Vec<Waiter>,
}

/// A caller waiting for a load, since it asked.
struct Waiter {
    done: oneshot::Sender<Answer>,
    since: Instant,
}

/// What a miss became.
enum Enqueued {
    /// The user's status was kept meanwhile (a load answered between the
    /// caller's look in the cache and its turn in the queue).
    Kept(Arc<UserStatus>),
    /// The load's id, and whether a place for a new loader was reserved.
    Queued { id: u64, start: bool },
}

/// What became of a load whose caller waited [`LOADER_PATIENCE`] more.
enum Lapsed {
    /// Taken by a loader (which answers it), or answered meanwhile.
    Taken,
    /// Still queued; `start`: a place for another loader was reserved.
    Queued { start: bool },
    /// Still queued after the caller waited `pool_timeout`: the waiters who
    /// waited as long, taken off the load (it stays queued for the others,
    /// if any), and the number of loads that were queued.
    Expired { expired: Vec<Waiter>, queued: usize },
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
    /// The user's status if the cache has kept it since the caller looked
    /// (loads are kept under this lock); else joins `user_id`'s load if it
    /// may serve `waiter` (not taken yet, or taken with no write for the
    /// user since), or queues a new one (counted as a miss), reserving a
    /// place for a new loader when the module's documentation says so.
    fn enqueue(
        &mut self,
        cache: &Cache,
        user_id: &str,
        waiter: Waiter,
        max_loaders: usize,
    ) -> Enqueued {
        if let Some(status) = cache.get(user_id) {
            return Enqueued::Kept(status);
        }
        let mark = cache.mark(user_id);
        let joinable = self.by_user.get(user_id).copied().filter(|id| {
            self.loads
                .get(id)
                .is_some_and(|load| !load.taken || load.mark == mark)
        });
        if let Some((id, load)) = joinable.and_then(|id| Some((id, self.loads.get_mut(&id)?))) {
            if !load.taken {
                // Its rows are not read yet: they will show every write
                // counted so far, and may be kept.
                load.mark = mark;
            }
            load.waiters.push(waiter);
            return Enqueued::Queued { id, start: false };
        }
        cache.count_miss();
        self.next_id += 1;
        let id = self.next_id;
        self.loads.insert(
            id,
            Load {
                user_id: user_id.to_string(),
                mark,
                taken: false,
                waiters: vec![waiter],
            },
        );
        self.by_user.insert(user_id.to_string(), id);
        self.queue.push_back(id);
        let start = self.loaders == 0
            || (self.loaders < max_loaders && self.queue.len() > self.loaders * MAX_BATCH);
        if start {
            self.loaders += 1;
        }
        Enqueued::Queued { id, start }
    }

    /// Load `id`, not answered after its caller (asking `since`) waited
    /// [`LOADER_PATIENCE`] more. Not taken either: the loaders are slow (a
    /// long query, a lock): another loader, if the pool has room; once this
    /// caller has waited `pool_timeout`, the pool's own error for it and
    /// every caller of the load who waited as long (those who came later
    /// wait their own time).
    fn lapsed(
        &mut self,
        id: u64,
        since: Instant,
        pool_timeout: Option<Duration>,
        max_loaders: usize,
    ) -> Lapsed {
        let queued = self.queue.len();
        let Some(load) = self.loads.get_mut(&id) else {
            return Lapsed::Taken;
        };
        if load.taken {
            // Its loader answers; socket_timeout bounds that.
            return Lapsed::Taken;
        }
        match pool_timeout {
            Some(limit) if since.elapsed() >= limit => {
                let (expired, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut load.waiters)
                    .into_iter()
                    .partition(|w| w.since.elapsed() >= limit);
                load.waiters = waiting;
                if load.waiters.is_empty() {
                    self.queue.retain(|queued| *queued != id);
                    self.forget(id);
                }
                Lapsed::Expired { expired, queued }
            }
            _ => {
                let start = self.loaders < max_loaders;
                if start {
                    self.loaders += 1;
                }
                Lapsed::Queued { start }
            }
        }
    }

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
/// shutting down, its task dropped before it ran): waiters then start new
/// loaders.
struct LoaderSlot {
    shared: Arc<Shared>,
    held: bool,
}

impl Drop for LoaderSlot {
    fn drop(&mut self) {
        if self.held {
            self.shared.lock().loaders -= 1;
        }
    }
}

/// A loader: takes a connection and loads queued misses, a batch at a
/// time, until none are left.
async fn run_loader(pool: Pool, mut slot: LoaderSlot) {
    let shared = slot.shared.clone();
    loop {
        let mut conn = match pool.get().await {
            Ok(conn) => conn,
            Err(db_pool::Error::PoolTimeout { .. }) => {
                // The pool stays busy: each caller gives up on its own
                // clock (see `Loader::load`); try again for the others.
                if shared.release_if_idle(&mut slot) {
                    return;
                }
                continue;
            }
            Err(e) => {
                // No connection (P1001...): the oldest waiters get the
                // error, then the next try serves the rest.
                let e = ServiceError::from(e);
                let batch = shared.take_batch(&mut slot);
                if batch.is_empty() {
                    return;
                }
                shared.answer(batch.into_iter().map(|(id, _)| (id, Err(e.shared()))));
                continue;
            }
        };
        loop {
            let batch = shared.take_batch(&mut slot);
            if batch.is_empty() {
                return;
            }
            match load_batch(&shared, &mut conn, batch, true).await {
                // Let the callers just answered (and the requests waiting
                // to be read) run before the next batch is taken: under load
                // the next batch is then fuller, one statement for more
                // users (about 5% more reads per second with four instances
                // on two cores, BENCHMARKS.md); when idle it costs one
                // reschedule.
                Loaded::Done => tokio::task::yield_now().await,
                // The statement failed: go on with a connection checked
                // out anew (the pool drops this one if it is broken).
                Loaded::Failed => break,
                Loaded::Dead(batch) => {
                    if !reload_on_fresh(&pool, &shared, &mut conn, batch).await {
                        break;
                    }
                }
            }
        }
    }
}

/// Reads a batch whose connection was dead before any row came (its
/// backend terminated, the server restarted) again, each time on another
/// connection, up to [`READ_ATTEMPTS`] in all: one dead connection does not
/// fail a batch of callers. Every load is answered. Whether `conn`, the
/// last connection checked out, may serve the next batch.
async fn reload_on_fresh(
    pool: &Pool,
    shared: &Shared,
    conn: &mut Conn,
    mut batch: Vec<(u64, String)>,
) -> bool {
    for attempt in 2..=READ_ATTEMPTS {
        // Answered if the loader stops while it waits for a connection.
        let guard = Taken {
            shared,
            ids: batch.iter().map(|(id, _)| *id).collect(),
        };
        let fresh = pool.get().await;
        guard.disarm();
        *conn = match fresh {
            Ok(fresh) => fresh,
            Err(e) => {
                let e = ServiceError::from(e);
                shared.answer(batch.iter().map(|(id, _)| (*id, Err(e.shared()))));
                return false;
            }
        };
        match load_batch(shared, conn, batch, attempt < READ_ATTEMPTS).await {
            Loaded::Done => return true,
            Loaded::Failed => return false,
            Loaded::Dead(again) => batch = again,
        }
    }
    // Only with READ_ATTEMPTS below 2: nothing tried, answer anyway.
    shared.answer(batch.iter().map(|(id, _)| (*id, Err(loader_stopped()))));
    false
}

/// Loads taken by a loader and not answered yet: if the loader stops
/// without answering them (a panic, its task dropped), their waiters get
/// an error instead of waiting for ever, and later misses do not join them.
struct Taken<'a> {
    shared: &'a Shared,
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
            self.shared
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
    shared: &Shared,
    conn: &mut Conn,
    batch: Vec<(u64, String)>,
    may_retry: bool,
) -> Loaded {
    let mut taken = Taken {
        shared,
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
            shared.answer(answers);
            Loaded::Done
        }
        Err(db_pool::Error::ConnectionClosed) if may_retry && answers.is_empty() => {
            Loaded::Dead(batch)
        }
        Err(e) => {
            let e = ServiceError::from(e);
            shared.answer(batch.iter().map(|(id, _)| (*id, Err(e.shared()))));
            Loaded::Failed
        }
    }
}
