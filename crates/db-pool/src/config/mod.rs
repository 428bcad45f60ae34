//! `DATABASE_URL` parsing: the parameters Prisma accepts, the seed's profiles,
//! and where each effective value came from.
//!
//! Precedence for every pool parameter: URL query parameter > profile
//! (`DATABASE_PROFILE`) > built-in default. Values that do not parse are
//! errors (`P1013`), never silent defaults; unknown parameters are kept in
//! [`PoolConfig::ignored_parameters`] so callers can warn about them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

mod params;

/// The Prisma error code for an invalid database string.
pub const INVALID_URL_CODE: &str = "P1013";

/// What went wrong while assembling a [`PoolConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The URL, or one of its parameters, does not parse. The message names
    /// the parameter, the value, and what is accepted. It never contains the
    /// password.
    #[error("P1013: The provided database string is invalid. {0}")]
    InvalidUrl(String),
    /// `DATABASE_PROFILE` names no known profile.
    #[error(
        "P1013: The provided database string is invalid. DATABASE_PROFILE='{0}' is not a known profile; accepted: development, production, high-traffic"
    )]
    UnknownProfile(String),
    /// No URL was given at all.
    #[error("P1013: The provided database string is invalid. DATABASE_URL is not set; set it to postgresql://user:password@host:5432/database")]
    Missing,
}

impl ConfigError {
    /// The Prisma error code (`P1013` for every configuration error).
    pub fn code(&self) -> &'static str {
        INVALID_URL_CODE
    }

    /// What to do about it.
    pub fn hint(&self) -> &'static str {
        "Fix DATABASE_URL (see the parameter table in the README); PoolConfig::describe lists the effective settings and where each came from."
    }
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::InvalidUrl(msg.into())
}

/// The seed's "Recommended Settings", selected with `DATABASE_PROFILE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// connection_limit 5, pool_timeout 10 s.
    Development,
    /// connection_limit 20, pool_timeout 30 s, connect_timeout 10 s.
    Production,
    /// connection_limit 50, pool_timeout 30 s, connect_timeout 10 s, statement_cache_size 100.
    HighTraffic,
}

impl Profile {
    /// The name accepted by `DATABASE_PROFILE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Development => "development",
            Profile::Production => "production",
            Profile::HighTraffic => "high-traffic",
        }
    }

    /// The seed's recommended range for `statement_cache_size` under this
    /// profile (used by `doctor`).
    pub fn recommended_statement_cache(self) -> (usize, usize) {
        match self {
            Profile::Development => (0, 500),
            Profile::Production | Profile::HighTraffic => (100, 500),
        }
    }

    fn connection_limit(self) -> usize {
        match self {
            Profile::Development => 5,
            Profile::Production => 20,
            Profile::HighTraffic => 50,
        }
    }

    fn pool_timeout(self) -> u64 {
        match self {
            Profile::Development => 10,
            Profile::Production | Profile::HighTraffic => 30,
        }
    }

    fn connect_timeout(self) -> Option<u64> {
        match self {
            Profile::Development => None,
            Profile::Production | Profile::HighTraffic => Some(10),
        }
    }

    fn statement_cache_size(self) -> Option<usize> {
        match self {
            Profile::HighTraffic => Some(100),
            _ => None,
        }
    }
}

impl FromStr for Profile {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "development" => Ok(Profile::Development),
            "production" => Ok(Profile::Production),
            "high-traffic" => Ok(Profile::HighTraffic),
            other => Err(ConfigError::UnknownProfile(other.to_string())),
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an effective value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The built-in default.
    Default,
    /// The `DATABASE_PROFILE` profile.
    Profile,
    /// The URL itself.
    Url,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Default => "default",
            Source::Profile => "profile",
            Source::Url => "url",
        })
    }
}

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address (IPv6 without brackets).
    Tcp(String),
    /// A Unix socket directory (a `host=` beginning with `/`).
    Unix(PathBuf),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(h) => f.write_str(h),
            Host::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// `sslmode`, as libpq and Prisma spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, plain otherwise; certificates not checked.
    Prefer,
    /// TLS or nothing; certificates not checked.
    Require,
    /// TLS, certificate chain checked against the root certificate.
    VerifyCa,
    /// TLS, certificate chain and host name checked.
    VerifyFull,
}

impl SslMode {
    /// The spelling used in URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Prisma's `sslaccept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslAccept {
    /// Any certificate problem fails the connection.
    Strict,
    /// Certificates are not checked (testing only).
    AcceptInvalidCerts,
}

impl SslAccept {
    /// The spelling used in URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            SslAccept::Strict => "strict",
            SslAccept::AcceptInvalidCerts => "accept_invalid_certs",
        }
    }
}

/// Defaults the embedding application supplies: the profile (from
/// `DATABASE_PROFILE`) and its own name for `application_name`.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// The profile whose values sit between the URL and the built-in defaults.
    pub profile: Option<Profile>,
    /// `application_name` when the URL does not set one.
    pub application_name: String,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            profile: None,
            application_name: "db-pool".to_string(),
        }
    }
}

/// Every parameter this crate understands, in the order `config` prints them.
pub const PARAMETERS: &[&str] = &params::names(&params::PARAMS);

