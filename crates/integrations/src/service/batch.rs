//! `batch_refresh`: the seed's `batchRefreshTokens`, improved. Its default
//! of 5 in flight, but as a sliding window (a slow token does not hold back
//! the next four), one result per request in order (one failure does not
//! fail the batch, unlike `Promise.all`), and the leases of the whole batch
//! claimed in one statement.

use std::collections::HashMap;

use futures_util::stream::{self, StreamExt};
use tokio::sync::Semaphore;

use super::lease::{BatchClaim, PendingLease, Turn};
use super::refresh::Permits;
use super::{IntegrationsService, ServiceError};
use crate::domain::{AccountId, IntegrationStatus, ProviderName};

/// The seed's batch size, used as the number of refreshes in flight.
pub const DEFAULT_BATCH_CONCURRENCY: usize = 5;

/// One integration to refresh.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RefreshRequest {
    /// Provider.
    pub provider: ProviderName,
    /// Account on the provider.
    pub account_id: AccountId,
}

impl IntegrationsService {
    /// Refreshes many integrations, `concurrency` at a time (at least 1),
    /// returning one result per request, in request order.
    #[tracing::instrument(skip_all, fields(requests = requests.len(), concurrency))]
    pub async fn batch_refresh(
        &self,
        requests: Vec<RefreshRequest>,
        concurrency: usize,
    ) -> Vec<Result<IntegrationStatus, ServiceError>> {
        let keys: Vec<(String, String)> = requests
            .iter()
            .filter(|r| self.configured(r.provider.as_str()).is_ok())
            .map(|r| (r.provider.to_string(), r.account_id.to_string()))
            .collect();
        let mut claimed: HashMap<(String, String), BatchClaim> = if keys.is_empty() {
            HashMap::new()
        } else {
            match self.claim_batch(&keys).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    let e = std::sync::Arc::new(e);
                    return requests
                        .iter()
                        .map(|_| Err(ServiceError::Db(e.clone())))
                        .collect();
                }
            }
        };
        let mut taken: HashMap<(String, String), i64> = HashMap::new();
        let jobs: Vec<_> = requests
            .into_iter()
            .map(|r| {
                let key = (r.provider.to_string(), r.account_id.to_string());
                // A request repeated in the batch refreshes once: the
                // first occurrence takes the claim, the others wait for it.
                let job = if let Some(&generation) = taken.get(&key) {
                    Job::Wait(generation)
                } else {
                    match claimed.remove(&key) {
                        Some(BatchClaim::Mine(lease)) => {
                            taken.insert(key, lease.generation());
                            Job::Refresh(lease)
                        }
                        Some(BatchClaim::Held(generation)) => {
                            taken.insert(key, generation);
                            Job::Wait(generation)
                        }
                        None => Job::Missing,
                    }
                };
                (r, job)
            })
            .collect();
        self.run_claimed(jobs, concurrency).await
    }

    /// Runs a batch whose leases are (partly) claimed: at most
    /// `concurrency` requests to the provider at a time, as a sliding
    /// window; results in input order.
    pub(super) async fn run_claimed(
        &self,
        jobs: Vec<(RefreshRequest, Job)>,
        concurrency: usize,
    ) -> Vec<Result<IntegrationStatus, ServiceError>> {
        let concurrency = concurrency.max(1);
        // The window bounds what the provider sees: a refresh holds one of
        // `concurrency` permits from its request until the provider's
        // answer, and storing that answer (a commit) does not hold it, so
        // the next request starts meanwhile. Up to as many refreshes again
        // may be storing their results.
        let gate = Semaphore::new(concurrency);
        // `buffer_unordered` starts the next item as soon as any one
        // finishes (`buffered` would keep finished ones waiting behind a
        // slow head); the results are put back in order.
        let mut results: Vec<(usize, Result<IntegrationStatus, ServiceError>)> =
            stream::iter(jobs.into_iter().enumerate())
                .map(|(i, (request, job))| {
                    let gate = &gate;
                    async move { (i, self.refresh_one(request, job, gate).await) }
                })
                .buffer_unordered(concurrency.saturating_mul(2))
                .collect()
                .await;
        results.sort_unstable_by_key(|(i, _)| *i);
        results.into_iter().map(|(_, r)| r).collect()
    }

    async fn refresh_one(
        &self,
        request: RefreshRequest,
        job: Job,
        gate: &Semaphore,
    ) -> Result<IntegrationStatus, ServiceError> {
        let (p, a) = (request.provider.as_str(), request.account_id.as_str());
        self.configured(p)?;
        match job {
            Job::Refresh(lease) => {
                // A slot in the window first, then the lease's age is
                // judged: waiting for a slot can take long. The gate is
                // never closed, so `acquire` cannot fail; were it closed,
                // the refresh would run outside the window.
                let window = gate.acquire().await.ok();
                // Then the provider's limits (waiting for them while other
                // providers' refreshes hold window slots would let a
                // request start late and bunch up with the next). A
                // provider paused longer than half a lease is left for a
                // later scan or call: the lease is given back unused.
                let provider = match self.gates.acquire(p, Some(self.config.lease / 2)).await {
                    Ok(permit) => permit,
                    Err(busy) => {
                        self.give_back(lease).await;
                        return Err(ServiceError::busy(p, busy));
                    }
                };
                let permits = Permits { window, provider };
                match self.take_turn(p, a, lease).await? {
                    Turn::Mine(lease) => return self.refresh_leased(p, a, lease, permits).await,
                    Turn::Done => self.outcome(p, a).await?,
                }
            }
            // Another instance holds the lease: its result is ours.
            Job::Wait(generation) => {
                if let Some(status) = self.refresh_after(p, a, generation).await? {
                    return Ok(status);
                }
            }
            Job::Missing => return Err(ServiceError::not_found(p, a)),
        }
        self.integration(p, a).await
    }
}

/// What a batch item does.
pub(super) enum Job {
    /// Refresh it with the lease this instance claimed for it.
    Refresh(PendingLease),
    /// Wait for the refresh of this generation by whoever holds the lease.
    Wait(i64),
    /// No such integration.
    Missing,
}
