//! [`Udp`]: the relay's UDP socket, moving datagrams in batches, on both ends.
//!
//! Sending: datagrams are sealed one after another into one reused buffer ([`Outgoing`]), and
//! each run of equal-sized datagrams to one address leaves in a single `sendmsg` with UDP
//! segmentation offload (GSO, `UDP_SEGMENT`; the last of a run may be shorter). Receiving:
//! `recvmmsg` takes up to [`READS`] reads at once, and each read may hold many datagrams the
//! kernel coalesced (GRO). Where the kernel offers neither, one datagram a call.
//!
//! Only Linux's system calls through `nix`, rather than a crate such as `quinn-udp`: that one
//! sets "don't fragment" on the socket, and the relay relies on the kernel fragmenting a
//! datagram too large for the path (a full-size packet from the server's TUN, sealed). A GSO
//! run the kernel refuses (a segment beyond the path's MTU, a device without GSO) is sent again
//! one datagram at a time, which fragments as before.
//!
//! The socket's buffers are raised to [`SOCKET_BUFFER`] (beyond `net.core.rmem_max` when Prism
//! may, as wireguard-go does): a burst at link rate must not overflow them while the task is
//! away.

use std::io;
#[cfg(target_os = "linux")]
use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::BytesMut;
#[cfg(target_os = "linux")]
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmsg,
};
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::Counters;

/// Send and receive buffer asked of the kernel for a relay socket.
pub(crate) const SOCKET_BUFFER: usize = 7 << 20;
/// One read's room: the largest UDP payload, or the datagrams GRO coalesced (Linux stops
/// coalescing below 64 KiB).
const MAX_UDP: usize = 65535;
/// The most bytes one GSO send carries: a UDP datagram's limit over IPv4.
const MAX_RUN: usize = 65507;
/// Reads one receive call may fill.
const READS: usize = 8;
/// Most datagrams one GSO send carries (Linux's `UDP_MAX_SEGMENTS`).
const MAX_SEGMENTS: usize = 64;
/// Bytes of copies of received datagrams before a fresh arena is allocated.
const ARENA: usize = 256 * 1024;

/// A UDP socket that sends and receives in batches.
#[derive(Debug)]
pub(crate) struct Udp {
    socket: UdpSocket,
    /// The address the socket is connected to, if it is: sends to it name no address (BSD
    /// kernels refuse one on a connected socket, and Linux then skips its route lookup).
    peer: Option<SocketAddr>,
    /// Whether to send runs with GSO: the kernel has `UDP_SEGMENT`, and no device refused
    /// it.
    gso: AtomicBool,
    /// Runs only of datagrams shorter than this: a longer one was refused as a run (a
    /// segment beyond the path's MTU); those go one at a time, and may fragment.
    gso_below: AtomicUsize,
}

/// Datagrams sealed for one batched send.
#[derive(Default)]
pub(crate) struct Outgoing {
    bytes: Vec<u8>,
    datagrams: Vec<(SocketAddr, Range<usize>)>,
}