/// The effective pool configuration: every `DATABASE_URL` parameter, typed.
///
/// Durations are `None` where the feature is off or the wait unlimited.
/// `Debug` shows no password: both secrets are [`SecretString`]s.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Server address.
    pub host: Host,
    /// Server port (5432 by default).
    pub port: u16,
    /// Database name (`postgres` by default).
    pub database: String,
    /// Role name (`postgres` by default).
    pub user: String,
    /// Password, if the URL has one.
    pub password: Option<SecretString>,
    /// Most connections the pool opens.
    pub connection_limit: usize,
    /// Longest wait for a free connection; `None` waits forever.
    pub pool_timeout: Option<Duration>,
    /// Longest time to open one connection; `None` is no limit.
    pub connect_timeout: Option<Duration>,
    /// Longest time one query may wait on the server; `None` is no limit.
    pub socket_timeout: Option<Duration>,
    /// TCP keepalive on server connections (libpq's `keepalives`): a peer
    /// that vanished (packets silently dropped) is then detected after
    /// `keepalives_idle + keepalives_interval * keepalives_count` of silence
    /// and the connection discarded. Ignored over a Unix socket.
    pub keepalives: bool,
    /// Silence before the first keepalive probe (libpq's `keepalives_idle`).
    pub keepalives_idle: Duration,
    /// Time between unanswered probes (libpq's `keepalives_interval`).
    pub keepalives_interval: Duration,
    /// Unanswered probes before the connection is dropped (libpq's
    /// `keepalives_count`).
    pub keepalives_count: u32,
    /// Longest time sent data may stay unacknowledged before the kernel
    /// drops the connection (libpq's `tcp_user_timeout`, `TCP_USER_TIMEOUT`;
    /// Linux only); `None` leaves the system default (about 15 minutes of
    /// retransmissions).
    pub tcp_user_timeout: Option<Duration>,
    /// Prepared statements cached per connection, as configured (see
    /// [`PoolConfig::effective_statement_cache_size`]).
    pub statement_cache_size: usize,
    /// PgBouncer transaction mode: no named prepared statements.
    pub pgbouncer: bool,
    /// Connections older than this are closed.
    pub max_connection_lifetime: Option<Duration>,
    /// Connections idle longer than this are closed.
    pub max_idle_connection_lifetime: Option<Duration>,
    /// Shown in `pg_stat_activity`.
    pub application_name: String,
    /// The `search_path`.
    pub schema: String,
    /// The `options` startup parameter (e.g. `-c statement_timeout=5000`).
    pub options: Option<String>,
    /// `sslmode`.
    pub sslmode: SslMode,
    /// CA certificate(s) to trust (libpq's `sslrootcert`).
    pub sslrootcert: Option<PathBuf>,
    /// Server/root certificate to trust (Prisma's `sslcert`).
    pub sslcert: Option<PathBuf>,
    /// Client identity (Prisma's `sslidentity`).
    pub sslidentity: Option<PathBuf>,
    /// Password of the client identity.
    pub sslpassword: Option<SecretString>,
    /// Prisma's `sslaccept`.
    pub sslaccept: Option<SslAccept>,
    /// Held longer than this, a connection is reported as a possible leak.
    pub leak_detection_threshold: Option<Duration>,
    /// Statements slower than this are logged.
    pub slow_query_threshold: Option<Duration>,
    /// The profile in force, if any.
    pub profile: Option<Profile>,
    /// Query parameters this crate does not know, in URL order. Not an
    /// error (Prisma ignores them too) but never silently dropped: report them.
    pub ignored_parameters: Vec<String>,
    sources: BTreeMap<&'static str, Source>,
    /// The query parameters as given, secrets already replaced by `****`.
    raw_params: Vec<(String, String)>,
}

/// Default `keepalives_idle`: with the interval and count below, a vanished
/// server is detected within a minute of silence (libpq leaves the system's
/// two hours).
pub const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
/// Default `keepalives_interval`.
pub const DEFAULT_KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
/// Default `keepalives_count`.
pub const DEFAULT_KEEPALIVES_COUNT: u32 = 3;
/// Default `tcp_user_timeout`: the same minute for a connection whose sent
/// data goes unacknowledged (keepalives only probe idle connections).
pub const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest `keepalives_idle`/`keepalives_interval` the kernel accepts
/// (`TCP_KEEPIDLE`/`TCP_KEEPINTVL`, seconds).
const KEEPALIVE_SECS_MAX: u64 = 32_767;
/// Largest `keepalives_count` the kernel accepts (`TCP_KEEPCNT`).
const KEEPALIVE_COUNT_MAX: u64 = 127;
/// Largest `tcp_user_timeout` in milliseconds (`TCP_USER_TIMEOUT` is a C int).
const TCP_USER_TIMEOUT_MAX: u64 = i32::MAX as u64;

/// Parses a whole number within `min..=max`, naming the parameter and what
/// is accepted.
fn parse_range(
    name: &str,
    value: &str,
    min: u64,
    max: u64,
    unit: &str,
) -> Result<u64, ConfigError> {
    match value.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(invalid(format!(
            "{name}='{value}' is not valid; accepted: a whole number of {unit} from {min} to {max}"
        ))),
    }
}

