//! Hostile input: tens of thousands of mutated packets, most with their checksums recomputed so
//! that they get past classification into smoltcp's own parsing, over IPv4 and IPv6, with
//! offload on and off, for both handshakes. The stack must not panic, must count every packet
//! it read exactly once (handed to a connection, or one reason for refusing or dropping it),
//! and must still serve a real connection afterwards.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use std::sync::Arc;

use prism_device::{Framing, Link};
use prism_stack::{Config, Handshake, Rejection, Stack};
use prism_tests::{Client, tcp_v4, tcp_v6, virtio_kernel};
use smoltcp::wire::{IpAddress, Ipv4Packet, Ipv6Packet, TcpControl, TcpPacket};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Recomputes the IP and TCP checksums of a packet, if its headers allow.
fn fix_checksums(bytes: &mut [u8]) {
    if let Ok(mut ip) = Ipv4Packet::new_checked(&mut *bytes) {
        ip.fill_checksum();
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        if let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) {
            tcp.fill_checksum(&IpAddress::from(src), &IpAddress::from(dst));
        }
    } else if let Ok(mut ip) = Ipv6Packet::new_checked(&mut *bytes) {
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        if let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) {
            tcp.fill_checksum(&IpAddress::from(src), &IpAddress::from(dst));
        }
    }
}

fn mutate(rng: &mut Rng, seeds: &[Bytes]) -> Bytes {
    let mut bytes = seeds[rng.below(seeds.len())].to_vec();
    for _ in 0..1 + rng.below(4) {
        if bytes.is_empty() {
            bytes.push(rng.next() as u8);
        }
        match rng.below(5) {
            0 | 1 => {
                let i = rng.below(bytes.len());
                bytes[i] ^= 1 << rng.below(8);
            }
            2 => {
                let i = rng.below(bytes.len());
                bytes[i] = rng.next() as u8;
            }
            3 => bytes.truncate(rng.below(bytes.len() + 1)),
            _ => bytes.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
        }
    }
    // Most mutants get valid checksums so they reach smoltcp.
    if rng.below(4) != 0 {
        fix_checksums(&mut bytes);
    }
    Bytes::from(bytes)
}

#[tokio::test]
async fn mutated_ipv4_packets_never_stop_a_fast_stack() {
    hostile(Handshake::Fast, false, Framing::Plain).await;
}

#[tokio::test]
async fn mutated_ipv4_packets_never_stop_a_fast_stack_with_offload() {
    hostile(Handshake::Fast, false, Framing::Virtio).await;
}

#[tokio::test]
async fn mutated_ipv6_packets_never_stop_a_fast_stack() {
    hostile(Handshake::Fast, true, Framing::Plain).await;
}

#[tokio::test]
async fn mutated_ipv6_packets_never_stop_a_fast_stack_with_offload() {
    hostile(Handshake::Fast, true, Framing::Virtio).await;
}

#[tokio::test]
async fn mutated_ipv4_packets_never_stop_a_consistent_stack() {
    hostile(Handshake::Consistent, false, Framing::Plain).await;
}

#[tokio::test]
async fn mutated_ipv4_packets_never_stop_a_consistent_stack_with_offload() {
    hostile(Handshake::Consistent, false, Framing::Virtio).await;
}

#[tokio::test]
async fn mutated_ipv6_packets_never_stop_a_consistent_stack() {
    hostile(Handshake::Consistent, true, Framing::Plain).await;
}

#[tokio::test]
async fn mutated_ipv6_packets_never_stop_a_consistent_stack_with_offload() {
    hostile(Handshake::Consistent, true, Framing::Virtio).await;
}

