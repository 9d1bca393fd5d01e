//! The relay's receive paths: datagrams to the server (from two sources) and to the client,
//! raw or sealed with the right key around a hello or an IP packet, then bit-flipped or cut.
//! A fresh server and client per input, on loopback sockets nobody reads.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use prism_relay::fuzzing::{ClientHarness, ServerHarness, hello, open, seal};

/// Addresses a generated packet or hello picks from: the client's own, another inside the
/// server's prefixes, and one outside.
const ADDRESSES: [IpAddr; 6] = [
    IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)),
    IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 3)),
    IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 0, 1)),
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)),
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3)),
    IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
];

#[derive(Debug, Arbitrary)]
enum Payload {
    Raw(Vec<u8>),
    Hello(Vec<u8>),
    Packet { src: u8, dst: u8, body: Vec<u8> },
}

#[derive(Debug, Arbitrary)]
struct Datagram {
    to_client: bool,
    from_second_source: bool,
    sealed: bool,
    hello: bool,
    session: u8,
    counter: u16,
    payload: Payload,
    flip: Option<(u16, u8)>,
    cut: Option<u16>,
}

fn address(i: u8) -> IpAddr {
    ADDRESSES[usize::from(i) % ADDRESSES.len()]
}

/// A minimal IP packet (UDP) from `src` to `dst`; the families follow `src`.
fn packet(src: IpAddr, dst: IpAddr, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (20 + body.len()).min(usize::from(u16::MAX)) as u16;
            out.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
            out[2..4].copy_from_slice(&total.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let len = body.len().min(usize::from(u16::MAX)) as u16;
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&[17, 64]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, _) => return packet(s, s, body),
    }
    out.extend_from_slice(body);
    out
}

fn bytes(d: &Datagram) -> Vec<u8> {
    let payload = match &d.payload {
        Payload::Raw(raw) => raw.clone(),
        Payload::Hello(picks) => hello(&picks.iter().map(|&i| address(i)).collect::<Vec<_>>()),
        Payload::Packet { src, dst, body } => packet(address(*src), address(*dst), body),
    };
    let mut out = if d.sealed {
        let session = [d.session % 4; 16];
        seal(
            !d.to_client,
            d.hello,
            session,
            u64::from(d.counter),
            &payload,
        )
    } else {
        payload
    };
    if let Some((at, mask)) = d.flip {
        if let Some(byte) = out.get_mut(usize::from(at)) {
            *byte ^= mask;
        }
    }
    if let Some(cut) = d.cut {
        out.truncate(usize::from(cut));
    }
    out
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
            let Ok(mut server) = ServerHarness::new().await else {
                return;
            };
            let Ok(at) = server.local_addr() else {
                return;
            };
            let Ok(client) = ClientHarness::new(at).await else {
                return;
            };
            let sources = [
                SocketAddr::from(([127, 0, 0, 1], 40001)),
                SocketAddr::from(([127, 0, 0, 2], 40002)),
            ];
            for d in &datagrams {
                let datagram = bytes(d);
                let authentic = open(&datagram);
                let delivered = if d.to_client {
                    client.accept(&datagram)
                } else {
                    server.inbound(&datagram, sources[usize::from(d.from_second_source)])
                };
                // Nothing that fails authentication reaches a TUN.
                assert!(authentic || delivered.is_none());
            }
            let _ = server.counters();
        });
    });
});
