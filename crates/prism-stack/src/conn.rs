//! The state one connection shares between the stack task and the application, and the two
//! handles the application holds: [`Request`] (answer it) and [`Stream`] (use it).
//!
//! The stack owns the smoltcp socket; the application owns a `Stream`. Between them sit two
//! bounded byte queues in [`State`]. Either side changes the state under a short lock and then
//! tells the other: the application by queueing the connection's id on the stack's wake
//! channel ([`Shared::notify`]), the stack by waking the application's task.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use prism_trap::Handshake;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

/// A connection's id. Never reused, so a late wake-up for a finished connection is harmless.
pub(crate) type ConnId = u64;

/// Why the application turned a connection down. The stack answers the client accordingly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The upstream refused the connection (or the application will not say why): TCP RST.
    Refused,
    /// The upstream host is unreachable.
    HostUnreachable,
    /// The upstream network is unreachable.
    NetworkUnreachable,
    /// Policy forbids the connection.
    Prohibited,
    /// The upstream did not answer in time.
    TimedOut,
}

/// The application's answer to a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    Pending,
    Accepted,
    Rejected(Rejection),
}

/// Everything both sides of a connection look at.
#[derive(Debug)]
pub(crate) struct State {
    /// Client bytes waiting for the application, and their total length.
    pub(crate) inbound: VecDeque<Bytes>,
    pub(crate) inbound_len: usize,
    /// The stack stopped taking client bytes because `inbound` was full.
    pub(crate) inbound_blocked: bool,
    /// The client's FIN arrived and everything before it is in `inbound`.
    pub(crate) inbound_fin: bool,
    /// Application bytes waiting to enter the socket, and their total length.
    pub(crate) outbound: VecDeque<Bytes>,
    pub(crate) outbound_len: usize,
    /// The application shut its write side: FIN once `outbound` is sent.
    pub(crate) outbound_shutdown: bool,
    pub(crate) answer: Answer,
    /// The application dropped its handle.
    pub(crate) app_gone: bool,
    /// The application asked for a reset.
    pub(crate) abort: bool,
    /// The connection was reset; reads and writes fail.
    pub(crate) reset: bool,
    /// The stack is shutting down or has stopped; reads and writes fail.
    pub(crate) shutdown: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

impl State {
    fn new() -> Self {
        Self {
            inbound: VecDeque::new(),
            inbound_len: 0,
            inbound_blocked: false,
            inbound_fin: false,
            outbound: VecDeque::new(),
            outbound_len: 0,
            outbound_shutdown: false,
            answer: Answer::Pending,
            app_gone: false,
            abort: false,
            reset: false,
            shutdown: false,
            read_waker: None,
            write_waker: None,
        }
    }

    /// Why reads and writes fail, if they do.
    fn failure(&self) -> Option<io::Error> {
        if self.shutdown {
            Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection ended: Prism's stack is shutting down",
            ))
        } else if self.reset {
            Some(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset by the client",
            ))
        } else {
            None
        }
    }

    /// Takes the wakers to call once the lock is released.
    pub(crate) fn take_wakers(&mut self, read: bool, write: bool) -> Wakers {
        Wakers(
            read.then(|| self.read_waker.take()).flatten(),
            write.then(|| self.write_waker.take()).flatten(),
        )
    }
}

/// Wakers taken under the lock, called after it.
#[derive(Debug, Default)]
pub(crate) struct Wakers(Option<Waker>, Option<Waker>);

impl Wakers {
    pub(crate) fn wake(self) {
        if let Some(w) = self.0 {
            w.wake();
        }
        if let Some(w) = self.1 {
            w.wake();
        }
    }
}

/// The shared half of a connection.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) id: ConnId,
    /// Bytes each queue may hold.
    pub(crate) capacity: usize,
    queued: AtomicBool,
    wake: mpsc::UnboundedSender<ConnId>,
    state: Mutex<State>,
}

