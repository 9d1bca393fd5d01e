//! Linux TUN and TAP adapter on tun-rs: opens the device, gives it its addresses, and pumps
//! packets (TUN) or frames (TAP) between it and a [`Link`].
//!
//! The pump is shared with descriptor devices (`pump.rs`). Routes are not managed here (the
//! `prism` binary does that over netlink); this module only owns the device.

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;
use tracing::debug;
use tun_rs::{AsyncDevice, DeviceBuilder, GROTable};

use crate::pump::{self, PacketIo};
use crate::{FRAME_OVERHEAD, Framing, Link, vnet};

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
    /// kernel may refuse; [`Tun::framing`] says what was granted. Ignored for TAP.
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
    /// as they are dropped; readable while [`Tun::spawn`]'s task runs. Behind
    /// [`Tun::spawn_coalescing`], also frames read that could not be made plain (never
    /// expected from a kernel).
    pub fn refused_writes(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.refused)
    }

    /// How the device's link frames what it carries: virtio-net frames when the kernel
    /// granted offload.
    pub fn framing(&self) -> Framing {
        if self.device.tcp_gso() {
            Framing::Virtio
        } else {
            Framing::Plain
        }
    }

    /// Whether the kernel takes UDP super-packets on this TUN (UDP segmentation, Linux 6.2
    /// and later, with offload): what lets runs of UDP packets be written coalesced.
    pub fn udp_offload(&self) -> bool {
        self.device.tcp_gso() && self.device.udp_gso()
    }

    /// Starts pumping packets between the device and a new link, whose other end (carrying
    /// [`Tun::framing`]) is returned. The task ends with the device error that stopped it, or
    /// `Ok` once that end is dropped. When the kernel granted offload, runs of complete UDP
    /// packets on the link (what the relay brings back) are coalesced on their way to the
    /// kernel as [`Tun::spawn_coalescing`] does; the stack's own frames are written as they
    /// come, in order with the rest.
    pub fn spawn(self, capacity: usize) -> (Link, JoinHandle<io::Result<()>>) {
        self.spawn_with(capacity, false)
    }

    /// As [`Tun::spawn`], for a user of plain packets that moves many of them (the relay
    /// server): the link carries plain packets, and when the kernel granted offload the pump
    /// makes what it reads plain (super-packets split, checksums finished) and coalesces what it
    /// writes, as wireguard-go does: runs of one TCP or UDP flow's packets go to the kernel as
    /// one super-packet (UDP ones where the kernel takes UDP segmentation, Linux 6.2 and later),
    /// one write per run instead of one per packet.
    pub fn spawn_coalescing(self, capacity: usize) -> (Link, JoinHandle<io::Result<()>>) {
        self.spawn_with(capacity, true)
    }

    fn spawn_with(self, capacity: usize, plain: bool) -> (Link, JoinHandle<io::Result<()>>) {
        let framing = self.framing();
        let largest = match framing {
            Framing::Virtio => vnet::HEADER_LEN + usize::from(u16::MAX),
            Framing::Plain => {
                usize::from(self.device.mtu().unwrap_or(1500)).max(1280) + FRAME_OVERHEAD
            }
        };
        let offload = framing == Framing::Virtio;
        let split = plain && offload;
        let carried = if split { Framing::Plain } else { framing };
        let (ours, theirs) = Link::framed_pair(capacity, carried);
        let refused = Arc::clone(&self.refused);
        // Beside the stack's frames only UDP is coalesced: without UDP segmentation on the
        // TUN (before Linux 6.2) there is nothing to gain, only copies.
        let coalesce = split || (offload && self.device.udp_gso());
        let device = Device {
            device: self.device,
            coalescer: coalesce.then(|| tokio::sync::Mutex::new(Coalescer::default())),
            framed: !split,
        };
        (theirs, pump::spawn(device, ours, largest, refused, split))
    }
}

