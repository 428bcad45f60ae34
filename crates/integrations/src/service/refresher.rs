//! The background refresher: claims integrations expiring soon, a page at a
//! time, with the same leases as every other refresh (two instances never
//! refresh the same row), and refreshes them through the batch path, within
//! each provider's limits (`limits.rs`). A row comes due at a point of the
//! margin's first half of its own (`refresh_point!` in the store), so
//! tokens issued together are not all refreshed together.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::batch::{Job, RefreshRequest};
use super::IntegrationsService;
use crate::domain::{AccountId, ProviderName};
use crate::store::integrations as rows;

/// How the refresher runs.
#[derive(Debug, Clone)]
pub struct Refresher {
    /// Pause between scans.
    pub interval: Duration,
    /// Refresh tokens expiring within this margin.
    pub margin: Duration,
    /// Rows claimed per page.
    pub page: i64,
    /// Refreshes in flight per provider (each provider's own limits apply
    /// within it).
    pub concurrency: usize,
    /// How often the due backlog gauges are updated.
    pub backlog_interval: Duration,
}

/// The refresher's default refreshes in flight per provider: at a provider
/// latency of 100 ms, up to 640 refreshes a second per instance (about 2.3
/// million hourly tokens); writes are batched, so the pool's connections
/// are not what bounds it.
pub const DEFAULT_REFRESHER_CONCURRENCY: usize = 64;

impl Default for Refresher {
    fn default() -> Self {
        Refresher {
            interval: Duration::from_secs(30),
            margin: Duration::from_secs(600),
            page: 500,
            concurrency: DEFAULT_REFRESHER_CONCURRENCY,
            backlog_interval: Duration::from_secs(5),
        }
    }
}

/// What one scan did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Integrations claimed and refreshed.
    pub attempted: usize,
    /// Of which refreshed successfully.
    pub refreshed: usize,
}

impl IntegrationsService {
    /// One scan: claims due integrations page by page and refreshes them,
    /// until none is left or `cancel` fires (checked between pages, so a
    /// page in progress finishes). Integrations of providers no longer in
    /// the registry, or whose client id or secret is not set, are left
    /// alone: not claimed every scan only to fail, no failure counted. So
    /// are those of a provider paused now (429, circuit breaker).
    ///
    /// Each provider is scanned on its own, all at once, each with
    /// `concurrency` refreshes in flight: a provider whose limits make its
    /// refreshes wait (a backlog at 5 a second) never holds back another's
    /// (claimed together, its rows would fill every page and every slot).
    pub async fn refresh_due(
        &self,
        cfg: &Refresher,
        cancel: &CancellationToken,
    ) -> Result<ScanReport, db_pool::Error> {
        let providers = self.providers.configured_names();
        let scans = providers
            .iter()
            .map(|p| self.refresh_due_of(p, cfg, cancel));
        let mut report = ScanReport::default();
        let mut failed = None;
        for result in futures_util::future::join_all(scans).await {
            match result {
                Ok(r) => {
                    report.attempted += r.attempted;
                    report.refreshed += r.refreshed;
                }
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        match failed {
            Some(e) if report.attempted == 0 => Err(e),
            Some(e) => {
                tracing::warn!(error = %e, hint = e.hint(), "background refresh scan of a provider failed");
                Ok(report)
            }
            None => Ok(report),
        }
    }

    /// One provider's part of a scan.
    async fn refresh_due_of(
        &self,
        provider: &str,
        cfg: &Refresher,
        cancel: &CancellationToken,
    ) -> Result<ScanReport, db_pool::Error> {
        let mut report = ScanReport::default();
        loop {
            if cancel.is_cancelled() || self.gates.paused(provider) {
                return Ok(report);
            }
            let claimed = self.claim_due(cfg.margin, cfg.page, &[provider]).await?;
            let n = claimed.len();
            let jobs: Vec<_> = claimed
                .into_iter()
                .filter_map(|((p, a), lease)| {
                    let request = RefreshRequest {
                        provider: ProviderName::parse(&p).ok()?,
                        account_id: AccountId::parse(&a).ok()?,
                    };
                    Some((request, Job::Refresh(lease)))
                })
                .collect();
            let results = self.run_claimed(jobs, cfg.concurrency).await;
            report.attempted += n;
            report.refreshed += results.iter().filter(|r| r.is_ok()).count();
            if (n as i64) < cfg.page {
                return Ok(report);
            }
        }
    }

    /// The due backlog: integrations the refresher should have refreshed
    /// by now and has not, and how many seconds ago the oldest came due.
    pub async fn due_backlog(&self, margin: Duration) -> Result<(i64, f64), db_pool::Error> {
        let providers = self.providers.configured_names();
        let mut conn = self.pool.get().await?;
        rows::due_backlog(&mut conn, margin.as_secs_f64(), &providers).await
    }

    /// Updates `integrations_refresh_due` and
    /// `integrations_refresh_due_oldest_seconds` every `backlog_interval`.
    async fn watch_backlog(self: Arc<Self>, cfg: Refresher, cancel: CancellationToken) {
        loop {
            match self.due_backlog(cfg.margin).await {
                Ok((rows, oldest)) => {
                    metrics::gauge!("integrations_refresh_due").set(rows as f64);
                    metrics::gauge!("integrations_refresh_due_oldest_seconds").set(oldest);
                }
                Err(e) => tracing::debug!(error = %e, "reading the refresh backlog failed"),
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(cfg.backlog_interval) => {}
            }
        }
    }

    /// Runs scans every `interval` until `cancel` fires; the scan in
    /// progress finishes its current page first.
    pub async fn run_refresher(self: Arc<Self>, cfg: Refresher, cancel: CancellationToken) {
        tracing::info!(
            interval_secs = cfg.interval.as_secs(),
            margin_secs = cfg.margin.as_secs(),
            concurrency = cfg.concurrency,
            "background refresher started"
        );
        tokio::spawn(self.clone().watch_backlog(cfg.clone(), cancel.clone()));
        loop {
            match self.refresh_due(&cfg, &cancel).await {
                Ok(r) if r.attempted > 0 => {
                    tracing::info!(
                        attempted = r.attempted,
                        refreshed = r.refreshed,
                        "background refresh scan"
                    )
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, hint = e.hint(), "background refresh scan failed")
                }
            }
            // Abandoned connect flows leave their states behind.
            if let Err(e) = self.purge_expired_states().await {
                tracing::warn!(error = %e, "purging expired OAuth states failed");
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(cfg.interval) => {}
            }
        }
        tracing::info!("background refresher stopped");
    }
}
