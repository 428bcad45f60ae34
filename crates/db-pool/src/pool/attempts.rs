//! Connection attempts under failure, and handing returned connections to
//! callers who could not open one.
//!
//! deadpool opens a connection for the caller who finds none idle
//! (create-on-checkout), so left alone every caller makes its own attempt
//! and owns its failure: while the server is down each request opens a
//! connection attempt (a storm), and when the server refuses new
//! connections (53300) callers fail although connections already open
//! would serve them a moment later. HikariCP and PgBouncer separate the
//! two; this module does the same on top of deadpool:
//!
//! - [`Attempts`]: while attempts fail, at most one is in flight per pool,
//!   after a backoff (53300: 100 ms doubling to 5 s; anything else: 50 ms
//!   doubling to 1 s, so recovery stays quick). Callers who arrive
//!   meanwhile get the last error at once, saying when the next attempt is.
//! - [`Handoff`]: a caller refused with 53300 does not fail: it waits (up
//!   to its `pool_timeout`) for a connection another caller returns, handed
//!   to it directly, or for its own next attempt. Only if neither comes
//!   does it get P2024, naming the refusals.
//!
//! Hand-written: deadpool has no hook between "a connection came back" and
//! "a caller is inside `create`", and no crate offers HikariCP's model on
//! tokio-postgres.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::manager::ClientConn;
use crate::error::Error;

/// Backoff after the server refused a connection (53300).
const REFUSED_MIN: Duration = Duration::from_millis(100);
const REFUSED_MAX: Duration = Duration::from_secs(5);
/// Backoff after any other failed attempt (unreachable, timeout, TLS,
/// authentication): capped at 1 s so the pool is back within a second of
/// the server.
const FAILED_MIN: Duration = Duration::from_millis(50);
const FAILED_MAX: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a few assignments: a panic cannot
    // leave the data half-changed.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How connection attempts are going.
#[derive(Default)]
pub(crate) struct Attempts {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    failing: Option<Failing>,
    /// An attempt made while failing is in flight (the probe).
    probing: bool,
}

struct Failing {
    /// The server refused (53300), as opposed to could not be reached.
    refused: bool,
    /// When the last attempt failed.
    at: Instant,
    /// No attempt before this.
    until: Instant,
    /// The current pause.
    pause: Duration,
    /// The last failure, to answer callers with meanwhile.
    last: Error,
}

/// May this caller attempt a connection now?
pub(crate) enum Gate {
    /// Yes. `probe`: the attempt tests whether failing attempts succeed
    /// again (the only one in flight).
    Go { probe: bool },
    /// No: attempts are failing; here is the last failure, with when the
    /// next attempt is.
    Failing(Error),
}

impl Attempts {
    /// Whether the caller may attempt a connection.
    pub fn gate(&self) -> Gate {
        let mut s = lock(&self.state);
        let probing = s.probing;
        let Some(f) = s.failing.as_ref() else {
            return Gate::Go { probe: false };
        };
        let now = Instant::now();
        if probing || now < f.until {
            let next = f.until.saturating_duration_since(now);
            return Gate::Failing(annotate(&f.last, next, probing));
        }
        s.probing = true;
        Gate::Go { probe: true }
    }

    /// Records an attempt's outcome.
    pub fn finished(&self, probe: bool, result: Result<(), &Error>) {
        let mut s = lock(&self.state);
        if probe {
            s.probing = false;
        }
        let Err(e) = result else {
            match s.failing.as_mut() {
                // The server had room for one more; it was full a moment
                // ago, so the next attempt may be refused again: attempts
                // stay one at a time (the next may go at once) rather than
                // every waiting caller trying together. Cleared once
                // REFUSED_MAX passes without a refusal.
                Some(f) if f.refused && f.at.elapsed() < REFUSED_MAX => {
                    f.until = Instant::now();
                }
                _ => s.failing = None,
            }
            return;
        };
        let refused = matches!(e, Error::TooManyConnections(_));
        let (min, max) = if refused {
            (REFUSED_MIN, REFUSED_MAX)
        } else {
            (FAILED_MIN, FAILED_MAX)
        };
        let pause = match &s.failing {
            // Attempts begun together while healthy fail together: only
            // the probe (one attempt after a pause) lengthens the pause.
            Some(f) if !probe && f.refused == refused => f.pause,
            Some(f) if f.refused == refused => (f.pause * 2).min(max),
            _ => min,
        };
        let now = Instant::now();
        s.failing = Some(Failing {
            refused,
            at: now,
            until: now + pause,
            pause,
            last: copy(e),
        });
    }

    /// The probe was dropped before its outcome: let the next caller try.
    pub fn cancelled(&self) {
        lock(&self.state).probing = false;
    }

