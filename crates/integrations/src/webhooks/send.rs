//! One delivery attempt: a signed POST, judged by its answer. Success is a
//! 2xx within the timeout; a redirect is an answer like any other non-2xx
//! (never followed: it could lead anywhere, inside the network too).

use std::time::{Duration, Instant};

use url::Url;

use super::address;
use super::sign::{signature_header, SigningKey};

/// How the delivery client behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendConfig {
    /// An attempt without a 2xx within this is a failure
    /// (`INTEGRATIONS_WEBHOOK_TIMEOUT`, 10 s).
    pub timeout: Duration,
    /// Internal addresses and plain http allowed
    /// ([`address::ALLOW_PRIVATE_ENV`]).
    pub allow_private: bool,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            timeout: Duration::from_secs(10),
            allow_private: false,
        }
    }
}

/// Most bytes of an answer's body read (then the connection is dropped):
/// a receiver cannot make us buffer more.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What an attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The HTTP status, when an answer came.
    pub status: Option<u16>,
    /// Why it failed (`None`: delivered). Never a secret; the endpoint's
    /// own URL is not repeated.
    pub error: Option<String>,
    /// How long it took.
    pub elapsed: Duration,
}

impl Attempt {
    /// A 2xx arrived in time.
    pub fn delivered(&self) -> bool {
        self.error.is_none()
    }
}

/// The HTTP client deliveries go through.
#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
    config: SendConfig,
}

impl Sender {
    /// A client with no redirects, no proxy from the environment (it could
    /// route around the address guard), the timeout, and, unless
    /// `allow_private`, the guarded resolver.
    pub fn new(config: SendConfig) -> Result<Sender, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .user_agent(concat!("integrations-webhooks/", env!("CARGO_PKG_VERSION")));
        if !config.allow_private {
            builder = builder.dns_resolver(address::guarded_resolver());
        }
        Ok(Sender {
            client: builder.build()?,
            config,
        })
    }

    /// The client's settings.
    pub fn config(&self) -> &SendConfig {
        &self.config
    }

    /// POSTs `body` to `url` with the Standard Webhooks headers: `id`,
    /// the current time, and one signature per key.
    pub async fn send(&self, url: &Url, id: &str, body: Vec<u8>, keys: &[&SigningKey]) -> Attempt {
        self.send_within(url, id, body, keys, self.config.timeout)
            .await
    }

    /// [`Sender::send`], failing after `timeout` (at most the configured
    /// one).
    pub async fn send_within(
        &self,
        url: &Url,
        id: &str,
        body: Vec<u8>,
        keys: &[&SigningKey],
        timeout: Duration,
    ) -> Attempt {
        let timeout = timeout.min(self.config.timeout);
        let started = Instant::now();
        let failed = |status: Option<u16>, error: String| Attempt {
            status,
            error: Some(error),
            elapsed: started.elapsed(),
        };
        if !self.config.allow_private && address::literal_internal(url) {
            return failed(
                None,
                address::AddressError::Internal(url.host_str().unwrap_or_default().to_string())
                    .to_string(),
            );
        }
        let timestamp = chrono::Utc::now().timestamp();
        let signature = signature_header(keys, id, timestamp, &body);
        let sent = self
            .client
            .post(url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .timeout(timeout)
            .body(body)
            .send()
            .await;
        let mut answer = match sent {
            Ok(answer) => answer,
            Err(e) => return failed(None, Self::describe(&e, timeout)),
        };
        let status = answer.status();
        // Read a little of the body so the connection can be reused; the
        // rest is dropped with it.
        let mut read = 0;
        while read < MAX_ANSWER_BYTES {
            match answer.chunk().await {
                Ok(Some(chunk)) => read += chunk.len(),
                _ => break,
            }
        }
        if status.is_success() {
            return Attempt {
                status: Some(status.as_u16()),
                error: None,
                elapsed: started.elapsed(),
            };
        }
        let why = if status.is_redirection() {
            format!("HTTP {} (redirects are not followed)", status.as_u16())
        } else {
            format!("HTTP {}", status.as_u16())
        };
        failed(Some(status.as_u16()), why)
    }

    /// A transport error, in words that name neither the URL nor an
    /// address the host resolved to.
    fn describe(e: &reqwest::Error, timeout: Duration) -> String {
        if e.is_timeout() {
            return format!("no answer within {} s", timeout.as_secs_f64());
        }
        // The guard's refusal, when that is what failed.
        let mut source = std::error::Error::source(e);
        while let Some(cause) = source {
            if let Some(refused) = cause.downcast_ref::<address::AddressError>() {
                return refused.to_string();
            }
            source = cause.source();
        }
        if e.is_connect() {
            "could not connect".to_string()
        } else if e.is_request() || e.is_body() {
            "the connection failed while sending".to_string()
        } else {
            "the request failed".to_string()
        }
    }
}
