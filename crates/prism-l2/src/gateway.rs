//! [`Gateway`]: the virtual gateway's state machine.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::Bytes;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv4Packet, Ipv6Packet, Ipv6Repr,
    NdiscNeighborFlags, NdiscRepr, RawHardwareAddress,
};

use crate::Counters;

/// The gateway's MAC unless configured: locally administered and unicast (02:...), spelling
/// "PRISM" in its last five bytes.
pub const DEFAULT_MAC: EthernetAddress = EthernetAddress([0x02, 0x50, 0x52, 0x49, 0x53, 0x4d]);

const ETHERNET_HEADER: usize = 14;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
/// NDP messages must carry this hop limit (RFC 4861).
const NDP_HOP_LIMIT: u8 = 255;
const IPV6_ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// The gateway's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The gateway's MAC.
    pub mac: EthernetAddress,
    /// IPv4 addresses the gateway answers ARP for.
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv6 addresses the gateway answers neighbor solicitations for.
    pub ipv6: Vec<Ipv6Addr>,
    /// Answer ARP and neighbor solicitations for every address but the asker's own, so any
    /// on-link address is reached through Prism.
    pub proxy_arp: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mac: DEFAULT_MAC,
            ipv4: Vec::new(),
            ipv6: Vec::new(),
            proxy_arp: false,
        }
    }
}

/// What a frame turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingress {
    /// An IP packet for the L3 path: the frame's payload, padding trimmed, not copied.
    Packet(Bytes),
    /// A frame to send straight back on the link (an ARP reply, a neighbor advertisement).
    Reply(Vec<u8>),
    /// Not traffic; counted.
    Dropped(Drop),
}

/// Why a frame was not traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Drop {
    /// Too short, or inconsistent headers.
    Malformed,
    /// 802.1Q or 802.1ad tagged.
    Vlan,
    /// Not IPv4, IPv6 or ARP.
    EtherType(u16),
    /// Unicast to another MAC.
    NotForUs,
    /// Broadcast or multicast IP, which is link business, not traffic.
    LinkLocal,
    /// ARP that is not a request for one of our addresses.
    Arp,
    /// Neighbor discovery handled here (not a solicitation for one of our addresses).
    Ndp,
}

/// The virtual gateway on one Ethernet segment.
#[derive(Debug)]
pub struct Gateway {
    config: Config,
    /// Peer addresses to their MACs, learned from what they send.
    peers: HashMap<IpAddr, EthernetAddress>,
    /// The MAC that last sent us traffic: the default next hop for addresses not learned.
    last_peer: Option<EthernetAddress>,
    counters: Counters,
}

