//! The query parameters of a `DATABASE_URL`, one row each: how a value is
//! parsed into [`PoolConfig`] and how its effective value is shown. A new
//! parameter is a row here, its field in [`PoolConfig`] and the field's
//! default; parsing, [`PoolConfig::to_json`], [`PoolConfig::describe`] and
//! the list of sources all follow from the row.
//!
//! Written as a table of function pointers rather than a macro so each row
//! stays ordinary, greppable Rust.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde_json::{json, Value};

use super::{
    invalid, parse_range, parse_uint, zero_is_none, ConfigError, PoolConfig, SslAccept, SslMode,
    DEFAULT_KEEPALIVES_COUNT, KEEPALIVE_COUNT_MAX, KEEPALIVE_SECS_MAX, TCP_USER_TIMEOUT_MAX,
};

/// One parameter.
pub(super) struct Param {
    /// Its name in the URL's query string.
    pub name: &'static str,
    /// Parses `value` into the configuration; the error names the
    /// parameter and what is accepted.
    pub apply: fn(&mut PoolConfig, &str) -> Result<(), ConfigError>,
    /// Its effective value, as [`PoolConfig::to_json`] shows it.
    pub json: fn(&PoolConfig) -> Value,
    /// The unit a number is shown with in [`PoolConfig::describe`].
    pub unit: &'static str,
    /// What `null` means in [`PoolConfig::describe`].
    pub null: &'static str,
}

const OFF: &str = "off";
const UNLIMITED: &str = "unlimited";

fn secs(d: Option<Duration>) -> Value {
    json!(d.map(|d| d.as_secs()))
}

fn millis(d: Option<Duration>) -> Value {
    json!(d.map(|d| d.as_millis() as u64))
}

fn seconds_or_off(name: &str, value: &str) -> Result<Option<Duration>, ConfigError> {
    Ok(zero_is_none(parse_uint(name, value, 0, "seconds")?, false))
}

fn path(name: &str, value: &str) -> Result<Option<PathBuf>, ConfigError> {
    if value.is_empty() {
        Err(invalid(format!("{name} is empty; accepted: a file path")))
    } else {
        Ok(Some(PathBuf::from(value)))
    }
}

fn path_json(p: &Option<PathBuf>) -> Value {
    json!(p.as_ref().map(|p| p.display().to_string()))
}

/// A whole number from 0 to 100000 (`connection_limit` from 1).
fn bounded_count(name: &str, value: &str, min: u64, unit: &str) -> Result<usize, ConfigError> {
    let n = parse_uint(name, value, min, unit)?;
    usize::try_from(n)
        .ok()
        .filter(|n| *n <= 100_000)
        .ok_or_else(|| {
            invalid(format!(
                "{name}='{value}' is not valid; accepted: a whole number from {min} to 100000"
            ))
        })
}

/// One of `accepted`'s words.
fn choice<T: Copy>(
    name: &str,
    value: &str,
    options: &[(&str, T)],
    accepted: &str,
) -> Result<T, ConfigError> {
    options
        .iter()
        .find(|(word, _)| *word == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            invalid(format!(
                "{name}='{value}' is not valid; accepted: {accepted}"
            ))
        })
}

