//! The token client: code exchange, refresh, revocation and account ids
//! against a provider's endpoints, plus the authorize URL and PKCE.
//!
//! Errors say what to do: [`OAuthError::InvalidGrant`] means the user's grant
//! is gone (mark the integration revoked), [`OAuthError::Transient`] means
//! retry later and keep the old token, [`OAuthError::Rejected`] and
//! [`OAuthError::NotConfigured`] are configuration problems. No message ever
//! carries a token, a code, a client secret or a response body; only the
//! provider's own `error` and `error_description` are passed on, with any
//! secret of the request scrubbed from them.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::Utc;
use rand::RngCore as _;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{RequestBuilder, Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::{Digest, Sha256};
use url::Url;

use super::providers::{AccountIdFrom, ClientAuth, MissingCredential, Provider};
use super::token::TokenSet;

/// Default limit on a whole request, body included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit on establishing a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest response body read from a provider.
const MAX_BODY: usize = 1 << 20;
/// The longest provider `error`/`error_description` passed on.
const MAX_DESCRIPTION: usize = 300;

/// Why an OAuth call failed, sorted by what the caller should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OAuthError {
    /// The provider answered `invalid_grant` (or an answer its registry
    /// entry's `revoked_when` lists): the refresh token (or code) is
    /// revoked, expired or already used. Mark the integration revoked; the
    /// user must connect again.
    #[error(
        "the provider no longer accepts this grant ({error}){}",
        describe(description)
    )]
    InvalidGrant {
        /// The provider's `error` code: `invalid_grant`, or the one its
        /// `revoked_when` matched.
        error: String,
        /// The provider's `error_description`, if any.
        description: Option<String>,
    },
    /// Any other 4xx OAuth error (e.g. `invalid_client`): a configuration
    /// problem that retrying will not fix.
    #[error(
        "the provider rejected the request with HTTP {status} ({error}){}",
        describe(description)
    )]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The provider's `error` code, or "unspecified".
        error: String,
        /// The provider's `error_description`, if any.
        description: Option<String>,
    },
    /// Network failure, timeout, 5xx, 429 or 408: retry with backoff and keep
    /// the old token.
    #[error("temporary failure: {0}")]
    Transient(String),
    /// A 2xx answer that is not what the endpoint promises (not JSON, not a
    /// token response, no account id).
    #[error("unexpected response: {0}")]
    Malformed(String),
    /// Something this side lacks: a client id or secret variable, an
    /// `account_id` rule, a PKCE challenge.
    #[error("not configured: {0}")]
    NotConfigured(String),
}

fn describe(description: &Option<String>) -> String {
    description
        .as_deref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default()
}

impl OAuthError {
    /// Whether retrying later may succeed (the old token should be kept).
    pub fn is_transient(&self) -> bool {
        matches!(self, OAuthError::Transient(_))
    }

    /// Whether the grant is gone and the integration should be marked revoked.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, OAuthError::InvalidGrant { .. })
    }
}

impl From<MissingCredential> for OAuthError {
    fn from(e: MissingCredential) -> Self {
        OAuthError::NotConfigured(e.to_string())
    }
}

/// Settings of the [`TokenClient`].
#[derive(Debug, Clone)]
pub struct TokenClientConfig {
    /// Limit on a whole request, body included.
    pub timeout: Duration,
    /// Limit on establishing a connection.
    pub connect_timeout: Duration,
    /// The User-Agent header (GitHub and Reddit require one).
    pub user_agent: String,
}