impl Gateway {
    /// A gateway with this identity.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            peers: HashMap::new(),
            last_peer: None,
            counters: Counters::default(),
        }
    }

    /// What has happened so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The MAC learned for `ip`, if any.
    pub fn peer(&self, ip: IpAddr) -> Option<EthernetAddress> {
        self.peers.get(&ip).copied()
    }

    /// Classifies one received frame.
    pub fn ingress(&mut self, frame: &Bytes) -> Ingress {
        self.counters.frames_in += 1;
        let outcome = self.classify(frame);
        match &outcome {
            Ingress::Packet(_) => self.counters.packets_in += 1,
            Ingress::Reply(_) => self.counters.frames_out += 1,
            Ingress::Dropped(why) => self.count(*why),
        }
        outcome
    }

    fn count(&mut self, why: Drop) {
        let c = &mut self.counters;
        match why {
            Drop::Malformed => c.drop_malformed += 1,
            Drop::Vlan => c.drop_vlan += 1,
            Drop::EtherType(_) => c.drop_ethertype += 1,
            Drop::NotForUs => c.drop_not_for_us += 1,
            Drop::LinkLocal => c.drop_link_local += 1,
            Drop::Arp => c.drop_arp += 1,
            Drop::Ndp => c.drop_ndp += 1,
        }
    }

    fn classify(&mut self, bytes: &Bytes) -> Ingress {
        let Ok(frame) = EthernetFrame::new_checked(&bytes[..]) else {
            return Ingress::Dropped(Drop::Malformed);
        };
        let (src, dst) = (frame.src_addr(), frame.dst_addr());
        if !src.is_unicast() {
            return Ingress::Dropped(Drop::Malformed);
        }
        let to_us = dst == self.config.mac;
        if !to_us && dst.is_unicast() {
            return Ingress::Dropped(Drop::NotForUs);
        }
        match frame.ethertype() {
            EthernetProtocol::Arp => self.arp(src, frame.payload()),
            EthernetProtocol::Ipv4 => self.ipv4(bytes, src, to_us),
            EthernetProtocol::Ipv6 => self.ipv6(bytes, src, to_us),
            EthernetProtocol::Unknown(ETHERTYPE_VLAN | ETHERTYPE_QINQ) => {
                Ingress::Dropped(Drop::Vlan)
            }
            other => Ingress::Dropped(Drop::EtherType(other.into())),
        }
    }

    fn learn(&mut self, ip: IpAddr, mac: EthernetAddress) {
        let unicast = match ip {
            IpAddr::V4(a) => !a.is_unspecified() && !a.is_broadcast() && !a.is_multicast(),
            IpAddr::V6(a) => !a.is_unspecified() && !a.is_multicast(),
        };
        if unicast && mac.is_unicast() {
            self.peers.insert(ip, mac);
        }
    }

    fn answers_for(&self, target: IpAddr, asker: IpAddr) -> bool {
        let ours = match target {
            IpAddr::V4(a) => self.config.ipv4.contains(&a),
            IpAddr::V6(a) => self.config.ipv6.contains(&a),
        };
        // Proxy ARP never claims the asker's own address (duplicate address detection) and
        // never answers probes from an address not yet configured.
        ours || (self.config.proxy_arp && target != asker && !asker.is_unspecified())
    }

    fn arp(&mut self, src: EthernetAddress, payload: &[u8]) -> Ingress {
        let Ok(packet) = ArpPacket::new_checked(payload) else {
            return Ingress::Dropped(Drop::Malformed);
        };
        let Ok(ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) = ArpRepr::parse(&packet)
        else {
            return Ingress::Dropped(Drop::Malformed);
        };
        let (asker, target) = (
            IpAddr::V4(source_protocol_addr),
            IpAddr::V4(target_protocol_addr),
        );
        self.learn(asker, source_hardware_addr);
        self.last_peer = Some(src);
        if operation != ArpOperation::Request || !self.answers_for(target, asker) {
            return Ingress::Dropped(Drop::Arp);
        }
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: self.config.mac,
            source_protocol_addr: target_protocol_addr,
            target_hardware_addr: source_hardware_addr,
            target_protocol_addr: source_protocol_addr,
        };
        let mut bytes = vec![0u8; ETHERNET_HEADER + reply.buffer_len()];
        let mut frame = EthernetFrame::new_unchecked(&mut bytes[..]);
        EthernetRepr {
            src_addr: self.config.mac,
            dst_addr: src,
            ethertype: EthernetProtocol::Arp,
        }
        .emit(&mut frame);
        reply.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
        self.counters.arp_replies += 1;
        Ingress::Reply(bytes)
    }

    fn ipv4(&mut self, bytes: &Bytes, src: EthernetAddress, to_us: bool) -> Ingress {
        let payload = bytes.slice(ETHERNET_HEADER..);
        let Ok(ip) = Ipv4Packet::new_checked(&payload[..]) else {
            // Not even a header: let the L3 path see and count it? No: a frame that short is
            // the link's garbage, counted here.
            return Ingress::Dropped(Drop::Malformed);
        };
        if !to_us {
            return Ingress::Dropped(Drop::LinkLocal);
        }
        self.learn(IpAddr::V4(ip.src_addr()), src);
        self.last_peer = Some(src);
        let len = usize::from(ip.total_len());
        Ingress::Packet(payload.slice(..len))
    }

    fn ipv6(&mut self, bytes: &Bytes, src: EthernetAddress, to_us: bool) -> Ingress {
        let payload = bytes.slice(ETHERNET_HEADER..);
        let Ok(ip) = Ipv6Packet::new_checked(&payload[..]) else {
            return Ingress::Dropped(Drop::Malformed);
        };
        let len = ip.total_len();
        if ip.next_header() == IpProtocol::Icmpv6 {
            if let Some(outcome) = self.ndp(src, &ip) {
                return outcome;
            }
        }
        if !to_us {
            return Ingress::Dropped(Drop::LinkLocal);
        }
        self.learn(IpAddr::V6(ip.src_addr()), src);
        self.last_peer = Some(src);
        Ingress::Packet(payload.slice(..len))
    }

    /// Neighbor discovery: answers solicitations for our addresses; handles the rest locally.
    /// `None` for ICMPv6 that is not NDP (it is traffic).
    fn ndp(&mut self, src: EthernetAddress, ip: &Ipv6Packet<&[u8]>) -> Option<Ingress> {
        let Ok(icmp) = Icmpv6Packet::new_checked(ip.payload()) else {
            return Some(Ingress::Dropped(Drop::Malformed));
        };
        if !(133..=137).contains(&u8::from(icmp.msg_type())) {
            return None;
        }
        let (asker, dst) = (ip.src_addr(), ip.dst_addr());
        let repr = Icmpv6Repr::parse(&asker, &dst, &icmp, &ChecksumCapabilities::default());
        let Ok(Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { target_addr, .. })) = repr else {
            return Some(Ingress::Dropped(Drop::Ndp));
        };
        self.learn(IpAddr::V6(asker), src);
        self.last_peer = Some(src);
        if ip.hop_limit() != NDP_HOP_LIMIT
            || !self.answers_for(IpAddr::V6(target_addr), IpAddr::V6(asker))
        {
            return Some(Ingress::Dropped(Drop::Ndp));
        }
        let dad = asker.is_unspecified();
        let mut flags = NdiscNeighborFlags::ROUTER | NdiscNeighborFlags::OVERRIDE;
        if !dad {
            flags |= NdiscNeighborFlags::SOLICITED;
        }
        let advert = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags,
            target_addr,
            lladdr: Some(RawHardwareAddress::from_bytes(self.config.mac.as_bytes())),
        });
        let reply_to = if dad { IPV6_ALL_NODES } else { asker };
        let header = Ipv6Repr {
            src_addr: target_addr,
            dst_addr: reply_to,
            next_header: IpProtocol::Icmpv6,
            payload_len: advert.buffer_len(),
            hop_limit: NDP_HOP_LIMIT,
        };
        let mut bytes = vec![0u8; ETHERNET_HEADER + header.buffer_len() + advert.buffer_len()];
        let mut frame = EthernetFrame::new_unchecked(&mut bytes[..]);
        EthernetRepr {
            src_addr: self.config.mac,
            dst_addr: if dad { multicast_mac(reply_to) } else { src },
            ethertype: EthernetProtocol::Ipv6,
        }
        .emit(&mut frame);
        let mut packet = Ipv6Packet::new_unchecked(frame.payload_mut());
        header.emit(&mut packet);
        advert.emit(
            &header.src_addr,
            &header.dst_addr,
            &mut Icmpv6Packet::new_unchecked(packet.payload_mut()),
            &ChecksumCapabilities::default(),
        );
        self.counters.neighbor_adverts += 1;
        Some(Ingress::Reply(bytes))
    }

    /// Wraps an IP packet from the stack in a frame to its destination's MAC (learned, or the
    /// last peer that sent us traffic). `None`, counted, while no peer is known.
    pub fn egress(&mut self, packet: &[u8]) -> Option<Vec<u8>> {
        let (dst, ethertype) = match packet.first().map(|b| b >> 4) {
            Some(4) => (
                Ipv4Packet::new_checked(packet)
                    .ok()
                    .map(|p| IpAddr::V4(p.dst_addr())),
                EthernetProtocol::Ipv4,
            ),
            Some(6) => (
                Ipv6Packet::new_checked(packet)
                    .ok()
                    .map(|p| IpAddr::V6(p.dst_addr())),
                EthernetProtocol::Ipv6,
            ),
            _ => (None, EthernetProtocol::Unknown(0)),
        };
        let mac = dst
            .and_then(|ip| self.peers.get(&ip).copied())
            .or(self.last_peer);
        let Some(mac) = mac else {
            self.counters.egress_no_peer += 1;
            return None;
        };
        let mut bytes = vec![0u8; ETHERNET_HEADER + packet.len()];
        let mut frame = EthernetFrame::new_unchecked(&mut bytes[..]);
        EthernetRepr {
            src_addr: self.config.mac,
            dst_addr: mac,
            ethertype,
        }
        .emit(&mut frame);
        frame.payload_mut().copy_from_slice(packet);
        self.counters.frames_out += 1;
        Some(bytes)
    }
}

