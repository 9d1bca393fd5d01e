//! [`PrismDevice`]: a smoltcp device whose wire is a pair of in-memory queues.
//!
//! Received packets are `Bytes` handed over without a copy; smoltcp reads them in place.
//! Transmitted packets are written by smoltcp into a buffer that becomes a `Bytes`, the only
//! copy on the way out: a fresh one for a small packet, a pooled one for a super-packet.
//!
//! With [`PrismDevice::set_offload`], the device stands for an offloading TUN: smoltcp may
//! write TCP segments of up to 64 KB and leaves their checksums out, and every transmitted
//! packet comes out as a virtio-net frame ([`crate::vnet`]) that tells the kernel to segment
//! it and finish the checksum.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium, PacketMeta};
use smoltcp::time::Instant;

use crate::pool::Pool;
use crate::vnet;

/// The largest IP packet an offloading device takes: the IPv4 total length's limit.
const SUPER_PACKET: usize = 65535;
/// Super-packet buffers kept for reuse (2 MiB): a burst of a few connections' windows.
const SUPER_PACKET_BUFFERS: usize = 32;
/// A transmitted packet of at least this many bytes is written into a pooled buffer.
const POOLED_FROM: usize = SUPER_PACKET / 4;

/// A smoltcp device over an RX and a TX queue of packets.
#[derive(Debug)]
pub struct PrismDevice {
    capabilities: DeviceCapabilities,
    rx: VecDeque<Bytes>,
    tx: VecDeque<Bytes>,
    offload: bool,
    /// Buffers for super-packets, with offload.
    pool: Option<Pool>,
    /// Super-packets framed for the kernel to segment since [`PrismDevice::take_super_packets_out`].
    super_packets_out: u64,
}

impl PrismDevice {
    /// A device for `medium` with the given MTU (the IP MTU for `Medium::Ip`, the frame size
    /// without FCS for `Medium::Ethernet`).
    pub fn new(medium: Medium, mtu: usize) -> Self {
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = medium;
        capabilities.max_transmission_unit = mtu;
        Self {
            capabilities,
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            offload: false,
            pool: None,
            super_packets_out: 0,
        }
    }

    /// Makes the device an offloading one (see the module documentation): TCP segments up to
    /// 64 KB with their checksums left to the kernel, and virtio-net frames out. Received
    /// packets stay plain IP packets: whoever reads the frames strips their headers.
    pub fn set_offload(&mut self) {
        self.offload = true;
        self.pool = Some(Pool::new(
            vnet::HEADER_LEN + SUPER_PACKET,
            SUPER_PACKET_BUFFERS,
        ));
        self.capabilities.checksum.tcp = Checksum::None;
        // Both families: the vendored smoltcp hands IPv6 super-packets to the device whole, as
        // it does IPv4's (vendor/smoltcp/PRISM.md).
        self.capabilities.segmentation.tcpv4 = std::num::NonZeroUsize::new(SUPER_PACKET);
        self.capabilities.segmentation.tcpv6 = std::num::NonZeroUsize::new(SUPER_PACKET);
    }

    /// Declares which checksums smoltcp must verify on receive and fill in on transmit. A stack
    /// that has already verified incoming checksums sets `Checksum::Tx` to avoid doing it twice.
    /// An offloading device keeps TCP's at `Checksum::None` whatever this says.
    pub fn set_checksum(&mut self, checksum: ChecksumCapabilities) {
        self.capabilities.checksum = checksum;
        if self.offload {
            self.capabilities.checksum.tcp = Checksum::None;
        }
    }

    /// Queues a received packet for smoltcp.
    pub fn push_rx(&mut self, packet: Bytes) {
        self.rx.push_back(packet);
    }

    /// Number of received packets smoltcp has not consumed yet.
    pub fn rx_len(&self) -> usize {
        self.rx.len()
    }

    /// Queues a packet built outside smoltcp (an ICMP error, say, with complete checksums) for
    /// transmission, after what smoltcp has queued so far.
    pub fn push_tx(&mut self, packet: Bytes) {
        self.tx.push_back(vnet::frame_if(self.offload, packet));
    }

    /// Takes the next packet smoltcp transmitted.
    pub fn pop_tx(&mut self) -> Option<Bytes> {
        self.tx.pop_front()
    }

