//! [`PacketTunnel`]: the datagram transport the relay sends whole IP packets through, and
//! [`UdpTunnel`], the authenticated, encrypted UDP transport Prism ships. A product plugs its
//! own transport in by implementing the trait.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chacha20poly1305::aead::OsRng;
use chacha20poly1305::aead::rand_core::RngCore;
use prism_device::Framing;
use prism_device::Outside;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::frame::{self, FrameError, Header, Keys, Kind};
use crate::identity::{self, Initiation, PrivateKey, PublicKey};
use crate::udp::{Incoming, Outgoing, Udp};
use crate::{Counters, ReplayWindow};

/// How often a client repeats its hello (it also keeps NAT mappings open).
pub(crate) const HELLO_INTERVAL: Duration = Duration::from_secs(5);

/// A transport for whole IP packets.
pub trait PacketTunnel: Send + Sync + 'static {
    /// Sends one packet.
    fn send(&self, packet: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Receives the next packet that passed every check.
    fn recv(&self) -> impl Future<Output = io::Result<Bytes>> + Send;
    /// Sends every packet of `packets`, emptying it. The relay calls this with each batch it
    /// has; a transport that can send several at once (as [`UdpTunnel`] does) overrides it.
    /// A packet that fails does not stop the rest; the last error is returned.
    fn send_many(&self, packets: &mut Vec<Bytes>) -> impl Future<Output = io::Result<()>> + Send {
        send_each(self, packets)
    }
    /// Waits for at least one packet and appends what arrived to `packets`.
    fn recv_many(&self, packets: &mut Vec<Bytes>) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            packets.push(self.recv().await?);
            Ok(())
        }
    }
    /// As [`recv_many`](PacketTunnel::recv_many), each packet framed as a link of `framing`
    /// carries it. The default frames what `recv_many` returns (one copy for virtio-net); a
    /// transport with room before its packets (as [`UdpTunnel`] has) writes the frame's header
    /// there instead.
    fn recv_many_framed(
        &self,
        packets: &mut Vec<Bytes>,
        framing: Framing,
    ) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            let start = packets.len();
            self.recv_many(packets).await?;
            for packet in packets.iter_mut().skip(start) {
                *packet = framing.frame(std::mem::take(packet));
            }
            Ok(())
        }
    }
}

/// Sends `packets` one by one with `tunnel.send`, emptying it: a failure does not stop the
/// rest, and the last error is returned.
async fn send_each<T: PacketTunnel + ?Sized>(
    tunnel: &T,
    packets: &mut Vec<Bytes>,
) -> io::Result<()> {
    let mut result = Ok(());
    for packet in packets.drain(..) {
        if let Err(error) = tunnel.send(packet).await {
            result = Err(error);
        }
    }
    result
}

/// How a client proves who it is to the relay server.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// The key every client shares (weaker; see [`crate::Server`]).
    PreShared(Keys),
    /// The client's own key pair and the server's public key: sessions from Noise handshakes.
    Identity {
        /// The client's private key.
        private: PrivateKey,
        /// The server's public key.
        server: PublicKey,
        /// When to open a new session.
        rotation: Rotation,
    },
}

impl From<Keys> for ClientAuth {
    fn from(keys: Keys) -> Self {
        ClientAuth::PreShared(keys)
    }
}

/// When a client with an identity replaces its session (and so its keys) by a new handshake:
/// after a time or a number of datagrams sent, whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Age of a session; at most two minutes, as the server refuses sessions older than
    /// [`crate::SESSION_LIFETIME`].
    pub after: Duration,
    /// Datagrams sent in a session.
    pub packets: u64,
}

/// The longest a session lives before the client rotates it.
const ROTATE_BEFORE: Duration = Duration::from_secs(120);
/// The shortest: rotations cost the server handshakes.
const ROTATE_AFTER_LEAST: Duration = Duration::from_millis(50);

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            after: ROTATE_BEFORE,
            packets: 1 << 30,
        }
    }
}

