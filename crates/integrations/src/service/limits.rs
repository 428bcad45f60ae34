//! Per-provider limits on the refreshes this instance sends: every refresh
//! (background refresher, batch, single) takes a [`ProviderPermit`] from
//! its provider's [`Gate`] before it calls the token endpoint, and tells
//! the gate how the call went.
//!
//! A gate holds, in order of checking:
//! - a **pause**: the provider answered 429 (or with a `Retry-After`); no
//!   request is sent until the time it asked for has passed;
//! - a **circuit breaker**: after [`BREAKER_THRESHOLD`] transient failures
//!   in a row (5xx, timeouts, refused connections) the provider is left
//!   alone for a cooldown (5 s, doubling to 5 minutes while it keeps
//!   failing), then one probe request decides: a success closes the
//!   breaker, a failure opens it again;
//! - the provider's `max_concurrent_refreshes` (a semaphore);
//! - its `max_refreshes_per_second`: requests are started evenly spaced,
//!   `1 / rate` apart.
//!
//! Why by hand: the rate part is a "next free slot" reservation under the
//! lock that already guards the pause and the breaker (a crate such as
//! `governor` allows bursts up to its burst size, which a provider counting
//! per second sees as a rate over its limit, and it knows nothing of the
//! pauses); the concurrency part is tokio's semaphore.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::oauth::{OAuthError, ProviderRegistry, RefreshLimits};

/// Transient failures in a row that open a provider's circuit breaker.
pub const BREAKER_THRESHOLD: u32 = 5;
/// The first cooldown of an open breaker.
const BREAKER_COOLDOWN: Duration = Duration::from_secs(5);
/// The longest cooldown (doubling while probes keep failing).
const BREAKER_MAX_COOLDOWN: Duration = Duration::from_secs(300);

/// Why a refresh waited before calling its provider
/// (`integrations_refresh_limit_waits_total{reason}`).
pub const WAIT_REASONS: [&str; 3] = ["paused", "concurrency", "rate"];
/// Why a provider was paused (`integrations_refresh_pauses_total{reason}`).
pub const PAUSE_REASONS: [&str; 2] = ["rate_limited", "circuit_open"];

/// The gates of every provider in the registry.
pub(super) struct ProviderGates {
    gates: HashMap<String, Arc<Gate>>,
}

impl ProviderGates {
    pub(super) fn new(providers: &ProviderRegistry) -> ProviderGates {
        ProviderGates {
            gates: providers
                .iter()
                .map(|p| (p.name.clone(), Arc::new(Gate::new(&p.name, p.limits))))
                .collect(),
        }
    }

    /// Whether `provider` is paused or its breaker open now (the refresher
    /// does not claim its rows meanwhile).
    pub(super) fn paused(&self, provider: &str) -> bool {
        self.gates
            .get(provider)
            .is_some_and(|g| g.admission_peek(Instant::now()).is_some())
    }

    /// Waits until a refresh of `provider` may call its token endpoint, for
    /// at most `max_wait` (`None`: as long as it takes). A provider not in
    /// the registry has no gate: the caller has already refused it.
    pub(super) async fn acquire(
        &self,
        provider: &str,
        max_wait: Option<Duration>,
    ) -> Result<Option<ProviderPermit>, Busy> {
        match self.gates.get(provider) {
            Some(gate) => gate.clone().acquire(max_wait).await.map(Some),
            None => Ok(None),
        }
    }
}

/// A provider is paused (or its limits would make the caller wait) for
/// longer than the caller can wait.
#[derive(Debug, Clone, Copy)]
pub struct Busy {
    /// When the provider can be tried again, from now.
    pub retry_after: Duration,
    /// `rate_limited` (the provider asked), `circuit_open` (it kept
    /// failing) or `limit` (this instance's configured limits).
    pub reason: &'static str,
}

/// One provider's limits and state.
pub(super) struct Gate {
    name: String,
    concurrency: Option<Arc<Semaphore>>,
    /// Time between two request starts (`1 / max_refreshes_per_second`).
    spacing: Option<Duration>,
    state: Mutex<GateState>,
    /// Woken when a probe finishes.
    probed: Notify,
}

#[derive(Default)]
struct GateState {
    /// The earliest start of the next request (the rate limit).
    next_slot: Option<Instant>,
    /// No request before this (a 429's `Retry-After`).
    paused_until: Option<Instant>,
    /// Transient failures in a row.
    failures: u32,
    breaker: Breaker,
}

