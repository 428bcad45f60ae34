//! The provider registry: which OAuth providers exist, their endpoints and
//! how to talk to them, loaded from TOML (the shipped `providers.toml`, or
//! the file named by `INTEGRATIONS_PROVIDERS`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use super::token::Expiry;

/// The shipped registry, embedded in the binary.
pub const DEFAULT_PROVIDERS_TOML: &str = include_str!("../../providers.toml");

/// How the built-in registry is named in error messages.
pub const DEFAULT_SOURCE: &str = "built-in providers.toml";

/// Token lifetime assumed when a provider's entry sets neither
/// `expires_in_default` nor `never_expires`.
pub const FALLBACK_EXPIRES_IN: Duration = Duration::from_secs(3600);

/// Parameters the client sets itself on the authorize URL and token
/// requests; `*_params` tables may not override them.
const RESERVED_PARAMS: &[&str] = &[
    "response_type",
    "redirect_uri",
    "state",
    "scope",
    "code",
    "code_challenge",
    "code_challenge_method",
    "code_verifier",
    "grant_type",
    "refresh_token",
    "client_secret",
];

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// HTTP Basic with the (form-encoded) client id and secret.
    Basic,
    /// The client id (under `client_id_param`) and `client_secret` in the
    /// form body.
    Post,
}

/// Where a provider reveals the account id of the user who granted access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountIdFrom {
    /// A field of the token response (TikTok's `open_id`).
    Token,
    /// A field of the userinfo endpoint's JSON, fetched with the access token.
    Userinfo,
}

/// How to learn the account id: a JSON pointer into the token response or
/// the userinfo document.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountIdRule {
    /// Which document to look in.
    pub from: AccountIdFrom,
    /// RFC 6901 JSON pointer, e.g. "/sub" or "/data/id".
    pub pointer: String,
}

/// An error answer that means the grant is gone (the user must connect
/// again), besides the standard `invalid_grant`: some providers answer a
/// revoked refresh token otherwise (X: `invalid_request`, "Value passed for
/// the token was invalid.").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedWhen {
    /// The `error` code.
    pub error: String,
    /// Text the `error_description` must contain (case-insensitive), so a
    /// code that also means a configuration mistake is not read as a
    /// revocation; `None`: the code alone.
    pub description_contains: Option<String>,
}

impl RevokedWhen {
    /// Whether an error answer matches.
    pub fn matches(&self, error: &str, description: Option<&str>) -> bool {
        self.error == error
            && self.description_contains.as_ref().is_none_or(|needle| {
                description.is_some_and(|d| d.to_lowercase().contains(&needle.to_lowercase()))
            })
    }
}

/// Limits on the refreshes one instance sends to a provider's token
/// endpoint (`max_concurrent_refreshes`, `max_refreshes_per_second` in the
/// registry). Every refresh of the instance counts: the background
/// refresher, batches and single refreshes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RefreshLimits {
    /// Requests in flight at most; `None`: only the callers' own windows.
    pub max_concurrent: Option<u32>,
    /// Requests started per second at most, evenly spaced; `None`: no rate
    /// limit.
    pub per_second: Option<f64>,
}

/// The largest `max_concurrent_refreshes` accepted.
pub const MAX_CONCURRENT_REFRESHES: u32 = 10_000;
/// The largest `max_refreshes_per_second` accepted.
pub const MAX_REFRESHES_PER_SECOND: f64 = 100_000.0;

impl RefreshLimits {
    /// Checks the registry's values, naming the field and what is accepted.
    pub fn new(max_concurrent: Option<u32>, per_second: Option<f64>) -> Result<Self, String> {
        if let Some(n) = max_concurrent {
            if !(1..=MAX_CONCURRENT_REFRESHES).contains(&n) {
                return Err(format!(
                    "field 'max_concurrent_refreshes': {n} is out of range; accepted: a whole number from 1 to {MAX_CONCURRENT_REFRESHES}"
                ));
            }
        }
        if let Some(r) = per_second {
            // The smallest rate is one refresh an hour: a pause longer than
            // that is a disabled provider, which the credentials express.
            if !(r.is_finite() && (1.0 / 3600.0..=MAX_REFRESHES_PER_SECOND).contains(&r)) {
                return Err(format!(
                    "field 'max_refreshes_per_second': {r} is out of range; accepted: a number from 0.000278 (one an hour) to {MAX_REFRESHES_PER_SECOND}"
                ));
            }
        }
        Ok(RefreshLimits {
            max_concurrent,
            per_second,
        })
    }
}

