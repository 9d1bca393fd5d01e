//! DNS without a relay: each UDP query to port 53 is carried over TCP (RFC 7766: a two-byte
//! length before each message) through the engine's connector, to the address the client
//! asked (or the one configured), and the answer goes back to the client as UDP, from the
//! address it asked. Nothing else about DNS is read: the query and the answer pass as opaque
//! bytes, and nothing is kept once the answer is sent.
//!
//! Each query has its own upstream connection and task; at most [`IN_FLIGHT`] at a time (the
//! relay task counts what does not fit). The tasks are this forwarder's: when it is dropped
//! (the engine stops), they end with it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prism_device::Framing;
use prism_tunnel::{Connector, Target};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpAddress, IpProtocol, IpRepr, Ipv4Packet, Ipv6Packet, UdpPacket, UdpRepr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::debug;

/// Queries answered at once at most.
pub(crate) const IN_FLIGHT: usize = 256;
/// How long a query may take, connect included.
const PATIENCE: Duration = Duration::from_secs(5);

/// One query, as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Query {
    /// The client's address and port.
    pub(crate) client: SocketAddr,
    /// The resolver the client asked.
    pub(crate) resolver: SocketAddr,
    /// The DNS message.
    pub(crate) message: Bytes,
}

/// Reads a UDP query out of an IP packet; `None` if it is not one.
pub(crate) fn parse(packet: &Bytes) -> Option<Query> {
    let (src, dst, offset) = match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let ip = Ipv4Packet::new_checked(packet.as_ref()).ok()?;
            (ip.next_header() == IpProtocol::Udp).then_some(())?;
            let end = usize::from(ip.total_len());
            (
                IpAddr::from(ip.src_addr()),
                IpAddr::from(ip.dst_addr()),
                (usize::from(ip.header_len()), end),
            )
        }
        Some(6) => {
            let ip = Ipv6Packet::new_checked(packet.as_ref()).ok()?;
            (ip.next_header() == IpProtocol::Udp).then_some(())?;
            let end = ip.header_len() + usize::from(ip.payload_len());
            (
                IpAddr::from(ip.src_addr()),
                IpAddr::from(ip.dst_addr()),
                (ip.header_len(), end),
            )
        }
        _ => return None,
    };
    let udp_bytes = packet.slice(offset.0..offset.1.min(packet.len()));
    let udp = UdpPacket::new_checked(udp_bytes.as_ref()).ok()?;
    let start = offset.0 + 8;
    let end = offset.0 + usize::from(udp.len());
    Some(Query {
        client: SocketAddr::new(src, udp.src_port()),
        resolver: SocketAddr::new(dst, udp.dst_port()),
        message: packet.get(start..end).map(|_| packet.slice(start..end))?,
    })
}

/// The UDP answer to `query`, from the resolver the client asked, with its checksums.
pub(crate) fn answer(query: &Query, message: &[u8]) -> Option<Vec<u8>> {
    let (src, dst) = (
        IpAddress::from(query.resolver.ip()),
        IpAddress::from(query.client.ip()),
    );
    if src.version() != dst.version() {
        return None;
    }
    let udp = UdpRepr {
        src_port: query.resolver.port(),
        dst_port: query.client.port(),
    };
    let payload_len = udp.header_len() + message.len();
    let ip = IpRepr::new(src, dst, IpProtocol::Udp, payload_len, 64);
    let checksums = ChecksumCapabilities::default();
    let mut bytes = vec![0u8; ip.buffer_len()];
    ip.emit(&mut bytes[..], &checksums);
    let header_len = ip.header_len();
    udp.emit(
        &mut UdpPacket::new_unchecked(bytes.get_mut(header_len..)?),
        &src,
        &dst,
        message.len(),
        |payload| payload.copy_from_slice(message),
        &checksums,
    );
    Some(bytes)
}

