//! The boundary the application sees: each TCP connection Prism terminates arrives as a
//! [`Request`] carrying its source, original destination and handshake mode. Accept it to get
//! a [`Stream`] (`AsyncRead + AsyncWrite`, with half-close), or reject it with a
//! [`Rejection`] and the client is told.
//!
//! On top of that API sit the upstream [`Connector`]s Prism ships ([`Direct`], [`Socks5`]) and
//! [`serve`], which connects every request upstream and [`relay`]s the bytes. A product with its
//! own encrypted tunnel implements [`Connector`] (or handles [`Request`]s itself) instead.
//!
//! Invariants: this crate never touches packets or smoltcp; a reset on either side reaches the
//! other; a failed upstream connect is always answered (never left hanging). Next: the `prism`
//! binary wires a TUN, a `prism_stack::Stack` and a connector together.

mod alerts;
mod connector;
mod counters;
mod direct;
mod error;
mod pipelined;
mod relay;
mod socks5;

pub use connector::{Connecting, Connector, Target, Upstream, serve};
pub use counters::{Counters, Snapshot};
pub use direct::Direct;
pub use error::ConnectError;
pub use prism_device::Outside;
pub use prism_stack::{
    Handshake, HandshakePolicy, PortPolicy, Rejection, Request, Requests, Stream,
};
pub use relay::{Relay, relay};
pub use socks5::{Socks5, Socks5Url, Socks5UrlError};