/// One OAuth provider. `Debug` shows which credentials are configured, never
/// the secret.
#[derive(Clone)]
pub struct Provider {
    /// The provider's name: its table key, used in URLs and the database.
    pub name: String,
    /// Where the user is sent to grant access.
    pub authorize_url: Url,
    /// The token endpoint (code exchange and refresh).
    pub token_url: Url,
    /// The RFC 7009 revocation endpoint, if the provider has one.
    pub revoke_url: Option<Url>,
    /// The endpoint returning the user's identity, if any.
    pub userinfo_url: Option<Url>,
    /// The parameter name of the client id ("client_id"; TikTok "client_key").
    pub client_id_param: String,
    /// How the client authenticates at the token endpoint.
    pub client_auth: ClientAuth,
    /// Scopes requested when the caller names none.
    pub scopes: Vec<String>,
    /// What joins scopes in the `scope` parameter (" "; TikTok ",").
    pub scope_separator: String,
    /// Whether to send a PKCE S256 code challenge.
    pub pkce: bool,
    /// Extra parameters of the authorize URL.
    pub authorize_params: BTreeMap<String, String>,
    /// Extra parameters of the authorization-code grant.
    pub token_params: BTreeMap<String, String>,
    /// Extra parameters of the refresh-token grant.
    pub refresh_params: BTreeMap<String, String>,
    /// What to assume when a token response omits `expires_in`.
    pub expiry: Expiry,
    /// How to learn the account id, if configured.
    pub account_id: Option<AccountIdRule>,
    /// Error answers that mean the grant is gone, besides `invalid_grant`.
    pub revoked_when: Vec<RevokedWhen>,
    /// Limits on this instance's refreshes against the token endpoint.
    pub limits: RefreshLimits,
    client_id: Option<String>,
    client_id_env: Option<String>,
    client_secret: Option<SecretString>,
    client_secret_env: String,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("authorize_url", &self.authorize_url.as_str())
            .field("token_url", &self.token_url.as_str())
            .field("revoke_url", &self.revoke_url.as_ref().map(Url::as_str))
            .field("userinfo_url", &self.userinfo_url.as_ref().map(Url::as_str))
            .field("client_id", &self.client_id)
            .field("client_id_env", &self.client_id_env)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[REDACTED]"),
            )
            .field("client_secret_env", &self.client_secret_env)
            .field("client_id_param", &self.client_id_param)
            .field("client_auth", &self.client_auth)
            .field("scopes", &self.scopes)
            .field("scope_separator", &self.scope_separator)
            .field("pkce", &self.pkce)
            .field("authorize_params", &self.authorize_params)
            .field("token_params", &self.token_params)
            .field("refresh_params", &self.refresh_params)
            .field("expiry", &self.expiry)
            .field("account_id", &self.account_id)
            .field("revoked_when", &self.revoked_when)
            .field("limits", &self.limits)
            .finish()
    }
}

/// A provider's credential is not configured: names the variable to set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("provider '{provider}': {what} is not configured; set the environment variable {var}")]
pub struct MissingCredential {
    /// The provider's name.
    pub provider: String,
    /// "client id" or "client secret".
    pub what: &'static str,
    /// The environment variable to set.
    pub var: String,
}

impl Provider {
    /// The client id, from the file or its environment variable.
    pub fn client_id(&self) -> Result<&str, MissingCredential> {
        self.client_id.as_deref().ok_or_else(|| MissingCredential {
            provider: self.name.clone(),
            what: "client id",
            var: self.client_id_env.clone().unwrap_or_default(),
        })
    }

    /// The client secret, from the environment variable `client_secret_env`.
    pub fn client_secret(&self) -> Result<&SecretString, MissingCredential> {
        self.client_secret
            .as_ref()
            .ok_or_else(|| MissingCredential {
                provider: self.name.clone(),
                what: "client secret",
                var: self.client_secret_env.clone(),
            })
    }

