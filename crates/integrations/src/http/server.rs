//! Serving the application on a TCP listener, with the limits a public
//! socket needs: a header-read timeout, an idle keep-alive timeout and a
//! cap on concurrent connections (`axum::serve` has none of them, so
//! connections that send nothing, trickle their headers or sit idle are
//! otherwise kept for ever, each holding a file descriptor).
//!
//! HTTP/1.1 only, through hyper's connection builder: the clients of this
//! API speak it, and HTTP/2's streams would each need their own timers.
//!
//! - Until a connection's first request head, and from the first byte of
//!   each later one, the head must arrive within `header_read_timeout`
//!   (a client trickling a byte a second is cut off).
//! - Between requests, a keep-alive connection may stay silent for
//!   `idle_timeout`.
//! - At most `max_connections` are served at once: beyond, the listener
//!   is not polled, so new connections wait in the kernel's accept backlog
//!   and are served as soon as one closes.
//! - An accept error that is not about one connection (`EMFILE`: out of
//!   file descriptors) backs off 5 ms, doubling to 1 s, instead of
//!   retrying at once in a loop.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Default of [`ServerLimits::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ServerLimits::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most connections served at once by default (fewer when the open-files
/// limit is lower; see [`connection_cap`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// File descriptors kept for everything but client connections (the
/// database pool, the providers, logs) when the cap is derived from the
/// open-files limit.
const RESERVED_FILES: u64 = 256;

/// Timeouts and the connection cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Longest wait for a complete request head: from the connection's
    /// opening for its first request, from the first byte for later ones.
    pub header_read_timeout: Duration,
    /// Longest silence on a keep-alive connection between two requests.
    pub idle_timeout: Duration,
    /// Most connections served at once; `None`: [`connection_cap`] derives
    /// it from the open-files limit.
    pub max_connections: Option<usize>,
}

impl Default for ServerLimits {
    fn default() -> ServerLimits {
        ServerLimits {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: None,
        }
    }
}

/// The connection cap: `configured`, or [`DEFAULT_MAX_CONNECTIONS`] lowered
/// to fit the open-files limit. Raises the soft open-files limit to the
/// hard one first (as Go's runtime does), since the default soft limit
/// (often 1024) is far below what a server needs. Returns the cap and the
/// open-files limit in force, when known.
pub fn connection_cap(configured: Option<usize>) -> (usize, Option<u64>) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let files = getrlimit(Resource::RLIMIT_NOFILE).ok().map(|(soft, hard)| {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            hard
        } else {
            soft
        }
    });
    let cap = configured.unwrap_or_else(|| derived_cap(files));
    (cap, files)
}

/// [`DEFAULT_MAX_CONNECTIONS`], or fewer to leave [`RESERVED_FILES`] of
/// `files` (at least 16 connections).
fn derived_cap(files: Option<u64>) -> usize {
    match files {
        Some(files) => {
            let room = usize::try_from(files.saturating_sub(RESERVED_FILES)).unwrap_or(usize::MAX);
            room.clamp(16, DEFAULT_MAX_CONNECTIONS)
        }
        None => DEFAULT_MAX_CONNECTIONS,
    }
}

/// Metric handles, created once.
#[derive(Clone)]
struct ConnectionMetrics {
    open: metrics::Gauge,
    header_timeouts: metrics::Counter,
    idle_timeouts: metrics::Counter,
    accept_errors: metrics::Counter,
}

