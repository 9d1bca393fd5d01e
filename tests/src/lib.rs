//! Test harness: a TCP client that is a second smoltcp interface on an in-memory link, and
//! helpers to build and read raw packets. The stack under test is a real [`prism_stack::Stack`]
//! on the other end of the link.
//!
//! Invariant: the harness never reaches into the stack; it only sends and receives packets, as
//! a kernel on the far side of a TUN would.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test harness: a failure should stop the test loudly"
)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use prism_device::{Link, Medium, PrismDevice};
use prism_stack::{Config, Requests, Stack};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    HardwareAddress, Icmpv4Packet, Icmpv6Packet, IpAddress, IpCidr, IpProtocol, IpRepr, Ipv4Packet,
    Ipv6Packet, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};
use tokio::time::{Instant, timeout};

/// How long any harness wait may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Starts a stack on an in-memory link and returns its far end, its requests and counters.
pub fn start_stack(config: Config) -> (Link, Requests, std::sync::Arc<prism_stack::Counters>) {
    let (stack_end, client_end) = Link::pair(4096);
    let (stack, requests) = Stack::new(config, stack_end);
    let counters = stack.counters();
    tokio::spawn(stack.run());
    (client_end, requests, counters)
}

/// Stands in for an offloading TUN's kernel between a plain client and a link of virtio-net
/// frames: the client's packets get a plain header; the stack's frames are made plain (partial
/// checksums finished, super-packets segmented). Returns the end the client should use; the
/// task ends when either side closes.
pub fn virtio_kernel(device: Link) -> (Link, tokio::task::JoinHandle<()>) {
    use prism_device::vnet;
    assert_eq!(device.framing(), prism_device::Framing::Virtio);
    let (client, ours) = Link::pair(4096);
    let (mut from_client, to_client) = ours.split();
    let (mut from_stack, to_stack) = device.split();
    let task = tokio::spawn(async move {
        let mut batch = Vec::new();
        let mut frames = Vec::new();
        let mut plain = Vec::new();
        loop {
            tokio::select! {
                n = from_client.recv_many(&mut batch, 64) => {
                    if n == 0 {
                        return;
                    }
                    for packet in batch.drain(..) {
                        if to_stack.send(vnet::frame(&packet)).await.is_err() {
                            return;
                        }
                    }
                }
                n = from_stack.recv_many(&mut frames, 64) => {
                    if n == 0 {
                        return;
                    }
                    for frame in frames.drain(..) {
                        vnet::to_plain(&frame, &mut plain).expect("a frame the kernel takes");
                        for packet in plain.drain(..) {
                            if to_client.send(packet).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    });
    (client, task)
}

/// A smoltcp TCP client on the far side of the link.
#[allow(
    missing_debug_implementations,
    reason = "smoltcp's Interface is not Debug"
)]
pub struct Client {
    iface: Interface,
    device: PrismDevice,
    sockets: SocketSet<'static>,
    link: Link,
    epoch: Instant,
    batch: Vec<Bytes>,
}

impl Client {
    /// A client with addresses 10.0.0.2/24 and fd00::2/64.
    pub fn new(link: Link) -> Self {
        let mut device = PrismDevice::new(Medium::Ip, 1500);
        let mut iface = Interface::new(
            IfaceConfig::new(HardwareAddress::Ip),
            &mut device,
            smoltcp::time::Instant::ZERO,
        );
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::v4(10, 0, 0, 2), 24)).unwrap();
            a.push(IpCidr::new(IpAddress::v6(0xfd00, 0, 0, 0, 0, 0, 0, 2), 64))
                .unwrap();
        });
        Self {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            link,
            epoch: Instant::now(),
            batch: Vec::new(),
        }
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Opens a connection from `local` to `remote` with `buffer` bytes each way.
    pub fn connect(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        buffer: usize,
    ) -> SocketHandle {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; buffer]),
            tcp::SocketBuffer::new(vec![0; buffer]),
        );
        socket.set_nagle_enabled(false);
        let cx = self.iface.context();
        socket
            .connect(
                cx,
                (IpAddress::from(remote.ip()), remote.port()),
                (IpAddress::from(local.ip()), local.port()),
            )
            .unwrap();
        self.sockets.add(socket)
    }

    /// The socket behind `handle`.
    pub fn socket(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    /// Removes a socket.
    pub fn remove(&mut self, handle: SocketHandle) {
        self.sockets.remove(handle);
    }

    /// One round: deliver what arrived, let smoltcp act, send what it produced, then wait for
    /// the next packet or smoltcp's next deadline (at most 5 ms).
    pub async fn step(&mut self) {
        let now = self.now();
        for packet in self.batch.drain(..) {
            self.device.push_rx(packet);
        }
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        while let Some(p) = self.device.pop_tx() {
            self.link.send(p).await.expect("stack gone");
        }
        let wait = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(Duration::from_millis(5))
            .min(Duration::from_millis(5));
        if let Ok(r) = timeout(wait, self.link.recv_batch(&mut self.batch)).await {
            r.expect("stack gone");
        }
    }

    /// Takes in everything the stack sent before it stopped (its end of the link is gone), and
    /// lets the client's interface act on it; what the client would answer is discarded.
    pub async fn absorb_last(&mut self) {
        while let Ok(n) = self.link.recv_batch(&mut self.batch).await {
            assert!(n > 0);
        }
        let now = self.now();
        for packet in self.batch.drain(..) {
            self.device.push_rx(packet);
        }
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        while self.device.pop_tx().is_some() {}
    }

    /// Steps until `check` returns `Some`, failing the test after [`PATIENCE`].
    pub async fn until<T>(
        &mut self,
        what: &str,
        mut check: impl FnMut(&mut Self) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(t) = check(self) {
                return t;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.step().await;
        }
    }

    /// Sends all of `data` on `handle`, stepping as needed.
    pub async fn send_all(&mut self, handle: SocketHandle, data: &[u8]) {
        let mut sent = 0;
        while sent < data.len() {
            let socket = self.socket(handle);
            assert!(
                socket.may_send(),
                "socket cannot send in state {}",
                socket.state()
            );
            sent += socket.send_slice(&data[sent..]).unwrap();
            self.step().await;
        }
    }

    /// Receives until end-of-stream, returning the bytes; fails on reset.
    pub async fn recv_to_end(&mut self, handle: SocketHandle) -> Vec<u8> {
        let mut out = Vec::new();
        self.until("end of stream", |c| {
            let socket = c.socket(handle);
            while socket.can_recv() {
                socket
                    .recv(|b| {
                        out.extend_from_slice(b);
                        (b.len(), ())
                    })
                    .unwrap();
            }
            match socket.state() {
                tcp::State::Closed
                | tcp::State::TimeWait
                | tcp::State::CloseWait
                | tcp::State::LastAck
                | tcp::State::Closing => Some(()),
                _ => None,
            }
        })
        .await;
        out
    }

    /// Sends a raw packet to the stack, bypassing the client's interface.
    pub async fn inject(&mut self, packet: Bytes) {
        self.link.send(packet).await.expect("stack gone");
    }

    /// Takes raw packets the stack sent, waiting up to `wait`. They are not given to the
    /// client's interface.
    pub async fn capture(&mut self, wait: Duration) -> Vec<Bytes> {
        let mut out = std::mem::take(&mut self.batch);
        let deadline = Instant::now() + wait;
        while let Ok(Ok(_)) =
            tokio::time::timeout_at(deadline, self.link.recv_batch(&mut out)).await
        {}
        out
    }
}

