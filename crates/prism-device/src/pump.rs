//! The task between a device that reads and writes whole packets (a TUN or TAP, by name or by
//! descriptor) and the device's end of a [`Link`].
//!
//! Reading makes the one copy from the kernel: a packet is read into a pooled buffer that
//! becomes `Bytes` without another copy; a small one (an ACK) is copied out instead, so that it
//! does not hold a buffer sized for the largest packet, and so is every packet of a device
//! without offload, whose reads are an MTU at most.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::pool::Pool;
use crate::{BATCH, Link, vnet};

/// Read buffers kept for reuse: 1 MiB of them with offload's 64 KB reads.
const READ_BUFFERS: usize = 16;
/// A packet that fills less than this share of its read buffer is copied out of it.
const COPIED_BELOW: usize = 4;
/// Devices whose largest read is smaller (no offload: an MTU) copy every packet out of one
/// reused buffer: a small allocation and copy, which costs about what a share of the zeroed
/// arena they used before did, and less than taking and returning a pooled buffer.
const POOLED_FROM: usize = 16 * 1024;

/// A device that moves one packet (or frame) per call.
pub(crate) trait PacketIo: Send + Sync + 'static {
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<usize>> + Send;

    /// Writes a batch of packets, emptying it, and counts those the kernel refused in
    /// `refused`; an error is one that ends the device. The default writes one packet per
    /// call.
    fn send_batch(
        &self,
        batch: &mut Vec<Bytes>,
        refused: &AtomicU64,
    ) -> impl Future<Output = io::Result<()>> + Send {
        send_each(self, batch, refused)
    }
}

/// Writes a batch one packet per call, emptying it.
pub(crate) async fn send_each<D: PacketIo + ?Sized>(
    device: &D,
    batch: &mut Vec<Bytes>,
    refused: &AtomicU64,
) -> io::Result<()> {
    for packet in batch.drain(..) {
        if let Err(error) = device.send(&packet).await {
            count_refused(error, packet.len(), refused)?;
        }
    }
    Ok(())
}

/// Counts a write error that concerns only the packet written (one the kernel finds malformed
/// or too large: that packet is lost, the device lives on); any other is returned.
pub(crate) fn count_refused(error: io::Error, len: usize, refused: &AtomicU64) -> io::Result<()> {
    if !refused_packet(&error) {
        return Err(error);
    }
    refused.fetch_add(1, Ordering::Relaxed);
    debug!(%error, len, "device refused a packet; dropped");
    Ok(())
}

/// A write error that concerns only the packet written, not the device: one the kernel finds
/// malformed or too large, or has no buffer for (utun's `ENOBUFS`).
fn refused_packet(error: &io::Error) -> bool {
    use nix::errno::Errno;
    let refused = [Errno::EINVAL, Errno::EMSGSIZE, Errno::ENOBUFS].map(|e| e as i32);
    error
        .raw_os_error()
        .is_some_and(|code| refused.contains(&code))
}

