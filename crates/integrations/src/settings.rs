//! The service's typed settings, assembled once from the environment (and
//! `.env`), then handed down; nothing below re-reads the environment. Every
//! reader takes its variables from the same source, a `Fn(&str) ->
//! Option<String>` ([`process_env`] in production, a map in tests).

use db_pool::{ConfigError, Defaults, PoolConfig, Profile};

/// The `application_name` this service shows in `pg_stat_activity` unless
/// the URL says otherwise.
pub const APPLICATION_NAME: &str = "integrations";

/// Loads `.env` from the working directory. Variables already set in the
/// environment win over the file.
pub fn load_dotenv() -> Result<(), String> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        Err(e) => Err(format!("could not read .env: {e}")),
    }
}

/// Builds the pool configuration from a URL and an optional profile name.
pub fn pool_config(url: Option<&str>, profile: Option<&str>) -> Result<PoolConfig, ConfigError> {
    let profile = parse_profile(profile)?;
    let url = url.ok_or(ConfigError::Missing)?;
    PoolConfig::parse_with(
        url,
        &Defaults {
            profile,
            application_name: APPLICATION_NAME.to_string(),
        },
    )
}

/// `DATABASE_PROFILE`, if set (blank: none).
pub fn parse_profile(profile: Option<&str>) -> Result<Option<Profile>, ConfigError> {
    profile
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::parse)
        .transpose()
}

/// The service's own settings (beyond the pool), from the environment.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// `INTEGRATIONS_ENCRYPTION_KEYS` (`id:base64key,...`), kept secret.
    pub encryption_keys: Option<secrecy::SecretString>,
    /// `INTEGRATIONS_PROVIDERS`: a provider registry file replacing the
    /// built-in one.
    pub providers_file: Option<std::path::PathBuf>,
    /// The operations' tunables.
    pub service: crate::service::ServiceConfig,
    /// The background refresher.
    pub refresher: crate::service::Refresher,
    /// How long events are kept (`INTEGRATIONS_EVENT_RETENTION`) and how
    /// the background purge runs.
    pub events: crate::service::EventRetention,
    /// The HTTP server's timeouts and connection cap.
    pub http: crate::http::ServerLimits,
    /// `INTEGRATIONS_REQUEST_TIMEOUT`: a request still running after this
    /// is stopped and answered 503 `request_timeout`.
    pub request_timeout: std::time::Duration,
}

/// Most `INTEGRATIONS_HTTP_MAX_CONNECTIONS` accepted.
const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

/// The most background refreshes in flight `INTEGRATIONS_REFRESH_CONCURRENCY` accepts.
const MAX_REFRESH_CONCURRENCY: usize = 10_000;

/// A service setting that does not parse: names the variable and what is
/// accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}='{value}' is not valid; accepted: {accepted}")]
pub struct SettingError {
    /// The variable.
    pub var: &'static str,
    /// Its value (never a secret: secret variables are not parsed here).
    pub value: String,
    /// What is accepted.
    pub accepted: &'static str,
}

