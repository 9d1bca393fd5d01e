//! [`Counters`]: what the gateway did with each frame.

/// Plain counters (the gateway is single-owner; the caller publishes them as it likes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// Frames received.
    pub frames_in: u64,
    /// IP packets handed to the L3 path.
    pub packets_in: u64,
    /// ARP requests answered.
    pub arp_replies: u64,
    /// Neighbor solicitations answered.
    pub neighbor_adverts: u64,
    /// Frames too short or with inconsistent headers.
    pub drop_malformed: u64,
    /// VLAN-tagged frames (802.1Q, 802.1ad).
    pub drop_vlan: u64,
    /// Frames of an EtherType that is neither IPv4, IPv6 nor ARP.
    pub drop_ethertype: u64,
    /// Unicast frames for another MAC.
    pub drop_not_for_us: u64,
    /// Broadcast and multicast IP (DHCP, mDNS, MLD, router solicitations...): not traffic.
    pub drop_link_local: u64,
    /// ARP for addresses that are not ours, and ARP replies (learned from, then dropped).
    pub drop_arp: u64,
    /// Neighbor discovery messages handled locally (learned from, then dropped).
    pub drop_ndp: u64,
    /// Packets from the stack for which no peer MAC is known yet.
    pub egress_no_peer: u64,
    /// Frames sent (wrapped packets and replies).
    pub frames_out: u64,
}

impl Counters {
    /// Every counter by name, in a fixed order.
    pub fn fields(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("frames_in", self.frames_in),
            ("packets_in", self.packets_in),
            ("arp_replies", self.arp_replies),
            ("neighbor_adverts", self.neighbor_adverts),
            ("drop_malformed", self.drop_malformed),
            ("drop_vlan", self.drop_vlan),
            ("drop_ethertype", self.drop_ethertype),
            ("drop_not_for_us", self.drop_not_for_us),
            ("drop_link_local", self.drop_link_local),
            ("drop_arp", self.drop_arp),
            ("drop_ndp", self.drop_ndp),
            ("egress_no_peer", self.egress_no_peer),
            ("frames_out", self.frames_out),
        ]
    }
}
