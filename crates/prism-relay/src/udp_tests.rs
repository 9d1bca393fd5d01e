//! The UDP relay over loopback: a client tunnel, a server whose "TUN" is an in-memory link.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "tests"
)]
// In the crate (not in tests/) because forging a server's datagram needs `frame`, which is
// not public.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::frame::Keys;
use crate::{Counters, PacketTunnel, Server, UdpTunnel};
use bytes::Bytes;
use prism_device::Link;
use prism_device::Outside;
use smoltcp::wire::Ipv4Packet;
use tokio::net::UdpSocket;

const PSK: &[u8] = b"0123456789abcdef0123456789abcdef";

/// A UDP-in-IPv4 packet from `src` to `dst` (headers only matter here).
pub(crate) fn packet(src: [u8; 4], dst: [u8; 4], tag: u8) -> Bytes {
    let mut p = vec![0u8; 32];
    p[0] = 0x45;
    p[3] = 32;
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[31] = tag;
    Ipv4Packet::new_unchecked(&mut p[..]).fill_checksum();
    Bytes::from(p)
}

struct Setup {
    client: Arc<UdpTunnel>,
    server_addr: SocketAddr,
    tun: Link,
    server_counters: Arc<Counters>,
    client_counters: Arc<Counters>,
}

async fn setup() -> Setup {
    let server_counters = Arc::new(Counters::default());
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        Keys::derive(PSK).unwrap(),
        Arc::clone(&server_counters),
    )
    .await
    .unwrap();
    let server_addr = server.local_addr().unwrap();
    let (server_end, tun) = Link::pair(64);
    tokio::spawn(server.run(server_end));
    let client_counters = Arc::new(Counters::default());
    let client = UdpTunnel::connect(
        server_addr,
        Keys::derive(PSK).unwrap(),
        vec![IpAddr::from([10, 99, 0, 1])],
        &Outside::default(),
        Arc::clone(&client_counters),
    )
    .await
    .unwrap();
    Setup {
        client,
        server_addr,
        tun,
        server_counters,
        client_counters,
    }
}

/// The next packet the server writes to its TUN, if one comes within half a second.
pub(crate) async fn tun_receives(tun: &mut Link) -> Option<Bytes> {
    let mut batch = Vec::new();
    match tokio::time::timeout(Duration::from_millis(500), tun.recv_batch(&mut batch)).await {
        Ok(Ok(_)) => batch.into_iter().next(),
        _ => None,
    }
}

#[tokio::test]
async fn packets_cross_both_ways_and_only_to_their_owner() {
    let mut s = setup().await;
    let out = packet([10, 99, 0, 1], [192, 0, 2, 1], 1);
    s.client.send(out.clone()).await.unwrap();
    assert_eq!(tun_receives(&mut s.tun).await, Some(out));

    let back = packet([192, 0, 2, 1], [10, 99, 0, 1], 2);
    s.tun.send(back.clone()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), s.client.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, back);

    // A reply for an address no session owns goes nowhere.
    s.tun
        .send(packet([192, 0, 2, 1], [10, 99, 0, 7], 3))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.server_counters.snapshot().drop_no_session, 1);
    assert_eq!(s.client_counters.snapshot().received, 1);
}

#[tokio::test]
async fn a_client_cannot_send_from_an_address_it_does_not_own() {
    let mut s = setup().await;
    s.client
        .send(packet([10, 99, 0, 9], [192, 0, 2, 1], 1))
        .await
        .unwrap();
    assert_eq!(tun_receives(&mut s.tun).await, None);
    assert_eq!(s.server_counters.snapshot().drop_spoofed, 1);
}

#[tokio::test]
async fn forged_truncated_replayed_and_wrong_key_datagrams_never_reach_the_tun() {
    let mut s = setup().await;
    // Capture a genuine datagram by standing in for the server.
    let spy = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let spied = UdpTunnel::connect(
        spy.local_addr().unwrap(),
        Keys::derive(PSK).unwrap(),
        vec![IpAddr::from([10, 99, 0, 3])],
        &Outside::default(),
        Arc::new(Counters::default()),
    )
    .await
    .unwrap();
    let mut hello = vec![0u8; 2048];
    let n = spy.recv(&mut hello).await.unwrap();
    hello.truncate(n);
    spied
        .send(packet([10, 99, 0, 3], [192, 0, 2, 1], 5))
        .await
        .unwrap();
    let mut data = vec![0u8; 2048];
    let n = spy.recv(&mut data).await.unwrap();
    data.truncate(n);

    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // The genuine hello and datagram, then the same datagram again: one delivery.
    attacker.send_to(&hello, s.server_addr).await.unwrap();
    attacker.send_to(&data, s.server_addr).await.unwrap();
    attacker.send_to(&data, s.server_addr).await.unwrap();
    // Forged: one flipped bit; truncated; garbage; sealed with another key.
    let mut forged = data.clone();
    forged[30] ^= 1;
    attacker.send_to(&forged, s.server_addr).await.unwrap();
    attacker.send_to(&data[..20], s.server_addr).await.unwrap();
    attacker.send_to(&[0x55; 80], s.server_addr).await.unwrap();
    let stranger = UdpTunnel::connect(
        s.server_addr,
        Keys::derive(b"another key, not the relay's one").unwrap(),
        vec![IpAddr::from([10, 99, 0, 2])],
        &Outside::default(),
        Arc::new(Counters::default()),
    )
    .await
    .unwrap();
    stranger
        .send(packet([10, 99, 0, 2], [192, 0, 2, 1], 6))
        .await
        .unwrap();

    let genuine = tun_receives(&mut s.tun).await;
    assert!(genuine.is_some(), "the genuine packet");
    assert_eq!(
        tun_receives(&mut s.tun).await,
        None,
        "nothing else reaches the TUN"
    );
    let c = &s.server_counters;
    assert_eq!(c.snapshot().drop_replay, 1);
    assert_eq!(c.snapshot().drop_truncated, 1);
    // The flipped bit, the garbage, and the stranger's hello and packet.
    assert_eq!(c.snapshot().drop_auth + c.snapshot().drop_version, 4);
    drop(s.client);
}

