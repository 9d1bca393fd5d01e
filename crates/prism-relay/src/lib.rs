//! The blind relay: every packet that is not TCP crosses the VPN whole (UDP, ICMP, ICMPv6, GRE,
//! ESP, any protocol), with no per-flow state on the client.
//!
//! Pure cores (crate-private, unit-tested): `split::route` decides where a packet the stack
//! diverted goes (the relay, or nowhere: link business and junk); `refuse::prohibited` answers
//! non-TCP with ICMP "administratively prohibited" when no relay is configured; `frame` seals
//! and opens datagrams (XChaCha20-Poly1305, per-direction [`Keys`] derived from a pre-shared
//! key or a session's handshake); `identity` makes key pairs and runs the Noise handshake that
//! gives each session of a client with its own [`PrivateKey`] its keys;
//! `replay::ReplayWindow` accepts each counter once.
//!
//! I/O at the edge: [`run_relay`] is the task between the stack's diverted packets, the relay
//! and the device; [`UdpTunnel`] is the client end of the UDP transport (a [`PacketTunnel`]),
//! [`Server`] the far end.
//!
//! Invariants: packets pass as `Bytes` slices, never copied on the way to the relay (unless
//! offload left a checksum to finish); a datagram that does not authenticate, replays, or
//! carries a packet from or to an address its session does not own is dropped and counted, and
//! never reaches a TUN. Next: `prism-engine` runs the client end (`Builder::udp_relay`) and the
//! server (`RelayServer`).

mod counters;
mod frame;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
mod identity;
#[cfg(test)]
mod identity_tests;
mod refuse;
mod replay;
mod server;
mod split;
mod splitter;
#[cfg(any(test, fuzzing))]
mod standin;
mod tunnel;
mod udp;
#[cfg(test)]
mod udp_tests;

pub use counters::{Counters, Snapshot};
pub use frame::{KeyTooShort, Keys, OVERHEAD};
pub use identity::{BadKey, Peer, PrivateKey, PublicKey};
use refuse::prohibited;
use replay::ReplayWindow;
pub use server::{SESSION_LIFETIME, Server, ServerAuth};
pub use split::dns_query;
use split::{Route, route};
pub use splitter::run_relay;
pub use tunnel::{ClientAuth, PacketTunnel, Rotation, UdpTunnel};
