//! The webhook dispatcher `serve` runs: claims due deliveries (any instance
//! may; `FOR UPDATE SKIP LOCKED` gives each attempt to one), sends them
//! concurrently, at most `concurrency` per endpoint so a slow or dead
//! endpoint fills only its own slots, and records each outcome. Woken by
//! the database's notification when deliveries are queued (it names their
//! endpoints: only those are claimed for), and every `poll` for retries
//! that came due and claims that ran out, on every endpoint.
//!
//! At least once: a delivery is marked delivered only after its 2xx, so a
//! process killed in between sends it again (after its claim runs out);
//! receivers de-duplicate on `webhook-id`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::IntegrationsService;
use crate::store::webhooks::{self as rows, Claimed, Failure};
use crate::webhooks::SigningKey;

/// How often the backlog gauges are refreshed.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

/// An enabled endpoint, its secrets decrypted.
struct Endpoint {
    id: String,
    url: Url,
    keys: Vec<SigningKey>,
}

/// An attempt's outcome, as `integrations_webhook_deliveries_total`
/// labels it (no label per endpoint: endpoints come and go, the label set
/// stays fixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// A 2xx.
    Delivered,
    /// Failed; another attempt is scheduled.
    Retry,
    /// Failed; the schedule is spent.
    Failed,
}

impl DeliveryOutcome {
    /// Every outcome (the series `serve` creates at zero).
    pub const ALL: [DeliveryOutcome; 3] = [
        DeliveryOutcome::Delivered,
        DeliveryOutcome::Retry,
        DeliveryOutcome::Failed,
    ];

    /// The `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Retry => "retry",
            DeliveryOutcome::Failed => "failed",
        }
    }

    fn count(self) {
        metrics::counter!("integrations_webhook_deliveries_total", "outcome" => self.label())
            .increment(1);
    }
}

/// What wakes the dispatcher: deliveries queued for some endpoints (the
/// database's notification names them), or for any.
#[derive(Default)]
pub(super) struct Wake {
    notify: tokio::sync::Notify,
    queued: std::sync::Mutex<Queued>,
}

/// What was queued since the dispatcher last looked.
#[derive(Default)]
struct Queued {
    any: bool,
    endpoints: HashSet<String>,
}

/// Past this many named endpoints a wake-up counts as "any": the set stays
/// small however many notifications arrive before the dispatcher looks.
const WAKE_NAMES_MAX: usize = 1024;

impl Wake {
    fn queued(&self) -> std::sync::MutexGuard<'_, Queued> {
        // One insert or take per section: consistent after a panic.
        self.queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deliveries may be due for any endpoint.
    pub(super) fn any(&self) {
        self.queued().any = true;
        self.notify.notify_one();
    }

    /// Deliveries were queued for the endpoints `payload` names (comma
    /// separated; empty: any).
    pub(super) fn endpoints(&self, payload: &str) {
        {
            let mut queued = self.queued();
            if payload.is_empty() {
                queued.any = true;
            } else if !queued.any {
                queued
                    .endpoints
                    .extend(payload.split(',').map(str::to_string));
                if queued.endpoints.len() > WAKE_NAMES_MAX {
                    queued.any = true;
                    queued.endpoints.clear();
                }
            }
        }
        self.notify.notify_one();
    }

    async fn notified(&self) {
        self.notify.notified().await;
    }

    fn take(&self) -> Queued {
        std::mem::take(&mut *self.queued())
    }
}

/// Endpoints whose last claim found less due than it asked for: not
/// claimed for again until something may have made more due (a
/// notification of queued deliveries, one of their attempts ending, or the
/// poll interval passing, for retries coming due and claims running out).
/// Without it every idle endpoint costs a claim statement per loop, and the
/// loop runs on every attempt that ends.
#[derive(Default)]
struct Idle {
    drained: HashSet<String>,
    swept: Option<Instant>,
}

impl Idle {
    fn skips(&self, endpoint: &str) -> bool {
        self.drained.contains(endpoint)
    }

    fn drained(&mut self, endpoint: &str) {
        self.drained.insert(endpoint.to_string());
    }

    fn woken(&mut self, endpoint: &str) {
        self.drained.remove(endpoint);
    }

    fn clear(&mut self) {
        self.drained.clear();
    }

    fn wake(&mut self, queued: Queued) {
        if queued.any {
            self.clear();
        }
        for endpoint in &queued.endpoints {
            self.woken(endpoint);
        }
    }

    fn sweep_every(&mut self, poll: Duration) {
        if self.swept.is_none_or(|at| at.elapsed() >= poll) {
            self.swept = Some(Instant::now());
            self.clear();
        }
    }

    /// How long until the next sweep is due: the dispatcher sleeps no
    /// longer, so wake-ups for other endpoints never push it back.
    fn until_sweep(&self, poll: Duration) -> Duration {
        self.swept
            .map_or(Duration::ZERO, |at| poll.saturating_sub(at.elapsed()))
    }
}

