//! What operators ask of the database: its connections' activity, and the
//! overview the dashboard shows (integrations by provider and status, the
//! next expiry, the latest events, failing webhook endpoints).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use db_pool::diagnostics::{self, Activity};
use serde::Serialize;
use utoipa::ToSchema;

use super::{IntegrationsService, ServiceError};
use crate::domain::{Event, Webhook};
use crate::store::{events, integrations, webhooks};

/// How long an overview is reused: the dashboard polls every 2 s, and
/// counting integrations reads the whole table.
const OVERVIEW_TTL: Duration = Duration::from_secs(5);

/// Events in an overview.
const LATEST_EVENTS: i64 = 10;

/// Integrations of one provider in one status.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StatusCount {
    /// Provider.
    pub provider: String,
    /// `connected`, `expired`, `error` or `revoked`.
    pub status: String,
    /// How many.
    pub count: i64,
}

/// What the dashboard shows beside the pool: at most 5 s old.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Overview {
    /// Integrations per provider and status.
    pub integrations: Vec<StatusCount>,
    /// When the next refreshable access token expires (the background
    /// refresher renews it before then); null when none.
    #[serde(serialize_with = "crate::domain::rfc3339_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_expiry: Option<DateTime<Utc>>,
    /// The latest events, newest first.
    pub latest_events: Vec<Event>,
    /// Webhook endpoints failing now or disabled.
    pub failing_webhooks: Vec<Webhook>,
    /// When it was read.
    #[serde(serialize_with = "crate::domain::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub read_at: DateTime<Utc>,
}

/// The last overview read, and when.
pub(super) type OverviewCache = std::sync::Mutex<Option<(Instant, Arc<Overview>)>>;

impl IntegrationsService {
    /// What the database's connections are doing (`pg_stat_activity`,
    /// as `integrations activity` shows it), through one pooled connection.
    pub async fn database_activity(&self) -> Result<Activity, ServiceError> {
        let mut conn = self.pool.get().await?;
        let database = self.pool.config().database.clone();
        Ok(diagnostics::activity(&mut conn, &database).await?)
    }

    /// The overview, read at most every 5 s (concurrent callers may each
    /// read it once when it is stale: cheap statements, a handful of
    /// dashboards).
    pub async fn overview(&self) -> Result<Arc<Overview>, ServiceError> {
        if let Some((at, overview)) = self.overview_cache().as_ref() {
            if at.elapsed() < OVERVIEW_TTL {
                return Ok(overview.clone());
            }
        }
        let mut conn = self.pool.get().await?;
        let overview = Arc::new(Overview {
            integrations: integrations::counts_by_status(&mut conn)
                .await?
                .into_iter()
                .map(|(provider, status, count)| StatusCount {
                    provider,
                    status,
                    count,
                })
                .collect(),
            next_expiry: integrations::next_expiry(&mut conn).await?,
            latest_events: events::latest(&mut conn, LATEST_EVENTS).await?,
            failing_webhooks: webhooks::failing(&mut conn).await?,
            read_at: Utc::now(),
        });
        *self.overview_cache() = Some((Instant::now(), overview.clone()));
        Ok(overview)
    }

    fn overview_cache(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Arc<Overview>)>> {
        self.overview
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