impl Default for TokenClientConfig {
    fn default() -> Self {
        TokenClientConfig {
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            user_agent: concat!("integrations/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// Talks to providers' token, revocation and userinfo endpoints. Cheap to
/// clone; one per process is enough.
#[derive(Debug, Clone)]
pub struct TokenClient {
    http: reqwest::Client,
    timeout: Duration,
}

impl TokenClient {
    /// A client with the given timeouts; redirects are not followed (token
    /// endpoints do not redirect, and a redirect would move credentials).
    pub fn new(config: &TokenClientConfig) -> Result<Self, OAuthError> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .user_agent(config.user_agent.clone())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| {
                OAuthError::NotConfigured(format!("cannot build the HTTP client: {}", chain(&e)))
            })?;
        Ok(TokenClient {
            http,
            timeout: config.timeout,
        })
    }

    /// Refreshes an access token (refresh_token grant, plus the provider's
    /// `refresh_params`).
    ///
    /// When the response carries no refresh token, the returned
    /// `refresh_token` is `None`: the provider keeps the old one valid and
    /// the caller must keep it. When it carries one, the old one may already
    /// be invalid (rotation): store the new one before anything else.
    #[tracing::instrument(skip_all, fields(provider = %p.name))]
    pub async fn refresh(
        &self,
        p: &Provider,
        refresh_token: &SecretString,
    ) -> Result<TokenSet, OAuthError> {
        let secret = refresh_token.expose_secret();
        let mut form = vec![
            ("grant_type".to_string(), "refresh_token".to_string()),
            ("refresh_token".to_string(), secret.to_string()),
        ];
        extend(&mut form, &p.refresh_params);
        self.token_request(p, form, &[secret]).await
    }

    /// Exchanges an authorization code (authorization_code grant, plus the
    /// provider's `token_params`); `code_verifier` is the PKCE verifier
    /// whose challenge went into the authorize URL.
    #[tracing::instrument(skip_all, fields(provider = %p.name))]
    pub async fn exchange_code(
        &self,
        p: &Provider,
        code: &str,
        redirect_uri: &str,
        code_verifier: Option<&str>,
    ) -> Result<TokenSet, OAuthError> {
        let mut form = vec![
            ("grant_type".to_string(), "authorization_code".to_string()),
            ("code".to_string(), code.to_string()),
            ("redirect_uri".to_string(), redirect_uri.to_string()),
        ];
        if let Some(v) = code_verifier {
            form.push(("code_verifier".to_string(), v.to_string()));
        }
        extend(&mut form, &p.token_params);
        self.token_request(p, form, &[code, code_verifier.unwrap_or_default()])
            .await
    }

    /// Revokes a token (RFC 7009: `token` and `token_type_hint`, e.g.
    /// "refresh_token" or "access_token"; an empty hint is not sent), with
    /// the provider's client authentication. `Ok(())` when the provider has
    /// no `revoke_url`.
    #[tracing::instrument(skip_all, fields(provider = %p.name, hint = %hint))]
    pub async fn revoke(
        &self,
        p: &Provider,
        token: &SecretString,
        hint: &str,
    ) -> Result<(), OAuthError> {
        let Some(url) = &p.revoke_url else {
            tracing::debug!("provider has no revoke_url; nothing to revoke");
            return Ok(());
        };
        let secret = token.expose_secret();
        let mut form = vec![("token".to_string(), secret.to_string())];
        if !hint.is_empty() {
            form.push(("token_type_hint".to_string(), hint.to_string()));
        }
        let (req, client_secret) = self.authenticated_post(p, url, &mut form)?;
        let reply = self.send(p, url, "POST", req.form(&form)).await?;
        let scrub = [secret, client_secret.expose_secret()];
        if reply.status.is_success() {
            tracing::debug!(status = reply.status.as_u16(), "token revoked");
            Ok(())
        } else {
            Err(status_error(p, url, &reply, &scrub))
        }
    }

    /// The account id of the user the tokens belong to: from the token
    /// response (`tokens.extra`) or the userinfo endpoint, as the provider's
    /// `account_id` rule says. Numbers are returned as their decimal text.
    #[tracing::instrument(skip_all, fields(provider = %p.name))]
    pub async fn account_id(&self, p: &Provider, tokens: &TokenSet) -> Result<String, OAuthError> {
        let rule = p.account_id.as_ref().ok_or_else(|| {
            OAuthError::NotConfigured(format!(
                "provider '{}' has no account_id rule in the provider registry",
                p.name
            ))
        })?;
        let missing = |doc: &str| {
            OAuthError::Malformed(format!(
                "provider '{}': the {doc} has no string or number at {}",
                p.name, rule.pointer
            ))
        };
        match rule.from {
            AccountIdFrom::Token => {
                let doc = Value::Object(tokens.extra.clone());
                id_at(&doc, &rule.pointer).ok_or_else(|| missing("token response"))
            }
            AccountIdFrom::Userinfo => {
                let url = p.userinfo_url.as_ref().ok_or_else(|| {
                    OAuthError::NotConfigured(format!("provider '{}' has no userinfo_url", p.name))
                })?;
                let access = tokens.access_token.expose_secret();
                let req = self
                    .http
                    .get(url.clone())
                    .header(ACCEPT, "application/json")
                    .bearer_auth(access);
                let reply = self.send(p, url, "GET", req).await?;
                if !reply.status.is_success() {
                    return Err(status_error(p, url, &reply, &[access]));
                }
                let doc = reply.json(p, url)?;
                id_at(&doc, &rule.pointer).ok_or_else(|| missing("userinfo response"))
            }
        }
    }

    /// POSTs a token grant with client authentication and parses the answer.
    async fn token_request(
        &self,
        p: &Provider,
        mut form: Vec<(String, String)>,
        secrets: &[&str],
    ) -> Result<TokenSet, OAuthError> {
        let url = &p.token_url;
        let (req, client_secret) = self.authenticated_post(p, url, &mut form)?;
        let reply = self.send(p, url, "POST", req.form(&form)).await?;
        drop(form);
        let mut scrub = secrets.to_vec();
        scrub.push(client_secret.expose_secret());
        if !reply.status.is_success() {
            return Err(status_error(p, url, &reply, &scrub));
        }
        let json = reply.json(p, url)?;
        // Some providers (TikTok) answer errors with 200.
        if json.get("access_token").is_none() {
            if let Some((error, description)) = oauth_error(&json, &scrub) {
                return Err(classify(p, reply.status, error, description));
            }
        }
        let tokens = TokenSet::from_response(&json, Utc::now(), p.expiry)
            .map_err(|e| OAuthError::Malformed(format!("provider '{}': {e}", p.name)))?;
        tracing::debug!(
            rotated = tokens.refresh_token.is_some(),
            expires_at = ?tokens.expires_at,
            "token endpoint issued tokens"
        );
        Ok(tokens)
    }

    /// A POST to `url` with `Accept: application/json` and the provider's
    /// client authentication (Basic header, or id and secret added to
    /// `form`); returns the secret too, to scrub it from error texts.
    fn authenticated_post<'p>(
        &self,
        p: &'p Provider,
        url: &Url,
        form: &mut Vec<(String, String)>,
    ) -> Result<(RequestBuilder, &'p SecretString), OAuthError> {
        let client_id = p.client_id()?;
        let client_secret = p.client_secret()?;
        let req = self
            .http
            .post(url.clone())
            .header(ACCEPT, "application/json");
        let req = match p.client_auth {
            // RFC 6749 §2.3.1: both form-encoded before Basic encoding.
            ClientAuth::Basic => req.basic_auth(
                form_encode(client_id),
                Some(form_encode(client_secret.expose_secret())),
            ),
            ClientAuth::Post => {
                form.push((p.client_id_param.clone(), client_id.to_string()));
                form.push((
                    "client_secret".to_string(),
                    client_secret.expose_secret().to_string(),
                ));
                req
            }
        };
        Ok((req, client_secret))
    }

    /// Sends a request and reads the body (at most [`MAX_BODY`] bytes).
    async fn send(
        &self,
        p: &Provider,
        url: &Url,
        method: &str,
        req: RequestBuilder,
    ) -> Result<Reply, OAuthError> {
        let endpoint = format!("{method} {}", redacted_url(url));
        let resp = req
            .send()
            .await
            .map_err(|e| self.transport_error(p, &endpoint, e))?;
        let status = resp.status();
        tracing::debug!(status = status.as_u16(), %endpoint, "provider answered");
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("no content type")
            .to_string();
        let (body, truncated) = read_body(resp)
            .await
            .map_err(|e| self.transport_error(p, &endpoint, e))?;
        Ok(Reply {
            status,
            content_type,
            body,
            truncated,
            endpoint,
        })
    }

    fn transport_error(&self, p: &Provider, endpoint: &str, e: reqwest::Error) -> OAuthError {
        let e = e.without_url();
        if e.is_timeout() {
            OAuthError::Transient(format!(
                "provider '{}': {endpoint} did not answer in time (timeout {:?})",
                p.name, self.timeout
            ))
        } else if e.is_builder() {
            OAuthError::NotConfigured(format!(
                "provider '{}': {endpoint}: cannot build the request: {}",
                p.name,
                chain(&e)
            ))
        } else {
            OAuthError::Transient(format!(
                "provider '{}': {endpoint} failed: {}",
                p.name,
                chain(&e)
            ))
        }
    }
}

/// A provider's answer, read in full.
struct Reply {
    status: StatusCode,
    content_type: String,
    body: Vec<u8>,
    truncated: bool,
    endpoint: String,
}

impl Reply {
    /// The body as JSON, or `Malformed` describing (not quoting) it.
    fn json(&self, p: &Provider, url: &Url) -> Result<Value, OAuthError> {
        let not_json = |why: &str| {
            OAuthError::Malformed(format!(
                "provider '{}': {} answered {} with {why} ({}, {} bytes); check {}",
                p.name,
                self.endpoint,
                self.status,
                self.content_type,
                self.body.len(),
                redacted_url(url),
            ))
        };
        if self.truncated {
            return Err(not_json("a body over 1 MiB"));
        }
        serde_json::from_slice(&self.body).map_err(|_| not_json("a body that is not JSON"))
    }
}

async fn read_body(mut resp: Response) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > MAX_BODY {
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

/// Maps a non-2xx answer to an error. 408, 429 and 5xx are transient; other
/// 4xx are OAuth errors (`invalid_grant` or a rejection); anything else
/// (redirects) is a configuration problem.
fn status_error(p: &Provider, url: &Url, reply: &Reply, scrub: &[&str]) -> OAuthError {
    let status = reply.status;
    let parsed = serde_json::from_slice::<Value>(&reply.body)
        .ok()
        .and_then(|json| oauth_error(&json, scrub));
    if status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
    {
        let detail = parsed
            .map(|(error, d)| format!(" ({error}{})", describe(&d)))
            .unwrap_or_default();
        return OAuthError::Transient(format!(
            "provider '{}': {} answered {status}{detail}",
            p.name, reply.endpoint
        ));
    }
    if status.is_client_error() {
        let (error, description) = parsed.unwrap_or_else(|| ("unspecified".to_string(), None));
        return classify(p, status, error, description);
    }
    OAuthError::Rejected {
        status: status.as_u16(),
        error: "unexpected_status".to_string(),
        description: Some(format!(
            "{} answered {status} instead of a result; check {} in the provider registry",
            reply.endpoint,
            redacted_url(url)
        )),
    }
}

fn classify(
    p: &Provider,
    status: StatusCode,
    error: String,
    description: Option<String>,
) -> OAuthError {
    if error == "invalid_grant"
        || p.revoked_when
            .iter()
            .any(|rule| rule.matches(&error, description.as_deref()))
    {
        OAuthError::InvalidGrant { error, description }
    } else {
        OAuthError::Rejected {
            status: status.as_u16(),
            error,
            description,
        }
    }
}

/// The provider's `error` and `error_description` (GitHub's API uses
/// `message`), scrubbed of the request's secrets and shortened.
fn oauth_error(json: &Value, scrub: &[&str]) -> Option<(String, Option<String>)> {
    let text = |key: &str| {
        json.get(key)
            .and_then(Value::as_str)
            .map(|s| clean(s, scrub))
            .filter(|s| !s.is_empty())
    };
    let error = text("error").or_else(|| {
        // TikTok nests: {"error": {"code": "...", "message": "..."}}.
        json.pointer("/error/code")
            .and_then(Value::as_str)
            .map(|s| clean(s, scrub))
    });
    let description = text("error_description")
        .or_else(|| text("message"))
        .or_else(|| {
            json.pointer("/error/message")
                .and_then(Value::as_str)
                .map(|s| clean(s, scrub))
                .filter(|s| !s.is_empty())
        });
    match (error, description) {
        (Some(e), d) => Some((e, d)),
        (None, Some(d)) => Some(("unspecified".to_string(), Some(d))),
        (None, None) => None,
    }
}

/// Removes the request's secrets from a provider-supplied text, drops
/// control characters and caps the length.
fn clean(text: &str, scrub: &[&str]) -> String {
    let mut s: String = text.chars().filter(|c| !c.is_control()).collect();
    for secret in scrub.iter().filter(|s| s.len() >= 4) {
        s = s.replace(secret, "[REDACTED]");
    }
    if s.chars().count() > MAX_DESCRIPTION {
        s = s.chars().take(MAX_DESCRIPTION).collect::<String>() + "…";
    }
    s
}

/// A URL without user info or query (which could carry credentials) for
/// messages.
fn redacted_url(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.to_string()
}

/// An error and its causes, joined.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn extend(form: &mut Vec<(String, String)>, params: &std::collections::BTreeMap<String, String>) {
    form.extend(params.iter().map(|(k, v)| (k.clone(), v.clone())));
}

fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The account id at `pointer`: a non-empty string, or a number as text.
fn id_at(doc: &Value, pointer: &str) -> Option<String> {
    match doc.pointer(pointer)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The URL to send the user to: `response_type=code`, the client id under
/// the provider's `client_id_param`, `redirect_uri`, `scope` (the given
/// scopes, else the provider's, joined by its separator; omitted when
/// empty), `state`, for PKCE providers `code_challenge` with
/// `code_challenge_method=S256`, then the provider's `authorize_params`.
///
/// Fails with `NotConfigured` when the client id is not set, or when the
/// provider uses PKCE and no challenge is given.
pub fn authorize_url(
    p: &Provider,
    redirect_uri: &str,
    state: &str,
    code_challenge: Option<&str>,
    scopes: Option<&[String]>,
) -> Result<Url, OAuthError> {
    let client_id = p.client_id()?;
    let challenge = match (p.pkce, code_challenge) {
        (true, None) => {
            return Err(OAuthError::NotConfigured(format!(
                "provider '{}' uses PKCE: pass the code challenge from pkce_pair()",
                p.name
            )))
        }
        (true, Some(c)) => Some(c),
        (false, _) => None,
    };
    let scopes = scopes.unwrap_or(&p.scopes);
    let mut url = p.authorize_url.clone();
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code");
        q.append_pair(&p.client_id_param, client_id);
        q.append_pair("redirect_uri", redirect_uri);
        if !scopes.is_empty() {
            q.append_pair("scope", &scopes.join(&p.scope_separator));
        }
        q.append_pair("state", state);
        if let Some(c) = challenge {
            q.append_pair("code_challenge", c);
            q.append_pair("code_challenge_method", "S256");
        }
        for (k, v) in &p.authorize_params {
            q.append_pair(k, v);
        }
    }
    Ok(url)
}

/// A PKCE pair `(verifier, challenge)`: the verifier is 43 characters of
/// base64url (no padding) from 32 random bytes; the challenge is
/// [`pkce_challenge`] of it (S256).
pub fn pkce_pair() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let verifier = URL_SAFE_NO_PAD.encode(bytes);
    let challenge = pkce_challenge(&verifier);
    (verifier, challenge)
}