/// A TCP segment (IPv4 or IPv6, by the addresses) from `src` to `dst` with the given control
/// flag, sequence number and payload, checksums filled.
pub fn tcp_segment(
    src: SocketAddr,
    dst: SocketAddr,
    control: TcpControl,
    seq: u32,
    payload: &[u8],
) -> Bytes {
    match (src, dst) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => tcp_v4(src, dst, control, seq, payload),
        _ => tcp_v6(src, dst, control, seq, payload),
    }
}

fn tcp_repr(
    src: SocketAddr,
    dst: SocketAddr,
    control: TcpControl,
    seq: u32,
    payload: &[u8],
) -> TcpRepr<'_> {
    TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: None,
        window_len: 64240,
        window_scale: Some(7),
        max_seg_size: Some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    }
}

/// An IPv6 TCP segment, as [`tcp_v4`].
pub fn tcp_v6(
    src: SocketAddr,
    dst: SocketAddr,
    control: TcpControl,
    seq: u32,
    payload: &[u8],
) -> Bytes {
    assert!(src.is_ipv6() && dst.is_ipv6(), "IPv6 addresses expected");
    emit_tcp(src, dst, &tcp_repr(src, dst, control, seq, payload))
}

/// An IPv4 TCP segment from `src` to `dst` with the given control flag, sequence number and
/// payload, checksums filled.
pub fn tcp_v4(
    src: SocketAddr,
    dst: SocketAddr,
    control: TcpControl,
    seq: u32,
    payload: &[u8],
) -> Bytes {
    assert!(src.is_ipv4() && dst.is_ipv4(), "IPv4 addresses expected");
    emit_tcp(src, dst, &tcp_repr(src, dst, control, seq, payload))
}