/// The session a client seals with.
#[derive(Debug)]
struct Sending {
    session: [u8; 16],
    keys: Keys,
    counter: AtomicU64,
    born: std::time::Instant,
}

/// A session a client opens datagrams of.
#[derive(Debug)]
struct Opening {
    session: [u8; 16],
    keys: Keys,
    replay: ReplayWindow,
}

/// An identity's keys and rotation.
#[derive(Debug)]
struct Identity {
    private: PrivateKey,
    server: PublicKey,
    rotation: Rotation,
}

/// The client end of the UDP relay.
#[derive(Debug)]
pub struct UdpTunnel {
    udp: Udp,
    identity: Option<Identity>,
    /// The session datagrams are sealed in; `None` until the first handshake completes.
    sending: Mutex<Option<Arc<Sending>>>,
    /// The sessions datagrams are accepted from: the newest, and the one before it until the
    /// server is heard in the newest.
    opening: Mutex<Vec<Opening>>,
    /// A handshake in flight, and when it was sent.
    pending: Mutex<Option<(Initiation, std::time::Instant)>>,
    /// The server's latest cookie for this client's address, and when it came.
    cookie: Mutex<Option<([u8; identity::MAC], std::time::Instant)>>,
    /// The newest initiation's timestamp: the next is later even if the clock went back.
    timestamp: AtomicU64,
    /// When a cookie last made the client send its handshake again.
    cookie_retry: Mutex<Option<std::time::Instant>>,
    /// Packets sent before the first handshake completed, sent when it does.
    staged: Mutex<Vec<Bytes>>,
    hello: Vec<u8>,
    addresses: Vec<IpAddr>,
    /// The batch being sealed and sent (the relay's outbound task).
    outgoing: tokio::sync::Mutex<Outgoing>,
    /// Where datagrams are read, and packets read but not yet asked for.
    receiving: tokio::sync::Mutex<(Incoming, VecDeque<Bytes>)>,
    counters: Arc<Counters>,
    server: SocketAddr,
    /// When the server last sent anything authentic (a packet or a hello's acknowledgement),
    /// or when the session started.
    heard: Mutex<std::time::Instant>,
}

/// Hellos sent and nothing authentic back for this long: the relay is silent.
const SILENCE: Duration = Duration::from_secs(10);
/// A handshake unanswered this long is sent again (with a new session and ephemeral key).
const HANDSHAKE_RETRY: Duration = Duration::from_secs(5);
/// Identity: nothing authentic from the server for this long (two hellos unacknowledged)
/// starts a new handshake.
const UNHEARD: Duration = Duration::from_secs(11);
/// Packets held until the first handshake completes.
const STAGED: usize = 64;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks; if something did, the data is still whole.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn random_session() -> [u8; 16] {
    let mut session = [0u8; 16];
    OsRng.fill_bytes(&mut session);
    session
}

