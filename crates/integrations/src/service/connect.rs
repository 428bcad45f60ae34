//! Connecting and disconnecting: storing a token response, deleting (and
//! revoking), and the OAuth connect flow: authorize URL with a single-use
//! state and PKCE; callback exchanging the code and keeping the answer
//! pending; the application's confirmation storing it.
//!
//! Why the confirmation: only the application knows which of its users a
//! browser belongs to. Without it, an attacker could start a flow for
//! their own user and send the authorize URL to a victim, whose account
//! would then be linked to the attacker (login CSRF). With it, the browser
//! that comes back must hold the flow id in the application's session.

use chrono::{DateTime, Utc};
use rand::RngCore;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::{IntegrationsService, ServiceError};
use crate::domain::{AccountId, IntegrationStatus, InvalidInput, ProviderName, UserId};
use crate::oauth::{authorize_url, pkce_pair, TokenSet};
use crate::store::{integrations as rows, oauth_pending, oauth_states};

/// The start of a connect flow.
#[derive(Debug, Clone)]
pub struct StartedConnect {
    /// Where to send the user.
    pub authorize_url: String,
    /// The flow's id: the application keeps it in its user's session and
    /// presents it to confirm the flow (only its hash is stored).
    pub flow_id: SecretString,
    /// When the state expires.
    pub expires_at: DateTime<Utc>,
}

/// The provider authorised the flow: what the application must confirm.
#[derive(Debug)]
pub struct AuthorizedConnect {
    /// Provider.
    pub provider: String,
    /// The account the provider's tokens belong to.
    pub account_id: String,
    /// The single-use code the browser brings back to the application
    /// (only its hash is stored).
    pub completion_code: SecretString,
}

/// How the provider's side of a connect flow ended: where to send the user
/// back (when the state was valid) and the outcome.
#[derive(Debug)]
pub struct FinishedConnect {
    /// The application's redirect URI from the state, when it was valid.
    pub redirect_uri: Option<String>,
    /// The answer waiting for the application's confirmation, or why the
    /// flow failed.
    pub result: Result<AuthorizedConnect, ServiceError>,
}

