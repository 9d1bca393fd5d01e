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
use tokio::sync::mpsc;

use crate::frame::{self, Header, Keys, Kind};
use crate::identity::{self, Peer, PrivateKey, PublicKey};
use crate::server::Inbound;
use crate::udp_tests::{packet, tun_receives};
use crate::{ClientAuth, Counters, PacketTunnel, Rotation, Server, ServerAuth, UdpTunnel};

const A: [u8; 4] = [10, 99, 0, 1];
const B: [u8; 4] = [10, 99, 0, 2];
const FAR: [u8; 4] = [192, 0, 2, 1];

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

/// Runs `server` on an in-memory TUN: its address, the TUN's far end, and its task.
fn running(server: Server) -> (SocketAddr, Link, tokio::task::JoinHandle<()>) {
    let addr = server.local_addr().unwrap();
    let (server_end, tun) = Link::pair(64);
    (addr, tun, tokio::spawn(server.run(server_end)))
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
    let (mut initiation, datagram) =
        identity::initiate(client, server_key, session, timestamp, &addresses, None).unwrap();
    match server.inbound(BytesMut::from(&datagram[..]), from()) {
        Inbound::Ack(response, _) => identity::complete(&mut initiation, &response).ok(),
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
        identity::initiate(&keys.a, &server_key, [1; 16], 10, &addresses, None).unwrap();
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
    // Initiations from a stranger who knows the server's public key. The clock stands still
    // here (a paused runtime), so the server's budget does not refill: it does handshakes
    // until half its burst of 100 is spent (the genuine one took one), then it is under load
    // and answers each with a cookie, for the price of a MAC and a seal.
    let strangers = 300u64;
    let stranger = PrivateKey::generate().unwrap();
    let initiations: Vec<Vec<u8>> = (0..strangers)
        .map(|i| {
            identity::initiate(&stranger, &server_key, [2; 16], 100 + i, b"", None)
                .unwrap()
                .1
        })
        .collect();
    let started = std::time::Instant::now();
    let mut cookie_replies = 0;
    for datagram in &initiations {
        if let Inbound::Ack(reply, _) = server.inbound(BytesMut::from(&datagram[..]), from()) {
            assert_eq!(frame::peek(&reply).unwrap().kind, Kind::Cookie);
            cookie_replies += 1;
        }
    }
    let per_stranger = started.elapsed() / u32::try_from(strangers).unwrap();
    println!("rejected: {per_junk:?} per datagram without mac1, {per_stranger:?} per stranger");
    // The same initiation again costs a lookup, under load or not.
    assert!(matches!(
        server.inbound(BytesMut::from(&initiations[0][..]), from()),
        Inbound::Nothing
    ));

    let c = counters.snapshot();
    assert_eq!(c.drop_mac, floods);
    assert_eq!((c.drop_unknown_key, c.cookies), (50, strangers - 50));
    assert_eq!(cookie_replies, strangers - 50);
    assert_eq!(c.drop_replay, 1);
    assert_eq!(server.session_count(), 1, "the flood left no session");

    // Under load, a genuine client gets a cookie, shows it from its own address and is served;
    // the same cookie from another address proves nothing.
    let addresses = frame::encode_addresses(&[IpAddr::from(B)]);
    let (first, datagram) =
        identity::initiate(&keys.b, &server_key, [3; 16], 20, &addresses, None).unwrap();
    let Inbound::Ack(reply, _) = server.inbound(BytesMut::from(&datagram[..]), from()) else {
        panic!("no cookie reply");
    };
    let cookie = identity::open_cookie(&server_key, &first, &reply).unwrap();
    let (_, elsewhere) =
        identity::initiate(&keys.b, &server_key, [4; 16], 21, &addresses, Some(&cookie)).unwrap();
    let other_source: SocketAddr = "127.0.0.9:40000".parse().unwrap();
    let answer = server.inbound(BytesMut::from(&elsewhere[..]), other_source);
    assert!(
        matches!(answer, Inbound::Ack(ref a, _) if frame::peek(a).unwrap().kind == Kind::Cookie)
    );
    let (mut proven, datagram) =
        identity::initiate(&keys.b, &server_key, [5; 16], 22, &addresses, Some(&cookie)).unwrap();
    let Inbound::Ack(response, _) = server.inbound(BytesMut::from(&datagram[..]), from()) else {
        panic!("the proven initiation was not answered");
    };
    let b = identity::complete(&mut proven, &response).unwrap();
    assert!(delivered(
        &mut server,
        &data(&b, [5; 16], 0, &packet(B, FAR, 3))
    ));
    // The established session carried on through it all.
    assert!(delivered(
        &mut server,
        &data(&k, session, 1, &packet(A, FAR, 2))
    ));
    assert_eq!(server.session_count(), 2);
}

#[tokio::test]
async fn overlapping_prefixes_belong_to_the_most_specific_peer_and_a_key_twice_is_refused() {
    let keys = Keyring::new();
    let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
    let peers = vec![
        Peer {
            key: keys.a.public_key(),
            allowed: vec![net("10.99.0.0/24")],
        },
        Peer {
            key: keys.b.public_key(),
            allowed: vec![net("10.99.0.2/32")],
        },
    ];
    let auth = ServerAuth::Identities {
        private: keys.server.clone(),
        peers: peers.clone(),
    };
    let counters = Arc::new(Counters::default());
    let mut server = Server::bind("127.0.0.1:0".parse().unwrap(), auth, Arc::clone(&counters))
        .await
        .unwrap();
    let server_key = keys.server.public_key();
    let a = handshake(&mut server, &keys.a, &server_key, [1; 16], 10).unwrap();
    assert!(delivered(
        &mut server,
        &data(&a, [1; 16], 0, &packet(A, FAR, 1))
    ));
    // 10.99.0.2 is inside A's /24 but B's /32: A may not send from it.
    assert!(!delivered(
        &mut server,
        &data(&a, [1; 16], 1, &packet(B, FAR, 2))
    ));
    assert_eq!(counters.snapshot().drop_spoofed, 1);

    let twice = ServerAuth::Identities {
        private: keys.server.clone(),
        peers: vec![peers[0].clone(), peers[0].clone()],
    };
    let error = Server::bind("127.0.0.1:0".parse().unwrap(), twice, Arc::default())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("listed twice"), "{error}");
}

