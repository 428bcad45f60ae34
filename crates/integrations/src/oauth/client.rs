//! The token client: code exchange, refresh, revocation and account ids
//! against a provider's endpoints, plus the authorize URL and PKCE.
//!
//! Errors say what to do: [`OAuthError::InvalidGrant`] means the user's grant
//! is gone (mark the integration revoked), [`OAuthError::Transient`] means
//! retry later and keep the old token, [`OAuthError::Rejected`] and
//! [`OAuthError::NotConfigured`] are configuration problems. No message ever
//! carries a token, a code, a client secret or a response body. Of a
//! provider's error answer only its `error` code (when it is a plain code)
//! and a sanitised `error_description` are passed on: see
//! [`error_code`] and [`error_description`]; what is withheld is logged at
//! debug level with the request's secrets removed.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::Utc;
use rand::RngCore as _;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{RequestBuilder, Response, StatusCode};
use secrecy::zeroize::{Zeroize, Zeroizing};
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
/// The longest provider `error_description` passed on, in characters.
const MAX_DESCRIPTION: usize = 200;
/// The longest provider `error` code passed on.
const MAX_ERROR_CODE: usize = 64;
/// The code that stands for a provider's `error` that is not a plain code.
const FALLBACK_CODE: &str = "provider_error";
/// Provider text sharing this many characters in a row with a secret of
/// the request (token, code, verifier, client secret) is withheld.
const SECRET_OVERLAP: usize = 8;
/// Digits in a run (spaces, `-`, `.`, `(`, `)`, `+`, `/` between them
/// allowed) from which it may be a phone or account number.
const NUMBER_DIGITS: usize = 7;

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
    /// Network failure, timeout, 5xx or 408: retry with backoff and keep
    /// the old token.
    #[error("temporary failure: {0}")]
    Transient(String),
    /// The provider asked to be left alone for a while: 429, or 503 with a
    /// `Retry-After`. Not the grant's fault: the provider is paused
    /// as a whole and the integration's health is left alone.
    #[error("the provider asked to slow down: {message}; retry after {}s", retry_after.as_secs())]
    RateLimited {
        /// What answered, and how.
        message: String,
        /// How long to leave the provider alone (its `Retry-After`, or
        /// [`DEFAULT_RETRY_AFTER`]; at most [`MAX_RETRY_AFTER`]).
        retry_after: Duration,
    },
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
        matches!(
            self,
            OAuthError::Transient(_) | OAuthError::RateLimited { .. }
        )
    }

    /// Whether the grant is gone and the integration should be marked revoked.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, OAuthError::InvalidGrant { .. })
    }

    /// A short code for what failed, kept beside the message as the
    /// integration's `last_error_code` (events carry both): the provider's
    /// `error` code (already reduced to a plain word or `provider_error`),
    /// or one of `temporary_failure`, `malformed_response`,
    /// `not_configured`.
    pub fn code(&self) -> &str {
        match self {
            OAuthError::InvalidGrant { error, .. } | OAuthError::Rejected { error, .. } => error,
            OAuthError::Transient(_) => "temporary_failure",
            OAuthError::RateLimited { .. } => "rate_limited",
            OAuthError::Malformed(_) => "malformed_response",
            OAuthError::NotConfigured(_) => "not_configured",
        }
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
        let mut form = Form::default();
        form.push("grant_type", "refresh_token");
        form.push("refresh_token", secret);
        form.extend(&p.refresh_params);
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
        let mut form = Form::default();
        form.push("grant_type", "authorization_code");
        form.push("code", code);
        form.push("redirect_uri", redirect_uri);
        if let Some(v) = code_verifier {
            form.push("code_verifier", v);
        }
        form.extend(&p.token_params);
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
        let mut form = Form::default();
        form.push("token", secret);
        if !hint.is_empty() {
            form.push("token_type_hint", hint);
        }
        let (req, client_secret) = self.authenticated_post(p, url, &mut form)?;
        let reply = self.send(p, url, "POST", req.form(&form.0)).await?;
        drop(form);
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
        mut form: Form,
        secrets: &[&str],
    ) -> Result<TokenSet, OAuthError> {
        let url = &p.token_url;
        let (req, client_secret) = self.authenticated_post(p, url, &mut form)?;
        let reply = self.send(p, url, "POST", req.form(&form.0)).await?;
        drop(form);
        let mut scrub = secrets.to_vec();
        scrub.push(client_secret.expose_secret());
        if !reply.status.is_success() {
            return Err(status_error(p, url, &reply, &scrub));
        }
        let json = reply.json(p, url)?;
        // Some providers (TikTok) answer errors with 200.
        if json.get("access_token").is_none() {
            if let Some((error, description)) = oauth_error(p, &json, &scrub) {
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
        form: &mut Form,
    ) -> Result<(RequestBuilder, &'p SecretString), OAuthError> {
        let client_id = p.client_id()?;
        let client_secret = p.client_secret()?;
        let req = self
            .http
            .post(url.clone())
            .header(ACCEPT, "application/json");
        let req = match p.client_auth {
            // RFC 6749 §2.3.1: both form-encoded before Basic encoding.
            ClientAuth::Basic => {
                let secret = Zeroizing::new(form_encode(client_secret.expose_secret()));
                req.basic_auth(form_encode(client_id), Some(&*secret))
            }
            ClientAuth::Post => {
                form.push(&p.client_id_param, client_id);
                form.push("client_secret", client_secret.expose_secret());
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
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
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
            retry_after,
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
    /// The `Retry-After` header, when it parses.
    retry_after: Option<Duration>,
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

/// How long a provider is left alone after a 429 without a usable
/// `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(10);

/// The longest pause a provider's `Retry-After` can ask for; a longer one
/// is cut to this (a typo or a hostile answer must not stop refreshes for
/// days).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A `Retry-After` value (RFC 9110: delay-seconds or an HTTP-date), capped
/// at [`MAX_RETRY_AFTER`]; at least one second.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(std::time::SystemTime::now())
                .unwrap_or_default()
        }
    };
    Some(wait.clamp(Duration::from_secs(1), MAX_RETRY_AFTER))
}

/// Maps a non-2xx answer to an error. 429, and 503 with a `Retry-After`,
/// pause the provider; 408 and 5xx are transient; other
/// 4xx are OAuth errors (`invalid_grant` or a rejection); anything else
/// (redirects) is a configuration problem.
fn status_error(p: &Provider, url: &Url, reply: &Reply, scrub: &[&str]) -> OAuthError {
    let status = reply.status;
    let parsed = serde_json::from_slice::<Value>(&reply.body)
        .ok()
        .and_then(|json| oauth_error(p, &json, scrub));
    // 429, or 503 with a Retry-After (RFC 9110: unavailable for that
    // long), is about the provider, not the grant. A Retry-After on other
    // answers is ignored: an `invalid_grant` carrying one is still a
    // revoked grant, not a reason to stop every refresh of the provider.
    let throttled = status == StatusCode::TOO_MANY_REQUESTS
        || (status == StatusCode::SERVICE_UNAVAILABLE && reply.retry_after.is_some());
    if throttled || status == StatusCode::REQUEST_TIMEOUT || status.is_server_error() {
        let detail = parsed
            .map(|(error, d)| format!(" ({error}{})", describe(&d)))
            .unwrap_or_default();
        let message = format!(
            "provider '{}': {} answered {status}{detail}",
            p.name, reply.endpoint
        );
        if throttled {
            return OAuthError::RateLimited {
                message,
                retry_after: reply.retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
            };
        }
        return OAuthError::Transient(message);
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
/// `message`; TikTok nests both under `error`), made safe to pass on: the
/// code through [`error_code`], the description through
/// [`error_description`]. When anything was withheld, the provider's text
/// is logged at debug level with the request's secrets removed.
fn oauth_error(p: &Provider, json: &Value, scrub: &[&str]) -> Option<(String, Option<String>)> {
    let text = |pointer: &str| {
        json.pointer(pointer)
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
    };
    let raw_error = text("/error").or_else(|| text("/error/code"));
    let raw_description = text("/error_description")
        .or_else(|| text("/message"))
        .or_else(|| text("/error/message"));
    if raw_error.is_none() && raw_description.is_none() {
        return None;
    }
    let error = raw_error.map_or_else(|| "unspecified".to_string(), |e| error_code(e, scrub));
    let description = raw_description.and_then(|d| error_description(d, scrub));
    let withheld = raw_error.is_some_and(|e| e != error)
        || raw_description.is_some_and(|d| description.as_deref() != Some(d.trim()));
    if withheld {
        let for_log =
            |t: Option<&str>| t.map(|t| redact_secrets(&printable(t, MAX_DESCRIPTION * 5), scrub));
        tracing::debug!(
            provider = %p.name,
            error = ?for_log(raw_error),
            description = ?for_log(raw_description),
            "the provider's error text was not passed on as it is"
        );
    }
    Some((error, description))
}

/// Error codes registered by RFC 6749, 6750, 7009, 8628 and OpenID
/// Connect: fixed words, so they pass even when a secret happens to
/// contain one.
const REGISTERED_CODES: &[&str] = &[
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "access_denied",
    "unsupported_response_type",
    "server_error",
    "temporarily_unavailable",
    "unsupported_token_type",
    "invalid_token",
    "insufficient_scope",
    "authorization_pending",
    "slow_down",
    "expired_token",
    "interaction_required",
    "login_required",
    "consent_required",
    "account_selection_required",
];

/// A provider's `error` code, or `provider_error` unless it is a plain
/// code: a registered one, or 1 to 64 ASCII letters, digits, `_`, `-` or
/// `.` (a subset of RFC 6749's error charset, %x20-21 / %x23-5B /
/// %x5D-7E, that every registered code fits) without a long digit run or a
/// piece of a secret.
pub fn error_code(raw: &str, secrets: &[&str]) -> String {
    if REGISTERED_CODES.contains(&raw) {
        return raw.to_string();
    }
    let plain = !raw.is_empty()
        && raw.len() <= MAX_ERROR_CODE
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && replace_numbers(raw) == raw
        && redact_secrets(raw, secrets) == raw;
    if plain {
        raw.to_string()
    } else {
        FALLBACK_CODE.to_string()
    }
}

/// What the callback passes on to the application of the `error` an
/// authorization endpoint sent back: one of RFC 6749's codes (section
/// 4.1.2.1), otherwise `provider_error`; never the provider's text (or an
/// attacker's, who can craft the callback URL). `missing_code` when the
/// callback carried neither a code nor an error.
pub fn authorization_error(error: Option<&str>) -> &'static str {
    const CODES: [&str; 7] = [
        "invalid_request",
        "unauthorized_client",
        "access_denied",
        "unsupported_response_type",
        "invalid_scope",
        "server_error",
        "temporarily_unavailable",
    ];
    match error {
        None => "missing_code",
        Some(e) => CODES
            .iter()
            .find(|c| **c == e)
            .copied()
            .unwrap_or(FALLBACK_CODE),
    }
}

/// A provider's `error_description` made safe to show to API clients and
/// store as `last_error`, or `None` when nothing useful is left:
/// - markup (`<` or `>` anywhere) withholds the whole text;
/// - only printable characters are kept (letters and digits of any script,
///   ASCII punctuation; the rest, such as control and bidi characters,
///   becomes a space), and runs of spaces shrink to one;
/// - any stretch sharing 8 or more characters with a secret of the request
///   becomes `[REDACTED]`;
/// - words that look like links (`scheme://`, `www.`, `name.tld`, e-mail
///   addresses, `javascript:`/`data:` and the like) become `[link]`;
/// - runs of 7 or more digits (phone or account numbers) become `[number]`;
/// - at most 200 characters are kept.
pub fn error_description(raw: &str, secrets: &[&str]) -> Option<String> {
    if raw.contains(['<', '>']) {
        return None;
    }
    // Bounded work: the part that can still matter after the cut.
    let text = printable(raw, MAX_DESCRIPTION * 4);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    // Secrets first, on the text as it will read (the later steps only
    // put placeholders in place of characters).
    let text = redact_secrets(&text, secrets);
    let text = text
        .split(' ')
        .map(|w| if looks_like_link(w) { "[link]" } else { w })
        .collect::<Vec<_>>()
        .join(" ");
    let text = replace_numbers(&text);
    let mut text = text.trim().to_string();
    if text.chars().count() > MAX_DESCRIPTION {
        text = text.chars().take(MAX_DESCRIPTION).collect::<String>() + "…";
    }
    let informative = text
        .replace("[link]", "")
        .replace("[number]", "")
        .replace("[REDACTED]", "")
        .chars()
        .any(char::is_alphabetic);
    informative.then_some(text)
}

/// At most `max` characters of `text`: letters and digits of any script
/// and ASCII punctuation; anything else (control, format, bidi characters,
/// symbols) becomes a space.
fn printable(text: &str, max: usize) -> String {
    text.chars()
        .take(max)
        .map(|c| {
            if c.is_alphanumeric() || c.is_ascii_graphic() {
                c
            } else {
                ' '
            }
        })
        .collect()
}

/// Whether a word names a place: a URL, a bare domain, an e-mail address.
/// Deliberately broad (a false positive only hides a word of an error
/// text), which is why this is a few rules rather than a URL parser that
/// would accept only well-formed links.
fn looks_like_link(word: &str) -> bool {
    let w = word.to_ascii_lowercase();
    let w = w.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '/');
    if w.contains("://") || w.contains("www.") || w.contains('@') {
        return true;
    }
    if ["javascript:", "data:", "mailto:", "file:", "vbscript:"]
        .iter()
        .any(|s| w.contains(s))
    {
        return true;
    }
    // name.tld, name.tld/path: a dot between alphanumerics, the label
    // after the last dot of the host being 2+ letters.
    let host = w.split(['/', '?', '#']).next().unwrap_or_default();
    let labels: Vec<&str> = host.split('.').collect();
    labels.len() >= 2
        && labels
            .iter()
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic()))
}

