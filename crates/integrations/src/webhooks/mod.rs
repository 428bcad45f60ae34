//! Webhooks, the protocol side: Standard Webhooks signatures
//! ([`sign`]), where deliveries may go ([`address`]), one attempt over
//! HTTP ([`send`]) and the retry schedule. The operations (endpoints,
//! deliveries, the dispatcher) are in `service/webhooks.rs` and
//! `service/delivery.rs`; the SQL in `store/webhooks.rs`.

pub mod address;
pub mod send;
pub mod sign;

use std::time::Duration;

pub use address::ALLOW_PRIVATE_ENV;
pub use send::{Attempt, SendConfig, Sender};
pub use sign::{new_secret, SigningKey};

/// Most endpoints (registered by admin keys; still bounded).
pub const MAX_ENDPOINTS: i64 = 100;

/// How long a rotated-out secret keeps signing beside the new one.
pub const SECRET_OVERLAP: Duration = Duration::from_secs(24 * 3600);

/// The retry schedule's default: the pause before each retry after the
/// first attempt (about a day and a half in all).
pub const DEFAULT_SCHEDULE: &str = "5s,5m,30m,2h,5h,10h,14h";

/// How deliveries run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// The HTTP client's settings.
    pub send: SendConfig,
    /// The pause before each retry (`INTEGRATIONS_WEBHOOK_RETRY_SCHEDULE`);
    /// a delivery that failed one more time than it has entries is
    /// `failed`. Each pause gets up to 10 % jitter.
    pub schedule: Vec<Duration>,
    /// Attempts in flight per endpoint per instance
    /// (`INTEGRATIONS_WEBHOOK_CONCURRENCY`, 64): one slow endpoint fills
    /// its own slots, never the others'.
    pub concurrency: usize,
    /// An endpoint whose every attempt failed for this long is disabled
    /// (`INTEGRATIONS_WEBHOOK_DISABLE_AFTER`, 5 days).
    pub disable_after: Duration,
    /// How often the dispatcher looks for due deliveries when no
    /// notification wakes it (retries come due without one).
    pub poll: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            send: SendConfig::default(),
            schedule: parse_schedule(DEFAULT_SCHEDULE).unwrap_or_default(),
            concurrency: 64,
            disable_after: Duration::from_secs(5 * 24 * 3600),
            poll: Duration::from_secs(1),
        }
    }
}

impl WebhookConfig {
    /// How long a claimed attempt is reserved for its instance: longer
    /// than the attempt can take, so two instances never send the same
    /// attempt, and short enough that one a killed instance held is sent
    /// again soon.
    pub fn claim(&self) -> Duration {
        self.send.timeout + Duration::from_secs(5)
    }

    /// The pause after the `attempts`-th failed attempt, with jitter, or
    /// `None` when the schedule is spent (the delivery fails).
    pub fn retry_after(&self, attempts: i32) -> Option<Duration> {
        let index = usize::try_from(attempts).ok()?.checked_sub(1)?;
        let base = *self.schedule.get(index)?;
        let jitter = rand::random::<f64>() * 0.1;
        Some(base.mul_f64(1.0 + jitter))
    }
}

/// Parses a schedule: comma-separated durations, each a whole number and
/// a unit (`ms`, `s`, `m`, `h`, `d`), e.g. `5s,5m,30m,2h`. `None` when
/// one does not parse or there are more than 30.
pub fn parse_schedule(text: &str) -> Option<Vec<Duration>> {
    let list: Option<Vec<Duration>> = text.split(',').map(|d| parse_duration(d.trim())).collect();
    list.filter(|l| !l.is_empty() && l.len() <= 30)
}

/// A whole number and a unit (`ms`, `s`, `m`, `h`, `d`).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let secs = match unit {
        "ms" => return Some(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(secs).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schedule_lasts_about_a_day_and_a_half() {
        let cfg = WebhookConfig::default();
        assert_eq!(cfg.schedule.len(), 7);
        let total: Duration = cfg.schedule.iter().sum();
        assert_eq!(
            total.as_secs(),
            5 + 300 + 1800 + 7200 + 18000 + 36000 + 50400
        );
        let first = cfg.retry_after(1).unwrap();
        assert!(first >= Duration::from_secs(5) && first <= Duration::from_millis(5500));
        assert!(cfg.retry_after(7).is_some());
        assert_eq!(cfg.retry_after(8), None, "8 attempts, then failed");
        assert_eq!(cfg.retry_after(0), None);
    }

    #[test]
    fn schedules_parse_units() {
        assert_eq!(
            parse_schedule("200ms, 1s,2m,1h,1d"),
            Some(vec![
                Duration::from_millis(200),
                Duration::from_secs(1),
                Duration::from_secs(120),
                Duration::from_secs(3600),
                Duration::from_secs(86400)
            ])
        );
        for bad in ["", "5", "5x", "s", "-1s", "1.5s", "5s,,5s"] {
            assert_eq!(parse_schedule(bad), None, "{bad}");
        }
    }
}