/// Parses a whole number, naming the parameter and what is accepted.
fn parse_uint(name: &str, value: &str, min: u64, unit: &str) -> Result<u64, ConfigError> {
    let accepted = if min == 0 {
        format!("a whole number of {unit} >= 0")
    } else {
        format!("a whole number of {unit} >= {min}")
    };
    match value.trim().parse::<u64>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(invalid(format!(
            "{name}='{value}' is not valid; accepted: {accepted}"
        ))),
    }
}

/// A duration where `0` means "none / unlimited".
fn zero_is_none(n: u64, unit_ms: bool) -> Option<Duration> {
    match (n, unit_ms) {
        (0, _) => None,
        (n, true) => Some(Duration::from_millis(n)),
        (n, false) => Some(Duration::from_secs(n)),
    }
}

impl PoolConfig {
    /// Parses a URL with no profile and the library's own default
    /// `application_name`.
    pub fn parse(url: &str) -> Result<PoolConfig, ConfigError> {
        Self::parse_with(url, &Defaults::default())
    }

    /// Reads `DATABASE_URL` and `DATABASE_PROFILE` from the environment. The
    /// only place this crate reads the environment; everything downstream
    /// receives the typed value.
    pub fn from_env(application_name: &str) -> Result<PoolConfig, ConfigError> {
        let url = std::env::var("DATABASE_URL").map_err(|_| ConfigError::Missing)?;
        let profile = profile_from_env()?;
        Self::parse_with(
            &url,
            &Defaults {
                profile,
                application_name: application_name.to_string(),
            },
        )
    }

    /// Parses a URL, layering the profile and the built-in defaults under it.
    pub fn parse_with(url: &str, defaults: &Defaults) -> Result<PoolConfig, ConfigError> {
        let url = url.trim();
        let scheme_end = url.find("://").ok_or_else(|| {
            invalid("the URL must begin with postgresql:// or postgres:// (for example postgresql://user:password@localhost:5432/database)")
        })?;
        let scheme = &url[..scheme_end];
        if scheme != "postgresql" && scheme != "postgres" {
            return Err(invalid(format!(
                "the scheme '{scheme}' is not supported; accepted: postgresql://, postgres://"
            )));
        }
        let parsed = url::Url::parse(url).map_err(|e| {
            // `url`'s messages are terse ("invalid port number"); say which part.
            let what = match e {
                url::ParseError::InvalidPort => {
                    "the port is not valid; accepted: a number from 1 to 65535".to_string()
                }
                url::ParseError::InvalidIpv6Address => {
                    "the IPv6 address is not valid; write it in brackets, e.g. postgresql://[2001:db8::1]:5432/db".to_string()
                }
                other => format!("the URL does not parse ({other})"),
            };
            invalid(what)
        })?;
        let mut cfg = PoolConfig::defaults(defaults);
        cfg.apply_authority(&parsed)?;
        cfg.apply_query(&parsed)?;
        Ok(cfg)
    }

    fn defaults(defaults: &Defaults) -> PoolConfig {
        let mut sources = BTreeMap::new();
        for p in PARAMETERS {
            sources.insert(*p, Source::Default);
        }
        let mut cfg = PoolConfig {
            host: Host::Tcp("localhost".to_string()),
            port: 5432,
            database: "postgres".to_string(),
            user: "postgres".to_string(),
            password: None,
            connection_limit: 10,
            pool_timeout: Some(Duration::from_secs(10)),
            connect_timeout: Some(Duration::from_secs(5)),
            socket_timeout: None,
            keepalives: true,
            keepalives_idle: DEFAULT_KEEPALIVES_IDLE,
            keepalives_interval: DEFAULT_KEEPALIVES_INTERVAL,
            keepalives_count: DEFAULT_KEEPALIVES_COUNT,
            tcp_user_timeout: Some(DEFAULT_TCP_USER_TIMEOUT),
            statement_cache_size: 100,
            pgbouncer: false,
            max_connection_lifetime: None,
            max_idle_connection_lifetime: Some(Duration::from_secs(300)),
            application_name: defaults.application_name.clone(),
            schema: "public".to_string(),
            options: None,
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            sslcert: None,
            sslidentity: None,
            sslpassword: None,
            sslaccept: None,
            leak_detection_threshold: None,
            slow_query_threshold: None,
            profile: defaults.profile,
            ignored_parameters: Vec::new(),
            sources,
            raw_params: Vec::new(),
        };
        if let Some(p) = defaults.profile {
            cfg.connection_limit = p.connection_limit();
            cfg.sources.insert("connection_limit", Source::Profile);
            cfg.pool_timeout = zero_is_none(p.pool_timeout(), false);
            cfg.sources.insert("pool_timeout", Source::Profile);
            if let Some(ct) = p.connect_timeout() {
                cfg.connect_timeout = zero_is_none(ct, false);
                cfg.sources.insert("connect_timeout", Source::Profile);
            }
            if let Some(sc) = p.statement_cache_size() {
                cfg.statement_cache_size = sc;
                cfg.sources.insert("statement_cache_size", Source::Profile);
            }
        }
        cfg
    }

