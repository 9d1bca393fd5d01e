//! virtio-net frames: what an offloading TUN (`IFF_VNET_HDR`) reads and writes.
//!
//! Each frame is a 10-byte [`Header`] followed by an IP packet. The header lets a packet be up
//! to 64 KB (a GSO super-packet, which the kernel segments at `gso_size`, or delivers whole to
//! a local socket) and lets its TCP or UDP checksum be left partial (`NEEDS_CSUM`: the field
//! holds the pseudo-header sum, and whoever needs the full checksum finishes it).
//!
//! A link whose device offloads carries frames end to end: the stack reads a frame's header to
//! know whether the kernel vouches for its checksum, and writes one to hand the kernel
//! super-packets with partial checksums. Consumers that need plain IP packets (the relay) turn
//! a frame into packets with [`to_plain`], and frame theirs with [`frame`].

use bytes::{Bytes, BytesMut};
use smoltcp::wire::{IpProtocol, Ipv4Address, Ipv4Packet, Ipv6Address, Ipv6Packet, checksum};

/// Bytes of the header before every packet.
pub const HEADER_LEN: usize = 10;

/// `flags`: the checksum is partial; finish it from `csum_start`, store it at `csum_offset`.
pub(crate) const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was verified (or need not be).
pub(crate) const F_DATA_VALID: u8 = 2;
/// `gso_type`: one packet, not a super-packet.
pub(crate) const GSO_NONE: u8 = 0;
/// `gso_type`: an IPv4 TCP super-packet.
pub(crate) const GSO_TCPV4: u8 = 1;
/// `gso_type`: an IPv6 TCP super-packet.
pub(crate) const GSO_TCPV6: u8 = 4;
/// `gso_type`: a UDP super-packet (IPv4 or IPv6; `UDP_SEGMENT`, USO).
pub(crate) const GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: the TCP super-packet carries ECN CWR.
pub(crate) const GSO_ECN: u8 = 0x80;

/// Offset of the checksum field in a TCP header.
const TCP_CHECKSUM_OFFSET: u16 = 16;

/// A virtio-net header (the legacy layout Linux TUN uses, in the host's byte order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// `F_NEEDS_CSUM`, `F_DATA_VALID`.
    pub(crate) flags: u8,
    /// `GSO_*`.
    pub(crate) gso_type: u8,
    /// Length of the IP and transport headers of a super-packet.
    pub(crate) hdr_len: u16,
    /// Payload bytes per segment of a super-packet.
    pub(crate) gso_size: u16,
    /// Where the partial checksum's coverage starts (the transport header).
    pub(crate) csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub(crate) csum_offset: u16,
}

impl Header {
    /// A plain packet with complete checksums.
    pub(crate) const PLAIN: Header = Header {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Reads the header at the start of `frame`.
    pub(crate) fn parse(frame: &[u8]) -> Option<Header> {
        let b: [u8; HEADER_LEN] = frame.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Header {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16::from_ne_bytes([b[2], b[3]]),
            gso_size: u16::from_ne_bytes([b[4], b[5]]),
            csum_start: u16::from_ne_bytes([b[6], b[7]]),
            csum_offset: u16::from_ne_bytes([b[8], b[9]]),
        })
    }

    /// The header's 10 bytes.
    pub(crate) fn to_bytes(self) -> [u8; HEADER_LEN] {
        let [h0, h1] = self.hdr_len.to_ne_bytes();
        let [g0, g1] = self.gso_size.to_ne_bytes();
        let [s0, s1] = self.csum_start.to_ne_bytes();
        let [o0, o1] = self.csum_offset.to_ne_bytes();
        [self.flags, self.gso_type, h0, h1, g0, g1, s0, s1, o0, o1]
    }

    /// The kernel vouches for the packet's checksums: it left them partial (a local socket
    /// wrote the data) or checked them.
    pub fn checksum_trusted(&self) -> bool {
        self.flags & (F_NEEDS_CSUM | F_DATA_VALID) != 0
    }

    /// A super-packet the kernel expects to be segmented.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }
}

/// The packet of a frame that carries a complete UDP packet (plain header, checksum done):
/// what the relay hands a TUN link, and what may be coalesced on the way to the kernel. The
/// stack's own frames (TCP, mostly with partial checksums or segmentation) give `None`.
pub(crate) fn plain_udp(frame: &[u8]) -> Option<&[u8]> {
    if Header::parse(frame)? != Header::PLAIN {
        return None;
    }
    let packet = frame.get(HEADER_LEN..)?;
    let protocol = match packet.first()? >> 4 {
        4 => Ipv4Packet::new_checked(packet).ok()?.next_header(),
        6 => Ipv6Packet::new_checked(packet).ok()?.next_header(),
        _ => return None,
    };
    (protocol == IpProtocol::Udp).then_some(packet)
}

