//! The direct statement path: a connection's socket shared between
//! tokio-postgres's driver task and the caller holding the connection.
//!
//! tokio-postgres hands every statement from the caller's task to the
//! connection's driver task and back through channels: about 11,000
//! instructions per statement counted with callgrind, more than libpq's
//! whole client spends (BENCHMARKS.md, "Instructions per statement"). No
//! crate offers a lighter path on a tokio-postgres connection, so this one
//! is written here: the pool opens every socket itself and gives
//! tokio-postgres a wrapper of it ([`Wire`]), on which tokio-postgres does
//! everything it did before (startup, TLS negotiation, authentication,
//! preparing, simple queries, `BEGIN`/`COMMIT`, pipelined lanes). When the
//! server accepts TLS, the handshake puts the TLS stream (tokio-postgres-
//! rustls's, whose channel binding SCRAM uses) beneath the wrapper, so the
//! wrapper always carries plaintext messages. A cached prepared statement
//! on a checked-out connection borrows the socket ([`Direct::run`]):
//! Bind/Execute/Sync written and the answer read in the caller's own task,
//! as libpq does.
//!
//! The borrow is taken only while tokio-postgres is quiet on the wire: the
//! wrapper counts, frame by frame, the requests tokio-postgres sent that end
//! in ReadyForQuery (Sync, Query) against the ReadyForQuery messages it read.
//! While one of tokio-postgres's answers is still coming (a cancelled
//! caller's, a `prepare` that returned before its ReadyForQuery) the caller
//! takes the normal path. While borrowed, the driver's reads and writes
//! wait; afterwards its read interest is registered again, so a server that
//! closes the connection is still noticed at once. A direct statement
//! abandoned once sent (its caller dropped, `socket_timeout`) has its
//! answer passed over before the driver reads anything, as tokio-postgres
//! passes over the answers of dropped requests; one abandoned while its
//! request was being written leaves the protocol in an unknown state, and
//! the connection is closed for both.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::types::IsNull;
use tokio_postgres::{Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::conn::Want;
use super::params::Param;
use super::socket::Socket;

/// Where a stream of protocol messages is: inside a frame (bytes left) or
/// between frames (a header partly seen). Tracks frames without keeping
/// them: a few instructions per chunk read or written.
#[derive(Default)]
struct Frames {
    header: [u8; 5],
    have: usize,
    left: usize,
    /// The type byte of the frame being passed.
    tag: u8,
}

impl Frames {
    /// Moves over the start of `data`: the rest of the current frame's
    /// body, or (part of) the next header. Returns the bytes passed, and
    /// whether a header was just completed (its type byte is `tag`).
    fn step(&mut self, data: &[u8]) -> (usize, bool) {
        if self.left > 0 {
            let n = self.left.min(data.len());
            self.left -= n;
            return (n, false);
        }
        let n = (5 - self.have).min(data.len());
        self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
        self.have += n;
        if self.have < 5 {
            return (n, false);
        }
        let len = u32::from_be_bytes([
            self.header[1],
            self.header[2],
            self.header[3],
            self.header[4],
        ]);
        self.left = (len as usize).saturating_sub(4);
        self.have = 0;
        self.tag = self.header[0];
        (n, true)
    }

    /// Follows `data`, calling `on_frame` with each frame's type byte.
    fn feed(&mut self, mut data: &[u8], mut on_frame: impl FnMut(u8)) {
        while !data.is_empty() {
            let (n, started) = self.step(data);
            data = &data[n..];
            if started {
                on_frame(self.tag);
            }
        }
    }

    /// Passes over `data` up to the end of the `answers`-th ReadyForQuery
    /// frame, counting `answers` down; returns how many bytes that was.
    fn skip_answers(&mut self, data: &[u8], answers: &mut u32) -> usize {
        let mut used = 0;
        while used < data.len() && *answers > 0 {
            used += self.step(&data[used..]).0;
            // Every step passes at least one byte: between frames now
            // means a frame just ended.
            if self.between_frames() && self.tag == b'Z' {
                *answers -= 1;
            }
        }
        used
    }

    fn between_frames(&self) -> bool {
        self.have == 0 && self.left == 0
    }
}

struct State {
    io: Socket,
    /// Frames are counted once tokio-postgres has finished the startup
    /// exchange (whose first message has no type byte).
    tracking: bool,
    /// Requests tokio-postgres sent whose ReadyForQuery it has not read.
    outstanding: u64,
    /// Statements the pool evicted whose Close tokio-postgres has queued
    /// but not yet written: the Close goes first, as it was asked first.
    closes_queued: u64,
    sent: Frames,
    received: Frames,
    /// The driver wrote bytes it has not flushed yet (tokio-postgres's
    /// codec may still hold the rest of a request).
    unflushed: bool,
    /// Bytes a direct statement read past its ReadyForQuery (a
    /// notification, a FATAL on the idle session): the driver's, handed to
    /// it before anything from the socket.
    unread: BytesMut,
    /// Answers to direct statements whose callers gave up after sending
    /// them: passed over, unseen by the driver, before anything it reads.
    abandoned_answers: u32,
    /// Where the passing over is, frame-wise.
    abandoned_frames: Frames,
    /// A direct statement is using the socket.
    borrowed: bool,
    /// A direct statement was abandoned halfway, or the driver ended: the
    /// connection is lost.
    poisoned: bool,
    /// The driver task's waker, from its last poll that found nothing.
    driver: Option<Waker>,
    /// The driver was turned away while borrowed: wake it afterwards.
    driver_parked: bool,
}

impl State {
    /// Counts the ReadyForQuery frames among what the driver just read.
    fn track_received(&mut self, before: usize, buf: &ReadBuf<'_>) {
        if self.tracking {
            let outstanding = &mut self.outstanding;
            self.received.feed(&buf.filled()[before..], |tag| {
                if tag == b'Z' {
                    *outstanding = outstanding.saturating_sub(1);
                }
            });
        }
    }

    fn remember_driver(&mut self, cx: &Context<'_>) {
        if !self
            .driver
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            self.driver = Some(cx.waker().clone());
        }
    }

    /// The driver may not touch the socket now (borrowed), or ever again
    /// (poisoned).
    fn turn_driver_away(&mut self, cx: &Context<'_>) -> Option<io::Error> {
        if self.poisoned {
            return Some(abandoned());
        }
        if self.borrowed {
            self.remember_driver(cx);
            self.driver_parked = true;
        }
        None
    }
}

