//! Entry points for the fuzz targets in `fuzz/`, compiled only under cargo-fuzz's
//! `--cfg fuzzing`: they reach the crate-private datagram code and the server's and client's
//! accept paths. Not part of the API.

#![allow(clippy::expect_used, reason = "fuzz harness set-up, not network input")]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::BytesMut;

use crate::frame::{self, Header, Kind};
use crate::identity::{self, Initiation, Peer, PrivateKey, PublicKey};
use crate::server::Inbound;
use crate::{Counters, Keys, Server, ServerAuth, Snapshot, UdpTunnel};

/// The key every harness uses.
pub fn keys() -> Keys {
    Keys::derive(b"the key of prism's fuzz targets").expect("a long enough key")
}

/// A datagram sealed with [`keys`]: toward the server or the client, a hello (`hello`) or a
/// packet, in `session` with `counter`.
pub fn seal(
    to_server: bool,
    hello: bool,
    session: [u8; 16],
    counter: u64,
    payload: &[u8],
) -> Vec<u8> {
    let keys = keys();
    let key = if to_server {
        &keys.to_server
    } else {
        &keys.to_client
    };
    let kind = if hello { Kind::Hello } else { Kind::Data };
    let header = Header {
        kind,
        session,
        counter,
    };
    frame::seal(key, &header, payload).expect("a payload the cipher takes")
}

/// A hello's payload announcing `addresses`.
pub fn hello(addresses: &[IpAddr]) -> Vec<u8> {
    frame::encode_addresses(addresses)
}

/// Opens `datagram` with each direction's key; whether either authenticated it.
pub fn open(datagram: &[u8]) -> bool {
    let keys = keys();
    [&keys.to_server, &keys.to_client]
        .into_iter()
        .any(|key| frame::open(key, BytesMut::from(datagram)).is_ok())
}

/// The relay server's receive path, without its TUN: a server bound to an unused loopback port
/// (nothing is sent to it), with prefixes 10.0.0.0/8 and fd00::/8.
#[derive(Debug)]
pub struct ServerHarness {
    server: Server,
    counters: Arc<Counters>,
}

impl ServerHarness {
    /// Binds the server.
    pub async fn new() -> io::Result<ServerHarness> {
        let counters = Arc::new(Counters::default());
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let server = Server::bind(listen, keys(), Arc::clone(&counters))
            .await?
            .with_prefixes(vec![
                (IpAddr::from([10, 0, 0, 0]), 8),
                (IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 0]), 8),
            ]);
        Ok(ServerHarness { server, counters })
    }

    /// The server's address, for a client harness.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.server.local_addr()
    }

    /// One datagram from `from`; the packet it would write to the TUN, if any.
    pub fn inbound(&mut self, datagram: &[u8], from: SocketAddr) -> Option<bytes::Bytes> {
        match self.server.inbound(BytesMut::from(datagram), from) {
            Inbound::Packet(packet) => Some(packet),
            Inbound::Ack(..) | Inbound::Nothing => None,
        }
    }

    /// The server's counters.
    pub fn counters(&self) -> Snapshot {
        self.counters.snapshot()
    }
}

/// The relay client's receive path: a session with addresses 10.0.0.2 and fd00::2 toward
/// `server` (its hello goes there once).
#[derive(Debug)]
pub struct ClientHarness {
    tunnel: Arc<UdpTunnel>,
}

impl ClientHarness {
    /// Connects to `server`.
    pub async fn new(server: SocketAddr) -> io::Result<ClientHarness> {
        let addresses = vec![
            IpAddr::from([10, 0, 0, 2]),
            IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 2]),
        ];
        let tunnel = UdpTunnel::connect(
            server,
            keys(),
            addresses,
            &prism_device::Outside::default(),
            Arc::default(),
        )
        .await?;
        Ok(ClientHarness { tunnel })
    }

    /// One datagram from the server; the packet it would write to the device, if any.
    pub fn accept(&self, datagram: &[u8]) -> Option<bytes::Bytes> {
        self.tunnel.accept(BytesMut::from(datagram))
    }
}

/// The relay server with identities, and the clients a fuzz input plays: client 0 is allowed
/// 10.0.0.2/32 and fd00::2/128, client 1 10.0.0.3/32, client 2 is a stranger. Handshakes the
/// harness starts are completed when the server answers, and their keys kept by session, so
/// an input can seal data and hellos in them.
#[derive(Debug)]
pub struct IdentityHarness {
    server: Server,
    counters: Arc<Counters>,
    clients: [PrivateKey; 3],
    server_key: PublicKey,
    pending: std::collections::HashMap<[u8; 16], Initiation>,
    sessions: std::collections::HashMap<[u8; 16], Keys>,
}