    fn apply_authority(&mut self, url: &url::Url) -> Result<(), ConfigError> {
        let decode = |s: &str, what: &str| -> Result<String, ConfigError> {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| {
                    invalid(format!(
                        "the {what} is not valid UTF-8 after percent-decoding"
                    ))
                })
        };
        if !url.username().is_empty() {
            self.user = decode(url.username(), "user name")?;
            self.mark("user");
        }
        if let Some(pw) = url.password() {
            // Never echo the password, even in an error.
            self.password = Some(SecretString::from(decode(pw, "password")?));
        }
        match url.host() {
            Some(url::Host::Ipv6(addr)) => {
                self.host = Host::Tcp(addr.to_string());
                self.mark("host");
            }
            Some(url::Host::Ipv4(addr)) => {
                self.host = Host::Tcp(addr.to_string());
                self.mark("host");
            }
            Some(url::Host::Domain(d)) if !d.is_empty() => {
                let d = decode(d, "host")?;
                self.host = if d.starts_with('/') {
                    Host::Unix(PathBuf::from(d))
                } else {
                    Host::Tcp(d)
                };
                self.mark("host");
            }
            _ => {}
        }
        if let Some(port) = url.port() {
            if port == 0 {
                return Err(invalid(
                    "the port 0 is not valid; accepted: a number from 1 to 65535",
                ));
            }
            self.port = port;
            self.mark("port");
        }
        let path = url.path().trim_start_matches('/');
        if !path.is_empty() {
            let db = decode(path, "database name")?;
            if db.contains('/') {
                return Err(invalid(format!(
                    "the database name '{db}' contains '/'; accepted: one path segment, e.g. /mydb"
                )));
            }
            self.database = db;
            self.mark("database");
        }
        Ok(())
    }

    fn apply_query(&mut self, url: &url::Url) -> Result<(), ConfigError> {
        let mut seen: Vec<String> = Vec::new();
        for (key, value) in url.query_pairs() {
            let (key, value) = (key.into_owned(), value.into_owned());
            if seen.contains(&key) {
                return Err(invalid(format!(
                    "the parameter {key} is given more than once; give it once"
                )));
            }
            seen.push(key.clone());
            self.apply_param(&key, &value)?;
            // Kept for `redacted_url` only, so it is stored redacted: secrets
            // and every parameter we do not know (it may be a secret too).
            let secret = matches!(key.as_str(), "sslpassword" | "password")
                || self.ignored_parameters.last() == Some(&key);
            let shown = if secret { "****".to_string() } else { value };
            self.raw_params.push((key, shown));
        }
        Ok(())
    }

    fn mark(&mut self, name: &'static str) {
        self.sources.insert(name, Source::Url);
    }

    fn apply_param(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        match key {
            "host" => {
                if value.is_empty() {
                    return Err(invalid(
                        "host is empty; accepted: a host name, an IP address or a Unix socket directory such as /var/run/postgresql",
                    ));
                }
                self.host = if value.starts_with('/') {
                    Host::Unix(PathBuf::from(value))
                } else {
                    Host::Tcp(
                        value
                            .trim_start_matches('[')
                            .trim_end_matches(']')
                            .to_string(),
                    )
                };
                self.mark("host");
            }
            // libpq's spelling of credentials in the query string.
            "user" if !value.is_empty() => {
                self.user = value.to_string();
                self.mark("user");
            }
            "password" => self.password = Some(SecretString::from(value.to_string())),
            other => match params::find(other) {
                Some(param) => {
                    (param.apply)(self, value)?;
                    self.mark(param.name);
                }
                None => self.ignored_parameters.push(other.to_string()),
            },
        }
        Ok(())
    }

    /// Prepared statements actually cached per connection: 0 under
    /// `pgbouncer=true`, where named statements would break transaction mode.
    pub fn effective_statement_cache_size(&self) -> usize {
        if self.pgbouncer {
            0
        } else {
            self.statement_cache_size
        }
    }

    /// Where a parameter's effective value came from (`host`, `port`, ...
    /// count as `url` when the URL names them; unknown names as `default`).
    pub fn source(&self, name: &str) -> Source {
        self.sources.get(name).copied().unwrap_or(Source::Default)
    }

    /// `host:port`, or the socket directory, as error messages name it.
    pub fn address(&self) -> String {
        match &self.host {
            Host::Tcp(h) if h.contains(':') => format!("[{h}]:{}", self.port),
            Host::Tcp(h) => format!("{h}:{}", self.port),
            Host::Unix(dir) => format!("{}:{}", dir.display(), self.port),
        }
    }

    /// The URL written back with every secret replaced by `****`: safe for
    /// logs and output.
    pub fn redacted_url(&self) -> String {
        let mut out = String::from("postgresql://");
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        out.push_str(&enc(&self.user));
        if self.password.is_some() {
            out.push_str(":****");
        }
        out.push('@');
        match &self.host {
            Host::Tcp(h) if h.contains(':') => out.push_str(&format!("[{h}]:{}", self.port)),
            Host::Tcp(h) => out.push_str(&format!("{h}:{}", self.port)),
            Host::Unix(_) => out.push_str(&format!(":{}", self.port)),
        }
        out.push('/');
        out.push_str(&enc(&self.database));
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.raw_params {
            query.append_pair(k, v);
        }
        let query = query.finish();
        if !query.is_empty() {
            out.push('?');
            out.push_str(&query);
        }
        out
    }

    /// The effective settings as one JSON object: every parameter plus
    /// `host`, `port`, `database`, `user`, `profile` and `ignored_parameters`.
    /// Durations are seconds (`slow_query_threshold` and `tcp_user_timeout`
    /// milliseconds), `null`
    /// where disabled or unlimited. The password is never included;
    /// `sslpassword` is `"****"` when set.
    pub fn to_json(&self) -> Value {
        let mut json = serde_json::Map::new();
        json.insert("host".into(), json!(self.host.to_string()));
        json.insert("port".into(), json!(self.port));
        json.insert("database".into(), json!(self.database));
        json.insert("user".into(), json!(self.user));
        json.insert("profile".into(), json!(self.profile.map(Profile::as_str)));
        for param in &params::TABLE {
            json.insert(param.name.into(), (param.json)(self));
        }
        json.insert("ignored_parameters".into(), json!(self.ignored_parameters));
        Value::Object(json)
    }

    /// Rows of (parameter, shown value, source) for a human-readable table.
    pub fn describe(&self) -> Vec<(&'static str, String, Source)> {
        let mut rows = vec![
            ("host", self.host.to_string(), self.source("host")),
            ("port", self.port.to_string(), self.source("port")),
            ("database", self.database.clone(), self.source("database")),
            ("user", self.user.clone(), self.source("user")),
        ];
        for param in &params::TABLE {
            let mut shown = match (param.json)(self) {
                Value::Null => param.null.to_string(),
                Value::String(s) => s,
                other => format!("{other}{}", param.unit),
            };
            if param.name == "statement_cache_size"
                && self.pgbouncer
                && self.statement_cache_size > 0
            {
                shown = format!(
                    "0 (pgbouncer=true disables it; configured {})",
                    self.statement_cache_size
                );
            }
            rows.push((param.name, shown, self.source(param.name)));
        }
        rows
    }

    /// The password, for the connector only.
    pub fn password(&self) -> Option<&str> {
        self.password.as_ref().map(|p| p.expose_secret())
    }
}

