//! Hostile input: tens of thousands of mutated packets, most with their checksums recomputed so
//! that they get past classification into smoltcp's own parsing. The stack must not panic, must
//! count what it drops, and must still serve a real connection afterwards.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use std::sync::Arc;

use prism_stack::{Config, Handshake, Rejection};
use prism_tests::{Client, start_stack, tcp_v4};
use smoltcp::wire::{IpAddress, Ipv4Packet, TcpControl, TcpPacket};

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

/// Recomputes the IPv4 and TCP checksums of a packet, if its headers allow.
fn fix_checksums(bytes: &mut [u8]) {
    let Ok(mut ip) = Ipv4Packet::new_checked(&mut *bytes) else {
        return;
    };
    ip.fill_checksum();
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    if let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) {
        tcp.fill_checksum(&IpAddress::from(src), &IpAddress::from(dst));
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
async fn mutated_packets_never_stop_a_fast_stack() {
    hostile(Handshake::Fast).await;
}

#[tokio::test]
async fn mutated_packets_never_stop_a_consistent_stack() {
    hostile(Handshake::Consistent).await;
}

async fn hostile(handshake: Handshake) {
    let iterations: usize = std::env::var("PRISM_HOSTILE_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    let seed: u64 = std::env::var("PRISM_HOSTILE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_cafe);
    let mut config = Config::default();
    config.tcp_rx_buffer = 8192;
    config.tcp_tx_buffer = 8192;
    config.handshake = Arc::new(handshake);
    config.pending_timeout = Duration::from_millis(50);
    let (link, mut requests, counters) = start_stack(config);
    tokio::spawn(async move {
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

    let a: SocketAddr = "10.0.0.2:40000".parse().unwrap();
    let b: SocketAddr = "192.0.2.1:80".parse().unwrap();
    let seeds = [
        tcp_v4(a, b, TcpControl::Syn, 1, &[]),
        tcp_v4(a, b, TcpControl::None, 2, b"payload bytes"),
        tcp_v4(a, b, TcpControl::Fin, 3, b"last"),
        tcp_v4(a, b, TcpControl::Rst, 4, &[]),
        tcp_v4(a, b, TcpControl::Psh, 5, &[0xaa; 300]),
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
        .map(|i| client.connect(format!("10.0.0.2:{}", 39000 + i).parse().unwrap(), b, 4096))
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
        + c.drop_not_tcp;
    assert!(drops > 0 && c.connections_opened > 0, "{c}");
    eprintln!("{handshake}: seed {seed}, {iterations} packets: {c}");
}
