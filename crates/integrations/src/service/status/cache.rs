//! What is kept: users' statuses with the seed's 5-minute TTL, forgotten on
//! every write, and the hit and miss counters.
//!
//! The entries are quick_cache's (bounded, S3-FIFO eviction): a hit is a
//! shard read lock and one hash lookup, about four times cheaper than
//! moka's, which records every read for its eviction policy and does its
//! housekeeping on the reader's time (14% of the server's time on the cached
//! path; see BENCHMARKS.md). quick_cache has no TTL of its own: each entry
//! keeps when it was loaded, and one older than the TTL is a miss (its next
//! load replaces it, or newer entries evict it).
//!
//! A load may read a user's rows before a write and finish after the write
//! forgot the user's entry. So every write is counted, by user, and a load
//! is kept only if no write for its user was counted since its
//! [`WriteMark`] was taken ([`Cache::keep`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::UserStatus;

/// Stripes of the write counters that detect a load overlapping a write.
const WRITE_STRIPES: usize = 64;

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

/// The writes counted for a user (its stripe) at some moment: a load that
/// started then may be kept only while the count is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WriteMark(u64);

/// A cache entry: the status and when it was loaded.
#[derive(Clone)]
struct Cached {
    status: Arc<UserStatus>,
    loaded_at: Instant,
}

/// The kept statuses, their TTL, the write counters that invalidate them,
/// and the counters of hits and misses.
pub(super) struct Cache {
    /// `None` when caching is off (capacity or TTL 0): every read loads.
    entries: Option<quick_cache::sync::Cache<String, Cached>>,
    ttl: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Writes seen, by user hash (see [`WriteMark`]).
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

impl Cache {
    /// A cache of at most `capacity` users, each kept for `ttl`; off (every
    /// read misses, nothing is kept) when either is 0.
    pub fn new(ttl: Duration, capacity: u64) -> Cache {
        Cache {
            entries: (capacity > 0 && !ttl.is_zero()).then(|| {
                quick_cache::sync::Cache::new(usize::try_from(capacity).unwrap_or(usize::MAX))
            }),
            ttl,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            writes: std::array::from_fn(|_| AtomicU64::new(0)),
            handles: OnceLock::new(),
            live: AtomicBool::new(true),
        }
    }

    /// The cached status of `user_id`, counted as a hit, unless absent or
    /// older than the TTL (or the cache is not live).
    pub fn get(&self, user_id: &str) -> Option<Arc<UserStatus>> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        let cached = self.entries.as_ref()?.get(user_id)?;
        if cached.loaded_at.elapsed() >= self.ttl {
            return None;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.counters().0.increment(1);
        Some(cached.status)
    }

    /// Counts a miss: a load from the database started (misses that join a
    /// load already started do not count).
    pub fn count_miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.counters().1.increment(1);
    }

    /// The writes counted for `user_id` so far: take it before the user's
    /// rows are read, and give it to [`Cache::keep`] with what was read.
    pub fn mark(&self, user_id: &str) -> WriteMark {
        WriteMark(self.writes(user_id).load(Ordering::Acquire))
    }

    /// Keeps a status loaded for `user_id`, unless a write for the user was
    /// counted since `mark` (the rows may predate it) or the cache is off or
    /// not live.
    pub fn keep(&self, user_id: &str, mark: WriteMark, status: &Arc<UserStatus>) {
        let Some(entries) = &self.entries else {
            return;
        };
        let writes = self.writes(user_id);
        if writes.load(Ordering::Acquire) != mark.0 || !self.live.load(Ordering::Acquire) {
            return;
        }
        entries.insert(
            user_id.to_string(),
            Cached {
                status: status.clone(),
                loaded_at: Instant::now(),
            },
        );
        // Checked again after inserting: a write that counted itself in
        // between may have removed the entry before it was there.
        if writes.load(Ordering::Acquire) != mark.0 {
            entries.remove(user_id);
        }
    }

    /// Forgets `user_id`'s entry after a write for the user; loads that
    /// overlapped the write are not kept.
    pub fn forget(&self, user_id: &str) {
        // Counted with the cache off too: the loader must not let a later
        // miss join a load that may have read the rows before this write.
        self.writes(user_id).fetch_add(1, Ordering::Release);
        if let Some(entries) = &self.entries {
            entries.remove(user_id);
        }
    }

    /// Forgets every entry; no load in flight is kept.
    pub fn forget_all(&self) {
        for stripe in &self.writes {
            stripe.fetch_add(1, Ordering::Release);
        }
        if let Some(entries) = &self.entries {
            entries.clear();
        }
    }

    /// Whether entries are served and kept.
    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Release);
    }

    /// The counters, and the number of entries (also set as the
    /// `integrations_status_cache_entries` gauge).
    pub fn stats(&self) -> CacheStats {
        let entries = self
            .entries
            .as_ref()
            .map_or(0, |entries| entries.len() as u64);
        metrics::gauge!("integrations_status_cache_entries").set(entries as f64);
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries,
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
