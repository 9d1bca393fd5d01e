//! [`Server`]: the far end of the UDP relay. It writes each client's packets to its own TUN
//! (the kernel there routes and NATs them onward) and sends the replies back to the client
//! they belong to.
//!
//! Two ways to tell clients apart ([`ServerAuth`]):
//! - **Identities**: each client has its own key pair and the server a list of allowed client
//!   keys with the prefixes each may use (WireGuard's cryptokey routing). A client opens each
//!   session with a Noise handshake (`identity`); the session's first authentic datagram
//!   confirms it, and the client's previous session takes packets for [`ROTATION_GRACE`] more
//!   and then nothing. Sessions older than [`SESSION_LIFETIME`] are refused, so a client must
//!   rotate. Handshake floods are cut short by mac1, a cache of recent initiations, a budget,
//!   and cookies that make a source prove its address once the server is under load.
//! - **A pre-shared key** shared by all clients (weaker: any holder can claim any address and
//!   decrypt any recorded session). A client announces its tunnel addresses in a hello; an
//!   address belongs to one live session at a time.
//!
//! Either way a client may only send packets from its own addresses (anti-spoofing), and the
//! server routes replies by destination address to the session that owns it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ipnet::IpNet;
use prism_device::{BATCH, Framing, Link};
use tokio::time::Instant;
use tracing::info;

use crate::frame::{self, FrameError, Header, Keys, Kind};
use crate::identity::{self, CookieJar, HandshakeError, Peer, PrivateKey};
use crate::tunnel::endpoints;
use crate::udp::{Outgoing, Udp};
use crate::{Counters, ReplayWindow};

/// A session silent this long is forgotten (its client says hello every 5 s).
pub(crate) const SESSION_IDLE: Duration = Duration::from_secs(60);
/// With identities, a session older than this is refused: clients rotate every 2 minutes.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(180);
/// Handshakes the server does per second (each costs four Diffie-Hellman operations), and the
/// burst it takes at once. Below half the burst the server is under load: initiations without
/// a cookie for their source get a cookie reply instead of a handshake.
const HANDSHAKE_RATE: f64 = 1000.0;
const HANDSHAKE_BURST: f64 = 100.0;
/// Under load: handshakes one proven source gets per second (an IPv6 source counts by its
/// /64, which one host may well hold whole), and its burst.
const SOURCE_RATE: f64 = 10.0;
const SOURCE_BURST: f64 = 10.0;
/// Under load: handshakes all proven sources together get per second, and their burst.
const PROVEN_RATE: f64 = 2.0 * HANDSHAKE_RATE;
const PROVEN_BURST: f64 = HANDSHAKE_BURST;
/// Sources whose handshake rate is tracked at once; beyond, proven initiations from new
/// sources wait until some are forgotten (a sweep at most every 100 ms).
const SOURCES: usize = 4096;
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// Initiations remembered by their mac1, so that a byte-for-byte replay costs a lookup.
const SEEN_INITIATIONS: usize = 8192;
/// After a rotation the previous session still takes datagrams this long (sealed before the
/// switch, or reordered on the way), and nothing after.
pub(crate) const ROTATION_GRACE: Duration = Duration::from_secs(2);
/// Kinds of trouble warned about at once; beyond, only the counters tell.
const WARNINGS: usize = 256;

/// How the server tells its clients apart.
#[derive(Debug, Clone)]
pub enum ServerAuth {
    /// One pre-shared key for every client (weaker; see the module's documentation).
    PreShared(Keys),
    /// Each client its own key pair.
    Identities {
        /// The server's private key.
        private: PrivateKey,
        /// The clients allowed, with their addresses.
        peers: Vec<Peer>,
    },
}

impl From<Keys> for ServerAuth {
    fn from(keys: Keys) -> Self {
        ServerAuth::PreShared(keys)
    }
}

#[derive(Debug)]
enum Auth {
    PreShared(Keys),
    Identities(Box<Identities>),
}

