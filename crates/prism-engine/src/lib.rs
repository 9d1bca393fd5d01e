//! Prism as one engine a VPN product embeds: a packet [`Source`] (a TUN by name, a descriptor
//! the product opened, or queues it pumps itself), the stack that terminates TCP, the relay
//! for everything else, the Ethernet gateway on a TAP, and a connector that carries each
//! connection upstream, wired together by a [`Builder`] and run as one [`Engine`].
//!
//! ```no_run
//! # async fn example() -> Result<(), prism_engine::Error> {
//! use std::time::Duration;
//! use prism_engine::{Engine, Source};
//!
//! let engine = Engine::builder(Source::tun("prism0"))
//!     .address("10.0.0.1".parse().unwrap(), 24)
//!     .socks5("socks5://127.0.0.1:1080".parse().unwrap())
//!     .start()
//!     .await?;
//! let stats = engine.stats().await;
//! println!("{} connections open", stats.open);
//! let last = engine.shutdown(Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```
//!
//! Invariants: the engine owns every task it starts and ends them all when it stops, in an
//! order that lets the clients hear of it (FIN, then RST at the deadline) and leaves no stream
//! waiting; what a source's buffers are is decided once, by the source. Next: the `prism`
//! binary maps its flags onto a [`Builder`]; `prism-ffi` does the same for a C caller.

mod dns;
mod engine;
#[cfg(target_os = "linux")]
mod relay_server;
mod settings;
mod source;
mod stats;
mod tap;

pub use engine::{Builder, DROP_GRACE, Device, Engine, Error, Observer};
#[cfg(target_os = "linux")]
pub use relay_server::RelayServer;
pub use settings::{
    BadValue, GatewayMac, MAX_BUSY_POLL_US, PortHandshake, RelayUrl, Resolver, Settings,
    SettingsError, UpstreamUrl, read_private_key, relay_keys, runtime_builder,
};
#[cfg(target_os = "linux")]
pub use source::DEFAULT_QUEUE;
pub use source::Source;
pub use stats::Stats;

#[cfg(unix)]
pub use prism_device::{FdKind, Protect};
pub use prism_device::{Framing, Link, Outside};
pub use prism_l2::{Config as GatewayConfig, DEFAULT_MAC, Mac};
pub use prism_relay::Keys as RelayKeys;
pub use prism_relay::{
    BadKey, ClientAuth as RelayClientAuth, Peer as RelayPeer, PrivateKey, PublicKey, Rotation,
    ServerAuth as RelayServerAuth,
};
pub use prism_relay::{Counters as RelayCounters, PacketTunnel, Snapshot as RelaySnapshot};
pub use prism_stack::{
    Config as StackConfig, Connection, ConnectionState, Handshake, HandshakePolicy, PortPolicy,
    Rejection, Request, Stream,
};
pub use prism_tunnel::{
    ConnectError, Connecting, Connector, Counters as UpstreamCounters,
    Snapshot as UpstreamSnapshot, Socks5Url, Target, Upstream,
};
