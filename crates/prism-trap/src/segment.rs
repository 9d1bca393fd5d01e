//! [`classify`]: what an incoming IP packet is.

use std::net::{IpAddr, SocketAddr};

use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket};

/// The addresses of a TCP connection, as seen from the client: `source` is the client,
/// `destination` the address it asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FourTuple {
    /// The client's address and port.
    pub source: SocketAddr,
    /// The original destination address and port.
    pub destination: SocketAddr,
}

/// A well-formed TCP segment's identity and control flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Which connection it belongs to.
    pub tuple: FourTuple,
    /// SYN flag.
    pub syn: bool,
    /// ACK flag.
    pub ack: bool,
    /// RST flag.
    pub rst: bool,
    /// FIN flag.
    pub fin: bool,
    /// It carries data (not only flags and an acknowledgement).
    pub data: bool,
}

impl Segment {
    /// A connection request: SYN without ACK or RST.
    pub fn is_initial_syn(&self) -> bool {
        self.syn && !self.ack && !self.rst
    }
}

/// What an IP packet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet {
    /// A TCP segment whose headers and checksums are valid.
    Tcp(Segment),
    /// Any other IP protocol; `protocol` is the IPv4 protocol or the IPv6 next header.
    Other {
        /// The protocol number.
        protocol: u8,
    },
}

/// Why a packet was refused. Each is a counted drop, never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum Malformed {
    /// Empty, or the IP version nibble is neither 4 nor 6.
    #[error("not an IPv4 or IPv6 packet")]
    Version,
    /// Shorter than its headers say, or a header length field is inconsistent.
    #[error("truncated or inconsistent header")]
    Truncated,
    /// The IPv4 header checksum or the TCP checksum is wrong.
    #[error("bad checksum")]
    Checksum,
    /// An IPv4 fragment; TCP from a kernel client is never fragmented (it uses path-MTU
    /// discovery), and a fragment's ports cannot be read, so fragments are dropped.
    #[error("IPv4 fragment")]
    Fragment,
    /// A TCP segment from or to an address that is not unicast.
    #[error("TCP with a non-unicast address")]
    Address,
}

/// Whether [`classify_with`] checks a packet's checksums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksums {
    /// Verify them: the packet may come from anywhere.
    Verify,
    /// The kernel vouches for them (an offloading TUN's `NEEDS_CSUM` or `DATA_VALID`): a
    /// local socket wrote the data, and its TCP checksum field holds only a partial sum.
    Trusted,
}

/// Classifies one IP packet, verifying its checksums.
pub fn classify(packet: &[u8]) -> Result<Packet, Malformed> {
    classify_with(packet, Checksums::Verify)
}

/// Classifies one IP packet, verifying its checksums unless `checksums` says they are trusted.
pub fn classify_with(packet: &[u8], checksums: Checksums) -> Result<Packet, Malformed> {
    let verify = checksums == Checksums::Verify;
    match packet.first().map(|b| b >> 4) {
        Some(4) => classify_v4(packet, verify),
        Some(6) => classify_v6(packet, verify),
        _ => Err(Malformed::Version),
    }
}

fn classify_v4(bytes: &[u8], verify: bool) -> Result<Packet, Malformed> {
    let ip = Ipv4Packet::new_checked(bytes).map_err(|_| Malformed::Truncated)?;
    if verify && !ip.verify_checksum() {
        return Err(Malformed::Checksum);
    }
    let protocol = ip.next_header();
    if protocol != IpProtocol::Tcp {
        return Ok(Packet::Other {
            protocol: protocol.into(),
        });
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Err(Malformed::Fragment);
    }
    tcp_segment(
        ip.payload(),
        ip.src_addr().into(),
        ip.dst_addr().into(),
        verify,
    )
}

fn classify_v6(bytes: &[u8], verify: bool) -> Result<Packet, Malformed> {
    let ip = Ipv6Packet::new_checked(bytes).map_err(|_| Malformed::Truncated)?;
    let protocol = ip.next_header();
    if protocol != IpProtocol::Tcp {
        return Ok(Packet::Other {
            protocol: protocol.into(),
        });
    }
    tcp_segment(
        ip.payload(),
        ip.src_addr().into(),
        ip.dst_addr().into(),
        verify,
    )
}

