//! `rotate-keys`: re-encrypts every row with the current key in the current
//! format, in batches, each in its own short transaction, then the connect
//! flows in progress; resumable (rows already under the current key and
//! format are skipped), safe beside running refreshes: a row changed
//! between its read and its update keeps the refresh's tokens (written
//! under the current key, or under the old one by an instance not yet
//! restarted with the new keys; the next run re-encrypts those).

use super::{IntegrationsService, ServiceError};
use crate::store::{integrations as rows, oauth_pending, oauth_states, webhooks as webhook_rows};

/// What a rotation did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RotationReport {
    /// Rows re-encrypted.
    pub reencrypted: u64,
    /// Batches (transactions) used.
    pub batches: u64,
    /// Rows that could not be decrypted (altered, or under a key that is
    /// not configured), left as they are.
    pub unreadable: u64,
    /// The ids of the first [`MAX_REPORTED_IDS`] of them.
    pub unreadable_ids: Vec<i64>,
    /// Why the first of them failed.
    pub first_failure: Option<String>,
    /// Connect flows in progress (PKCE verifiers and answers waiting for
    /// the application) re-encrypted, so removing the old key does not
    /// break them.
    pub flows_reencrypted: u64,
    /// Connect flows that could not be decrypted, dropped: each would fail
    /// anyway, and the user starts the connection again.
    pub flows_dropped: u64,
    /// Webhook signing secrets re-encrypted.
    pub webhook_secrets_reencrypted: u64,
    /// Webhook endpoints whose secret could not be decrypted, left as they
    /// are (their deliveries wait; rotate the endpoint's secret).
    pub webhook_secrets_unreadable: u64,
}

/// How many unreadable rows a report names.
pub const MAX_REPORTED_IDS: usize = 20;

impl IntegrationsService {
    /// Re-encrypts every integration not under the current key or not in
    /// the current format (values written before XChaCha20-Poly1305). A row that
    /// cannot be decrypted is left as it is and reported; the others go on.
    pub async fn rotate_keys(&self, batch: i64) -> Result<RotationReport, ServiceError> {
        self.rotate_keys_reporting(batch, |_, _| {}).await
    }

    /// [`IntegrationsService::rotate_keys`], calling `progress` with the
    /// report so far and the rows it found to rewrite at the start, after
    /// each batch.
    pub async fn rotate_keys_reporting(
        &self,
        batch: i64,
        mut progress: impl FnMut(&RotationReport, u64),
    ) -> Result<RotationReport, ServiceError> {
        let current = self.keys.current_id().to_string();
        let mut report = RotationReport::default();
        let mut after = 0i64;
        let total = {
            let mut conn = self.pool.get().await?;
            u64::try_from(rows::count_to_reencrypt(&mut conn, &current).await?).unwrap_or(0)
        };
        progress(&report, total);
        loop {
            let mut conn = self.pool.get().await?;
            let page = rows::to_reencrypt(&mut conn, &current, after, batch.max(1)).await?;
            let Some(last) = page.last() else {
                self.rotate_flows(&current, &mut report).await?;
                self.rotate_webhook_secrets(&current, &mut report).await?;
                return Ok(report);
            };
            after = last.id;
            let mut tx = conn.transaction().await?;
            let mut done = 0;
            for row in &page {
                let (new_access, new_refresh) = match self.reencrypt(row) {
                    Ok(values) => values,
                    Err(e) => {
                        tracing::warn!(id = row.id, error = %e, "rotate-keys: row left as it is");
                        report.unreadable += 1;
                        if report.unreadable_ids.len() < MAX_REPORTED_IDS {
                            report.unreadable_ids.push(row.id);
                        }
                        report.first_failure.get_or_insert_with(|| e.to_string());
                        continue;
                    }
                };
                let sql_ok =
                    tx_reencrypt(&mut tx, row, &new_access, new_refresh.as_deref(), &current)
                        .await?;
                if sql_ok {
                    done += 1;
                }
            }
            tx.commit().await?;
            report.reencrypted += done;
            report.batches += 1;
            progress(&report, total);
            tracing::info!(reencrypted = report.reencrypted, "rotate-keys progress");
        }
    }

