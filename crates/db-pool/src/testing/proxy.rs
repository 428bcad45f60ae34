//! A fault-injecting TCP proxy between a pool and its server, for tests:
//! listens on `127.0.0.1:0`, forwards to the server, and can be switched at
//! any time between
//!
//! - [`Fault::Pass`]: bytes flow both ways;
//! - [`Fault::Latency`]: every chunk waits this long before it is forwarded;
//! - [`Fault::Blackhole`]: connections (open and new) stay open but nothing
//!   is forwarded either way and nothing is answered, as with a frozen
//!   server (SIGSTOP) or a network partition; back to `Pass`, held bytes
//!   flow again, as TCP retransmission would deliver them;
//! - [`Fault::Reset`]: every open connection is reset (RST to both sides)
//!   and new ones are reset as soon as they are accepted.
//!
//! Hand-written (about a hundred lines) so it runs inside the test's own
//! runtime and is switched by a plain method call; toxiproxy, the usual
//! tool, is a separate server driven over HTTP.
//!
//! What a user-space proxy cannot do is lose TCP segments: its kernel still
//! acknowledges data and keepalive probes while it forwards nothing, so a
//! blackhole here looks to the client like a server that stopped answering,
//! not like a vanished host. For that, [`FaultProxy::vanish`] drops the
//! proxy's packets in the kernel (an `iptables` rule on its port, so root):
//! probes and retransmissions then go unanswered, as with a host that is
//! gone.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Forward every chunk after this delay.
    Latency(Duration),
    /// Forward nothing, answer nothing, close nothing.
    Blackhole,
    /// Reset every connection, open or new.
    Reset,
}

/// A running proxy; stops (closing every connection) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Fault>,
    clients: Arc<Mutex<Vec<SocketAddr>>>,
}

impl FaultProxy {
    /// A proxy in front of the server `url` names (its host and port), in
    /// [`Fault::Pass`] mode.
    ///
    /// # Panics
    ///
    /// When the URL names no TCP host or the listener cannot be bound.
    pub async fn start(url: &str) -> FaultProxy {
        let parsed = url::Url::parse(url)
            .unwrap_or_else(|e| panic!("FaultProxy: the server URL does not parse ({e})"));
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| panic!("FaultProxy: the server URL names no TCP host"));
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let upstream = tokio::net::lookup_host((host, parsed.port().unwrap_or(5432)))
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .unwrap_or_else(|| panic!("FaultProxy: cannot resolve the server's host"));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("FaultProxy: cannot listen on 127.0.0.1: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("FaultProxy: no local address: {e}"));
        let (mode, rx) = watch::channel(Fault::Pass);
        let clients = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(accept(listener, upstream, rx, clients.clone()));
        FaultProxy {
            addr,
            mode,
            clients,
        }
    }

    /// Switches the fault, for open connections and new ones.
    pub fn set(&self, fault: Fault) {
        self.mode.send_replace(fault);
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` with its host and port replaced by the proxy's.
    ///
    /// # Panics
    ///
    /// When `url` does not parse.
    pub fn url(&self, url: &str) -> String {
        let mut u = url::Url::parse(url)
            .unwrap_or_else(|e| panic!("FaultProxy: the URL does not parse ({e})"));
        let ok = u.set_host(Some(&self.addr.ip().to_string())).is_ok()
            && u.set_port(Some(self.addr.port())).is_ok();
        assert!(ok, "FaultProxy: cannot point the URL at the proxy");
        u.into()
    }

    /// Drops every packet to and from the proxy's port in the kernel (two
    /// `iptables` rules on the loopback interface) until the returned guard
    /// is dropped: the proxy looks like a host that vanished, so neither
    /// keepalive probes nor sent data are acknowledged.
    ///
    /// # Errors
    ///
    /// When the rules cannot be added (not root, no `iptables`): the
    /// message says which.
    pub fn vanish(&self) -> Result<Vanished, String> {
        let port = self.addr.port();
        let mut vanished = Vanished { port, rules: 0 };
        for side in ["--dport", "--sport"] {
            iptables("-I", side, port)?;
            vanished.rules += 1;
        }
        Ok(vanished)
    }

    /// The client-side addresses of every connection accepted so far, in
    /// order (the pool's sockets, for tests that inspect them).
    pub fn clients(&self) -> Vec<SocketAddr> {
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Packets to and from a proxy's port are dropped while this lives
/// (see [`FaultProxy::vanish`]).
#[derive(Debug)]
pub struct Vanished {
    port: u16,
    /// How many of the two rules were added (removed again on drop).
    rules: usize,
}

impl Drop for Vanished {
    fn drop(&mut self) {
        for side in ["--dport", "--sport"].into_iter().take(self.rules) {
            if let Err(e) = iptables("-D", side, self.port) {
                eprintln!("FaultProxy: {e}");
            }
        }
    }
}

/// Adds (`-I`) or deletes (`-D`) the rule dropping TCP packets on the
/// loopback interface whose `side` (`--dport`/`--sport`) is `port`.
fn iptables(action: &str, side: &str, port: u16) -> Result<(), String> {
    let port = port.to_string();
    let out = std::process::Command::new("iptables")
        .args(["-w", action, "INPUT", "-i", "lo", "-p", "tcp", side, &port])
        .args(["-m", "comment", "--comment", "db-pool test: vanished host"])
        .args(["-j", "DROP"])
        .output()
        .map_err(|e| {
            format!("cannot run iptables ({e}); the vanished-host tests need it and root")
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables {action} INPUT {side} {port} failed (root is needed): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Fault>,
    clients: Arc<Mutex<Vec<SocketAddr>>>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, peer)) = accepted else { continue };
                clients.lock().unwrap_or_else(PoisonError::into_inner).push(peer);
                tokio::spawn(relay(client, upstream, mode.clone()));
            }
            // The proxy was dropped.
            changed = mode.changed() => if changed.is_err() { return },
        }
    }
}

/// Closes with RST instead of FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// One connection: forwards while the mode allows, until either side
/// closes, the mode resets it, or the proxy is dropped.
async fn relay(mut client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Fault>) {
    let mut server: Option<TcpStream> = None;
    let mut from_client = vec![0u8; 16 * 1024];
    let mut from_server = vec![0u8; 16 * 1024];
    loop {
        let fault = *mode.borrow_and_update();
        let delay = match fault {
            Fault::Reset => {
                reset(client);
                if let Some(server) = server {
                    reset(server);
                }
                return;
            }
            Fault::Blackhole => {
                // Hold both sockets; read nothing, send nothing.
                if mode.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Fault::Pass => Duration::ZERO,
            Fault::Latency(d) => d,
        };
        let upstream_conn = match &mut server {
            Some(s) => s,
            None => match TcpStream::connect(upstream).await {
                Ok(s) => server.insert(s),
                Err(_) => return reset(client),
            },
        };
        tokio::select! {
            changed = mode.changed() => if changed.is_err() { return },
            n = client.read(&mut from_client) => {
                let Ok(n @ 1..) = n else { return };
                tokio::time::sleep(delay).await;
                if upstream_conn.write_all(&from_client[..n]).await.is_err() {
                    return;
                }
            }
            n = upstream_conn.read(&mut from_server) => {
                let Ok(n @ 1..) = n else { return };
                tokio::time::sleep(delay).await;
                if client.write_all(&from_server[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