/// Splits a frame into its header and its packet, sharing the bytes. `None` when the frame is
/// shorter than a header.
pub fn unframe(frame: &Bytes) -> Option<(Header, Bytes)> {
    let header = Header::parse(frame)?;
    Some((header, frame.slice(HEADER_LEN..)))
}

/// Frames a plain IP packet (with complete checksums). Copies it once.
pub fn frame(packet: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + packet.len());
    out.extend_from_slice(&Header::PLAIN.to_bytes());
    out.extend_from_slice(packet);
    out.freeze()
}

/// A plain packet as a link carries it: framed (one copy) when the link's device offloads,
/// unchanged otherwise. For packets built outside smoltcp (ICMP errors, relayed packets).
pub(crate) fn frame_if(offload: bool, packet: Bytes) -> Bytes {
    if offload { frame(&packet) } else { packet }
}

/// Why a frame could not be made plain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Shorter than a header, or the header does not fit the packet.
    #[error("malformed virtio-net frame")]
    Malformed,
    /// A super-packet of a kind that cannot be segmented here.
    #[error("virtio-net super-packet that cannot be segmented")]
    Unsegmentable,
}

/// Turns a frame into plain IP packets with complete checksums, appended to `out`: a partial
/// checksum is finished (one copy of the packet), a super-packet is segmented. A plain frame
/// costs nothing.
pub fn to_plain(frame: &Bytes, out: &mut Vec<Bytes>) -> Result<(), FrameError> {
    let (header, packet) = unframe(frame).ok_or(FrameError::Malformed)?;
    if header.is_gso() {
        return segment(header, &packet, out);
    }
    if header.flags & F_NEEDS_CSUM == 0 {
        out.push(packet);
        return Ok(());
    }
    let mut packet = BytesMut::from(&packet[..]);
    finish_checksum(&mut packet, header.csum_start, header.csum_offset)?;
    out.push(packet.freeze());
    Ok(())
}

/// Offset of the checksum field in a UDP header.
const UDP_CHECKSUM_OFFSET: u16 = 6;

/// Finishes a partial checksum: the field holds the pseudo-header sum; the sum of everything
/// from `start` replaces it. A UDP checksum that comes out zero is sent as all ones (zero
/// means "none" over IPv4 and is invalid over IPv6).
fn finish_checksum(packet: &mut [u8], start: u16, offset: u16) -> Result<(), FrameError> {
    let at = usize::from(start) + usize::from(offset);
    if at + 2 > packet.len() {
        return Err(FrameError::Malformed);
    }
    let sum = !checksum::data(packet.get(usize::from(start)..).unwrap_or_default());
    let sum = if sum == 0 && offset == UDP_CHECKSUM_OFFSET {
        0xffff
    } else {
        sum
    };
    if let Some(field) = packet.get_mut(at..at + 2) {
        field.copy_from_slice(&sum.to_be_bytes());
    }
    Ok(())
}

/// The length of a super-packet's IP and transport headers, read from the packet: the
/// header's own `hdr_len` is only a hint (for a forwarded packet Linux may put the whole
/// first segment's length there, which would copy payload into every segment's headers), so
/// it is `csum_start` (the IP headers) plus the UDP header or the TCP header's own length, as
/// wireguard-go and tun-rs do.
fn headers_len(header: Header, packet: &[u8]) -> Result<usize, FrameError> {
    let start = usize::from(header.csum_start);
    let transport = match header.gso_type & !GSO_ECN {
        GSO_UDP_L4 => 8,
        GSO_TCPV4 | GSO_TCPV6 => {
            let offset = packet.get(start + 12).ok_or(FrameError::Malformed)?;
            let len = usize::from(offset >> 4) * 4;
            if !(20..=60).contains(&len) {
                return Err(FrameError::Malformed);
            }
            len
        }
        _ => return Err(FrameError::Unsegmentable),
    };
    let len = start + transport;
    if len > packet.len() {
        return Err(FrameError::Malformed);
    }
    Ok(len)
}