#[derive(Default, Clone, Copy, PartialEq, Debug)]
enum Breaker {
    #[default]
    Closed,
    /// No request until `until`; then one probe.
    Open { until: Instant, cooldown: Duration },
    /// A probe is out (`probing`) or may go out; its outcome decides.
    HalfOpen { probing: bool, cooldown: Duration },
}

/// What to do before a request may go out.
enum Admission {
    Go { probe: bool },
    WaitUntil(Instant, &'static str),
    WaitForProbe,
}

impl Gate {
    fn new(name: &str, limits: RefreshLimits) -> Gate {
        Gate {
            name: name.to_string(),
            concurrency: limits
                .max_concurrent
                .map(|n| Arc::new(Semaphore::new(n as usize))),
            spacing: limits.per_second.map(|r| Duration::from_secs_f64(1.0 / r)),
            state: Mutex::new(GateState::default()),
            probed: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pause and breaker: may a request go out now?
    fn admission(&self, now: Instant) -> Admission {
        let mut st = self.state();
        if let Some(until) = st.paused_until {
            if until > now {
                return Admission::WaitUntil(until, "rate_limited");
            }
            st.paused_until = None;
        }
        match st.breaker {
            Breaker::Closed => Admission::Go { probe: false },
            Breaker::Open { until, .. } if until > now => {
                Admission::WaitUntil(until, "circuit_open")
            }
            Breaker::Open { cooldown, .. }
            | Breaker::HalfOpen {
                probing: false,
                cooldown,
            } => {
                st.breaker = Breaker::HalfOpen {
                    probing: true,
                    cooldown,
                };
                Admission::Go { probe: true }
            }
            Breaker::HalfOpen { probing: true, .. } => Admission::WaitForProbe,
        }
    }

    async fn acquire(self: Arc<Self>, max_wait: Option<Duration>) -> Result<ProviderPermit, Busy> {
        let deadline = max_wait.map(|w| Instant::now() + w);
        let too_late = |at: Instant, reason| match deadline {
            Some(d) if at > d => Err(Busy {
                retry_after: at.saturating_duration_since(Instant::now()),
                reason,
            }),
            _ => Ok(()),
        };
        let provider = self.name.clone();
        let waited = |reason: &'static str| {
            metrics::counter!("integrations_refresh_limit_waits_total", "provider" => provider.clone(), "reason" => reason)
                .increment(1);
        };
        loop {
            // 1. Pause and breaker.
            let probe = loop {
                // Registered before the state is read: a probe finishing
                // in between still wakes this waiter.
                let probed = self.probed.notified();
                tokio::pin!(probed);
                probed.as_mut().enable();
                match self.admission(Instant::now()) {
                    Admission::Go { probe } => break probe,
                    Admission::WaitUntil(until, reason) => {
                        too_late(until, reason)?;
                        waited("paused");
                        tokio::time::sleep_until(until).await;
                    }
                    Admission::WaitForProbe => {
                        let probe_wait = Instant::now() + Duration::from_secs(1);
                        too_late(probe_wait, "circuit_open")?;
                        waited("paused");
                        let _ = tokio::time::timeout_at(probe_wait, probed).await;
                    }
                }
            };
            let mut permit = ProviderPermit {
                gate: self.clone(),
                _slot: None,
                probe,
                finished: false,
                counted: false,
            };
            // 2. Concurrency.
            if let Some(sem) = &self.concurrency {
                let slot = match sem.clone().try_acquire_owned() {
                    Ok(slot) => slot,
                    Err(_) => {
                        waited("concurrency");
                        let acquired = match deadline {
                            Some(d) => tokio::time::timeout_at(d, sem.clone().acquire_owned())
                                .await
                                .map_err(|_| Busy {
                                    retry_after: Duration::from_secs(1),
                                    reason: "limit",
                                })?,
                            None => sem.clone().acquire_owned().await,
                        };
                        // The semaphore is never closed.
                        acquired.map_err(|_| Busy {
                            retry_after: Duration::from_secs(1),
                            reason: "limit",
                        })?
                    }
                };
                permit._slot = Some(slot);
            }
            // 3. Rate: reserve the next slot (checked against the deadline
            // first, so a caller that cannot wait reserves nothing).
            if let Some(spacing) = self.spacing {
                let start = {
                    let mut st = self.state();
                    let now = Instant::now();
                    let start = st.next_slot.map_or(now, |s| s.max(now));
                    too_late(start, "limit")?;
                    st.next_slot = Some(start + spacing);
                    start
                };
                if start > Instant::now() {
                    waited("rate");
                    tokio::time::sleep_until(start).await;
                }
            }
            // A pause that began while this one waited (another request's
            // 429) holds it too; its reserved slot is given up.
            if !probe && self.admission_peek(Instant::now()).is_some() {
                continue;
            }
            metrics::gauge!("integrations_refresh_in_flight", "provider" => self.name.clone())
                .increment(1.0);
            permit.counted = true;
            return Ok(permit);
        }
    }

    /// When the provider is paused or its breaker open now, until when.
    fn admission_peek(&self, now: Instant) -> Option<Instant> {
        let st = self.state();
        let paused = st.paused_until.filter(|u| *u > now);
        let open = match st.breaker {
            Breaker::Open { until, .. } if until > now => Some(until),
            _ => None,
        };
        paused.or(open)
    }

    /// Records how a request went.
    fn record(&self, outcome: Outcome, probe: bool) {
        let mut st = self.state();
        let now = Instant::now();
        match outcome {
            Outcome::Answered => {
                st.failures = 0;
                if st.breaker != Breaker::Closed {
                    tracing::info!(provider = %self.name, "provider answers again: circuit breaker closed");
                }
                st.breaker = Breaker::Closed;
            }
            Outcome::RateLimited(wait) => {
                let until = now + wait;
                if st.paused_until.is_none_or(|u| u < until) {
                    if st.paused_until.is_none_or(|u| u <= now) {
                        tracing::warn!(
                            provider = %self.name,
                            retry_after_secs = wait.as_secs(),
                            "provider asked to slow down (429 / Retry-After): its refreshes are paused"
                        );
                        metrics::counter!("integrations_refresh_pauses_total", "provider" => self.name.clone(), "reason" => "rate_limited")
                            .increment(1);
                    }
                    st.paused_until = Some(until);
                }
                if probe {
                    // Not an answer about the provider's health: let the
                    // next request probe again.
                    if let Breaker::HalfOpen { cooldown, .. } = st.breaker {
                        st.breaker = Breaker::HalfOpen {
                            probing: false,
                            cooldown,
                        };
                    }
                }
            }
            Outcome::Failed => {
                st.failures = st.failures.saturating_add(1);
                let reopen = match st.breaker {
                    Breaker::HalfOpen { cooldown, .. } if probe => {
                        Some((cooldown * 2).min(BREAKER_MAX_COOLDOWN))
                    }
                    Breaker::Closed if st.failures >= BREAKER_THRESHOLD => Some(BREAKER_COOLDOWN),
                    _ => None,
                };
                if let Some(cooldown) = reopen {
                    tracing::warn!(
                        provider = %self.name,
                        failures_in_a_row = st.failures,
                        cooldown_secs = cooldown.as_secs(),
                        "provider keeps failing: circuit breaker open, its refreshes wait for the cooldown, then one probe"
                    );
                    metrics::counter!("integrations_refresh_pauses_total", "provider" => self.name.clone(), "reason" => "circuit_open")
                        .increment(1);
                    st.breaker = Breaker::Open {
                        until: now + cooldown,
                        cooldown,
                    };
                }
            }
        }
        drop(st);
        if probe {
            self.probed.notify_waiters();
        }
    }

    /// A probe given up without an answer: the next request probes.
    fn probe_abandoned(&self) {
        let mut st = self.state();
        if let Breaker::HalfOpen {
            probing: true,
            cooldown,
        } = st.breaker
        {
            st.breaker = Breaker::HalfOpen {
                probing: false,
                cooldown,
            };
        }
        drop(st);
        self.probed.notify_waiters();
    }
}

/// How a request to the token endpoint went, for the gate.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// The provider answered (tokens or an OAuth error): it is up.
    Answered,
    /// 429 / `Retry-After`: pause for this long.
    RateLimited(Duration),
    /// 5xx, timeout, network: counts towards the breaker.
    Failed,
}

/// The right to send one refresh request to a provider: holds its
/// concurrency slot until dropped.
pub(super) struct ProviderPermit {
    gate: Arc<Gate>,
    _slot: Option<OwnedSemaphorePermit>,
    probe: bool,
    finished: bool,
    /// Counted in `integrations_refresh_in_flight` (once it may go out).
    counted: bool,
}

impl ProviderPermit {
    /// Tells the gate how the request went, and gives the slot back.
    pub(super) fn finish<T>(mut self, result: &Result<T, OAuthError>) {
        let outcome = match result {
            Ok(_) => Outcome::Answered,
            Err(OAuthError::RateLimited { retry_after, .. }) => Outcome::RateLimited(*retry_after),
            Err(OAuthError::Transient(_)) => Outcome::Failed,
            Err(_) => Outcome::Answered,
        };
        self.gate.record(outcome, self.probe);
        self.finished = true;
    }
}

impl Drop for ProviderPermit {
    fn drop(&mut self) {
        if self.counted {
            metrics::gauge!("integrations_refresh_in_flight", "provider" => self.gate.name.clone())
                .decrement(1.0);
        }
        if self.probe && !self.finished {
            self.gate.probe_abandoned();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(limits: RefreshLimits) -> Arc<Gate> {
        Arc::new(Gate::new("p", limits))
    }

    #[tokio::test(start_paused = true)]
    async fn requests_start_evenly_spaced_at_the_rate() {
        let g = gate(RefreshLimits {
            max_concurrent: None,
            per_second: Some(10.0),
        });
        let t0 = Instant::now();
        let mut starts = Vec::new();
        for _ in 0..5 {
            let p = g.clone().acquire(None).await.unwrap();
            starts.push(Instant::now() - t0);
            p.finish::<()>(&Ok(()));
        }
        assert_eq!(
            starts,
            (0..5)
                .map(|i| Duration::from_millis(100 * i))
                .collect::<Vec<_>>()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_every_request_for_its_retry_after() {
        let g = gate(RefreshLimits::default());
        let p = g.clone().acquire(None).await.unwrap();
        p.finish::<()>(&Err(OAuthError::RateLimited {
            message: "429".into(),
            retry_after: Duration::from_secs(2),
        }));
        let t0 = Instant::now();
        let busy = g.clone().acquire(Some(Duration::from_secs(1))).await.err();
        assert_eq!(busy.map(|b| b.reason), Some("rate_limited"));
        let _p = g.clone().acquire(None).await.unwrap();
        assert_eq!(Instant::now() - t0, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_open_the_breaker_and_one_probe_closes_it() {
        let g = gate(RefreshLimits::default());
        let failed: Result<(), _> = Err(OAuthError::Transient("503".into()));
        for _ in 0..BREAKER_THRESHOLD {
            g.clone().acquire(None).await.unwrap().finish(&failed);
        }
        let t0 = Instant::now();
        let busy = g.clone().acquire(Some(Duration::ZERO)).await.err();
        assert_eq!(busy.map(|b| b.reason), Some("circuit_open"));
        // After the cooldown one probe goes; others wait for its answer.
        let probe = g.clone().acquire(None).await.unwrap();
        assert_eq!(Instant::now() - t0, BREAKER_COOLDOWN);
        assert!(probe.probe);
        let other = g.clone().acquire(Some(Duration::from_millis(100))).await;
        assert!(other.is_err(), "a second request went out beside the probe");
        // The probe fails: open again, twice as long.
        probe.finish(&failed);
        let t1 = Instant::now();
        let probe = g.clone().acquire(None).await.unwrap();
        assert_eq!(Instant::now() - t1, BREAKER_COOLDOWN * 2);
        probe.finish::<()>(&Ok(()));
        let t2 = Instant::now();
        let _a = g.clone().acquire(None).await.unwrap();
        let _b = g.clone().acquire(None).await.unwrap();
        assert_eq!(Instant::now(), t2, "closed: no wait");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_bounded() {
        let g = gate(RefreshLimits {
            max_concurrent: Some(2),
            per_second: None,
        });
        let a = g.clone().acquire(None).await.unwrap();
        let _b = g.clone().acquire(None).await.unwrap();
        assert!(g
            .clone()
            .acquire(Some(Duration::from_millis(10)))
            .await
            .is_err());
        drop(a);
        assert!(g
            .clone()
            .acquire(Some(Duration::from_millis(10)))
            .await
            .is_ok());
    }
}