#[derive(Debug)]
struct Identities {
    private: PrivateKey,
    mac1: [u8; 32],
    peers: Vec<PeerState>,
    /// The handshake work of the whole server, and its rate ([`HANDSHAKE_RATE`]).
    budget: Budget,
    rate: f64,
    /// Under load, the handshake work of proven sources, together and each (by address, or
    /// by /64 for IPv6), and when the sources were last swept.
    proven: Budget,
    sources: HashMap<IpAddr, Budget>,
    swept: Instant,
    cookies: CookieJar,
    /// The mac1 of recent initiations, oldest first.
    seen: std::collections::VecDeque<[u8; identity::MAC]>,
    seen_set: std::collections::HashSet<[u8; identity::MAC]>,
    /// `peer_for`'s answers so far (the peers never change), so that a packet costs one
    /// lookup however many peers there are.
    routes: HashMap<IpAddr, Option<usize>>,
}

/// Addresses whose peer is remembered; beyond, the memory starts again (random addresses
/// cannot grow it).
const ROUTES: usize = 65_536;

impl Identities {
    /// The peer whose prefixes hold `address` most specifically ([`peer_for`], remembered).
    fn route(&mut self, address: IpAddr) -> Option<usize> {
        if let Some(&peer) = self.routes.get(&address) {
            return peer;
        }
        let peer = peer_for(&self.peers, address);
        if self.routes.len() >= ROUTES {
            self.routes.clear();
        }
        self.routes.insert(address, peer);
        peer
    }

    /// Whether an initiation with this mac1 came lately; remembers it.
    fn seen_before(&mut self, mac1: [u8; identity::MAC]) -> bool {
        if !self.seen_set.insert(mac1) {
            return true;
        }
        self.seen.push_back(mac1);
        if self.seen.len() > SEEN_INITIATIONS
            && let Some(oldest) = self.seen.pop_front()
        {
            self.seen_set.remove(&oldest);
        }
        false
    }

    /// Under load: whether a proven source may have a handshake now.
    fn source_allows(&mut self, source: IpAddr, now: Instant) -> bool {
        if !self.proven.take(now, PROVEN_RATE, PROVEN_BURST) {
            return false;
        }
        let source = match source {
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            v4 => v4,
        };
        if self.sources.len() >= SOURCES && now.duration_since(self.swept) >= SWEEP_EVERY {
            self.swept = now;
            self.sources.retain(|_, b| {
                b.refill(now, SOURCE_RATE, SOURCE_BURST);
                b.tokens < SOURCE_BURST
            });
        }
        if self.sources.len() >= SOURCES && !self.sources.contains_key(&source) {
            return false;
        }
        self.sources
            .entry(source)
            .or_insert(Budget {
                tokens: SOURCE_BURST,
                at: now,
            })
            .take(now, SOURCE_RATE, SOURCE_BURST)
    }
}

#[derive(Debug)]
struct PeerState {
    peer: Peer,
    /// The newest initiation's timestamp accepted: older ones are replays.
    timestamp: u64,
    /// The confirmed session, which replies go through.
    current: Option<[u8; 16]>,
    /// A session handshaken but not yet confirmed by a datagram from the client.
    next: Option<[u8; 16]>,
    /// The session `current` replaced, in its grace ([`ROTATION_GRACE`]): a peer has at most
    /// these three, as in WireGuard, however often it handshakes.
    previous: Option<[u8; 16]>,
}

/// A token bucket for the handshakes' work.
#[derive(Debug)]
struct Budget {
    tokens: f64,
    at: Instant,
}

impl Budget {
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let refill = now.duration_since(self.at).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(burst);
        self.at = now;
    }

    fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        self.refill(now, rate, burst);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

#[derive(Debug)]
struct Session {
    endpoint: SocketAddr,
    /// Pre-shared key: the addresses its hello claimed.
    addresses: Vec<IpAddr>,
    replay: ReplayWindow,
    counter: u64,
    seen: Instant,
    /// Identities: the session's own keys and its client (an index into the peers).
    keys: Option<Keys>,
    peer: usize,
    born: Instant,
    /// Identities: replaced by a newer session; datagrams are taken until then.
    retiring: Option<Instant>,
}

