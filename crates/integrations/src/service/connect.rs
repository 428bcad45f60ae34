//! Connecting and disconnecting: storing a token response, deleting (and
//! revoking), and the OAuth connect flow (authorize URL with a single-use
//! state and PKCE; callback exchanging the code).

use chrono::{DateTime, Utc};
use rand::RngCore;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use super::{IntegrationsService, ServiceError};
use crate::domain::{AccountId, IntegrationStatus, InvalidInput, ProviderName, UserId};
use crate::oauth::{authorize_url, pkce_pair, TokenSet};
use crate::store::{integrations as rows, oauth_states};

/// The start of a connect flow.
#[derive(Debug, Clone)]
pub struct StartedConnect {
    /// Where to send the user.
    pub authorize_url: String,
    /// When the state expires.
    pub expires_at: DateTime<Utc>,
}

/// How a connect flow ended: where to send the user back (when the state
/// was valid) and the outcome.
#[derive(Debug)]
pub struct FinishedConnect {
    /// The application's redirect URI from the state, when it was valid.
    pub redirect_uri: Option<String>,
    /// The integration, or why it failed.
    pub result: Result<IntegrationStatus, ServiceError>,
}

impl IntegrationsService {
    /// Stores tokens the application obtained (creating or replacing the
    /// integration). A response without a refresh token keeps the stored
    /// one. Fails with `Conflict` when the account belongs to another user.
    #[tracing::instrument(skip_all, fields(user_id = %user_id, provider = %provider, account_id = %account_id))]
    pub async fn connect(
        &self,
        user_id: &UserId,
        provider: &ProviderName,
        account_id: &AccountId,
        tokens: &TokenSet,
        metadata: Option<&serde_json::Value>,
    ) -> Result<IntegrationStatus, ServiceError> {
        let (p, a) = (provider.as_str(), account_id.as_str());
        self.providers.get(p)?;
        if let Some(m) = metadata {
            if !m.is_object() {
                return Err(InvalidInput::new("metadata", "it must be a JSON object").into());
            }
        }
        let key = self.keys.current_id().to_string();
        let access = self.keys.encrypt(
            tokens.access_token.expose_secret().as_bytes(),
            &Self::aad(p, a, "access"),
        )?;
        let mut refresh = tokens
            .refresh_token
            .as_ref()
            .map(|t| {
                self.keys
                    .encrypt(t.expose_secret().as_bytes(), &Self::aad(p, a, "refresh"))
            })
            .transpose()?;
        let mut conn = self.pool.get().await?;
        // Retried once: without a new refresh token, a stored one under an
        // older key is re-encrypted first.
        for _ in 0..2 {
            let stored = rows::upsert(
                &mut conn,
                &rows::NewTokens {
                    user_id: user_id.as_str(),
                    provider: p,
                    account_id: a,
                    scopes: &tokens.scopes,
                    token_type: &tokens.token_type,
                    access_token: &access,
                    refresh_token: refresh.as_deref(),
                    key_id: &key,
                    expires_at: tokens.expires_at,
                    metadata,
                },
            )
            .await?;
            if let Some(status) = stored {
                drop(conn);
                self.invalidate(user_id.as_str()).await;
                return Ok(status);
            }
            match rows::owner(&mut conn, p, a).await? {
                Some(owner) if owner != user_id.as_str() => {
                    return Err(ServiceError::Conflict {
                        provider: p.to_string(),
                        account_id: a.to_string(),
                    })
                }
                _ => {}
            }
            // Same owner, refresh token under an older key.
            if let Some((Some(old), key_id)) = rows::stored_refresh_token(&mut conn, p, a).await? {
                let aad = Self::aad(p, a, "refresh");
                let plain = self.keys.decrypt(&key_id, &old, &aad)?;
                refresh = Some(self.keys.encrypt(&plain, &aad)?);
            }
        }
        Err(ServiceError::Conflict {
            provider: p.to_string(),
            account_id: a.to_string(),
        })
    }

