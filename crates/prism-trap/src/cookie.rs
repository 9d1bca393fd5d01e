//! [`SynCookies`]: answering a SYN without keeping any state (RFC 4987, section 3.6), and
//! rebuilding its connection when the client's ACK comes back.
//!
//! The SYN|ACK's sequence number is the cookie: 6 bits of a 64-second clock, 2 bits for the
//! client's MSS (one of [`MSS`]), and 24 bits of SipHash-2-4, under a random 128-bit key, of
//! the 4-tuple, the client's initial sequence number, the clock and the MSS. The ACK that
//! completes the handshake acknowledges cookie + 1 with sequence number ISN + 1, so only the
//! client's first segment proves a cookie; a cookie verifies for two clock periods (64 to
//! 128 s).
//!
//! When the client's SYN carries a timestamp, the SYN|ACK keeps the client's other options in
//! its own timestamp, as Linux's cookies do: the 6 lowest bits of its TSval hold the client's
//! window scale (bits 0-3, 0xf for none) and whether it offered SACK (bit 4), and the client
//! echoes them in the TSecr of every segment it sends next. The SYN|ACK offers window scaling,
//! SACK and timestamps as the socket taking over would have, and the rebuilt connection has
//! them all. Those 6 bits are part of the MAC too, so an ACK cannot claim options its SYN did
//! not offer. A client without timestamps gets a SYN|ACK without options (but the MSS) and a
//! connection without them, unscaled: a window of at most 64 KiB.
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
    TcpSeqNumber, TcpTimestampRepr,
};

/// The MSS values a cookie can carry; a client's is rounded down to one of them.
pub(crate) const MSS: [u16; 4] = [536, 1220, 1440, 1460];
/// How long one value of the cookie's clock lasts.
const PERIOD: Duration = Duration::from_secs(64);
const HOP_LIMIT: u8 = 64;
/// The bits of a cookie SYN|ACK's TSval that hold the client's options, and their parts.
const OPTIONS: u32 = 0x3f;
const WSCALE: u8 = 0x0f;
const NO_WSCALE: u8 = 0x0f;
const SACK: u8 = 0x10;

/// The secret cookies are made with. Each `Stack` has its own, so a cookie is good only where
/// it was issued.
#[derive(Debug)]
pub struct SynCookies {
    key: [u8; 16],
}

/// What Prism's side offers in a cookie's SYN|ACK: what the socket that takes over would
/// have offered itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// Prism's MSS.
    pub mss: u16,
    /// The receive window, unscaled (as in any SYN).
    pub window: u16,
    /// The window scale, offered when the client offers one (and keeps it in its timestamp).
    pub window_shift: u8,
    /// The clock the connection's timestamps will come from, now: the SYN|ACK's TSval is at
    /// most this, so the connection's later ones never go back.
    pub tsval: u32,
}

