//! Prism on an Ethernet segment (a TAP device): a virtual gateway.
//!
//! [`Gateway::ingress`] takes a frame and says what it is: an IP packet for the L3 path
//! (unwrapped, without copying, padding trimmed), a frame to send straight back (an ARP reply,
//! an IPv6 neighbor advertisement), or a counted drop (malformed, VLAN-tagged, unknown
//! EtherType, not addressed to us, broadcast or link-local multicast that is not traffic).
//! [`Gateway::egress`] wraps an IP packet from the stack in a frame to the peer's learned MAC.
//! The gateway learns its peers' MACs from ARP, neighbor solicitations and the frames they send.
//!
//! Invariants: pure. No sockets, tasks or clocks; the caller moves the frames. Every frame gets
//! exactly one outcome and every drop is counted; malformed input never panics. IP packets go
//! into exactly the same L3 path as on a TUN. Next: the `prism` binary's `tap` module wires a
//! TAP device, a `Gateway` and the stack together.

mod counters;
mod gateway;

pub use counters::Counters;
pub use gateway::{Config, DEFAULT_MAC, Drop, Gateway, Ingress};
pub use smoltcp::wire::EthernetAddress as Mac;