    /// Deletes a user's integration and revokes its tokens at the provider
    /// (where it has a revoke URL; best effort, after the delete). False
    /// when there was none.
    #[tracing::instrument(skip_all, fields(user_id = %user_id, provider = %provider, account_id = %account_id))]
    pub async fn disconnect(
        &self,
        user_id: &UserId,
        provider: &ProviderName,
        account_id: &AccountId,
    ) -> Result<bool, ServiceError> {
        let (p, a) = (provider.as_str(), account_id.as_str());
        let registered = self.providers.get(p)?;
        let deleted = {
            let mut conn = self.pool.get().await?;
            rows::delete(&mut conn, user_id.as_str(), p, a).await?
        };
        let Some(deleted) = deleted else {
            return Ok(false);
        };
        self.invalidate(user_id.as_str()).await;
        // The refresh token revokes the whole grant where providers support
        // it; otherwise the access token.
        let (value, aad_field, hint) = match &deleted.refresh_token {
            Some(r) => (r, "refresh", "refresh_token"),
            None => (&deleted.access_token, "access", "access_token"),
        };
        match self
            .keys
            .decrypt(&deleted.key_id, value, &Self::aad(p, a, aad_field))
        {
            Ok(plain) => {
                let token = super::secret(plain);
                if let Err(e) = self.tokens.revoke(registered, &token, hint).await {
                    tracing::warn!(error = %e, "revoking the token at the provider failed; the integration is deleted");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot decrypt the token to revoke it"),
        }
        Ok(true)
    }

    /// Starts the OAuth flow: a single-use `state` (stored hashed, with the
    /// PKCE verifier encrypted, expiring after `state_ttl`) and the
    /// provider's authorize URL.
    pub async fn start_connect(
        &self,
        user_id: &UserId,
        provider: &ProviderName,
        redirect_uri: &str,
    ) -> Result<StartedConnect, ServiceError> {
        let p = self.providers.get(provider.as_str())?;
        check_redirect(redirect_uri)?;
        let callback = self.config.callback_url.as_deref().ok_or_else(|| {
            InvalidInput::new(
                "callback_url",
                "the service has no OAuth callback URL; set INTEGRATIONS_CALLBACK_URL to this service's /v1/oauth/callback",
            )
        })?;
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        let state = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, raw);
        let hash = Sha256::digest(state.as_bytes()).to_vec();
        let (verifier, challenge) = if p.pkce {
            let (v, c) = pkce_pair();
            (Some(v), Some(c))
        } else {
            (None, None)
        };
        let url = authorize_url(p, callback, &state, challenge.as_deref(), None)?;
        let aad = state_aad(&hash);
        let encrypted = verifier
            .map(|v| self.keys.encrypt(v.expose_secret().as_bytes(), &aad))
            .transpose()?;
        let ttl = self.config.state_ttl;
        let mut conn = self.pool.get().await?;
        oauth_states::insert(
            &mut conn,
            &hash,
            user_id.as_str(),
            provider.as_str(),
            redirect_uri,
            encrypted.as_deref(),
            self.keys.current_id(),
            ttl.as_secs_f64(),
        )
        .await?;
        Ok(StartedConnect {
            authorize_url: url.to_string(),
            expires_at: Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default(),
        })
    }

    /// Finishes the OAuth flow: takes the state (single use), exchanges the
    /// code, learns the account id and stores the integration. A reused,
    /// expired or forged state is refused.
    pub async fn finish_connect(&self, state: &str, code: &str) -> FinishedConnect {
        let hash = Sha256::digest(state.as_bytes()).to_vec();
        let taken = match self.pool.get().await {
            Ok(mut conn) => oauth_states::take(&mut conn, &hash).await,
            Err(e) => Err(e),
        };
        let stored = match taken {
            Ok(Some(s)) => s,
            Ok(None) => {
                return FinishedConnect {
                    redirect_uri: None,
                    result: Err(ServiceError::InvalidState("unknown or already used")),
                }
            }
            Err(e) => {
                return FinishedConnect {
                    redirect_uri: None,
                    result: Err(e.into()),
                }
            }
        };
        let redirect_uri = Some(stored.redirect_uri.clone());
        if stored.expires_at < Utc::now() {
            return FinishedConnect {
                redirect_uri,
                result: Err(ServiceError::InvalidState("expired")),
            };
        }
        let result = self.exchange(stored, code, &hash).await;
        FinishedConnect {
            redirect_uri,
            result,
        }
    }

    /// Ends a flow the user or the provider refused: takes the state (it
    /// cannot be used again) without asking the provider anything, and
    /// returns where to send the user when the state was valid.
    pub async fn abandon_connect(&self, state: &str) -> Option<String> {
        let hash = Sha256::digest(state.as_bytes()).to_vec();
        let mut conn = self.pool.get().await.ok()?;
        let stored = oauth_states::take(&mut conn, &hash).await.ok()??;
        (stored.expires_at >= Utc::now()).then_some(stored.redirect_uri)
    }

    async fn exchange(
        &self,
        stored: oauth_states::State,
        code: &str,
        hash: &[u8],
    ) -> Result<IntegrationStatus, ServiceError> {
        let user_id = UserId::parse(&stored.user_id)?;
        let provider = ProviderName::parse(&stored.provider)?;
        let p = self.providers.get(provider.as_str())?;
        let callback = self.config.callback_url.clone().unwrap_or_default();
        let verifier = match &stored.code_verifier {
            Some(v) => Some(super::secret(self.keys.decrypt(
                &stored.key_id,
                v,
                &state_aad(hash),
            )?)),
            None => None,
        };
        let tokens = self
            .tokens
            .exchange_code(
                p,
                code,
                &callback,
                verifier.as_ref().map(|v| v.expose_secret()),
            )
            .await?;
        let account = AccountId::parse(&self.tokens.account_id(p, &tokens).await?)?;
        self.connect(&user_id, &provider, &account, &tokens, None)
            .await
    }

    /// Deletes expired connect-flow states.
    pub async fn purge_expired_states(&self) -> Result<u64, ServiceError> {
        let mut conn = self.pool.get().await?;
        Ok(oauth_states::purge_expired(&mut conn).await?)
    }
}

fn state_aad(hash: &[u8]) -> String {
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("oauth_state:{hex}")
}

/// The application's redirect URI must be an absolute http(s) URL.
fn check_redirect(uri: &str) -> Result<(), InvalidInput> {
    match url::Url::parse(uri) {
        Ok(u) if (u.scheme() == "https" || u.scheme() == "http") && u.host().is_some() => Ok(()),
        _ => Err(InvalidInput::new(
            "redirect_uri",
            "it must be an absolute http:// or https:// URL",
        )),
    }
}
