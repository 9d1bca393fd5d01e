//! [`Pool`]: packet buffers of one size, zeroed once and then reused.
//!
//! A super-packet read from or written to an offloading TUN is up to 64 KB. A fresh zeroed
//! buffer for each costs a `memset` of the whole packet and a large allocation, both on every
//! byte that crosses the device; a pooled buffer costs neither. A buffer becomes `Bytes`
//! without a copy ([`Buffer::freeze`]) and comes back to its pool when the last `Bytes` of it
//! drops, wherever that happens.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

/// Buffers of `size` bytes; at most `keep` wait in the pool, the rest are freed.
#[derive(Debug, Clone)]
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    keep: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    pub(crate) fn new(size: usize, keep: usize) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                size,
                keep,
                free: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A buffer from the pool, or a fresh zeroed one when it is empty.
    pub(crate) fn take(&self) -> Buffer {
        let reused = self.shared.lock().pop();
        Buffer {
            data: reused.unwrap_or_else(|| vec![0; self.shared.size]),
            len: self.shared.size,
            shared: Arc::clone(&self.shared),
        }
    }

    /// Buffers waiting in the pool.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.shared.lock().len()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // The list stays whole whatever panicked while it was held: a push or a pop.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One buffer of a [`Pool`], whole until frozen; its contents are whatever the last user left.
#[derive(Debug)]
pub(crate) struct Buffer {
    data: Vec<u8>,
    /// The bytes that are the packet: the whole buffer until [`Buffer::freeze`].
    len: usize,
    shared: Arc<Shared>,
}

impl Buffer {
    /// The whole buffer, to be written into.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// The first `len` bytes as `Bytes` (all of them if `len` is larger), sharing the buffer.
    pub(crate) fn freeze(mut self, len: usize) -> Bytes {
        self.len = len.min(self.data.len());
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        self.data.get(..self.len).unwrap_or_default()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let mut free = self.shared.lock();
        if free.len() < self.shared.keep {
            free.push(std::mem::take(&mut self.data));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_when_its_last_bytes_drops() {
        let pool = Pool::new(16, 2);
        let mut buffer = pool.take();
        buffer.as_mut_slice()[..5].copy_from_slice(b"hello");
        let packet = buffer.freeze(5);
        let part = packet.slice(1..3);
        assert_eq!(&packet[..], b"hello");
        drop(packet);
        assert_eq!(pool.waiting(), 0, "a slice of it is still alive");
        assert_eq!(&part[..], b"el");
        drop(part);
        assert_eq!(pool.waiting(), 1);
        // The same memory, whole again, with what was written into it.
        let mut again = pool.take();
        assert_eq!(&again.as_mut_slice()[..5], b"hello");
        assert_eq!(again.as_mut_slice().len(), 16);
        assert_eq!(pool.waiting(), 0);
    }

    #[test]
    fn no_more_than_keep_wait_in_the_pool() {
        let pool = Pool::new(8, 2);
        let buffers: Vec<_> = (0..5).map(|_| pool.take()).collect();
        drop(buffers);
        assert_eq!(pool.waiting(), 2);
    }

    #[test]
    fn freezing_past_the_end_takes_the_whole_buffer() {
        let pool = Pool::new(4, 1);
        assert_eq!(pool.take().freeze(100).len(), 4);
    }
}