impl IntegrationsService {
    /// Stores a token response the application obtained itself, as the
    /// provider returned it (its expiry read with the provider's rules),
    /// with the optional `metadata` object in it. Both forms of one thing
    /// (`scope` and `scopes`, `expires_in` and `expires_at`) are ambiguous
    /// in a request: refused, naming both.
    pub async fn connect_response(
        &self,
        user_id: &UserId,
        provider: &ProviderName,
        account_id: &AccountId,
        body: &serde_json::Value,
    ) -> Result<IntegrationStatus, ServiceError> {
        for (a, b) in [("scope", "scopes"), ("expires_in", "expires_at")] {
            let given = |f: &str| body.get(f).is_some_and(|v| !v.is_null());
            if given(a) && given(b) {
                return Err(InvalidInput::new(
                    a,
                    format!("both {a} and {b} are given; accepted: one of them"),
                )
                .into());
            }
        }
        let registered = self.providers.get(provider.as_str())?;
        let tokens = TokenSet::from_response(body, Utc::now(), registered.expiry)?;
        let metadata = body.get("metadata").filter(|m| !m.is_null());
        self.connect(user_id, provider, account_id, &tokens, metadata)
            .await
    }

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
                self.forget_status(user_id.as_str());
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
    ) -> Result<Option<Disconnected>, ServiceError> {
        let (p, a) = (provider.as_str(), account_id.as_str());
        let registered = self.providers.get(p)?;
        let deleted = {
            let mut conn = self.pool.get().await?;
            rows::delete(&mut conn, user_id.as_str(), p, a).await?
        };
        let Some(deleted) = deleted else {
            return Ok(None);
        };
        self.forget_status(user_id.as_str());
        // The refresh token revokes the whole grant where providers support
        // it; otherwise the access token.
        let (value, aad_field, hint) = match &deleted.refresh_token {
            Some(r) => (r, "refresh", "refresh_token"),
            None => (&deleted.access_token, "access", "access_token"),
        };
        if registered.revoke_url.is_none() {
            return Ok(Some(Disconnected {
                revocation: Revocation::NotSupported,
                revoke_error: None,
            }));
        }
        let failed = match self
            .keys
            .decrypt(&deleted.key_id, value, &Self::aad(p, a, aad_field))
        {
            Ok(plain) => {
                let token = super::secret(plain);
                match self.tokens.revoke(registered, &token, hint).await {
                    Ok(()) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "revoking the token at the provider failed; the integration is deleted");
                        Some(e.to_string())
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot decrypt the token to revoke it");
                Some(
                    "the stored token could not be decrypted, so it was not sent for revocation"
                        .to_string(),
                )
            }
        };
        Ok(Some(Disconnected {
            revocation: if failed.is_some() {
                Revocation::Failed
            } else {
                Revocation::Revoked
            },
            revoke_error: failed,
        }))
    }

    /// Starts the OAuth flow: a single-use `state` (stored hashed, with the
    /// PKCE verifier encrypted, expiring after `state_ttl`), the provider's
    /// authorize URL, and the flow id the application keeps in its user's
    /// session until it confirms the flow ([`Self::complete_connect`]).
    pub async fn start_connect(
        &self,
        user_id: &UserId,
        provider: &ProviderName,
        redirect_uri: &str,
    ) -> Result<StartedConnect, ServiceError> {
        let p = self.configured(provider.as_str())?;
        let callback = self.config.callback_url.as_deref().ok_or_else(|| {
            InvalidInput::new(
                "callback_url",
                "the service has no OAuth callback URL; set INTEGRATIONS_CALLBACK_URL to this service's /v1/oauth/callback",
            )
        })?;
        self.config.redirect_origins.check(redirect_uri)?;
        let state = random_token();
        let flow_id = random_token();
        let hash = sha256(state.expose_secret());
        let (verifier, challenge) = if p.pkce {
            let (v, c) = pkce_pair();
            (Some(v), Some(c))
        } else {
            (None, None)
        };
        let url = authorize_url(
            p,
            callback,
            state.expose_secret(),
            challenge.as_deref(),
            None,
        )?;
        let aad = state_aad(&hash);
        let encrypted = verifier
            .map(|v| self.keys.encrypt(v.expose_secret().as_bytes(), &aad))
            .transpose()?;
        let ttl = self.config.state_ttl;
        let mut conn = self.pool.get().await?;
        oauth_states::insert(
            &mut conn,
            &hash,
            &sha256(flow_id.expose_secret()),
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
            flow_id,
            expires_at: expiry(ttl),
        })
    }

    /// The provider's answer (the callback): takes the state (single use),
    /// exchanges the code and learns the account id, then keeps the tokens
    /// as the flow's pending answer (encrypted, expiring after `state_ttl`)
    /// behind a new single-use completion code. Nothing is connected until
    /// the application confirms with [`Self::complete_connect`]. A reused,
    /// expired or forged state is refused.
    pub async fn finish_connect(&self, state: &str, code: &str) -> FinishedConnect {
        let hash = sha256(state);
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
        let hash = sha256(state);
        let mut conn = self.pool.get().await.ok()?;
        let stored = oauth_states::take(&mut conn, &hash).await.ok()??;
        (stored.expires_at >= Utc::now()).then_some(stored.redirect_uri)
    }

    async fn exchange(
        &self,
        stored: oauth_states::State,
        code: &str,
        hash: &[u8],
    ) -> Result<AuthorizedConnect, ServiceError> {
        let provider = ProviderName::parse(&stored.provider)?;
        let p = self.configured(provider.as_str())?;
        let callback = self.config.callback_url.clone().unwrap_or_default();
        let verifier = match &stored.code_verifier {
            Some(v) => Some(
                self.keys
                    .decrypt(&stored.key_id, v, &state_aad(hash))
                    .map_err(|_| ServiceError::InvalidState(UNREADABLE))?,
            ),
            None => None,
        };
        let verifier = verifier
            .as_ref()
            .map(|v| std::str::from_utf8(v).map_err(|_| ServiceError::InvalidState(UNREADABLE)))
            .transpose()?;
        let tokens = self
            .tokens
            .exchange_code(p, code, &callback, verifier)
            .await?;
        let account = AccountId::parse(&self.tokens.account_id(p, &tokens).await?)?;
        let completion_code = random_token();
        let pending_aad = pending_aad(
            &stored.flow_hash,
            &stored.user_id,
            provider.as_str(),
            account.as_str(),
        );
        let sealed = self.keys.encrypt(&seal(&tokens)?, &pending_aad)?;
        let mut conn = self.pool.get().await?;
        oauth_pending::insert(
            &mut conn,
            &oauth_pending::NewPending {
                flow_hash: &stored.flow_hash,
                completion_hash: &sha256(completion_code.expose_secret()),
                user_id: &stored.user_id,
                provider: provider.as_str(),
                account_id: account.as_str(),
                tokens: &sealed,
                key_id: self.keys.current_id(),
                ttl_secs: self.config.state_ttl.as_secs_f64(),
            },
        )
        .await?;
        Ok(AuthorizedConnect {
            provider: provider.as_str().to_string(),
            account_id: account.as_str().to_string(),
            completion_code,
        })
    }

    /// The application's confirmation, the end of the connect flow: it
    /// presents the flow id it kept in the session of the user whose
    /// browser came back, with the completion code that browser brought.
    /// Stores the pending answer as the integration (single use). When
    /// `user_id` is given it must be the user the flow was started for.
    #[tracing::instrument(skip_all)]
    pub async fn complete_connect(
        &self,
        flow_id: &str,
        completion_code: &str,
        user_id: Option<&UserId>,
    ) -> Result<IntegrationStatus, ServiceError> {
        let flow_hash = sha256(flow_id);
        let taken = {
            let mut conn = self.pool.get().await?;
            oauth_pending::take(
                &mut conn,
                &flow_hash,
                &sha256(completion_code),
                user_id.map(UserId::as_str),
            )
            .await?
        };
        let pending = taken.ok_or(ServiceError::InvalidFlow(
            "unknown, already completed, or its completion code (or user) does not match",
        ))?;
        if pending.expires_at < Utc::now() {
            return Err(ServiceError::InvalidFlow("expired"));
        }
        let aad = pending_aad(
            &flow_hash,
            &pending.user_id,
            &pending.provider,
            &pending.account_id,
        );
        let plain = self
            .keys
            .decrypt(&pending.key_id, &pending.tokens, &aad)
            .map_err(|_| ServiceError::InvalidFlow(UNREADABLE))?;
        let tokens = unseal(&plain)?;
        let user = UserId::parse(&pending.user_id)?;
        let provider = ProviderName::parse(&pending.provider)?;
        let account = AccountId::parse(&pending.account_id)?;
        self.connect(&user, &provider, &account, &tokens, None)
            .await
    }

    /// Deletes expired connect-flow states and pending answers nobody
    /// confirmed in time.
    pub async fn purge_expired_states(&self) -> Result<u64, ServiceError> {
        let mut conn = self.pool.get().await?;
        let states = oauth_states::purge_expired(&mut conn).await?;
        Ok(states + oauth_pending::purge_expired(&mut conn).await?)
    }
}