impl ServiceSettings {
    /// Reads the `INTEGRATIONS_*` variables through `env` (the process
    /// environment in production, a map in tests).
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<ServiceSettings, SettingError> {
        let secs = |var: &'static str,
                    default: std::time::Duration|
         -> Result<std::time::Duration, SettingError> {
            match env(var).filter(|v| !v.trim().is_empty()) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .map(std::time::Duration::from_secs)
                    .ok_or(SettingError {
                        var,
                        value: v,
                        accepted: "a whole number of seconds >= 1",
                    }),
            }
        };
        let mut service = crate::service::ServiceConfig::default();
        service.status_cache_ttl = secs("INTEGRATIONS_STATUS_CACHE_TTL", service.status_cache_ttl)?;
        service.refresh_margin = secs("INTEGRATIONS_REFRESH_MARGIN", service.refresh_margin)?;
        if let Some(v) = env("INTEGRATIONS_STATUS_CACHE_CAPACITY").filter(|v| !v.trim().is_empty())
        {
            service.status_cache_capacity = v.trim().parse().map_err(|_| SettingError {
                var: "INTEGRATIONS_STATUS_CACHE_CAPACITY",
                value: v.clone(),
                accepted: "a whole number of users >= 0 (0 turns the status cache off)",
            })?;
        }
        if let Some(url) = env("INTEGRATIONS_CALLBACK_URL").filter(|v| !v.trim().is_empty()) {
            match url::Url::parse(url.trim()) {
                Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {
                    service.callback_url = Some(u.to_string())
                }
                _ => {
                    return Err(SettingError {
                        var: "INTEGRATIONS_CALLBACK_URL",
                        value: url,
                        accepted: "this service's absolute http(s) URL of /v1/oauth/callback",
                    })
                }
            }
        }
        if let Some(list) = env(crate::service::REDIRECT_ORIGINS_ENV) {
            service.redirect_origins =
                crate::service::RedirectOrigins::parse(&list).map_err(|_| SettingError {
                    var: crate::service::REDIRECT_ORIGINS_ENV,
                    value: list.clone(),
                    accepted: "comma-separated http(s) origins without path or user:pass@, e.g. https://app.example.com,http://localhost:3000",
                })?;
        }
        let mut refresher = crate::service::Refresher::default();
        refresher.interval = secs("INTEGRATIONS_REFRESH_INTERVAL", refresher.interval)?;
        refresher.margin = secs(
            "INTEGRATIONS_REFRESHER_MARGIN",
            refresher.margin.max(service.refresh_margin),
        )?;
        if let Some(v) = env("INTEGRATIONS_REFRESH_CONCURRENCY").filter(|v| !v.trim().is_empty()) {
            refresher.concurrency = v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_REFRESH_CONCURRENCY).contains(n))
                .ok_or(SettingError {
                    var: "INTEGRATIONS_REFRESH_CONCURRENCY",
                    value: v.clone(),
                    accepted: "a whole number of refreshes in flight per provider from 1 to 10000",
                })?;
        }
        service.webhooks = webhook_settings(env, &secs)?;
        let mut events = crate::service::EventRetention::default();
        events.retention = secs("INTEGRATIONS_EVENT_RETENTION", events.retention)?;
        let mut http = crate::http::ServerLimits::default();
        http.header_read_timeout =
            secs("INTEGRATIONS_HTTP_HEADER_TIMEOUT", http.header_read_timeout)?;
        http.idle_timeout = secs("INTEGRATIONS_HTTP_IDLE_TIMEOUT", http.idle_timeout)?;
        if let Some(v) = env("INTEGRATIONS_HTTP_MAX_CONNECTIONS").filter(|v| !v.trim().is_empty()) {
            http.max_connections = Some(
                v.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_CONNECTIONS_LIMIT).contains(n))
                    .ok_or(SettingError {
                        var: "INTEGRATIONS_HTTP_MAX_CONNECTIONS",
                        value: v.clone(),
                        accepted: "a whole number of connections from 1 to 1000000",
                    })?,
            );
        }
        let request_timeout = secs(
            "INTEGRATIONS_REQUEST_TIMEOUT",
            crate::http::DEFAULT_REQUEST_TIMEOUT,
        )?;
        Ok(ServiceSettings {
            encryption_keys: env(crate::crypto::KEYS_ENV)
                .filter(|v| !v.trim().is_empty())
                .map(secrecy::SecretString::from),
            providers_file: env("INTEGRATIONS_PROVIDERS")
                .filter(|v| !v.trim().is_empty())
                .map(std::path::PathBuf::from),
            service,
            refresher,
            events,
            http,
            request_timeout,
        })
    }

    /// The keyring; refusing to go on without one.
    pub fn keyring(&self) -> Result<crate::crypto::Keyring, crate::crypto::CryptoError> {
        use secrecy::ExposeSecret;
        match &self.encryption_keys {
            Some(spec) => crate::crypto::Keyring::parse(spec.expose_secret()),
            None => Err(crate::crypto::CryptoError::InvalidKeys(format!(
                "it is not set; tokens are encrypted at rest, so the service needs a key: \
                 {}=k1:$(openssl rand -base64 32) (or `integrations generate-key`)",
                crate::crypto::KEYS_ENV
            ))),
        }
    }

    /// The provider registry: the file in `INTEGRATIONS_PROVIDERS`, or the
    /// built-in one, its client ids and secrets read through `env` (the
    /// source these settings came from).
    pub fn providers(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<crate::oauth::ProviderRegistry, crate::oauth::RegistryError> {
        crate::oauth::ProviderRegistry::load(self.providers_file.as_deref(), env)
    }
}

