//! [`SynCookies`]: answering a SYN without keeping any state (RFC 4987, section 3.6), and
//! rebuilding its connection when the client's ACK comes back.
//!
//! The SYN|ACK's sequence number is the cookie: 6 bits of a 64-second clock, 2 bits for the
//! client's MSS (one of [`MSS`]), and 24 bits of SipHash-2-4, under a random 128-bit key, of
//! the 4-tuple, the client's initial sequence number, the clock and the MSS. The ACK that
//! completes the handshake acknowledges cookie + 1 with sequence number ISN + 1, so only the
//! client's first segment proves a cookie; a cookie verifies for two clock periods (64 to
//! 128 s). Like Linux's cookies without timestamps, the SYN|ACK offers no window scaling,
//! timestamps or SACK: a connection opened through a cookie runs without them.
//!
//! What 24 bits allow: a blind attacker guesses right once in 2^24 tries, so at 150,000
//! forged ACKs a second, about once every two minutes it opens a connection from a spoofed
//! address (Linux's cookies have the same strength). And a duplicate of a client's first
//! segment, delayed until after its connection ended but within the cookie's life, opens it
//! again. Both need the stack to be answering with cookies, which it does only at its caps.

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::time::Duration;

use siphasher::sip::SipHasher24;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpProtocol, IpRepr, Ipv4Packet, Ipv6Packet, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber,
};

/// The MSS values a cookie can carry; a client's is rounded down to one of them.
pub(crate) const MSS: [u16; 4] = [536, 1220, 1440, 1460];
/// How long one value of the cookie's clock lasts.
const PERIOD: Duration = Duration::from_secs(64);
const HOP_LIMIT: u8 = 64;

/// The secret cookies are made with. Each `Stack` has its own, so a cookie is good only where
/// it was issued.
#[derive(Debug)]
pub struct SynCookies {
    key: [u8; 16],
}

/// A connection a returning ACK proved: the SYN that asked for it, rebuilt, and the cookie its
/// SYN|ACK carried (the initial sequence number the new socket must take).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    /// An IP packet: the client's SYN, with the MSS the cookie kept and no other option.
    pub syn: Vec<u8>,
    /// The SYN|ACK's sequence number.
    pub cookie: u32,
}

/// The addresses and TCP header of a plain (no extension header) TCP/IP packet.
struct Parsed<'a> {
    src: IpAddress,
    dst: IpAddress,
    tcp: TcpRepr<'a>,
}

fn parse(packet: &[u8]) -> Option<Parsed<'_>> {
    let caps = ChecksumCapabilities::ignored();
    let (src, dst, payload) = match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            (ip.src_addr().into(), ip.dst_addr().into(), ip.payload())
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            (ip.src_addr().into(), ip.dst_addr().into(), ip.payload())
        }
        _ => return None,
    };
    let tcp = TcpRepr::parse(&TcpPacket::new_checked(payload).ok()?, &src, &dst, &caps).ok()?;
    Some(Parsed { src, dst, tcp })
}

/// `tcp` in an IP packet from `src` to `dst`, with its checksums.
fn emit(src: IpAddress, dst: IpAddress, tcp: &TcpRepr<'_>) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let ip = IpRepr::new(src, dst, IpProtocol::Tcp, tcp.buffer_len(), HOP_LIMIT);
    let mut bytes = vec![0u8; ip.buffer_len()];
    ip.emit(&mut bytes[..], &caps);
    let header = ip.header_len();
    if let Some(segment) = bytes.get_mut(header..) {
        tcp.emit(&mut TcpPacket::new_unchecked(segment), &src, &dst, &caps);
    }
    bytes
}

impl Default for SynCookies {
    fn default() -> Self {
        Self::new()
    }
}

impl SynCookies {
    /// Cookies under a fresh random key from the operating system.
    pub fn new() -> Self {
        let mut key = [0; 16];
        if getrandom::fill(&mut key).is_err() {
            // Never seen on Linux. std's hash maps draw their keys from the same source, so
            // this is a second try rather than a weaker one.
            let state = std::hash::RandomState::new();
            for (i, half) in key.chunks_mut(8).enumerate() {
                half.copy_from_slice(&state.hash_one(i).to_le_bytes());
            }
        }
        Self { key }
    }