/// Pumps packets between `device` and `link` until either side closes. `largest` is the
/// largest buffer one read may return. The task ends with the device error that stopped it,
/// or `Ok` once everything sent on the link before it closed is written: when the stack stops,
/// its last packets (FINs, RSTs) still reach the device. Packets the kernel refuses are
/// counted in `refused`. With `split`, the device reads virtio-net frames and the link carries
/// plain packets: each frame read is made plain ([`vnet::to_plain`]; one that cannot be is
/// counted in `refused` too, never expected from a kernel).
pub(crate) fn spawn<D: PacketIo>(
    device: D,
    link: Link,
    largest: usize,
    refused: Arc<AtomicU64>,
    split: bool,
) -> JoinHandle<io::Result<()>> {
    let (mut inbound, outbound) = link.split();
    let device = Arc::new(device);
    let reader = Arc::clone(&device);
    let writer = device;
    let unreadable = Arc::clone(&refused);
    tokio::spawn(async move {
        let read = async move {
            let pool = Pool::new(largest, READ_BUFFERS);
            let mut buffer = pool.take();
            let mut plain = Vec::new();
            loop {
                let n = reader.recv(buffer.as_mut_slice()).await?;
                if n == 0 {
                    // A TUN never reads empty; a descriptor at its end does, and would read
                    // empty again at once.
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the device reached its end",
                    ));
                }
                let packet = if largest < POOLED_FROM || n < largest / COPIED_BELOW {
                    Bytes::copy_from_slice(buffer.as_ref().get(..n).unwrap_or_default())
                } else {
                    std::mem::replace(&mut buffer, pool.take()).freeze(n)
                };
                if !split {
                    plain.push(packet);
                } else if let Err(error) = vnet::to_plain(&packet, &mut plain) {
                    unreadable.fetch_add(1, Ordering::Relaxed);
                    debug!(%error, len = n, "unreadable frame from the device; dropped");
                }
                for packet in plain.drain(..) {
                    if outbound.send(packet).await.is_err() {
                        return Ok::<(), io::Error>(());
                    }
                }
            }
        };
        let write = async move {
            let mut batch = Vec::with_capacity(BATCH);
            while inbound.recv_many(&mut batch, BATCH).await > 0 {
                writer.send_batch(&mut batch, &refused).await?;
            }
            Ok::<(), io::Error>(())
        };
        tokio::pin!(read, write);
        tokio::select! {
            r = &mut read => match r {
                // The stack is gone: nothing more is read, but what it sent last is written.
                Ok(()) => write.await,
                Err(error) => Err(error),
            },
            w = &mut write => w,
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use std::sync::Mutex;

    /// A device that always has a packet to read and yields before each write, like a busy
    /// TUN whose kernel side keeps sending while Prism stops.
    #[derive(Default)]
    struct Busy {
        written: Mutex<Vec<Vec<u8>>>,
    }

    impl PacketIo for Arc<Busy> {
        async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
            tokio::task::yield_now().await;
            buf[..3].copy_from_slice(b"ack");
            Ok(3)
        }

        async fn send(&self, packet: &[u8]) -> io::Result<usize> {
            tokio::task::yield_now().await;
            self.written.lock().unwrap().push(packet.to_vec());
            Ok(packet.len())
        }
    }

    #[tokio::test]
    async fn what_the_stack_sent_last_is_written_after_it_is_gone() {
        let device = Arc::new(Busy::default());
        let (stack, ours) = Link::pair(1024);
        let task = spawn(Arc::clone(&device), ours, 64, Arc::default(), false);
        for i in 0..500u16 {
            stack
                .send(Bytes::from(i.to_be_bytes().to_vec()))
                .await
                .unwrap();
        }
        // The stack stops: its end is dropped with 500 packets still queued for the device.
        drop(stack);
        task.await.unwrap().unwrap();
        assert_eq!(device.written.lock().unwrap().len(), 500);
    }

    /// A device whose reads alternate between a packet that fills most of the buffer and an
    /// ACK-sized one, each filled with its own number.
    #[derive(Default)]
    struct Mixed {
        reads: std::sync::atomic::AtomicU8,
    }

    impl PacketIo for Arc<Mixed> {
        async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
            let i = self.reads.fetch_add(1, Ordering::Relaxed);
            let len = if i % 2 == 0 { buf.len() - 10 } else { 40 };
            buf[..len].fill(i);
            Ok(len)
        }

        async fn send(&self, packet: &[u8]) -> io::Result<usize> {
            Ok(packet.len())
        }
    }

    #[tokio::test]
    async fn packets_read_into_reused_buffers_keep_their_bytes() {
        let (mut stack, ours) = Link::pair(1024);
        let largest = 64 * 1024;
        let task = spawn(
            Arc::new(Mixed::default()),
            ours,
            largest,
            Arc::default(),
            false,
        );
        // Fifty reads are queued at once: more large ones than the pool keeps, none dropped
        // before all are taken, so a buffer handed out twice would show another's number.
        let mut packets = Vec::new();
        while packets.len() < 50 {
            stack.recv_batch(&mut packets).await.unwrap();
        }
        drop(stack);
        task.abort();
        for (i, packet) in packets.iter().take(50).enumerate() {
            let len = if i % 2 == 0 { largest - 10 } else { 40 };
            assert_eq!(packet.len(), len, "packet {i}");
            assert!(
                packet.iter().all(|&b| usize::from(b) == i),
                "packet {i}'s bytes"
            );
        }
    }
}
