//! Webhook endpoints and their deliveries, as the admin API manages them.
//! Deliveries themselves are queued by the database (migration V7) and
//! sent by the dispatcher (`delivery.rs`).

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};

use super::{IntegrationsService, ServiceError};
use crate::domain::{event_types, Delivery, DeliveryStatus, InvalidInput, Webhook, WebhookId};
use crate::store::webhooks as rows;
use crate::webhooks::{address, sign, Sender, SigningKey, MAX_ENDPOINTS, SECRET_OVERLAP};

/// A new endpoint and its signing secret, shown only in this answer.
pub struct CreatedWebhook {
    /// The endpoint.
    pub webhook: Webhook,
    /// `whsec_...`.
    pub secret: SecretString,
}

impl std::fmt::Debug for CreatedWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedWebhook")
            .field("webhook", &self.webhook)
            .finish_non_exhaustive()
    }
}

/// A rotated secret.
pub struct RotatedSecret {
    /// The new `whsec_...`, shown only in this answer.
    pub secret: SecretString,
    /// Until when the old one still signs beside it.
    pub previous_secret_expires_at: DateTime<Utc>,
}

/// What a test delivery got.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct TestDelivery {
    /// A 2xx arrived within the timeout.
    pub delivered: bool,
    /// The HTTP status (null: no answer).
    pub status: Option<u16>,
    /// Why it failed.
    pub error: Option<String>,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// The `webhook-id` header it carried (`test_...`).
    pub message_id: String,
}

/// Longest a test delivery waits for the endpoint.
const TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The AAD binding an endpoint's secret to its row.
pub(super) fn secret_aad(id: &str) -> String {
    format!("webhook:{id}:secret")
}

impl IntegrationsService {
    /// The delivery client, built on first use.
    pub(super) async fn webhook_sender(&self) -> Result<&Sender, ServiceError> {
        self.webhook_sender
            .get_or_try_init(|| async {
                Sender::new(self.config.webhooks.send.clone()).map_err(|e| {
                    ServiceError::Internal(format!("building the webhook client failed: {e}"))
                })
            })
            .await
    }

    /// Registers an endpoint: `url` checked (https and public unless
    /// allowed), `types` the event types (all when `None`).
    pub async fn create_webhook(
        &self,
        url: &str,
        types: Option<&[String]>,
    ) -> Result<CreatedWebhook, ServiceError> {
        let types = event_types("event_types", types)?;
        let url = address::check_endpoint_url(url, self.config.webhooks.send.allow_private)
            .await
            .map_err(|e| InvalidInput::new("url", e.to_string()))?;
        let id = WebhookId::generate();
        let secret = sign::new_secret();
        let encrypted = self
            .keys
            .encrypt(secret.expose_secret().as_bytes(), &secret_aad(id.as_str()))?;
        let mut conn = self.pool.get().await?;
        let created_at = rows::insert(
            &mut conn,
            id.as_str(),
            url.as_str(),
            &types,
            &encrypted,
            self.keys.current_id(),
            MAX_ENDPOINTS,
        )
        .await?
        .ok_or(ServiceError::TooManyWebhooks)?;
        tracing::info!(webhook = %id, "webhook endpoint registered");
        Ok(CreatedWebhook {
            webhook: Webhook {
                id: id.as_str().to_string(),
                url: url.to_string(),
                event_types: types,
                status: "enabled",
                created_at,
                failing_since: None,
                disabled_at: None,
                disabled_reason: None,
                previous_secret_expires_at: None,
            },
            secret,
        })
    }

    /// Every endpoint.
    pub async fn webhooks(&self) -> Result<Vec<Webhook>, ServiceError> {
        let mut conn = self.pool.get().await?;
        Ok(rows::list(&mut conn).await?)
    }

    /// One endpoint.
    pub async fn webhook(&self, id: &WebhookId) -> Result<Webhook, ServiceError> {
        let mut conn = self.pool.get().await?;
        rows::get(&mut conn, id.as_str())
            .await?
            .ok_or(ServiceError::WebhookNotFound)
    }

    /// Deletes an endpoint and its deliveries (again when it deadlocked
    /// with a dispatcher recording an attempt: they lock the endpoint and
    /// its deliveries in opposite orders, and the delete is the rare one).
    pub async fn delete_webhook(&self, id: &WebhookId) -> Result<(), ServiceError> {
        let mut conn = self.pool.get().await?;
        let mut tries = 0;
        let deleted = loop {
            tries += 1;
            match rows::delete(&mut conn, id.as_str()).await {
                Err(e) if e.sqlstate() == Some("40P01") && tries < 3 => continue,
                other => break other?,
            }
        };
        if !deleted {
            return Err(ServiceError::WebhookNotFound);
        }
        tracing::info!(webhook = %id, "webhook endpoint deleted");
        Ok(())
    }

    /// A new secret; the old one signs beside it for [`SECRET_OVERLAP`]
    /// (a secret rotated out before replaces the older one).
    pub async fn rotate_webhook_secret(
        &self,
        id: &WebhookId,
    ) -> Result<RotatedSecret, ServiceError> {
        let secret = sign::new_secret();
        let encrypted = self
            .keys
            .encrypt(secret.expose_secret().as_bytes(), &secret_aad(id.as_str()))?;
        let mut conn = self.pool.get().await?;
        let until = rows::rotate(
            &mut conn,
            id.as_str(),
            &encrypted,
            self.keys.current_id(),
            SECRET_OVERLAP.as_secs_f64(),
        )
        .await?
        .ok_or(ServiceError::WebhookNotFound)?;
        tracing::info!(webhook = %id, "webhook secret rotated");
        Ok(RotatedSecret {
            secret,
            previous_secret_expires_at: until,
        })
    }

