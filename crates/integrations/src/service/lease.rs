//! The refresh lease: who refreshes an integration, in this process and
//! across instances. Single refresh, batch refresh and the background
//! refresher all go through here.
//!
//! Two levels. In this process, every task that refreshes an integration
//! first takes its [`Flight`]'s lock. Across processes, the instance that
//! claims the row's lease (one conditional UPDATE; the SQL lives in
//! `store/integrations.rs`, the lease condition written once there)
//! refreshes; the others wait until the row's refresh generation moves and
//! take that result. A lease expires by itself if its holder dies, and is
//! given back by the statement that stores the result (or by
//! [`IntegrationsService::release`] when there is none).
//!
//! The interface: [`IntegrationsService::lease_after`] (claim now, or wait
//! for the holder), [`IntegrationsService::claim_batch`] and
//! [`IntegrationsService::claim_due`] (claim ahead, giving
//! [`PendingLease`]s), [`IntegrationsService::take_turn`] (use a pending
//! lease: renewed if old), [`Lease::finish`] and
//! [`IntegrationsService::release`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::OwnedMutexGuard;

use super::{IntegrationsService, ServiceError};
use crate::store::integrations::{self as rows, Claimed};

/// How often a caller waiting for another instance's refresh looks again.
const WAIT_POLL: Duration = Duration::from_millis(50);

/// The single-flight locks, by (provider, account_id); entries die with
/// their last user.
pub(super) type Flights = HashMap<(String, String), Weak<Flight>>;

/// One integration's single flight in this process.
#[derive(Default)]
pub(super) struct Flight {
    /// Held by whoever refreshes the integration (owned by a [`Lease`]).
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Refresh attempts this process completed: a pending lease sees from
    /// it, without a query, whether someone in this process refreshed
    /// meanwhile.
    completed: AtomicU64,
    /// Leases of this row claimed ahead in this process and not used yet:
    /// while there are any, the row's lease must not be given back (their
    /// holder would refresh without it, and its result would not be
    /// stored).
    pending: AtomicU64,
}

/// Counts one pending lease in its flight until dropped.
struct PendingMark(Arc<Flight>);

impl Drop for PendingMark {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The right to refresh a row now: this instance holds the row's lease and
/// this task holds the integration's turn in this process. Whoever gets one
/// refreshes, stores the result (or [`IntegrationsService::release`]s the
/// row), then calls [`Lease::finish`].
pub(super) struct Lease {
    /// The claimed row, as read when the lease was (re)claimed.
    pub row: Claimed,
    flight: Arc<Flight>,
    _turn: OwnedMutexGuard<()>,
}

impl Lease {
    /// Counts the refresh attempt as completed in this process (pending
    /// leases of the same integration then defer to its result) and gives
    /// up the turn. The row's lease itself is given back by the store.
    pub(super) fn finish(self) {
        self.flight.completed.fetch_add(1, Ordering::Release);
    }
}

/// What a claim of the lease came to.
pub(super) enum Turn {
    /// Refresh: the lease is ours.
    Mine(Lease),
    /// A refresh after the generation the caller saw completed (here or in
    /// another instance): its outcome is the caller's.
    Done,
}

/// A lease this instance claimed ahead of its refresh (by a batch or the
/// background refresher); [`IntegrationsService::take_turn`] uses it.
pub(super) struct PendingLease {
    row: Claimed,
    flight: Arc<Flight>,
    /// `flight.completed` when claimed.
    seen: u64,
    /// When the lease was claimed.
    at: Instant,
    _mark: PendingMark,
}

impl PendingLease {
    /// The row's refresh generation when it was claimed.
    pub(super) fn generation(&self) -> i64 {
        self.row.generation
    }
}

/// What a batch claim found for one row.
pub(super) enum BatchClaim {
    /// This instance now holds the row's lease.
    Mine(PendingLease),
    /// Another instance holds it, and is refreshing from this generation.
    Held(i64),
}

impl IntegrationsService {
    /// The in-process single flight of one integration: every task of this
    /// process that refreshes it takes its lock first.
    fn flight(&self, provider: &str, account_id: &str) -> Arc<Flight> {
        let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (provider.to_string(), account_id.to_string());
        if let Some(flight) = flights.get(&key).and_then(Weak::upgrade) {
            return flight;
        }
        if flights.len() > 1024 {
            flights.retain(|_, w| w.strong_count() > 0);
        }
        let flight = Arc::new(Flight::default());
        flights.insert(key, Arc::downgrade(&flight));
        flight
    }

