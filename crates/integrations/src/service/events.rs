//! Events: pages of the outbox for pollers (`GET /v1/events`), and the
//! retention purge `serve` runs in the background. The events themselves
//! are written by database triggers in the same transaction as each change
//! (migration V6), so no operation here writes one.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{retried_read, IntegrationsService, ServiceError};
use crate::domain::{Event, EventCursor, EventType};
use crate::store::events as rows;

/// How long events are kept and how they are purged.
#[derive(Debug, Clone)]
pub struct EventRetention {
    /// Events older than this are deleted (`INTEGRATIONS_EVENT_RETENTION`,
    /// 7 days).
    pub retention: Duration,
    /// Pause between purges.
    pub interval: Duration,
    /// Events deleted per statement (each its own short transaction).
    pub batch: i64,
}

impl Default for EventRetention {
    fn default() -> Self {
        EventRetention {
            retention: Duration::from_secs(7 * 24 * 3600),
            interval: Duration::from_secs(300),
            batch: 1000,
        }
    }
}

/// A page of events.
#[derive(Debug)]
pub struct EventPage {
    /// The events, oldest transaction first.
    pub events: Vec<Event>,
    /// Where the next page starts: usable even when this one is empty.
    pub next_cursor: EventCursor,
}

impl IntegrationsService {
    /// Up to `limit` events after `after` (the start when `None`), of type
    /// `kind` when given, of transactions that have all ended (see
    /// `store/events.rs`). The next cursor never goes back: the last
    /// event's position when the page is full, else the horizon (every
    /// event before it has been seen).
    #[tracing::instrument(skip_all, fields(limit = limit, kind = kind.map(EventType::as_str)))]
    pub async fn events(
        &self,
        after: Option<EventCursor>,
        limit: i64,
        kind: Option<EventType>,
    ) -> Result<EventPage, ServiceError> {
        let after = after.unwrap_or(EventCursor::START);
        let page = retried_read!(self, |conn| rows::page(conn, after, limit, kind))?;
        let next_cursor = match page.last {
            Some(last) if page.read as i64 >= limit => last,
            last => after.max(last.unwrap_or(after)).max(EventCursor {
                txid: page.horizon,
                id: 0,
            }),
        };
        Ok(EventPage {
            events: page.events,
            next_cursor,
        })
    }

    /// Deletes events older than `retention`, `batch` at a time (each
    /// batch its own short statement), until none is left or `cancel`
    /// fires; how many.
    pub async fn purge_events(
        &self,
        retention: Duration,
        batch: i64,
        cancel: &CancellationToken,
    ) -> Result<u64, db_pool::Error> {
        let mut purged = 0;
        while !cancel.is_cancelled() {
            let mut conn = self.pool.get().await?;
            let n = rows::purge(&mut conn, retention.as_secs_f64(), batch).await?;
            purged += n;
            if n < batch as u64 {
                break;
            }
        }
        Ok(purged)
    }

    /// Purges expired events every `interval` until `cancel` fires (a
    /// purge in progress stops after its current batch).
    pub async fn run_event_purge(self: Arc<Self>, cfg: EventRetention, cancel: CancellationToken) {
        tracing::info!(
            retention_secs = cfg.retention.as_secs(),
            "event purge started"
        );
        loop {
            match self.purge_events(cfg.retention, cfg.batch, &cancel).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(purged = n, "expired events purged"),
                Err(e) => {
                    tracing::warn!(error = %e, hint = e.hint(), "purging expired events failed")
                }
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(cfg.interval) => {}
            }
        }
        tracing::info!("event purge stopped");
    }
}