/// A bare ACK (IPv4 or IPv6, by the addresses) with sequence number `seq` acknowledging up to
/// `ack`, checksums filled: what completes a handshake a test drives by hand.
pub fn tcp_ack(src: SocketAddr, dst: SocketAddr, seq: u32, ack: u32) -> Bytes {
    tcp_data(src, dst, seq, ack, &[])
}

/// An ACK carrying `payload`, as [`tcp_ack`].
pub fn tcp_data(src: SocketAddr, dst: SocketAddr, seq: u32, ack: u32, payload: &[u8]) -> Bytes {
    let mut tcp = tcp_repr(src, dst, TcpControl::None, seq, payload);
    tcp.ack_number = Some(TcpSeqNumber(ack as i32));
    tcp.window_scale = None;
    tcp.max_seg_size = None;
    emit_tcp(src, dst, &tcp)
}

/// `tcp` in an IP packet from `src` to `dst`, checksums filled (its ports are `tcp`'s): for a
/// segment with options the helpers above do not set.
pub fn emit_tcp(src: SocketAddr, dst: SocketAddr, tcp: &TcpRepr<'_>) -> Bytes {
    let caps = smoltcp::phy::ChecksumCapabilities::default();
    let (src, dst) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip()));
    let ip = IpRepr::new(src, dst, IpProtocol::Tcp, tcp.buffer_len(), 64);
    let mut bytes = vec![0u8; ip.buffer_len()];
    ip.emit(&mut bytes[..], &caps);
    let header = ip.header_len();
    tcp.emit(
        &mut TcpPacket::new_unchecked(&mut bytes[header..]),
        &src,
        &dst,
        &caps,
    );
    Bytes::from(bytes)
}

/// What a packet the stack sent is, for assertions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// TCP with these flags.
    Tcp {
        syn: bool,
        ack: bool,
        rst: bool,
        fin: bool,
    },
    /// ICMPv4 or ICMPv6 with this type and code; `quotes_port` is the quoted TCP source port.
    Icmp {
        v6: bool,
        kind: u8,
        code: u8,
        quotes_port: u16,
    },
    /// Anything else.
    Other,
}

/// Reads a packet the stack sent.
pub fn reply(packet: &[u8]) -> Reply {
    let (protocol, payload) = match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let Ok(ip) = Ipv4Packet::new_checked(packet) else {
                return Reply::Other;
            };
            (ip.next_header(), ip.payload().to_vec())
        }
        Some(6) => {
            let Ok(ip) = Ipv6Packet::new_checked(packet) else {
                return Reply::Other;
            };
            (ip.next_header(), ip.payload().to_vec())
        }
        _ => return Reply::Other,
    };
    match protocol {
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(&payload[..]) else {
                return Reply::Other;
            };
            Reply::Tcp {
                syn: tcp.syn(),
                ack: tcp.ack(),
                rst: tcp.rst(),
                fin: tcp.fin(),
            }
        }
        IpProtocol::Icmp => {
            let Ok(icmp) = Icmpv4Packet::new_checked(&payload[..]) else {
                return Reply::Other;
            };
            let quoted = icmp.data();
            let port = quoted
                .get(20..22)
                .map_or(0, |p| u16::from_be_bytes([p[0], p[1]]));
            Reply::Icmp {
                v6: false,
                kind: icmp.msg_type().into(),
                code: icmp.msg_code(),
                quotes_port: port,
            }
        }
        IpProtocol::Icmpv6 => {
            let Ok(icmp) = Icmpv6Packet::new_checked(&payload[..]) else {
                return Reply::Other;
            };
            let quoted = icmp.payload();
            let port = quoted
                .get(40..42)
                .map_or(0, |p| u16::from_be_bytes([p[0], p[1]]));
            Reply::Icmp {
                v6: true,
                kind: icmp.msg_type().into(),
                code: icmp.msg_code(),
                quotes_port: port,
            }
        }
        _ => Reply::Other,
    }
}
