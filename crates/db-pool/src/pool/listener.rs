//! A connection of its own, outside the pool, that `LISTEN`s: the receiving
//! end of a change feed (`NOTIFY`). Opened from a [`PoolConfig`] like the
//! pool's connections (TLS, keepalives, `connect_timeout`, errors with the
//! pool's codes), but never checked out, so it takes no pool slot; the
//! server counts it like any other connection.
//!
//! `LISTEN` needs a session of its own: through PgBouncer in transaction
//! mode it is accepted and then silently lost, so point the config at the
//! server itself (Prisma's `directUrl`).

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_postgres::{AsyncMessage, Connection, NoTls, Notification};

use super::manager::{connect_error, pg_config, within_connect_timeout};
use super::tls;
use crate::config::{Host, PoolConfig};
use crate::error::Error;

/// Notifications buffered before the oldest unread are dropped (reported as
/// [`ListenEvent::Lagged`]).
const BUFFER: usize = 8192;

/// What a [`Listener`] received.
#[derive(Debug)]
pub enum ListenEvent {
    /// A notification on one of the channels.
    Notification(Notification),
    /// More notifications arrived than were read in time and some were
    /// dropped: whatever they would have told must be assumed.
    Lagged,
    /// The connection ended (server restart, backend terminated, network
    /// lost): nothing more arrives; connect again. Notifications sent
    /// meanwhile are lost.
    Closed(Error),
}

/// A listening connection; closed when dropped.
pub struct Listener {
    rx: mpsc::Receiver<Notification>,
    lagged: Arc<AtomicBool>,
    ended: Arc<Mutex<Option<Error>>>,
    driver: AbortHandle,
    /// Kept so the session stays open while the driver runs.
    _client: tokio_postgres::Client,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("closed", &self.driver.is_finished())
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Opens a connection to `config`'s server and listens on `channels`
    /// (each a plain identifier: lowercase letters, digits and `_`).
    ///
    /// # Errors
    ///
    /// The pool's connection errors (P1001, P1000, P2037...), within
    /// `connect_timeout`; `Parameter` for a channel name that is not a plain
    /// identifier.
    pub async fn connect(config: &PoolConfig, channels: &[&str]) -> Result<Listener, Error> {
        let mut sql = String::new();
        for channel in channels {
            let plain = !channel.is_empty()
                && channel.len() < 64
                && channel
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !plain {
                return Err(Error::Parameter(format!(
                    "cannot listen on '{channel}'; accepted: lowercase letters, digits and '_', at most 63"
                )));
            }
            sql.push_str(&format!("LISTEN {channel};"));
        }
        within_connect_timeout(config, Self::open(config, sql)).await
    }

    async fn open(config: &PoolConfig, listen: String) -> Result<Listener, Error> {
        let pg = pg_config(config);
        let (tx, rx) = mpsc::channel(BUFFER);
        let lagged = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(Mutex::new(None));
        let fail = |e| connect_error(config, e);
        let (client, driver) = match config.host {
            // No TLS over a Unix socket, as for the pool's connections.
            Host::Unix(_) => {
                let (client, conn) = pg.connect(NoTls).await.map_err(fail)?;
                let driver = tokio::spawn(drive(conn, tx, lagged.clone(), ended.clone()));
                (client, driver.abort_handle())
            }
            Host::Tcp(_) => {
                let (client, conn) = pg.connect(tls::connector(config)?).await.map_err(fail)?;
                let driver = tokio::spawn(drive(conn, tx, lagged.clone(), ended.clone()));
                (client, driver.abort_handle())
            }
        };
        let listener = Listener {
            rx,
            lagged,
            ended,
            driver,
            _client: client,
        };
        listener
            ._client
            .batch_execute(&listen)
            .await
            .map_err(|e| connect_error(config, e))?;
        Ok(listener)
    }

    /// The next notification, or why there is none.
    pub async fn next(&mut self) -> ListenEvent {
        if self.lagged.swap(false, Ordering::AcqRel) {
            return ListenEvent::Lagged;
        }
        match self.rx.recv().await {
            Some(n) => ListenEvent::Notification(n),
            None => ListenEvent::Closed(
                self.ended
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
                    .unwrap_or(Error::ConnectionClosed),
            ),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Runs the connection, passing notifications on; ends with the session.
async fn drive<S, T>(
    mut conn: Connection<S, T>,
    tx: mpsc::Sender<Notification>,
    lagged: Arc<AtomicBool>,
    ended: Arc<Mutex<Option<Error>>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(n))) => match tx.try_send(n) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => lagged.store(true, Ordering::Release),
                // Nobody listens any more.
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            },
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %e, "listening connection ended");
                *ended.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(Error::ConnectionClosed);
                return;
            }
            None => return,
        }
    }
}
