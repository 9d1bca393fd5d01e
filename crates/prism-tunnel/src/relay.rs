//! [`relay`]: bytes both ways between a client stream and an upstream, with half-close and
//! resets carried across.
//!
//! No bytes are copied here: the client's bytes are the `Bytes` chunks the stack queued, written
//! to the upstream as they are; the upstream's bytes are read into a buffer whose filled part is
//! handed to the stream without a copy. The read buffer exists only while the upstream has
//! something to read, so an idle connection holds no buffer at all.

use std::future::poll_fn;
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
/// side resets both: the client gets a TCP RST, the upstream is closed abruptly. Returns the
/// bytes moved (client to upstream, upstream to client).
pub async fn relay(mut stream: Stream, mut upstream: Box<dyn Upstream>) -> io::Result<(u64, u64)> {
    let mut up = ToUpstream::default();
    let mut down = ToClient::default();
    let moved = poll_fn(|cx| {
        let up_done = up.poll(cx, &mut stream, &mut *upstream)?.is_ready();
        let down_done = down.poll(cx, &mut stream, &mut *upstream)?.is_ready();
        if up_done && down_done {
            Poll::Ready(Ok((up.moved, down.moved)))
        } else {
            Poll::Pending
        }
    })
    .await;
    match moved {
        Ok(moved) => Ok(moved),
        Err(error) => {
            upstream.reset();
            stream.abort();
            Err(error)
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