    /// How many transmitted packets were super-packets for the kernel to segment (offload at
    /// work) since the last call.
    pub fn take_super_packets_out(&mut self) -> u64 {
        std::mem::take(&mut self.super_packets_out)
    }

    /// Number of transmitted packets waiting to be taken.
    pub fn tx_len(&self) -> usize {
        self.tx.len()
    }
}

impl phy::Device for PrismDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        let tx = TxToken::new(
            &mut self.tx,
            self.pool.as_ref(),
            &mut self.super_packets_out,
        );
        Some((RxToken(packet), tx))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken::new(
            &mut self.tx,
            self.pool.as_ref(),
            &mut self.super_packets_out,
        ))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.capabilities.clone()
    }
}

/// One received packet, read in place by smoltcp.
#[derive(Debug)]
pub struct RxToken(Bytes);

impl phy::RxToken for RxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

/// Room for one transmitted packet at the back of the TX queue.
#[derive(Debug)]
pub struct TxToken<'a> {
    queue: &'a mut VecDeque<Bytes>,
    /// Frame the packet for an offloading TUN, whose super-packets go into this pool's buffers.
    offload: Option<&'a Pool>,
    /// Payload bytes per segment, when smoltcp wrote a super-packet.
    segment_size: Option<u16>,
    /// The device's count of super-packets out.
    super_packets: &'a mut u64,
}

impl<'a> TxToken<'a> {
    fn new(
        queue: &'a mut VecDeque<Bytes>,
        offload: Option<&'a Pool>,
        super_packets: &'a mut u64,
    ) -> Self {
        Self {
            queue,
            offload,
            segment_size: None,
            super_packets,
        }
    }
}