/// tun-rs's device as the pump sees it.
struct Device {
    device: Arc<AsyncDevice>,
    /// Present when writes are coalesced (the kernel granted offload, and UDP segmentation
    /// for a link of frames); one writer takes it for each batch.
    coalescer: Option<tokio::sync::Mutex<Coalescer>>,
    /// The link carries virtio-net frames: only those of complete UDP packets are coalesced,
    /// the rest written as they are. Otherwise it carries plain packets, all coalesced.
    framed: bool,
}

/// What a coalescing writer keeps from batch to batch.
#[derive(Default)]
struct Coalescer {
    table: GROTable,
    /// The batch, each packet copied behind room for its virtio-net header. tun-rs appends a
    /// flow's later packets to its first: that one's buffer (a run buffer) can grow into a
    /// super-packet, see [`Coalescer::push`].
    run: Vec<BytesMut>,
    /// Run buffers of batches written, for the next ones (at most [`SPARE`]).
    spare: Vec<BytesMut>,
    /// How the batch of frames being written is split.
    plan: Vec<Write>,
    /// Per UDP flow of the batch, the packet tun-rs will append the flow's next packets to.
    heads: Vec<Head>,
}

/// Run buffers kept for the next batches: 1 MiB.
const SPARE: usize = 16;

/// How a batch of frames is written, in its order: runs of complete UDP packets coalesced,
/// any other frame alone.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Write {
    Coalesced(std::ops::Range<usize>),
    Alone(usize),
}

/// Splits `batch` into its writes.
fn plan(batch: &[Bytes], out: &mut Vec<Write>) {
    out.clear();
    for (i, frame) in batch.iter().enumerate() {
        if vnet::plain_udp(frame).is_none() {
            out.push(Write::Alone(i));
        } else if let Some(Write::Coalesced(run)) = out.last_mut() {
            if run.end == i {
                run.end += 1;
            } else {
                out.push(Write::Coalesced(i..i + 1));
            }
        } else {
            out.push(Write::Coalesced(i..i + 1));
        }
    }
}

/// A run buffer's capacity: a 64 KB super-packet behind its header, and the room tun-rs asks
/// for (twice the header) before it appends to a buffer.
const RUN_BUFFER: usize = 2 * vnet::HEADER_LEN + u16::MAX as usize;
/// The most bytes of one super-packet: an IP packet's limit.
const RUN_LIMIT: usize = u16::MAX as usize;

/// A UDP packet that heads a coalesced write: later packets of its flow and length are
/// appended to its buffer, so only it needs room for a whole super-packet.
struct Head {
    flow: UdpFlow,
    /// The header fields tun-rs requires equal before it appends.
    fields: [u8; 4],
    len: usize,
    /// The super-packet's length so far: its own, and the payloads appended.
    run: usize,
}

/// A UDP flow as tun-rs keys it: the family, the addresses and the ports.
type UdpFlow = [u8; 37];

/// A UDP packet tun-rs may coalesce: its flow, the header fields it compares (IPv4's version
/// and header length, TOS, flag bits and TTL; IPv6's first byte, traffic class and hop limit),
/// and the length of its IP and UDP headers. `None` for any other packet, and for those tun-rs
/// leaves alone (IPv4 with options or fragmented, no payload).
fn udp_candidate(packet: &[u8]) -> Option<(UdpFlow, [u8; 4], usize)> {
    const UDP: u8 = 17;
    let first = *packet.first()?;
    let (fields, addresses, headers) = match first >> 4 {
        4 if first & 0x0f == 5 && *packet.get(9)? == UDP => {
            let flags = *packet.get(6)?;
            let fragment = flags & 0x3f != 0 || *packet.get(7)? != 0;
            if fragment {
                return None;
            }
            let fields = [first, *packet.get(1)?, flags >> 5, *packet.get(8)?];
            (fields, packet.get(12..20)?, 28)
        }
        6 if *packet.get(6)? == UDP => {
            let fields = [first, packet.get(1)? >> 4, *packet.get(7)?, 0];
            (fields, packet.get(8..40)?, 48)
        }
        _ => return None,
    };
    if packet.len() <= headers {
        return None;
    }
    let ports = packet.get(headers - 8..headers - 4)?;
    let family = [first >> 4];
    let mut flow = [0; 37];
    let key = addresses.iter().chain(ports).chain(&family);
    flow.iter_mut().zip(key).for_each(|(to, from)| *to = *from);
    Some((flow, fields, headers))
}