/// The `INTEGRATIONS_WEBHOOK_*` variables; `secs` parses whole seconds.
fn webhook_settings(
    env: &dyn Fn(&str) -> Option<String>,
    secs: &dyn Fn(&'static str, std::time::Duration) -> Result<std::time::Duration, SettingError>,
) -> Result<crate::webhooks::WebhookConfig, SettingError> {
    let mut cfg = crate::webhooks::WebhookConfig::default();
    let set = |var: &'static str| env(var).filter(|v| !v.trim().is_empty());
    if let Some(v) = set(crate::webhooks::ALLOW_PRIVATE_ENV) {
        cfg.send.allow_private = match v.trim() {
            "true" | "1" => true,
            "false" | "0" => false,
            _ => {
                return Err(SettingError {
                    var: crate::webhooks::ALLOW_PRIVATE_ENV,
                    value: v,
                    accepted: "true or false (true lets webhook endpoints be loopback, private or link-local addresses and plain http: for tests and local development)",
                })
            }
        };
    }
    // Bounded so every sum and interval they enter stays in range.
    let at_most =
        |var: &'static str, value: std::time::Duration, max_secs: u64, accepted: &'static str| {
            if value.as_secs() > max_secs {
                Err(SettingError {
                    var,
                    value: value.as_secs().to_string(),
                    accepted,
                })
            } else {
                Ok(value)
            }
        };
    cfg.send.timeout = at_most(
        "INTEGRATIONS_WEBHOOK_TIMEOUT",
        secs("INTEGRATIONS_WEBHOOK_TIMEOUT", cfg.send.timeout)?,
        300,
        "a whole number of seconds from 1 to 300",
    )?;
    cfg.disable_after = at_most(
        "INTEGRATIONS_WEBHOOK_DISABLE_AFTER",
        secs("INTEGRATIONS_WEBHOOK_DISABLE_AFTER", cfg.disable_after)?,
        365 * 86_400,
        "a whole number of seconds from 1 to 31536000 (a year)",
    )?;
    if let Some(v) = set("INTEGRATIONS_WEBHOOK_RETRY_SCHEDULE") {
        cfg.schedule = crate::webhooks::parse_schedule(&v)
            .filter(|pauses| pauses.iter().all(|p| p.as_secs() <= 7 * 86_400))
            .ok_or(SettingError {
                var: "INTEGRATIONS_WEBHOOK_RETRY_SCHEDULE",
                value: v.clone(),
                accepted: "1 to 30 comma-separated pauses before each retry, each a whole number and a unit (ms, s, m, h, d) up to 7d, e.g. 5s,5m,30m,2h,5h,10h,14h",
            })?;
    }
    if let Some(v) = set("INTEGRATIONS_WEBHOOK_CONCURRENCY") {
        cfg.concurrency = v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1024).contains(n))
            .ok_or(SettingError {
                var: "INTEGRATIONS_WEBHOOK_CONCURRENCY",
                value: v.clone(),
                accepted: "a whole number of attempts in flight per endpoint per instance, from 1 to 1024",
            })?;
    }
    Ok(cfg)
}

