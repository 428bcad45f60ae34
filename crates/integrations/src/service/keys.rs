//! `rotate-keys`: re-encrypts every row with the current key, in batches,
//! each in its own short transaction; resumable (rows already under the
//! current key are skipped), safe beside running refreshes (a row changed
//! meanwhile is left to the refresh, which encrypts with the current key).

use secrecy::zeroize::Zeroize;

use super::{IntegrationsService, ServiceError};
use crate::store::integrations as rows;

/// What a rotation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RotationReport {
    /// Rows re-encrypted.
    pub reencrypted: u64,
    /// Batches (transactions) used.
    pub batches: u64,
}

impl IntegrationsService {
    /// Re-encrypts every integration not under the current key.
    pub async fn rotate_keys(&self, batch: i64) -> Result<RotationReport, ServiceError> {
        let current = self.keys.current_id().to_string();
        let mut report = RotationReport::default();
        let mut after = 0i64;
        loop {
            let mut conn = self.pool.get().await?;
            let page = rows::under_other_key(&mut conn, &current, after, batch.max(1)).await?;
            let Some(last) = page.last() else {
                return Ok(report);
            };
            after = last.id;
            let mut tx = conn.transaction().await?;
            let mut done = 0;
            for row in &page {
                let (p, a) = (&row.provider, &row.account_id);
                let mut access = self.keys.decrypt(
                    &row.key_id,
                    &row.access_token,
                    &Self::aad(p, a, "access"),
                )?;
                let new_access = self.keys.encrypt(&access, &Self::aad(p, a, "access"));
                access.zeroize();
                let new_refresh = match &row.refresh_token {
                    Some(v) => {
                        let mut plain =
                            self.keys
                                .decrypt(&row.key_id, v, &Self::aad(p, a, "refresh"))?;
                        let enc = self.keys.encrypt(&plain, &Self::aad(p, a, "refresh"));
                        plain.zeroize();
                        Some(enc)
                    }
                    None => None,
                };
                let sql_ok = tx_reencrypt(
                    &mut tx,
                    row.id,
                    &row.key_id,
                    &new_access,
                    new_refresh.as_deref(),
                    &current,
                )
                .await?;
                if sql_ok {
                    done += 1;
                }
            }
            tx.commit().await?;
            report.reencrypted += done;
            report.batches += 1;
            tracing::info!(reencrypted = report.reencrypted, "rotate-keys progress");
        }
    }
}

async fn tx_reencrypt(
    tx: &mut db_pool::Transaction<'_>,
    id: i64,
    old_key: &str,
    access: &[u8],
    refresh: Option<&[u8]>,
    new_key: &str,
) -> Result<bool, db_pool::Error> {
    Ok(tx
        .execute(
            rows::REENCRYPT,
            &[&id, &old_key, &access, &refresh, &new_key],
        )
        .await?
        == 1)
}