/// Every parameter, in the order `config` prints them.
pub(super) const PARAMS: [Param; 24] = [
    Param {
        name: "connection_limit",
        apply: |c, v| {
            c.connection_limit = bounded_count("connection_limit", v, 1, "connections")?;
            Ok(())
        },
        json: |c| json!(c.connection_limit),
        unit: "",
        null: OFF,
    },
    Param {
        name: "pool_timeout",
        apply: |c, v| {
            c.pool_timeout = seconds_or_off("pool_timeout", v)?;
            Ok(())
        },
        json: |c| secs(c.pool_timeout),
        unit: "s",
        null: UNLIMITED,
    },
    Param {
        name: "connect_timeout",
        apply: |c, v| {
            c.connect_timeout = seconds_or_off("connect_timeout", v)?;
            Ok(())
        },
        json: |c| secs(c.connect_timeout),
        unit: "s",
        null: UNLIMITED,
    },
    Param {
        name: "socket_timeout",
        apply: |c, v| {
            c.socket_timeout = seconds_or_off("socket_timeout", v)?;
            Ok(())
        },
        json: |c| secs(c.socket_timeout),
        unit: "s",
        null: UNLIMITED,
    },
    Param {
        name: "keepalives",
        // libpq takes an integer (0 off, 1 on); true/false as for pgbouncer.
        apply: |c, v| {
            c.keepalives = choice(
                "keepalives",
                v,
                &[("1", true), ("true", true), ("0", false), ("false", false)],
                "1, 0, true, false",
            )?;
            Ok(())
        },
        json: |c| json!(c.keepalives),
        unit: "",
        null: OFF,
    },
    Param {
        name: "keepalives_idle",
        apply: |c, v| {
            c.keepalives_idle = Duration::from_secs(parse_range(
                "keepalives_idle",
                v,
                1,
                KEEPALIVE_SECS_MAX,
                "seconds",
            )?);
            Ok(())
        },
        json: |c| json!(c.keepalives_idle.as_secs()),
        unit: "s",
        null: OFF,
    },
    Param {
        name: "keepalives_interval",
        apply: |c, v| {
            c.keepalives_interval = Duration::from_secs(parse_range(
                "keepalives_interval",
                v,
                1,
                KEEPALIVE_SECS_MAX,
                "seconds",
            )?);
            Ok(())
        },
        json: |c| json!(c.keepalives_interval.as_secs()),
        unit: "s",
        null: OFF,
    },
    Param {
        name: "keepalives_count",
        apply: |c, v| {
            let n = parse_range("keepalives_count", v, 1, KEEPALIVE_COUNT_MAX, "probes")?;
            c.keepalives_count = u32::try_from(n).unwrap_or(DEFAULT_KEEPALIVES_COUNT);
            Ok(())
        },
        json: |c| json!(c.keepalives_count),
        unit: "",
        null: OFF,
    },
    Param {
        name: "tcp_user_timeout",
        apply: |c, v| {
            let n = parse_range(
                "tcp_user_timeout",
                v,
                0,
                TCP_USER_TIMEOUT_MAX,
                "milliseconds",
            )?;
            c.tcp_user_timeout = zero_is_none(n, true);
            Ok(())
        },
        json: |c| millis(c.tcp_user_timeout),
        unit: "ms",
        null: "system default",
    },
    Param {
        name: "statement_cache_size",
        apply: |c, v| {
            c.statement_cache_size = bounded_count("statement_cache_size", v, 0, "statements")?;
            Ok(())
        },
        json: |c| json!(c.effective_statement_cache_size()),
        unit: "",
        null: OFF,
    },
    Param {
        name: "pgbouncer",
        apply: |c, v| {
            c.pgbouncer = choice(
                "pgbouncer",
                v,
                &[("true", true), ("false", false)],
                "true, false",
            )?;
            Ok(())
        },
        json: |c| json!(c.pgbouncer),
        unit: "",
        null: OFF,
    },
    Param {
        name: "max_connection_lifetime",
        apply: |c, v| {
            c.max_connection_lifetime = seconds_or_off("max_connection_lifetime", v)?;
            Ok(())
        },
        json: |c| secs(c.max_connection_lifetime),
        unit: "s",
        null: OFF,
    },
    Param {
        name: "max_idle_connection_lifetime",
        apply: |c, v| {
            c.max_idle_connection_lifetime = seconds_or_off("max_idle_connection_lifetime", v)?;
            Ok(())
        },
        json: |c| secs(c.max_idle_connection_lifetime),
        unit: "s",
        null: OFF,
    },
    Param {
        name: "application_name",
        apply: |c, v| {
            if v.is_empty() || v.len() > 63 {
                return Err(invalid(format!(
                    "application_name='{v}' is not valid; accepted: 1 to 63 characters"
                )));
            }
            c.application_name = v.to_string();
            Ok(())
        },
        json: |c| json!(c.application_name),
        unit: "",
        null: OFF,
    },
    Param {
        name: "schema",
        apply: |c, v| {
            if v.is_empty() {
                return Err(invalid(
                    "schema is empty; accepted: a schema name such as public",
                ));
            }
            c.schema = v.to_string();
            Ok(())
        },
        json: |c| json!(c.schema),
        unit: "",
        null: OFF,
    },
    Param {
        name: "options",
        apply: |c, v| {
            c.options = Some(v.to_string());
            Ok(())
        },
        json: |c| json!(c.options),
        unit: "",
        null: OFF,
    },
    Param {
        name: "sslmode",
        apply: |c, v| {
            c.sslmode = choice(
                "sslmode",
                v,
                &[
                    ("disable", SslMode::Disable),
                    ("prefer", SslMode::Prefer),
                    ("require", SslMode::Require),
                    ("verify-ca", SslMode::VerifyCa),
                    ("verify-full", SslMode::VerifyFull),
                ],
                "disable, prefer, require, verify-ca, verify-full",
            )?;
            Ok(())
        },
        json: |c| json!(c.sslmode.as_str()),
        unit: "",
        null: OFF,
    },
    Param {
        name: "sslrootcert",
        apply: |c, v| {
            c.sslrootcert = path("sslrootcert", v)?;
            Ok(())
        },
        json: |c| path_json(&c.sslrootcert),
        unit: "",
        null: OFF,
    },
    Param {
        name: "sslcert",
        apply: |c, v| {
            c.sslcert = path("sslcert", v)?;
            Ok(())
        },
        json: |c| path_json(&c.sslcert),
        unit: "",
        null: OFF,
    },
    Param {
        name: "sslidentity",
        apply: |c, v| {
            c.sslidentity = path("sslidentity", v)?;
            Ok(())
        },
        json: |c| path_json(&c.sslidentity),
        unit: "",
        null: OFF,
    },
    Param {
        name: "sslpassword",
        apply: |c, v| {
            c.sslpassword = Some(SecretString::from(v.to_string()));
            Ok(())
        },
        json: |c| json!(c.sslpassword.as_ref().map(|_| "****")),
        unit: "",
        null: OFF,
    },
    Param {
        name: "sslaccept",
        apply: |c, v| {
            c.sslaccept = Some(choice(
                "sslaccept",
                v,
                &[
                    ("strict", SslAccept::Strict),
                    ("accept_invalid_certs", SslAccept::AcceptInvalidCerts),
                ],
                "strict, accept_invalid_certs",
            )?);
            Ok(())
        },
        // Unset means strict: say so, as the README does.
        json: |c| json!(c.sslaccept.unwrap_or(SslAccept::Strict).as_str()),
        unit: "",
        null: OFF,
    },
    Param {
        name: "leak_detection_threshold",
        apply: |c, v| {
            c.leak_detection_threshold = seconds_or_off("leak_detection_threshold", v)?;
            Ok(())
        },
        json: |c| secs(c.leak_detection_threshold),
        unit: "s",
        null: OFF,
    },
    Param {
        name: "slow_query_threshold",
        apply: |c, v| {
            let n = parse_uint("slow_query_threshold", v, 0, "milliseconds")?;
            c.slow_query_threshold = zero_is_none(n, true);
            Ok(())
        },
        json: |c| millis(c.slow_query_threshold),
        unit: "ms",
        null: OFF,
    },
];

/// The parameters' names, in the table's order.
pub(super) const fn names<const N: usize>(params: &[Param; N]) -> [&'static str; N] {
    let mut names = [""; N];
    let mut i = 0;
    while i < N {
        names[i] = params[i].name;
        i += 1;
    }
    names
}

/// The table, for use at run time.
pub(super) static TABLE: [Param; PARAMS.len()] = PARAMS;

/// The row of `name`, if it is a parameter.
pub(super) fn find(name: &str) -> Option<&'static Param> {
    TABLE.iter().find(|p| p.name == name)
}