/// Replaces runs of [`NUMBER_DIGITS`] or more digits (with separators
/// between them) by `[number]`.
fn replace_numbers(text: &str) -> String {
    const SEPARATORS: &[char] = &[' ', '-', '.', '(', ')', '+', '/'];
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        // The run: digits and separators, ending at its last digit.
        let (mut end, mut digits, mut j) = (i, 0, i);
        while j < chars.len() && (chars[j].is_ascii_digit() || SEPARATORS.contains(&chars[j])) {
            if chars[j].is_ascii_digit() {
                digits += 1;
                end = j + 1;
            }
            j += 1;
        }
        // A leading '+' or '(' belongs to the number.
        if digits >= NUMBER_DIGITS {
            while out.ends_with(['+', '(']) {
                out.pop();
            }
            out.push_str("[number]");
        } else {
            out.extend(&chars[i..end]);
        }
        i = end;
    }
    out
}

/// Replaces every stretch of `text` that shares [`SECRET_OVERLAP`] or more
/// characters in a row with one of `secrets` by `[REDACTED]` (secrets
/// shorter than that: their whole occurrences, from 4 characters).
fn redact_secrets(text: &str, secrets: &[&str]) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut hidden = vec![false; chars.len()];
    for secret in secrets {
        let s: Vec<char> = secret.chars().collect();
        let width = if s.len() >= SECRET_OVERLAP {
            SECRET_OVERLAP
        } else if s.len() >= 4 {
            s.len()
        } else {
            continue;
        };
        // Every window of the secret; a longer overlap is a chain of them.
        let windows: std::collections::HashSet<&[char]> = s.windows(width).collect();
        for (i, w) in chars.windows(width).enumerate() {
            if windows.contains(w) {
                hidden[i..i + width].iter_mut().for_each(|h| *h = true);
            }
        }
    }
    let mut out = String::with_capacity(text.len());
    for (i, c) in chars.iter().enumerate() {
        if !hidden[i] {
            out.push(*c);
        } else if i == 0 || !hidden[i - 1] {
            out.push_str("[REDACTED]");
        }
    }
    out
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