fn abandoned() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed: a statement was abandoned halfway through",
    )
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every critical section leaves the state consistent.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// tokio-postgres's end of the socket.
pub(super) struct Wire {
    state: Arc<Mutex<State>>,
    /// Closes the socket when dropped (not the one handed to the TLS
    /// handshake, which lives on as the session's stream).
    armed: bool,
}

impl Wire {
    fn disarm(mut self) -> Arc<Mutex<State>> {
        self.armed = false;
        self.state.clone()
    }
}

impl Drop for Wire {
    /// The driver ended (the session closed, or `Pool::close` aborted it):
    /// the socket closes now, although the pool's end still holds it.
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = lock(&self.state);
        st.poisoned = true;
        let socket = match &st.io {
            Socket::Tcp(s) => socket2::SockRef::from(s),
            Socket::Unix(s) => socket2::SockRef::from(s),
            Socket::Tls(_, tcp) => socket2::SockRef::from(tcp),
            Socket::Handshaking => return,
        };
        // Already closed by the peer: nothing left to do.
        let _ = socket.shutdown(std::net::Shutdown::Both);
    }
}

/// The pool's end: runs statements directly while tokio-postgres is quiet.
pub(super) struct Direct {
    state: Arc<Mutex<State>>,
    /// The request being written, kept for its capacity.
    out: BytesMut,
    /// Bytes read and not yet parsed.
    input: BytesMut,
}

