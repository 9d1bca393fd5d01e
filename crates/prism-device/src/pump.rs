//! The task between a device that reads and writes whole packets (a TUN or TAP, by name or by
//! descriptor) and the device's end of a [`Link`].
//!
//! Reading makes the one copy from the kernel: packets are read into slices of a large shared
//! buffer that become `Bytes` without another copy.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::{BATCH, Link};

/// Bytes read ahead in one shared buffer before a fresh one is allocated.
const READ_ARENA: usize = 256 * 1024;

/// A device that moves one packet (or frame) per call.
pub(crate) trait PacketIo: Send + Sync + 'static {
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<usize>> + Send;
}

/// A write error that concerns only the packet written, not the device.
fn refused_packet(error: &io::Error) -> bool {
    const EINVAL: i32 = 22;
    const EMSGSIZE: i32 = 90;
    matches!(error.raw_os_error(), Some(EINVAL | EMSGSIZE))
}

/// Pumps packets between `device` and `link` until either side closes. `largest` is the
/// largest buffer one read may return. The task ends with the device error that stopped it,
/// or `Ok` when the link closed. Packets the kernel refuses are counted in `refused`.
pub(crate) fn spawn<D: PacketIo>(
    device: D,
    link: Link,
    largest: usize,
    refused: Arc<AtomicU64>,
) -> JoinHandle<io::Result<()>> {
    let (mut inbound, outbound) = link.split();
    let device = Arc::new(device);
    let reader = Arc::clone(&device);
    let writer = device;
    tokio::spawn(async move {
        let read = async move {
            let mut arena = BytesMut::zeroed(READ_ARENA);
            loop {
                if arena.len() < largest {
                    arena = BytesMut::zeroed(READ_ARENA.max(4 * largest));
                }
                let n = reader.recv(&mut arena).await?;
                if n == 0 {
                    // An empty read is a descriptor at its end (or a zero-length packet, which
                    // carries nothing either way).
                    continue;
                }
                let packet = arena.split_to(n).freeze();
                if outbound.send(packet).await.is_err() {
                    return Ok::<(), io::Error>(());
                }
            }
        };
        let write = async move {
            let mut batch = Vec::with_capacity(BATCH);
            while inbound.recv_many(&mut batch, BATCH).await > 0 {
                for packet in batch.drain(..) {
                    if let Err(error) = writer.send(&packet).await {
                        if !refused_packet(&error) {
                            return Err(error);
                        }
                        // One packet the kernel will not take (a frame it finds malformed, or
                        // too large): that packet is lost, the device lives on.
                        refused.fetch_add(1, Ordering::Relaxed);
                        debug!(%error, len = packet.len(), "device refused a packet; dropped");
                    }
                }
            }
            Ok::<(), io::Error>(())
        };
        tokio::select! {
            r = read => r,
            w = write => w,
        }
    })
}