/// A request's form fields. Its values (a refresh token, a code, a PKCE
/// verifier, the client secret) are cleared from memory when it is
/// dropped; the encoded body reqwest builds from it is out of reach.
#[derive(Default)]
struct Form(Vec<(String, String)>);

impl Form {
    fn push(&mut self, key: &str, value: &str) {
        self.0.push((key.to_string(), value.to_string()));
    }

    fn extend(&mut self, params: &std::collections::BTreeMap<String, String>) {
        for (k, v) in params {
            self.push(k, v);
        }
    }
}

impl Drop for Form {
    fn drop(&mut self) {
        for (_, value) in &mut self.0 {
            value.zeroize();
        }
    }
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
/// base64url (no padding) from 32 random bytes, a secret cleared from
/// memory when dropped; the challenge is [`pkce_challenge`] of it (S256).
pub fn pkce_pair() -> (SecretString, String) {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::thread_rng().fill_bytes(bytes.as_mut());
    let verifier = SecretString::from(URL_SAFE_NO_PAD.encode(bytes.as_ref()));
    let challenge = pkce_challenge(verifier.expose_secret());
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
        let v = v.expose_secret().to_string();
        assert_eq!(v.len(), 43);
        assert!(v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(c, pkce_challenge(&v));
        assert_ne!(pkce_pair().0.expose_secret(), v);
    }

    fn provider() -> Provider {
        let toml = "[p]\nauthorize_url = \"https://example.com/a\"\ntoken_url = \"https://example.com/t\"\n\
                    client_id = \"c\"\nclient_secret_env = \"S\"\nclient_auth = \"post\"\n";
        super::super::ProviderRegistry::from_toml(toml, "t", &|_: &str| None)
            .unwrap()
            .get("p")
            .unwrap()
            .clone()
    }

    #[test]
    fn error_codes_pass_only_when_plain() {
        for ok in ["invalid_grant", "access_token_invalid", "bad.code-1"] {
            assert_eq!(error_code(ok, &[]), ok);
        }
        let long = "a".repeat(65);
        for bad in [
            "<script>alert(1)</script>",
            "invalid grant",
            "call_5551234567",
            long.as_str(),
            "x\u{202e}y",
            "rt-abcdefgh",
        ] {
            assert_eq!(error_code(bad, &["rt-abcdefghijk"]), FALLBACK_CODE, "{bad}");
        }
    }

    #[test]
    fn descriptions_lose_links_numbers_secrets_and_markup() {
        let rt = "1//0gAbCdEfGhIjKlMnOp-refresh";
        let d = error_description(
            "Token 1//0gAbCdEfGhIj is bad; call +1 (555) 010-9999 or see https://evil.example/x?a=1, \
             www.evil.example, evil.example/help or help@evil.example. Code 4001 expired.",
            &[rt],
        )
        .unwrap();
        assert_eq!(
            d,
            "Token [REDACTED] is bad; call [number] or see [link] [link] [link] or [link] Code 4001 expired."
        );
        assert_eq!(
            error_description("<script>alert(1)</script> Token expired", &[]),
            None
        );
        assert_eq!(
            error_description("bad\u{202e}\u{0}\ttoken\n e.g. grant_type", &[]).unwrap(),
            "bad token e.g. grant_type"
        );
        assert_eq!(
            error_description("https://evil.example 5551234567", &[]),
            None
        );
        assert_eq!(
            error_description(&"x".repeat(1000), &[])
                .unwrap()
                .chars()
                .count(),
            MAX_DESCRIPTION + 1
        );
        // A secret's window anywhere in a long text, and short secrets whole.
        let d = error_description(
            "abcd-secret: ab and xx1//0gAbCdEfyy",
            &["abcd-secret", "ab", rt],
        );
        assert_eq!(d.unwrap(), "[REDACTED]: ab and xx[REDACTED]yy");
    }

    #[test]
    fn oauth_error_shapes() {
        let p = provider();
        let j = serde_json::json!({"error": "invalid_grant", "error_description": "expired"});
        assert_eq!(
            oauth_error(&p, &j, &[]),
            Some(("invalid_grant".into(), Some("expired".into())))
        );
        let j = serde_json::json!({"error": {"code": "access_token_invalid", "message": "m"}});
        assert_eq!(
            oauth_error(&p, &j, &[]),
            Some(("access_token_invalid".into(), Some("m".into())))
        );
        let j = serde_json::json!({"message": "Bad credentials"});
        assert_eq!(
            oauth_error(&p, &j, &[]),
            Some(("unspecified".into(), Some("Bad credentials".into())))
        );
        assert_eq!(oauth_error(&p, &serde_json::json!({"x": 1}), &[]), None);
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