    /// Takes the integration's turn in this process, then the row's lease
    /// unless a refresh after generation `seen` has completed meanwhile.
    /// While another instance holds the lease, waits for its result
    /// (polling), for at most the lease plus 5 seconds.
    pub(super) async fn lease_after(
        &self,
        p: &str,
        a: &str,
        seen: i64,
    ) -> Result<Turn, ServiceError> {
        let flight = self.flight(p, a);
        let turn = flight.lock.clone().lock_owned().await;
        let deadline = tokio::time::Instant::now() + self.config.lease + Duration::from_secs(5);
        loop {
            let mut conn = self.pool.get().await?;
            let (generation, leased) = rows::lease_state(&mut conn, p, a, &self.config.instance_id)
                .await?
                .ok_or_else(|| ServiceError::not_found(p, a))?;
            if generation > seen {
                return Ok(Turn::Done);
            }
            if !leased {
                let claimed = rows::claim(
                    &mut conn,
                    p,
                    a,
                    self.config.lease.as_secs_f64(),
                    &self.config.instance_id,
                )
                .await?;
                drop(conn);
                if let Some(row) = claimed {
                    if row.generation > seen {
                        self.release(&row).await;
                        return Ok(Turn::Done);
                    }
                    return Ok(Turn::Mine(Lease {
                        row,
                        flight,
                        _turn: turn,
                    }));
                }
            } else {
                drop(conn);
            }
            // Another instance holds the lease: wait for its result.
            if tokio::time::Instant::now() >= deadline {
                return Err(ServiceError::RefreshFailed {
                    message: "another instance's refresh did not finish within the lease".into(),
                    transient: true,
                });
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }

    /// Claims the leases of many rows in one statement (in id order, as
    /// rotate-keys locks them, so the two never deadlock). Every requested
    /// row that exists is in the map, keyed by (provider, account_id).
    pub(super) async fn claim_batch(
        &self,
        keys: &[(String, String)],
    ) -> Result<HashMap<(String, String), BatchClaim>, db_pool::Error> {
        let claimed = {
            let mut conn = self.pool.get().await?;
            rows::claim_many(
                &mut conn,
                keys,
                self.config.lease.as_secs_f64(),
                &self.config.instance_id,
            )
            .await?
        };
        Ok(claimed
            .into_iter()
            .map(|((p, a), row, mine)| {
                let claim = if mine {
                    BatchClaim::Mine(self.pending(&p, &a, row))
                } else {
                    BatchClaim::Held(row.generation)
                };
                ((p, a), claim)
            })
            .collect())
    }

    /// Claims up to `page` integrations of `providers` that expire within
    /// `margin`, for the background refresher. Two instances never claim
    /// the same row.
    pub(super) async fn claim_due(
        &self,
        margin: Duration,
        page: i64,
        providers: &[&str],
    ) -> Result<Vec<((String, String), PendingLease)>, db_pool::Error> {
        let claimed = {
            let mut conn = self.pool.get().await?;
            rows::claim_due(
                &mut conn,
                margin.as_secs_f64(),
                page,
                self.config.lease.as_secs_f64(),
                &self.config.instance_id,
                providers,
            )
            .await?
        };
        Ok(claimed
            .into_iter()
            .map(|((p, a), row)| {
                let pending = self.pending(&p, &a, row);
                ((p, a), pending)
            })
            .collect())
    }

    /// A lease just claimed ahead of its refresh.
    fn pending(&self, p: &str, a: &str, row: Claimed) -> PendingLease {
        let flight = self.flight(p, a);
        let seen = flight.completed.load(Ordering::Acquire);
        flight.pending.fetch_add(1, Ordering::AcqRel);
        PendingLease {
            row,
            _mark: PendingMark(flight.clone()),
            flight,
            seen,
            at: Instant::now(),
        }
    }

    /// Uses a lease claimed ahead: takes the integration's turn, then
    /// refreshes with it while it is young. `Done` when someone in this
    /// process refreshed meanwhile (our lease does not stop our own
    /// process). A lease claimed long ago (a long batch, a slow provider)
    /// may have expired and another instance refreshed with the token we
    /// read: it is renewed, with the current refresh token, before use,
    /// or, when another instance holds it now, waited for.
    pub(super) async fn take_turn(
        &self,
        p: &str,
        a: &str,
        pending: PendingLease,
    ) -> Result<Turn, ServiceError> {
        let PendingLease {
            row: claimed,
            flight,
            seen,
            at,
            _mark,
        } = pending;
        let turn = flight.lock.clone().lock_owned().await;
        drop(_mark);
        if flight.completed.load(Ordering::Acquire) != seen {
            return Ok(Turn::Done);
        }
        if at.elapsed() < self.config.lease / 2 {
            return Ok(Turn::Mine(Lease {
                row: claimed,
                flight,
                _turn: turn,
            }));
        }
        let renewed = {
            let mut conn = self.pool.get().await?;
            rows::claim(
                &mut conn,
                p,
                a,
                self.config.lease.as_secs_f64(),
                &self.config.instance_id,
            )
            .await?
        };
        match renewed {
            Some(row) if row.generation == claimed.generation => Ok(Turn::Mine(Lease {
                row,
                flight,
                _turn: turn,
            })),
            Some(row) => {
                self.release(&row).await;
                Ok(Turn::Done)
            }
            None => {
                drop(turn);
                self.lease_after(p, a, claimed.generation).await
            }
        }
    }

    /// Gives a lease claimed ahead back unused (best effort), unless
    /// another task of this process holds one of the same row ahead too.
    pub(super) async fn give_back(&self, pending: PendingLease) {
        let PendingLease {
            row, flight, _mark, ..
        } = pending;
        drop(_mark);
        if flight.pending.load(Ordering::Acquire) == 0 {
            self.release(&row).await;
        }
    }

    /// Gives back the row's lease of a refresh that was not sent (its
    /// provider is paused), unless another task of this process holds a
    /// lease of the row claimed ahead: that one will use it.
    pub(super) async fn give_back_unsent(&self, lease: &Lease) {
        if lease.flight.pending.load(Ordering::Acquire) == 0 {
            self.release(&lease.row).await;
        }
    }

    /// Gives a row's lease back without a result (best effort: an error
    /// leaves it to expire).
    pub(super) async fn release(&self, row: &Claimed) {
        if let Ok(mut conn) = self.pool.get().await {
            let _ = rows::release(&mut conn, row.id, &self.config.instance_id).await;
        }
    }
}