/// Answers queries until `queries` ends. `resolver`, when set, is asked instead of the address
/// each client asked.
pub(crate) async fn run(
    mut queries: mpsc::Receiver<Bytes>,
    connector: Arc<dyn Connector>,
    resolver: Option<SocketAddr>,
    to_device: mpsc::Sender<Bytes>,
    framing: Framing,
) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            packet = queries.recv() => {
                let Some(packet) = packet else { break };
                let Some(query) = parse(&packet) else { continue };
                if tasks.len() >= IN_FLIGHT {
                    debug!(client = %query.client, "too many DNS queries in flight; dropped");
                    continue;
                }
                let connector = Arc::clone(&connector);
                let to_device = to_device.clone();
                tasks.spawn(async move {
                    let upstream = resolver.unwrap_or(query.resolver);
                    match tokio::time::timeout(PATIENCE, ask(&*connector, upstream, &query.message)).await {
                        Ok(Ok(message)) => {
                            if let Some(reply) = answer(&query, &message) {
                                let _ = to_device.send(framing.frame(Bytes::from(reply))).await;
                            }
                        }
                        Ok(Err(error)) => debug!(%upstream, %error, "DNS over TCP failed"),
                        Err(_) => debug!(%upstream, "DNS over TCP timed out"),
                    }
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

/// One query over TCP: the length, the message; the answer's length, the answer.
async fn ask(
    connector: &dyn Connector,
    resolver: SocketAddr,
    message: &[u8],
) -> std::io::Result<Vec<u8>> {
    let len = u16::try_from(message.len())
        .map_err(|_| std::io::Error::other("a DNS message longer than 65535 bytes"))?;
    let mut upstream = connector
        .connect(&Target::Ip(resolver))
        .await
        .map_err(std::io::Error::other)?;
    let mut framed = Vec::with_capacity(2 + message.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    upstream.write_all(&framed).await?;
    upstream.flush().await?;
    let mut len = [0u8; 2];
    upstream.read_exact(&mut len).await?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    upstream.read_exact(&mut answer).await?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
    use super::*;

    fn query_packet(client: SocketAddr, resolver: SocketAddr, message: &[u8]) -> Bytes {
        let query = Query {
            // Built as an answer from the client to the resolver: the same shape.
            client: resolver,
            resolver: client,
            message: Bytes::copy_from_slice(message),
        };
        Bytes::from(answer(&query, message).unwrap())
    }

    #[test]
    fn a_query_is_read_and_answered_from_the_address_asked() {
        for (client, resolver) in [
            ("10.0.0.2:40000", "192.0.2.53:53"),
            ("[fd00::2]:40000", "[2001:db8::53]:53"),
        ] {
            let (client, resolver): (SocketAddr, SocketAddr) =
                (client.parse().unwrap(), resolver.parse().unwrap());
            let packet = query_packet(client, resolver, b"\x12\x34query");
            let query = parse(&packet).unwrap();
            assert_eq!((query.client, query.resolver), (client, resolver));
            assert_eq!(&query.message[..], b"\x12\x34query");

            let reply = Bytes::from(answer(&query, b"\x12\x34answer").unwrap());
            let back = parse(&reply).unwrap();
            assert_eq!((back.client, back.resolver), (resolver, client));
            assert_eq!(&back.message[..], b"\x12\x34answer");
            // The checksums verify.
            if client.is_ipv4() {
                let ip = Ipv4Packet::new_checked(&reply[..]).unwrap();
                assert!(ip.verify_checksum());
                let udp = UdpPacket::new_checked(ip.payload()).unwrap();
                assert!(udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
            } else {
                let ip = Ipv6Packet::new_checked(&reply[..]).unwrap();
                let udp = UdpPacket::new_checked(ip.payload()).unwrap();
                assert!(udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
            }
        }
    }

    #[test]
    fn junk_is_not_a_query() {
        assert!(parse(&Bytes::from_static(&[0x45, 0, 0])).is_none());
        assert!(parse(&Bytes::new()).is_none());
    }
}
