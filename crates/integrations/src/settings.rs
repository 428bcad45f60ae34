//! The service's typed settings, assembled once from the environment (and
//! `.env`), then handed down; nothing below re-reads the environment.

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
    let profile = match profile.map(str::trim).filter(|p| !p.is_empty()) {
        Some(p) => Some(p.parse::<Profile>()?),
        None => None,
    };
    let url = url.ok_or(ConfigError::Missing)?;
    PoolConfig::parse_with(
        url,
        &Defaults {
            profile,
            application_name: APPLICATION_NAME.to_string(),
        },
    )
}
