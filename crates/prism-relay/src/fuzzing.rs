//! Entry points for the fuzz targets in `fuzz/`, compiled only under cargo-fuzz's
//! `--cfg fuzzing`: they reach the crate-private datagram code and the server's and client's
//! accept paths. Not part of the API.

#![allow(clippy::expect_used, reason = "fuzz harness set-up, not network input")]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::BytesMut;

use crate::frame::{self, Header, Kind};
use crate::server::Inbound;
use crate::{Counters, Keys, Server, Snapshot, UdpTunnel};

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
