//! Which packets start a connection, and how a refused one is answered.
//!
//! - [`classify`] reads an IP packet through smoltcp's checked `wire` views and says whether it
//!   is a well-formed TCP segment (with its 4-tuple and flags), another protocol, or malformed.
//!   Checksums are verified here, once, so the stack does not verify them again.
//! - [`Handshake`] names how a new connection's handshake is answered, and a
//!   [`HandshakePolicy`] picks it per connection at the SYN.
//! - [`SynCookies`] answer a SYN without state when the stack is at its caps, and rebuild the
//!   connection from the client's ACK.
//! - [`unreachable`] builds the ICMP error that tells a client its destination cannot be
//!   reached (the consistent handshake's answer to an unreachable upstream).
//!
//! Invariants: pure functions and state machines only: no sockets, tasks or clocks, so
//! everything here is unit-tested with real packet bytes. Malformed input returns an error,
//! never panics. Next: `prism-stack` calls [`classify`] for every packet and looks its 4-tuple up in its
//! connection table.

mod cookie;
mod handshake;
mod icmp;
mod policy;
mod segment;

pub use cookie::{Offer, Rebuilt, SynCookies};
pub use handshake::{Handshake, ParseHandshakeError};
pub use icmp::{Unreachable, too_big, unreachable};
pub use policy::{HandshakePolicy, PortPolicy};
pub use segment::{Checksums, FourTuple, Malformed, Packet, Segment, classify, classify_with};
