//! `access_token` and `refresh`: one refresh per token however many ask.
//!
//! In this process, callers of one integration queue on its single-flight
//! lock. Across processes, the one that claims the row's lease (one
//! conditional UPDATE) refreshes; the others wait until the row's refresh
//! generation moves, then take that result. A lease expires by itself if its
//! holder dies. No pooled connection is held while the provider answers.

use std::time::Duration;

use chrono::Utc;
use secrecy::ExposeSecret;
use tokio::sync::SemaphorePermit;

use super::{secret, AccessToken, Flight, IntegrationsService, ServiceError};
use crate::domain::{AccountId, IntegrationStatus, ProviderName, Status};
use crate::oauth::OAuthError;
use crate::store::integrations::{self as rows, Claimed, Failure, Refreshed, TokenRow};

/// How often a caller waiting for another instance's refresh looks again.
const WAIT_POLL: Duration = Duration::from_millis(50);

/// How many times a refresh result is written before giving up (a rotated
/// refresh token must not be lost to a passing database error).
const STORE_ATTEMPTS: u32 = 4;

impl IntegrationsService {
    /// A valid access token, refreshed first when it expires within
    /// `refresh_margin` (5 minutes by default).
    #[tracing::instrument(skip_all, fields(provider = %provider, account_id = %account_id))]
    pub async fn access_token(
        &self,
        provider: &ProviderName,
        account_id: &AccountId,
    ) -> Result<AccessToken, ServiceError> {
        let (p, a) = (provider.as_str(), account_id.as_str());
        self.providers.get(p)?;
        let row = self.token_row(p, a).await?;
        if let Some(token) = self.usable(p, a, &row)? {
            return Ok(token);
        }
        self.configured(p)?;
        self.refresh_after(p, a, row.generation).await?;
        let row = self.token_row(p, a).await?;
        self.usable(p, a, &row)?
            .ok_or_else(|| ServiceError::RefreshFailed {
                message: row
                    .last_error
                    .unwrap_or_else(|| "the refreshed token expires within the margin".into()),
                transient: true,
            })
    }

    /// Refreshes the token now (the refresh_token grant) and returns the
    /// integration's new state. Concurrent callers share one refresh.
    #[tracing::instrument(skip_all, fields(provider = %provider, account_id = %account_id))]
    pub async fn refresh(
        &self,
        provider: &ProviderName,
        account_id: &AccountId,
    ) -> Result<IntegrationStatus, ServiceError> {
        let (p, a) = (provider.as_str(), account_id.as_str());
        self.configured(p)?;
        let seen = self.token_row(p, a).await?.generation;
        match self.refresh_after(p, a, seen).await? {
            Some(status) => Ok(status),
            None => self.integration(p, a).await,
        }
    }

    /// The row's token columns. A read whose connection turned out dead
    /// (its backend terminated, the server restarted) is tried again on
    /// another connection, up to [`super::READ_ATTEMPTS`] in all: it
    /// changed nothing, and when every backend dies at once the next
    /// connection may be dead too.
    async fn token_row(&self, p: &str, a: &str) -> Result<TokenRow, ServiceError> {
        let mut attempt = 1;
        loop {
            let mut conn = self.pool.get().await?;
            match rows::token_row(&mut conn, p, a).await {
                Err(db_pool::Error::ConnectionClosed) if attempt < super::READ_ATTEMPTS => {
                    attempt += 1;
                }
                read => return read?.ok_or_else(|| not_found(p, a)),
            }
        }
    }

    /// The stored token when it can be used as is; `None` when it must be
    /// refreshed first.
    fn usable(
        &self,
        p: &str,
        a: &str,
        row: &TokenRow,
    ) -> Result<Option<AccessToken>, ServiceError> {
        if row.status == Status::Revoked {
            return Err(ServiceError::NeedsReconnect {
                provider: p.to_string(),
                status: "revoked",
            });
        }
        let now = Utc::now();
        let margin = chrono::Duration::from_std(self.config.refresh_margin).unwrap_or_default();
        let fresh = row.expires_at.is_none_or(|e| e > now + margin);
        let expired = row.expires_at.is_some_and(|e| e <= now);
        if !fresh && row.refreshable {
            return Ok(None);
        }
        if expired {
            return Err(ServiceError::NeedsReconnect {
                provider: p.to_string(),
                status: "expired",
            });
        }
        let plain =
            self.keys
                .decrypt(&row.key_id, &row.access_token, &Self::aad(p, a, "access"))?;
        Ok(Some(AccessToken {
            token: secret(plain),
            expires_at: row.expires_at,
            token_type: row.token_type.clone(),
        }))
    }