/// The process environment, for [`ServiceSettings::from_env`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<ServiceSettings, SettingError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ServiceSettings::from_env(&move |name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn http_limits_default_and_parse() {
        let http = settings(&[]).unwrap().http;
        assert_eq!(http, crate::http::ServerLimits::default());
        assert_eq!(http.header_read_timeout.as_secs(), 10);
        assert_eq!(http.idle_timeout.as_secs(), 60);
        assert_eq!(http.max_connections, None);
        let http = settings(&[
            ("INTEGRATIONS_HTTP_HEADER_TIMEOUT", "2"),
            ("INTEGRATIONS_HTTP_IDLE_TIMEOUT", "5"),
            ("INTEGRATIONS_HTTP_MAX_CONNECTIONS", " 3 "),
        ])
        .unwrap()
        .http;
        assert_eq!(http.header_read_timeout.as_secs(), 2);
        assert_eq!(http.idle_timeout.as_secs(), 5);
        assert_eq!(http.max_connections, Some(3));
    }

    #[test]
    fn event_retention_defaults_to_7_days_and_parses() {
        let events = settings(&[]).unwrap().events;
        assert_eq!(events.retention.as_secs(), 7 * 24 * 3600);
        let s = settings(&[("INTEGRATIONS_EVENT_RETENTION", " 3600 ")]).unwrap();
        assert_eq!(s.events.retention.as_secs(), 3600);
        for bad in ["0", "7d", "-1"] {
            let err = settings(&[("INTEGRATIONS_EVENT_RETENTION", bad)]).unwrap_err();
            assert_eq!(err.var, "INTEGRATIONS_EVENT_RETENTION");
            assert!(err.to_string().contains("accepted"), "{err}");
        }
    }

    #[test]
    fn webhook_settings_default_and_parse() {
        let w = settings(&[]).unwrap().service.webhooks;
        assert_eq!(w, crate::webhooks::WebhookConfig::default());
        assert!(!w.send.allow_private);
        assert_eq!(w.send.timeout.as_secs(), 10);
        assert_eq!(w.disable_after.as_secs(), 5 * 24 * 3600);
        let w = settings(&[
            ("INTEGRATIONS_WEBHOOK_ALLOW_PRIVATE", "true"),
            ("INTEGRATIONS_WEBHOOK_TIMEOUT", "2"),
            ("INTEGRATIONS_WEBHOOK_RETRY_SCHEDULE", "1s, 500ms"),
            ("INTEGRATIONS_WEBHOOK_CONCURRENCY", "4"),
            ("INTEGRATIONS_WEBHOOK_DISABLE_AFTER", "60"),
        ])
        .unwrap()
        .service
        .webhooks;
        assert!(w.send.allow_private);
        assert_eq!(w.send.timeout.as_secs(), 2);
        assert_eq!(w.schedule.len(), 2);
        assert_eq!(w.concurrency, 4);
        assert_eq!(w.disable_after.as_secs(), 60);
        for (var, value) in [
            ("INTEGRATIONS_WEBHOOK_ALLOW_PRIVATE", "yes"),
            ("INTEGRATIONS_WEBHOOK_TIMEOUT", "0"),
            ("INTEGRATIONS_WEBHOOK_RETRY_SCHEDULE", "5"),
            ("INTEGRATIONS_WEBHOOK_CONCURRENCY", "0"),
            ("INTEGRATIONS_WEBHOOK_DISABLE_AFTER", "5d"),
            ("INTEGRATIONS_WEBHOOK_TIMEOUT", "18446744073709551615"),
            ("INTEGRATIONS_WEBHOOK_TIMEOUT", "301"),
            ("INTEGRATIONS_WEBHOOK_DISABLE_AFTER", "31536001"),
            ("INTEGRATIONS_WEBHOOK_RETRY_SCHEDULE", "5s,8d"),
            ("INTEGRATIONS_WEBHOOK_RETRY_SCHEDULE", "99999999999999999d"),
        ] {
            let err = settings(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var);
            assert!(err.to_string().contains("accepted"), "{err}");
        }
    }

    #[test]
    fn request_timeout_defaults_to_10s_and_parses() {
        assert_eq!(settings(&[]).unwrap().request_timeout.as_secs(), 10);
        let s = settings(&[("INTEGRATIONS_REQUEST_TIMEOUT", " 3 ")]).unwrap();
        assert_eq!(s.request_timeout.as_secs(), 3);
    }

    #[test]
    fn bad_http_limits_name_the_variable_and_what_is_accepted() {
        for (var, value) in [
            ("INTEGRATIONS_REQUEST_TIMEOUT", "0"),
            ("INTEGRATIONS_REQUEST_TIMEOUT", "10s"),
            ("INTEGRATIONS_HTTP_HEADER_TIMEOUT", "0"),
            ("INTEGRATIONS_HTTP_IDLE_TIMEOUT", "1m"),
            ("INTEGRATIONS_HTTP_MAX_CONNECTIONS", "0"),
            ("INTEGRATIONS_HTTP_MAX_CONNECTIONS", "many"),
            ("INTEGRATIONS_HTTP_MAX_CONNECTIONS", "1000001"),
        ] {
            let err = settings(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var);
            let text = err.to_string();
            assert!(text.contains(value) && text.contains("accepted"), "{text}");
        }
    }
}