/// Why a flow encrypted under a key that is no longer configured fails.
const UNREADABLE: &str =
    "encrypted under a key this service no longer has (keys were rotated meanwhile)";

/// 256 random bits, URL-safe: states, flow ids and completion codes.
fn random_token() -> SecretString {
    let mut raw = Zeroizing::new([0u8; 32]);
    rand::thread_rng().fill_bytes(raw.as_mut());
    SecretString::from(base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        raw.as_ref(),
    ))
}

/// What is stored of a state, flow id or completion code: its SHA-256.
fn sha256(value: &str) -> Vec<u8> {
    Sha256::digest(value.as_bytes()).to_vec()
}

fn expiry(ttl: std::time::Duration) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default()
}

fn hex(hash: &[u8]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// Binds an encrypted PKCE verifier to its state.
pub(super) fn state_aad(hash: &[u8]) -> String {
    format!("oauth_state:{}", hex(hash))
}

/// Binds a pending answer to its flow, user, provider and account: a row
/// moved or edited in the database no longer decrypts.
pub(super) fn pending_aad(
    flow_hash: &[u8],
    user_id: &str,
    provider: &str,
    account_id: &str,
) -> String {
    format!(
        "oauth_pending:{}:{user_id}:{provider}:{account_id}",
        hex(flow_hash)
    )
}

/// The token response kept while a flow waits for the application.
#[derive(serde::Serialize)]
struct SealOut<'a> {
    access_token: &'a str,
    refresh_token: Option<&'a str>,
    expires_at: Option<DateTime<Utc>>,
    scopes: &'a [String],
    token_type: &'a str,
}

#[derive(serde::Deserialize)]
struct SealIn {
    access_token: String,
    refresh_token: Option<String>,
    expires_at: Option<DateTime<Utc>>,
    scopes: Vec<String>,
    token_type: String,
}

/// The JSON of a token response, in a buffer cleared when dropped.
fn seal(tokens: &TokenSet) -> Result<Zeroizing<Vec<u8>>, ServiceError> {
    let out = SealOut {
        access_token: tokens.access_token.expose_secret(),
        refresh_token: tokens.refresh_token.as_ref().map(|t| t.expose_secret()),
        expires_at: tokens.expires_at,
        scopes: &tokens.scopes,
        token_type: &tokens.token_type,
    };
    serde_json::to_vec(&out)
        .map(Zeroizing::new)
        .map_err(|e| ServiceError::Internal(format!("encoding a pending token response: {e}")))
}

/// The token response back; its tokens move into secrets (no copy).
fn unseal(plain: &[u8]) -> Result<TokenSet, ServiceError> {
    let s: SealIn = serde_json::from_slice(plain)
        .map_err(|_| ServiceError::Internal("a pending token response did not decode".into()))?;
    Ok(TokenSet {
        access_token: SecretString::from(s.access_token),
        refresh_token: s.refresh_token.map(SecretString::from),
        expires_at: s.expires_at,
        scopes: s.scopes,
        token_type: s.token_type,
        extra: serde_json::Map::new(),
    })
}

/// What deleting an integration did at its provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Revocation {
    /// The provider confirmed the revocation.
    Revoked,
    /// The provider has no revocation endpoint: the grant stays until it
    /// expires or the user removes it at the provider.
    NotSupported,
    /// Revoking failed (the provider refused or did not answer): the
    /// integration is deleted here, but the grant may still work there.
    Failed,
}

/// The outcome of deleting an integration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnected {
    /// What happened at the provider.
    pub revocation: Revocation,
    /// Why revoking failed (never a token).
    pub revoke_error: Option<String>,
}