/// Whether a packet is TCP (over IPv4, or IPv6 without extension headers).
fn tcp(packet: &[u8]) -> bool {
    const TCP: u8 = 6;
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet.get(9) == Some(&TCP),
        Some(6) => packet.get(6) == Some(&TCP),
        _ => false,
    }
}

impl Coalescer {
    /// Copies a plain packet into the run, behind room for its header. tun-rs appends a UDP
    /// flow's packets to the last one that heads it, as long as the header fields it compares
    /// are equal, they are no longer than it and the super-packet stays an IP packet; those
    /// get a buffer of their own size, and only a
    /// head takes a run buffer from the spares. TCP, which tun-rs may also prepend, always
    /// gets a run buffer; any other packet is written alone. (A guess that is wrong costs
    /// coalescing, never bytes: tun-rs appends only where the head's buffer has room.)
    fn push(&mut self, packet: &[u8]) {
        let len = packet.len();
        let Some((flow, fields, headers)) = udp_candidate(packet) else {
            let buf = match tcp(packet) {
                true => self.run_buffer(),
                false => BytesMut::with_capacity(vnet::HEADER_LEN + len),
            };
            return self.push_into(buf, packet);
        };
        let payload = len - headers;
        // tun-rs looks at the last packet it kept for the flow: the head.
        let head = self.heads.iter_mut().find(|head| head.flow == flow);
        let buf = match head {
            Some(head)
                if head.fields == fields && len <= head.len && head.run + payload <= RUN_LIMIT =>
            {
                head.run = match len < head.len {
                    // A shorter packet ends its head's super-packet.
                    true => RUN_LIMIT,
                    false => head.run + payload,
                };
                BytesMut::with_capacity(vnet::HEADER_LEN + len)
            }
            _ => {
                let new = Head {
                    flow,
                    fields,
                    len,
                    run: len,
                };
                match head {
                    Some(head) => *head = new,
                    None => self.heads.push(new),
                }
                self.run_buffer()
            }
        };
        self.push_into(buf, packet);
    }

    fn run_buffer(&mut self) -> BytesMut {
        self.spare
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(RUN_BUFFER))
    }

    fn push_into(&mut self, mut buf: BytesMut, packet: &[u8]) {
        buf.clear();
        buf.resize(vnet::HEADER_LEN, 0);
        buf.extend_from_slice(packet);
        self.run.push(buf);
    }
}

impl Device {
    /// Writes the run gathered so far, coalesced, and empties it.
    async fn flush(&self, c: &mut Coalescer, refused: &AtomicU64) -> io::Result<()> {
        if c.run.is_empty() {
            return Ok(());
        }
        let result = self
            .device
            .send_multiple(&mut c.table, &mut c.run, vnet::HEADER_LEN)
            .await;
        let count = c.run.len();
        let keep = SPARE.saturating_sub(c.spare.len());
        let runs = c.run.drain(..).filter(|buf| buf.capacity() >= RUN_BUFFER);
        c.spare.extend(runs.take(keep));
        c.run.clear();
        c.heads.clear();
        match result {
            Ok(_) => Ok(()),
            // tun-rs refused the batch before writing (it checks each packet's length, which
            // these pass): every packet of it is lost.
            Err(error) if error.raw_os_error().is_none() => {
                refused.fetch_add(count as u64, Ordering::Relaxed);
                debug!(%error, count, "coalesced write refused; packets dropped");
                Ok(())
            }
            // tun-rs writes every packet of the batch and reports only the last error: counted
            // once, though more may have failed.
            Err(error) => pump::count_refused(error, count, refused),
        }
    }
}

