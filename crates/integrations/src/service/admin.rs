//! What operators ask of the database: its connections' activity.

use db_pool::diagnostics::{self, Activity};

use super::{IntegrationsService, ServiceError};

impl IntegrationsService {
    /// What the database's connections are doing (`pg_stat_activity`,
    /// as `integrations activity` shows it), through one pooled connection.
    pub async fn database_activity(&self) -> Result<Activity, ServiceError> {
        let mut conn = self.pool.get().await?;
        let database = self.pool.config().database.clone();
        Ok(diagnostics::activity(&mut conn, &database).await?)
    }
}
