//! Relay identities: the server's accept path fed datagrams directly (handshakes, forgeries,
//! floods, rotations), and clients with their own keys over loopback.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests"
)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prism_device::{Link, Outside};
use smoltcp::wire::Ipv4Packet;
use tokio::sync::mpsc;

use crate::frame::{self, Header, Keys, Kind};
use crate::identity::{self, Peer, PrivateKey, PublicKey};
use crate::server::Inbound;
use crate::{ClientAuth, Counters, PacketTunnel, Rotation, Server, ServerAuth, UdpTunnel};

const A: [u8; 4] = [10, 99, 0, 1];
const B: [u8; 4] = [10, 99, 0, 2];
const FAR: [u8; 4] = [192, 0, 2, 1];

/// A UDP-in-IPv4 packet from `src` to `dst`.
fn packet(src: [u8; 4], dst: [u8; 4], tag: u8) -> Bytes {
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

struct Keyring {
    server: PrivateKey,
    a: PrivateKey,
    b: PrivateKey,
}

impl Keyring {
    fn new() -> Keyring {
        let key = || PrivateKey::generate().unwrap();
        Keyring {
            server: key(),
            a: key(),
            b: key(),
        }
    }

    fn auth(&self) -> ServerAuth {
        let peer = |key: &PrivateKey, address: [u8; 4]| Peer {
            key: key.public_key(),
            allowed: vec![ipnet::IpNet::new(IpAddr::from(address), 32).unwrap()],
        };
        ServerAuth::Identities {
            private: self.server.clone(),
            peers: vec![peer(&self.a, A), peer(&self.b, B)],
        }
    }

    fn client(&self, key: &PrivateKey, rotation: Rotation) -> ClientAuth {
        ClientAuth::Identity {
            private: key.clone(),
            server: self.server.public_key(),
            rotation,
        }
    }
}

async fn server(keys: &Keyring) -> (Server, Arc<Counters>) {
    let counters = Arc::new(Counters::default());
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        keys.auth(),
        Arc::clone(&counters),
    )
    .await
    .unwrap();
    (server, counters)
}

fn from() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

/// A handshake of `client` through `server.inbound`: the session's keys, or `None` if refused.
fn handshake(
    server: &mut Server,
    client: &PrivateKey,
    server_key: &PublicKey,
    session: [u8; 16],
    timestamp: u64,
) -> Option<Keys> {
    let addresses = frame::encode_addresses(&[IpAddr::from(A)]);
    let (initiation, datagram) =
        identity::initiate(client, server_key, session, timestamp, &addresses).unwrap();
    match server.inbound(BytesMut::from(&datagram[..]), from()) {
        Inbound::Ack(response, _) => Some(identity::complete(initiation, &response).unwrap()),
        _ => None,
    }
}

fn data(keys: &Keys, session: [u8; 16], counter: u64, packet: &[u8]) -> Vec<u8> {
    let header = Header {
        kind: Kind::Data,
        session,
        counter,
    };
    frame::seal(&keys.to_server, &header, packet).unwrap()
}

fn delivered(server: &mut Server, datagram: &[u8]) -> bool {
    matches!(
        server.inbound(BytesMut::from(datagram), from()),
        Inbound::Packet(_)
    )
}

#[tokio::test]
async fn replayed_forged_truncated_and_spoofing_datagrams_are_each_refused() {
    let keys = Keyring::new();
    let (mut server, counters) = server(&keys).await;
    let server_key = keys.server.public_key();
    let session = [1; 16];
    let k = handshake(&mut server, &keys.a, &server_key, session, 10).unwrap();
    let genuine = data(&k, session, 0, &packet(A, FAR, 1));
    assert!(delivered(&mut server, &genuine));
    assert!(!delivered(&mut server, &genuine), "replayed");
    let mut forged = data(&k, session, 1, &packet(A, FAR, 2));
    forged[40] ^= 1;
    assert!(!delivered(&mut server, &forged), "forged");
    assert!(!delivered(&mut server, &genuine[..20]), "truncated");
    // A's session may not carry B's address.
    assert!(!delivered(
        &mut server,
        &data(&k, session, 2, &packet(B, FAR, 3))
    ));
    // Another server's session keys: unknown session.
    assert!(!delivered(
        &mut server,
        &data(&k, [9; 16], 0, &packet(A, FAR, 4))
    ));
    let c = counters.snapshot();
    assert_eq!(
        (c.received, c.drop_replay, c.drop_auth, c.drop_truncated),
        (1, 1, 1, 1)
    );
    assert_eq!((c.drop_spoofed, c.drop_session, c.handshakes), (1, 1, 1));
}

