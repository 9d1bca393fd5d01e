//! [`Source`]: where the engine's packets come from and go to. What each buffer is (an IP
//! packet, a virtio-net frame, an Ethernet frame) is part of the source, decided once when it
//! is made; the engine builds everything downstream from it, so a mismatch cannot be built.

#[cfg(unix)]
use std::os::fd::OwnedFd;

#[cfg(unix)]
use prism_device::FdKind;
use prism_device::{Framing, Link};

/// Packets the kernel may queue on a TUN opened by name unless told otherwise.
#[cfg(target_os = "linux")]
pub use prism_device::tun::DEFAULT_QUEUE;

/// Where the engine's packets come from.
#[derive(Debug)]
pub struct Source(pub(crate) Kind);

#[derive(Debug)]
pub(crate) enum Kind {
    /// A TUN or TAP the engine creates (or attaches to) by name.
    #[cfg(target_os = "linux")]
    Named {
        name: String,
        ethernet: bool,
        queue_len: u32,
        offload: bool,
    },
    /// A descriptor the product opened.
    #[cfg(unix)]
    Fd { fd: OwnedFd, kind: FdKind },
    /// Queues the product pumps itself.
    Queues { link: Link, ethernet: bool },
}

impl Source {
    /// A TUN created (or attached to) by name, with offload asked for (TCP segments of up to
    /// 64 KB both ways; the kernel may refuse, and the engine then uses plain packets).
    #[cfg(target_os = "linux")]
    pub fn tun(name: impl Into<String>) -> Source {
        Source(Kind::Named {
            name: name.into(),
            ethernet: false,
            queue_len: DEFAULT_QUEUE,
            offload: true,
        })
    }

    /// A TAP created (or attached to) by name: the engine is a gateway on that Ethernet
    /// segment ([`Builder::gateway`](crate::Builder::gateway) says with which addresses).
    #[cfg(target_os = "linux")]
    pub fn tap(name: impl Into<String>) -> Source {
        Source(Kind::Named {
            name: name.into(),
            ethernet: true,
            queue_len: DEFAULT_QUEUE,
            offload: false,
        })
    }

    /// A TUN or TAP the product opened itself (Android's `VpnService.establish()`, a helper's
    /// descriptor). The engine owns it from now on and closes it when it stops. `kind` says what
    /// its reads and writes carry.
    #[cfg(unix)]
    pub fn fd(fd: OwnedFd, kind: FdKind) -> Source {
        Source(Kind::Fd { fd, kind })
    }

    /// IP packets the product moves itself (iOS's `NEPacketTunnelFlow`, a Windows adapter, a
    /// test): the returned link is the device's end. What the product sends on it enters the
    /// engine; what it receives from it is for the device. `framing` says whether each buffer
    /// is a plain packet or a virtio-net frame.
    pub fn queues(framing: Framing, capacity: usize) -> (Source, Link) {
        let (engine, device) = Link::framed_pair(capacity, framing);
        (
            Source(Kind::Queues {
                link: engine,
                ethernet: false,
            }),
            device,
        )
    }

    /// Ethernet frames the product moves itself, as [`Source::queues`] does for IP packets.
    pub fn ethernet_queues(capacity: usize) -> (Source, Link) {
        let (engine, device) = Link::pair(capacity);
        (
            Source(Kind::Queues {
                link: engine,
                ethernet: true,
            }),
            device,
        )
    }

    /// On a TUN opened by name: do not ask for offload. Nothing for other sources.
    pub fn without_offload(mut self) -> Source {
        #[cfg(target_os = "linux")]
        if let Kind::Named { offload, .. } = &mut self.0 {
            *offload = false;
        }
        self
    }

    /// On a device opened by name: packets the kernel may queue for Prism ([`DEFAULT_QUEUE`]
    /// unless set). Nothing for other sources.
    pub fn queue_len(mut self, packets: u32) -> Source {
        #[cfg(target_os = "linux")]
        if let Kind::Named { queue_len, .. } = &mut self.0 {
            *queue_len = packets;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = packets;
        self
    }

    /// Whether the source carries Ethernet frames (a TAP).
    pub(crate) fn is_ethernet(&self) -> bool {
        match &self.0 {
            #[cfg(target_os = "linux")]
            Kind::Named { ethernet, .. } => *ethernet,
            #[cfg(unix)]
            Kind::Fd { kind, .. } => *kind == FdKind::Ethernet,
            Kind::Queues { ethernet, .. } => *ethernet,
        }
    }
}
