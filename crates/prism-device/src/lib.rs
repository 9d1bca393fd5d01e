//! The PHY layer of Prism: where packets enter and leave.
//!
//! - [`PrismDevice`] is a smoltcp [`phy::Device`](smoltcp::phy::Device) over two queues of
//!   [`Bytes`](bytes::Bytes). The stack pushes received packets in, smoltcp consumes them, and
//!   what smoltcp transmits is queued for the stack to hand back to the link.
//! - [`Link`] bridges those queues to tokio: one end for the stack, one for the adapter that
//!   talks to the operating system.
//! - [`tun`] (Linux) is that adapter for a TUN device.
//!
//! Invariant: nothing here parses packets or knows about TCP. A packet is an opaque `Bytes`;
//! deciding what it is belongs to `prism-trap` and `prism-stack`. Next: `prism-stack` owns a
//! `PrismDevice` and drives it.

mod link;
mod queue;
#[cfg(target_os = "linux")]
pub mod tun;

pub use link::{BATCH, Link, LinkClosed};
pub use queue::PrismDevice;
pub use smoltcp::phy::Medium;
