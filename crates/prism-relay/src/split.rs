//! [`route`]: which way an IP packet goes. TCP is terminated by the stack; every other protocol
//! crosses the relay whole. This is the one place that decides.

use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv6Packet};

/// Where a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// TCP: to the stack, which terminates it.
    Stack,
    /// Anything else (UDP, ICMP, ICMPv6, GRE, ESP, ...): whole, through the relay.
    Relay,
    /// Link business, not traffic: multicast or broadcast destinations (MLD, router
    /// solicitations, mDNS) and IPv6 link-local sources. Dropped and counted, never relayed.
    Local,
    /// Not an IP packet: dropped and counted.
    Malformed,
}

/// Decides by the IP version and the first protocol field. IPv6 packets whose first next header
/// is an extension header are relayed whole (TCP behind one included): the stack terminates
/// only plain TCP, and the relay loses nothing by carrying the rest.
pub(crate) fn route(packet: &[u8]) -> Route {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let Ok(ip) = Ipv4Packet::new_checked(packet) else {
                return Route::Malformed;
            };
            let dst = ip.dst_addr();
            if ip.next_header() == IpProtocol::Tcp {
                Route::Stack
            } else if dst.is_multicast() || dst.is_broadcast() {
                Route::Local
            } else {
                Route::Relay
            }
        }
        Some(6) => {
            let Ok(ip) = Ipv6Packet::new_checked(packet) else {
                return Route::Malformed;
            };
            if ip.next_header() == IpProtocol::Tcp {
                Route::Stack
            } else if ip.dst_addr().is_multicast() || ip.src_addr().is_unicast_link_local() {
                Route::Local
            } else {
                Route::Relay
            }
        }
        _ => Route::Malformed,
    }
}

/// Whether `packet` is a DNS query: UDP to port 53, not an IPv4 fragment after the first, not
/// behind IPv6 extension headers.
pub fn dns_query(packet: &[u8]) -> bool {
    use smoltcp::wire::UdpPacket;
    let udp_payload = match packet.first().map(|b| b >> 4) {
        Some(4) => Ipv4Packet::new_checked(packet).ok().and_then(|ip| {
            (ip.next_header() == IpProtocol::Udp && ip.frag_offset() == 0)
                .then(|| packet.get(ip.header_len().into()..))
                .flatten()
        }),
        Some(6) => Ipv6Packet::new_checked(packet).ok().and_then(|ip| {
            (ip.next_header() == IpProtocol::Udp)
                .then(|| packet.get(ip.header_len()..))
                .flatten()
        }),
        _ => None,
    };
    udp_payload
        .and_then(|udp| UdpPacket::new_checked(udp).ok())
        .is_some_and(|udp| udp.dst_port() == 53)
}

/// The next-hop MTU to report when `packet` is larger than `mtu` and may not be fragmented
/// (IPv6, or IPv4 with Don't Fragment). `None` when it fits or the outer datagram may be
/// fragmented instead.
pub(crate) fn too_big(packet: &[u8], mtu: usize) -> Option<u16> {
    if packet.len() <= mtu {
        return None;
    }
    let may_not_fragment = match packet.first().map(|b| b >> 4) {
        Some(4) => Ipv4Packet::new_checked(packet).is_ok_and(|ip| ip.dont_frag()),
        Some(6) => true,
        _ => false,
    };
    may_not_fragment.then(|| u16::try_from(mtu).unwrap_or(u16::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10.0.0.2 -> 192.0.2.1, 8 bytes of payload.
    fn v4(protocol: u8) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[3] = 28;
        p[9] = protocol;
        p[12..16].copy_from_slice(&[10, 0, 0, 2]);
        p[16..20].copy_from_slice(&[192, 0, 2, 1]);
        p
    }

    /// fd00::2 -> 2001:db8::1, 8 bytes of payload.
    fn v6(next_header: u8) -> Vec<u8> {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[5] = 8;
        p[6] = next_header;
        p[8] = 0xfd;
        p[23] = 2;
        p[24..26].copy_from_slice(&[0x20, 0x01]);
        p[39] = 1;
        p
    }

    #[test]
    fn link_business_is_not_relayed() {
        let mut broadcast = v4(17);
        broadcast[16..20].copy_from_slice(&[255; 4]);
        let mut multicast = v4(17);
        multicast[16] = 224;
        let mut mld = v6(58);
        mld[24] = 0xff;
        let mut link_local = v6(58);
        link_local[8..10].copy_from_slice(&[0xfe, 0x80]);
        for packet in [broadcast, multicast, mld, link_local] {
            assert_eq!(route(&packet), Route::Local);
        }
    }

    #[test]
    fn only_packets_that_may_not_be_fragmented_are_too_big() {
        let mut df = vec![0u8; 1500];
        df[..28].copy_from_slice(&v4(17));
        df[2..4].copy_from_slice(&1500u16.to_be_bytes());
        df[6] = 0x40;
        assert_eq!(too_big(&df, 1430), Some(1430));
        assert_eq!(too_big(&df, 1500), None);
        df[6] = 0;
        assert_eq!(
            too_big(&df, 1430),
            None,
            "IPv4 without DF: the outer datagram fragments"
        );
        let mut big_v6 = vec![0u8; 1500];
        big_v6[..48].copy_from_slice(&v6(17));
        big_v6[4..6].copy_from_slice(&1460u16.to_be_bytes());
        assert_eq!(too_big(&big_v6, 1410), Some(1410));
    }

    #[test]
    fn tcp_goes_to_the_stack_and_every_other_protocol_to_the_relay() {
        for protocol in 0..=255u8 {
            let expected = if protocol == 6 {
                Route::Stack
            } else {
                Route::Relay
            };
            assert_eq!(route(&v4(protocol)), expected, "IPv4 protocol {protocol}");
            assert_eq!(
                route(&v6(protocol)),
                expected,
                "IPv6 next header {protocol}"
            );
        }
    }

    #[test]
    fn dns_queries_are_udp_to_port_53() {
        let mut query = vec![0u8; 36];
        query[..20].copy_from_slice(&v4(17)[..20]);
        query[3] = 36;
        query[22..24].copy_from_slice(&53u16.to_be_bytes());
        query[24..26].copy_from_slice(&16u16.to_be_bytes());
        assert!(dns_query(&query));
        let mut other_port = query.clone();
        other_port[23] = 54;
        assert!(!dns_query(&other_port));
        let mut tcp = query.clone();
        tcp[9] = 6;
        assert!(!dns_query(&tcp));
        let mut fragment = query.clone();
        fragment[7] = 1;
        assert!(!dns_query(&fragment), "a later fragment has no UDP header");
        assert!(!dns_query(&query[..25]));
    }

    #[test]
    fn ipv6_extension_headers_are_relayed_whole() {
        // Hop-by-hop (0), routing (43), fragment (44), destination options (60) before TCP.
        for ext in [0u8, 43, 44, 60] {
            assert_eq!(route(&v6(ext)), Route::Relay);
        }
    }

    #[test]
    fn non_ip_and_short_packets_are_malformed() {
        assert_eq!(route(&[]), Route::Malformed);
        assert_eq!(
            route(&v4(17)[..27]),
            Route::Malformed,
            "shorter than its total length"
        );
        assert_eq!(route(&[0x45; 10]), Route::Malformed);
        assert_eq!(route(&[0x60; 20]), Route::Malformed);
        assert_eq!(route(&[0x20; 60]), Route::Malformed);
    }
}