impl Shared {
    pub(crate) fn new(id: ConnId, capacity: usize, wake: mpsc::UnboundedSender<ConnId>) -> Self {
        Self {
            id,
            capacity,
            queued: AtomicBool::new(false),
            wake,
            state: Mutex::new(State::new()),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks the stack to look at this connection (once, however often it is called before the
    /// stack gets to it).
    pub(crate) fn notify(&self) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            // The stack is gone only when it has stopped; nothing is left to tell it then.
            let _ = self.wake.send(self.id);
        }
    }

    /// The stack took the notice; later changes need a new one.
    pub(crate) fn clear_notice(&self) {
        self.queued.store(false, Ordering::Release);
    }
}

/// A new connection, offered to the application. Answer it with [`accept`](Request::accept)
/// or [`reject`](Request::reject); dropping it unanswered rejects it as
/// [`Rejection::Refused`].
#[derive(Debug)]
pub struct Request {
    shared: Arc<Shared>,
    answered: bool,
    source: SocketAddr,
    destination: SocketAddr,
    handshake: Handshake,
}

impl Request {
    pub(crate) fn new(
        shared: Arc<Shared>,
        source: SocketAddr,
        destination: SocketAddr,
        handshake: Handshake,
    ) -> Self {
        Self {
            shared,
            answered: false,
            source,
            destination,
            handshake,
        }
    }

    /// The client's address and port.
    pub fn source(&self) -> SocketAddr {
        self.source
    }

    /// The address and port the client asked for.
    pub fn destination(&self) -> SocketAddr {
        self.destination
    }

    /// How this connection's handshake is answered.
    pub fn handshake(&self) -> Handshake {
        self.handshake
    }

    /// Whether the stack gave up on this connection before the application answered: the
    /// client reset it, its handshake timed out, or the stack is stopping. An answer then
    /// changes nothing.
    pub fn is_cancelled(&self) -> bool {
        let state = self.shared.lock();
        state.reset || state.shutdown
    }

    /// Resolves once [`is_cancelled`](Request::is_cancelled) is true. An application that
    /// connects upstream before answering waits on both and drops the connect if this comes
    /// first, so connections the stack no longer holds do not keep upstream sockets open.
    pub async fn cancelled(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.shared.lock();
            if state.reset || state.shutdown {
                Poll::Ready(())
            } else {
                // Nobody reads before the request is answered: the read waker is free.
                state.read_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
    }

    /// Takes the connection: its bytes flow through the returned stream.
    pub fn accept(mut self) -> Stream {
        self.answer(Answer::Accepted);
        Stream {
            shared: Arc::clone(&self.shared),
            source: self.source,
            destination: self.destination,
        }
    }

    /// Turns the connection down; the client is told as `why` says.
    pub fn reject(mut self, why: Rejection) {
        self.answer(Answer::Rejected(why));
    }

    /// Takes back a request that never reached the application, without touching the state
    /// (the stack, which holds the lock, resets the connection itself).
    pub(crate) fn withdraw(mut self) {
        self.answered = true;
    }

    fn answer(&mut self, answer: Answer) {
        self.answered = true;
        self.shared.lock().answer = answer;
        self.shared.notify();
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.answered {
            self.answer(Answer::Rejected(Rejection::Refused));
        }
    }
}

/// An accepted connection as a byte stream.
///
/// Reading returns the client's bytes, then end-of-file when the client sends FIN. Writing
/// sends bytes to the client; [`shutdown`](tokio::io::AsyncWriteExt::shutdown) sends FIN
/// after them, and reading may go on. A reset from the client makes reads and writes fail with
/// `ConnectionReset`; [`Stream::abort`] resets the client. When the stack shuts down (or stops
/// for any reason), reads and writes fail at once with `ConnectionAborted`. Dropping the
/// stream closes it gracefully (FIN after the written bytes) and discards what the client still
/// sends.
#[derive(Debug)]
pub struct Stream {
    shared: Arc<Shared>,
    source: SocketAddr,
    destination: SocketAddr,
}

impl Stream {
    /// The client's address and port.
    pub fn source(&self) -> SocketAddr {
        self.source
    }