impl Outgoing {
    /// Appends the datagram `write` appends to the buffer it is given, for `to`; nothing when
    /// it fails.
    pub(crate) fn push<E>(
        &mut self,
        to: SocketAddr,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = self.bytes.len();
        match write(&mut self.bytes) {
            Ok(()) => {
                self.datagrams.push((to, start..self.bytes.len()));
                Ok(())
            }
            Err(error) => {
                self.bytes.truncate(start);
                Err(error)
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.datagrams.clear();
    }
}

/// Where a batch of datagrams is read, and the copies handed on.
pub(crate) struct Incoming {
    reads: Vec<u8>,
    arena: BytesMut,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("datagrams", &self.datagrams.len())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("reads", &self.reads.len())
            .finish_non_exhaustive()
    }
}

/// What a batched send did: datagrams the kernel took, and those it refused (with the last
/// error), which are lost.
#[derive(Debug, Default)]
pub(crate) struct Sent {
    pub(crate) sent: usize,
    pub(crate) refused: usize,
    /// Runs the kernel refused to segment, sent one datagram at a time instead.
    pub(crate) runs_refused: usize,
    pub(crate) error: Option<io::Error>,
}

impl Sent {
    /// Adds what was sent to `sent`, what was refused to `drop_send` and the runs sent one by
    /// one to `gso_refused`; the error, if any.
    pub(crate) fn counted(self, counters: &Counters) -> Option<io::Error> {
        counters.sent.fetch_add(self.sent as u64, Ordering::Relaxed);
        counters
            .drop_send
            .fetch_add(self.refused as u64, Ordering::Relaxed);
        counters
            .gso_refused
            .fetch_add(self.runs_refused as u64, Ordering::Relaxed);
        self.error
    }
}

/// One read of a receive call: its length, the size of each datagram in it (GRO), and the
/// sender.
type Read = (usize, usize, Option<SocketAddr>);

impl Udp {
    /// Takes over `socket` (non-blocking, bound, and connected to `peer` if that is given).
    pub(crate) fn new(socket: std::net::UdpSocket, peer: Option<SocketAddr>) -> io::Result<Udp> {
        raise_buffers(&socket);
        // Both offloads are optional: without them a read or a send is one datagram. A kernel
        // without GSO (before 4.18) would ignore the segment size and send a whole run as one
        // datagram: GSO is used only where the option exists.
        #[cfg(target_os = "linux")]
        let gso = {
            use nix::sys::socket::{getsockopt, setsockopt, sockopt};
            let _ = setsockopt(&socket, sockopt::UdpGroSegment, &true);
            getsockopt(&socket, sockopt::UdpGsoSegment).is_ok()
        };
        #[cfg(not(target_os = "linux"))]
        let gso = false;
        Ok(Udp {
            socket: UdpSocket::from_std(socket)?,
            peer,
            gso: AtomicBool::new(gso),
            gso_below: AtomicUsize::new(usize::MAX),
        })
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Buffers for [`Udp::recv`] on this socket.
    pub(crate) fn incoming(&self) -> Incoming {
        Incoming {
            reads: vec![0; READS * MAX_UDP],
            arena: BytesMut::new(),
        }
    }

    /// Sends every datagram of `out` and empties it. Waits while the socket's buffer is full.
    pub(crate) async fn send(&self, out: &mut Outgoing) -> Sent {
        let mut result = Sent::default();
        let mut rest = &out.datagrams[..];
        while let Some(((to, first), _)) = rest.split_first() {
            let size = first.len();
            // A run: datagrams to the same address, each as long as the first (the last may be
            // shorter), within what one send may carry.
            let most = if self.gso.load(Ordering::Relaxed)
                && size < self.gso_below.load(Ordering::Relaxed)
            {
                MAX_SEGMENTS.min(MAX_RUN / size.max(1)).max(1)
            } else {
                1
            };
            // Datagrams lie one after another in `out.bytes`: a run is one slice of it.
            let mut count = 1;
            let mut end = first.end;
            for (next_to, range) in rest.iter().skip(1).take(most - 1) {
                if next_to != to || range.len() > size {
                    break;
                }
                count += 1;
                end = range.end;
                if range.len() < size {
                    break;
                }
            }
            let run = rest.get(..count).unwrap_or_default();
            let contents = out.bytes.get(first.start..end).unwrap_or_default();
            match self
                .send_one(contents, *to, (count > 1).then_some(size))
                .await
            {
                Ok(()) => result.sent += count,
                Err(error) if count > 1 => {
                    // Refused as a run: one at a time, which the kernel may fragment. A device
                    // that cannot segment at all says so with EIO (GSO off from then on);
                    // segments too long for the path with EINVAL (runs stay below this size).
                    // Any other error (a full buffer, a refusal the peer sent back) concerns
                    // the datagrams, not GSO: they are tried one by one all the same.
                    match gso_refusal(&error) {
                        Some(Refusal::Unsupported) => self.gso.store(false, Ordering::Relaxed),
                        Some(Refusal::TooLong) => {
                            result.runs_refused += 1;
                            self.gso_below.fetch_min(size, Ordering::Relaxed);
                        }
                        None => {}
                    }
                    for (to, range) in run {
                        let datagram = out.bytes.get(range.clone()).unwrap_or_default();
                        match self.send_one(datagram, *to, None).await {
                            Ok(()) => result.sent += 1,
                            Err(error) => {
                                result.refused += 1;
                                result.error = Some(error);
                            }
                        }
                    }
                }
                Err(error) => {
                    result.refused += 1;
                    result.error = Some(error);
                }
            }
            rest = rest.get(count..).unwrap_or_default();
        }
        out.clear();
        result
    }

    /// Sends `contents` to `to`: one datagram, or with `segment`, datagrams of that size.
    #[cfg(target_os = "linux")]
    async fn send_one(
        &self,
        contents: &[u8],
        to: SocketAddr,
        segment: Option<usize>,
    ) -> io::Result<()> {
        let address = SockaddrStorage::from(to);
        let address = (self.peer != Some(to)).then_some(&address);
        let iov = [IoSlice::new(contents)];
        let size = segment.and_then(|s| u16::try_from(s).ok());
        let gso = size.as_ref().map(ControlMessage::UdpGsoSegments);
        let cmsgs = gso.as_slice();
        let fd = self.socket.as_raw_fd();
        self.socket
            .async_io(Interest::WRITABLE, || {
                sendmsg(fd, &iov, cmsgs, MsgFlags::empty(), address)
                    .map(|_| ())
                    .map_err(io::Error::from)
            })
            .await
    }

    /// Sends `contents` to `to` as one datagram (no GSO here: `segment` is never set).
    #[cfg(not(target_os = "linux"))]
    async fn send_one(
        &self,
        contents: &[u8],
        to: SocketAddr,
        _segment: Option<usize>,
    ) -> io::Result<()> {
        self.send_to(contents, to).await.map(|_| ())
    }

    /// Waits for datagrams, then hands each received at once to `each` (a copy of it, with its
    /// sender), in order.
    pub(crate) async fn recv(
        &self,
        incoming: &mut Incoming,
        mut each: impl FnMut(BytesMut, SocketAddr),
    ) -> io::Result<()> {
        let Incoming { reads, arena } = incoming;
        let got: Vec<Read> = self
            .socket
            .async_io(Interest::READABLE, || receive(&self.socket, reads))
            .await?;
        for ((len, stride, from), read) in got.into_iter().zip(reads.chunks(MAX_UDP)) {
            let Some(from) = from else { continue };
            let data = read.get(..len).unwrap_or_default();
            if data.is_empty() {
                // An empty datagram: the receiver counts it (too short).
                each(BytesMut::new(), from);
                continue;
            }
            for datagram in data.chunks(stride.max(1)) {
                if arena.capacity() - arena.len() < datagram.len() {
                    *arena = BytesMut::with_capacity(ARENA.max(datagram.len()));
                }
                arena.extend_from_slice(datagram);
                each(arena.split(), from);
            }
        }
        Ok(())
    }

    /// Sends one datagram now, if the socket's buffer has room.
    pub(crate) fn try_send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<usize> {
        match self.peer == Some(to) {
            true => self.socket.try_send(datagram),
            false => self.socket.try_send_to(datagram, to),
        }
    }

    /// Sends one datagram, waiting for room.
    pub(crate) async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<usize> {
        match self.peer == Some(to) {
            true => self.socket.send(datagram).await,
            false => self.socket.send_to(datagram, to).await,
        }
    }
}

/// Why the kernel refused a run of datagrams as one GSO send, if it was GSO it refused.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// The device cannot segment (`EIO`).
    Unsupported,
    /// The segments are longer than the path allows (`EINVAL`, or `EMSGSIZE`).
    TooLong,
}

#[cfg(target_os = "linux")]
fn gso_refusal(error: &io::Error) -> Option<Refusal> {
    use nix::errno::Errno;
    match error.raw_os_error().map(Errno::from_raw) {
        Some(Errno::EIO) => Some(Refusal::Unsupported),
        Some(Errno::EINVAL | Errno::EMSGSIZE) => Some(Refusal::TooLong),
        _ => None,
    }
}

#[cfg(not(target_os = "linux"))]
fn gso_refusal(_error: &io::Error) -> Option<Refusal> {
    None
}

/// One `recvmmsg` into `reads` ([`READS`] reads of [`MAX_UDP`] bytes), not waiting.
#[cfg(target_os = "linux")]
fn receive(socket: &UdpSocket, reads: &mut [u8]) -> io::Result<Vec<Read>> {
    let fd = socket.as_raw_fd();
    let mut headers =
        MultiHeaders::<SockaddrStorage>::preallocate(READS, Some(nix::cmsg_space!(i32)));
    let mut slices: Vec<[IoSliceMut<'_>; 1]> = reads
        .chunks_mut(MAX_UDP)
        .map(|read| [IoSliceMut::new(read)])
        .collect();
    let results = recvmmsg(
        fd,
        &mut headers,
        slices.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    )?;
    let mut got = Vec::with_capacity(READS);
    for message in results {
        let stride = message
            .cmsgs()
            .ok()
            .into_iter()
            .flatten()
            .find_map(|cmsg| match cmsg {
                ControlMessageOwned::UdpGroSegments(size) => usize::try_from(size).ok(),
                _ => None,
            })
            .unwrap_or(message.bytes);
        let from = message.address.and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::V4((*v4).into()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())))
        });
        got.push((message.bytes, stride, from));
    }
    Ok(got)
}

