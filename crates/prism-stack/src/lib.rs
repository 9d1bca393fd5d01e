//! Prism's TCP stack: terminates every TCP connection arriving on a packet link and hands each
//! one to the application as a byte stream.
//!
//! - [`Stack`] owns the smoltcp `Interface` and every socket; it runs as one task
//!   ([`Stack::run`]) over a [`prism_device::Link`].
//! - [`Requests`] yields a [`Request`] per new connection; accepting it gives a [`Stream`]
//!   (`AsyncRead + AsyncWrite`, with half-close), rejecting it resets the client.
//! - [`Counters`] says what was done and what was dropped; [`Control`] asks the running stack
//!   for a [`Report`] (counters, connection counts, each open connection) or shuts it down.
//!
//! Invariants: only the stack task touches smoltcp; the application reaches a connection
//! through its `Stream` alone. Handling one packet costs the same with ten connections or ten
//! thousand (see `stack.rs`). A packet from the network never panics the stack: it is
//! classified by `prism-trap`, and anything malformed is counted and dropped.
//!
//! Next: `prism-tunnel` carries accepted streams upstream.

mod config;
mod conn;
mod control;
mod counters;
mod spin;
mod stack;
mod table;
mod timers;

pub use config::{Config, DEFAULT_TCP_BUFFER, DEFAULT_TCP_INITIAL_BUFFER};
pub use conn::{Rejection, Request, Stream};
pub use control::{Connection, ConnectionState, Control, Report};
pub use counters::{Counters, Snapshot};
pub use prism_trap::{Handshake, HandshakePolicy, PortPolicy};
pub use stack::{Requests, Stack};
