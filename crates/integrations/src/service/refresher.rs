//! The background refresher: claims integrations expiring soon, a page at a
//! time, with the same leases as every other refresh (two instances never
//! refresh the same row), and refreshes them through the batch path.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::batch::{Job, RefreshRequest};
use super::IntegrationsService;
use crate::domain::{AccountId, ProviderName};

/// How the refresher runs.
#[derive(Debug, Clone)]
pub struct Refresher {
    /// Pause between scans.
    pub interval: Duration,
    /// Refresh tokens expiring within this margin.
    pub margin: Duration,
    /// Rows claimed per page.
    pub page: i64,
    /// Refreshes in flight.
    pub concurrency: usize,
}

impl Default for Refresher {
    fn default() -> Self {
        Refresher {
            interval: Duration::from_secs(30),
            margin: Duration::from_secs(600),
            page: 500,
            concurrency: super::DEFAULT_BATCH_CONCURRENCY,
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
    /// alone: not claimed every scan only to fail, no failure counted.
    pub async fn refresh_due(
        &self,
        cfg: &Refresher,
        cancel: &CancellationToken,
    ) -> Result<ScanReport, db_pool::Error> {
        let mut report = ScanReport::default();
        let providers = self.providers.configured_names();
        loop {
            if cancel.is_cancelled() {
                return Ok(report);
            }
            let claimed = self.claim_due(cfg.margin, cfg.page, &providers).await?;
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

    /// Runs scans every `interval` until `cancel` fires; the scan in
    /// progress finishes its current page first.
    pub async fn run_refresher(self: Arc<Self>, cfg: Refresher, cancel: CancellationToken) {
        tracing::info!(
            interval_secs = cfg.interval.as_secs(),
            margin_secs = cfg.margin.as_secs(),
            "background refresher started"
        );
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