#[tokio::test]
async fn a_replayed_handshake_and_an_unknown_or_misaddressed_one_leave_nothing() {
    let keys = Keyring::new();
    let (mut server, counters) = server(&keys).await;
    let server_key = keys.server.public_key();
    let addresses = frame::encode_addresses(&[IpAddr::from(A)]);
    let (_, initiation) =
        identity::initiate(&keys.a, &server_key, [1; 16], 10, &addresses).unwrap();
    assert!(matches!(
        server.inbound(BytesMut::from(&initiation[..]), from()),
        Inbound::Ack(..)
    ));
    // The same initiation again, and an older one: replays.
    assert!(matches!(
        server.inbound(BytesMut::from(&initiation[..]), from()),
        Inbound::Nothing
    ));
    assert!(handshake(&mut server, &keys.a, &server_key, [2; 16], 9).is_none());
    // A key the server does not know, and a handshake made for another server's key.
    let stranger = PrivateKey::generate().unwrap();
    assert!(handshake(&mut server, &stranger, &server_key, [3; 16], 11).is_none());
    let other_server = PrivateKey::generate().unwrap().public_key();
    assert!(handshake(&mut server, &keys.a, &other_server, [4; 16], 12).is_none());
    let c = counters.snapshot();
    assert_eq!(
        (c.handshakes, c.drop_replay, c.drop_unknown_key, c.drop_mac),
        (1, 2, 1, 1)
    );
    assert_eq!(server.session_count(), 1, "only the genuine session");
}

#[tokio::test(start_paused = true)]
async fn a_handshake_flood_is_rejected_cheaply_and_sessions_keep_working() {
    let keys = Keyring::new();
    let (mut server, counters) = server(&keys).await;
    let server_key = keys.server.public_key();
    let session = [1; 16];
    let k = handshake(&mut server, &keys.a, &server_key, session, 10).unwrap();
    assert!(delivered(
        &mut server,
        &data(&k, session, 0, &packet(A, FAR, 1))
    ));

    // Initiations without the server's key (random bytes behind a handshake header): mac1
    // rejects them before any Diffie-Hellman.
    let mut junk = [0u8; 170];
    junk[0] = frame::VERSION;
    junk[1] = Kind::Initiation as u8;
    let floods = 20_000u64;
    let started = std::time::Instant::now();
    for i in 0..floods {
        junk[2..10].copy_from_slice(&i.to_be_bytes());
        junk[100..108].copy_from_slice(&(i * 7919).to_be_bytes());
        assert!(matches!(
            server.inbound(BytesMut::from(&junk[..]), from()),
            Inbound::Nothing
        ));
    }
    let per_junk = started.elapsed() / u32::try_from(floods).unwrap();
    // Initiations from strangers who know the server's public key: past mac1, they cost two
    // Diffie-Hellman operations each, up to the handshake rate; the rest is dropped as busy.
    // The clock stands still here (a paused runtime), so the budget does not refill.
    let strangers = 300u64;
    let stranger = PrivateKey::generate().unwrap();
    let initiations: Vec<Vec<u8>> = (0..strangers)
        .map(|i| {
            identity::initiate(&stranger, &server_key, [2; 16], 100 + i, b"")
                .unwrap()
                .1
        })
        .collect();
    let started = std::time::Instant::now();
    for datagram in &initiations {
        server.inbound(BytesMut::from(&datagram[..]), from());
    }
    let per_stranger = started.elapsed() / u32::try_from(strangers).unwrap();
    println!("rejected: {per_junk:?} per datagram without mac1, {per_stranger:?} per stranger");

    let c = counters.snapshot();
    assert_eq!(c.drop_mac, floods);
    // The burst of 100, less the genuine handshake, then nothing until the clock moves on.
    assert_eq!(
        (c.drop_unknown_key, c.drop_handshake_busy),
        (99, strangers - 99)
    );
    assert_eq!(server.session_count(), 1, "the flood left no state");
    // The established session carries on through it all.
    assert!(delivered(
        &mut server,
        &data(&k, session, 1, &packet(A, FAR, 2))
    ));
}