    /// The address and port the client asked for.
    pub fn destination(&self) -> SocketAddr {
        self.destination
    }

    /// Resets the connection: the client gets a TCP RST.
    pub fn abort(self) {
        self.shared.lock().abort = true;
        self.shared.notify();
    }

    /// Whether the connection ended abruptly: reset, or ended by the stack's shutdown.
    pub fn is_reset(&self) -> bool {
        let state = self.shared.lock();
        state.reset || state.shutdown
    }
}

impl Stream {
    /// The next chunk of the client's bytes, whole and without a copy: `None` at the client's
    /// FIN. The zero-copy counterpart of `AsyncRead`, for relays that hand `Bytes` on.
    pub fn poll_read_bytes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        let shared = &self.shared;
        let mut state = shared.lock();
        if let Some(error) = state.failure() {
            return Poll::Ready(Err(error));
        }
        let Some(chunk) = state.inbound.pop_front() else {
            if state.inbound_fin {
                return Poll::Ready(Ok(None));
            }
            state.read_waker = Some(cx.waker().clone());
            return Poll::Pending;
        };
        state.inbound_len -= chunk.len();
        let blocked = state.inbound_blocked;
        drop(state);
        if blocked {
            shared.notify();
        }
        Poll::Ready(Ok(Some(chunk)))
    }

    /// Queues as much of `data` for the client as there is room for, without a copy: what is
    /// taken is split off the front of `data`. Returns how many bytes were taken (at least
    /// one, unless `data` is empty). The zero-copy counterpart of `AsyncWrite::poll_write`.
    pub fn poll_write_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        let len = data.len();
        self.queue_outbound(cx, len, |n| data.split_to(n))
    }

    /// Queues up to `len` bytes for the client, as much as there is room for: `take(n)` gives
    /// the chunk of the first `n`. Returns `n`; `Pending` (waker kept) while the queue is full.
    fn queue_outbound(
        &self,
        cx: &Context<'_>,
        len: usize,
        take: impl FnOnce(usize) -> Bytes,
    ) -> Poll<io::Result<usize>> {
        let shared = &self.shared;
        let mut state = shared.lock();
        if let Some(error) = state.failure() {
            return Poll::Ready(Err(error));
        }
        if state.outbound_shutdown {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        let room = shared.capacity.saturating_sub(state.outbound_len);
        if room == 0 {
            state.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(len);
        if n > 0 {
            state.outbound_len += n;
            state.outbound.push_back(take(n));
        }
        drop(state);
        shared.notify();
        Poll::Ready(Ok(n))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let shared = &self.shared;
        let mut state = shared.lock();
        if let Some(error) = state.failure() {
            return Poll::Ready(Err(error));
        }
        if state.inbound.is_empty() {
            if state.inbound_fin {
                return Poll::Ready(Ok(()));
            }
            state.read_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut copied = 0;
        while buf.remaining() > 0 {
            let Some(chunk) = state.inbound.front_mut() else {
                break;
            };
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(chunk.get(..n).unwrap_or_default());
            chunk.advance(n);
            if chunk.is_empty() {
                state.inbound.pop_front();
            }
            copied += n;
        }
        state.inbound_len -= copied;
        let blocked = state.inbound_blocked;
        drop(state);
        if blocked {
            shared.notify();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.queue_outbound(cx, data.len(), |n| {
            Bytes::copy_from_slice(data.get(..n).unwrap_or_default())
        })
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.shared.lock();
        if let Some(error) = state.failure() {
            return Poll::Ready(Err(error));
        }
        if state.outbound.is_empty() {
            return Poll::Ready(Ok(()));
        }
        state.write_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.shared.lock();
        if let Some(error) = state.failure() {
            return Poll::Ready(Err(error));
        }
        state.outbound_shutdown = true;
        drop(state);
        self.shared.notify();
        Poll::Ready(Ok(()))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.shared.lock().app_gone = true;
        self.shared.notify();
    }
}
