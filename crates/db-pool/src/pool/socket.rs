//! A server connection's socket, opened by the pool itself (TCP with the
//! options tokio-postgres would set, or the Unix socket), so that it can be
//! shared between tokio-postgres and the direct statement path
//! (`wire.rs`); after TLS is negotiated, the TLS stream over it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{Host, PoolConfig};

/// A server connection's socket.
pub(super) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// TLS over TCP, once negotiated, and the TCP socket's descriptor
    /// again (the TLS stream does not lend it) to shut it down with.
    Tls(Box<TlsSocket>, socket2::Socket),
    /// Moved out for the TLS handshake.
    Handshaking,
}

/// tokio-postgres-rustls's TLS stream (its type is not exported by name).
pub(super) type TlsSocket =
    <<MakeRustlsConnect as MakeTlsConnect<TcpStream>>::TlsConnect as TlsConnect<TcpStream>>::Stream;

fn handshaking() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "TLS handshake in progress")
}

impl Socket {
    /// Connects as tokio-postgres would: every address of the host in turn,
    /// `TCP_NODELAY`, and the configured keepalives and `tcp_user_timeout`.
    pub(super) async fn open(cfg: &PoolConfig) -> io::Result<Socket> {
        let host = match &cfg.host {
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", cfg.port));
                return UnixStream::connect(path).await.map(Socket::Unix);
            }
            Host::Tcp(host) => host,
        };
        let mut last = None;
        for addr in tokio::net::lookup_host((host.as_str(), cfg.port)).await? {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    configure(&stream, cfg)?;
                    return Ok(Socket::Tcp(stream));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "the host name has no address")
        }))
    }

    /// Registers `cx` for the socket's next bytes; `None` when that cannot
    /// be done without reading (TLS may hold decrypted bytes already).
    pub(super) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Option<Poll<io::Result<()>>> {
        match self {
            Socket::Tcp(s) => Some(s.poll_read_ready(cx)),
            Socket::Unix(s) => Some(s.poll_read_ready(cx)),
            Socket::Tls(..) | Socket::Handshaking => None,
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s, _) => Pin::new(s).poll_read(cx, buf),
            Socket::Handshaking => Poll::Ready(Err(handshaking())),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s, _) => Pin::new(s).poll_write(cx, buf),
            Socket::Handshaking => Poll::Ready(Err(handshaking())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s, _) => Pin::new(s).poll_flush(cx),
            Socket::Handshaking => Poll::Ready(Err(handshaking())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s, _) => Pin::new(s).poll_shutdown(cx),
            Socket::Handshaking => Poll::Ready(Ok(())),
        }
    }
}

/// The socket options tokio-postgres sets on the sockets it opens.
fn configure(stream: &TcpStream, cfg: &PoolConfig) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(stream);
    if cfg.keepalives {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(cfg.keepalives_idle)
            .with_interval(cfg.keepalives_interval)
            .with_retries(cfg.keepalives_count);
        socket.set_tcp_keepalive(&keepalive)?;
    }
    if let Some(limit) = cfg.tcp_user_timeout {
        socket.set_tcp_user_timeout(Some(limit))?;
    }
    Ok(())
}