fn tcp_segment(
    payload: &[u8],
    src: IpAddress,
    dst: IpAddress,
    verify: bool,
) -> Result<Packet, Malformed> {
    if !src.is_unicast() || !dst.is_unicast() {
        return Err(Malformed::Address);
    }
    let tcp = TcpPacket::new_checked(payload).map_err(|_| Malformed::Truncated)?;
    if verify && !tcp.verify_checksum(&src, &dst) {
        return Err(Malformed::Checksum);
    }
    Ok(Packet::Tcp(Segment {
        tuple: FourTuple {
            source: SocketAddr::new(IpAddr::from(src), tcp.src_port()),
            destination: SocketAddr::new(IpAddr::from(dst), tcp.dst_port()),
        },
        syn: tcp.syn(),
        ack: tcp.ack(),
        rst: tcp.rst(),
        fin: tcp.fin(),
        data: !tcp.payload().is_empty(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SYN from 10.0.0.2:40000 to 93.184.216.34:443, as Linux 6.1 sends it (MSS, SACK-permitted,
    /// timestamps, window scale), checksums valid.
    const SYN_V4: [u8; 60] = [
        0x45, 0x00, 0x00, 0x3c, 0x4a, 0x2b, 0x40, 0x00, 0x40, 0x06, 0x6b, 0xa9, 0x0a, 0x00, 0x00,
        0x02, 0x5d, 0xb8, 0xd8, 0x22, 0x9c, 0x40, 0x01, 0xbb, 0x1b, 0x2c, 0x3d, 0x4e, 0x00, 0x00,
        0x00, 0x00, 0xa0, 0x02, 0xfa, 0xf0, 0x00, 0x00, 0x00, 0x00, 0x02, 0x04, 0x05, 0xb4, 0x04,
        0x02, 0x08, 0x0a, 0x00, 0x01, 0x02, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01, 0x03, 0x03, 0x07,
    ];

    /// `SYN_V4` with both checksums computed.
    fn syn_v4() -> Vec<u8> {
        let mut bytes = SYN_V4.to_vec();
        fill_checksums_v4(&mut bytes);
        bytes
    }

    fn fill_checksums_v4(bytes: &mut [u8]) {
        let mut ip = Ipv4Packet::new_unchecked(&mut *bytes);
        ip.fill_checksum();
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let mut tcp = TcpPacket::new_unchecked(ip.payload_mut());
        tcp.fill_checksum(&src.into(), &dst.into());
    }

    #[test]
    fn ipv4_syn_is_a_tcp_segment_with_its_tuple() {
        let packet = classify(&syn_v4()).unwrap();
        let Packet::Tcp(segment) = packet else {
            panic!("expected TCP, got {packet:?}");
        };
        assert_eq!(segment.tuple.source, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(
            segment.tuple.destination,
            "93.184.216.34:443".parse().unwrap()
        );
        assert!(segment.is_initial_syn());
        assert!(!segment.fin && !segment.rst);
    }

    #[test]
    fn syn_ack_and_rst_are_not_initial_syns() {
        for flags in [0x12u8, 0x06] {
            let mut bytes = SYN_V4.to_vec();
            bytes[33] = flags;
            fill_checksums_v4(&mut bytes);
            let Ok(Packet::Tcp(segment)) = classify(&bytes) else {
                panic!("expected TCP");
            };
            assert!(!segment.is_initial_syn(), "flags {flags:#x}");
        }
    }

    #[test]
    fn trusted_checksums_are_not_verified() {
        let mut bytes = syn_v4();
        bytes[36] ^= 0xff; // the partial sum an offloading TUN leaves in the TCP checksum
        assert_eq!(classify(&bytes), Err(Malformed::Checksum));
        assert!(matches!(
            classify_with(&bytes, Checksums::Trusted),
            Ok(Packet::Tcp(_))
        ));
    }

    #[test]
    fn bad_checksums_are_refused() {
        let mut bytes = syn_v4();
        bytes[10] ^= 0xff; // IPv4 header checksum
        assert_eq!(classify(&bytes), Err(Malformed::Checksum));

        let mut bytes = syn_v4();
        bytes[36] ^= 0xff; // TCP checksum
        assert_eq!(classify(&bytes), Err(Malformed::Checksum));
    }

    #[test]
    fn every_truncation_is_refused_without_panic() {
        let bytes = syn_v4();
        for len in 0..bytes.len() {
            assert!(classify(&bytes[..len]).is_err(), "length {len} accepted");
        }
    }

    #[test]
    fn fragments_and_non_unicast_are_refused() {
        let mut bytes = SYN_V4.to_vec();
        bytes[6] = 0x20; // more fragments
        fill_checksums_v4(&mut bytes);
        assert_eq!(classify(&bytes), Err(Malformed::Fragment));

        let mut bytes = SYN_V4.to_vec();
        bytes[16..20].copy_from_slice(&[255, 255, 255, 255]);
        fill_checksums_v4(&mut bytes);
        assert_eq!(classify(&bytes), Err(Malformed::Address));
    }

    #[test]
    fn other_protocols_are_named() {
        // ICMP echo request 10.0.0.2 -> 10.0.0.1 (Linux ping, 8 bytes of payload).
        let mut bytes = vec![
            0x45, 0x00, 0x00, 0x24, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01, 0x00, 0x00, 0x0a, 0x00,
            0x00, 0x02, 0x0a, 0x00, 0x00, 0x01, 0x08, 0x00, 0xf7, 0xfe, 0x00, 0x01, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        Ipv4Packet::new_unchecked(&mut bytes).fill_checksum();
        assert_eq!(classify(&bytes), Ok(Packet::Other { protocol: 1 }));
    }

    #[test]
    fn ipv6_syn_is_a_tcp_segment() {
        // A SYN from [fd00::2]:40000 to [2001:db8::1]:80, 20-byte TCP header.
        let mut bytes = vec![0u8; 60];
        bytes[0] = 0x60;
        bytes[5] = 20; // payload length
        bytes[6] = 6; // next header: TCP
        bytes[7] = 64;
        bytes[8] = 0xfd;
        bytes[23] = 2;
        bytes[24..28].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        bytes[39] = 1;
        let tcp = &mut bytes[40..];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[12] = 0x50;
        tcp[13] = 0x02;
        tcp[14] = 0xff;
        let mut ip = Ipv6Packet::new_unchecked(&mut bytes);
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        TcpPacket::new_unchecked(ip.payload_mut()).fill_checksum(&src.into(), &dst.into());

        let Ok(Packet::Tcp(segment)) = classify(&bytes) else {
            panic!("expected TCP");
        };
        assert_eq!(segment.tuple.source, "[fd00::2]:40000".parse().unwrap());
        assert_eq!(
            segment.tuple.destination,
            "[2001:db8::1]:80".parse().unwrap()
        );
        assert!(segment.is_initial_syn());

        bytes[5] = 200; // payload length beyond the packet
        assert_eq!(classify(&bytes), Err(Malformed::Truncated));
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = classify(&bytes);
        }
    }
}