impl ConnectionMetrics {
    fn new(cap: usize) -> ConnectionMetrics {
        metrics::gauge!("http_connections_max").set(cap as f64);
        let timeouts = |kind: &'static str| metrics::counter!("http_connection_timeouts_total", "kind" => kind);
        ConnectionMetrics {
            open: metrics::gauge!("http_connections_open"),
            header_timeouts: timeouts("header"),
            idle_timeouts: timeouts("idle"),
            accept_errors: metrics::counter!("http_accept_errors_total"),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled, at most `cap`
/// connections at once; then stops accepting (the listener is closed, so
/// new connections are refused), lets requests in flight finish and
/// returns when every connection has closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &ServerLimits,
    cap: usize,
    shutdown: CancellationToken,
) {
    let cap = cap.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(cap));
    let metrics = ConnectionMetrics::new(cap);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        // A free slot first: at the cap, connections wait in the backlog.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            () = shutdown.cancelled() => break,
        };
        let Ok(slot) = slot else { break };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                stream
            }
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                metrics.accept_errors.increment(1);
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accepting a connection failed; retrying after a pause");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        // Small JSON answers: do not wait to fill a segment.
        let _ = stream.set_nodelay(true);
        let (app, limits, shutdown, metrics) = (
            app.clone(),
            limits.clone(),
            shutdown.clone(),
            metrics.clone(),
        );
        tokio::spawn(async move {
            metrics.open.increment(1.0);
            connection(stream, app, &limits, shutdown, &metrics).await;
            metrics.open.decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    // Every slot back: every connection has closed.
    let cap = u32::try_from(cap).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(cap).await;
}

/// First pause after an accept error (then doubled up to the maximum; the
/// same steps as Go's `net/http`).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Errors about one connection (it went away before we took it): the
/// listener is fine, take the next one at once.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Serves one connection until it closes, times out, or shutdown lets its
/// request in flight finish.
async fn connection(
    stream: TcpStream,
    app: Router,
    limits: &ServerLimits,
    shutdown: CancellationToken,
    metrics: &ConnectionMetrics,
) {
    let activity = Activity::new(limits);
    let io = TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let busy = activity.request_started();
            let app = app.clone();
            async move {
                let response = app.oneshot(req).await?;
                Ok::<_, Infallible>(response.map(|inner| TrackedBody { inner, _busy: busy }))
            }
        })
    };
    // No hyper timer: the watchdog applies both limits, and hyper's timer
    // (a sleep armed and dropped for every request) cost about 4% of the
    // requests per second of `GET /healthz`.
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    tokio::pin!(conn);
    let signal = Arc::new(Signal::default());
    // Aborted when the connection ends, however it ends.
    let _watchdog = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(watchdog(
        activity,
        signal.clone(),
        shutdown,
    )));
    let mut draining = false;
    // Polled by hand rather than with `select!`, which polls every branch on
    // every wake-up of the task (several per request): the watchdog's
    // verdicts cost one atomic load here (measured: 7% of `GET /healthz`).
    let ended = std::future::poll_fn(|cx| {
        signal.waker.register(cx.waker());
        match signal.state.load(Ordering::Acquire) {
            SIGNAL_HEADER => return Poll::Ready(Err(Timeout::Header)),
            SIGNAL_IDLE => return Poll::Ready(Err(Timeout::Idle)),
            // Graceful: an idle connection closes now, one with a request
            // in flight after its response.
            SIGNAL_DRAIN if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ => {}
        }
        std::future::Future::poll(conn.as_mut(), cx).map(Ok)
    })
    .await;
    match ended {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "connection ended with an error"),
        // No request in flight: dropping the connection closes it.
        Err(timeout) => {
            match timeout {
                Timeout::Header => metrics.header_timeouts.increment(1),
                Timeout::Idle => metrics.idle_timeouts.increment(1),
            }
            tracing::debug!(?timeout, "closing a connection that timed out");
        }
    }
}

/// What a connection's watchdog decided (`Signal::state`; 0: nothing yet).
const SIGNAL_HEADER: u8 = 1;
const SIGNAL_IDLE: u8 = 2;
const SIGNAL_DRAIN: u8 = 3;

/// From a connection's watchdog task to the connection's task.
#[derive(Default)]
struct Signal {
    state: std::sync::atomic::AtomicU8,
    waker: futures_util::task::AtomicWaker,
}

impl Signal {
    fn raise(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        self.waker.wake();
    }
}

/// A connection's timer, in a task of its own so the connection's task
/// pays nothing for it per request: raises a timeout when a deadline passes,
/// or asks the connection to drain at shutdown.
async fn watchdog(activity: Activity, signal: Arc<Signal>, shutdown: CancellationToken) {
    tokio::select! {
        timeout = activity.expired() => signal.raise(match timeout {
            Timeout::Header => SIGNAL_HEADER,
            Timeout::Idle => SIGNAL_IDLE,
        }),
        () = shutdown.cancelled() => signal.raise(SIGNAL_DRAIN),
    }
}

