//! `access_token` and `refresh`: one refresh per token however many ask.
//!
//! Who refreshes is decided by the refresh lease (`lease.rs`): in this
//! process callers of one integration queue on its single flight; across
//! processes the holder of the row's lease refreshes and the others take
//! its result. No pooled connection is held while the provider answers.

use std::time::Duration;

use chrono::Utc;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::SemaphorePermit;

use super::lease::{Lease, Turn};
use super::limits::{Busy, ProviderPermit};
use super::{retried_read, secret, AccessToken, IntegrationsService, ServiceError};
use crate::crypto::CryptoError;
use crate::domain::{AccountId, IntegrationStatus, ProviderName, Status};
use crate::oauth::{OAuthError, Provider, TokenSet};
use crate::store::integrations::{self as rows, Claimed, Failure, Refreshed, TokenRow};

/// How many times a refresh result is written before giving up (a rotated
/// refresh token must not be lost to a passing database error).
const STORE_ATTEMPTS: u32 = 4;

/// `integrations_refreshes_total`'s `outcome`s: the provider answered
/// tokens, refused the grant (`invalid_grant`), failed in a way worth
/// retrying, asked to slow down (429 / `Retry-After`: not the
/// integration's failure), or refused otherwise. `serve` creates each at
/// zero.
pub const REFRESH_OUTCOMES: [&str; 5] = ["ok", "revoked", "transient", "rate_limited", "rejected"];

/// How long a single refresh (an API call, `access_token`) waits for its
/// provider's limits or pause before answering `provider_paused`.
const SINGLE_WAIT: Duration = Duration::from_secs(5);

/// What a refresh holds while it calls its provider: a batch's window slot
/// (given back at the answer) and the provider's permit (its limits).
#[derive(Default)]
pub(super) struct Permits<'a> {
    pub window: Option<SemaphorePermit<'a>>,
    pub provider: Option<ProviderPermit>,
}