impl IntegrationsService {
    /// Delivers webhooks until `cancel` fires, then waits for the attempts
    /// in flight (each bounded by the timeout) so their outcomes are
    /// recorded.
    pub async fn run_webhook_dispatcher(self: Arc<Self>, cancel: CancellationToken) {
        let cfg = self.config.webhooks.clone();
        tracing::info!(
            concurrency = cfg.concurrency,
            timeout_secs = cfg.send.timeout.as_secs_f64(),
            retries = cfg.schedule.len(),
            "webhook dispatcher started"
        );
        let wake = self.webhook_wake.clone();
        let claim_batch = (cfg.concurrency / 2).max(1);
        let mut endpoints: Vec<Arc<Endpoint>> = Vec::new();
        let mut loaded: Option<Instant> = None;
        let mut backlog_at: Option<Instant> = None;
        let mut in_flight: HashMap<String, usize> = HashMap::new();
        let mut attempts: JoinSet<()> = JoinSet::new();
        // Which endpoint each attempt is for, so its slot is freed however
        // the task ends.
        let mut slots: HashMap<tokio::task::Id, String> = HashMap::new();
        // Logged once per outage, not per loop.
        let mut failing = false;
        let mut idle = Idle::default();
        loop {
            idle.sweep_every(cfg.poll);
            if loaded.is_none_or(|at| at.elapsed() >= cfg.poll) {
                match self.load_endpoints().await {
                    Ok(list) => {
                        endpoints = list;
                        loaded = Some(Instant::now());
                        // Forget deleted endpoints once their attempts are done.
                        in_flight.retain(|id, n| *n > 0 || endpoints.iter().any(|e| e.id == *id));
                    }
                    Err(e) => self.dispatch_failed(&mut failing, &e),
                }
            }
            for endpoint in &endpoints {
                let busy = in_flight.get(&endpoint.id).copied().unwrap_or(0);
                let free = cfg.concurrency.saturating_sub(busy);
                // Claims are taken in batches (half the slots, or whatever is
                // due when none is busy): one claim statement per attempt
                // would cap the rate at the statement's round trip.
                if free == 0 || (busy > 0 && free < claim_batch) || idle.skips(&endpoint.id) {
                    continue;
                }
                let claimed = self.claim(endpoint, free).await;
                match claimed {
                    Ok(claimed) => {
                        failing = false;
                        if claimed.len() < free {
                            idle.drained(&endpoint.id);
                        }
                        for delivery in claimed {
                            *in_flight.entry(endpoint.id.clone()).or_default() += 1;
                            let task =
                                attempts.spawn(self.clone().attempt(endpoint.clone(), delivery));
                            slots.insert(task.id(), endpoint.id.clone());
                        }
                    }
                    Err(e) => {
                        self.dispatch_failed(&mut failing, &e);
                        break;
                    }
                }
            }
            if backlog_at.is_none_or(|at| at.elapsed() >= BACKLOG_EVERY) {
                backlog_at = Some(Instant::now());
                self.report_backlog().await;
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = wake.notified() => idle.wake(wake.take()),
                () = tokio::time::sleep(idle.until_sweep(cfg.poll)) => {}
                Some(done) = attempts.join_next_with_id(), if !attempts.is_empty() => {
                    let mut done = Some(done);
                    // Every attempt that has finished frees its slot before
                    // the next claim.
                    while let Some(finished) = done {
                        let task = match finished {
                            Ok((task, ())) => task,
                            Err(e) => e.id(),
                        };
                        if let Some(id) = slots.remove(&task) {
                            // Its next delivery for the same integration
                            // may be claimable now.
                            idle.woken(&id);
                            if let Some(n) = in_flight.get_mut(&id) {
                                *n = n.saturating_sub(1);
                            }
                        }
                        done = attempts.try_join_next_with_id();
                    }
                }
            }
        }
        let waiting = attempts.len();
        if waiting > 0 {
            tracing::info!(
                in_flight = waiting,
                "webhook dispatcher stopping: waiting for the attempts in flight"
            );
        }
        while attempts.join_next().await.is_some() {}
        tracing::info!("webhook dispatcher stopped");
    }

    fn dispatch_failed(&self, failing: &mut bool, e: &super::ServiceError) {
        if !*failing {
            tracing::warn!(error = %e, "webhook dispatcher cannot reach the database; retrying");
            *failing = true;
        }
    }