    /// The environment variable holding the client secret.
    pub fn client_secret_env(&self) -> &str {
        &self.client_secret_env
    }

    /// Both the client id and the secret are available, or the first one
    /// missing, naming the variable to set.
    pub fn credentials(&self) -> Result<(), MissingCredential> {
        self.client_id()?;
        self.client_secret()?;
        Ok(())
    }

    /// The environment variables still to set for this provider (empty
    /// when it is configured).
    pub fn missing_variables(&self) -> Vec<String> {
        let id = self.client_id().err().map(|m| m.var);
        let secret = self.client_secret().err().map(|m| m.var);
        id.into_iter().chain(secret).collect()
    }

    /// Whether both the client id and the secret are available.
    pub fn is_configured(&self) -> bool {
        self.credentials().is_ok()
    }
}

/// A provider name not in the registry; the message lists the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown provider '{name}'; known: {}", known.join(", "))]
pub struct UnknownProvider {
    /// The name asked for.
    pub name: String,
    /// The registry's providers, sorted.
    pub known: Vec<String>,
}

/// Why the registry could not be loaded. Messages name the file, and the
/// provider and field where there is one.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The file could not be read.
    #[error("cannot read provider registry {file}: {source}")]
    Read {
        /// The file's path.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or not one table per provider.
    #[error("provider registry {file}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// What is wrong, with the line where TOML says.
        message: String,
    },
    /// One provider's entry is invalid.
    #[error("provider registry {file}: provider '{provider}': {message}")]
    Provider {
        /// The file.
        file: String,
        /// The provider's table key.
        provider: String,
        /// What is wrong, naming the field.
        message: String,
    },
}

/// All providers, by name.
#[derive(Debug, Clone)]
pub struct ProviderRegistry {
    providers: BTreeMap<String, Provider>,
    source: String,
}

impl ProviderRegistry {
    /// Loads the registry from `path` when given (the service passes
    /// `INTEGRATIONS_PROVIDERS`), else the built-in `providers.toml`.
    /// `env` looks up the variables named by `client_id_env` and
    /// `client_secret_env`; unset or empty variables leave the provider
    /// listed but unconfigured.
    pub fn load(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, RegistryError> {
        match path {
            Some(path) => {
                let file = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
                    file: file.clone(),
                    source,
                })?;
                Self::from_toml(&text, &file, env)
            }
            None => Self::from_toml(DEFAULT_PROVIDERS_TOML, DEFAULT_SOURCE, env),
        }
    }

    /// Parses a registry from TOML text; `source` names it in errors.
    pub fn from_toml(
        text: &str,
        source: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, RegistryError> {
        let syntax = |message: String| RegistryError::Syntax {
            file: source.to_string(),
            message,
        };
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| syntax(e.to_string().trim_end().to_string()))?;
        if table.is_empty() {
            return Err(syntax("no providers defined".into()));
        }
        let mut providers = BTreeMap::new();
        for (name, value) in table {
            let fail = |message: String| RegistryError::Provider {
                file: source.to_string(),
                provider: name.clone(),
                message,
            };
            if !value.is_table() {
                return Err(syntax(format!(
                    "'{name}' is not a table; each provider is a [name] table"
                )));
            }
            if !valid_name(&name) {
                return Err(fail(
                    "the name must be lowercase letters, digits, '_' or '-'".into(),
                ));
            }
            let entry: Entry = serde_path_to_error::deserialize(value).map_err(|e| {
                let message = e.inner().message().trim_end().to_string();
                fail(match e.path().to_string().as_str() {
                    // Unknown fields: serde's message already names them.
                    "." => message,
                    path => format!("field '{path}': {message}"),
                })
            })?;
            let provider = entry.into_provider(&name, env).map_err(fail)?;
            providers.insert(name, provider);
        }
        Ok(ProviderRegistry {
            providers,
            source: source.to_string(),
        })
    }

    /// The provider called `name`.
    pub fn get(&self, name: &str) -> Result<&Provider, UnknownProvider> {
        self.providers.get(name).ok_or_else(|| UnknownProvider {
            name: name.to_string(),
            known: self.providers.keys().cloned().collect(),
        })
    }

    /// The providers' names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.providers.keys().map(String::as_str).collect()
    }

    /// The names of the providers whose client id and secret are both
    /// set, sorted.
    pub fn configured_names(&self) -> Vec<&str> {
        self.iter()
            .filter(|p| p.is_configured())
            .map(|p| p.name.as_str())
            .collect()
    }

    /// The providers, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Provider> {
        self.providers.values()
    }

    /// Where the registry came from: a path or [`DEFAULT_SOURCE`].
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// One provider's table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    authorize_url: String,
    token_url: String,
    revoke_url: Option<String>,
    userinfo_url: Option<String>,
    client_id: Option<String>,
    client_id_env: Option<String>,
    client_secret_env: String,
    #[serde(default = "default_client_id_param")]
    client_id_param: String,
    client_auth: ClientAuth,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default = "default_scope_separator")]
    scope_separator: String,
    #[serde(default = "default_true")]
    pkce: bool,
    #[serde(default)]
    authorize_params: BTreeMap<String, String>,
    #[serde(default)]
    token_params: BTreeMap<String, String>,
    #[serde(default)]
    refresh_params: BTreeMap<String, String>,
    expires_in_default: Option<u64>,
    #[serde(default)]
    never_expires: bool,
    account_id: Option<AccountIdRule>,
    #[serde(default)]
    revoked_when: Vec<RevokedWhen>,
    max_concurrent_refreshes: Option<u32>,
    max_refreshes_per_second: Option<f64>,
}

