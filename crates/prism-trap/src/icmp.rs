//! [`unreachable`]: the ICMP (or ICMPv6) "destination unreachable" error a router would send
//! for a packet, so a client's `connect()` fails with the right error instead of hanging.
//!
//! The error carries the original IP header and the start of the TCP header (ports and
//! sequence number): that is what the client's kernel matches to its connecting socket.

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr,
    IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
};

/// Why a destination cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// No route to the network: the client sees ENETUNREACH.
    Network,
    /// The host does not answer or cannot be reached: EHOSTUNREACH.
    Host,
    /// Policy forbids it (ICMP "communication administratively prohibited"): EHOSTUNREACH
    /// over IPv4, EACCES over IPv6.
    Prohibited,
}

/// Hop limit of the errors Prism sends.
const HOP_LIMIT: u8 = 64;
/// Bytes of the original packet an ICMPv6 error may quote (so it fits the IPv6 minimum MTU).
const ICMPV6_QUOTE: usize = 1280 - 40 - 8 - 40;

/// The error for `original` (an IPv4 or IPv6 packet), from its destination to its source.
/// `None` if `original` is not a well-formed IP packet.
pub fn unreachable(original: &[u8], why: Unreachable) -> Option<Vec<u8>> {
    match original.first().map(|b| b >> 4) {
        Some(4) => unreachable_v4(original, why),
        Some(6) => unreachable_v6(original, why),
        _ => None,
    }
}

fn unreachable_v4(original: &[u8], why: Unreachable) -> Option<Vec<u8>> {
    let reason = match why {
        Unreachable::Network => Icmpv4DstUnreachable::NetUnreachable,
        Unreachable::Host => Icmpv4DstUnreachable::HostUnreachable,
        Unreachable::Prohibited => Icmpv4DstUnreachable::CommProhibited,
    };
    unreachable_v4_with(original, reason)
}

fn unreachable_v4_with(original: &[u8], reason: Icmpv4DstUnreachable) -> Option<Vec<u8>> {
    let ip = Ipv4Packet::new_checked(original).ok()?;
    let header = Ipv4Repr {
        src_addr: ip.src_addr(),
        dst_addr: ip.dst_addr(),
        next_header: ip.next_header(),
        payload_len: ip.payload().len(),
        hop_limit: ip.hop_limit(),
    };
    // RFC 792: the original header and the first 8 bytes of its payload.
    let data = ip.payload().get(..8).unwrap_or(ip.payload());
    let icmp = Icmpv4Repr::DstUnreachable {
        reason,
        header,
        data,
    };
    let outer = Ipv4Repr {
        src_addr: ip.dst_addr(),
        dst_addr: ip.src_addr(),
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: HOP_LIMIT,
    };
    let caps = ChecksumCapabilities::default();
    let mut bytes = vec![0u8; outer.buffer_len() + icmp.buffer_len()];
    let mut packet = Ipv4Packet::new_unchecked(&mut bytes[..]);
    outer.emit(&mut packet, &caps);
    icmp.emit(
        &mut Icmpv4Packet::new_unchecked(packet.payload_mut()),
        &caps,
    );
    Some(bytes)
}

fn unreachable_v6(original: &[u8], why: Unreachable) -> Option<Vec<u8>> {
    let ip = Ipv6Packet::new_checked(original).ok()?;
    let (header, data) = quote_v6(&ip);
    let icmp = Icmpv6Repr::DstUnreachable {
        reason: match why {
            Unreachable::Network => Icmpv6DstUnreachable::NoRoute,
            Unreachable::Host => Icmpv6DstUnreachable::AddrUnreachable,
            Unreachable::Prohibited => Icmpv6DstUnreachable::AdminProhibit,
        },
        header,
        data,
    };
    emit_v6(&ip, &icmp)
}

/// What an ICMPv6 error quotes of `ip`: its header, and as much of its payload as keeps the
/// error within the IPv6 minimum MTU.
fn quote_v6<'a>(ip: &Ipv6Packet<&'a [u8]>) -> (Ipv6Repr, &'a [u8]) {
    let header = Ipv6Repr {
        src_addr: ip.src_addr(),
        dst_addr: ip.dst_addr(),
        next_header: ip.next_header(),
        payload_len: ip.payload().len(),
        hop_limit: ip.hop_limit(),
    };
    let payload: &'a [u8] = ip.payload();
    (header, payload.get(..ICMPV6_QUOTE).unwrap_or(payload))
}

/// An ICMPv6 error about `ip`, from its destination back to its source.
fn emit_v6(ip: &Ipv6Packet<&[u8]>, icmp: &Icmpv6Repr<'_>) -> Option<Vec<u8>> {
    let outer = Ipv6Repr {
        src_addr: ip.dst_addr(),
        dst_addr: ip.src_addr(),
        next_header: IpProtocol::Icmpv6,
        payload_len: icmp.buffer_len(),
        hop_limit: HOP_LIMIT,
    };
    let caps = ChecksumCapabilities::default();
    let mut bytes = vec![0u8; outer.buffer_len() + icmp.buffer_len()];
    let mut packet = Ipv6Packet::new_unchecked(&mut bytes[..]);
    outer.emit(&mut packet);
    icmp.emit(
        &outer.src_addr,
        &outer.dst_addr,
        &mut Icmpv6Packet::new_unchecked(packet.payload_mut()),
        &caps,
    );
    Some(bytes)
}

