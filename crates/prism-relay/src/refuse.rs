//! [`prohibited`]: without a relay, a non-TCP packet is answered with ICMP "administratively
//! prohibited" instead of vanishing, so ping and DNS fail fast and say why.

use smoltcp::wire::{IpAddress, Ipv4Packet, Ipv6Packet};

/// The error for `packet`, or `None` where RFC 1122 and RFC 4443 forbid one: in answer to an
/// ICMP error, to a multicast or broadcast destination, or from a source that is not unicast.
pub(crate) fn prohibited(packet: &[u8]) -> Option<Vec<u8>> {
    let (src, dst, is_error) = match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            // ICMP errors: destination unreachable, source quench, redirect, time exceeded,
            // parameter problem.
            let error = ip.next_header() == smoltcp::wire::IpProtocol::Icmp
                && ip
                    .payload()
                    .first()
                    .is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12));
            let dst = ip.dst_addr();
            if dst.is_broadcast() || dst.octets()[3] == 255 {
                return None;
            }
            (IpAddress::from(ip.src_addr()), IpAddress::from(dst), error)
        }
        Some(6) => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            // ICMPv6 types below 128 are errors.
            let error = ip.next_header() == smoltcp::wire::IpProtocol::Icmpv6
                && ip.payload().first().is_some_and(|t| *t < 128);
            (
                IpAddress::from(ip.src_addr()),
                IpAddress::from(ip.dst_addr()),
                error,
            )
        }
        _ => return None,
    };
    if is_error || !src.is_unicast() || !dst.is_unicast() {
        return None;
    }
    prism_trap::unreachable(packet, prism_trap::Unreachable::Prohibited)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{Icmpv4Packet, Ipv4Packet};

    /// An ICMP echo request 10.0.0.2 -> 192.0.2.1 (type 8).
    fn echo(icmp_type: u8, dst_last: u8) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 28, 0, 1, 0x40, 0, 64, 1, 0, 0, 10, 0, 0, 2, 192, 0, 2, dst_last,
            icmp_type, 0, 0, 0, 0, 1, 0, 1,
        ];
        Ipv4Packet::new_unchecked(&mut p[..]).fill_checksum();
        p
    }

    #[test]
    fn a_ping_is_answered_administratively_prohibited() {
        let error = prohibited(&echo(8, 1)).unwrap();
        let ip = Ipv4Packet::new_checked(&error[..]).unwrap();
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!((u8::from(icmp.msg_type()), icmp.msg_code()), (3, 13));
    }

    #[test]
    fn errors_and_broadcasts_are_never_answered() {
        assert_eq!(prohibited(&echo(3, 1)), None, "an ICMP error");
        assert_eq!(prohibited(&echo(11, 1)), None, "time exceeded");
        assert_eq!(prohibited(&echo(8, 255)), None, "a broadcast");
        assert_eq!(prohibited(&[]), None);
        let mut multicast = echo(8, 1);
        multicast[16] = 224;
        Ipv4Packet::new_unchecked(&mut multicast[..]).fill_checksum();
        assert_eq!(prohibited(&multicast), None);
    }
}
