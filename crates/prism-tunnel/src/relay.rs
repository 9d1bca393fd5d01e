//! [`relay`]: bytes both ways between a client stream and an upstream, with half-close and
//! resets carried across.
//!
//! No bytes are copied here: the client's bytes are the `Bytes` chunks the stack queued, written
//! to the upstream as they are; the upstream's bytes are read into a buffer whose filled part is
//! handed to the stream without a copy. The read buffer exists only while the upstream has
//! something to read, so an idle connection holds no buffer at all.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use prism_stack::Stream;
use tokio::io::AsyncWrite;
use tokio_util::io::poll_read_buf;

use crate::Upstream;

/// Bytes read from the upstream at most at once: within jemalloc's and glibc's thread caches.
const READ_CHUNK: usize = 32 * 1024;
/// A read buffer with less room than this left is replaced rather than read into.
const MIN_ROOM: usize = 2 * 1024;

/// Copies bytes both ways until both directions have ended. End-of-file on one side becomes a
/// FIN (shutdown) on the other, and the other direction goes on. A reset or error on either
/// side resets both: the client gets a TCP RST, the upstream is closed abruptly. The future
/// returns the bytes moved (client to upstream, upstream to client).
pub fn relay(stream: Stream, upstream: Box<dyn Upstream>) -> Relay {
    Relay {
        ends: Some((stream, upstream)),
        up: ToUpstream::default(),
        down: ToClient::default(),
    }
}

/// The future of [`relay`]: a plain struct rather than an `async fn`'s state machine, because
/// it lives as long as its connection (about 200 bytes, where the compiler's layout of the same
/// code kept copies of its arguments and took 352).
#[must_use = "futures do nothing unless polled"]
pub struct Relay {
    /// The client's stream and the upstream; taken when the relay ends (to reset both on an
    /// error), so a finished relay holds neither.
    ends: Option<(Stream, Box<dyn Upstream>)>,
    up: ToUpstream,
    down: ToClient,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("stream", &self.ends.as_ref().map(|(stream, _)| stream))
            .finish_non_exhaustive()
    }
}

impl Future for Relay {
    type Output = io::Result<(u64, u64)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Relay { ends, up, down } = self.get_mut();
        let Some((stream, upstream)) = ends else {
            return Poll::Ready(Err(io::Error::other("the relay has ended")));
        };
        let mut both = || -> io::Result<bool> {
            let up_done = up.poll(cx, stream, &mut **upstream)?.is_ready();
            let down_done = down.poll(cx, stream, &mut **upstream)?.is_ready();
            Ok(up_done && down_done)
        };
        match both() {
            Ok(true) => {
                *ends = None;
                Poll::Ready(Ok((up.moved, down.moved)))
            }
            Ok(false) => Poll::Pending,
            Err(error) => {
                if let Some((stream, upstream)) = ends.take() {
                    tracing::debug!(target = %stream.destination(), %error, "relay ended with an error");
                    upstream.reset();
                    stream.abort();
                }
                Poll::Ready(Err(error))
            }
        }
    }
}

/// Client to upstream.
#[derive(Debug, Default)]
struct ToUpstream {
    /// The chunk being written.
    chunk: Bytes,
    /// Something was written since the last flush.
    unflushed: bool,
    done: bool,
    moved: u64,
}

impl ToUpstream {
    fn poll<U: Upstream + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut Stream,
        upstream: &mut U,
    ) -> Poll<io::Result<()>> {
        while !self.done {
            while !self.chunk.is_empty() {
                let n = ready!(Pin::new(&mut *upstream).poll_write(cx, &self.chunk))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.chunk.advance(n);
                self.moved += n as u64;
                self.unflushed = true;
            }
            match stream.poll_read_bytes(cx)? {
                Poll::Ready(Some(chunk)) => self.chunk = chunk,
                Poll::Ready(None) => {
                    // The client's FIN: the upstream gets one after everything before it.
                    ready!(Pin::new(&mut *upstream).poll_shutdown(cx))?;
                    self.done = true;
                }
                Poll::Pending => {
                    // Nothing more for now: push out what an upstream may be buffering.
                    if self.unflushed {
                        ready!(Pin::new(&mut *upstream).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Upstream to client.
#[derive(Debug, Default)]
struct ToClient {
    /// Where the upstream's bytes are read; empty (unallocated) while the upstream is idle.
    buffer: BytesMut,
    /// Bytes read and not yet taken by the stream.
    chunk: Bytes,
    done: bool,
    moved: u64,
}

impl ToClient {
    fn poll<U: Upstream + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut Stream,
        upstream: &mut U,
    ) -> Poll<io::Result<()>> {
        while !self.done {
            while !self.chunk.is_empty() {
                let n = ready!(stream.poll_write_bytes(cx, &mut self.chunk))?;
                self.moved += n as u64;
            }
            if upstream.poll_read_ready(cx)?.is_pending() {
                // Idle: give the buffer back (what was read from it lives on in the stream).
                self.buffer = BytesMut::new();
                return Poll::Pending;
            }
            if self.buffer.capacity() - self.buffer.len() < MIN_ROOM {
                self.buffer = BytesMut::with_capacity(READ_CHUNK);
            }
            // Reads into the spare capacity, uninitialised, without a copy (tokio-util does the
            // bookkeeping that would take `unsafe` here).
            let n = ready!(poll_read_buf(
                Pin::new(&mut *upstream),
                cx,
                &mut self.buffer
            ))?;
            if n == 0 {
                // The upstream's FIN: the client gets one after everything before it.
                self.buffer = BytesMut::new();
                ready!(Pin::new(&mut *stream).poll_shutdown(cx))?;
                self.done = true;
            } else {
                self.chunk = self.buffer.split_to(n).freeze();
            }
        }
        Poll::Ready(Ok(()))
    }
}