/// The two ends of a socket.
pub(super) fn split(io: Socket) -> (Wire, Direct) {
    let state = Arc::new(Mutex::new(State {
        io,
        tracking: false,
        outstanding: 0,
        closes_queued: 0,
        sent: Frames::default(),
        received: Frames::default(),
        unflushed: false,
        unread: BytesMut::new(),
        abandoned_answers: 0,
        abandoned_frames: Frames::default(),
        borrowed: false,
        poisoned: false,
        driver: None,
        driver_parked: false,
    }));
    let direct = Direct {
        state: state.clone(),
        out: BytesMut::with_capacity(512),
        input: BytesMut::with_capacity(8192),
    };
    (Wire { state, armed: true }, direct)
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if let Some(e) = st.turn_driver_away(cx) {
            return Poll::Ready(Err(e));
        }
        if st.borrowed {
            return Poll::Pending;
        }
        loop {
            let before = buf.filled().len();
            if !st.unread.is_empty() {
                let n = st.unread.len().min(buf.remaining());
                buf.put_slice(&st.unread.split_to(n));
            } else {
                match Pin::new(&mut st.io).poll_read(cx, buf) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Pending => {
                        st.remember_driver(cx);
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                }
            }
            let end = buf.filled().len();
            if st.abandoned_answers > 0 && end > before {
                // An abandoned direct statement's answer comes first: cut
                // it out of what was read.
                let skipped = st
                    .abandoned_frames
                    .skip_answers(&buf.filled()[before..], &mut st.abandoned_answers);
                buf.filled_mut().copy_within(before + skipped..end, before);
                buf.set_filled(end - skipped);
                if buf.filled().len() == before {
                    continue;
                }
            }
            st.track_received(before, buf);
            return Poll::Ready(Ok(()));
        }
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if let Some(e) = st.turn_driver_away(cx) {
            return Poll::Ready(Err(e));
        }
        if st.borrowed {
            return Poll::Pending;
        }
        match Pin::new(&mut st.io).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                st.unflushed = true;
                if st.tracking {
                    let (outstanding, closes) = (&mut st.outstanding, &mut st.closes_queued);
                    // Sync ends an extended-protocol request, Query a simple
                    // one: each is answered by one ReadyForQuery.
                    st.sent.feed(&buf[..n], |tag| match tag {
                        b'S' | b'Q' => *outstanding += 1,
                        b'C' => *closes = closes.saturating_sub(1),
                        _ => {}
                    });
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => {
                st.remember_driver(cx);
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if let Some(e) = st.turn_driver_away(cx) {
            return Poll::Ready(Err(e));
        }
        if st.borrowed {
            return Poll::Pending;
        }
        let flushed = Pin::new(&mut st.io).poll_flush(cx);
        match flushed {
            // tokio-postgres's codec flushes the socket only once it has
            // written everything it holds.
            Poll::Ready(Ok(())) => st.unflushed = false,
            Poll::Pending => st.remember_driver(cx),
            Poll::Ready(Err(_)) => {}
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if st.poisoned {
            return Poll::Ready(Ok(()));
        }
        if st.turn_driver_away(cx).is_none() && st.borrowed {
            return Poll::Pending;
        }
        Pin::new(&mut st.io).poll_shutdown(cx)
    }
}

/// The TLS connector tokio-postgres is given: after tokio-postgres has
/// negotiated TLS on the wrapper, the handshake runs on the socket beneath
/// it (tokio-postgres-rustls's, as before), and the same wrapper, now over
/// the TLS stream, is the session's stream. Its channel binding is the TLS
/// stream's.
pub(super) struct TlsBeneath(
    pub(super) <MakeRustlsConnect as MakeTlsConnect<TcpStream>>::TlsConnect,
);

impl TlsConnect<Wire> for TlsBeneath {
    type Stream = Wire;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<Wire>> + Send>>;

    fn connect(self, wire: Wire) -> Self::Future {
        Box::pin(async move {
            let state = wire.disarm();
            let socket = std::mem::replace(&mut lock(&state).io, Socket::Handshaking);
            let Socket::Tcp(tcp) = socket else {
                return Err(io::Error::other("TLS is negotiated over TCP only"));
            };
            let fd = socket2::SockRef::from(&tcp).try_clone()?;
            let tls = self.0.connect(tcp).await?;
            lock(&state).io = Socket::Tls(Box::new(tls), fd);
            Ok(Wire { state, armed: true })
        })
    }
}

impl tokio_postgres::tls::TlsStream for Wire {
    fn channel_binding(&self) -> ChannelBinding {
        match &lock(&self.state).io {
            Socket::Tls(s, _) => s.channel_binding(),
            _ => ChannelBinding::none(),
        }
    }
}

/// How a direct statement ended.
pub(super) enum Outcome {
    /// The rows (when asked for) and the count of rows affected.
    Done(Vec<Row>, u64),
    /// The server refused the statement; the connection is fine.
    Server(tokio_postgres::Error),
    /// The connection is lost (closed by the server, or a protocol error).
    Lost(io::Error),
}

impl Direct {
    /// tokio-postgres has finished the startup exchange: frames from here on
    /// are counted.
    pub(super) fn start(&self) {
        lock(&self.state).tracking = true;
    }

    /// A statement was evicted from the cache: tokio-postgres queued its
    /// Close, which must reach the server before the next direct statement.
    pub(super) fn closing_statement(&self) {
        lock(&self.state).closes_queued += 1;
    }

    /// Runs `stmt` with `params` on the socket in the caller's task. `None`
    /// when it cannot run directly now (tokio-postgres is still reading an
    /// answer) or its parameters do not fit the statement: the caller then
    /// takes tokio-postgres's path, which also reports bad parameters with
    /// tokio-postgres's own errors.
    pub(super) async fn run(
        &mut self,
        stmt: &Statement,
        params: &[Param<'_>],
        want: Want,
    ) -> Option<Outcome> {
        let Direct { state, out, input } = self;
        out.clear();
        if !encode(out, stmt, params) {
            return None;
        }
        {
            let mut st = lock(state);
            let quiet = st.tracking
                && st.outstanding == 0
                && st.closes_queued == 0
                && !st.unflushed
                && st.unread.is_empty()
                && st.abandoned_answers == 0
                && st.sent.between_frames()
                && st.received.between_frames();
            if !quiet || st.borrowed || st.poisoned {
                return None;
            }
            st.borrowed = true;
        }
        let mut borrow = Borrow {
            state,
            input,
            sent: false,
            finished: false,
            lost: false,
        };
        let want_rows = matches!(want, Want::Rows);
        let outcome = exchange(&mut borrow, out, stmt, want_rows).await;
        borrow.lost = matches!(outcome, Outcome::Lost(_));
        borrow.finished = !borrow.lost;
        if borrow.finished && !borrow.input.is_empty() {
            // Read past the answer: the rest is the driver's.
            let rest = borrow.input.split();
            lock(state).unread.extend_from_slice(&rest);
        }
        drop(borrow);
        Some(outcome)
    }
}

/// Bind (unnamed portal, binary results), Execute, Sync; `false` when the
/// parameters do not fit the statement.
fn encode(out: &mut BytesMut, stmt: &Statement, params: &[Param<'_>]) -> bool {
    let types = stmt.params();
    if params.len() != types.len() {
        return false;
    }
    let formats = params
        .iter()
        .zip(types)
        .map(|(p, ty)| p.encode_format(ty) as i16);
    let bound = frontend::bind(
        "",
        stmt.name(),
        formats,
        params.iter().zip(types),
        |(p, ty), buf| match p.to_sql_checked(ty, buf) {
            Ok(IsNull::No) => Ok(postgres_protocol::IsNull::No),
            Ok(IsNull::Yes) => Ok(postgres_protocol::IsNull::Yes),
            Err(e) => Err(e),
        },
        Some(1),
        out,
    );
    if bound.is_err() || frontend::execute("", 0, out).is_err() {
        return false;
    }
    frontend::sync(out);
    true
}

/// Writes the request and reads its answer up to ReadyForQuery.
async fn exchange(
    borrow: &mut Borrow<'_>,
    out: &[u8],
    stmt: &Statement,
    want_rows: bool,
) -> Outcome {
    let state = borrow.state;
    let mut written = 0;
    while written < out.len() {
        let wrote = std::future::poll_fn(|cx| {
            Pin::new(&mut lock(state).io).poll_write(cx, &out[written..])
        })
        .await;
        match wrote {
            Ok(0) => return Outcome::Lost(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) => return Outcome::Lost(e),
        }
    }
    // Sends what TLS still holds (nothing to do on a plain socket).
    let flushed = std::future::poll_fn(|cx| Pin::new(&mut lock(state).io).poll_flush(cx)).await;
    if let Err(e) = flushed {
        return Outcome::Lost(e);
    }
    borrow.sent = true;
    let input = &mut *borrow.input;
    let mut rows = Vec::new();
    let mut affected = 0;
    let mut refused = None;
    loop {
        let message = match Message::parse(input) {
            Ok(Some(message)) => message,
            Ok(None) => {
                if let Err(e) = read_more(state, input).await {
                    return Outcome::Lost(e);
                }
                continue;
            }
            Err(e) => return Outcome::Lost(e),
        };
        match message {
            Message::BindComplete | Message::EmptyQueryResponse => {}
            Message::DataRow(body) => {
                if want_rows {
                    match Row::new(stmt.clone(), body) {
                        Ok(row) => rows.push(row),
                        Err(e) => return Outcome::Lost(io::Error::other(e)),
                    }
                }
            }
            Message::CommandComplete(body) => {
                affected = body
                    .tag()
                    .ok()
                    .and_then(|tag| tag.rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
            }
            Message::ErrorResponse(body) => {
                refused.get_or_insert_with(|| tokio_postgres::Error::db(body));
            }
            Message::ReadyForQuery(_) => {
                return match refused {
                    Some(e) => Outcome::Server(e),
                    None => Outcome::Done(rows, affected),
                };
            }
            // Logged as tokio-postgres's driver logs them.
            Message::NoticeResponse(body) => log_notice(&body),
            // What tokio-postgres's driver would pass to a `Connection`
            // poller, which the pool does not have.
            Message::ParameterStatus(_) | Message::NotificationResponse(_) => {}
            // A statement that is not a query (COPY ... TO STDOUT): refused
            // as tokio-postgres refuses it, once its answer has passed.
            Message::CopyOutResponse(_) | Message::CopyData(_) | Message::CopyDone => {
                refused.get_or_insert_with(tokio_postgres::Error::unexpected_message);
            }
            // COPY ... FROM STDIN waits for data this path has not got
            // (tokio-postgres would wait for ever): the connection goes.
            _ => {
                return Outcome::Lost(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unexpected message from the server",
                ))
            }
        }
    }
}

/// Logs a notice ("WARNING: there is no transaction in progress") as
/// tokio-postgres's driver does.
fn log_notice(body: &postgres_protocol::message::backend::NoticeResponseBody) {
    let (mut severity, mut message) = (String::new(), String::new());
    let mut fields = body.fields();
    while let Ok(Some(field)) = fields.next() {
        match field.type_() {
            b'S' => severity = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            _ => {}
        }
    }
    tracing::info!("{severity}: {message}");
}

/// Reads what the socket has into `input`; end of stream is an error.
async fn read_more(state: &Mutex<State>, input: &mut BytesMut) -> io::Result<()> {
    if input.capacity() - input.len() < 4096 {
        input.reserve(8192);
    }
    let n = std::future::poll_fn(|cx| {
        let mut st = lock(state);
        tokio_util::io::poll_read_buf(Pin::new(&mut st.io), cx, input)
    })
    .await?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Gives the socket back to the driver when a direct statement ends,
/// however it ends.
struct Borrow<'a> {
    state: &'a Mutex<State>,
    /// What was read and not yet parsed (from a frame's start).
    input: &'a mut BytesMut,
    /// The whole request is on the wire.
    sent: bool,
    /// The answer was read to its ReadyForQuery.
    finished: bool,
    /// The connection failed under it (closed, or a protocol error).
    lost: bool,
}

impl Drop for Borrow<'_> {
    fn drop(&mut self) {
        let mut guard = lock(self.state);
        let st = &mut *guard;
        st.borrowed = false;
        let abandoned = !self.finished;
        if self.lost || (abandoned && !self.sent) {
            // Lost, or given up halfway through writing: the protocol
            // state is gone.
            st.poisoned = true;
        } else if abandoned {
            // The caller gave up after sending: its answer is passed over
            // (from what was read of it already) before the driver reads,
            // and the connection goes on, as with tokio-postgres.
            st.abandoned_answers += 1;
            st.abandoned_frames = Frames::default();
            let skipped = st
                .abandoned_frames
                .skip_answers(self.input, &mut st.abandoned_answers);
            let rest = self.input.split_off(skipped);
            st.unread.extend_from_slice(&rest);
            self.input.clear();
        }
        let Some(driver) = st.driver.as_ref() else {
            return;
        };
        if abandoned
            || st.poisoned
            || std::mem::take(&mut st.driver_parked)
            || !st.unread.is_empty()
        {
            driver.wake_by_ref();
            return;
        }
        // This caller's reads took the socket's read interest from the
        // driver: register the driver's again, or wake it if something
        // (a notice, the server closing) is already there, or may be (TLS).
        match st.io.poll_read_ready(&mut Context::from_waker(driver)) {
            Some(Poll::Pending) => {}
            _ => driver.wake_by_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_followed_across_any_split() {
        // Sync, Query "SELECT 1", Parse, Sync, cut into chunks of every
        // size: the same four frames seen each time.
        let mut wire = Vec::new();
        wire.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        wire.push(b'Q');
        wire.extend_from_slice(&13u32.to_be_bytes());
        wire.extend_from_slice(b"SELECT 1\0");
        wire.extend_from_slice(&[b'P', 0, 0, 0, 6, 0, 0]);
        wire.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        for chunk in 1..wire.len() {
            let mut frames = Frames::default();
            let mut tags = Vec::new();
            for piece in wire.chunks(chunk) {
                frames.feed(piece, |t| tags.push(t));
            }
            assert_eq!(tags, b"SQPS", "chunks of {chunk}");
            assert!(frames.between_frames());
        }
        let mut frames = Frames::default();
        frames.feed(&wire[..7], |_| {});
        assert!(!frames.between_frames());
    }

    #[test]
    fn an_abandoned_answer_is_passed_over_to_its_ready_for_query_exactly() {
        // BindComplete, DataRow, CommandComplete, ReadyForQuery: the answer
        // passed over; then a NoticeResponse that is the driver's.
        let mut answer = Vec::new();
        answer.extend_from_slice(&[b'2', 0, 0, 0, 4]);
        answer.extend_from_slice(&[b'D', 0, 0, 0, 10, 0, 1, 0, 0, 0, 0]);
        answer.extend_from_slice(&[b'C', 0, 0, 0, 13]);
        answer.extend_from_slice(b"SELECT 1\0");
        answer.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        let mut wire = answer.clone();
        wire.extend_from_slice(&[b'N', 0, 0, 0, 4]);
        for chunk in 1..wire.len() {
            let mut frames = Frames::default();
            let mut answers = 1;
            let mut passed = 0;
            for piece in wire.chunks(chunk) {
                passed += frames.skip_answers(piece, &mut answers);
            }
            assert_eq!(passed, answer.len(), "chunks of {chunk}");
            assert_eq!(answers, 0);
        }
    }
}