impl TxToken<'_> {
    /// Has smoltcp write a packet of `len` bytes behind a virtio-net header at the start of
    /// `buffer`, then writes the header that tells the kernel how to finish it.
    fn frame<R>(&mut self, buffer: &mut [u8], len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let (header, rest) = buffer.split_at_mut(vnet::HEADER_LEN);
        let packet = rest.get_mut(..len).unwrap_or_default();
        let result = f(packet);
        let framing = vnet::offload_tcp(packet, self.segment_size);
        if framing.is_gso() {
            *self.super_packets += 1;
        }
        header.copy_from_slice(&framing.to_bytes());
        result
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(mut self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let Some(pool) = self.offload else {
            let mut buffer = BytesMut::zeroed(len);
            let result = f(&mut buffer);
            self.queue.push_back(buffer.freeze());
            return result;
        };
        let framed = vnet::HEADER_LEN + len;
        // smoltcp asks for no more than the device's segmentation limit, a pooled buffer's
        // size; a longer packet would get a fresh buffer all the same.
        let pooled = (len >= POOLED_FROM).then(|| pool.take());
        match pooled {
            Some(mut buffer) if framed <= buffer.as_ref().len() => {
                let result = self.frame(buffer.as_mut_slice(), len, f);
                self.queue.push_back(buffer.freeze(framed));
                result
            }
            _ => {
                let mut buffer = BytesMut::zeroed(framed);
                let result = self.frame(&mut buffer, len, f);
                self.queue.push_back(buffer.freeze());
                result
            }
        }
    }

    fn set_meta(&mut self, meta: PacketMeta) {
        self.segment_size = meta.segmentation_offload_size.map(|s| s.get());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::{Device, RxToken as _, TxToken as _};

    #[test]
    fn received_packets_come_out_in_order_and_unchanged() {
        let mut device = PrismDevice::new(Medium::Ip, 1500);
        device.push_rx(Bytes::from_static(b"first"));
        device.push_rx(Bytes::from_static(b"second"));
        let now = Instant::from_millis(0);

        let (rx, _) = device.receive(now).unwrap();
        assert_eq!(rx.consume(|p| p.to_vec()), b"first");
        let (rx, _) = device.receive(now).unwrap();
        assert_eq!(rx.consume(|p| p.to_vec()), b"second");
        assert!(device.receive(now).is_none());
    }

    #[test]
    fn transmitted_packets_are_queued_with_their_length() {
        let mut device = PrismDevice::new(Medium::Ip, 1500);
        let now = Instant::from_millis(0);
        device
            .transmit(now)
            .unwrap()
            .consume(3, |buf| buf.copy_from_slice(b"abc"));
        assert_eq!(device.tx_len(), 1);
        assert_eq!(device.pop_tx().unwrap(), Bytes::from_static(b"abc"));
        assert_eq!(device.pop_tx(), None);
    }

    #[test]
    fn an_offloading_device_frames_what_smoltcp_writes_for_the_kernel() {
        let mut device = PrismDevice::new(Medium::Ip, 1500);
        device.set_offload();
        let caps = device.capabilities();
        assert!(
            !caps.checksum.tcp.tx(),
            "smoltcp leaves TCP checksums to the device"
        );
        assert!(caps.segmentation.tcpv4.is_some());

        // A 4000-byte segment as smoltcp writes it with offload: TCP checksum left at zero,
        // and the segment size in the packet's metadata.
        let complete = crate::vnet::tests::tcp_v4(4000);
        let mut unchecked = complete.clone();
        unchecked[36..38].fill(0);
        let mut token = device.transmit(Instant::from_millis(0)).unwrap();
        let mut meta = PacketMeta::default();
        meta.segmentation_offload_size = std::num::NonZeroU16::new(1460);
        token.set_meta(meta);
        token.consume(unchecked.len(), |buf| buf.copy_from_slice(&unchecked));

        let frame = device.pop_tx().unwrap();
        assert_eq!(device.take_super_packets_out(), 1);
        assert_eq!(device.take_super_packets_out(), 0);
        let header = vnet::Header::parse(&frame).unwrap();
        assert_eq!(header.gso_type, vnet::GSO_TCPV4);
        assert_eq!((header.gso_size, header.hdr_len), (1460, 40));
        assert_eq!(header.flags, vnet::F_NEEDS_CSUM);
        // Segmented the way the kernel will, the bytes and checksums are the original's.
        let mut segments = Vec::new();
        vnet::to_plain(&frame, &mut segments).unwrap();
        assert_eq!(segments.len(), 3);
        let payload: Vec<u8> = segments.iter().flat_map(|s| s[40..].to_vec()).collect();
        assert_eq!(payload, complete[40..]);
        for segment in &segments {
            let ip = smoltcp::wire::Ipv4Packet::new_checked(&segment[..]).unwrap();
            let tcp = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
            assert!(
                tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()),
                "the partial checksum finishes into a valid one"
            );
        }

        // Packets built outside smoltcp get a plain header.
        device.push_tx(Bytes::from_static(b"icmp"));
        let framed = device.pop_tx().unwrap();
        assert_eq!(vnet::Header::parse(&framed), Some(vnet::Header::PLAIN));
        assert_eq!(&framed[vnet::HEADER_LEN..], b"icmp");
        assert_eq!(device.take_super_packets_out(), 0);
    }

    #[test]
    fn a_super_packets_buffer_is_reused_and_framed_to_its_new_length() {
        let mut device = PrismDevice::new(Medium::Ip, 1500);
        device.set_offload();
        let mut send = |len: usize| {
            let packet = crate::vnet::tests::tcp_v4(len);
            let token = device.transmit(Instant::from_millis(0)).unwrap();
            token.consume(packet.len(), |buf| buf.copy_from_slice(&packet));
            let frame = device.pop_tx().unwrap();
            (packet, frame)
        };
        // The device finishes the headers (the partial checksum); the payloads are compared.
        let payload = |frame: &Bytes| frame[vnet::HEADER_LEN + 40..].to_vec();
        let (first, frame) = send(60_000);
        assert!(payload(&frame) == first[40..], "the first payload");
        let first_buffer = frame.as_ptr();
        drop(frame);
        // The second, shorter one is written into the first's buffer, over its bytes, and
        // none of those past its own length come with it.
        let (second, frame) = send(20_000);
        assert_eq!(
            frame.as_ptr(),
            first_buffer,
            "the buffer came back and was reused"
        );
        assert_eq!(frame.len(), vnet::HEADER_LEN + second.len());
        assert!(payload(&frame) == second[40..], "the second payload");
        // While a frame is alive its buffer is not handed out again.
        let (_, third) = send(20_000);
        assert_ne!(third.as_ptr(), frame.as_ptr());
    }

    #[test]
    fn capabilities_report_medium_and_mtu() {
        let device = PrismDevice::new(Medium::Ethernet, 9000);
        let caps = device.capabilities();
        assert_eq!(caps.medium, Medium::Ethernet);
        assert_eq!(caps.max_transmission_unit, 9000);
    }
}
