//! The relay server with identities: handshake initiations from allowed clients, a stranger and
//! for another server's key, with any session id and timestamp; hellos and packets sealed in
//! the sessions those handshakes opened (or under no session's key); raw bytes; each then
//! bit-flipped or cut. Only a datagram that opens under a completed handshake's key may reach
//! the TUN, and only from its client's addresses; the server never holds more sessions than
//! the allowed clients have handshakes.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use prism_relay::fuzzing::{IdentityHarness, Outcome};

/// Source addresses a packet picks from: client 0's two, client 1's, and two nobody's.
const ADDRESSES: [IpAddr; 5] = [
    IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)),
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)),
    IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 3)),
    IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 4)),
    IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
];

#[derive(Debug, Arbitrary)]
enum Kind {
    Initiation {
        client: u8,
        timestamp: u16,
        to_other_server: bool,
    },
    Hello,
    Packet {
        src: u8,
        body: Vec<u8>,
    },
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct Datagram {
    kind: Kind,
    session: u8,
    counter: u16,
    from_second_source: bool,
    flip: Option<(u16, u8)>,
    cut: Option<u16>,
}

/// A minimal IP packet (UDP) from `src` to a far address of its family.
fn packet(src: IpAddr, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match src {
        IpAddr::V4(s) => {
            let total = (20 + body.len()).min(usize::from(u16::MAX)) as u16;
            out.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
            out[2..4].copy_from_slice(&total.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&[192, 0, 2, 1]);
        }
        IpAddr::V6(s) => {
            let len = body.len().min(usize::from(u16::MAX)) as u16;
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&[17, 64]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(
                &std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9).octets(),
            );
        }
    }
    out.extend_from_slice(body);
    out
}

fn source(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(packet.get(12..16)?).ok()?)),
        6 => Some(IpAddr::from(<[u8; 16]>::try_from(packet.get(8..24)?).ok()?)),
        _ => None,
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
}

fuzz_target!(|datagrams: Vec<Datagram>| {
    RUNTIME.with(|runtime| {
        runtime.block_on(async {
            let Ok(mut h) = IdentityHarness::new().await else {
                return;
            };
            let sources = [
                SocketAddr::from(([127, 0, 0, 1], 40001)),
                SocketAddr::from(([127, 0, 0, 2], 40002)),
            ];
            for d in datagrams.iter().take(64) {
                let session = [d.session % 8; 16];
                let counter = u64::from(d.counter);
                let mut bytes = match &d.kind {
                    Kind::Initiation {
                        client,
                        timestamp,
                        to_other_server,
                    } => h.initiation(*client, session, u64::from(*timestamp), *to_other_server),
                    Kind::Hello => h.seal(session, true, counter, &[]),
                    Kind::Packet { src, body } => {
                        let src = ADDRESSES[usize::from(*src) % ADDRESSES.len()];
                        h.seal(session, false, counter, &packet(src, body))
                    }
                    Kind::Raw(raw) => raw.clone(),
                };
                if let Some((at, mask)) = d.flip {
                    if let Some(byte) = bytes.get_mut(usize::from(at)) {
                        *byte ^= mask;
                    }
                }
                if let Some(cut) = d.cut {
                    bytes.truncate(usize::from(cut));
                }
                let authentic = h.authentic(&bytes);
                let from = sources[usize::from(d.from_second_source)];
                if let Outcome::Packet(packet) = h.inbound(&bytes, from) {
                    assert!(
                        authentic,
                        "a datagram no handshake's key opens reached the TUN"
                    );
                    let src = source(&packet);
                    assert!(
                        src.is_some_and(|s| ADDRESSES[..3].contains(&s)),
                        "a packet from {src:?}, nobody's address, reached the TUN"
                    );
                }
                // Per allowed client, the current session, one awaiting confirmation and the
                // one before the current in its grace.
                assert!(h.server_sessions() <= 6, "{} sessions", h.server_sessions());
            }
            let _ = h.counters();
        });
    });
});