    /// Makes sure a refresh completed after generation `seen`: runs it
    /// (returning the new state), or waits for whoever is running it and
    /// returns its outcome (`Ok(None)` when it succeeded).
    pub(super) async fn refresh_after(
        &self,
        p: &str,
        a: &str,
        seen: i64,
    ) -> Result<Option<IntegrationStatus>, ServiceError> {
        let flight = self.flight(p, a);
        let _turn = flight.lock.lock().await;
        let deadline = tokio::time::Instant::now() + self.config.lease + Duration::from_secs(5);
        loop {
            let mut conn = self.pool.get().await?;
            let (generation, leased) = rows::lease_state(&mut conn, p, a, &self.config.instance_id)
                .await?
                .ok_or_else(|| not_found(p, a))?;
            if generation > seen {
                drop(conn);
                return self.outcome(p, a).await.map(|()| None);
            }
            if !leased {
                let claimed = rows::claim(
                    &mut conn,
                    p,
                    a,
                    self.config.lease.as_secs_f64(),
                    &self.config.instance_id,
                )
                .await?;
                drop(conn);
                if let Some(claimed) = claimed {
                    if claimed.generation > seen {
                        self.release(&claimed).await;
                        return self.outcome(p, a).await.map(|()| None);
                    }
                    return self
                        .refresh_claimed(p, a, claimed, &flight, None)
                        .await
                        .map(Some);
                }
            } else {
                drop(conn);
            }
            // Another instance holds the lease: wait for its result.
            if tokio::time::Instant::now() >= deadline {
                return Err(ServiceError::RefreshFailed {
                    message: "another instance's refresh did not finish within the lease".into(),
                    transient: true,
                });
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }

    /// The result of the latest completed refresh attempt.
    pub(super) async fn outcome(&self, p: &str, a: &str) -> Result<(), ServiceError> {
        let row = self.token_row(p, a).await?;
        match row.status {
            Status::Revoked => Err(ServiceError::NeedsReconnect {
                provider: p.to_string(),
                status: "revoked",
            }),
            _ if row.refresh_failures > 0 => Err(ServiceError::RefreshFailed {
                message: row.last_error.unwrap_or_else(|| "refresh failed".into()),
                transient: row.status != Status::Error,
            }),
            _ => Ok(()),
        }
    }

    pub(super) async fn release(&self, claimed: &Claimed) {
        if let Ok(mut conn) = self.pool.get().await {
            let _ = rows::release(&mut conn, claimed.id, &self.config.instance_id).await;
        }
    }

    /// Refreshes a row whose lease this instance holds, stores the outcome,
    /// releases the lease and returns the new state. The caller holds the
    /// flight's lock. A batch's `permit` (its window bounds requests to the
    /// provider, not the writes) is given back as soon as the provider has
    /// answered.
    pub(super) async fn refresh_claimed(
        &self,
        p: &str,
        a: &str,
        claimed: Claimed,
        flight: &Flight,
        permit: Option<SemaphorePermit<'_>>,
    ) -> Result<IntegrationStatus, ServiceError> {
        let result = self.refresh_claimed_inner(p, a, claimed, permit).await;
        flight
            .completed
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        result
    }

    async fn refresh_claimed_inner(
        &self,
        p: &str,
        a: &str,
        claimed: Claimed,
        permit: Option<SemaphorePermit<'_>>,
    ) -> Result<IntegrationStatus, ServiceError> {
        let provider = match self.configured(p) {
            Ok(provider) => provider,
            Err(e) => {
                self.release(&claimed).await;
                return Err(e);
            }
        };
        let Some(stored) = &claimed.refresh_token else {
            self.release(&claimed).await;
            // Stored without a refresh token: not refreshable, but usable
            // until it expires (an extra read, on this error path only).
            let expires_at = self.integration(p, a).await?.expires_at;
            if expires_at.is_some_and(|at| at <= Utc::now()) {
                return Err(ServiceError::NeedsReconnect {
                    provider: p.to_string(),
                    status: "expired",
                });
            }
            return Err(ServiceError::NoRefreshToken {
                provider: p.to_string(),
                expires_at,
            });
        };
        let refresh_aad = Self::aad(p, a, "refresh");
        let old_refresh = match self.keys.decrypt(&claimed.key_id, stored, &refresh_aad) {
            Ok(plain) => secret(plain),
            Err(e) => {
                self.release(&claimed).await;
                return Err(e.into());
            }
        };

        // The provider call: no connection is held meanwhile.
        let started = std::time::Instant::now();
        let result = self.tokens.refresh(provider, &old_refresh).await;
        drop(permit);
        metrics::histogram!("integrations_refresh_seconds", "provider" => p.to_string())
            .record(started.elapsed());

        let outcome = match &result {
            Ok(_) => "ok",
            Err(OAuthError::InvalidGrant { .. }) => "revoked",
            Err(e) if e.is_transient() => "transient",
            Err(_) => "rejected",
        };
        metrics::counter!("integrations_refreshes_total", "provider" => p.to_string(), "outcome" => outcome)
            .increment(1);
        let owner = self.config.instance_id.as_str();
        let stored_ok = match result {
            Ok(tokens) => {
                let key = self.keys.current_id().to_string();
                // A response without a refresh token keeps the old one,
                // re-encrypted under the current key with the access token.
                let refresh_plain = tokens.refresh_token.as_ref().unwrap_or(&old_refresh);
                let encrypted = self
                    .keys
                    .encrypt(
                        tokens.access_token.expose_secret().as_bytes(),
                        &Self::aad(p, a, "access"),
                    )
                    .and_then(|access| {
                        self.keys
                            .encrypt(refresh_plain.expose_secret().as_bytes(), &refresh_aad)
                            .map(|refresh| (access, refresh))
                    });
                let (access, refresh) = match encrypted {
                    Ok(values) => values,
                    Err(e) => {
                        self.release(&claimed).await;
                        return Err(e.into());
                    }
                };
                let scopes = (!tokens.scopes.is_empty()).then_some(tokens.scopes.as_slice());
                let update = Refreshed {
                    access_token: &access,
                    refresh_token: &refresh,
                    key_id: &key,
                    expires_at: tokens.expires_at,
                    scopes,
                    token_type: &tokens.token_type,
                };
                let (update, id) = (&update, claimed.id);
                self.store_with_retry(move |mut conn| async move {
                    rows::store_refreshed(&mut conn, id, owner, update).await
                })
                .await
                .map_err(ServiceError::from)
            }
            Err(e) => {
                let failure = match &e {
                    OAuthError::InvalidGrant { .. } => Failure::Revoked,
                    e if e.is_transient() => Failure::Transient {
                        backoff_secs: self.config.failure_backoff.as_secs_f64(),
                        max_failures: self.config.max_failures,
                    },
                    _ => Failure::Rejected,
                };
                let message = e.to_string();
                tracing::warn!(error = %message, "token refresh failed");
                let status = self
                    .store_with_retry(|mut conn| {
                        let (message, id) = (message.clone(), claimed.id);
                        async move { rows::store_failure(&mut conn, id, owner, failure, &message).await }
                    })
                    .await;
                self.forget_status(&claimed.user_id);
                return match (failure, status) {
                    (_, Err(db)) => Err(db.into()),
                    (Failure::Revoked, _) => Err(ServiceError::NeedsReconnect {
                        provider: p.to_string(),
                        status: "revoked",
                    }),
                    (_, Ok(status)) => Err(ServiceError::RefreshFailed {
                        message,
                        transient: failure != Failure::Rejected
                            && status.is_none_or(|s| s.status != Status::Error),
                    }),
                };
            }
        };
        self.forget_status(&claimed.user_id);
        match stored_ok? {
            Some(status) => Ok(status),
            None => {
                tracing::warn!("refresh lease expired before the result was stored; another instance took over");
                self.integration(p, a).await
            }
        }
    }

    /// Runs a write that must not be lost, retrying transient database
    /// failures (each attempt on a fresh connection).
    async fn store_with_retry<T, F, Fut>(&self, mut write: F) -> Result<T, db_pool::Error>
    where
        F: FnMut(db_pool::Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, db_pool::Error>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match self.pool.get().await {
                Ok(conn) => write(conn).await,
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.is_transient() && attempt < STORE_ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "storing a refresh result failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * 4u64.pow(attempt - 1))).await;
                }
                other => return other,
            }
        }
    }
}

fn not_found(p: &str, a: &str) -> ServiceError {
    ServiceError::NotFound {
        provider: p.to_string(),
        account_id: a.to_string(),
    }
}
