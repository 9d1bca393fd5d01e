//! [`PacketTunnel`]: the datagram transport the relay sends whole IP packets through, and
//! [`UdpTunnel`], the authenticated, encrypted UDP transport Prism ships. A product plugs its
//! own transport in by implementing the trait.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chacha20poly1305::aead::OsRng;
use chacha20poly1305::aead::rand_core::RngCore;
use prism_device::Outside;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::frame::{self, FrameError, Header, Keys, Kind};
use crate::{Counters, ReplayWindow};

/// How often a client repeats its hello (it also keeps NAT mappings open).
pub(crate) const HELLO_INTERVAL: Duration = Duration::from_secs(5);
/// Largest datagram read.
const MAX_DATAGRAM: usize = 65535;
/// Receive arena; a fresh one is allocated when less than a datagram's room is left.
const ARENA: usize = 256 * 1024;

/// A transport for whole IP packets.
pub trait PacketTunnel: Send + Sync + 'static {
    /// Sends one packet.
    fn send(&self, packet: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Receives the next packet that passed every check.
    fn recv(&self) -> impl Future<Output = io::Result<Bytes>> + Send;
}

/// The client end of the UDP relay.
#[derive(Debug)]
pub struct UdpTunnel {
    socket: UdpSocket,
    keys: Keys,
    session: [u8; 16],
    counter: AtomicU64,
    hello: Vec<u8>,
    addresses: Vec<IpAddr>,
    replay: Mutex<ReplayWindow>,
    arena: tokio::sync::Mutex<BytesMut>,
    counters: Arc<Counters>,
    server: SocketAddr,
    /// When the server last sent anything authentic (a packet or a hello's acknowledgement),
    /// or when the session started.
    heard: Mutex<std::time::Instant>,
}

/// Hellos sent and nothing authentic back for this long: the relay is silent.
const SILENCE: Duration = Duration::from_secs(10);

impl UdpTunnel {
    /// Opens a session with the relay server at `server`, for a client whose tunnel addresses
    /// are `addresses`, and sends the first hello.
    pub async fn connect(
        server: SocketAddr,
        keys: Keys,
        addresses: Vec<IpAddr>,
        outside: &Outside,
        counters: Arc<Counters>,
    ) -> io::Result<Arc<UdpTunnel>> {
        let socket = Socket::new(
            Domain::for_address(server),
            Type::DGRAM,
            Some(Protocol::UDP),
        )?;
        socket.set_nonblocking(true)?;
        if outside.loops_back(server).unwrap_or(false) {
            return Err(io::Error::other(format!(
                "the relay server {server} is routed back into Prism's own TUN; route it \
                 outside with --default-route, --bind-interface or --exclude"
            )));
        }
        outside.prepare(&socket)?;
        let socket = UdpSocket::from_std(socket.into())?;
        socket.connect(server).await?;
        let mut session = [0u8; 16];
        OsRng.fill_bytes(&mut session);
        let tunnel = Arc::new(UdpTunnel {
            socket,
            keys,
            session,
            counter: AtomicU64::new(0),
            hello: frame::encode_addresses(&addresses),
            addresses,
            replay: Mutex::new(ReplayWindow::default()),
            arena: tokio::sync::Mutex::new(BytesMut::new()),
            counters,
            server,
            heard: Mutex::new(std::time::Instant::now()),
        });
        tunnel.say_hello().await?;
        Ok(tunnel)
    }

    async fn say_hello(&self) -> io::Result<()> {
        let datagram = self.seal(Kind::Hello, &self.hello)?;
        self.socket.send(&datagram).await.map(|_| ())
    }

    /// Seals a datagram of this session; a failure is counted and is an error.
    fn seal(&self, kind: Kind, payload: &[u8]) -> io::Result<Vec<u8>> {
        let header = Header {
            kind,
            session: self.session,
            counter: self.counter.fetch_add(1, Ordering::Relaxed),
        };
        frame::seal(&self.keys.to_server, &header, payload).map_err(|error| {
            Counters::bump(&self.counters.seal_failed);
            io::Error::other(error)
        })
    }

