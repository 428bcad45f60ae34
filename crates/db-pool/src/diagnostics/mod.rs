//! Diagnostics: what a database's connections are doing ([`activity`]) and
//! whether a configuration is safe for the server it points at ([`doctor`]).
//!
//! Both implement the seed's "Monitoring Connection Pool" and
//! "Troubleshooting" sections: [`activity`] is its "Check Active
//! Connections" query, generalised (per application, transactions left
//! open, lock waits); [`doctor`] checks each cause its troubleshooting table
//! names (too many connections, pool exhaustion, a pooler in front) before it
//! happens.
//!
//! Diagnostics connect with [`diagnostic_config`]: the same server,
//! credentials, TLS and startup options as the pool, but their own tiny pool
//! whose statements always travel unnamed (as with `pgbouncer=true`), so they
//! work whatever sits in front of the server.

mod activity;
mod doctor;

use std::time::Duration;

use crate::config::PoolConfig;

pub use activity::{
    activity, Activity, ApplicationActivity, Counts, LockWait, Session, QUERY_TEXT_LIMIT,
};
pub use doctor::{doctor, Check, DoctorOptions, DoctorReport, Status};

/// How long a diagnostic waits to open a connection when the configuration
/// sets no `connect_timeout` (a diagnostic must end).
const UNLIMITED_CONNECT_CAP: Duration = Duration::from_secs(30);

/// The configuration diagnostics connect with: `cfg`'s server, credentials,
/// TLS and startup options (application_name, schema, options), with
///
/// * `connection_limit` 1,
/// * no pool wait (`pool_timeout` unlimited), so a connect failure is
///   reported as itself rather than as a pool timeout,
/// * `connect_timeout` kept, or 30 s when the configuration sets none,
/// * no `socket_timeout` (diagnostics bound their own waits),
/// * unnamed statements (`pgbouncer=true`): safe through a transaction pooler
///   whether or not `cfg` says one is there.
pub fn diagnostic_config(cfg: &PoolConfig) -> PoolConfig {
    let mut probe = cfg.clone();
    probe.connection_limit = 1;
    probe.pool_timeout = None;
    probe.connect_timeout = Some(cfg.connect_timeout.unwrap_or(UNLIMITED_CONNECT_CAP));
    probe.socket_timeout = None;
    probe.pgbouncer = true;
    probe.leak_detection_threshold = None;
    probe.slow_query_threshold = None;
    probe
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> PoolConfig {
        PoolConfig::parse(url).unwrap()
    }

    #[test]
    fn diagnostic_config_keeps_the_server_and_drops_the_pool_behaviour() {
        let c = cfg("postgresql://u:pw@h:6543/db?connection_limit=40&pool_timeout=3&connect_timeout=0&socket_timeout=2&application_name=svc");
        let d = diagnostic_config(&c);
        assert_eq!((d.address(), d.user.as_str()), (c.address(), "u"));
        assert_eq!(d.password(), Some("pw"));
        assert_eq!(d.application_name, "svc");
        assert_eq!(d.connection_limit, 1);
        assert_eq!(d.pool_timeout, None);
        assert_eq!(d.connect_timeout, Some(UNLIMITED_CONNECT_CAP));
        assert_eq!(d.socket_timeout, None);
        assert!(d.pgbouncer);
    }
}