async fn hostile(handshake: Handshake, v6: bool, framing: Framing) {
    let iterations: usize = std::env::var("PRISM_HOSTILE_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let seed: u64 = std::env::var("PRISM_HOSTILE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_cafe);
    let mut config = Config::default();
    config.tcp_rx_buffer = 8192;
    config.tcp_tx_buffer = 8192;
    config.handshake = Arc::new(handshake);
    config.pending_timeout = Duration::from_millis(50);
    let (stack_end, client_end) = Link::framed_pair(4096, framing);
    let (stack, mut requests) = Stack::new(config, stack_end);
    let counters = stack.counters();
    let control = stack.control();
    tokio::spawn(stack.run());
    // With offload, each packet reaches the stack framed as an offloading TUN frames it.
    let link = match framing {
        Framing::Virtio => virtio_kernel(client_end).0,
        _ => client_end,
    };
    let application = tokio::spawn(async move {
        // Every kind of answer, in turn: accept, refuse, unreachable, and silence.
        let mut held = Vec::new();
        let mut turn = 0usize;
        while let Some(request) = requests.next().await {
            turn += 1;
            match turn % 4 {
                0 => drop(request.accept()),
                1 => request.reject(Rejection::Refused),
                2 => request.reject(Rejection::HostUnreachable),
                _ => held.push(request),
            }
        }
    });
    let mut client = Client::new(link);

    let (client_ip, a, b): (&str, SocketAddr, SocketAddr) = if v6 {
        (
            "fd00::2",
            "[fd00::2]:40000".parse().unwrap(),
            "[2001:db8::1]:80".parse().unwrap(),
        )
    } else {
        (
            "10.0.0.2",
            "10.0.0.2:40000".parse().unwrap(),
            "192.0.2.1:80".parse().unwrap(),
        )
    };
    let tcp = if v6 { tcp_v6 } else { tcp_v4 };
    let seeds = [
        tcp(a, b, TcpControl::Syn, 1, &[]),
        tcp(a, b, TcpControl::None, 2, b"payload bytes"),
        tcp(a, b, TcpControl::Fin, 3, b"last"),
        tcp(a, b, TcpControl::Rst, 4, &[]),
        tcp(a, b, TcpControl::Psh, 5, &[0xaa; 300]),
    ];
    let mut rng = Rng(seed | 1);
    for i in 0..iterations {
        client.inject(mutate(&mut rng, &seeds)).await;
        if i % 1000 == 0 {
            // Drain replies so the link never fills.
            client.capture(Duration::from_millis(1)).await;
        }
    }
    client.capture(Duration::from_millis(50)).await;

    // Still serving: real connections complete their handshakes (the application accepts
    // one request in four, so eight connections are enough).
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let from = SocketAddr::new(client_ip.parse().unwrap(), 39000 + i);
            client.connect(from, b, 4096)
        })
        .collect();
    client
        .until("a handshake after the junk", |c| {
            handles
                .iter()
                .any(|&h| c.socket(h).may_send())
                .then_some(())
        })
        .await;
    let c = counters.snapshot();
    assert!(
        c.packets_in as usize > iterations,
        "not every packet was read: {c}"
    );
    let drops = c.drop_version
        + c.drop_truncated
        + c.drop_checksum
        + c.drop_fragment
        + c.drop_address
        + c.drop_not_tcp
        + c.drop_divert_full;
    assert!(drops > 0 && c.connections_opened > 0, "{c}");
    // Every packet read is counted once: handed to a connection, diverted, or one reason.
    let refused = c.syn_refused_stopping + c.syn_cookies_sent + c.no_connection + c.syn_absorbed;
    assert_eq!(
        c.packets_in,
        c.segments_in + c.diverted + drops + refused,
        "{c}"
    );
    eprintln!("{handshake}, IPv6 {v6}, {framing:?}: seed {seed}, {iterations} packets: {c}");

    // The traffic stops, the application lets go of the requests it held, and every timer
    // runs out (on tokio's clock, paused from here): no connection is left in any state.
    application.abort();
    tokio::time::pause();
    for _ in 0..60 {
        client.capture(Duration::from_secs(10)).await;
    }
    let report = control.report().await.unwrap();
    assert_eq!(
        (report.open, report.half_open, report.pending),
        (0, 0, 0),
        "left behind: {:?}",
        report.connections
    );
}