    /// Re-encrypts the connect flows in progress (a few: each lives
    /// minutes) under the current key; drops those that cannot be read.
    async fn rotate_flows(
        &self,
        current: &str,
        report: &mut RotationReport,
    ) -> Result<(), ServiceError> {
        let mut conn = self.pool.get().await?;
        for s in oauth_states::under_other_key(&mut conn, current).await? {
            let aad = super::connect::state_aad(&s.state_hash);
            match self.reseal(&s.key_id, &s.code_verifier, &aad)? {
                Some(sealed) => {
                    let hash = &s.state_hash;
                    let done =
                        oauth_states::reencrypt(&mut conn, hash, &s.key_id, &sealed, current)
                            .await?;
                    report.flows_reencrypted += u64::from(done);
                }
                None => {
                    oauth_states::delete(&mut conn, &s.state_hash).await?;
                    report.flows_dropped += 1;
                }
            }
        }
        for p in oauth_pending::under_other_key(&mut conn, current).await? {
            let aad =
                super::connect::pending_aad(&p.flow_hash, &p.user_id, &p.provider, &p.account_id);
            match self.reseal(&p.key_id, &p.tokens, &aad)? {
                Some(sealed) => {
                    let hash = &p.flow_hash;
                    let done =
                        oauth_pending::reencrypt(&mut conn, hash, &p.key_id, &sealed, current)
                            .await?;
                    report.flows_reencrypted += u64::from(done);
                }
                None => {
                    oauth_pending::delete(&mut conn, &p.flow_hash).await?;
                    report.flows_dropped += 1;
                }
            }
        }
        Ok(())
    }

    /// Re-encrypts the webhook signing secrets (at most
    /// [`crate::webhooks::MAX_ENDPOINTS`] endpoints) not under the current
    /// key and format. One rotated at the same moment keeps its new
    /// secret.
    async fn rotate_webhook_secrets(
        &self,
        current: &str,
        report: &mut RotationReport,
    ) -> Result<(), ServiceError> {
        let mut conn = self.pool.get().await?;
        let stale = |(value, key): &(Vec<u8>, String)| {
            key != current || !crate::crypto::Keyring::is_current_format(value)
        };
        for e in webhook_rows::all_secrets(&mut conn).await? {
            let s = &e.secrets;
            if !stale(&s.current) && !s.previous.as_ref().is_some_and(stale) {
                continue;
            }
            let aad = super::webhooks::secret_aad(&e.id);
            let reseal = |(value, key): &(Vec<u8>, String)| {
                let plain = self.keys.decrypt(key, value, &aad)?;
                Ok::<_, crate::crypto::CryptoError>((
                    self.keys.encrypt(&plain, &aad)?,
                    current.to_string(),
                ))
            };
            let resealed = reseal(&s.current).map(|new| webhook_rows::StoredSecrets {
                current: new,
                // A previous secret that cannot be read only stops signing
                // (left as it is; it expires within a day).
                previous: s.previous.as_ref().and_then(|p| reseal(p).ok()),
            });
            match resealed {
                Ok(new) => {
                    if webhook_rows::store_secrets(&mut conn, &e.id, &s.current.0, &new).await? {
                        report.webhook_secrets_reencrypted += 1;
                    }
                }
                Err(err) => {
                    tracing::warn!(webhook = %e.id, error = %err, "rotate-keys: a webhook secret cannot be decrypted; left as it is (rotate the endpoint's secret)");
                    report.webhook_secrets_unreadable += 1;
                }
            }
        }
        Ok(())
    }

    /// A connect flow's value under the current key; `None` when it cannot
    /// be decrypted (the flow is then dropped: it would fail anyway).
    fn reseal(
        &self,
        key_id: &str,
        value: &[u8],
        aad: &str,
    ) -> Result<Option<Vec<u8>>, ServiceError> {
        match self.keys.decrypt(key_id, value, aad) {
            Ok(plain) => Ok(Some(self.keys.encrypt(&plain, aad)?)),
            Err(e) => {
                tracing::warn!(error = %e, "rotate-keys: a connect flow in progress cannot be decrypted; dropped");
                Ok(None)
            }
        }
    }

    /// A row's tokens encrypted with the current key.
    fn reencrypt(
        &self,
        row: &rows::Encrypted,
    ) -> Result<(Vec<u8>, Option<Vec<u8>>), crate::crypto::CryptoError> {
        let (p, a) = (&row.provider, &row.account_id);
        // Decrypted values are cleared when dropped.
        let access =
            self.keys
                .decrypt(&row.key_id, &row.access_token, &Self::aad(p, a, "access"))?;
        let new_access = self.keys.encrypt(&access, &Self::aad(p, a, "access"))?;
        let new_refresh = match &row.refresh_token {
            Some(v) => {
                let plain = self
                    .keys
                    .decrypt(&row.key_id, v, &Self::aad(p, a, "refresh"))?;
                Some(self.keys.encrypt(&plain, &Self::aad(p, a, "refresh"))?)
            }
            None => None,
        };
        Ok((new_access, new_refresh))
    }
}

/// Writes a row's new ciphertexts unless a refresh changed it since it was
/// read (then the refresh's tokens stay).
async fn tx_reencrypt(
    tx: &mut db_pool::Transaction<'_>,
    row: &rows::Encrypted,
    access: &[u8],
    refresh: Option<&[u8]>,
    new_key: &str,
) -> Result<bool, db_pool::Error> {
    Ok(tx
        .execute(
            rows::REENCRYPT,
            &[
                &row.id,
                &row.key_id,
                &access,
                &refresh,
                &new_key,
                &row.access_token,
            ],
        )
        .await?
        == 1)
}