    /// The enabled endpoints with their keys; an endpoint whose secret
    /// cannot be decrypted (a key removed before `rotate-keys`) is left
    /// out and logged.
    async fn load_endpoints(&self) -> Result<Vec<Arc<Endpoint>>, super::ServiceError> {
        let stored = {
            let mut conn = self.pool.get().await?;
            rows::active(&mut conn).await?
        };
        let mut endpoints = Vec::with_capacity(stored.len());
        for e in stored {
            let keys = match self.signing_keys(&e.id, &e.secrets) {
                Ok(keys) => keys,
                Err(err) => {
                    tracing::warn!(webhook = %e.id, error = %err, "webhook secret unreadable: its deliveries wait");
                    continue;
                }
            };
            let Ok(url) = Url::parse(&e.url) else {
                tracing::warn!(webhook = %e.id, "webhook URL unreadable: its deliveries wait");
                continue;
            };
            endpoints.push(Arc::new(Endpoint {
                id: e.id,
                url,
                keys,
            }));
        }
        Ok(endpoints)
    }

    async fn claim(
        &self,
        endpoint: &Endpoint,
        free: usize,
    ) -> Result<Vec<Claimed>, super::ServiceError> {
        let mut conn = self.pool.get().await?;
        let limit = i64::try_from(free).unwrap_or(i64::MAX);
        Ok(rows::claim(
            &mut conn,
            &endpoint.id,
            limit,
            self.config.webhooks.claim().as_secs_f64(),
            &self.config.instance_id,
        )
        .await?)
    }

    /// One attempt of one delivery, and its outcome recorded.
    async fn attempt(self: Arc<Self>, endpoint: Arc<Endpoint>, claimed: Claimed) {
        let cfg = &self.config.webhooks;
        let body = claimed
            .event
            .as_ref()
            .map(serde_json::to_vec)
            .transpose()
            .ok()
            .flatten();
        let attempt = match (body, self.webhook_sender().await) {
            (Some(body), Ok(sender)) => {
                let keys: Vec<&SigningKey> = endpoint.keys.iter().collect();
                sender
                    .send(&endpoint.url, &claimed.event_id.to_string(), body, &keys)
                    .await
            }
            (None, _) => crate::webhooks::Attempt {
                status: None,
                error: Some("the event's type is unknown to this version".into()),
                elapsed: Duration::ZERO,
            },
            (_, Err(e)) => crate::webhooks::Attempt {
                status: None,
                error: Some(e.to_string()),
                elapsed: Duration::ZERO,
            },
        };
        let recorded = match &attempt.error {
            None => {
                DeliveryOutcome::Delivered.count();
                if let Some(event) = &claimed.event {
                    let lag = chrono::Utc::now() - event.created_at;
                    metrics::histogram!("integrations_webhook_delivery_lag_seconds")
                        .record(lag.as_seconds_f64().max(0.0));
                }
                self.record_success(&claimed, attempt.status).await
            }
            Some(error) => {
                let retry = cfg.retry_after(claimed.scheduled);
                if retry.is_some() {
                    DeliveryOutcome::Retry.count();
                } else {
                    DeliveryOutcome::Failed.count();
                }
                let reason = format!(
                    "every attempt failed for {} s (the last: {error})",
                    cfg.disable_after.as_secs()
                );
                let failure = Failure {
                    id: claimed.id,
                    attempt: claimed.attempt,
                    give_up: retry.is_none(),
                    retry_in_secs: retry.unwrap_or_default().as_secs_f64(),
                    status: attempt.status.map(i32::from),
                    error,
                    disable_after_secs: cfg.disable_after.as_secs_f64(),
                    disabled_reason: &reason,
                };
                self.record_failure(&endpoint.id, &failure).await
            }
        };
        if let Err(e) = recorded {
            // The claim runs out and the delivery is sent again: at least
            // once.
            tracing::warn!(webhook = %endpoint.id, delivery = claimed.id, error = %e, "recording a webhook attempt failed; it will be sent again");
        }
    }

    async fn record_success(
        &self,
        claimed: &Claimed,
        status: Option<u16>,
    ) -> Result<(), super::ServiceError> {
        let mut conn = self.pool.get().await?;
        let status = status.map(i32::from).unwrap_or(200);
        rows::succeeded(&mut conn, claimed.id, claimed.attempt, status).await?;
        Ok(())
    }

    async fn record_failure(
        &self,
        endpoint: &str,
        failure: &Failure<'_>,
    ) -> Result<(), super::ServiceError> {
        let mut conn = self.pool.get().await?;
        if rows::failed(&mut conn, failure).await? {
            metrics::counter!("integrations_webhook_endpoints_disabled_total").increment(1);
            tracing::warn!(webhook = %endpoint, reason = failure.disabled_reason, "webhook endpoint disabled");
        }
        Ok(())
    }

    /// Refreshes the backlog gauges (every instance reports the same
    /// database-wide figures).
    async fn report_backlog(&self) {
        let backlog = async {
            let mut conn = self.pool.get().await?;
            Ok::<_, super::ServiceError>(rows::backlog(&mut conn).await?)
        };
        if let Ok((pending, oldest)) = backlog.await {
            metrics::gauge!("integrations_webhook_pending").set(pending as f64);
            metrics::gauge!("integrations_webhook_oldest_pending_seconds").set(oldest);
        }
    }
}