    /// Repeats the hello every 5 s, so a restarted server learns the session
    /// again and NAT mappings stay open.
    pub fn keep_alive(self: &Arc<Self>) -> JoinHandle<()> {
        let tunnel = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HELLO_INTERVAL);
            tick.tick().await;
            let mut silent = false;
            loop {
                tick.tick().await;
                if let Err(error) = tunnel.say_hello().await {
                    debug!(%error, "relay hello not sent");
                }
                let quiet = tunnel
                    .heard
                    .lock()
                    .map(|heard| heard.elapsed())
                    .unwrap_or_default();
                if quiet >= SILENCE && !silent {
                    silent = true;
                    warn!(
                        "the relay {} is silent: hellos sent for {}s and nothing authentic back \
                         (a wrong key, a wrong address, or the server is down); non-TCP traffic \
                         is not getting through",
                        tunnel.server,
                        quiet.as_secs()
                    );
                } else if quiet < SILENCE && silent {
                    silent = false;
                    info!("the relay {} answers again", tunnel.server);
                }
            }
        })
    }

    /// Checks one received datagram; `Some(packet)` if it is to be delivered.
    pub(crate) fn accept(&self, datagram: BytesMut) -> Option<Bytes> {
        let c = &self.counters;
        let (header, packet) = match frame::open(&self.keys.to_client, datagram) {
            Ok(opened) => opened,
            Err(FrameError::Truncated) => return bump(&c.drop_truncated),
            Err(FrameError::Version | FrameError::Kind) => return bump(&c.drop_version),
            Err(_) => return bump(&c.drop_auth),
        };
        if header.session != self.session {
            return bump(&c.drop_session);
        }
        let fresh = self
            .replay
            .lock()
            .map(|mut w| w.accept(header.counter))
            .unwrap_or(false);
        if !fresh {
            return bump(&c.drop_replay);
        }
        if let Ok(mut heard) = self.heard.lock() {
            *heard = std::time::Instant::now();
        }
        if header.kind == Kind::Hello {
            // The server's acknowledgement: it is there and shares the key.
            return bump(&c.hello_acks);
        }
        if !destination(&packet).is_some_and(|d| self.addresses.contains(&d)) {
            return bump(&c.drop_spoofed);
        }
        Counters::bump(&c.received);
        Some(packet)
    }
}

fn bump<T>(counter: &AtomicU64) -> Option<T> {
    Counters::bump(counter);
    None
}

/// The source and destination addresses of an IP packet.
pub(crate) fn endpoints(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    use smoltcp::wire::{Ipv4Packet, Ipv6Packet};
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            Some((ip.src_addr().into(), ip.dst_addr().into()))
        }
        Some(6) => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            Some((ip.src_addr().into(), ip.dst_addr().into()))
        }
        _ => None,
    }
}

/// The destination address of an IP packet.
fn destination(packet: &[u8]) -> Option<IpAddr> {
    endpoints(packet).map(|(_, dst)| dst)
}

impl PacketTunnel for UdpTunnel {
    async fn send(&self, packet: Bytes) -> io::Result<()> {
        let datagram = self.seal(Kind::Data, &packet)?;
        self.socket.send(&datagram).await?;
        Counters::bump(&self.counters.sent);
        Ok(())
    }

    async fn recv(&self) -> io::Result<Bytes> {
        let mut arena = self.arena.lock().await;
        loop {
            if arena.capacity() - arena.len() < MAX_DATAGRAM {
                *arena = BytesMut::with_capacity(ARENA);
            }
            let n = self.socket.recv_buf(&mut *arena).await?;
            let datagram = arena.split_to(n);
            if let Some(packet) = self.accept(datagram) {
                return Ok(packet);
            }
        }
    }
}