#[cfg(target_os = "linux")]
fn segment(header: Header, packet: &[u8], out: &mut Vec<Bytes>) -> Result<(), FrameError> {
    if header.gso_size == 0 {
        return Err(FrameError::Malformed);
    }
    let headers = headers_len(header, packet)?;
    let is_v6 = packet.first().map(|b| b >> 4) == Some(6);
    let hdr = tun_rs::VirtioNetHdr {
        flags: header.flags,
        gso_type: header.gso_type,
        hdr_len: u16::try_from(headers).map_err(|_| FrameError::Malformed)?,
        gso_size: header.gso_size,
        csum_start: header.csum_start,
        csum_offset: header.csum_offset,
    };
    let segment_len = headers + usize::from(header.gso_size);
    let count = (packet.len() - headers)
        .div_ceil(usize::from(header.gso_size))
        .max(1);
    // One buffer for every segment, each becoming a slice of it.
    let mut segments = BytesMut::zeroed(segment_len * count);
    let mut bufs: Vec<&mut [u8]> = segments.chunks_mut(segment_len).collect();
    let mut sizes = vec![0usize; count];
    let mut input = packet.to_vec();
    let n = tun_rs::gso_split(&mut input, hdr, &mut bufs, &mut sizes, 0, is_v6)
        .map_err(|_| FrameError::Unsegmentable)?;
    let segments = segments.freeze();
    for (i, size) in sizes.into_iter().enumerate().take(n) {
        let at = i * segment_len;
        out.push(segments.slice(at..at + size.min(segment_len)));
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn segment(_header: Header, _packet: &[u8], _out: &mut Vec<Bytes>) -> Result<(), FrameError> {
    Err(FrameError::Unsegmentable)
}

/// The header for a packet smoltcp just wrote with its TCP checksum left out: for TCP, the
/// pseudo-header sum goes into the checksum field and the header says `NEEDS_CSUM`, and a
/// payload larger than `segment_size` makes it a super-packet. Any other packet is plain (its
/// checksums are complete).
pub(crate) fn offload_tcp(packet: &mut [u8], segment_size: Option<u16>) -> Header {
    let Some((ip_header_len, src_dst, tcp_len)) = tcp_in(packet) else {
        return Header::PLAIN;
    };
    let Ok(tcp_len16) = u16::try_from(tcp_len) else {
        return Header::PLAIN;
    };
    let pseudo = match src_dst {
        Addresses::V4(src, dst) => {
            checksum::pseudo_header_v4(&src, &dst, IpProtocol::Tcp, u32::from(tcp_len16))
        }
        Addresses::V6(src, dst) => {
            checksum::pseudo_header_v6(&src, &dst, IpProtocol::Tcp, u32::from(tcp_len16))
        }
    };
    let at = ip_header_len + usize::from(TCP_CHECKSUM_OFFSET);
    let Some(field) = packet.get_mut(at..at + 2) else {
        return Header::PLAIN;
    };
    field.copy_from_slice(&pseudo.to_be_bytes());
    let tcp_header_len = packet
        .get(ip_header_len + 12)
        .map_or(20, |b| usize::from(b >> 4) * 4);
    let headers = ip_header_len + tcp_header_len;
    let csum_start = u16::try_from(ip_header_len).unwrap_or(u16::MAX);
    let mut header = Header {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start,
        csum_offset: TCP_CHECKSUM_OFFSET,
    };
    if let Some(size) = segment_size {
        if packet.len() > headers + usize::from(size) {
            header.gso_type = match src_dst {
                Addresses::V4(..) => GSO_TCPV4,
                Addresses::V6(..) => GSO_TCPV6,
            };
            header.gso_size = size;
            header.hdr_len = u16::try_from(headers).unwrap_or(u16::MAX);
        }
    }
    header
}

enum Addresses {
    V4(Ipv4Address, Ipv4Address),
    V6(Ipv6Address, Ipv6Address),
}

/// For a TCP packet: the IP header's length, the addresses, and the TCP length.
fn tcp_in(packet: &[u8]) -> Option<(usize, Addresses, usize)> {
    match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            (ip.next_header() == IpProtocol::Tcp).then(|| {
                let header_len = usize::from(ip.header_len());
                let tcp_len = usize::from(ip.total_len()).saturating_sub(header_len);
                (
                    header_len,
                    Addresses::V4(ip.src_addr(), ip.dst_addr()),
                    tcp_len,
                )
            })
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            (ip.next_header() == IpProtocol::Tcp).then(|| {
                (
                    40,
                    Addresses::V6(ip.src_addr(), ip.dst_addr()),
                    usize::from(ip.payload_len()),
                )
            })
        }
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use smoltcp::wire::TcpPacket;

    /// An IPv4 packet 10.0.0.1 -> 10.0.0.2 of `protocol` with `len` zero bytes after its header
    /// (the IP checksum left for the caller to fill).
    fn ipv4(protocol: u8, len: usize) -> Vec<u8> {
        let total = 20 + len;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = protocol;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p
    }

    /// An IPv4 TCP packet 10.0.0.1:80 -> 10.0.0.2:1234 with `payload` bytes and both checksums
    /// complete.
    pub(crate) fn tcp_v4(payload: usize) -> Vec<u8> {
        let mut p = ipv4(6, 20 + payload);
        p[20..22].copy_from_slice(&80u16.to_be_bytes());
        p[22..24].copy_from_slice(&1234u16.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x18; // PSH|ACK
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        let mut ip = Ipv4Packet::new_unchecked(&mut p[..]);
        ip.fill_checksum();
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        TcpPacket::new_unchecked(ip.payload_mut()).fill_checksum(&src.into(), &dst.into());
        p
    }

    #[test]
    fn headers_round_trip() {
        let header = Header {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            hdr_len: 72,
            gso_size: 1428,
            csum_start: 40,
            csum_offset: 16,
        };
        assert_eq!(Header::parse(&header.to_bytes()), Some(header));
        assert_eq!(Header::parse(&[0; 9]), None);
        assert!(header.checksum_trusted() && header.is_gso());
        assert!(!Header::PLAIN.checksum_trusted() && !Header::PLAIN.is_gso());
    }

    #[test]
    fn a_partial_checksum_finished_is_the_full_checksum() {
        let complete = tcp_v4(3000);
        let mut partial = complete.clone();
        let header = offload_tcp(&mut partial, Some(1460));
        assert_eq!(header.flags, F_NEEDS_CSUM);
        assert_eq!((header.csum_start, header.csum_offset), (20, 16));
        assert_eq!(header.gso_type, GSO_TCPV4);
        assert_eq!((header.gso_size, header.hdr_len), (1460, 40));
        assert_ne!(
            partial, complete,
            "the field must hold the pseudo-header sum"
        );

        let mut framed = header.to_bytes().to_vec();
        framed.extend_from_slice(&partial);
        let mut out = Vec::new();
        // Segmented by the same rules the kernel applies.
        to_plain(&Bytes::from(framed), &mut out).unwrap();
        assert_eq!(out.len(), 3);
        let payload: Vec<u8> = out
            .iter()
            .flat_map(|s| {
                let ip = Ipv4Packet::new_checked(&s[..]).unwrap();
                assert!(ip.verify_checksum());
                let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
                assert!(tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
                tcp.payload().to_vec()
            })
            .collect();
        assert_eq!(payload, complete[40..]);
    }

    #[test]
    fn small_tcp_packets_need_only_the_checksum_finished() {
        let complete = tcp_v4(100);
        let mut partial = complete.clone();
        let header = offload_tcp(&mut partial, Some(1460));
        assert_eq!(header.gso_type, GSO_NONE);
        let mut framed = header.to_bytes().to_vec();
        framed.extend_from_slice(&partial);
        let mut out = Vec::new();
        to_plain(&Bytes::from(framed), &mut out).unwrap();
        assert_eq!(out, vec![Bytes::from(complete)]);
    }

    #[test]
    fn other_packets_pass_plain() {
        let mut udp = tcp_v4(10);
        udp[9] = 17;
        let before = udp.clone();
        assert_eq!(offload_tcp(&mut udp, Some(1460)), Header::PLAIN);
        assert_eq!(udp, before);
        let framed = frame(&udp);
        let mut out = Vec::new();
        to_plain(&framed, &mut out).unwrap();
        assert_eq!(out, vec![Bytes::from(before)]);
        assert_eq!(
            to_plain(&Bytes::from_static(&[0; 4]), &mut out),
            Err(FrameError::Malformed)
        );
    }

    /// Segments a TCP super-packet framed with `hdr_len` as given: the payload must come out
    /// whole and the checksums valid.
    fn split_tcp(hdr_len: u16) {
        let complete = tcp_v4(3000);
        let mut partial = complete.clone();
        let mut header = offload_tcp(&mut partial, Some(1460));
        header.hdr_len = hdr_len;
        let mut framed = header.to_bytes().to_vec();
        framed.extend_from_slice(&partial);
        let mut out = Vec::new();
        to_plain(&Bytes::from(framed), &mut out).unwrap();
        assert_eq!(out.len(), 3);
        let mut payload = Vec::new();
        for segment in &out {
            let ip = Ipv4Packet::new_checked(&segment[..]).unwrap();
            assert!(ip.verify_checksum());
            let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
            assert!(tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
            payload.extend_from_slice(tcp.payload());
        }
        assert_eq!(payload, complete[40..]);
    }

    #[test]
    fn a_super_packets_headers_are_read_from_the_packet_not_the_hint() {
        // Linux may put the whole first segment's length in `hdr_len` for a forwarded
        // packet; trusted, it would copy payload into every segment's headers.
        split_tcp(40 + 1460);
        split_tcp(0);
    }

    /// An IPv4 UDP packet 10.0.0.1:53 -> 10.0.0.2:1234 carrying `payload`, its UDP checksum
    /// field holding the pseudo-header sum (partial, as the kernel hands it over).
    fn udp_v4_partial(payload: &[u8]) -> Vec<u8> {
        let mut p = ipv4(17, 8 + payload.len());
        p[20..22].copy_from_slice(&53u16.to_be_bytes());
        p[22..24].copy_from_slice(&1234u16.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        Ipv4Packet::new_unchecked(&mut p[..]).fill_checksum();
        let pseudo = checksum::pseudo_header_v4(
            &Ipv4Address::new(10, 0, 0, 1),
            &Ipv4Address::new(10, 0, 0, 2),
            IpProtocol::Udp,
            (8 + payload.len()) as u32,
        );
        p[26..28].copy_from_slice(&pseudo.to_be_bytes());
        p
    }

    fn udp_header(gso_size: u16) -> Header {
        Header {
            flags: F_NEEDS_CSUM,
            gso_type: if gso_size == 0 { GSO_NONE } else { GSO_UDP_L4 },
            hdr_len: 0,
            gso_size,
            csum_start: 20,
            csum_offset: UDP_CHECKSUM_OFFSET,
        }
    }

    #[test]
    fn a_udp_super_packet_becomes_its_datagrams() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 13) as u8).collect();
        let mut framed = udp_header(1200).to_bytes().to_vec();
        framed.extend_from_slice(&udp_v4_partial(&payload));
        let mut out = Vec::new();
        to_plain(&Bytes::from(framed), &mut out).unwrap();
        let sizes: Vec<usize> = out.iter().map(|d| d.len() - 28).collect();
        assert_eq!(sizes, [1200, 1200, 600]);
        let mut joined = Vec::new();
        for datagram in &out {
            let ip = Ipv4Packet::new_checked(&datagram[..]).unwrap();
            assert!(ip.verify_checksum());
            let udp = smoltcp::wire::UdpPacket::new_checked(ip.payload()).unwrap();
            assert!(udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
            joined.extend_from_slice(udp.payload());
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn a_udp_checksum_that_sums_to_zero_is_sent_as_all_ones() {
        // Two payload bytes chosen so that the full checksum comes out zero.
        let mut payload = [0u8; 8];
        let packet = udp_v4_partial(&payload);
        let sum = checksum::data(&packet[20..]);
        payload[6..8].copy_from_slice(&(0xffff - sum).to_be_bytes());
        let mut framed = udp_header(0).to_bytes().to_vec();
        framed.extend_from_slice(&udp_v4_partial(&payload));
        let mut out = Vec::new();
        to_plain(&Bytes::from(framed), &mut out).unwrap();
        assert_eq!(out[0][26..28], [0xff, 0xff]);
        let ip = Ipv4Packet::new_checked(&out[0][..]).unwrap();
        let udp = smoltcp::wire::UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
    }

    #[test]
    fn only_plain_udp_frames_are_offered_for_coalescing() {
        let udp = udp_v4_partial(b"data");
        assert_eq!(plain_udp(&frame(&udp)), Some(&udp[..]));
        let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
        v6.extend_from_slice(&[0; 40]);
        assert_eq!(plain_udp(&frame(&v6)), Some(&v6[..]));
        // The stack's TCP, and a UDP super-packet or partial checksum, are written as they are.
        assert_eq!(plain_udp(&frame(&tcp_v4(10))), None);
        let mut partial = udp_header(0).to_bytes().to_vec();
        partial.extend_from_slice(&udp);
        assert_eq!(plain_udp(&partial), None);
        assert_eq!(plain_udp(&frame(&[])), None);
        assert_eq!(plain_udp(&[0; 4]), None);
    }
}
