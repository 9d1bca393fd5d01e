//! Linux TUN and TAP adapter on tun-rs: opens the device, gives it its addresses, and pumps
//! packets (TUN) or frames (TAP) between it and a [`Link`].
//!
//! Reading makes the one copy from the kernel: packets are read into slices of a large shared
//! buffer that become `Bytes` without another copy. Routes are not managed here (the `prism`
//! binary does that over netlink); this module only owns the device.

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use tokio::task::JoinHandle;
use tracing::debug;
use tun_rs::{AsyncDevice, DeviceBuilder};

use crate::{BATCH, Link, vnet};

/// Bytes read ahead in one shared buffer before a fresh one is allocated.
const READ_ARENA: usize = 256 * 1024;

/// What to open.
#[derive(Debug, Clone)]
pub struct TunConfig {
    /// Interface name, such as `prism0`.
    pub name: String,
    /// IP MTU of the interface.
    pub mtu: u16,
    /// Addresses with their prefix lengths, IPv4 and IPv6 in any order.
    pub addresses: Vec<(IpAddr, u8)>,
    /// TUN (IP packets) or TAP (Ethernet frames).
    pub layer: Layer,
    /// Packets the kernel may queue for Prism before it drops ([`DEFAULT_QUEUE`] if unsure).
    /// Linux's default of 500 overflows when hundreds of connections open at once, and every
    /// dropped SYN costs its client a one-second retransmission.
    pub queue_len: u32,
    /// Ask for offload (virtio-net frames, TSO both ways, partial checksums) on a TUN. The
    /// kernel may refuse; [`Tun::offload`] says what was granted. Ignored for TAP.
    pub offload: bool,
}

/// What the device carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layer {
    /// IP packets (TUN).
    #[default]
    Ip,
    /// Ethernet frames (TAP); `prism-l2` turns them into IP packets and back.
    Ethernet,
}

/// Room for an Ethernet header (with a VLAN tag) beyond the MTU when reading frames.
const FRAME_OVERHEAD: usize = 18;

/// A kernel-side TUN queue deep enough for bursts of a few thousand packets.
pub const DEFAULT_QUEUE: u32 = 4096;

/// Why a TUN device could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The device could not be created or opened.
    #[error("cannot open TUN {name}: {}", describe(.source))]
    Open {
        /// Interface name asked for.
        name: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// An address could not be assigned.
    #[error("cannot assign {address}/{prefix} to {name}: {}", describe(.source))]
    Address {
        /// Interface name.
        name: String,
        /// The address.
        address: IpAddr,
        /// Its prefix length.
        prefix: u8,
        /// What the kernel said.
        source: io::Error,
    },
    /// The interface index could not be read.
    #[error("cannot read the index of {name}: {source}")]
    Index {
        /// Interface name.
        name: String,
        /// What the kernel said.
        source: io::Error,
    },
}

/// A write error that concerns only the packet written, not the device.
fn refused_packet(error: &io::Error) -> bool {
    const EINVAL: i32 = 22;
    const EMSGSIZE: i32 = 90;
    matches!(error.raw_os_error(), Some(EINVAL | EMSGSIZE))
}

/// An I/O error in words a user can act on.
fn describe(error: &io::Error) -> String {
    const EBUSY: i32 = 16;
    const EEXIST: i32 = 17;
    match (error.kind(), error.raw_os_error()) {
        (io::ErrorKind::PermissionDenied, _) => {
            "permission denied; run as root or grant CAP_NET_ADMIN".to_owned()
        }
        (_, Some(EBUSY)) => "device busy; another process holds a device of that name".to_owned(),
        (_, Some(EEXIST)) => "already exists".to_owned(),
        _ => error.to_string(),
    }
}

/// An open TUN device, up, with its addresses.
pub struct Tun {
    device: Arc<AsyncDevice>,
    name: String,
    index: u32,
    refused: Arc<AtomicU64>,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun")
            .field("name", &self.name)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Tun {
    /// Creates (or attaches to) the TUN device, assigns the addresses and brings it up.
    pub fn open(config: &TunConfig) -> Result<Tun, Error> {
        let name = config.name.clone();
        let layer = match config.layer {
            Layer::Ip => tun_rs::Layer::L3,
            Layer::Ethernet => tun_rs::Layer::L2,
        };
        let device = DeviceBuilder::new()
            .name(&name)
            .layer(layer)
            .mtu(config.mtu)
            .tx_queue_len(config.queue_len)
            .offload(config.offload && config.layer == Layer::Ip)
            .enable(true)
            .build_async()
            .map_err(|source| Error::Open {
                name: name.clone(),
                source,
            })?;
        for &(address, prefix) in &config.addresses {
            let result = match address {
                IpAddr::V4(v4) => device.add_address_v4(v4, prefix),
                IpAddr::V6(v6) => device.add_address_v6(v6, prefix),
            };
            result.map_err(|source| Error::Address {
                name: name.clone(),
                address,
                prefix,
                source,
            })?;
        }
        let index = device.if_index().map_err(|source| Error::Index {
            name: name.clone(),
            source,
        })?;
        Ok(Tun {
            device: Arc::new(device),
            name,
            index,
            refused: Arc::default(),
        })
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Interface index, for routes.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Packets the kernel refused to take (a frame it finds malformed, or too large), counted
    /// as they are dropped; readable while [`Tun::spawn`]'s task runs.
    pub fn refused_writes(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.refused)
    }

    /// Whether the device offloads: it then reads and writes virtio-net frames
    /// ([`crate::vnet`]), and the stack on its link must be told so.
    pub fn offload(&self) -> bool {
        self.device.tcp_gso()
    }

    /// Pumps packets between the device and `link` until either side closes. The returned
    /// task ends with the device error that stopped it, or `Ok` when the link closed.
    pub fn spawn(self, link: Link) -> JoinHandle<io::Result<()>> {
        let largest = if self.offload() {
            vnet::HEADER_LEN + usize::from(u16::MAX)
        } else {
            usize::from(self.device.mtu().unwrap_or(1500)).max(1280) + FRAME_OVERHEAD
        };
        let (mut inbound, outbound) = link.split();
        let reader = Arc::clone(&self.device);
        let writer = self.device;
        let refused = self.refused;
        tokio::spawn(async move {
            let read = async move {
                let mut arena = BytesMut::zeroed(READ_ARENA);
                loop {
                    if arena.len() < largest {
                        arena = BytesMut::zeroed(READ_ARENA.max(4 * largest));
                    }
                    let n = reader.recv(&mut arena).await?;
                    let packet = arena.split_to(n).freeze();
                    if outbound.send(packet).await.is_err() {
                        return Ok::<(), io::Error>(());
                    }
                }
            };
            let write = async move {
                let mut batch = Vec::with_capacity(BATCH);
                while inbound.recv_many(&mut batch, BATCH).await > 0 {
                    for packet in batch.drain(..) {
                        if let Err(error) = writer.send(&packet).await {
                            if !refused_packet(&error) {
                                return Err(error);
                            }
                            // One packet the kernel will not take (a frame it finds malformed,
                            // or too large): that packet is lost, the device lives on.
                            refused.fetch_add(1, Ordering::Relaxed);
                            debug!(%error, len = packet.len(), "TUN refused a packet; dropped");
                        }
                    }
                }
                Ok::<(), io::Error>(())
            };
            tokio::select! {
                r = read => r,
                w = write => w,
            }
        })
    }
}