#[tokio::test]
async fn a_client_accepts_only_packets_for_its_own_addresses() {
    // The test stands in for the server: it learns the session from the hello and seals
    // replies with the server-to-client key.
    let fake_server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let counters = Arc::new(Counters::default());
    let client = UdpTunnel::connect(
        fake_server.local_addr().unwrap(),
        Keys::derive(PSK).unwrap(),
        vec![IpAddr::from([10, 99, 0, 1])],
        &Outside::default(),
        Arc::clone(&counters),
    )
    .await
    .unwrap();
    let mut hello = vec![0u8; 2048];
    let (_, client_addr) = fake_server.recv_from(&mut hello).await.unwrap();
    let mut session = [0u8; 16];
    session.copy_from_slice(&hello[2..18]);
    let keys = Keys::derive(PSK).unwrap();
    let seal = |counter: u64, dst: [u8; 4]| {
        crate::frame::seal(
            &keys.to_client,
            &crate::frame::Header {
                kind: crate::frame::Kind::Data,
                session,
                counter,
            },
            &packet([192, 0, 2, 1], dst, 1),
        )
        .unwrap()
    };
    fake_server
        .send_to(&seal(0, [10, 99, 0, 9]), client_addr)
        .await
        .unwrap();
    fake_server
        .send_to(&seal(1, [10, 99, 0, 1]), client_addr)
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), client.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, packet([192, 0, 2, 1], [10, 99, 0, 1], 1));
    assert_eq!(counters.snapshot().drop_spoofed, 1);

    // The same behind a link's virtio-net header, written into the datagram's own room: the
    // address check reads the packet behind it.
    for (counter, dst) in [(2, [10, 99, 0, 9]), (3, [10, 99, 0, 1])] {
        fake_server
            .send_to(&seal(counter, dst), client_addr)
            .await
            .unwrap();
    }
    let mut framed = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(2),
        client.recv_many_framed(&mut framed, prism_device::Framing::Virtio),
    )
    .await
    .unwrap()
    .unwrap();
    let expected = prism_device::Framing::Virtio.frame(packet([192, 0, 2, 1], [10, 99, 0, 1], 1));
    assert_eq!(framed, [expected]);
    assert_eq!(counters.snapshot().drop_spoofed, 2);
}

/// A client that restarts (a new session with the same addresses and the key) takes its
/// addresses over at once: replies go to it, not to the old session.
#[tokio::test]
async fn a_restarted_client_takes_its_addresses_over_at_once() {
    let mut s = setup().await;
    let again = UdpTunnel::connect(
        s.server_addr,
        Keys::derive(PSK).unwrap(),
        vec![IpAddr::from([10, 99, 0, 1])],
        &Outside::default(),
        Arc::new(Counters::default()),
    )
    .await
    .unwrap();
    // Its hello arrives before its first packet.
    let out = packet([10, 99, 0, 1], [192, 0, 2, 1], 3);
    again.send(out.clone()).await.unwrap();
    assert_eq!(tun_receives(&mut s.tun).await, Some(out));
    let back = packet([192, 0, 2, 1], [10, 99, 0, 1], 4);
    s.tun.send(back.clone()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), again.recv())
        .await
        .expect("the restarted client gets the reply at once")
        .unwrap();
    assert_eq!(got, back);
    assert_eq!(s.server_counters.snapshot().takeovers, 1);
    // The old session is gone: what it sends now is refused.
    let stale = packet([10, 99, 0, 1], [192, 0, 2, 1], 5);
    s.client.send(stale).await.unwrap();
    assert_eq!(tun_receives(&mut s.tun).await, None);
}

/// The server acknowledges each hello: the client knows the server is there and shares the
/// key (without it, the client warns that the relay is silent).
#[tokio::test]
async fn the_server_acknowledges_hellos() {
    let s = setup().await;
    // The acknowledgement is taken in by the client's receive loop.
    let receiving = {
        let client = Arc::clone(&s.client);
        tokio::spawn(async move { client.recv().await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while s.client_counters.snapshot().hello_acks == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no acknowledgement");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.server_counters.snapshot().hellos, 1);
    receiving.abort();
}
