//! [`Link`]: the tokio bridge between the stack and a device adapter.
//!
//! A link is a pair of bounded channels of `Bytes`. [`Link::pair`] makes two ends: the stack
//! takes one, the adapter (TUN, TAP, a test's in-memory client) the other. Each end receives
//! what the other sends. Receiving is batched: one wake-up takes up to [`BATCH`] packets.

use bytes::Bytes;
use tokio::sync::mpsc;

/// Most packets taken from a link in one wake-up.
pub const BATCH: usize = 64;

/// One end of a packet link.
#[derive(Debug)]
pub struct Link {
    inbound: mpsc::Receiver<Bytes>,
    outbound: mpsc::Sender<Bytes>,
}

/// The other end of the link is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the other end of the packet link is closed")]
pub struct LinkClosed;

impl Link {
    /// Two connected ends, each direction buffering up to `capacity` packets.
    pub fn pair(capacity: usize) -> (Link, Link) {
        let (a_tx, a_rx) = mpsc::channel(capacity);
        let (b_tx, b_rx) = mpsc::channel(capacity);
        (
            Link {
                inbound: a_rx,
                outbound: b_tx,
            },
            Link {
                inbound: b_rx,
                outbound: a_tx,
            },
        )
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

#[cfg(test)]
mod tests {
    use super::*;

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