/// The error telling the source of `original` that it is larger than `mtu` allows: ICMP
/// "fragmentation needed" with the next-hop MTU (RFC 1191) for IPv4, "packet too big" for
/// IPv6, so path-MTU discovery shrinks what it sends. `None` if `original` is not IP.
pub fn too_big(original: &[u8], mtu: u16) -> Option<Vec<u8>> {
    match original.first().map(|b| b >> 4) {
        Some(4) => {
            let mut error = unreachable_v4_with(original, Icmpv4DstUnreachable::FragRequired)?;
            let mut ip = Ipv4Packet::new_checked(&mut error[..]).ok()?;
            let mut icmp = Icmpv4Packet::new_checked(ip.payload_mut()).ok()?;
            // RFC 1191 puts the next-hop MTU in bytes 6-7 of the ICMP header, the field smoltcp
            // names the echo sequence number for echo messages.
            icmp.set_echo_seq_no(mtu);
            icmp.fill_checksum();
            Some(error)
        }
        Some(6) => {
            let ip = Ipv6Packet::new_checked(original).ok()?;
            let (header, data) = quote_v6(&ip);
            let icmp = Icmpv6Repr::PktTooBig {
                mtu: u32::from(mtu),
                header,
                data,
            };
            emit_v6(&ip, &icmp)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{IpAddress, TcpPacket};

    /// A SYN 10.0.0.2:40000 -> 192.0.2.1:443, checksums filled.
    fn syn_v4() -> Vec<u8> {
        let mut bytes = vec![
            0x45, 0x00, 0x00, 0x28, 0x00, 0x01, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 10, 0, 0, 2,
            192, 0, 2, 1, 0x9c, 0x40, 0x01, 0xbb, 0x11, 0x22, 0x33, 0x44, 0, 0, 0, 0, 0x50, 0x02,
            0xff, 0xff, 0, 0, 0, 0,
        ];
        let mut ip = Ipv4Packet::new_unchecked(&mut bytes[..]);
        ip.fill_checksum();
        let (s, d) = (ip.src_addr(), ip.dst_addr());
        TcpPacket::new_unchecked(ip.payload_mut())
            .fill_checksum(&IpAddress::from(s), &IpAddress::from(d));
        bytes
    }

    #[test]
    fn ipv4_error_goes_back_to_the_source_and_quotes_the_syn() {
        for (why, code) in [
            (Unreachable::Network, 0),
            (Unreachable::Host, 1),
            (Unreachable::Prohibited, 13),
        ] {
            let error = unreachable(&syn_v4(), why).unwrap();
            let ip = Ipv4Packet::new_checked(&error[..]).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!(ip.src_addr().octets(), [192, 0, 2, 1]);
            assert_eq!(ip.dst_addr().octets(), [10, 0, 0, 2]);
            assert_eq!(ip.next_header(), IpProtocol::Icmp);
            let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
            assert!(icmp.verify_checksum());
            assert_eq!((u8::from(icmp.msg_type()), icmp.msg_code()), (3, code));
            // The quoted packet: the original header, then ports and sequence number.
            let quoted = Ipv4Packet::new_unchecked(icmp.data());
            assert_eq!(quoted.src_addr().octets(), [10, 0, 0, 2]);
            assert_eq!(&icmp.data()[20..28], &syn_v4()[20..28]);
        }
    }

    #[test]
    fn ipv6_error_quotes_the_whole_syn() {
        let mut syn = vec![0u8; 60];
        syn[0] = 0x60;
        syn[5] = 20;
        syn[6] = 6;
        syn[7] = 64;
        syn[8] = 0xfd;
        syn[23] = 2;
        syn[24] = 0x20;
        syn[25] = 0x01;
        syn[39] = 1;
        syn[40..44].copy_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
        syn[52] = 0x50;
        syn[53] = 0x02;
        let error = unreachable(&syn, Unreachable::Host).unwrap();
        let ip = Ipv6Packet::new_checked(&error[..]).unwrap();
        assert_eq!(
            ip.dst_addr(),
            Ipv6Packet::new_unchecked(&syn[..]).src_addr()
        );
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()));
        assert_eq!((u8::from(icmp.msg_type()), icmp.msg_code()), (1, 3));
        assert_eq!(icmp.payload(), &syn[..]);
    }

    #[test]
    fn too_big_carries_the_mtu() {
        let error = too_big(&syn_v4(), 1400).unwrap();
        let ip = Ipv4Packet::new_checked(&error[..]).unwrap();
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!((u8::from(icmp.msg_type()), icmp.msg_code()), (3, 4));
        assert_eq!(&ip.payload()[6..8], &1400u16.to_be_bytes());

        let mut syn = vec![0u8; 60];
        syn[0] = 0x60;
        syn[5] = 20;
        syn[6] = 6;
        syn[7] = 64;
        syn[23] = 2;
        syn[39] = 1;
        let error = too_big(&syn, 1280).unwrap();
        let ip = Ipv6Packet::new_checked(&error[..]).unwrap();
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(u8::from(icmp.msg_type()), 2);
        assert_eq!(icmp.pkt_too_big_mtu(), 1280);
    }

    #[test]
    fn non_ip_gets_no_error() {
        assert_eq!(unreachable(&[], Unreachable::Host), None);
        assert_eq!(unreachable(&[0x45, 0, 0], Unreachable::Host), None);
    }
}