impl Session {
    fn new(endpoint: SocketAddr, keys: Option<Keys>, peer: usize) -> Session {
        let now = Instant::now();
        Session {
            endpoint,
            addresses: Vec::new(),
            replay: ReplayWindow::default(),
            counter: 0,
            seen: now,
            keys,
            peer,
            born: now,
            retiring: None,
        }
    }

    /// Seals a datagram to the client, under the session's own keys (identities) or
    /// `shared` (the pre-shared key's); `None` (counted) if the cipher refused.
    fn seal(
        &mut self,
        shared: Option<&Keys>,
        kind: Kind,
        id: [u8; 16],
        payload: &[u8],
        c: &Counters,
    ) -> Option<Vec<u8>> {
        let mut datagram = Vec::with_capacity(frame::OVERHEAD + payload.len());
        self.seal_into(shared, kind, id, payload, c, &mut datagram)
            .then_some(datagram)
    }

    /// The same onto the end of `out` (a batch's buffer); false (counted) if the cipher
    /// refused.
    fn seal_into(
        &mut self,
        shared: Option<&Keys>,
        kind: Kind,
        id: [u8; 16],
        payload: &[u8],
        c: &Counters,
        out: &mut Vec<u8>,
    ) -> bool {
        let Some(keys) = self.keys.as_ref().or(shared) else {
            return false;
        };
        let header = Header {
            kind,
            session: id,
            counter: self.counter,
        };
        let sealed = frame::seal_into(&keys.to_client, &header, payload, out);
        self.counter += 1;
        if sealed.is_err() {
            Counters::bump(&c.seal_failed);
        }
        sealed.is_ok()
    }
}

/// The relay server.
#[derive(Debug)]
pub struct Server {
    udp: Udp,
    auth: Auth,
    sessions: HashMap<[u8; 16], Session>,
    /// Pre-shared key: which session owns each address.
    owners: HashMap<IpAddr, [u8; 16]>,
    /// Sessions that lost every address to a newer one, and when: their hellos are refused
    /// for a while, so that a replayed old hello cannot take the addresses back.
    retired: HashMap<[u8; 16], Instant>,
    /// The server TUN's prefixes: a client claiming an address outside them gets no replies.
    prefixes: Vec<(IpAddr, u8)>,
    /// When each kind of trouble was last warned about (rate limit).
    warned: HashMap<String, Instant>,
    counters: Arc<Counters>,
}

/// What a datagram from a client leads to.
pub(crate) enum Inbound {
    /// A packet for the TUN.
    Packet(bytes::Bytes),
    /// A datagram to send back (a hello's acknowledgement, a handshake's response).
    Ack(Vec<u8>, SocketAddr),
    /// Nothing (counted).
    Nothing,
}

/// How often one kind of trouble is warned about at most.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Whether `address` is inside `prefix`.
fn within((network, len): (IpAddr, u8), address: IpAddr) -> bool {
    ipnet::IpNet::new(network, len).is_ok_and(|net| net.contains(&address))
}

/// The peer whose allowed prefixes hold `address` most specifically (its index).
fn peer_for(peers: &[PeerState], address: IpAddr) -> Option<usize> {
    peers
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let best = p.peer.allowed.iter().filter(|n| n.contains(&address));
            best.map(IpNet::prefix_len).max().map(|len| (len, i))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, i)| i)
}

/// Refuses a peer list with a key twice (the second could never have a session), and warns
/// about prefixes two peers share (each address goes to the most specific one).
fn check_peers(peers: &[Peer]) -> std::io::Result<()> {
    for (i, peer) in peers.iter().enumerate() {
        let later = peers.get(i + 1..).unwrap_or_default();
        if later.iter().any(|other| other.key == peer.key) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the relay peer {} is listed twice", peer.key),
            ));
        }
        for other in later {
            let shared = peer.allowed.iter().find(|a| {
                other
                    .allowed
                    .iter()
                    .any(|b| a.contains(&b.network()) || b.contains(&a.network()))
            });
            if let Some(prefix) = shared {
                tracing::warn!(
                    "relay peers {} and {} overlap at {prefix}: each address belongs to the peer \
                     with its most specific prefix",
                    peer.key,
                    other.key
                );
            }
        }
    }
    Ok(())
}