/// One datagram into the first read of `reads`, not waiting.
#[cfg(not(target_os = "linux"))]
fn receive(socket: &UdpSocket, reads: &mut [u8]) -> io::Result<Vec<Read>> {
    let read = reads.get_mut(..MAX_UDP).unwrap_or_default();
    let (len, from) = socket.try_recv_from(read)?;
    Ok(vec![(len, len, Some(from))])
}
/// Raises the socket's buffers to [`SOCKET_BUFFER`]: past the system's limit where Prism has
/// the privilege (`SO_RCVBUFFORCE`), else as far as the limit allows.
fn raise_buffers(socket: &std::net::UdpSocket) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use nix::sys::socket::{setsockopt, sockopt};
        if setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_ok()
            && setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_ok()
        {
            return;
        }
    }
    let socket = socket2::SockRef::from(socket);
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn bound() -> Udp {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        Udp::new(socket, None).unwrap()
    }

    fn datagram(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 7 + j) as u8).collect()
    }

    /// Runs of equal sizes (GSO), sizes that change mid-run, a shorter last one, and two
    /// receivers: every datagram arrives whole, in order, at its own receiver.
    #[tokio::test]
    async fn a_batch_arrives_whole_and_in_order() {
        let (sender, a, b) = (bound(), bound(), bound());
        let (to_a, to_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut sizes: Vec<(SocketAddr, usize)> = Vec::new();
        sizes.extend((0..70).map(|_| (to_a, 1200)));
        sizes.extend([
            (to_a, 700),
            (to_a, 1200),
            (to_b, 1200),
            (to_b, 1200),
            (to_a, 64),
        ]);
        sizes.extend((0..5).map(|i| (to_b, 100 + i)));
        let mut out = Outgoing::default();
        for (i, (to, len)) in sizes.iter().enumerate() {
            out.push(*to, |buf| {
                buf.extend_from_slice(&datagram(i, *len));
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        // This kernel has GSO: the runs above went out as runs.
        assert!(sender.gso.load(Ordering::Relaxed), "no UDP GSO here");
        let sent = sender.send(&mut out).await;
        assert_eq!((sent.sent, sent.refused), (sizes.len(), 0));
        assert!(out.is_empty());
        assert!(
            sender.gso.load(Ordering::Relaxed)
                && sender.gso_below.load(Ordering::Relaxed) == usize::MAX,
            "a run was refused"
        );

        for (receiver, to) in [(&a, to_a), (&b, to_b)] {
            let expected: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .filter(|(_, (t, _))| *t == to)
                .map(|(i, (_, len))| datagram(i, *len))
                .collect();
            let mut incoming = receiver.incoming();
            let mut got = Vec::new();
            while got.len() < expected.len() {
                receiver
                    .recv(&mut incoming, |d, from| {
                        assert_eq!(from, sender.local_addr().unwrap());
                        got.push(d.to_vec());
                    })
                    .await
                    .unwrap();
            }
            assert_eq!(got, expected);
        }
    }
}
