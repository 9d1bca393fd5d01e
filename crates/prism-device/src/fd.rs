//! [`FdDevice`]: a TUN or TAP the product opened itself, handed over as a file descriptor
//! (Android's `VpnService.establish()`, a utun descriptor, a helper process's TUN).
//!
//! What the descriptor's reads and writes carry cannot be read back from it reliably, so the
//! product says so once, in [`FdKind`]; the link the device is attached to carries the matching
//! [`Framing`], and everything downstream takes it from there.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;

use crate::pump::{self, PacketIo};
use crate::{Framing, Link, vnet};

/// What each read and write on a descriptor carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FdKind {
    /// Plain IP packets: a TUN opened with `IFF_TUN | IFF_NO_PI` (Android's VPN descriptor).
    Ip,
    /// A virtio-net header before each IP packet: a TUN opened with `IFF_VNET_HDR` and offload
    /// turned on with `TUNSETOFFLOAD` (TSO4, TSO6, checksums).
    IpVirtio,
    /// Ethernet frames: a TAP opened with `IFF_TAP | IFF_NO_PI`.
    Ethernet,
    /// A macOS or iOS utun descriptor (a `NEPacketTunnelProvider`'s, or one opened with
    /// `SYSPROTO_CONTROL`): each packet behind a 4-byte address family. The device strips it
    /// on reading and writes it before each packet.
    #[cfg(any(target_os = "macos", target_os = "ios"))]
    Utun,
}

impl FdKind {
    /// How the device's link frames what it carries.
    pub fn framing(self) -> Framing {
        match self {
            FdKind::IpVirtio => Framing::Virtio,
            FdKind::Ip | FdKind::Ethernet => Framing::Plain,
            #[cfg(any(target_os = "macos", target_os = "ios"))]
            FdKind::Utun => Framing::Plain,
        }
    }
}

/// A device open on a descriptor Prism now owns (it is closed when the device stops).
#[derive(Debug)]
pub struct FdDevice {
    fd: AsyncFd<File>,
    kind: FdKind,
    mtu: u16,
    refused: Arc<AtomicU64>,
}

impl FdDevice {
    /// Takes `fd`, which carries what `kind` says, on a device of IP MTU `mtu`. Makes it
    /// non-blocking. Must be called within a tokio runtime.
    pub fn new(fd: OwnedFd, kind: FdKind, mtu: u16) -> io::Result<FdDevice> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(&fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
        let file = File::from(fd);
        // SAFETY: `AsyncFd::register` needs the descriptor to stay open and unchanged while it
        // is registered. The `File` owns it, the `AsyncFd` owns the `File`, and nothing here
        // closes or replaces it: it is closed when the `AsyncFd` drops, after deregistering.
        #[allow(
            unsafe_code,
            reason = "tokio's only way to poll a descriptor; the File owns it for its whole life"
        )]
        let fd = unsafe { AsyncFd::register(file)? };
        Ok(FdDevice {
            fd,
            kind,
            mtu,
            refused: Arc::default(),
        })
    }

    /// What the descriptor carries.
    pub fn kind(&self) -> FdKind {
        self.kind
    }

    /// Packets the kernel refused to take, counted as they are dropped.
    pub fn refused_writes(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.refused)
    }

    /// Starts pumping between the descriptor and a new link, whose other end (carrying
    /// [`FdKind::framing`]) is returned. The task ends with the error that stopped the device,
    /// or `Ok` once that end is dropped.
    pub fn spawn(self, capacity: usize) -> (Link, JoinHandle<io::Result<()>>) {
        let (ours, theirs) = Link::framed_pair(capacity, self.kind.framing());
        let largest = match self.kind {
            FdKind::IpVirtio => vnet::HEADER_LEN + usize::from(u16::MAX),
            FdKind::Ip | FdKind::Ethernet => {
                usize::from(self.mtu).max(1280) + crate::FRAME_OVERHEAD
            }
            #[cfg(any(target_os = "macos", target_os = "ios"))]
            FdKind::Utun => usize::from(self.mtu).max(1280) + utun::HEADER_LEN,
        };
        let refused = Arc::clone(&self.refused);
        (theirs, pump::spawn(self, ours, largest, refused, false))
    }
}

impl PacketIo for FdDevice {
    #[cfg_attr(
        not(any(target_os = "macos", target_os = "ios")),
        allow(
            clippy::never_loop,
            reason = "only a utun read loops (one too short to carry a packet)"
        )
    )]
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let n = loop {
                let mut guard = self.fd.readable().await?;
                if let Ok(result) = guard.try_io(|fd| fd.get_ref().read(buf)) {
                    break result?;
                }
            };
            if n == 0 {
                // The descriptor's end: the pump stops rather than read empty for ever.
                return Ok(0);
            }
            #[cfg(any(target_os = "macos", target_os = "ios"))]
            if self.kind == FdKind::Utun {
                // A read too short for the family header carries nothing: read the next.
                match utun::strip(buf, n) {
                    0 => continue,
                    packet => return Ok(packet),
                }
            }
            return Ok(n);
        }
    }

    async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        #[cfg(any(target_os = "macos", target_os = "ios"))]
        let header = (self.kind == FdKind::Utun).then(|| utun::header(packet));
        loop {
            let mut guard = self.fd.writable().await?;
            #[cfg(any(target_os = "macos", target_os = "ios"))]
            if let Some(header) = &header {
                let parts = [io::IoSlice::new(header), io::IoSlice::new(packet)];
                if let Ok(result) = guard.try_io(|fd| fd.get_ref().write_vectored(&parts)) {
                    return result.map(|n| n.saturating_sub(utun::HEADER_LEN));
                }
                continue;
            }
            if let Ok(result) = guard.try_io(|fd| fd.get_ref().write(packet)) {
                return result;
            }
        }
    }
}

/// The utun framing: a 4-byte address family (network byte order) before each packet.
#[cfg_attr(
    not(any(target_os = "macos", target_os = "ios")),
    allow(
        dead_code,
        reason = "utun exists only on Apple systems; tested everywhere"
    )
)]
mod utun {
    pub(super) const HEADER_LEN: usize = 4;
    /// Darwin's AF_INET and AF_INET6.
    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 30;

    /// Moves the packet read into `buf` (`n` bytes with the header) to its start; its length.
    pub(super) fn strip(buf: &mut [u8], n: usize) -> usize {
        if n <= HEADER_LEN {
            return 0;
        }
        buf.copy_within(HEADER_LEN..n, 0);
        n - HEADER_LEN
    }

    /// The header for an IP packet, by its version.
    pub(super) fn header(packet: &[u8]) -> [u8; HEADER_LEN] {
        let family = match packet.first().map(|b| b >> 4) {
            Some(6) => AF_INET6,
            _ => AF_INET,
        };
        family.to_be_bytes()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_family_header_comes_off_and_goes_on() {
            let mut buf = [0, 0, 0, 2, 0x45, 1, 2, 3, 9, 9];
            assert_eq!(strip(&mut buf, 8), 4);
            assert_eq!(buf[..4], [0x45, 1, 2, 3]);
            assert_eq!(
                strip(&mut buf, 3),
                0,
                "a read shorter than the header is empty"
            );
            assert_eq!(header(&[0x45]), [0, 0, 0, 2]);
            assert_eq!(header(&[0x60]), [0, 0, 0, 30]);
        }
    }
}