/// The S256 code challenge of a verifier: base64url(sha256(verifier)),
/// without padding.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_matches_the_rfc_7636_example() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let (v, c) = pkce_pair();
        assert_eq!(v.len(), 43);
        assert!(v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(c, pkce_challenge(&v));
        assert_ne!(pkce_pair().0, v);
    }

    #[test]
    fn clean_scrubs_secrets_and_caps_length() {
        let s = clean("token abcd-secret is bad\n", &["abcd-secret", "ab"]);
        assert_eq!(s, "token [REDACTED] is bad");
        assert_eq!(
            clean(&"x".repeat(1000), &[]).chars().count(),
            MAX_DESCRIPTION + 1
        );
    }

    #[test]
    fn oauth_error_shapes() {
        let j = serde_json::json!({"error": "invalid_grant", "error_description": "expired"});
        assert_eq!(
            oauth_error(&j, &[]),
            Some(("invalid_grant".into(), Some("expired".into())))
        );
        let j = serde_json::json!({"error": {"code": "access_token_invalid", "message": "m"}});
        assert_eq!(
            oauth_error(&j, &[]),
            Some(("access_token_invalid".into(), Some("m".into())))
        );
        let j = serde_json::json!({"message": "Bad credentials"});
        assert_eq!(
            oauth_error(&j, &[]),
            Some(("unspecified".into(), Some("Bad credentials".into())))
        );
        assert_eq!(oauth_error(&serde_json::json!({"x": 1}), &[]), None);
    }

    #[test]
    fn ids_from_strings_and_numbers() {
        let doc = serde_json::json!({"id": 12345, "data": {"id": "987"}, "empty": "", "obj": {}});
        assert_eq!(id_at(&doc, "/id").as_deref(), Some("12345"));
        assert_eq!(id_at(&doc, "/data/id").as_deref(), Some("987"));
        assert_eq!(id_at(&doc, "/empty"), None);
        assert_eq!(id_at(&doc, "/obj"), None);
        assert_eq!(id_at(&doc, "/nope"), None);
    }

    #[test]
    fn redacted_url_drops_credentials_and_query() {
        let u = Url::parse("https://u:p@example.com/token?key=secret").unwrap();
        assert_eq!(redacted_url(&u), "https://example.com/token");
    }
}