impl Server {
    /// Listens on `listen`.
    pub async fn bind(
        listen: SocketAddr,
        auth: impl Into<ServerAuth>,
        counters: Arc<Counters>,
    ) -> std::io::Result<Self> {
        let auth = auth.into();
        if let ServerAuth::Identities { peers, .. } = &auth {
            check_peers(peers)?;
        }
        let auth = match auth {
            ServerAuth::PreShared(keys) => Auth::PreShared(keys),
            ServerAuth::Identities { private, peers } => Auth::Identities(Box::new(Identities {
                mac1: identity::mac1_key(&private.public_key()),
                cookies: CookieJar::new(&private.public_key()),
                rate: HANDSHAKE_RATE,
                proven: Budget {
                    tokens: PROVEN_BURST,
                    at: Instant::now(),
                },
                sources: HashMap::new(),
                swept: Instant::now(),
                seen: std::collections::VecDeque::new(),
                seen_set: std::collections::HashSet::new(),
                routes: HashMap::new(),
                private,
                peers: peers
                    .into_iter()
                    .map(|peer| PeerState {
                        peer,
                        timestamp: 0,
                        current: None,
                        next: None,
                        previous: None,
                    })
                    .collect(),
                budget: Budget {
                    tokens: HANDSHAKE_BURST,
                    at: Instant::now(),
                },
            })),
        };
        Ok(Self {
            udp: {
                let socket = std::net::UdpSocket::bind(listen)?;
                socket.set_nonblocking(true)?;
                Udp::new(socket, None)?
            },
            auth,
            sessions: HashMap::new(),
            owners: HashMap::new(),
            retired: HashMap::new(),
            prefixes: Vec::new(),
            warned: HashMap::new(),
            counters,
        })
    }

    /// The server TUN's addresses with their prefix lengths: a client whose addresses fall
    /// outside them is warned about (its replies cannot be routed to it).
    pub fn with_prefixes(mut self, prefixes: Vec<(IpAddr, u8)>) -> Self {
        self.prefixes = prefixes;
        self
    }