/// Reads `DATABASE_PROFILE`; unset or empty means no profile.
pub fn profile_from_env() -> Result<Option<Profile>, ConfigError> {
    match std::env::var("DATABASE_PROFILE") {
        Ok(v) if !v.trim().is_empty() => v.parse().map(Some),
        _ => Ok(None),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(url: &str) -> PoolConfig {
        PoolConfig::parse(url).unwrap()
    }

    fn err(url: &str) -> String {
        PoolConfig::parse(url).unwrap_err().to_string()
    }

    const BASE: &str = "postgresql://u:p@localhost:5432/db";

    fn with(q: &str) -> PoolConfig {
        parse(&format!("{BASE}?{q}"))
    }

    #[test]
    fn defaults_match_the_seed() {
        let c = parse("postgresql://localhost");
        assert_eq!(c.connection_limit, 10);
        assert_eq!(c.pool_timeout, Some(Duration::from_secs(10)));
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(5)));
        assert_eq!(c.socket_timeout, None);
        assert!(c.keepalives);
        assert_eq!(c.keepalives_idle, Duration::from_secs(30));
        assert_eq!(c.keepalives_interval, Duration::from_secs(10));
        assert_eq!(c.keepalives_count, 3);
        assert_eq!(c.tcp_user_timeout, Some(Duration::from_secs(60)));
        assert_eq!(c.statement_cache_size, 100);
        assert!(!c.pgbouncer);
        assert_eq!(c.max_connection_lifetime, None);
        assert_eq!(
            c.max_idle_connection_lifetime,
            Some(Duration::from_secs(300))
        );
        assert_eq!(c.schema, "public");
        assert_eq!(c.sslmode, SslMode::Prefer);
        assert_eq!(c.leak_detection_threshold, None);
        assert_eq!(c.slow_query_threshold, None);
        assert_eq!(c.port, 5432);
        assert_eq!(c.database, "postgres");
        assert_eq!(c.source("connection_limit"), Source::Default);
    }

    #[test]
    fn application_name_default_comes_from_the_application() {
        let d = Defaults {
            profile: None,
            application_name: "integrations".into(),
        };
        let c = PoolConfig::parse_with("postgresql://localhost/db", &d).unwrap();
        assert_eq!(c.application_name, "integrations");
        let c =
            PoolConfig::parse_with("postgresql://localhost/db?application_name=api", &d).unwrap();
        assert_eq!(c.application_name, "api");
        assert_eq!(c.source("application_name"), Source::Url);
    }

    #[test]
    fn every_parameter_parses() {
        let c = with(
            "connection_limit=7&pool_timeout=20&connect_timeout=3&socket_timeout=9\
             &keepalives=0&keepalives_idle=5&keepalives_interval=2&keepalives_count=4\
             &tcp_user_timeout=1500&statement_cache_size=250&pgbouncer=false&max_connection_lifetime=600\
             &max_idle_connection_lifetime=60&application_name=svc&schema=app\
             &options=-c%20statement_timeout%3D5000&sslmode=verify-full&sslrootcert=%2Fca.pem\
             &sslcert=server.pem&sslidentity=id.p12&sslpassword=s3cret&sslaccept=strict\
             &leak_detection_threshold=30&slow_query_threshold=250",
        );
        assert_eq!(c.connection_limit, 7);
        assert_eq!(c.pool_timeout, Some(Duration::from_secs(20)));
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(3)));
        assert_eq!(c.socket_timeout, Some(Duration::from_secs(9)));
        assert!(!c.keepalives);
        assert_eq!(c.keepalives_idle, Duration::from_secs(5));
        assert_eq!(c.keepalives_interval, Duration::from_secs(2));
        assert_eq!(c.keepalives_count, 4);
        assert_eq!(c.tcp_user_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(c.statement_cache_size, 250);
        assert_eq!(c.effective_statement_cache_size(), 250);
        assert!(!c.pgbouncer);
        assert_eq!(c.max_connection_lifetime, Some(Duration::from_secs(600)));
        assert_eq!(
            c.max_idle_connection_lifetime,
            Some(Duration::from_secs(60))
        );
        assert_eq!(c.application_name, "svc");
        assert_eq!(c.schema, "app");
        assert_eq!(c.options.as_deref(), Some("-c statement_timeout=5000"));
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert, Some(PathBuf::from("/ca.pem")));
        assert_eq!(c.sslcert, Some(PathBuf::from("server.pem")));
        assert_eq!(c.sslidentity, Some(PathBuf::from("id.p12")));
        assert_eq!(
            c.sslpassword.as_ref().map(|s| s.expose_secret()),
            Some("s3cret")
        );
        assert_eq!(c.sslaccept, Some(SslAccept::Strict));
        assert_eq!(c.leak_detection_threshold, Some(Duration::from_secs(30)));
        assert_eq!(c.slow_query_threshold, Some(Duration::from_millis(250)));
        assert!(c.ignored_parameters.is_empty());
        for p in PARAMETERS {
            assert_eq!(c.source(p), Source::Url, "{p}");
        }
    }

    #[test]
    fn zero_means_unlimited_or_off() {
        let c = with("pool_timeout=0&connect_timeout=0&socket_timeout=0&max_connection_lifetime=0&max_idle_connection_lifetime=0&leak_detection_threshold=0&statement_cache_size=0");
        assert_eq!(c.pool_timeout, None);
        assert_eq!(c.connect_timeout, None);
        assert_eq!(c.socket_timeout, None);
        assert_eq!(c.max_connection_lifetime, None);
        assert_eq!(c.max_idle_connection_lifetime, None);
        assert_eq!(c.leak_detection_threshold, None);
        assert_eq!(c.effective_statement_cache_size(), 0);
        let j = c.to_json();
        assert_eq!(j["pool_timeout"], Value::Null);
        assert_eq!(j["connect_timeout"], Value::Null);
    }

    #[test]
    fn keepalive_parameters_parse_and_show() {
        let c = with("keepalives=1&keepalives_idle=1&keepalives_interval=1&keepalives_count=2&tcp_user_timeout=0");
        assert!(c.keepalives);
        assert_eq!(c.keepalives_idle, Duration::from_secs(1));
        assert_eq!(c.keepalives_count, 2);
        assert_eq!(c.tcp_user_timeout, None);
        assert!(with("keepalives=true").keepalives);
        assert!(!with("keepalives=false").keepalives);
        let j = with("keepalives=0").to_json();
        assert_eq!(j["keepalives"], false);
        assert_eq!(j["keepalives_idle"], 30);
        assert_eq!(j["keepalives_count"], 3);
        assert_eq!(j["tcp_user_timeout"], 60_000);
        let rows = parse("postgresql://h/db?tcp_user_timeout=0").describe();
        let shown = |name: &str| {
            rows.iter()
                .find(|(n, _, _)| *n == name)
                .map(|(_, v, s)| (v.clone(), *s))
                .unwrap()
        };
        assert_eq!(shown("keepalives"), ("true".into(), Source::Default));
        assert_eq!(shown("keepalives_idle"), ("30s".into(), Source::Default));
        assert_eq!(
            shown("keepalives_interval"),
            ("10s".into(), Source::Default)
        );
        assert_eq!(shown("keepalives_count"), ("3".into(), Source::Default));
        assert_eq!(
            shown("tcp_user_timeout"),
            ("system default".into(), Source::Url)
        );
    }

    #[test]
    fn pgbouncer_true_turns_the_statement_cache_off() {
        let c = with("pgbouncer=true&statement_cache_size=200");
        assert!(c.pgbouncer);
        assert_eq!(c.statement_cache_size, 200);
        assert_eq!(c.effective_statement_cache_size(), 0);
        assert_eq!(c.to_json()["statement_cache_size"], 0);
        assert_eq!(c.to_json()["pgbouncer"], true);
    }

    #[test]
    fn every_sslmode_and_sslaccept() {
        for (v, m) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            assert_eq!(with(&format!("sslmode={v}")).sslmode, m);
        }
        assert_eq!(
            with("sslaccept=accept_invalid_certs").sslaccept,
            Some(SslAccept::AcceptInvalidCerts)
        );
    }

    #[test]
    fn socket_directory_vector() {
        let c = parse("postgresql:///dbname?host=%2Fvar%2Frun%2Fpostgresql");
        assert_eq!(c.host, Host::Unix(PathBuf::from("/var/run/postgresql")));
        assert_eq!(c.database, "dbname");
        assert_eq!(c.port, 5432);
    }

    #[test]
    fn ipv6_vector() {
        let c = parse("postgresql://[2001:db8::1]:5433/db");
        assert_eq!(c.host, Host::Tcp("2001:db8::1".into()));
        assert_eq!(c.port, 5433);
        assert_eq!(c.database, "db");
        assert_eq!(c.address(), "[2001:db8::1]:5433");
    }

    #[test]
    fn host_parameter_overrides_the_authority() {
        let c = parse("postgresql://u@ignored:6000/db?host=db.internal");
        assert_eq!(c.host, Host::Tcp("db.internal".into()));
        assert_eq!(c.port, 6000);
    }

    #[test]
    fn user_and_password_are_percent_decoded() {
        let c = parse("postgres://al%40ice:p%40ss%3Aw%2Fo%23rd@h/db");
        assert_eq!(c.user, "al@ice");
        assert_eq!(c.password(), Some("p@ss:w/o#rd"));
    }

    #[test]
    fn both_schemes_are_accepted_and_others_refused() {
        assert_eq!(parse("postgres://h/db").database, "db");
        assert_eq!(parse("postgresql://h/db").database, "db");
        let e = err("mysql://u:p@h/db");
        assert!(e.starts_with("P1013: "), "{e}");
        assert!(e.contains("'mysql'") && e.contains("postgresql://"), "{e}");
        assert!(err("localhost:5432/db").contains("must begin with postgresql://"));
    }

    #[test]
    fn bad_values_are_p1013_errors_naming_the_parameter_and_what_is_accepted() {
        let cases = [
            ("connection_limit=abc", "connection_limit='abc'", ">= 1"),
            ("connection_limit=0", "connection_limit='0'", ">= 1"),
            ("connection_limit=-3", "connection_limit='-3'", ">= 1"),
            ("pool_timeout=-1", "pool_timeout='-1'", ">= 0"),
            ("pool_timeout=1.5", "pool_timeout='1.5'", "whole number"),
            ("connect_timeout=soon", "connect_timeout='soon'", ">= 0"),
            ("socket_timeout=x", "socket_timeout='x'", ">= 0"),
            ("keepalives=yes", "keepalives='yes'", "1, 0, true, false"),
            ("keepalives=2", "keepalives='2'", "1, 0, true, false"),
            (
                "keepalives_idle=0",
                "keepalives_idle='0'",
                "seconds from 1 to 32767",
            ),
            (
                "keepalives_idle=40000",
                "keepalives_idle='40000'",
                "seconds from 1 to 32767",
            ),
            (
                "keepalives_interval=1s",
                "keepalives_interval='1s'",
                "seconds from 1 to 32767",
            ),
            (
                "keepalives_count=0",
                "keepalives_count='0'",
                "probes from 1 to 127",
            ),
            (
                "keepalives_count=128",
                "keepalives_count='128'",
                "probes from 1 to 127",
            ),
            (
                "tcp_user_timeout=-1",
                "tcp_user_timeout='-1'",
                "milliseconds from 0 to 2147483647",
            ),
            (
                "statement_cache_size=-5",
                "statement_cache_size='-5'",
                ">= 0",
            ),
            ("pgbouncer=yes", "pgbouncer='yes'", "true, false"),
            ("pgbouncer=1", "pgbouncer='1'", "true, false"),
            (
                "max_connection_lifetime=x",
                "max_connection_lifetime='x'",
                ">= 0",
            ),
            (
                "max_idle_connection_lifetime=-1",
                "max_idle_connection_lifetime='-1'",
                ">= 0",
            ),
            ("sslmode=always", "sslmode='always'", "verify-full"),
            (
                "sslaccept=never",
                "sslaccept='never'",
                "accept_invalid_certs",
            ),
            (
                "leak_detection_threshold=x",
                "leak_detection_threshold='x'",
                ">= 0",
            ),
            (
                "slow_query_threshold=fast",
                "slow_query_threshold='fast'",
                "milliseconds",
            ),
            ("application_name=", "application_name=''", "1 to 63"),
            ("schema=", "schema is empty", "public"),
            ("sslrootcert=", "sslrootcert is empty", "file path"),
            (
                "connection_limit=5&connection_limit=6",
                "connection_limit is given more than once",
                "once",
            ),
        ];
        for (q, names, accepted) in cases {
            let e = err(&format!("{BASE}?{q}"));
            assert!(
                e.starts_with("P1013: The provided database string is invalid. "),
                "{q}: {e}"
            );
            assert!(e.contains(names), "{q}: {e}");
            assert!(e.contains(accepted), "{q}: {e}");
            assert!(!e.contains("u:p@"), "{q}: {e}");
        }
    }

    #[test]
    fn bad_ports_are_refused() {
        let e = err("postgresql://u:p@h:99999/db");
        assert!(
            e.starts_with("P1013: ") && e.contains("port") && e.contains("65535"),
            "{e}"
        );
        let e = err("postgresql://u:p@h:0/db");
        assert!(e.contains("port 0"), "{e}");
        let e = err("postgresql://u:p@h:abc/db");
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn errors_never_contain_the_password() {
        for url in [
            "postgresql://u:hunter2@h:99999/db",
            "postgresql://u:hunter2@h/db?connection_limit=x",
            "postgresql://u:hunter2@h/db?sslpassword=hunter3&pgbouncer=maybe",
            "mysql://u:hunter2@h/db",
            "postgresql://u:hunter2@[::1/db",
        ] {
            let e = PoolConfig::parse(url).unwrap_err();
            let text = format!("{e} {e:?}");
            assert!(
                !text.contains("hunter2") && !text.contains("hunter3"),
                "{text}"
            );
        }
    }

    #[test]
    fn query_string_credentials_and_unknown_values_are_never_shown() {
        let c =
            parse("postgresql://h/db?user=app&password=hunter2&apikey=hunter3&connection_limit=2");
        assert_eq!(c.user, "app");
        assert_eq!(c.password(), Some("hunter2"));
        assert_eq!(c.ignored_parameters, vec!["apikey"]);
        let url = c.redacted_url();
        assert!(
            !url.contains("hunter2") && !url.contains("hunter3"),
            "{url}"
        );
        assert!(
            url.contains("apikey=****") && url.contains("connection_limit=2"),
            "{url}"
        );
    }

    #[test]
    fn unknown_parameters_are_reported_not_errors() {
        let c = with("connection_limit=3&sslkey=k.pem&foo=bar");
        assert_eq!(c.connection_limit, 3);
        assert_eq!(c.ignored_parameters, vec!["sslkey", "foo"]);
        assert_eq!(c.to_json()["ignored_parameters"], json!(["sslkey", "foo"]));
    }

    #[test]
    fn redaction_covers_url_debug_and_json() {
        let c =
            parse("postgresql://app:hunter2@db:5432/prod?connection_limit=4&sslpassword=hunter3");
        let url = c.redacted_url();
        assert_eq!(
            url,
            "postgresql://app:****@db:5432/prod?connection_limit=4&sslpassword=****"
        );
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("hunter3"),
            "{debug}"
        );
        let json = c.to_json().to_string();
        assert!(
            !json.contains("hunter2") && !json.contains("hunter3"),
            "{json}"
        );
        let table = format!("{:?}", c.describe());
        assert!(!table.contains("hunter2") && !table.contains("hunter3"));
        // No password: nothing to redact, and no stray colon.
        assert_eq!(
            parse("postgresql://app@db/prod").redacted_url(),
            "postgresql://app@db:5432/prod"
        );
    }

    #[test]
    fn profiles_supply_the_seed_recommendations() {
        let p = |profile| {
            PoolConfig::parse_with(
                "postgresql://h/db",
                &Defaults {
                    profile: Some(profile),
                    application_name: "x".into(),
                },
            )
            .unwrap()
        };
        let d = p(Profile::Development);
        assert_eq!(
            (d.connection_limit, d.pool_timeout),
            (5, Some(Duration::from_secs(10)))
        );
        assert_eq!(d.connect_timeout, Some(Duration::from_secs(5)));
        assert_eq!(d.source("connect_timeout"), Source::Default);
        let pr = p(Profile::Production);
        assert_eq!(pr.connection_limit, 20);
        assert_eq!(pr.pool_timeout, Some(Duration::from_secs(30)));
        assert_eq!(pr.connect_timeout, Some(Duration::from_secs(10)));
        assert_eq!(pr.source("connection_limit"), Source::Profile);
        let h = p(Profile::HighTraffic);
        assert_eq!(h.connection_limit, 50);
        assert_eq!(h.pool_timeout, Some(Duration::from_secs(30)));
        assert_eq!(h.connect_timeout, Some(Duration::from_secs(10)));
        assert_eq!(h.statement_cache_size, 100);
        assert_eq!(h.source("statement_cache_size"), Source::Profile);
        assert_eq!(h.to_json()["profile"], "high-traffic");
    }

    #[test]
    fn url_beats_profile_beats_default() {
        let c = PoolConfig::parse_with(
            "postgresql://h/db?connection_limit=3",
            &Defaults {
                profile: Some(Profile::Production),
                application_name: "x".into(),
            },
        )
        .unwrap();
        assert_eq!(c.connection_limit, 3);
        assert_eq!(c.source("connection_limit"), Source::Url);
        assert_eq!(c.pool_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.source("pool_timeout"), Source::Profile);
        assert_eq!(c.socket_timeout, None);
        assert_eq!(c.source("socket_timeout"), Source::Default);
    }

    #[test]
    fn profile_names() {
        assert_eq!(
            "development".parse::<Profile>().unwrap(),
            Profile::Development
        );
        assert_eq!(
            "production".parse::<Profile>().unwrap(),
            Profile::Production
        );
        assert_eq!(
            "high-traffic".parse::<Profile>().unwrap(),
            Profile::HighTraffic
        );
        let e = "prod".parse::<Profile>().unwrap_err().to_string();
        assert!(
            e.contains("'prod'") && e.contains("development, production, high-traffic"),
            "{e}"
        );
    }

    #[test]
    fn json_has_every_documented_key() {
        let j = parse("postgresql://u:p@h/db").to_json();
        for k in PARAMETERS.iter().copied().chain([
            "host",
            "port",
            "database",
            "user",
            "profile",
            "ignored_parameters",
        ]) {
            assert!(j.get(k).is_some(), "missing {k}");
        }
        assert_eq!(j["pool_timeout"], 10);
        assert_eq!(j["socket_timeout"], Value::Null);
        assert_eq!(j["pgbouncer"], false);
    }
}