    /// Enables a disabled endpoint: its pending deliveries go out again.
    pub async fn enable_webhook(&self, id: &WebhookId) -> Result<Webhook, ServiceError> {
        let mut conn = self.pool.get().await?;
        if !rows::enable(&mut conn, id.as_str()).await? {
            return Err(ServiceError::WebhookNotFound);
        }
        drop(conn);
        self.wake_dispatcher();
        self.webhook(id).await
    }

    /// Sends a `webhook.test` event to the endpoint now, signed like any
    /// delivery, and says what came back. Nothing is stored.
    pub async fn test_webhook(&self, id: &WebhookId) -> Result<TestDelivery, ServiceError> {
        let (webhook, secrets) = {
            let mut conn = self.pool.get().await?;
            let webhook = rows::get(&mut conn, id.as_str())
                .await?
                .ok_or(ServiceError::WebhookNotFound)?;
            let secrets = rows::secrets(&mut conn, id.as_str())
                .await?
                .ok_or(ServiceError::WebhookNotFound)?;
            (webhook, secrets)
        };
        let keys = self.signing_keys(id.as_str(), &secrets)?;
        let url = url::Url::parse(&webhook.url)
            .map_err(|e| ServiceError::Internal(format!("a stored webhook URL is invalid: {e}")))?;
        let message_id = format!("test_{:016x}", rand::random::<u64>());
        let body = serde_json::json!({
            "id": message_id,
            "type": "webhook.test",
            "created_at": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "data": {"endpoint": webhook.id},
        });
        let body = serde_json::to_vec(&body)
            .map_err(|e| ServiceError::Internal(format!("a test event did not render: {e}")))?;
        let refs: Vec<&SigningKey> = keys.iter().collect();
        // Within the request's own deadline (10 s by default), so the answer
        // says what the endpoint did.
        let attempt = self
            .webhook_sender()
            .await?
            .send_within(&url, &message_id, body, &refs, TEST_TIMEOUT)
            .await;
        Ok(TestDelivery {
            delivered: attempt.delivered(),
            status: attempt.status,
            error: attempt.error,
            duration_ms: u64::try_from(attempt.elapsed.as_millis()).unwrap_or(u64::MAX),
            message_id,
        })
    }

    /// The keys an endpoint's deliveries are signed with: its secret, then
    /// the one before the last rotation while that still signs.
    pub(super) fn signing_keys(
        &self,
        id: &str,
        secrets: &rows::StoredSecrets,
    ) -> Result<Vec<SigningKey>, ServiceError> {
        let aad = secret_aad(id);
        let key = |(ciphertext, key_id): &(Vec<u8>, String)| {
            let plain = self.keys.decrypt(key_id, ciphertext, &aad)?;
            let text = String::from_utf8(plain.to_vec())
                .map(SecretString::from)
                .map_err(|_| ServiceError::Internal("a webhook secret is not text".into()))?;
            SigningKey::from_secret(&text)
                .ok_or_else(|| ServiceError::Internal("a webhook secret is not whsec_".into()))
        };
        let mut keys = vec![key(&secrets.current)?];
        // The secret before a rotation only adds a signature: one that
        // cannot be read (its key removed) is left out.
        match secrets.previous.as_ref().map(key) {
            Some(Ok(previous)) => keys.push(previous),
            Some(Err(e)) => {
                tracing::warn!(webhook = %id, error = %e, "the webhook's previous secret cannot be decrypted; signing with the current one only")
            }
            None => {}
        }
        Ok(keys)
    }

    /// Deliveries to an endpoint after the delivery `after`, of `status`
    /// when given, oldest first (404 for an unknown endpoint).
    pub async fn webhook_deliveries(
        &self,
        id: &WebhookId,
        status: Option<DeliveryStatus>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Delivery>, ServiceError> {
        let mut conn = self.pool.get().await?;
        if rows::get(&mut conn, id.as_str()).await?.is_none() {
            return Err(ServiceError::WebhookNotFound);
        }
        Ok(rows::deliveries(&mut conn, id.as_str(), after, limit, status).await?)
    }

    /// Queues an event again for every endpoint subscribed to its
    /// type; how many deliveries were queued (one still pending is left to
    /// run and not counted).
    pub async fn redeliver_event(&self, event_id: i64) -> Result<i64, ServiceError> {
        let mut conn = self.pool.get().await?;
        let queued = rows::redeliver(&mut conn, event_id)
            .await?
            .ok_or(ServiceError::EventNotFound(event_id))?;
        drop(conn);
        self.wake_dispatcher();
        Ok(queued)
    }

    /// Wakes this instance's dispatcher to claim for every endpoint (the
    /// other instances hear the database's notification).
    pub fn wake_dispatcher(&self) {
        self.webhook_wake.any();
    }

    /// The database queued deliveries: `payload` is the notification's, the
    /// endpoints that got them (comma separated; empty: any).
    pub fn webhooks_queued(&self, payload: &str) {
        self.webhook_wake.endpoints(payload);
    }
}