/// What a datagram to the server led to.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A packet for the TUN.
    Packet(bytes::Bytes),
    /// A datagram back to the client (a handshake's response or a hello's acknowledgement).
    Answer,
    /// A counted drop.
    Nothing,
}

impl IdentityHarness {
    /// Binds the server on an unused loopback port (nothing is sent to it).
    pub async fn new() -> io::Result<IdentityHarness> {
        let key = |byte: u8| PrivateKey([byte; 32]);
        let net = |s: &str| s.parse::<ipnet::IpNet>().expect("a prefix");
        let clients = [key(1), key(2), key(3)];
        let peers = vec![
            Peer {
                key: clients[0].public_key(),
                allowed: vec![net("10.0.0.2/32"), net("fd00::2/128")],
            },
            Peer {
                key: clients[1].public_key(),
                allowed: vec![net("10.0.0.3/32")],
            },
        ];
        let server_private = key(9);
        let server_key = server_private.public_key();
        let counters = Arc::new(Counters::default());
        let auth = ServerAuth::Identities {
            private: server_private,
            peers,
        };
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let server = Server::bind(listen, auth, Arc::clone(&counters)).await?;
        Ok(IdentityHarness {
            server,
            counters,
            clients,
            server_key,
            pending: std::collections::HashMap::new(),
            sessions: std::collections::HashMap::new(),
        })
    }

    /// An initiation from client `client` (0 to 2) for `session` with `timestamp`; `to_other`
    /// makes it for another server's key.
    pub fn initiation(
        &mut self,
        client: u8,
        session: [u8; 16],
        timestamp: u64,
        to_other: bool,
    ) -> Vec<u8> {
        let index = usize::from(client) % self.clients.len();
        let server = if to_other {
            self.clients[index].public_key()
        } else {
            self.server_key
        };
        let addresses = frame::encode_addresses(&[IpAddr::from([10, 0, 0, 2])]);
        let (initiation, datagram) = identity::initiate(
            &self.clients[index],
            &server,
            session,
            timestamp,
            &addresses,
            None,
        )
        .expect("an initiation");
        self.pending.insert(session, initiation);
        datagram
    }

    /// A datagram in `session` sealed with the keys of its completed handshake (or, if it
    /// has none, a key nobody has): a hello or a packet.
    pub fn seal(&self, session: [u8; 16], hello: bool, counter: u64, payload: &[u8]) -> Vec<u8> {
        let unknown;
        let keys = match self.sessions.get(&session) {
            Some(keys) => keys,
            None => {
                unknown = Keys::from_split([7; 32], [8; 32]);
                &unknown
            }
        };
        let header = Header {
            kind: if hello { Kind::Hello } else { Kind::Data },
            session,
            counter,
        };
        frame::seal(&keys.to_server, &header, payload).expect("a payload the cipher takes")
    }

    /// Whether `datagram` opens under a completed handshake's client-to-server key.
    pub fn authentic(&self, datagram: &[u8]) -> bool {
        let Ok(header) = frame::peek(datagram) else {
            return false;
        };
        self.sessions
            .get(&header.session)
            .is_some_and(|keys| frame::open(&keys.to_server, BytesMut::from(datagram)).is_ok())
    }

    /// One datagram to the server from `from`.
    pub fn inbound(&mut self, datagram: &[u8], from: SocketAddr) -> Outcome {
        match self.server.inbound(BytesMut::from(datagram), from) {
            Inbound::Packet(packet) => Outcome::Packet(packet),
            Inbound::Ack(answer, _) => {
                if let Ok(header) = frame::peek(&answer)
                    && header.kind == Kind::Response
                    && let Some(mut initiation) = self.pending.remove(&header.session)
                    && let Ok(keys) = identity::complete(&mut initiation, &answer)
                {
                    self.sessions.insert(header.session, keys);
                }
                Outcome::Answer
            }
            Inbound::Nothing => Outcome::Nothing,
        }
    }

    /// The sessions the server holds.
    pub fn server_sessions(&self) -> usize {
        self.server.session_count()
    }

    /// The server's counters.
    pub fn counters(&self) -> Snapshot {
        self.counters.snapshot()
    }
}