#[tokio::test]
async fn after_a_rotation_the_old_keys_open_nothing_new() {
    let keys = Keyring::new();
    let (mut server, counters) = server(&keys).await;
    let server_key = keys.server.public_key();
    let old = handshake(&mut server, &keys.a, &server_key, [1; 16], 10).unwrap();
    assert!(delivered(
        &mut server,
        &data(&old, [1; 16], 0, &packet(A, FAR, 1))
    ));
    // A new handshake: until the client uses it, the old session still carries traffic.
    let new = handshake(&mut server, &keys.a, &server_key, [2; 16], 11).unwrap();
    assert!(delivered(
        &mut server,
        &data(&old, [1; 16], 1, &packet(A, FAR, 2))
    ));
    assert!(delivered(
        &mut server,
        &data(&new, [2; 16], 0, &packet(A, FAR, 3))
    ));
    assert_eq!(counters.snapshot().rekeys, 1);
    // From now on the old keys open nothing, whatever the counter.
    for counter in [2, 3, 1000] {
        assert!(!delivered(
            &mut server,
            &data(&old, [1; 16], counter, &packet(A, FAR, 4))
        ));
    }
    assert!(delivered(
        &mut server,
        &data(&new, [2; 16], 1, &packet(A, FAR, 5))
    ));
    assert_eq!(server.session_count(), 1);
}

/// A client over loopback with a receive loop: what it receives comes out of the channel.
struct Client {
    tunnel: Arc<UdpTunnel>,
    received: mpsc::UnboundedReceiver<Bytes>,
    counters: Arc<Counters>,
}

async fn client(server: SocketAddr, auth: ClientAuth, address: [u8; 4]) -> Client {
    let counters = Arc::new(Counters::default());
    let tunnel = UdpTunnel::connect(
        server,
        auth,
        vec![IpAddr::from(address)],
        &Outside::default(),
        Arc::clone(&counters),
    )
    .await
    .unwrap();
    let (tx, received) = mpsc::unbounded_channel();
    let receiving = Arc::clone(&tunnel);
    tokio::spawn(async move {
        while let Ok(packet) = receiving.recv().await {
            if tx.send(packet).is_err() {
                return;
            }
        }
    });
    drop(tunnel.keep_alive());
    Client {
        tunnel,
        received,
        counters,
    }
}

async fn tun_receives(tun: &mut Link) -> Option<Bytes> {
    let mut batch = Vec::new();
    match tokio::time::timeout(Duration::from_millis(500), tun.recv_batch(&mut batch)).await {
        Ok(Ok(_)) => batch.into_iter().next(),
        _ => None,
    }
}

async fn received(client: &mut Client) -> Option<Bytes> {
    tokio::time::timeout(Duration::from_millis(500), client.received.recv())
        .await
        .ok()
        .flatten()
}

#[tokio::test]
async fn clients_with_their_own_keys_cross_and_each_gets_only_its_replies() {
    let keys = Keyring::new();
    let (server, server_counters) = server(&keys).await;
    let addr = server.local_addr().unwrap();
    let (server_end, mut tun) = Link::pair(64);
    tokio::spawn(server.run(server_end));
    let mut a = client(addr, keys.client(&keys.a, Rotation::default()), A).await;
    let mut b = client(addr, keys.client(&keys.b, Rotation::default()), B).await;
    // Sent at once, before the handshake completed: held, then delivered.
    let out = packet(A, FAR, 1);
    a.tunnel.send(out.clone()).await.unwrap();
    assert_eq!(tun_receives(&mut tun).await, Some(out));
    let out = packet(B, FAR, 2);
    b.tunnel.send(out.clone()).await.unwrap();
    assert_eq!(tun_receives(&mut tun).await, Some(out));
    // Replies go by cryptokey routing to their owner only.
    let back = packet(FAR, B, 3);
    tun.send(back.clone()).await.unwrap();
    assert_eq!(received(&mut b).await, Some(back));
    let back = packet(FAR, A, 4);
    tun.send(back.clone()).await.unwrap();
    assert_eq!(received(&mut a).await, Some(back));
    assert_eq!(received(&mut a).await, None);
    assert_eq!(received(&mut b).await, None);
    // A cannot send as B.
    a.tunnel.send(packet(B, FAR, 5)).await.unwrap();
    assert_eq!(tun_receives(&mut tun).await, None);
    let c = server_counters.snapshot();
    assert_eq!((c.handshakes, c.drop_spoofed, c.received), (2, 1, 2));
    assert_eq!(a.counters.snapshot().handshakes, 1);
}