impl UdpTunnel {
    /// Opens a session with the relay server at `server`, for a client whose tunnel addresses
    /// are `addresses`: sends the first hello (pre-shared key) or handshake (identity).
    pub async fn connect(
        server: SocketAddr,
        auth: impl Into<ClientAuth>,
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
                "the relay server {server} is routed back into Prism's own TUN; leave it out of \
                 --route, or let Prism's own sockets bypass the TUN (--default-route, which \
                 marks them, or --bind-interface)"
            )));
        }
        outside.prepare(&socket)?;
        // Connected: the kernel passes on only the server's datagrams.
        socket.connect(&server.into())?;
        let udp = Udp::new(socket.into(), Some(server))?;
        let incoming = udp.incoming();
        let (identity, sending, opening) = match auth.into() {
            ClientAuth::PreShared(keys) => {
                let session = random_session();
                let opening = Opening {
                    session,
                    keys: keys.clone(),
                    replay: ReplayWindow::default(),
                };
                let sending = Sending {
                    session,
                    keys,
                    counter: AtomicU64::new(0),
                    born: std::time::Instant::now(),
                };
                (None, Some(Arc::new(sending)), vec![opening])
            }
            ClientAuth::Identity {
                private,
                server,
                rotation,
            } => {
                let rotation = Rotation {
                    after: rotation.after.clamp(ROTATE_AFTER_LEAST, ROTATE_BEFORE),
                    packets: rotation.packets.max(1),
                };
                let identity = Identity {
                    private,
                    server,
                    rotation,
                };
                (Some(identity), None, Vec::new())
            }
        };
        let tunnel = Arc::new(UdpTunnel {
            udp,
            identity,
            sending: Mutex::new(sending),
            opening: Mutex::new(opening),
            pending: Mutex::new(None),
            cookie: Mutex::new(None),
            timestamp: AtomicU64::new(0),
            cookie_retry: Mutex::new(None),
            staged: Mutex::new(Vec::new()),
            hello: frame::encode_addresses(&addresses),
            addresses,
            outgoing: tokio::sync::Mutex::new(Outgoing::default()),
            receiving: tokio::sync::Mutex::new((incoming, VecDeque::new())),
            counters,
            server,
            heard: Mutex::new(std::time::Instant::now()),
        });
        if tunnel.identity.is_some() {
            tunnel.rotate_if_due().await?;
        } else {
            tunnel.say_hello().await?;
        }
        Ok(tunnel)
    }

    /// Identity: a handshake initiation for a new session, now in flight (a lost one is sent
    /// again after [`HANDSHAKE_RETRY`]).
    fn initiation(&self) -> io::Result<Option<Vec<u8>>> {
        let Some(identity) = &self.identity else {
            return Ok(None);
        };
        let session = random_session();
        let now = identity::now_timestamp();
        let last = self.timestamp.fetch_max(now, Ordering::Relaxed);
        let timestamp = if now > last {
            now
        } else {
            self.timestamp.fetch_add(1, Ordering::Relaxed) + 1
        };
        let cookie = lock(&self.cookie)
            .filter(|(_, at)| at.elapsed() < identity::COOKIE_LIFETIME)
            .map(|(cookie, _)| cookie);
        let (initiation, datagram) = identity::initiate(
            &identity.private,
            &identity.server,
            session,
            timestamp,
            &self.hello,
            cookie.as_ref(),
        )
        .map_err(io::Error::other)?;
        *lock(&self.pending) = Some((initiation, std::time::Instant::now()));
        Ok(Some(datagram))
    }

    /// Identity: whether a handshake is due: the session is due for rotation, the server has
    /// not acknowledged a hello for [`UNHEARD`] (it restarted and forgot the session?), or
    /// there is no session; and none is in flight, or the one in flight went unanswered too
    /// long.
    fn handshake_due(&self) -> bool {
        let Some(identity) = &self.identity else {
            return false;
        };
        let unheard = lock(&self.heard).elapsed() >= UNHEARD;
        let due = lock(&self.sending).as_ref().is_none_or(|s| {
            unheard
                || s.born.elapsed() >= identity.rotation.after
                || s.counter.load(Ordering::Relaxed) >= identity.rotation.packets
        });
        let waiting = lock(&self.pending)
            .as_ref()
            .is_some_and(|(_, sent)| sent.elapsed() < HANDSHAKE_RETRY);
        due && !waiting
    }

    /// Identity: sends a handshake initiation if one is due.
    async fn rotate_if_due(&self) -> io::Result<()> {
        if !self.handshake_due() {
            return Ok(());
        }
        match self.initiation()? {
            Some(datagram) => self.udp.send_to(&datagram, self.server).await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// The same from the send path, which cannot wait: if the socket is not ready, the
    /// keep-alive task tries again within a second.
    fn rotate_now(&self) {
        if !self.handshake_due() {
            return;
        }
        if let Ok(Some(datagram)) = self.initiation()
            && self.udp.try_send_to(&datagram, self.server).is_err()
        {
            *lock(&self.pending) = None;
        }
    }

    async fn say_hello(&self) -> io::Result<()> {
        let payload = if self.identity.is_some() {
            &[][..]
        } else {
            &self.hello[..]
        };
        match self.seal(Kind::Hello, payload)? {
            Some(datagram) => self.udp.send_to(&datagram, self.server).await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// Seals a datagram of the current session; `None` before the first handshake. A failure
    /// is counted and is an error.
    fn seal(&self, kind: Kind, payload: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let Some(sending) = lock(&self.sending).clone() else {
            return Ok(None);
        };
        let mut datagram = Vec::with_capacity(frame::OVERHEAD + payload.len());
        self.seal_into(&sending, kind, payload, &mut datagram)?;
        Ok(Some(datagram))
    }

    /// Seals a datagram of `sending` onto the end of `out`. A failure is counted and is an
    /// error.
    fn seal_into(
        &self,
        sending: &Sending,
        kind: Kind,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        let counter = sending.counter.fetch_add(1, Ordering::Relaxed);
        if let Some(identity) = &self.identity
            && counter + 1 == identity.rotation.packets
        {
            self.rotate_now();
        }
        let header = Header {
            kind,
            session: sending.session,
            counter,
        };
        frame::seal_into(&sending.keys.to_server, &header, payload, out).map_err(|error| {
            Counters::bump(&self.counters.seal_failed);
            io::Error::other(error)
        })
    }

    /// Repeats the hello every 5 s, so NAT mappings stay open and the client knows the server
    /// is there. With a pre-shared key a restarted server learns the session again from it;
    /// with an identity the task starts a handshake when one is due: to rotate, or because
    /// hellos went unacknowledged (a restarted server forgot the session).
    pub fn keep_alive(self: &Arc<Self>) -> JoinHandle<()> {
        let tunnel = Arc::clone(self);
        tokio::spawn(async move {
            let step = match &tunnel.identity {
                Some(identity) => (identity.rotation.after / 4)
                    .clamp(Duration::from_millis(10), Duration::from_secs(1)),
                None => HELLO_INTERVAL,
            };
            let mut tick = tokio::time::interval(step);
            tick.tick().await;
            let mut said = tokio::time::Instant::now();
            let mut silent = false;
            loop {
                tick.tick().await;
                if let Err(error) = tunnel.rotate_if_due().await {
                    debug!(%error, "relay handshake not sent");
                }
                if said.elapsed() >= HELLO_INTERVAL {
                    said = tokio::time::Instant::now();
                    if let Err(error) = tunnel.say_hello().await {
                        debug!(%error, "relay hello not sent");
                    }
                }
                let quiet = lock(&tunnel.heard).elapsed();
                if quiet >= SILENCE && !silent {
                    silent = true;
                    warn!(
                        "the relay {} is silent: nothing authentic back for {}s (a wrong key, \
                         a client key the server does not allow, a wrong address, or the server \
                         is down); non-TCP traffic is not getting through",
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

    /// Identity: a server under load answered the handshake in flight with a cookie: it is
    /// kept, and the handshake sent again at once with it (at most once per
    /// [`HANDSHAKE_RETRY`], so forged cookie replies cannot make the client send more).
    fn take_cookie(&self, header: &Header, datagram: &[u8]) {
        let c = &self.counters;
        let Some(identity) = &self.identity else {
            return;
        };
        let cookie = {
            let pending = lock(&self.pending);
            let Some((initiation, _)) = pending
                .as_ref()
                .filter(|(i, _)| i.session == header.session)
            else {
                Counters::bump(&c.drop_session);
                return;
            };
            identity::open_cookie(&identity.server, initiation, datagram)
        };
        let Some(cookie) = cookie else {
            Counters::bump(&c.drop_auth);
            return;
        };
        Counters::bump(&c.cookies);
        *lock(&self.cookie) = Some((cookie, std::time::Instant::now()));
        let retry = {
            let mut last = lock(&self.cookie_retry);
            let due = last.is_none_or(|at| at.elapsed() >= HANDSHAKE_RETRY);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        if retry
            && let Ok(Some(datagram)) = self.initiation()
            && self.udp.try_send_to(&datagram, self.server).is_err()
        {
            *lock(&self.pending) = None;
        }
    }

    /// Identity: the server's answer to the handshake in flight makes a new session current.
    /// A forged answer is counted and leaves the handshake waiting for the genuine one.
    fn complete(&self, header: &Header, datagram: &[u8]) {
        let c = &self.counters;
        let keys = {
            let mut pending = lock(&self.pending);
            let Some((initiation, _)) = pending
                .as_mut()
                .filter(|(i, _)| i.session == header.session)
            else {
                Counters::bump(&c.drop_session);
                return;
            };
            let Ok(keys) = identity::complete(initiation, datagram) else {
                Counters::bump(&c.drop_auth);
                return;
            };
            *pending = None;
            keys
        };
        let sending = Sending {
            session: header.session,
            keys: keys.clone(),
            counter: AtomicU64::new(0),
            born: std::time::Instant::now(),
        };
        let previous = lock(&self.sending).replace(Arc::new(sending));
        {
            let mut opening = lock(&self.opening);
            opening.push(Opening {
                session: header.session,
                keys,
                replay: ReplayWindow::default(),
            });
            let excess = opening.len().saturating_sub(2);
            opening.drain(..excess);
        }
        Counters::bump(&c.handshakes);
        if previous.is_some() {
            Counters::bump(&c.rekeys);
        } else {
            info!("relay session with {} (handshake)", self.server);
        }
        *lock(&self.heard) = std::time::Instant::now();
        // A keep-alive confirms the session to the server at once (if it is lost, the next
        // datagram does); then what waited for the session.
        if let Ok(Some(hello)) = self.seal(Kind::Hello, &[]) {
            let _ = self.udp.try_send_to(&hello, self.server);
        }
        let staged = std::mem::take(&mut *lock(&self.staged));
        for packet in &staged {
            let sent = match self.seal(Kind::Data, packet) {
                Ok(Some(datagram)) => self.udp.try_send_to(&datagram, self.server).is_ok(),
                _ => false,
            };
            let counter = if sent {
                &c.sent
            } else {
                &c.drop_before_handshake
            };
            Counters::bump(counter);
        }
    }

    /// Checks one received datagram; `Some(packet)` if it is to be delivered.
    pub(crate) fn accept(&self, datagram: BytesMut) -> Option<Bytes> {
        self.accept_behind(datagram, &[])
    }

    /// As [`UdpTunnel::accept`], the packet behind `prefix` (see [`frame::open_behind`]).
    fn accept_behind(&self, datagram: BytesMut, prefix: &[u8]) -> Option<Bytes> {
        let c = &self.counters;
        let header = match frame::peek(&datagram) {
            Ok(header) => header,
            Err(FrameError::Truncated) => return bump(&c.drop_truncated),
            Err(_) => return bump(&c.drop_version),
        };
        match header.kind {
            Kind::Response if self.identity.is_some() => {
                self.complete(&header, &datagram);
                return None;
            }
            Kind::Cookie if self.identity.is_some() => {
                self.take_cookie(&header, &datagram);
                return None;
            }
            Kind::Response | Kind::Cookie | Kind::Initiation => return bump(&c.drop_version),
            Kind::Hello | Kind::Data => {}
        }
        let packet = {
            let mut opening = lock(&self.opening);
            let Some(index) = opening.iter().position(|o| o.session == header.session) else {
                return bump(&c.drop_session);
            };
            let session = opening.get_mut(index)?;
            let packet = match frame::open_behind(&session.keys.to_client, datagram, prefix) {
                Ok((_, packet)) => packet,
                Err(FrameError::Truncated) => return bump(&c.drop_truncated),
                Err(FrameError::Version | FrameError::Kind) => return bump(&c.drop_version),
                Err(_) => return bump(&c.drop_auth),
            };
            if !session.replay.accept(header.counter) {
                return bump(&c.drop_replay);
            }
            // The server speaks in the newest session: the older one is over.
            if index + 1 == opening.len() {
                opening.drain(..index);
            }
            packet
        };
        *lock(&self.heard) = std::time::Instant::now();
        if header.kind == Kind::Hello {
            // The server's acknowledgement: it is there and shares the key.
            return bump(&c.hello_acks);
        }
        let plain = packet.get(prefix.len()..).unwrap_or_default();
        if !destination(plain).is_some_and(|d| self.addresses.contains(&d)) {
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
        let sealed = match self.seal(Kind::Data, &packet)? {
            Some(datagram) => Some(datagram),
            None => {
                // No session yet: held until the first handshake completes, or counted. Under
                // the lock `complete` takes them with, so none is left behind.
                let mut staged = lock(&self.staged);
                let again = self.seal(Kind::Data, &packet)?;
                if again.is_none() {
                    if staged.len() < STAGED {
                        staged.push(packet.clone());
                    } else {
                        Counters::bump(&self.counters.drop_before_handshake);
                    }
                }
                again
            }
        };
        let Some(datagram) = sealed else {
            return Ok(());
        };
        match self.udp.send_to(&datagram, self.server).await {
            Ok(_) => {
                Counters::bump(&self.counters.sent);
                Ok(())
            }
            Err(error) => {
                Counters::bump(&self.counters.drop_send);
                Err(error)
            }
        }
    }

    async fn recv(&self) -> io::Result<Bytes> {
        let mut receiving = self.receiving.lock().await;
        let (incoming, held) = &mut *receiving;
        loop {
            if let Some(packet) = held.pop_front() {
                return Ok(packet);
            }
            self.udp
                .recv(incoming, |datagram, _| held.extend(self.accept(datagram)))
                .await?;
        }
    }

    /// Seals the whole batch into one buffer and sends it in as few system calls as the
    /// kernel allows (see `udp`).
    async fn send_many(&self, packets: &mut Vec<Bytes>) -> io::Result<()> {
        let Some(sending) = lock(&self.sending).clone() else {
            // No session yet: one by one, held or counted.
            return send_each(self, packets).await;
        };
        let mut outgoing = self.outgoing.lock().await;
        for packet in packets.drain(..) {
            // A failure is counted; the rest of the batch still goes.
            let _ = outgoing.push(self.server, |out| {
                self.seal_into(&sending, Kind::Data, &packet, out)
            });
        }
        match self.udp.send(&mut outgoing).await.counted(&self.counters) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    async fn recv_many(&self, packets: &mut Vec<Bytes>) -> io::Result<()> {
        self.recv_many_framed(packets, Framing::Plain).await
    }

    /// The frame's header is written into the datagram's clear header, no longer needed once
    /// the datagram is open: no copy.
    async fn recv_many_framed(&self, packets: &mut Vec<Bytes>, framing: Framing) -> io::Result<()> {
        let mut receiving = self.receiving.lock().await;
        let (incoming, held) = &mut *receiving;
        let start = packets.len();
        // Packets held by `recv` (none once `recv_many` is the only reader) are plain.
        packets.extend(held.drain(..).map(|packet| framing.frame(packet)));
        while packets.len() == start {
            self.udp
                .recv(incoming, |datagram, _| {
                    packets.extend(self.accept_behind(datagram, framing.prefix()))
                })
                .await?;
        }
        Ok(())
    }
}
