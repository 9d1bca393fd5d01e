//! [`route`]: which way an IP packet goes. TCP is terminated by the stack; every other protocol
//! crosses the relay whole. This is the one place that decides.

/// Where a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// TCP: to the stack, which terminates it.
    Stack,
    /// Anything else (UDP, ICMP, ICMPv6, GRE, ESP, ...): whole, through the relay.
    Relay,
    /// Not an IP packet: dropped and counted.
    Malformed,
}

const TCP: u8 = 6;

/// Decides by the IP version and the first protocol field. IPv6 packets whose first next header
/// is an extension header are relayed whole (TCP behind one included): the stack terminates
/// only plain TCP, and the relay loses nothing by carrying the rest.
pub fn route(packet: &[u8]) -> Route {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => match packet.get(9) {
            Some(&TCP) => Route::Stack,
            _ => Route::Relay,
        },
        Some(6) if packet.len() >= 40 => match packet.get(6) {
            Some(&TCP) => Route::Stack,
            _ => Route::Relay,
        },
        _ => Route::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(protocol: u8) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = protocol;
        p
    }

    fn v6(next_header: u8) -> Vec<u8> {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[6] = next_header;
        p
    }

    #[test]
    fn tcp_goes_to_the_stack_and_every_other_protocol_to_the_relay() {
        for protocol in 0..=255u8 {
            let expected = if protocol == TCP {
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
    fn ipv6_extension_headers_are_relayed_whole() {
        // Hop-by-hop (0), routing (43), fragment (44), destination options (60) before TCP.
        for ext in [0u8, 43, 44, 60] {
            assert_eq!(route(&v6(ext)), Route::Relay);
        }
    }

    #[test]
    fn non_ip_and_short_packets_are_malformed() {
        assert_eq!(route(&[]), Route::Malformed);
        assert_eq!(route(&[0x45; 10]), Route::Malformed);
        assert_eq!(route(&[0x60; 20]), Route::Malformed);
        assert_eq!(route(&[0x20; 60]), Route::Malformed);
    }
}
