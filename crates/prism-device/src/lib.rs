//! The PHY layer of Prism: where packets enter and leave.
//!
//! - [`PrismDevice`] is a smoltcp [`phy::Device`](smoltcp::phy::Device) over two queues of
//!   [`Bytes`](bytes::Bytes). The stack pushes received packets in, smoltcp consumes them, and
//!   what smoltcp transmits is queued for the stack to hand back to the link.
//! - [`Link`] bridges those queues to tokio: one end for the stack, one for the adapter that
//!   talks to the operating system.
//! - [`tun`] (Linux) is that adapter for a TUN or TAP opened by name; [`FdDevice`] for one
//!   the product opened and hands over as a descriptor.
//! - [`Outside`] is how the sockets Prism opens itself avoid being routed into its device.
//! - [`vnet`] is the offload bookkeeping of an offloading TUN: virtio-net headers, partial TCP
//!   checksums, super-packets.
//!
//! Invariant: nothing here decides what a packet is for. A packet is a `Bytes`; the only
//! reading of its contents is the offload work a NIC would do (headers, checksums,
//! segmentation). Where it goes belongs to `prism-trap`, `prism-relay` and `prism-stack`.
//! Next: `prism-stack` owns a `PrismDevice` and drives it.

mod counters;
#[cfg(unix)]
mod fd;
mod link;
mod outside;
mod pool;
#[cfg(unix)]
mod pump;
mod queue;
#[cfg(target_os = "linux")]
pub mod tun;
pub mod vnet;

#[cfg(unix)]
pub use fd::{FdDevice, FdKind};
pub use link::{BATCH, Diverted, Framing, Link, LinkClosed};
pub use outside::Outside;
#[cfg(unix)]
pub use outside::Protect;
pub use queue::PrismDevice;
pub use smoltcp::phy::Medium;

/// Room for an Ethernet header (with a VLAN tag) beyond the MTU when reading frames.
const FRAME_OVERHEAD: usize = 18;