impl PacketIo for Device {
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.device.recv(buf).await
    }

    async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.device.send(packet).await
    }

    async fn send_batch(&self, batch: &mut Vec<Bytes>, refused: &AtomicU64) -> io::Result<()> {
        let Some(coalescer) = &self.coalescer else {
            return pump::send_each(self, batch, refused).await;
        };
        let mut c = coalescer.lock().await;
        let c = &mut *c;
        if !self.framed {
            for packet in batch.drain(..) {
                // tun-rs refuses a whole batch with an empty packet in it; the kernel refuses
                // the packet alone.
                if packet.is_empty() {
                    refused.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.push(&packet);
                }
            }
            return self.flush(c, refused).await;
        }
        let mut writes = std::mem::take(&mut c.plan);
        plan(batch, &mut writes);
        for write in &writes {
            match write {
                Write::Coalesced(run) => {
                    // `plan` found each a complete UDP packet behind a plain header.
                    for frame in batch.get(run.clone()).unwrap_or_default() {
                        c.push(frame.get(vnet::HEADER_LEN..).unwrap_or_default());
                    }
                    self.flush(c, refused).await?;
                }
                Write::Alone(i) => {
                    let Some(frame) = batch.get(*i) else { continue };
                    if let Err(error) = self.device.send(frame).await {
                        pump::count_refused(error, frame.len(), refused)?;
                    }
                }
            }
        }
        c.plan = writes;
        batch.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn runs_of_udp_are_coalesced_and_everything_else_keeps_its_place() {
        let udp = vnet::frame(&{
            let mut p = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0];
            p.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
            p.extend_from_slice(&[0, 53, 4, 210, 0, 8, 0, 0]);
            p
        });
        let mut tcp = udp.to_vec();
        tcp[vnet::HEADER_LEN + 9] = 6;
        let tcp = Bytes::from(tcp);
        let batch = [&udp, &udp, &tcp, &udp, &tcp, &tcp, &udp].map(Bytes::clone);
        let mut writes = Vec::new();
        plan(&batch, &mut writes);
        assert_eq!(
            writes,
            [
                Write::Coalesced(0..2),
                Write::Alone(2),
                Write::Coalesced(3..4),
                Write::Alone(4),
                Write::Alone(5),
                Write::Coalesced(6..7),
            ]
        );
        plan(&[], &mut writes);
        assert!(writes.is_empty());
    }

    /// A complete UDP packet from `port` to port 53 carrying `len` bytes of `fill`, over
    /// IPv4 (10.0.0.1 -> 10.0.0.2) or IPv6 (fd00::1 -> fd00::2), with this TTL or hop limit.
    fn udp(v6: bool, port: u16, len: usize, fill: u8, ttl: u8) -> Vec<u8> {
        use smoltcp::phy::ChecksumCapabilities;
        use smoltcp::wire::{
            IpAddress, IpProtocol, IpRepr, Ipv4Address, Ipv6Address, UdpPacket, UdpRepr,
        };
        let (src, dst): (IpAddress, IpAddress) = match v6 {
            true => (
                Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).into(),
                Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).into(),
            ),
            false => (
                Ipv4Address::new(10, 0, 0, 1).into(),
                Ipv4Address::new(10, 0, 0, 2).into(),
            ),
        };
        let ip = IpRepr::new(src, dst, IpProtocol::Udp, 8 + len, ttl);
        let caps = ChecksumCapabilities::default();
        let mut bytes = vec![0; ip.header_len() + 8 + len];
        ip.emit(&mut bytes[..], &caps);
        let payload = vec![fill; len];
        let udp = UdpRepr {
            src_port: port,
            dst_port: 53,
        };
        udp.emit(
            &mut UdpPacket::new_unchecked(&mut bytes[ip.header_len()..]),
            &src,
            &dst,
            len,
            |buf| buf.copy_from_slice(&payload),
            &caps,
        );
        bytes
    }

    fn udp_v4(port: u16, len: usize, fill: u8) -> Vec<u8> {
        udp(false, port, len, fill, 64)
    }

    /// What tun-rs writes for a batch: each buffer it writes, whole (header and packet).
    fn coalesce(run: &mut [BytesMut]) -> Vec<Vec<u8>> {
        let mut to_write = Vec::new();
        tun_rs::handle_gro(
            run,
            vnet::HEADER_LEN,
            &mut Default::default(),
            &mut Default::default(),
            true,
            &mut to_write,
        )
        .unwrap();
        to_write.iter().map(|&i| run[i].to_vec()).collect()
    }

    /// Pushes `packets` as the coalescer does and as it did before (a run buffer for every
    /// packet), checks tun-rs writes the same bytes either way, and returns which buffers got
    /// a run buffer and how many writes there were.
    fn push_all(packets: &[Vec<u8>]) -> (Vec<usize>, usize) {
        let mut c = Coalescer::default();
        for packet in packets {
            c.push(packet);
        }
        let roomy = (0..c.run.len())
            .filter(|&i| c.run[i].capacity() >= RUN_BUFFER)
            .collect();
        let ours = coalesce(&mut c.run);
        let mut everyone = Coalescer::default();
        for packet in packets {
            everyone.push_into(BytesMut::with_capacity(RUN_BUFFER), packet);
        }
        let theirs = coalesce(&mut everyone.run);
        assert!(
            ours == theirs,
            "{} writes, not {}",
            ours.len(),
            theirs.len()
        );
        (roomy, ours.len())
    }

    #[test]
    fn only_the_heads_of_udp_runs_get_room_for_a_super_packet_and_the_runs_still_coalesce() {
        // Sixty datagrams of one flow with a packet of another protocol among them, then
        // a datagram of another flow.
        let mut packets: Vec<Vec<u8>> = (0..60).map(|i| udp_v4(1000, 1200, i)).collect();
        let mut icmp = udp_v4(1000, 1200, 0);
        icmp[9] = 1;
        packets.insert(30, icmp);
        packets.push(udp_v4(2000, 1200, 0));
        // The first datagram; the 55th (28 bytes of headers and 54 payloads of 1,200 fill
        // 64,828 bytes of the 65,535 an IP packet may have), the 56th buffer with the other
        // packet before it; the other flow. Four writes: two super-packets, the other
        // protocol's packet, the other flow's.
        assert_eq!(push_all(&packets), (vec![0, 55, 61], 4));
    }

    #[test]
    fn a_shorter_datagram_ends_its_heads_super_packet() {
        let packets = [1200, 1200, 800, 1200].map(|len| udp_v4(1000, len, 0));
        assert_eq!(push_all(&packets), (vec![0, 3], 2));
    }

    #[test]
    fn interleaved_flows_each_keep_their_head() {
        let packets: Vec<Vec<u8>> = (0..40)
            .map(|i| udp_v4(1000 + u16::from(i % 2), 1200, i))
            .collect();
        assert_eq!(push_all(&packets), (vec![0, 1], 2));
    }

    #[test]
    fn ipv6_runs_and_a_changed_hop_limit_coalesce_as_tun_rs_does() {
        // 48 bytes of headers and 53 payloads fit; the 55th packet heads a second run.
        let mut packets: Vec<Vec<u8>> = (0..60).map(|i| udp(true, 1000, 1200, i, 64)).collect();
        assert_eq!(push_all(&packets), (vec![0, 54], 2));
        // Another hop limit cannot be appended: it heads a run of its own.
        packets.truncate(10);
        packets.insert(5, udp(true, 1000, 1200, 0, 63));
        assert_eq!(push_all(&packets), (vec![0, 5, 6], 3));
    }

    #[test]
    fn tcp_always_gets_a_run_buffer() {
        // tun-rs may append to a TCP packet or prepend it to another.
        let mut c = Coalescer::default();
        let tcp = vnet::tests::tcp_v4(100);
        c.push(&tcp);
        c.push(&tcp);
        assert!(c.run.iter().all(|b| b.capacity() >= RUN_BUFFER));
    }
}
