//! The change feed between instances: every committed write that changes
//! what an instance may have cached sends a notification on
//! [`CHANNEL`] in the same transaction (database triggers, migration V5),
//! and every `serve` instance listens on one connection of its own, outside
//! its pool, dropping what the notifications name from its caches.
//!
//! While the listener is not connected (start-up, a server restart, its
//! backend terminated, the network lost), notifications are lost, so the
//! caches are not used: every read goes to the database until the listener
//! is back; then every entry is forgotten and the caches serve again. The
//! 5-minute TTL stays the upper bound, not the consistency mechanism.

use std::sync::Arc;
use std::time::Duration;

use db_pool::{ListenEvent, Listener, PoolConfig};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::service::api_keys::ApiKeys;
use crate::service::IntegrationsService;
// The webhook fan-out's channel (migrations V7, V8): deliveries were
// queued, for the endpoints the payload names.
use crate::store::webhooks::CHANNEL as WEBHOOKS_CHANNEL;

/// The notification channel the triggers send on.
pub const CHANNEL: &str = "integrations_changes";

/// Every channel the feed listens on.
const CHANNELS: [&str; 2] = [CHANNEL, WEBHOOKS_CHANNEL];

/// The custom setting that names the writing instance in payloads (set on
/// the pool's connections when the server is reached directly).
pub const INSTANCE_SETTING: &str = "integrations.instance";

/// First wait before connecting again after a failure (doubles).
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between connection attempts.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A notification's payload, as the triggers write it.
#[derive(Debug, Deserialize)]
struct Payload {
    kind: String,
    /// `integration`: whose status changed (absent: every user's).
    #[serde(default)]
    user_id: Option<String>,
    /// The writer's instance name, when it set one.
    #[serde(default)]
    instance: Option<String>,
    /// The writing transaction's start, microseconds since the epoch.
    #[serde(default)]
    at: Option<i64>,
}

/// What a notification asks of this instance.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    /// Forget one user's status.
    User(String),
    /// Forget every user's status.
    AllUsers,
    /// Forget every API key verification.
    ApiKeys,
    /// Written by this instance, which has forgotten it already.
    Own,
}

/// Metric label of a notification's kind (bounded: anything else counts
/// as `unknown`).
fn kind_label(kind: &str) -> &'static str {
    match kind {
        "integration" => "integration",
        "api_key" => "api_key",
        _ => "unknown",
    }
}

/// Reads a payload: what to forget, its kind's label and its commit time.
fn parse(payload: &str, instance: &str) -> (Change, &'static str, Option<i64>) {
    let Ok(p) = serde_json::from_str::<Payload>(payload) else {
        // Not ours, or from a newer version: forgetting everything is
        // always safe.
        return (Change::AllUsers, "unknown", None);
    };
    let label = kind_label(&p.kind);
    let change = if p.instance.as_deref() == Some(instance) {
        Change::Own
    } else {
        match (label, p.user_id) {
            ("integration", Some(user)) => Change::User(user),
            ("api_key", _) => Change::ApiKeys,
            _ => Change::AllUsers,
        }
    };
    (change, label, p.at)
}

/// One instance's listener: keeps the caches of `service` and `keys`
/// consistent with the other instances' writes.
pub struct ChangeFeed {
    config: PoolConfig,
    service: Arc<IntegrationsService>,
    keys: Arc<ApiKeys>,
    /// A listener connected by [`ChangeFeed::start`] before the loop runs.
    first: Option<Listener>,
}

impl std::fmt::Debug for ChangeFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFeed")
            .field("url", &self.config.redacted_url())
            .finish_non_exhaustive()
    }
}

impl ChangeFeed {
    /// A feed listening through `config` (the server itself: `DIRECT_URL`
    /// behind PgBouncer). The caches stop serving until it first connects.
    pub fn new(
        config: PoolConfig,
        service: Arc<IntegrationsService>,
        keys: Arc<ApiKeys>,
    ) -> ChangeFeed {
        let feed = ChangeFeed {
            config,
            service,
            keys,
            first: None,
        };
        feed.caches_live(false);
        feed
    }

    /// Forgets every cached status and API key answer.
    fn forget_everything(&self) {
        self.service.forget_all_statuses();
        self.keys.forget_all();
    }

    fn caches_live(&self, live: bool) {
        if live {
            // Whatever changed while nobody listened is unknown.
            self.forget_everything();
        }
        self.service.set_status_cache_live(live);
        self.keys.set_cache_live(live);
        metrics::gauge!("integrations_change_listener_connected").set(if live { 1.0 } else { 0.0 });
    }

    /// Makes the first connection attempt (so a server that starts
    /// serving has its caches on when the database is there), then listens
    /// in a task of its own, tracked by `tasks`, until `stop`.
    pub async fn start(
        mut self,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        self.first = Listener::connect(&self.config, &CHANNELS).await.ok();
        tasks.spawn(self.run(stop))
    }