#[tokio::test(start_paused = true)]
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
    // Packets sealed before the switch and overtaken on the way are still taken for a moment;
    // a hello in the old session no longer is.
    assert!(delivered(
        &mut server,
        &data(&old, [1; 16], 2, &packet(A, FAR, 4))
    ));
    let hello = Header {
        kind: Kind::Hello,
        session: [1; 16],
        counter: 3,
    };
    let hello = frame::seal(&old.to_server, &hello, &[]).unwrap();
    assert!(matches!(
        server.inbound(BytesMut::from(&hello[..]), from()),
        Inbound::Nothing
    ));
    // After that the old keys open nothing, whatever the counter.
    tokio::time::advance(crate::server::ROTATION_GRACE).await;
    for counter in [4, 5, 1000] {
        assert!(!delivered(
            &mut server,
            &data(&old, [1; 16], counter, &packet(A, FAR, 5))
        ));
    }
    assert!(delivered(
        &mut server,
        &data(&new, [2; 16], 1, &packet(A, FAR, 6))
    ));
}

/// Found by the `relay_identities` fuzz target: each confirmed handshake left the session
/// before it in its grace, however many there were, so a client handshaking again and again
/// within 2 s piled sessions up. A peer keeps at most three: the previous (in its grace), the
/// current and the next; and the previous still takes its overtaken packets.
#[tokio::test]
async fn rapid_rotations_keep_three_sessions_at_most() {
    let keys = Keyring::new();
    let (mut server, counters) = server(&keys).await;
    let server_key = keys.server.public_key();
    let mut sessions = Vec::new();
    for i in 0..6u8 {
        let session = [i + 1; 16];
        let k = handshake(
            &mut server,
            &keys.a,
            &server_key,
            session,
            10 + u64::from(i),
        )
        .unwrap();
        // Confirmed by its first packet.
        assert!(delivered(
            &mut server,
            &data(&k, session, 0, &packet(A, FAR, i))
        ));
        sessions.push((session, k));
        assert!(
            server.session_count() <= 3,
            "{} sessions",
            server.session_count()
        );
    }
    assert_eq!(counters.snapshot().rekeys, 5);
    let [
        ..,
        (older, older_keys),
        (previous, previous_keys),
        (current, current_keys),
    ] = &sessions[..]
    else {
        unreachable!()
    };
    assert!(delivered(
        &mut server,
        &data(current_keys, *current, 1, &packet(A, FAR, 7))
    ));
    assert!(delivered(
        &mut server,
        &data(previous_keys, *previous, 1, &packet(A, FAR, 8))
    ));
    assert!(!delivered(
        &mut server,
        &data(older_keys, *older, 1, &packet(A, FAR, 9))
    ));
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
    let (addr, mut tun, _) = running(server);
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
    let (addr, mut tun, _) = running(server);
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
    let (addr, mut tun, _) = running(server);
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
    let (addr, mut tun, serving) = running(first);
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
    let (_, mut tun, _) = running(second);
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

/// A server under load answers the client's first initiation with a cookie; the client sends
/// it again at once with the cookie and is served.
#[tokio::test]
async fn a_client_shows_its_cookie_to_a_server_under_load() {
    let keys = Keyring::new();
    let (server, server_counters) = server(&keys).await;
    let server = server.under_load_for_tests();
    let (addr, mut tun, _) = running(server);
    let a = client(addr, keys.client(&keys.a, Rotation::default()), A).await;
    let out = packet(A, FAR, 1);
    a.tunnel.send(out.clone()).await.unwrap();
    assert_eq!(tun_receives(&mut tun).await, Some(out));
    let c = server_counters.snapshot();
    assert_eq!((c.cookies, c.handshakes), (1, 1));
    assert_eq!(a.counters.snapshot().cookies, 1);
}