    /// Warns about `key` unless it was warned about lately, or too many kinds of trouble
    /// were (a flood from many sources: the counters tell the rest).
    fn warn_once(&mut self, key: String, message: impl FnOnce() -> String) {
        let now = Instant::now();
        if self.warned.len() >= WARNINGS {
            self.warned
                .retain(|_, at| now.duration_since(*at) < WARN_EVERY);
            if self.warned.len() >= WARNINGS {
                return;
            }
        }
        let due = self
            .warned
            .get(&key)
            .is_none_or(|at| now.duration_since(*at) >= WARN_EVERY);
        if due {
            self.warned.insert(key, now);
            tracing::warn!("{}", message());
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Serves until the TUN's link closes. `tun` is the far end of the TUN adapter's link.
    /// Both ways go in batches: what one receive call brings from the clients, and what the
    /// TUN has queued (sealed into one buffer, sent in as few calls as the kernel allows).
    ///
    /// The link carries plain packets (`Tun::spawn_coalescing` gives one over an offloading
    /// TUN, its pump splitting and coalescing); a link of virtio-net frames is refused.
    pub async fn run(mut self, tun: Link) {
        if tun.framing() != Framing::Plain {
            tracing::error!("the relay server needs a link of plain packets; not serving");
            return;
        }
        let (mut from_tun, to_tun) = tun.split();
        let mut incoming = self.udp.incoming();
        let mut outgoing = Outgoing::default();
        let mut received = Vec::new();
        let mut to_clients = Vec::with_capacity(BATCH);
        let mut to_tun_packets = Vec::new();
        let mut sweep = tokio::time::interval(SESSION_IDLE / 2);
        loop {
            tokio::select! {
                result = self.udp.recv(&mut incoming, |d, from| received.push((d, from))) => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "relay server receive failed");
                    }
                    for (datagram, from) in received.drain(..) {
                        match self.inbound(datagram, from) {
                            Inbound::Packet(packet) => to_tun_packets.push(packet),
                            Inbound::Ack(datagram, to) => {
                                // A lost acknowledgement is repeated with the next hello.
                                let _ = outgoing.push(to, |out| {
                                    out.extend_from_slice(&datagram);
                                    Ok::<(), ()>(())
                                });
                            }
                            Inbound::Nothing => {}
                        }
                    }
                    for packet in to_tun_packets.drain(..) {
                        if to_tun.send(packet).await.is_err() {
                            return;
                        }
                    }
                    if !outgoing.is_empty() {
                        let _ = self.udp.send(&mut outgoing).await;
                    }
                }
                n = from_tun.recv_many(&mut to_clients, BATCH) => {
                    if n == 0 {
                        return;
                    }
                    for packet in to_clients.drain(..) {
                        self.outbound(&packet, &mut outgoing);
                    }
                    let done = self.udp.send(&mut outgoing).await;
                    if let Some(error) = done.counted(&self.counters) {
                        tracing::debug!(%error, "relay server send failed; datagrams dropped");
                    }
                }
                _ = sweep.tick() => self.forget_idle(),
            }
        }
    }

    /// Checks a datagram from a client; `Some(packet)` for the TUN.
    pub(crate) fn inbound(&mut self, datagram: BytesMut, from: SocketAddr) -> Inbound {
        let c = Arc::clone(&self.counters);
        let header = match frame::peek(&datagram) {
            Ok(header) => header,
            Err(FrameError::Truncated) => return nothing(&c.drop_truncated),
            Err(_) => return nothing(&c.drop_version),
        };
        match header.kind {
            Kind::Initiation => return self.initiation(&header, &datagram, from),
            Kind::Response | Kind::Cookie => return nothing(&c.drop_version),
            Kind::Hello | Kind::Data => {}
        }
        let key = match &self.auth {
            Auth::PreShared(keys) => &keys.to_server,
            Auth::Identities(_) => {
                let now = Instant::now();
                let session = self.sessions.get(&header.session);
                // A session past its lifetime, or past its grace after a rotation (which
                // takes only packets, not hellos), opens nothing.
                let live = session.filter(|s| {
                    now.duration_since(s.born) <= SESSION_LIFETIME
                        && s.retiring
                            .is_none_or(|until| now < until && header.kind == Kind::Data)
                });
                match live.and_then(|s| s.keys.as_ref()) {
                    Some(keys) => &keys.to_server,
                    None => return nothing(&c.drop_session),
                }
            }
        };
        let payload = match frame::open(key, datagram) {
            Ok((_, payload)) => payload,
            Err(FrameError::Truncated) => return nothing(&c.drop_truncated),
            Err(FrameError::Version | FrameError::Kind) => return nothing(&c.drop_version),
            Err(_) => {
                self.warn_once(format!("auth {}", from.ip()), || {
                    format!(
                        "datagrams from {from} fail authentication: a client with another key \
                         (or not a Prism client)"
                    )
                });
                return nothing(&c.drop_auth);
            }
        };
        if let Auth::PreShared(keys) = &self.auth
            && header.kind == Kind::Hello
        {
            let keys = keys.clone();
            return match self.hello(&keys, &header, &payload, from) {
                Some(ack) => Inbound::Ack(ack, from),
                None => Inbound::Nothing,
            };
        }
        let Some(session) = self.sessions.get_mut(&header.session) else {
            return nothing(&c.drop_session);
        };
        if !session.replay.accept(header.counter) {
            return nothing(&c.drop_replay);
        }
        session.endpoint = from;
        session.seen = Instant::now();
        let peer = session.peer;
        self.confirm(header.session, peer);
        if header.kind == Kind::Hello {
            // Identities: a keep-alive, acknowledged so the client knows the server is there.
            let Some(session) = self.sessions.get_mut(&header.session) else {
                return Inbound::Nothing;
            };
            Counters::bump(&c.hellos);
            return match session.seal(None, Kind::Hello, header.session, &[], &c) {
                Some(ack) => Inbound::Ack(ack, from),
                None => Inbound::Nothing,
            };
        }
        let Some(src) = endpoints(&payload).map(|(src, _)| src) else {
            return nothing(&c.drop_spoofed);
        };
        let owned = match &mut self.auth {
            Auth::PreShared(_) => self
                .sessions
                .get(&header.session)
                .is_some_and(|s| s.addresses.contains(&src)),
            // Cryptokey routing: the source must be one whose replies would go to this client.
            Auth::Identities(ids) => ids.route(src) == Some(peer),
        };
        if !owned {
            return nothing(&c.drop_spoofed);
        }
        Counters::bump(&c.received);
        Inbound::Packet(payload)
    }

    /// Identities: a session's first authentic datagram makes it the client's current one,
    /// and the previous one is forgotten (its keys open nothing from now on).
    fn confirm(&mut self, id: [u8; 16], peer: usize) {
        let Auth::Identities(ids) = &mut self.auth else {
            return;
        };
        let Some(state) = ids.peers.get_mut(peer) else {
            return;
        };
        if state.next != Some(id) {
            return;
        }
        state.next = None;
        let Some(old) = state.current.replace(id) else {
            return;
        };
        // The one before it ends now, even within its grace.
        if let Some(older) = state.previous.replace(old) {
            self.sessions.remove(&older);
        }
        if let Some(session) = self.sessions.get_mut(&old) {
            session.retiring = Some(Instant::now() + ROTATION_GRACE);
            Counters::bump(&self.counters.rekeys);
        }
    }

    /// Identities: a client's handshake initiation. Refused ones leave nothing behind but
    /// their mac1 among the recent ones, and a proven source's rate.
    fn initiation(&mut self, header: &Header, datagram: &[u8], from: SocketAddr) -> Inbound {
        let c = Arc::clone(&self.counters);
        let Auth::Identities(ids) = &mut self.auth else {
            // A pre-shared-key server speaks no handshakes.
            return nothing(&c.drop_version);
        };
        if !identity::mac1_valid(&ids.mac1, datagram) {
            return nothing(&c.drop_mac);
        }
        if self.sessions.contains_key(&header.session)
            || ids.seen_before(identity::mac1_of(datagram))
        {
            // A session id in use, or this very initiation again: a replay.
            return nothing(&c.drop_replay);
        }
        let now = Instant::now();
        let proven = ids.cookies.proven(datagram, from);
        ids.budget.refill(now, ids.rate, HANDSHAKE_BURST);
        if !proven && ids.budget.tokens < HANDSHAKE_BURST / 2.0 {
            // Under load: the source must show it receives there before it costs any work.
            return match ids.cookies.reply(header, datagram, from) {
                Some(reply) => {
                    Counters::bump(&c.cookies);
                    Inbound::Ack(reply, from)
                }
                None => nothing(&c.seal_failed),
            };
        }
        let under_load = ids.budget.tokens < HANDSHAKE_BURST / 2.0;
        let allowed = if under_load {
            // Proven (the others got a cookie). Also spent from the server's budget, which
            // keeps it under load while this lasts.
            let _ = ids.budget.take(now, ids.rate, HANDSHAKE_BURST);
            ids.source_allows(from.ip(), now)
        } else {
            ids.budget.take(now, ids.rate, HANDSHAKE_BURST)
        };
        if !allowed {
            return nothing(&c.drop_handshake_busy);
        }
        let peers = &ids.peers;
        let mut admitted = None;
        let mut refused = None;
        let accepted = identity::respond(&ids.private, header, datagram, |key, timestamp| {
            let Some(index) = peers.iter().position(|p| p.peer.key == *key) else {
                refused = Some((*key, HandshakeError::UnknownKey));
                return Err(HandshakeError::UnknownKey);
            };
            if peers.get(index).is_none_or(|p| timestamp <= p.timestamp) {
                refused = Some((*key, HandshakeError::Replay));
                return Err(HandshakeError::Replay);
            }
            admitted = Some(index);
            Ok(())
        });
        let (accepted, index) = match (accepted, admitted, refused) {
            (Ok(accepted), Some(index), _) => (accepted, index),
            (_, _, Some((key, HandshakeError::UnknownKey))) => {
                self.warn_once(format!("unknown {key}"), || {
                    format!(
                        "a handshake from {from} with the client key {key}, which this server \
                         does not allow: add it with --peer {key},ADDRESS/PREFIX"
                    )
                });
                return nothing(&c.drop_unknown_key);
            }
            (_, _, Some((key, _))) => {
                self.warn_once(format!("stale {key}"), || {
                    format!(
                        "a handshake from {from} for client {key} is not newer than its last: \
                         a replay, or that client's clock went back"
                    )
                });
                return nothing(&c.drop_replay);
            }
            _ => return nothing(&c.drop_auth),
        };
        let Some(state) = ids.peers.get_mut(index) else {
            return Inbound::Nothing;
        };
        state.timestamp = accepted.timestamp;
        let superseded = state.next.replace(header.session);
        let allowed = state.peer.allowed.clone();
        let client = accepted.client;
        if let Some(old) = superseded {
            self.sessions.remove(&old);
        }
        self.sessions.insert(
            header.session,
            Session::new(from, Some(accepted.keys), index),
        );
        let claimed = frame::decode_addresses(&accepted.payload).unwrap_or_default();
        let refused: Vec<IpAddr> = claimed
            .iter()
            .copied()
            .filter(|a| !allowed.iter().any(|n| n.contains(a)))
            .collect();
        if !refused.is_empty() {
            self.warn_once(format!("refused {client}"), || {
                format!(
                    "client {client} at {from} uses {refused:?}, which its --peer does not \
                     allow ({allowed:?}): its packets from them are dropped"
                )
            });
        }
        self.warn_outside(&claimed, from);
        info!(client = %from, key = %client, "relay session (handshake)");
        Counters::bump(&c.handshakes);
        Inbound::Ack(accepted.response, from)
    }

    /// Warns when a client's addresses fall outside the server's prefixes.
    fn warn_outside(&mut self, addresses: &[IpAddr], from: SocketAddr) {
        let outside: Vec<IpAddr> = addresses
            .iter()
            .copied()
            .filter(|a| !self.prefixes.is_empty() && !self.prefixes.iter().any(|p| within(*p, *a)))
            .collect();
        if !outside.is_empty() {
            let prefixes = self.prefixes.clone();
            self.warn_once(format!("outside {from}"), || {
                format!(
                    "client {from} uses {outside:?}, outside this server's prefixes \
                     {prefixes:?}: replies to it cannot be routed; give the server an --address \
                     covering them"
                )
            });
        }
    }

    /// Pre-shared key: registers a hello; the acknowledgement to send back if it was accepted.
    fn hello(
        &mut self,
        keys: &Keys,
        header: &Header,
        payload: &[u8],
        from: SocketAddr,
    ) -> Option<Vec<u8>> {
        let c = Arc::clone(&self.counters);
        let Some(addresses) = frame::decode_addresses(payload) else {
            Counters::bump(&c.drop_version);
            return None;
        };
        // A fresh session may claim addresses another one owns: a client that restarted comes
        // back with a new session before the old one idles out, and must not wait for that.
        // The hello authenticated, so it holds the key; the old session loses those addresses
        // (and is forgotten once it has none). Only a hello that passes the replay check below
        // may do this, so a replayed hello cannot take anything back.
        if self.retired.contains_key(&header.session) {
            Counters::bump(&c.drop_session);
            return None;
        }
        let fresh = self
            .sessions
            .get(&header.session)
            .is_none_or(|session| session.replay.clone().accept(header.counter));
        if !fresh {
            Counters::bump(&c.drop_replay);
            return None;
        }
        let previous: Vec<[u8; 16]> = addresses
            .iter()
            .filter_map(|a| self.owners.get(a).copied())
            .filter(|owner| *owner != header.session && self.sessions.contains_key(owner))
            .collect();
        for old in previous {
            if let Some(session) = self.sessions.get_mut(&old) {
                session.addresses.retain(|a| !addresses.contains(a));
                info!(client = %from, ?addresses, previous = %session.endpoint, "relay session takes over its addresses (the client restarted?)");
                Counters::bump(&c.takeovers);
                if session.addresses.is_empty() {
                    self.sessions.remove(&old);
                    self.retired.insert(old, Instant::now());
                }
            }
        }
        let session = self.sessions.entry(header.session).or_insert_with(|| {
            info!(client = %from, ?addresses, "relay session");
            Session::new(from, None, 0)
        });
        if !session.replay.accept(header.counter) {
            Counters::bump(&c.drop_replay);
            return None;
        }
        session.endpoint = from;
        session.seen = Instant::now();
        // The acknowledgement tells the client the server is there and shares its key.
        let ack = session.seal(Some(keys), Kind::Hello, header.session, &[], &c)?;
        for old in std::mem::replace(&mut session.addresses, addresses.clone()) {
            self.owners.remove(&old);
        }
        for address in &addresses {
            self.owners.insert(*address, header.session);
        }
        self.warn_outside(&addresses, from);
        Counters::bump(&c.hellos);
        Some(ack)
    }

    /// Seals a packet from the TUN for the client that owns its destination, into `out`.
    fn outbound(&mut self, packet: &[u8], out: &mut Outgoing) {
        let c = Arc::clone(&self.counters);
        let destination = endpoints(packet).map(|(_, dst)| dst);
        let owner = destination.and_then(|dst| match &mut self.auth {
            Auth::PreShared(_) => self.owners.get(&dst).copied(),
            Auth::Identities(ids) => ids.route(dst).and_then(|i| ids.peers.get(i)?.current),
        });
        let now = Instant::now();
        let session = owner
            .and_then(|id| self.sessions.get_mut(&id).map(|s| (id, s)))
            .filter(|(_, s)| s.keys.is_none() || now.duration_since(s.born) <= SESSION_LIFETIME);
        let Some((id, session)) = session else {
            Counters::bump(&c.drop_no_session);
            return;
        };
        let shared = match &self.auth {
            Auth::PreShared(keys) => Some(keys),
            Auth::Identities(_) => None,
        };
        let endpoint = session.endpoint;
        let _ = out.push(endpoint, |buf| {
            match session.seal_into(shared, Kind::Data, id, packet, &c, buf) {
                true => Ok(()),
                false => Err(()),
            }
        });
    }

    /// A server under load for good: every initiation must show a cookie.
    #[cfg(test)]
    pub(crate) fn under_load_for_tests(mut self) -> Self {
        if let Auth::Identities(ids) = &mut self.auth {
            ids.rate = 0.0;
            ids.budget.tokens = 0.0;
        }
        self
    }

    /// How many sessions the server holds.
    #[cfg(any(test, fuzzing))]
    pub(crate) fn session_count(&self) -> usize {
        self.sessions.len()
    }

    fn forget_idle(&mut self) {
        let now = Instant::now();
        self.retired
            .retain(|_, at| now.duration_since(*at) <= SESSION_IDLE * 2);
        let idle: Vec<[u8; 16]> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                now.duration_since(s.seen) > SESSION_IDLE
                    || (s.keys.is_some() && now.duration_since(s.born) > SESSION_LIFETIME)
                    || s.retiring.is_some_and(|until| now >= until)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            if let Some(session) = self.sessions.remove(&id) {
                for address in session.addresses {
                    self.owners.remove(&address);
                }
            }
        }
        if let Auth::Identities(ids) = &mut self.auth {
            ids.sources.retain(|_, b| {
                b.refill(now, SOURCE_RATE, SOURCE_BURST);
                b.tokens < SOURCE_BURST
            });
            for state in &mut ids.peers {
                state.current = state.current.filter(|id| self.sessions.contains_key(id));
                state.next = state.next.filter(|id| self.sessions.contains_key(id));
                state.previous = state.previous.filter(|id| self.sessions.contains_key(id));
            }
        }
    }
}

fn nothing(counter: &std::sync::atomic::AtomicU64) -> Inbound {
    Counters::bump(counter);
    Inbound::Nothing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_contain_their_addresses_only() {
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert!(within((v4("10.99.0.254"), 24), v4("10.99.0.7")));
        assert!(!within((v4("10.99.0.254"), 24), v4("10.98.0.7")));
        assert!(within((v4("10.0.0.0"), 0), v4("192.0.2.1")));
        assert!(within((v4("fd99::fe"), 64), v4("fd99::7")));
        assert!(!within((v4("fd99::fe"), 64), v4("fd98::7")));
        assert!(!within((v4("fd99::fe"), 64), v4("10.99.0.7")));
    }
}