/// Which limit closed a connection.
#[derive(Debug, Clone, Copy)]
enum Timeout {
    Header,
    Idle,
}

/// Where a connection is between requests; shared by its socket (reads),
/// its service (requests and responses) and its task (the timer).
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Reading a request head, which must be complete by the deadline.
    Head(Instant),
    /// Waiting for the first byte of the next request until the deadline.
    Idle(Instant),
    /// Requests in flight: no deadline (the request timeout applies).
    Busy(usize),
}

/// A connection's [`Phase`], and its limits.
///
/// Hand-written because hyper has a single timer (`header_read_timeout`)
/// that runs from the end of one response to the end of the next head, so
/// it cannot give a short header timeout with a longer idle keep-alive
/// (hyperium/hyper#1628; Go's `ReadHeaderTimeout` and `IdleTimeout` are the
/// model here).
///
/// Moving between phases is a store under an uncontended lock, with no
/// wake-up: the watchdog sleeps until the deadline it saw and looks at the
/// phase again when it wakes (a deadline that moved later is slept again).
/// While idle it sleeps at most the header timeout at a time, so a head
/// that starts after an idle spell is held to its limit within one more
/// header timeout. Waking a task on every change cost about 15% of the
/// requests per second of `GET /healthz` (BENCHMARKS.md).
#[derive(Clone)]
struct Activity {
    phase: Arc<std::sync::Mutex<Phase>>,
    header: Duration,
    idle: Duration,
}

impl Activity {
    fn new(limits: &ServerLimits) -> Activity {
        let first = Phase::Head(Instant::now() + limits.header_read_timeout);
        Activity {
            phase: Arc::new(std::sync::Mutex::new(first)),
            header: limits.header_read_timeout,
            idle: limits.idle_timeout,
        }
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        // Every critical section is one assignment: a poisoned value is whole.
        self.phase
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Bytes arrived: an idle connection starts reading a head.
    fn bytes_read(&self) {
        let mut phase = self.phase();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Head(Instant::now() + self.header);
        }
    }

    /// A request head was read; idle again when the guard is dropped (when
    /// hyper has written the whole response body, or gave up on it).
    fn request_started(&self) -> Busy {
        let mut phase = self.phase();
        *phase = match *phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Head(_) | Phase::Idle(_) => Phase::Busy(1),
        };
        drop(phase);
        Busy(self.clone())
    }

    fn request_ended(&self) {
        let mut phase = self.phase();
        *phase = match *phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now() + self.idle),
        };
    }

    /// Resolves when the current deadline passes without the phase moving
    /// on; never while requests are in flight.
    async fn expired(&self) -> Timeout {
        loop {
            let now = Instant::now();
            let current = *self.phase();
            let (wake_at, timeout) = match current {
                Phase::Head(at) => (at, Some((at, Timeout::Header))),
                Phase::Idle(at) => ((now + self.header).min(at), Some((at, Timeout::Idle))),
                // Looked at again later: requests in flight have no limit
                // here (the request timeout applies).
                Phase::Busy(_) => (now + self.header.min(self.idle), None),
            };
            if let Some((deadline, timeout)) = timeout {
                if deadline <= now {
                    return timeout;
                }
            }
            tokio::time::sleep_until(wake_at).await;
        }
    }
}

/// A request in flight on a connection.
struct Busy(Activity);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// The socket, telling [`Activity`] when bytes arrive.
struct Watched {
    stream: TcpStream,
    activity: Activity,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A response body that keeps its request in flight until hyper drops it.
struct TrackedBody {
    inner: Body,
    _busy: Busy,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_fits_the_open_files_limit() {
        assert_eq!(derived_cap(None), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(derived_cap(Some(1_048_576)), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(derived_cap(Some(1024)), 1024 - 256);
        assert_eq!(derived_cap(Some(100)), 16);
    }
}