impl ServiceError {
    /// A provider paused for longer than the caller could wait.
    pub(super) fn busy(provider: &str, busy: Busy) -> ServiceError {
        ServiceError::ProviderBusy {
            provider: provider.to_string(),
            retry_after: busy.retry_after,
            reason: busy.reason,
        }
    }
}

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

    /// The row's token columns (a read, tried again on a dead connection).
    async fn token_row(&self, p: &str, a: &str) -> Result<TokenRow, ServiceError> {
        retried_read!(self, |conn| rows::token_row(conn, p, a))?
            .ok_or_else(|| ServiceError::not_found(p, a))
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
        match self.lease_after(p, a, seen).await? {
            Turn::Mine(lease) => self
                .refresh_leased(p, a, lease, Permits::default())
                .await
                .map(Some),
            Turn::Done => self.outcome(p, a).await.map(|()| None),
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

    /// Refreshes the row of a lease this instance holds, stores the
    /// outcome (which gives the lease back) and returns the new state. A
    /// batch's `permits` (its window bounds requests to the provider, not
    /// the writes) are given back as soon as the provider has answered;
    /// without a provider permit, one is taken here (waiting at most
    /// [`SINGLE_WAIT`]).
    pub(super) async fn refresh_leased(
        &self,
        p: &str,
        a: &str,
        lease: Lease,
        permits: Permits<'_>,
    ) -> Result<IntegrationStatus, ServiceError> {
        let result = self.refresh_row(p, a, &lease.row, permits).await;
        // A refresh not sent, or refused by a paused provider, is no
        // attempt: the others waiting for this integration's turn must not
        // take its (unchanged) state for a result; they try, and wait,
        // themselves. The row's lease goes back (to be claimed after the
        // pause) unless one of them holds it already.
        if matches!(result, Err(ServiceError::ProviderBusy { .. })) {
            self.give_back_unsent(&lease).await;
        } else {
            lease.finish();
        }
        result
    }

    /// The refresh of a leased row: the provider call, then the success or
    /// the failure stored. When it cannot start, the lease is given back;
    /// when the provider is paused or asks to slow down, nothing is
    /// recorded against the integration (`ProviderBusy`, whose lease
    /// [`Self::refresh_leased`] gives back).
    async fn refresh_row(
        &self,
        p: &str,
        a: &str,
        row: &Claimed,
        mut permits: Permits<'_>,
    ) -> Result<IntegrationStatus, ServiceError> {
        let (provider, old_refresh) = match self.refresh_input(p, a, row) {
            Ok(Some(input)) => input,
            Ok(None) => {
                self.release(row).await;
                return Err(self.not_refreshable(p, a).await);
            }
            Err(e) => {
                self.release(row).await;
                return Err(e);
            }
        };
        if permits.provider.is_none() {
            match self.gates.acquire(p, Some(SINGLE_WAIT)).await {
                Ok(permit) => permits.provider = permit,
                Err(busy) => return Err(ServiceError::busy(p, busy)),
            }
        }
        match self.call_provider(p, provider, &old_refresh, permits).await {
            Ok(tokens) => self.store_success(p, a, row, &tokens, &old_refresh).await,
            Err(OAuthError::RateLimited { retry_after, .. }) => Err(ServiceError::busy(
                p,
                Busy {
                    retry_after,
                    reason: "rate_limited",
                },
            )),
            Err(e) => Err(self.store_failure(p, row, e).await),
        }
    }

    /// The provider and the decrypted refresh token to refresh with;
    /// `None` when the row has no refresh token.
    fn refresh_input(
        &self,
        p: &str,
        a: &str,
        row: &Claimed,
    ) -> Result<Option<(&Provider, SecretString)>, ServiceError> {
        let provider = self.configured(p)?;
        let Some(stored) = &row.refresh_token else {
            return Ok(None);
        };
        let plain = self
            .keys
            .decrypt(&row.key_id, stored, &Self::aad(p, a, "refresh"))?;
        Ok(Some((provider, secret(plain))))
    }

    /// Why an integration stored without a refresh token was not
    /// refreshed: it is usable until it expires (an extra read, on this
    /// error path only).
    async fn not_refreshable(&self, p: &str, a: &str) -> ServiceError {
        let expires_at = match self.integration(p, a).await {
            Ok(status) => status.expires_at,
            Err(e) => return e,
        };
        if expires_at.is_some_and(|at| at <= Utc::now()) {
            return ServiceError::NeedsReconnect {
                provider: p.to_string(),
                status: "expired",
            };
        }
        ServiceError::NoRefreshToken {
            provider: p.to_string(),
            expires_at,
        }
    }

    /// The refresh_token grant, timed and counted by outcome. No
    /// connection is held meanwhile; the permits are given back at the
    /// answer, which the provider's gate learns.
    async fn call_provider(
        &self,
        p: &str,
        provider: &Provider,
        old_refresh: &SecretString,
        permits: Permits<'_>,
    ) -> Result<TokenSet, OAuthError> {
        let started = std::time::Instant::now();
        let result = self.tokens.refresh(provider, old_refresh).await;
        let Permits { window, provider } = permits;
        drop(window);
        if let Some(gate) = provider {
            gate.finish(&result);
        }
        metrics::histogram!("integrations_refresh_seconds", "provider" => p.to_string())
            .record(started.elapsed());
        let [ok, revoked, transient, rate_limited, rejected] = REFRESH_OUTCOMES;
        let outcome = match &result {
            Ok(_) => ok,
            Err(OAuthError::InvalidGrant { .. }) => revoked,
            Err(OAuthError::RateLimited { .. }) => rate_limited,
            Err(e) if e.is_transient() => transient,
            Err(_) => rejected,
        };
        metrics::counter!("integrations_refreshes_total", "provider" => p.to_string(), "outcome" => outcome)
            .increment(1);
        result
    }

    /// Stores new tokens, encrypted under the current key, and returns the
    /// new state (read again when the lease was lost meanwhile).
    async fn store_success(
        &self,
        p: &str,
        a: &str,
        row: &Claimed,
        tokens: &TokenSet,
        old_refresh: &SecretString,
    ) -> Result<IntegrationStatus, ServiceError> {
        let key = self.keys.current_id().to_string();
        let (access, refresh) = match self.encrypt_refreshed(p, a, tokens, old_refresh) {
            Ok(values) => values,
            Err(e) => {
                self.release(row).await;
                return Err(e.into());
            }
        };
        let update = Refreshed {
            id: row.id,
            access_token: access,
            refresh_token: refresh,
            key_id: key,
            expires_at: tokens.expires_at,
            scopes: (!tokens.scopes.is_empty()).then(|| tokens.scopes.clone()),
            token_type: tokens.token_type.clone(),
        };
        let stored = self.write_back(update).await;
        self.forget_status(&row.user_id);
        match stored.map_err(ServiceError::Db)? {
            Some(status) => Ok(status),
            None => {
                tracing::warn!("refresh lease expired before the result was stored; another instance took over");
                self.integration(p, a).await
            }
        }
    }

    /// The new access token and the refresh token to keep (the new one,
    /// or the old one when the response carried none), encrypted under the
    /// current key.
    fn encrypt_refreshed(
        &self,
        p: &str,
        a: &str,
        tokens: &TokenSet,
        old_refresh: &SecretString,
    ) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
        let refresh_plain = tokens.refresh_token.as_ref().unwrap_or(old_refresh);
        let access = self.keys.encrypt(
            tokens.access_token.expose_secret().as_bytes(),
            &Self::aad(p, a, "access"),
        )?;
        let refresh = self.keys.encrypt(
            refresh_plain.expose_secret().as_bytes(),
            &Self::aad(p, a, "refresh"),
        )?;
        Ok((access, refresh))
    }

    /// Records a failed refresh (the stored tokens stay) and returns the
    /// error for the caller.
    async fn store_failure(&self, p: &str, row: &Claimed, e: OAuthError) -> ServiceError {
        let failure = match &e {
            OAuthError::InvalidGrant { .. } => Failure::Revoked,
            e if e.is_transient() => Failure::Transient {
                backoff_secs: self.config.failure_backoff.as_secs_f64(),
                max_failures: self.config.max_failures,
            },
            _ => Failure::Rejected,
        };
        let (code, message) = (e.code().to_string(), e.to_string());
        tracing::warn!(error = %message, "token refresh failed");
        let owner = self.config.instance_id.as_str();
        let status = self
            .store_with_retry(|mut conn| {
                let (code, message, id) = (code.clone(), message.clone(), row.id);
                async move {
                    rows::store_failure(&mut conn, id, owner, failure, &code, &message).await
                }
            })
            .await;
        self.forget_status(&row.user_id);
        match (failure, status) {
            (_, Err(db)) => db.into(),
            (Failure::Revoked, _) => ServiceError::NeedsReconnect {
                provider: p.to_string(),
                status: "revoked",
            },
            (_, Ok(status)) => ServiceError::RefreshFailed {
                message,
                transient: failure != Failure::Rejected
                    && status.is_none_or(|s| s.status != Status::Error),
            },
        }
    }

    /// Runs a write that must not be lost, retrying transient database
    /// failures (each attempt on a fresh connection).
    pub(super) async fn store_with_retry<T, F, Fut>(
        &self,
        mut write: F,
    ) -> Result<T, db_pool::Error>
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