    /// Listens until `stop`, reconnecting with backoff.
    async fn run(mut self, stop: CancellationToken) {
        let instance = instance_name(&self.service.config().instance_id);
        let mut retry = RETRY_MIN;
        // Logged once per outage, not per attempt.
        let mut lost_logged = false;
        let mut ever_connected = false;
        loop {
            let connected = match self.first.take() {
                Some(first) => Ok(first),
                None => tokio::select! {
                    () = stop.cancelled() => return,
                    c = Listener::connect(&self.config, &CHANNELS) => c,
                },
            };
            let mut listener = match connected {
                Ok(l) => l,
                Err(e) => {
                    if !lost_logged {
                        tracing::warn!(code = e.code(), error = %e, "change listener cannot connect; caches are bypassed until it does (retrying)");
                        lost_logged = true;
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                    continue;
                }
            };
            retry = RETRY_MIN;
            self.caches_live(true);
            // Deliveries queued while nobody listened are due too.
            self.service.wake_dispatcher();
            if ever_connected || lost_logged {
                tracing::info!("change listener connected again; caches serve again");
            } else {
                tracing::info!(channel = CHANNEL, "change listener connected");
            }
            ever_connected = true;
            let closed = loop {
                let event = tokio::select! {
                    () = stop.cancelled() => return,
                    e = listener.next() => e,
                };
                match event {
                    ListenEvent::Notification(n) if n.channel() == WEBHOOKS_CHANNEL => {
                        self.service.webhooks_queued(n.payload());
                    }
                    ListenEvent::Notification(n) => self.apply(n.payload(), &instance),
                    ListenEvent::Lagged => {
                        self.service.wake_dispatcher();
                        tracing::warn!(
                            "change listener fell behind; forgetting every cached entry"
                        );
                        self.forget_everything();
                    }
                    ListenEvent::Closed(e) => break e,
                }
            };
            self.caches_live(false);
            tracing::warn!(code = closed.code(), error = %closed, "change listener lost; caches are bypassed until it is back");
            lost_logged = true;
        }
    }

    fn apply(&self, payload: &str, instance: &str) {
        let (change, label, at) = parse(payload, instance);
        match change {
            // Forgotten already, when it was written.
            Change::Own => return,
            Change::User(user) => self.service.forget_status(&user),
            Change::AllUsers => self.service.forget_all_statuses(),
            Change::ApiKeys => self.keys.forget_all(),
        }
        metrics::counter!("integrations_invalidations_received_total", "kind" => label)
            .increment(1);
        if let Some(at) = at {
            let now = chrono::Utc::now().timestamp_micros();
            let lag = Duration::from_micros(u64::try_from(now - at).unwrap_or(0));
            metrics::histogram!("integrations_invalidation_lag_seconds").record(lag.as_secs_f64());
        }
    }
}

/// An instance id as it travels in `options` and payloads: only characters
/// that need no escaping there.
pub fn instance_name(instance: &str) -> String {
    instance
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `options` with this instance's name added for the triggers' payloads
/// (`-c integrations.instance=...`).
pub fn with_instance_option(options: Option<&str>, instance: &str) -> String {
    let own = format!("-c {INSTANCE_SETTING}={}", instance_name(instance));
    match options.map(str::trim).filter(|o| !o.is_empty()) {
        Some(o) => format!("{o} {own}"),
        None => own,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_say_what_to_forget() {
        let p = r#"{"kind" : "integration", "user_id" : "u1", "instance" : null, "at" : 17}"#;
        assert_eq!(
            parse(p, "me"),
            (Change::User("u1".into()), "integration", Some(17))
        );
        let p = r#"{"kind" : "integration", "user_id" : "u1", "instance" : "me", "at" : 17}"#;
        assert_eq!(parse(p, "me").0, Change::Own);
        let p = r#"{"kind" : "integration", "user_id" : null, "instance" : "other", "at" : 1}"#;
        assert_eq!(parse(p, "me").0, Change::AllUsers);
        let p = r#"{"kind" : "api_key", "id" : "4", "instance" : null, "at" : 1}"#;
        assert_eq!(parse(p, "me").0, Change::ApiKeys);
        assert_eq!(parse("not json", "me"), (Change::AllUsers, "unknown", None));
        assert_eq!(parse(r#"{"kind": "webhook"}"#, "me").1, "unknown");
    }

    #[test]
    fn the_instance_option_is_appended_and_sanitised() {
        assert_eq!(
            with_instance_option(None, "host-1-ab"),
            "-c integrations.instance=host-1-ab"
        );
        assert_eq!(
            with_instance_option(Some("-c statement_timeout=5000"), "a b\\c"),
            "-c statement_timeout=5000 -c integrations.instance=a_b_c"
        );
    }
}