#[tokio::test]
async fn a_client_the_server_does_not_know_gets_nothing_through() {
    let keys = Keyring::new();
    let (server, server_counters) = server(&keys).await;
    let addr = server.local_addr().unwrap();
    let (server_end, mut tun) = Link::pair(64);
    tokio::spawn(server.run(server_end));
    let stranger = PrivateKey::generate().unwrap();
    let mut s = client(addr, keys.client(&stranger, Rotation::default()), A).await;
    s.tunnel.send(packet(A, FAR, 1)).await.unwrap();
    assert_eq!(tun_receives(&mut tun).await, None);
    tun.send(packet(FAR, A, 2)).await.unwrap();
    assert_eq!(received(&mut s).await, None);
    let c = server_counters.snapshot();
    assert_eq!(
        (c.drop_unknown_key, c.handshakes, c.drop_no_session),
        (1, 0, 1)
    );
    assert_eq!(s.counters.snapshot().handshakes, 0);
}

#[tokio::test]
async fn clients_rotate_by_volume_and_by_time_without_losing_a_packet() {
    let keys = Keyring::new();
    let (server, server_counters) = server(&keys).await;
    let addr = server.local_addr().unwrap();
    let (server_end, mut tun) = Link::pair(64);
    tokio::spawn(server.run(server_end));
    let by_volume = Rotation {
        after: Duration::from_secs(120),
        packets: 8,
    };
    let mut a = client(addr, keys.client(&keys.a, by_volume), A).await;
    for i in 0..40u8 {
        let out = packet(A, FAR, i);
        a.tunnel.send(out.clone()).await.unwrap();
        assert_eq!(tun_receives(&mut tun).await, Some(out), "packet {i}");
        let back = packet(FAR, A, i);
        tun.send(back.clone()).await.unwrap();
        assert_eq!(received(&mut a).await, Some(back), "reply {i}");
    }
    let rotations = a.counters.snapshot().rekeys;
    assert!(rotations >= 3, "{rotations} rotations by volume");
    assert_eq!(server_counters.snapshot().rekeys, rotations);

    let by_time = Rotation {
        after: Duration::from_millis(200),
        packets: u64::MAX,
    };
    let b = client(addr, keys.client(&keys.b, by_time), B).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rotations = b.counters.snapshot().rekeys;
    assert!(rotations >= 3, "{rotations} rotations by time");
    let out = packet(B, FAR, 99);
    b.tunnel.send(out.clone()).await.unwrap();
    assert_eq!(tun_receives(&mut tun).await, Some(out));
}

/// A server that restarts forgets every session; a client whose hellos go unacknowledged
/// opens a new one by itself.
#[tokio::test]
async fn a_client_handshakes_again_when_the_server_restarted() {
    let keys = Keyring::new();
    let (first, _) = server(&keys).await;
    let addr = first.local_addr().unwrap();
    let (server_end, mut tun) = Link::pair(64);
    let serving = tokio::spawn(first.run(server_end));
    let a = client(addr, keys.client(&keys.a, Rotation::default()), A).await;
    let out = packet(A, FAR, 1);
    a.tunnel.send(out.clone()).await.unwrap();
    assert_eq!(tun_receives(&mut tun).await, Some(out));

    serving.abort();
    let _ = serving.await;
    let counters = Arc::new(Counters::default());
    let second = Server::bind(addr, keys.auth(), Arc::clone(&counters))
        .await
        .unwrap();
    let (server_end, mut tun) = Link::pair(64);
    tokio::spawn(second.run(server_end));
    let restarted = std::time::Instant::now();
    let mut i = 2;
    loop {
        let out = packet(A, FAR, i);
        a.tunnel.send(out.clone()).await.unwrap();
        if tun_receives(&mut tun).await == Some(out) {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(20),
            "the client never came back"
        );
        i = i.wrapping_add(1);
    }
    assert_eq!(counters.snapshot().handshakes, 1);
    assert!(
        counters.snapshot().drop_session > 0,
        "the old session was refused first"
    );
}