    /// While the server refuses new connections: when the next attempt is.
    pub fn refusing(&self) -> Option<Instant> {
        let s = lock(&self.state);
        s.failing.as_ref().filter(|f| f.refused).map(|f| f.until)
    }
}

/// The error again, for another caller.
fn copy(e: &Error) -> Error {
    match e {
        Error::Unreachable { address, reason } => Error::Unreachable {
            address: address.clone(),
            reason: reason.clone(),
        },
        Error::AuthenticationFailed { address, user } => Error::AuthenticationFailed {
            address: address.clone(),
            user: user.clone(),
        },
        Error::DatabaseDoesNotExist { database, address } => Error::DatabaseDoesNotExist {
            database: database.clone(),
            address: address.clone(),
        },
        Error::Tls(m) => Error::Tls(m.clone()),
        Error::TooManyConnections(m) => Error::TooManyConnections(m.clone()),
        other => Error::Unreachable {
            address: String::new(),
            reason: other.to_string(),
        },
    }
}

/// The last failure, saying when the pool tries again.
fn annotate(e: &Error, next: Duration, probing: bool) -> Error {
    let when = if probing {
        "the pool is trying again now".to_string()
    } else {
        format!("the pool tries again in {} ms", next.as_millis())
    };
    match copy(e) {
        Error::Unreachable { address, reason } => Error::Unreachable {
            address,
            reason: format!("{reason}; {when}"),
        },
        Error::TooManyConnections(m) => Error::TooManyConnections(format!("{m} ({when})")),
        Error::Tls(m) => Error::Tls(format!("{m} ({when})")),
        other => other,
    }
}

/// Callers inside `create` who were refused, waiting for a connection
/// another caller returns.
#[derive(Default)]
pub(crate) struct Handoff {
    /// How many wait in line: kept equal to the line's length under its
    /// lock, read without it on the return path.
    waiting: AtomicUsize,
    line: Mutex<Line>,
}

#[derive(Default)]
struct Line {
    next_id: u64,
    waiters: VecDeque<(u64, oneshot::Sender<ClientConn>)>,
}

impl Handoff {
    /// Whether anyone waits (one atomic load: the return path asks it for
    /// every connection).
    pub fn wanted(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// Waits in line for a returned connection.
    pub fn wait(&self) -> Waiter<'_> {
        let (tx, rx) = oneshot::channel();
        let mut line = lock(&self.line);
        let id = line.next_id;
        line.next_id += 1;
        line.waiters.push_back((id, tx));
        self.waiting.store(line.waiters.len(), Ordering::Release);
        Waiter {
            handoff: self,
            rx,
            id,
        }
    }

    /// Hands a connection to the longest waiting caller; gives it back
    /// when nobody takes it. A waiter leaves the line when it is served
    /// (so a caller busy checking the connection it got does not count as
    /// waiting) or gone.
    pub fn offer(&self, mut conn: ClientConn) -> Option<ClientConn> {
        let mut line = lock(&self.line);
        while let Some((_, tx)) = line.waiters.pop_front() {
            self.waiting.store(line.waiters.len(), Ordering::Release);
            match tx.send(conn) {
                Ok(()) => return None,
                Err(back) => conn = back,
            }
        }
        Some(conn)
    }

    /// Ends every wait (the pool is closing).
    pub fn close(&self) {
        let mut line = lock(&self.line);
        line.waiters.clear();
        self.waiting.store(0, Ordering::Release);
    }
}

/// One caller's place in the handoff line.
pub(crate) struct Waiter<'a> {
    handoff: &'a Handoff,
    rx: oneshot::Receiver<ClientConn>,
    id: u64,
}

impl Waiter<'_> {
    /// The handed connection, or `None` when the pool closed.
    pub async fn conn(&mut self) -> Option<ClientConn> {
        (&mut self.rx).await.ok()
    }
}

impl Waiter<'_> {
    /// Leaves the line; returns the connection handed over before it left,
    /// if one was.
    pub fn leave(&mut self) -> Option<ClientConn> {
        {
            let mut line = lock(&self.handoff.line);
            if let Some(at) = line.waiters.iter().position(|(id, _)| *id == self.id) {
                line.waiters.remove(at);
            }
            self.handoff
                .waiting
                .store(line.waiters.len(), Ordering::Release);
        }
        // Out of the line, nothing more can be sent.
        self.rx.close();
        self.rx.try_recv().ok()
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        // Dropped (its caller gave up) with a connection handed over just
        // before: it goes to the next in line, or closes.
        if let Some(conn) = self.leave() {
            drop(self.handoff.offer(conn));
        }
    }
}