/// The Ethernet multicast address of an IPv6 multicast address (RFC 2464).
fn multicast_mac(ip: Ipv6Addr) -> EthernetAddress {
    let o = ip.octets();
    EthernetAddress([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{Icmpv6Message, Ipv6Address};

    const HOST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

    fn capture(name: &str) -> Bytes {
        let path = format!("{}/testdata/{name}.bin", env!("CARGO_MANIFEST_DIR"));
        Bytes::from(std::fs::read(path).unwrap())
    }

    fn gateway(proxy_arp: bool) -> Gateway {
        Gateway::new(Config {
            mac: DEFAULT_MAC,
            ipv4: vec![Ipv4Addr::new(10, 9, 0, 2)],
            ipv6: vec!["fd09::2".parse().unwrap()],
            proxy_arp,
        })
    }

    #[test]
    fn an_arp_request_for_the_gateway_is_answered_and_teaches_the_asker() {
        let mut gw = gateway(false);
        let Ingress::Reply(reply) = gw.ingress(&capture("arp_request")) else {
            panic!("no reply");
        };
        let frame = EthernetFrame::new_checked(&reply[..]).unwrap();
        assert_eq!(frame.dst_addr(), HOST_MAC);
        assert_eq!(frame.src_addr(), DEFAULT_MAC);
        let arp = ArpRepr::parse(&ArpPacket::new_checked(frame.payload()).unwrap()).unwrap();
        assert_eq!(
            arp,
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: DEFAULT_MAC,
                source_protocol_addr: Ipv4Addr::new(10, 9, 0, 2),
                target_hardware_addr: HOST_MAC,
                target_protocol_addr: Ipv4Addr::new(10, 9, 0, 1),
            }
        );
        assert_eq!(gw.peer("10.9.0.1".parse().unwrap()), Some(HOST_MAC));
        assert_eq!(gw.counters().arp_replies, 1);
    }

    #[test]
    fn arp_for_other_addresses_is_ignored_unless_proxying() {
        let mut frame = capture("arp_request").to_vec();
        frame[41] = 77; // who-has 10.9.0.77
        let frame = Bytes::from(frame);
        assert_eq!(gateway(false).ingress(&frame), Ingress::Dropped(Drop::Arp));
        assert!(matches!(gateway(true).ingress(&frame), Ingress::Reply(_)));

        // Proxy ARP never claims the asker's own address.
        let mut own = capture("arp_request").to_vec();
        own[41] = 1;
        assert_eq!(
            gateway(true).ingress(&Bytes::from(own)),
            Ingress::Dropped(Drop::Arp)
        );
    }

    #[test]
    fn a_neighbor_solicitation_for_the_gateway_gets_an_advertisement() {
        let mut gw = gateway(false);
        let Ingress::Reply(reply) = gw.ingress(&capture("neighbor_solicit")) else {
            panic!("no advertisement");
        };
        let frame = EthernetFrame::new_checked(&reply[..]).unwrap();
        assert_eq!(frame.dst_addr(), HOST_MAC);
        let ip = Ipv6Packet::new_checked(frame.payload()).unwrap();
        assert_eq!(ip.hop_limit(), 255);
        assert_eq!(ip.src_addr(), "fd09::2".parse::<Ipv6Address>().unwrap());
        assert_eq!(ip.dst_addr(), "fd09::1".parse::<Ipv6Address>().unwrap());
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(icmp.msg_type(), Icmpv6Message::NeighborAdvert);
        let repr = Icmpv6Repr::parse(
            &ip.src_addr(),
            &ip.dst_addr(),
            &icmp,
            &ChecksumCapabilities::default(),
        )
        .unwrap();
        let Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags,
            target_addr,
            lladdr,
        }) = repr
        else {
            panic!("not an advertisement: {repr:?}");
        };
        assert!(flags.contains(NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE));
        assert_eq!(target_addr, "fd09::2".parse::<Ipv6Address>().unwrap());
        assert_eq!(lladdr.unwrap().as_bytes(), DEFAULT_MAC.as_bytes());
        assert_eq!(gw.peer("fd09::1".parse().unwrap()), Some(HOST_MAC));
    }

    #[test]
    fn link_business_is_not_traffic() {
        let mut gw = gateway(false);
        for name in ["dad_solicit", "router_solicit"] {
            assert_eq!(
                gw.ingress(&capture(name)),
                Ingress::Dropped(Drop::Ndp),
                "{name}"
            );
        }
        // MLD rides behind a hop-by-hop header to a multicast MAC.
        assert_eq!(
            gw.ingress(&capture("mld_report")),
            Ingress::Dropped(Drop::LinkLocal)
        );
        assert_eq!(gw.counters().drop_ndp, 2);
        assert_eq!(gw.counters().drop_link_local, 1);
    }

    #[test]
    fn ip_frames_to_the_gateway_become_packets_without_padding() {
        let mut gw = gateway(false);
        for (name, len) in [("syn_v4", 60), ("syn_v6", 80)] {
            let frame = capture(name);
            let Ingress::Packet(packet) = gw.ingress(&frame) else {
                panic!("{name}: not a packet");
            };
            assert_eq!(packet.len(), len, "{name}");
            assert_eq!(&packet[..], &frame[14..14 + len]);
        }
        // Padding after the IP packet (short frames are padded to 60 bytes) is trimmed.
        let mut padded = capture("syn_v4").to_vec();
        padded.extend_from_slice(&[0; 8]);
        let Ingress::Packet(packet) = gw.ingress(&Bytes::from(padded)) else {
            panic!("not a packet");
        };
        assert_eq!(packet.len(), 60);
        assert_eq!(gw.peer("10.9.0.1".parse().unwrap()), Some(HOST_MAC));
    }

    #[test]
    fn replies_are_wrapped_for_the_learned_peer() {
        let mut gw = gateway(false);
        let syn = capture("syn_v4");
        assert_eq!(gw.egress(&syn[14..]), None, "no peer known yet");
        assert_eq!(gw.counters().egress_no_peer, 1);
        gw.ingress(&syn);
        // A packet back to 10.9.0.1 (the SYN with its addresses swapped will do).
        let mut back = syn[14..].to_vec();
        back.copy_within(12..16, 20);
        back[12..16].copy_from_slice(&[10, 9, 0, 3]);
        back[16..20].copy_from_slice(&[10, 9, 0, 1]);
        let frame = gw.egress(&back).unwrap();
        let frame = EthernetFrame::new_checked(&frame[..]).unwrap();
        assert_eq!(frame.dst_addr(), HOST_MAC);
        assert_eq!(frame.src_addr(), DEFAULT_MAC);
        assert_eq!(frame.ethertype(), EthernetProtocol::Ipv4);
        assert_eq!(frame.payload(), &back[..]);
    }

    #[test]
    fn vlan_unknown_ethertypes_strangers_and_garbage_are_counted() {
        let mut gw = gateway(false);
        let mut vlan = capture("syn_v4").to_vec();
        vlan[12..14].copy_from_slice(&[0x81, 0x00]);
        assert_eq!(gw.ingress(&Bytes::from(vlan)), Ingress::Dropped(Drop::Vlan));

        let mut lldp = capture("syn_v4").to_vec();
        lldp[12..14].copy_from_slice(&[0x88, 0xcc]);
        assert_eq!(
            gw.ingress(&Bytes::from(lldp)),
            Ingress::Dropped(Drop::EtherType(0x88cc))
        );

        let mut stranger = capture("syn_v4").to_vec();
        stranger[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 9]);
        assert_eq!(
            gw.ingress(&Bytes::from(stranger)),
            Ingress::Dropped(Drop::NotForUs)
        );

        let frame = capture("syn_v4");
        for len in 0..frame.len() {
            let outcome = gw.ingress(&frame.slice(..len));
            assert!(
                matches!(outcome, Ingress::Dropped(_)),
                "length {len}: {outcome:?}"
            );
        }
        let c = gw.counters();
        assert_eq!(
            (c.drop_vlan, c.drop_ethertype, c.drop_not_for_us),
            (1, 1, 1)
        );
        assert_eq!(c.frames_in, 3 + frame.len() as u64);
    }

    #[test]
    fn random_frames_never_panic() {
        let mut gw = gateway(true);
        let seeds = [
            "arp_request",
            "neighbor_solicit",
            "syn_v4",
            "syn_v6",
            "mld_report",
        ]
        .map(capture);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut frame = seeds[(next() % 5) as usize].to_vec();
            for _ in 0..1 + next() % 4 {
                let i = (next() as usize) % frame.len();
                frame[i] = next() as u8;
            }
            frame.truncate((next() as usize) % (frame.len() + 1));
            let _ = gw.ingress(&Bytes::from(frame));
        }
    }
}