    /// The SYN|ACK answering `syn` (an IP packet holding a SYN), with a cookie for sequence
    /// number, `mss` as Prism's own MSS and `window` as its receive window. `now` is any
    /// monotonic clock's time. `None` if `syn` is not a plain TCP SYN.
    pub fn synack(&self, syn: &[u8], mss: u16, window: u16, now: Duration) -> Option<Vec<u8>> {
        let Parsed { src, dst, tcp } = parse(syn)?;
        if tcp.control != TcpControl::Syn || tcp.ack_number.is_some() {
            return None;
        }
        let client_mss = tcp.max_seg_size.unwrap_or(MSS[0]);
        let index = MSS.iter().rposition(|&m| m <= client_mss).unwrap_or(0);
        let isn = tcp.seq_number.0 as u32;
        let cookie = self.cookie(&Parsed { src, dst, tcp }, isn, clock(now), index);
        let answer = TcpRepr {
            src_port: tcp.dst_port,
            dst_port: tcp.src_port,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(cookie as i32),
            ack_number: Some(tcp.seq_number + 1),
            window_len: window,
            window_scale: None,
            max_seg_size: Some(mss),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        Some(emit(dst, src, &answer))
    }

    /// For a segment that belongs to no connection: if it acknowledges a SYN|ACK these cookies
    /// made lately (an ACK, without SYN or RST, that is the client's first segment after its
    /// SYN), the connection to rebuild.
    pub fn check(&self, segment: &[u8], now: Duration) -> Option<Rebuilt> {
        let parsed = parse(segment)?;
        let tcp = &parsed.tcp;
        if matches!(tcp.control, TcpControl::Syn | TcpControl::Rst) {
            return None;
        }
        let cookie = (tcp.ack_number? - 1).0 as u32;
        let isn = (tcp.seq_number - 1).0 as u32;
        let index = ((cookie >> 24) & 0b11) as usize;
        let now = clock(now);
        let issued = [now, now.wrapping_sub(1)]
            .into_iter()
            .find(|c| (c & 0x3f) as u32 == cookie >> 26)?;
        if self.cookie(&parsed, isn, issued, index) != cookie {
            return None;
        }
        let syn = TcpRepr {
            src_port: tcp.src_port,
            dst_port: tcp.dst_port,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(isn as i32),
            ack_number: None,
            window_len: tcp.window_len,
            window_scale: None,
            max_seg_size: MSS.get(index).copied(),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        Some(Rebuilt {
            syn: emit(parsed.src, parsed.dst, &syn),
            cookie,
        })
    }

    /// The cookie for the client's SYN in `parsed` (whose addresses are the client's view).
    fn cookie(&self, parsed: &Parsed<'_>, isn: u32, clock: u64, index: usize) -> u32 {
        // The SYN and the ACK both come from the client: the addresses and ports are in the
        // same order in both.
        let tuple = (
            IpAddr::from(parsed.src),
            IpAddr::from(parsed.dst),
            parsed.tcp.src_port,
            parsed.tcp.dst_port,
        );
        let mut mac = SipHasher24::new_with_key(&self.key);
        (tuple, isn, clock, index).hash(&mut mac);
        let mac = mac.finish() as u32 & 0x00ff_ffff;
        ((clock & 0x3f) as u32) << 26 | (index as u32) << 24 | mac
    }
}

/// The cookie's clock: periods since `now`'s epoch.
fn clock(now: Duration) -> u64 {
    now.as_secs() / PERIOD.as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    const CLIENT: &str = "10.0.0.2:40000";
    const SERVER: &str = "192.0.2.1:443";
    const ISN: u32 = 0xfff0_0000;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn segment(from: &str, to: &str, tcp: TcpRepr<'_>) -> Vec<u8> {
        let (from, to) = (addr(from), addr(to));
        let tcp = TcpRepr {
            src_port: from.port(),
            dst_port: to.port(),
            ..tcp
        };
        emit(from.ip().into(), to.ip().into(), &tcp)
    }

    fn syn(from: &str, to: &str, mss: Option<u16>) -> Vec<u8> {
        segment(
            from,
            to,
            TcpRepr {
                src_port: 0,
                dst_port: 0,
                control: TcpControl::Syn,
                seq_number: TcpSeqNumber(ISN as i32),
                ack_number: None,
                window_len: 64_240,
                window_scale: Some(7),
                max_seg_size: mss,
                sack_permitted: true,
                sack_ranges: [None; 3],
                timestamp: Some(smoltcp::wire::TcpTimestampRepr::new(1, 0)),
                payload: &[],
            },
        )
    }

    fn ack(from: &str, to: &str, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
        segment(
            from,
            to,
            TcpRepr {
                src_port: 0,
                dst_port: 0,
                control: TcpControl::None,
                seq_number: TcpSeqNumber(seq as i32),
                ack_number: Some(TcpSeqNumber(ack as i32)),
                window_len: 502,
                window_scale: None,
                max_seg_size: None,
                sack_permitted: false,
                sack_ranges: [None; 3],
                timestamp: None,
                payload,
            },
        )
    }

    fn tcp(packet: &[u8]) -> TcpRepr<'_> {
        parse(packet).unwrap().tcp
    }

    const T0: Duration = Duration::from_secs(1000);

    /// The SYN|ACK's cookie for a SYN from CLIENT to SERVER at `T0`.
    fn cookie(cookies: &SynCookies, mss: Option<u16>) -> u32 {
        let synack = cookies
            .synack(&syn(CLIENT, SERVER, mss), 1460, 1024, T0)
            .unwrap();
        tcp(&synack).seq_number.0 as u32
    }

    #[test]
    fn the_synack_answers_the_syn_without_options_it_cannot_keep() {
        let cookies = SynCookies::new();
        let synack = cookies
            .synack(&syn(CLIENT, SERVER, Some(1460)), 1400, 1024, T0)
            .unwrap();
        let parsed = parse(&synack).unwrap();
        assert_eq!(
            (parsed.src, parsed.dst),
            (addr(SERVER).ip().into(), addr(CLIENT).ip().into())
        );
        let t = parsed.tcp;
        assert_eq!((t.src_port, t.dst_port), (443, 40000));
        assert_eq!(t.control, TcpControl::Syn);
        assert_eq!(t.ack_number, Some(TcpSeqNumber(ISN as i32) + 1));
        assert_eq!((t.window_len, t.max_seg_size), (1024, Some(1400)));
        assert_eq!(
            (t.window_scale, t.timestamp, t.sack_permitted),
            (None, None, false)
        );
        // Checksums are filled: the client's kernel would drop it otherwise.
        let ip = Ipv4Packet::new_checked(&synack[..]).unwrap();
        assert!(ip.verify_checksum());
        let segment = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(segment.verify_checksum(&parsed.src, &parsed.dst));
    }

    #[test]
    fn the_ack_of_a_cookie_rebuilds_the_syn() {
        let cookies = SynCookies::new();
        for (client_mss, kept) in [(Some(1460), 1460), (Some(1400), 1220), (None, 536)] {
            let c = cookie(&cookies, client_mss);
            let first = ack(CLIENT, SERVER, ISN + 1, c.wrapping_add(1), b"GET /");
            let rebuilt = cookies.check(&first, T0 + Duration::from_secs(5)).unwrap();
            assert_eq!(rebuilt.cookie, c);
            let parsed = parse(&rebuilt.syn).unwrap();
            assert_eq!(parsed.src, addr(CLIENT).ip().into());
            let t = parsed.tcp;
            assert_eq!((t.src_port, t.dst_port), (40000, 443));
            assert_eq!((t.control, t.ack_number), (TcpControl::Syn, None));
            assert_eq!(t.seq_number, TcpSeqNumber(ISN as i32));
            assert_eq!(t.max_seg_size, Some(kept));
            assert_eq!((t.window_scale, t.timestamp), (None, None));
        }
    }

    #[test]
    fn only_the_clients_first_segment_for_a_fresh_cookie_verifies() {
        let cookies = SynCookies::new();
        let c = cookie(&cookies, Some(1460));
        let later = |d: u64| T0 + Duration::from_secs(d);
        let first = ack(CLIENT, SERVER, ISN + 1, c.wrapping_add(1), &[]);
        assert!(cookies.check(&first, later(64)).is_some(), "one period on");
        assert!(
            cookies.check(&first, later(128)).is_none(),
            "two periods on"
        );
        let bad = [
            ack(CLIENT, SERVER, ISN + 1, c.wrapping_add(2), &[]),
            ack(CLIENT, SERVER, ISN + 1461, c.wrapping_add(1), &[]),
            ack("10.0.0.2:40001", SERVER, ISN + 1, c.wrapping_add(1), &[]),
            ack(CLIENT, "192.0.2.2:443", ISN + 1, c.wrapping_add(1), &[]),
            ack("10.0.0.3:40000", SERVER, ISN + 1, c.wrapping_add(1), &[]),
        ];
        for segment in &bad {
            assert_eq!(cookies.check(segment, T0), None, "{:?}", tcp(segment));
        }
        // Another stack's key.
        assert_eq!(SynCookies::new().check(&first, T0), None);
    }

    #[test]
    fn ipv6_cookies_work_alike() {
        let (client, server) = ("[fd00::2]:40000", "[2001:db8::1]:80");
        let cookies = SynCookies::new();
        let synack = cookies
            .synack(&syn(client, server, Some(1440)), 1440, 1024, T0)
            .unwrap();
        let c = tcp(&synack).seq_number.0 as u32;
        let first = ack(client, server, ISN + 1, c.wrapping_add(1), &[]);
        let rebuilt = cookies.check(&first, T0).unwrap();
        assert_eq!(tcp(&rebuilt.syn).max_seg_size, Some(1440));
    }

    #[test]
    fn what_is_not_a_plain_syn_or_ack_gets_nothing() {
        let cookies = SynCookies::new();
        let a_syn = syn(CLIENT, SERVER, None);
        for garbage in [&[][..], &[0x45; 10][..], &a_syn[..30]] {
            assert_eq!(cookies.synack(garbage, 1460, 1024, T0), None);
            assert_eq!(cookies.check(garbage, T0), None);
        }
        assert_eq!(cookies.check(&a_syn, T0), None, "a SYN is no ACK");
        let c = cookie(&cookies, None);
        let synack_like = ack(CLIENT, SERVER, ISN + 1, c.wrapping_add(1), &[]);
        assert!(cookies.synack(&synack_like, 1460, 1024, T0).is_none());
    }
}
