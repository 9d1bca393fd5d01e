//! [`Server`]: the far end of the UDP relay. It writes each client's packets to its own TUN
//! (the kernel there routes and NATs them onward) and sends the replies back to the client
//! they belong to.
//!
//! A client announces its tunnel addresses in a hello; an address belongs to one live session
//! at a time. A client may only send packets from its own addresses (anti-spoofing), and the
//! server routes replies by destination address to the session that owns it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use prism_device::Link;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tracing::info;

use crate::frame::{self, FrameError, Header, Keys, Kind};
use crate::tunnel::endpoints;
use crate::{Counters, ReplayWindow};

/// A session silent this long is forgotten (its client says hello every 5 s).
pub(crate) const SESSION_IDLE: Duration = Duration::from_secs(60);
const MAX_DATAGRAM: usize = 65535;

#[derive(Debug)]
struct Session {
    endpoint: SocketAddr,
    addresses: Vec<IpAddr>,
    replay: ReplayWindow,
    counter: u64,
    seen: Instant,
}

/// The relay server.
#[derive(Debug)]
pub struct Server {
    socket: UdpSocket,
    keys: Keys,
    sessions: HashMap<[u8; 16], Session>,
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
    /// An acknowledgement to send back (a hello was accepted).
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

impl Server {
    /// Listens on `listen`.
    pub async fn bind(
        listen: SocketAddr,
        keys: Keys,
        counters: Arc<Counters>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            socket: UdpSocket::bind(listen).await?,
            keys,
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

    /// Warns about `key` unless it was warned about lately.
    fn warn_once(&mut self, key: String, message: impl FnOnce() -> String) {
        let now = Instant::now();
        if self.warned.len() > 256 {
            self.warned
                .retain(|_, at| now.duration_since(*at) < WARN_EVERY);
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
        self.socket.local_addr()
    }

    /// Serves until the TUN's link closes. `tun` is the far end of the TUN adapter's link.
    pub async fn run(mut self, tun: Link) {
        let (mut from_tun, to_tun) = tun.split();
        let mut buf = BytesMut::with_capacity(MAX_DATAGRAM);
        let mut sweep = tokio::time::interval(SESSION_IDLE / 2);
        loop {
            tokio::select! {
                received = self.socket.recv_buf_from(&mut buf) => {
                    let Ok((n, from)) = received else { continue };
                    let datagram = buf.split_to(n);
                    if buf.capacity() < MAX_DATAGRAM {
                        buf = BytesMut::with_capacity(MAX_DATAGRAM * 4);
                    }
                    match self.inbound(datagram, from) {
                        Inbound::Packet(packet) => {
                            if to_tun.send(packet).await.is_err() {
                                return;
                            }
                        }
                        Inbound::Ack(datagram, to) => {
                            // A lost acknowledgement is repeated with the next hello.
                            let _ = self.socket.send_to(&datagram, to).await;
                        }
                        Inbound::Nothing => {}
                    }
                }
                packet = from_tun.recv() => {
                    let Some(packet) = packet else { return };
                    self.outbound(&packet).await;
                }
                _ = sweep.tick() => self.forget_idle(),
            }
        }
    }

    /// Checks a datagram from a client; `Some(packet)` for the TUN.
    pub(crate) fn inbound(&mut self, datagram: BytesMut, from: SocketAddr) -> Inbound {
        let c = Arc::clone(&self.counters);
        let (header, payload) = match frame::open(&self.keys.to_server, datagram) {
            Ok(opened) => opened,
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
        match header.kind {
            Kind::Hello => match self.hello(&header, &payload, from) {
                Some(ack) => Inbound::Ack(ack, from),
                None => Inbound::Nothing,
            },
            Kind::Data => {
                let Some(session) = self.sessions.get_mut(&header.session) else {
                    return nothing(&c.drop_session);
                };
                if !session.replay.accept(header.counter) {
                    return nothing(&c.drop_replay);
                }
                session.endpoint = from;
                session.seen = Instant::now();
                let owned =
                    endpoints(&payload).is_some_and(|(src, _)| session.addresses.contains(&src));
                if !owned {
                    return nothing(&c.drop_spoofed);
                }
                Counters::bump(&c.received);
                Inbound::Packet(payload)
            }
        }
    }

    /// Registers a hello; the acknowledgement to send back if it was accepted.
    fn hello(&mut self, header: &Header, payload: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
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
            Session {
                endpoint: from,
                addresses: Vec::new(),
                replay: ReplayWindow::default(),
                counter: 0,
                seen: Instant::now(),
            }
        });
        if !session.replay.accept(header.counter) {
            Counters::bump(&c.drop_replay);
            return None;
        }
        session.endpoint = from;
        session.seen = Instant::now();
        // The acknowledgement tells the client the server is there and shares its key.
        let sealed = frame::seal(
            &self.keys.to_client,
            &Header {
                kind: Kind::Hello,
                session: header.session,
                counter: session.counter,
            },
            &[],
        );
        let Ok(ack) = sealed else {
            Counters::bump(&c.seal_failed);
            return None;
        };
        session.counter += 1;
        for old in std::mem::replace(&mut session.addresses, addresses.clone()) {
            self.owners.remove(&old);
        }
        let outside: Vec<IpAddr> = addresses
            .iter()
            .copied()
            .filter(|a| !self.prefixes.is_empty() && !self.prefixes.iter().any(|p| within(*p, *a)))
            .collect();
        for address in addresses {
            self.owners.insert(address, header.session);
        }
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
        Counters::bump(&c.hellos);
        Some(ack)
    }

    /// Sends a packet from the TUN to the client that owns its destination.
    async fn outbound(&mut self, packet: &[u8]) {
        let Self {
            socket,
            keys,
            sessions,
            owners,
            counters,
            ..
        } = self;
        let owner = endpoints(packet).and_then(|(_, dst)| owners.get(&dst));
        let Some((id, session)) = owner.and_then(|id| sessions.get_mut(id).map(|s| (*id, s)))
        else {
            Counters::bump(&counters.drop_no_session);
            return;
        };
        let header = Header {
            kind: Kind::Data,
            session: id,
            counter: session.counter,
        };
        session.counter += 1;
        let Ok(datagram) = frame::seal(&keys.to_client, &header, packet) else {
            Counters::bump(&counters.seal_failed);
            return;
        };
        if socket.send_to(&datagram, session.endpoint).await.is_ok() {
            Counters::bump(&counters.sent);
        }
    }

    fn forget_idle(&mut self) {
        let now = Instant::now();
        self.retired
            .retain(|_, at| now.duration_since(*at) <= SESSION_IDLE * 2);
        let idle: Vec<[u8; 16]> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.duration_since(s.seen) > SESSION_IDLE)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            if let Some(session) = self.sessions.remove(&id) {
                for address in session.addresses {
                    self.owners.remove(&address);
                }
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