/// A connection a returning ACK proved: the SYN that asked for it, rebuilt, and the cookie its
/// SYN|ACK carried (the initial sequence number the new socket must take).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    /// An IP packet: the client's SYN, with the MSS the cookie kept, and its window scale,
    /// SACK-permitted and timestamp if the cookie kept them (the TSval is the ACK's).
    pub syn: Vec<u8>,
    /// The SYN|ACK's sequence number.
    pub cookie: u32,
    /// Whether the connection has window scaling.
    pub scaled: bool,
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
    /// number and what `offer` says for the rest. `now` is any monotonic clock's time. `None`
    /// if `syn` is not a plain TCP SYN.
    pub fn synack(&self, syn: &[u8], offer: &Offer, now: Duration) -> Option<Vec<u8>> {
        let Parsed { src, dst, tcp } = parse(syn)?;
        if tcp.control != TcpControl::Syn || tcp.ack_number.is_some() {
            return None;
        }
        let client_mss = tcp.max_seg_size.unwrap_or(MSS[0]);
        let index = MSS.iter().rposition(|&m| m <= client_mss).unwrap_or(0);
        let isn = tcp.seq_number.0 as u32;
        // The client's options, kept when it has timestamps to keep them in. smoltcp's parser
        // reads a window scale above RFC 7323's 14 as 14, so it fits below NO_WSCALE.
        let options = tcp.timestamp.map(|_| {
            let wscale = tcp.window_scale.unwrap_or(NO_WSCALE);
            wscale | if tcp.sack_permitted { SACK } else { 0 }
        });
        let timestamp = tcp.timestamp.zip(options).map(|(theirs, options)| {
            let mut tsval = offer.tsval & !OPTIONS | u32::from(options);
            if tsval.wrapping_sub(offer.tsval) as i32 > 0 {
                // Never ahead of the clock: the period before.
                tsval = tsval.wrapping_sub(OPTIONS + 1);
            }
            TcpTimestampRepr::new(tsval, theirs.tsval)
        });
        let cookie = self.cookie(&Parsed { src, dst, tcp }, isn, clock(now), index, options);
        let answer = TcpRepr {
            src_port: tcp.dst_port,
            dst_port: tcp.src_port,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(cookie as i32),
            ack_number: Some(tcp.seq_number + 1),
            window_len: offer.window,
            window_scale: options.and(tcp.window_scale).map(|_| offer.window_shift),
            max_seg_size: Some(offer.mss),
            sack_permitted: options.is_some() && tcp.sack_permitted,
            sack_ranges: [None; 3],
            timestamp,
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
        // What the SYN|ACK's timestamp kept, echoed.
        let options = tcp.timestamp.map(|ts| (ts.tsecr & OPTIONS) as u8);
        let now = clock(now);
        let issued = [now, now.wrapping_sub(1)]
            .into_iter()
            .find(|c| (c & 0x3f) as u32 == cookie >> 26)?;
        if self.cookie(&parsed, isn, issued, index, options) != cookie {
            return None;
        }
        let window_scale = options.map(|o| o & WSCALE).filter(|&w| w != NO_WSCALE);
        let syn = TcpRepr {
            src_port: tcp.src_port,
            dst_port: tcp.dst_port,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(isn as i32),
            ack_number: None,
            window_len: tcp.window_len,
            window_scale,
            max_seg_size: MSS.get(index).copied(),
            sack_permitted: options.is_some_and(|o| o & SACK != 0),
            sack_ranges: [None; 3],
            timestamp: tcp.timestamp.map(|ts| TcpTimestampRepr::new(ts.tsval, 0)),
            payload: &[],
        };
        Some(Rebuilt {
            syn: emit(parsed.src, parsed.dst, &syn),
            cookie,
            scaled: window_scale.is_some(),
        })
    }

    /// The cookie for the client's SYN in `parsed` (whose addresses are the client's view),
    /// with the options its SYN|ACK keeps in its timestamp, if any.
    fn cookie(
        &self,
        parsed: &Parsed<'_>,
        isn: u32,
        clock: u64,
        index: usize,
        options: Option<u8>,
    ) -> u32 {
        // The SYN and the ACK both come from the client: the addresses and ports are in the
        // same order in both.
        let tuple = (
            IpAddr::from(parsed.src),
            IpAddr::from(parsed.dst),
            parsed.tcp.src_port,
            parsed.tcp.dst_port,
        );
        let mut mac = SipHasher24::new_with_key(&self.key);
        (tuple, isn, clock, index, options).hash(&mut mac);
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
    /// The client's timestamp clock at its SYN.
    const THEIR_TS: u32 = 7_000;
    const OFFER: Offer = Offer {
        mss: 1400,
        window: 1024,
        window_shift: 3,
        tsval: 100_000,
    };

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

    /// A SYN as Linux sends one: the MSS, window scale 7, SACK-permitted and a timestamp.
    fn syn(from: &str, to: &str, mss: Option<u16>) -> Vec<u8> {
        syn_with(from, to, mss, Some(7), true, Some(THEIR_TS))
    }

    fn syn_with(
        from: &str,
        to: &str,
        mss: Option<u16>,
        window_scale: Option<u8>,
        sack_permitted: bool,
        tsval: Option<u32>,
    ) -> Vec<u8> {
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
                window_scale,
                max_seg_size: mss,
                sack_permitted,
                sack_ranges: [None; 3],
                timestamp: tsval.map(|v| TcpTimestampRepr::new(v, 0)),
                payload: &[],
            },
        )
    }

    /// The client's first segment after the handshake; `echo`: the TSecr, if it has
    /// timestamps.
    fn ack_with(seq: u32, ack: u32, echo: Option<u32>, payload: &[u8]) -> Vec<u8> {
        ack_from(CLIENT, SERVER, seq, ack, echo, payload)
    }

    fn ack_from(
        from: &str,
        to: &str,
        seq: u32,
        ack: u32,
        echo: Option<u32>,
        payload: &[u8],
    ) -> Vec<u8> {
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
                timestamp: echo.map(|e| TcpTimestampRepr::new(THEIR_TS + 3, e)),
                payload,
            },
        )
    }

    fn tcp(packet: &[u8]) -> TcpRepr<'_> {
        parse(packet).unwrap().tcp
    }

    const T0: Duration = Duration::from_secs(1000);

    /// The SYN|ACK answering `syn` at `T0`: its cookie and the TSval to echo.
    fn answer(cookies: &SynCookies, syn: &[u8]) -> (u32, Option<u32>) {
        let synack = cookies.synack(syn, &OFFER, T0).unwrap();
        let t = tcp(&synack);
        (t.seq_number.0 as u32, t.timestamp.map(|ts| ts.tsval))
    }

    /// The first segment after the handshake that `syn`'s SYN|ACK asks for.
    fn first_ack(cookies: &SynCookies, syn: &[u8], payload: &[u8]) -> Vec<u8> {
        let (cookie, tsval) = answer(cookies, syn);
        ack_with(ISN + 1, cookie.wrapping_add(1), tsval, payload)
    }

    #[test]
    fn the_synack_keeps_the_clients_options_in_its_timestamp() {
        let cookies = SynCookies::new();
        let synack = cookies
            .synack(&syn(CLIENT, SERVER, Some(1460)), &OFFER, T0)
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
        // Offered as the socket taking over would.
        assert_eq!((t.window_scale, t.sack_permitted), (Some(3), true));
        let ts = t.timestamp.unwrap();
        assert_eq!(ts.tsecr, THEIR_TS);
        // Window scale 7 and SACK, in the low bits; never ahead of the clock, and no further
        // behind than those bits need.
        assert_eq!(ts.tsval & OPTIONS, 7 | 0x10);
        assert!(ts.tsval <= OFFER.tsval && OFFER.tsval - ts.tsval < 64);
        // Checksums are filled: the client's kernel would drop it otherwise.
        let ip = Ipv4Packet::new_checked(&synack[..]).unwrap();
        assert!(ip.verify_checksum());
        let segment = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(segment.verify_checksum(&parsed.src, &parsed.dst));
    }

    #[test]
    fn the_synacks_timestamp_never_runs_ahead_of_the_clock() {
        let cookies = SynCookies::new();
        let syn = syn(CLIENT, SERVER, Some(1460));
        // Clocks whose low bits are below, equal to and above the options (0x17), and one
        // about to wrap.
        for clock in [0x1000_0005, 0x1000_0017, 0x1000_003f, 5, u32::MAX] {
            let offer = Offer {
                tsval: clock,
                ..OFFER
            };
            let synack = cookies.synack(&syn, &offer, T0).unwrap();
            let tsval = tcp(&synack).timestamp.unwrap().tsval;
            assert_eq!(tsval & OPTIONS, 0x17, "{clock:#x}");
            let behind = clock.wrapping_sub(tsval);
            assert!(behind < 64, "{clock:#x}: {tsval:#x}");
        }
    }

    #[test]
    fn without_timestamps_the_synack_offers_only_the_mss() {
        let cookies = SynCookies::new();
        let syn = syn_with(CLIENT, SERVER, Some(1460), Some(7), true, None);
        let synack = cookies.synack(&syn, &OFFER, T0).unwrap();
        let t = tcp(&synack);
        assert_eq!(t.max_seg_size, Some(1400));
        assert_eq!(
            (t.window_scale, t.sack_permitted, t.timestamp),
            (None, false, None)
        );
        let (cookie, _) = answer(&cookies, &syn);
        let rebuilt = cookies
            .check(&ack_with(ISN + 1, cookie.wrapping_add(1), None, b""), T0)
            .unwrap();
        let t = tcp(&rebuilt.syn);
        assert_eq!(
            (t.window_scale, t.sack_permitted, t.timestamp),
            (None, false, None)
        );
        assert!(!rebuilt.scaled);
    }

    #[test]
    fn the_ack_of_a_cookie_rebuilds_the_syn() {
        let cookies = SynCookies::new();
        for (client_mss, kept) in [(Some(1460), 1460), (Some(1400), 1220), (None, 536)] {
            let syn = syn(CLIENT, SERVER, client_mss);
            let (cookie, _) = answer(&cookies, &syn);
            let first = first_ack(&cookies, &syn, b"GET /");
            let rebuilt = cookies.check(&first, T0 + Duration::from_secs(5)).unwrap();
            assert_eq!(rebuilt.cookie, cookie);
            let parsed = parse(&rebuilt.syn).unwrap();
            assert_eq!(parsed.src, addr(CLIENT).ip().into());
            let t = parsed.tcp;
            assert_eq!((t.src_port, t.dst_port), (40000, 443));
            assert_eq!((t.control, t.ack_number), (TcpControl::Syn, None));
            assert_eq!(t.seq_number, TcpSeqNumber(ISN as i32));
            assert_eq!(t.max_seg_size, Some(kept));
            // The options the timestamp kept; the TSval is the ACK's, to be echoed next.
            assert_eq!((t.window_scale, t.sack_permitted), (Some(7), true));
            assert_eq!(t.timestamp, Some(TcpTimestampRepr::new(THEIR_TS + 3, 0)));
            assert!(rebuilt.scaled);
        }
    }

    #[test]
    fn each_option_is_kept_on_its_own() {
        let cookies = SynCookies::new();
        // (window scale, SACK) offered, and the window scale kept.
        for (wscale, sack, kept) in [
            (None, true, None),
            (Some(0), false, Some(0)),
            (Some(14), true, Some(14)),
            // Above RFC 7323's largest: read as 14 (smoltcp's parser, as Linux does), never
            // as "none".
            (Some(15), false, Some(14)),
        ] {
            let syn = syn_with(CLIENT, SERVER, Some(1460), wscale, sack, Some(THEIR_TS));
            let synack = cookies.synack(&syn, &OFFER, T0).unwrap();
            let t = tcp(&synack);
            assert_eq!(t.window_scale, wscale.map(|_| 3), "{wscale:?}");
            assert_eq!(t.sack_permitted, sack);
            let rebuilt = cookies.check(&first_ack(&cookies, &syn, b""), T0).unwrap();
            let t = tcp(&rebuilt.syn);
            assert_eq!((t.window_scale, t.sack_permitted), (kept, sack));
            assert_eq!(rebuilt.scaled, kept.is_some());
        }
    }

    #[test]
    fn an_ack_cannot_claim_options_its_syn_did_not_offer() {
        let cookies = SynCookies::new();
        let syn = syn_with(CLIENT, SERVER, Some(1460), None, false, Some(THEIR_TS));
        let (cookie, tsval) = answer(&cookies, &syn);
        let tsval = tsval.unwrap();
        let ack = |echo| ack_with(ISN + 1, cookie.wrapping_add(1), echo, b"");
        assert!(cookies.check(&ack(Some(tsval)), T0).is_some());
        // Window scale 14 and SACK instead of none.
        assert_eq!(cookies.check(&ack(Some(tsval & !OPTIONS | 0x1e)), T0), None);
        // No timestamp where the SYN|ACK had one.
        assert_eq!(cookies.check(&ack(None), T0), None);
        // And a timestamp where it had none.
        let plain = syn_with(CLIENT, SERVER, Some(1460), Some(7), true, None);
        let (cookie, _) = answer(&cookies, &plain);
        let claimed = ack_with(ISN + 1, cookie.wrapping_add(1), Some(0x17), b"");
        assert_eq!(cookies.check(&claimed, T0), None);
    }

    #[test]
    fn only_the_clients_first_segment_for_a_fresh_cookie_verifies() {
        let cookies = SynCookies::new();
        let (c, tsval) = answer(&cookies, &syn(CLIENT, SERVER, Some(1460)));
        let later = |d: u64| T0 + Duration::from_secs(d);
        let first = ack_with(ISN + 1, c.wrapping_add(1), tsval, &[]);
        assert!(cookies.check(&first, later(64)).is_some(), "one period on");
        assert!(
            cookies.check(&first, later(128)).is_none(),
            "two periods on"
        );
        let bad = [
            ack_with(ISN + 1, c.wrapping_add(2), tsval, &[]),
            ack_with(ISN + 1461, c.wrapping_add(1), tsval, &[]),
            ack_from(
                "10.0.0.2:40001",
                SERVER,
                ISN + 1,
                c.wrapping_add(1),
                tsval,
                &[],
            ),
            ack_from(
                CLIENT,
                "192.0.2.2:443",
                ISN + 1,
                c.wrapping_add(1),
                tsval,
                &[],
            ),
            ack_from(
                "10.0.0.3:40000",
                SERVER,
                ISN + 1,
                c.wrapping_add(1),
                tsval,
                &[],
            ),
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
            .synack(&syn(client, server, Some(1440)), &OFFER, T0)
            .unwrap();
        let t = tcp(&synack);
        let (c, tsval) = (t.seq_number.0 as u32, t.timestamp.map(|ts| ts.tsval));
        let first = ack_from(client, server, ISN + 1, c.wrapping_add(1), tsval, &[]);
        let rebuilt = cookies.check(&first, T0).unwrap();
        let t = tcp(&rebuilt.syn);
        assert_eq!(t.max_seg_size, Some(1440));
        assert_eq!((t.window_scale, t.sack_permitted), (Some(7), true));
    }

    #[test]
    fn what_is_not_a_plain_syn_or_ack_gets_nothing() {
        let cookies = SynCookies::new();
        let a_syn = syn(CLIENT, SERVER, None);
        for garbage in [&[][..], &[0x45; 10][..], &a_syn[..30]] {
            assert_eq!(cookies.synack(garbage, &OFFER, T0), None);
            assert_eq!(cookies.check(garbage, T0), None);
        }
        assert_eq!(cookies.check(&a_syn, T0), None, "a SYN is no ACK");
        let synack_like = first_ack(&cookies, &a_syn, &[]);
        assert!(cookies.synack(&synack_like, &OFFER, T0).is_none());
    }
}
