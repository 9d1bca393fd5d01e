//! [`Link`]: the tokio bridge between the stack and a device adapter.
//!
//! A link is a pair of bounded channels of `Bytes`. [`Link::pair`] makes two ends: the stack
//! takes one, the adapter (TUN, TAP, a test's in-memory client) the other. Each end receives
//! what the other sends. Receiving is batched: one wake-up takes up to [`BATCH`] packets.
//!
//! A link knows its [`Framing`]: whether each buffer is a plain IP packet or a virtio-net frame
//! of an offloading TUN. It is fixed when the pair is made, and whoever reads from the link
//! (the stack, the relay) takes it from there, so the two ends cannot disagree.

use bytes::Bytes;
use tokio::sync::mpsc;

/// Most packets taken from a link in one wake-up.
pub const BATCH: usize = 64;

/// What each buffer on a link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Framing {
    /// A plain IP packet with complete checksums.
    #[default]
    Plain,
    /// A virtio-net header ([`crate::vnet`]) before an IP packet: TCP super-packets of up to
    /// 64 KB and partial checksums pass both ways (an offloading TUN).
    Virtio,
}

impl Framing {
    /// Frames a plain packet as this link carries it (one copy for [`Framing::Virtio`]). For
    /// packets built outside smoltcp: ICMP errors, relayed packets.
    pub fn frame(self, packet: Bytes) -> Bytes {
        match self {
            Framing::Plain => packet,
            Framing::Virtio => crate::vnet::frame(&packet),
        }
    }

    /// The bytes this link carries before a plain packet with complete checksums: none, or a
    /// plain virtio-net header. A producer that has room in front of its packet writes them
    /// there instead of having [`Framing::frame`] copy the packet.
    pub fn prefix(self) -> &'static [u8] {
        const PLAIN: [u8; crate::vnet::HEADER_LEN] = [0; crate::vnet::HEADER_LEN];
        match self {
            Framing::Plain => &[],
            Framing::Virtio => &PLAIN,
        }
    }
}

/// One end of a packet link.
#[derive(Debug)]
pub struct Link {
    inbound: mpsc::Receiver<Bytes>,
    outbound: mpsc::Sender<Bytes>,
    framing: Framing,
}

/// The other end of the link is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the other end of the packet link is closed")]
pub struct LinkClosed;

impl Link {
    /// Two connected ends carrying plain IP packets, each direction buffering up to
    /// `capacity` packets.
    pub fn pair(capacity: usize) -> (Link, Link) {
        Link::framed_pair(capacity, Framing::Plain)
    }

    /// Two connected ends carrying buffers framed as `framing` says.
    pub fn framed_pair(capacity: usize, framing: Framing) -> (Link, Link) {
        let capacity = capacity.max(1);
        let (a_tx, a_rx) = mpsc::channel(capacity);
        let (b_tx, b_rx) = mpsc::channel(capacity);
        (
            Link {
                inbound: a_rx,
                outbound: b_tx,
                framing,
            },
            Link {
                inbound: b_rx,
                outbound: a_tx,
                framing,
            },
        )
    }

    /// What each buffer on this link is.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Waits for packets and appends up to [`BATCH`] of them to `batch`. Returns how many were
    /// added, or `LinkClosed` when the other end is gone and nothing is left.
    pub async fn recv_batch(&mut self, batch: &mut Vec<Bytes>) -> Result<usize, LinkClosed> {
        match self.inbound.recv_many(batch, BATCH).await {
            0 => Err(LinkClosed),
            n => Ok(n),
        }
    }

    /// Sends one packet, waiting while the other end is [`BATCH`]-full behind.
    pub async fn send(&self, packet: Bytes) -> Result<(), LinkClosed> {
        self.outbound.send(packet).await.map_err(|_| LinkClosed)
    }

    /// Another sender into the other end, for a task that writes to it beside this end's owner
    /// (the relay task beside the stack).
    pub fn sender(&self) -> mpsc::Sender<Bytes> {
        self.outbound.clone()
    }

    /// Splits the end into its receiving and sending halves, for adapters that read and write
    /// from different tasks.
    pub fn split(self) -> (mpsc::Receiver<Bytes>, mpsc::Sender<Bytes>) {
        (self.inbound, self.outbound)
    }
}

/// Packets taken off a link by its reader for someone else (the stack diverts everything that
/// is not TCP to the relay), with a way to send back into the device beside the reader.
#[derive(Debug)]
pub struct Diverted {
    /// The diverted buffers, framed as the link carries them.
    pub packets: mpsc::Receiver<Bytes>,
    /// Into the device's end of the same link.
    pub to_device: mpsc::Sender<Bytes>,
    /// What the link carries.
    pub framing: Framing,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_what_framing_puts_before_a_packet() {
        for framing in [Framing::Plain, Framing::Virtio] {
            let framed = framing.frame(Bytes::from_static(b"packet"));
            assert_eq!(framed[..framing.prefix().len()], *framing.prefix());
            assert_eq!(&framed[framing.prefix().len()..], b"packet");
        }
        assert_eq!(
            Framing::Virtio.prefix(),
            crate::vnet::Header::PLAIN.to_bytes()
        );
    }

    #[tokio::test]
    async fn each_end_receives_what_the_other_sends_in_batches() {
        let (a, mut b) = Link::pair(256);
        for i in 0..100u8 {
            a.send(Bytes::from(vec![i])).await.unwrap();
        }
        let mut batch = Vec::new();
        assert_eq!(b.recv_batch(&mut batch).await, Ok(BATCH));
        assert_eq!(b.recv_batch(&mut batch).await, Ok(100 - BATCH));
        let bytes: Vec<u8> = batch.iter().map(|p| p[0]).collect();
        assert_eq!(bytes, (0..100).collect::<Vec<u8>>());
    }

    #[tokio::test]
    async fn closing_one_end_ends_the_other() {
        let (a, mut b) = Link::pair(4);
        drop(a);
        let mut batch = Vec::new();
        assert_eq!(b.recv_batch(&mut batch).await, Err(LinkClosed));
        assert_eq!(b.send(Bytes::new()).await, Err(LinkClosed));
    }
}