fn default_client_id_param() -> String {
    "client_id".into()
}

fn default_scope_separator() -> String {
    " ".into()
}

fn default_true() -> bool {
    true
}

impl Entry {
    fn into_provider(
        self,
        name: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Provider, String> {
        let authorize_url = endpoint("authorize_url", &self.authorize_url)?;
        let token_url = endpoint("token_url", &self.token_url)?;
        let revoke_url = self
            .revoke_url
            .as_deref()
            .map(|u| endpoint("revoke_url", u))
            .transpose()?;
        let userinfo_url = self
            .userinfo_url
            .as_deref()
            .map(|u| endpoint("userinfo_url", u))
            .transpose()?;

        let lookup = |field: &str, var: &str| -> Result<Option<String>, String> {
            if var.trim().is_empty() {
                return Err(format!("field '{field}': empty variable name"));
            }
            Ok(env(var).filter(|v| !v.trim().is_empty()))
        };
        let client_id = match (self.client_id, &self.client_id_env) {
            (Some(_), Some(_)) => {
                return Err("set either 'client_id' or 'client_id_env', not both".into())
            }
            (None, None) => return Err("missing field 'client_id' (or 'client_id_env')".into()),
            (Some(id), None) if id.trim().is_empty() => {
                return Err("field 'client_id': empty".into())
            }
            (Some(id), None) => Some(id),
            (None, Some(var)) => lookup("client_id_env", var)?,
        };
        let client_secret =
            lookup("client_secret_env", &self.client_secret_env)?.map(SecretString::from);

        for (field, value) in [
            ("client_id_param", &self.client_id_param),
            ("scope_separator", &self.scope_separator),
        ] {
            if value.is_empty() {
                return Err(format!("field '{field}': empty"));
            }
        }
        if self
            .scopes
            .iter()
            .any(|s| s.trim().is_empty() || s.contains(self.scope_separator.as_str()))
        {
            return Err(format!(
                "field 'scopes': each scope must be non-empty and not contain the separator {:?}",
                self.scope_separator
            ));
        }
        for (field, params) in [
            ("authorize_params", &self.authorize_params),
            ("token_params", &self.token_params),
            ("refresh_params", &self.refresh_params),
        ] {
            if let Some(k) = params
                .keys()
                .find(|k| RESERVED_PARAMS.contains(&k.as_str()) || **k == self.client_id_param)
            {
                return Err(format!(
                    "field '{field}': '{k}' is set by the client and cannot be overridden"
                ));
            }
        }

        if let Some(rule) = self.revoked_when.iter().find(|r| {
            r.error.trim().is_empty()
                || r.description_contains
                    .as_deref()
                    .is_some_and(|d| d.trim().is_empty())
        }) {
            return Err(format!(
                "field 'revoked_when': {rule:?}: 'error' and 'description_contains' must not be empty"
            ));
        }
        let expiry = match (self.expires_in_default, self.never_expires) {
            (Some(_), true) => {
                return Err("set either 'expires_in_default' or 'never_expires', not both".into())
            }
            (Some(0), false) => {
                return Err("field 'expires_in_default': must be at least 1 second".into())
            }
            (Some(secs), false) => Expiry::Default(Duration::from_secs(secs)),
            (None, true) => Expiry::Never,
            (None, false) => Expiry::Default(FALLBACK_EXPIRES_IN),
        };

        if let Some(rule) = &self.account_id {
            if !rule.pointer.starts_with('/') {
                return Err(format!(
                    "field 'account_id.pointer': {:?} is not a JSON pointer (it starts with '/', e.g. \"/sub\")",
                    rule.pointer
                ));
            }
            if rule.from == AccountIdFrom::Userinfo && userinfo_url.is_none() {
                return Err("field 'account_id': from = \"userinfo\" needs 'userinfo_url'".into());
            }
        }

        let limits =
            RefreshLimits::new(self.max_concurrent_refreshes, self.max_refreshes_per_second)?;

        Ok(Provider {
            name: name.to_string(),
            authorize_url,
            token_url,
            revoke_url,
            userinfo_url,
            client_id_param: self.client_id_param,
            client_auth: self.client_auth,
            scopes: self.scopes,
            scope_separator: self.scope_separator,
            pkce: self.pkce,
            authorize_params: self.authorize_params,
            token_params: self.token_params,
            refresh_params: self.refresh_params,
            expiry,
            account_id: self.account_id,
            revoked_when: self.revoked_when,
            limits,
            client_id,
            client_id_env: self.client_id_env,
            client_secret,
            client_secret_env: self.client_secret_env,
        })
    }
}

fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// An absolute https URL; http only for a loopback host (127.0.0.0/8,
/// ::1, localhost), where a local provider (tests, development) runs and
/// nothing crosses a network.
fn endpoint(field: &str, value: &str) -> Result<Url, String> {
    let url = Url::parse(value).map_err(|e| format!("field '{field}': not a valid URL ({e})"))?;
    let Some(host) = url.host() else {
        return Err(format!("field '{field}': must be an https:// URL"));
    };
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&host) => {}
        "http" => {
            return Err(format!(
                "field '{field}': http:// is accepted only for loopback hosts (127.0.0.0/8, [::1], localhost), not '{host}'; use https://"
            ))
        }
        _ => return Err(format!("field '{field}': must be an https:// URL")),
    }
    if url.fragment().is_some() {
        return Err(format!("field '{field}': must not have a #fragment"));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn env(var: &str) -> Option<String> {
        Some(format!("value-of-{var}"))
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const MINIMAL: &str = r#"
[demo]
authorize_url = "https://example.com/auth"
token_url = "http://127.0.0.1:9/token"
client_id = "cid"
client_secret_env = "DEMO_SECRET"
client_auth = "basic"
"#;

    #[test]
    fn defaults_apply_to_a_minimal_entry() {
        let r = ProviderRegistry::from_toml(MINIMAL, "test.toml", &env).unwrap();
        let p = r.get("demo").unwrap();
        assert_eq!(p.client_id().unwrap(), "cid");
        assert_eq!(
            p.client_secret().unwrap().expose_secret(),
            "value-of-DEMO_SECRET"
        );
        assert_eq!(p.client_id_param, "client_id");
        assert_eq!(p.scope_separator, " ");
        assert!(p.pkce);
        assert_eq!(p.expiry, Expiry::Default(FALLBACK_EXPIRES_IN));
        assert_eq!(p.token_url.as_str(), "http://127.0.0.1:9/token");
        assert!(p.account_id.is_none());
    }

    #[test]
    fn shipped_registry_loads_without_environment() {
        let r = ProviderRegistry::load(None, &no_env).unwrap();
        assert_eq!(r.names(), ["github", "google", "reddit", "tiktok", "x"]);
        assert_eq!(r.source(), DEFAULT_SOURCE);
        let e = r.get("google").unwrap().client_secret().unwrap_err();
        assert_eq!(
            e.to_string(),
            "provider 'google': client secret is not configured; set the environment variable GOOGLE_CLIENT_SECRET"
        );
        let e = r.get("tiktok").unwrap().client_id().unwrap_err();
        assert!(e.to_string().contains("TIKTOK_CLIENT_KEY"), "{e}");
        assert!(!r.get("x").unwrap().is_configured());
    }

    fn error_for(entry_extra: &str) -> String {
        let text = format!("{MINIMAL}{entry_extra}\n");
        ProviderRegistry::from_toml(&text, "my.toml", &env)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_file_provider_and_field() {
        let cases = [
            (
                "authorise_url = \"https://x\"",
                "unknown field `authorise_url`",
            ),
            ("client_auth2 = \"post\"", "unknown field `client_auth2`"),
            ("pkce = \"yes\"", "field 'pkce': invalid type"),
            (
                "account_id = { from = \"body\", pointer = \"/a\" }",
                "field 'account_id.from'",
            ),
            ("authorize_params = { n = 1 }", "field 'authorize_params.n'"),
            ("revoke_url = \"ftp://example.com/r\"", "field 'revoke_url'"),
            ("userinfo_url = \"not a url\"", "field 'userinfo_url'"),
            ("client_id_env = \"CID\"", "not both"),
            ("never_expires = true\nexpires_in_default = 5", "not both"),
            ("expires_in_default = 0", "expires_in_default"),
            (
                "account_id = { from = \"userinfo\", pointer = \"/sub\" }",
                "needs 'userinfo_url'",
            ),
            (
                "account_id = { from = \"token\", pointer = \"sub\" }",
                "account_id.pointer",
            ),
            (
                "account_id = { from = \"token\", pointer = \"/a\", extra = 1 }",
                "unknown field `extra`",
            ),
            (
                "authorize_params = { state = \"x\" }",
                "field 'authorize_params': 'state'",
            ),
            (
                "refresh_params = { client_id = \"x\" }",
                "field 'refresh_params': 'client_id'",
            ),
            ("scopes = [\"a b\"]", "field 'scopes'"),
        ];
        for (extra, want) in cases {
            let e = error_for(extra);
            assert!(
                e.starts_with("provider registry my.toml: provider 'demo': "),
                "{e}"
            );
            assert!(e.contains(want), "{extra}: {e}");
        }
        let e = error_for("[Bad]\nclient_auth = \"post\"");
        assert!(
            e.contains("provider 'Bad'") && e.contains("lowercase"),
            "{e}"
        );
        let e = ProviderRegistry::from_toml(&MINIMAL.replace("basic", "bearer"), "my.toml", &env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("provider 'demo'") && e.contains("`basic`"),
            "{e}"
        );
    }

    #[test]
    fn http_is_refused_except_for_loopback_hosts() {
        for (field, url) in [
            ("token_url", "http://oauth.example.com/token"),
            ("authorize_url", "http://10.0.0.8/auth"),
            ("revoke_url", "http://127.0.0.1.nip.io/revoke"),
            ("userinfo_url", "http://[::ffff:127.0.0.1]/me"),
            ("token_url", "http://localhost.example.com/token"),
        ] {
            let text = MINIMAL
                .replace("authorize_url = \"https://example.com/auth\"\n", "")
                .replace("token_url = \"http://127.0.0.1:9/token\"\n", "");
            let mut fields = BTreeMap::from([
                ("authorize_url", "https://example.com/auth"),
                ("token_url", "https://example.com/token"),
            ]);
            fields.insert(field, url);
            let extra: String = fields
                .iter()
                .map(|(k, v)| format!("{k} = \"{v}\"\n"))
                .collect();
            let e = ProviderRegistry::from_toml(&format!("{text}{extra}"), "my.toml", &env)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("provider 'demo': field '{field}': http:// is accepted only for loopback hosts (127.0.0.0/8, [::1], localhost)"))
                    && e.contains("use https://"),
                "{url}: {e}"
            );
        }
        for url in [
            "http://127.0.0.1:9/token",
            "http://127.8.9.10/token",
            "http://[::1]:8080/token",
            "http://localhost:3000/token",
            "http://LOCALHOST/token",
            "https://oauth.example.com/token",
        ] {
            let text = MINIMAL.replace("http://127.0.0.1:9/token", url);
            let r = ProviderRegistry::from_toml(&text, "t", &env).unwrap();
            assert_eq!(
                r.get("demo").unwrap().token_url.scheme(),
                &url[..url.find(':').unwrap()].to_lowercase()
            );
        }
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let e = ProviderRegistry::from_toml("[demo\n", "bad.toml", &env)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("provider registry bad.toml: "), "{e}");
        let e = ProviderRegistry::from_toml("name = 1\n", "bad.toml", &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'name' is not a table"), "{e}");
        let e = ProviderRegistry::from_toml("", "bad.toml", &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no providers"), "{e}");
        let e = ProviderRegistry::load(Some(Path::new("/nonexistent/p.toml")), &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/p.toml"), "{e}");
    }

    #[test]
    fn unknown_provider_lists_known_names() {
        let r = ProviderRegistry::load(None, &no_env).unwrap();
        assert_eq!(
            r.get("foo").unwrap_err().to_string(),
            "unknown provider 'foo'; known: github, google, reddit, tiktok, x"
        );
    }

    #[test]
    fn debug_redacts_the_client_secret() {
        let r = ProviderRegistry::from_toml(MINIMAL, "t", &env).unwrap();
        let d = format!("{:?}", r.get("demo").unwrap());
        assert!(!d.contains("value-of-DEMO_SECRET"), "{d}");
        assert!(d.contains("[REDACTED]") && d.contains("DEMO_SECRET"), "{d}");
        let d = format!("{r:?}");
        assert!(!d.contains("value-of-DEMO_SECRET"), "{d}");
    }

    #[test]
    fn empty_environment_values_count_as_unset() {
        let r =
            ProviderRegistry::from_toml(MINIMAL, "t", &|_: &str| Some("  ".to_string())).unwrap();
        assert!(r.get("demo").unwrap().client_secret().is_err());
    }

    #[test]
    fn refresh_limits_are_read_and_checked() {
        let r = ProviderRegistry::from_toml(
            &format!("{MINIMAL}max_concurrent_refreshes = 8\nmax_refreshes_per_second = 2.5\n"),
            "t",
            &env,
        )
        .unwrap();
        assert_eq!(
            r.get("demo").unwrap().limits,
            RefreshLimits {
                max_concurrent: Some(8),
                per_second: Some(2.5)
            }
        );
        let unlimited = ProviderRegistry::from_toml(MINIMAL, "t", &env).unwrap();
        assert_eq!(
            unlimited.get("demo").unwrap().limits,
            RefreshLimits::default()
        );
        for (line, field, accepted) in [
            (
                "max_concurrent_refreshes = 0",
                "max_concurrent_refreshes",
                "from 1 to 10000",
            ),
            (
                "max_concurrent_refreshes = 20000",
                "max_concurrent_refreshes",
                "from 1 to 10000",
            ),
            (
                "max_refreshes_per_second = 0",
                "max_refreshes_per_second",
                "one an hour",
            ),
            (
                "max_refreshes_per_second = -3.0",
                "max_refreshes_per_second",
                "one an hour",
            ),
            (
                "max_refreshes_per_second = nan",
                "max_refreshes_per_second",
                "one an hour",
            ),
            (
                "max_refreshes_per_second = 1e9",
                "max_refreshes_per_second",
                "100000",
            ),
            (
                "max_concurrent_refreshes = \"many\"",
                "max_concurrent_refreshes",
                "",
            ),
        ] {
            let e = ProviderRegistry::from_toml(&format!("{MINIMAL}{line}\n"), "t", &env)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("provider 'demo'") && e.contains(field) && e.contains(accepted),
                "{line}: {e}"
            );
        }
    }
}
