//! Relay identities: every client has its own X25519 key pair, the server a list of the client
//! keys it allows and the addresses each may use (WireGuard's cryptokey routing). A session's
//! keys come from a Noise IK handshake (the `snow` crate) with fresh ephemeral keys on both
//! sides, so a stolen static key decrypts no recorded session (forward secrecy).
//!
//! ```text
//!  initiation: header (kind 3, the new session id, counter 0) | Noise IK message 1 | mac1 | mac2
//!  response:   header (kind 4, the same session id, counter 0) | Noise IK message 2
//!  cookie:     header (kind 5, the initiation's session id, 0) | nonce (24) | sealed cookie (32)
//! ```
//!
//! The initiation's payload, encrypted to the server, is a timestamp (nanoseconds since the Unix
//! epoch, big-endian; the server takes only newer ones per client, so a replayed initiation does
//! nothing) followed by the client's tunnel addresses. The header is the handshake's prologue,
//! so the session id is authenticated too. Both directions' data keys are Noise's split of the
//! handshake; datagrams after the handshake are `frame`'s, sealed under them.
//!
//! The two MACs are WireGuard's defence against handshake floods. `mac1`, a keyed BLAKE2s-128
//! under a hash of the server's public key, shows the sender knows that key: without it a
//! datagram costs the server one hash. `mac2`, keyed with a cookie, shows the sender receives
//! at its source address: a server under load answers an initiation without it with a
//! [`CookieJar`] cookie (a MAC of the source address under a secret that changes every two
//! minutes, sealed to the client with its `mac1` as associated data) instead of doing the
//! handshake; the client sends the initiation again with `mac2`. Spoofed sources never see
//! their cookie. Pure: the caller moves the datagrams.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ipnet::IpNet;

use crate::frame::{HEADER, Header, Keys, Kind};

/// Noise protocol: IK (the client knows the server's static key in advance and sends its own
/// encrypted in the first message), Curve25519, ChaCha20-Poly1305, BLAKE2s, as WireGuard.
const PATTERN: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE: &[u8] = b"prism relay identities 1";
const MAC1_LABEL: &[u8] = b"prism relay mac1";
const COOKIE_LABEL: &[u8] = b"prism relay cookie";
/// Bytes of each MAC, and of a cookie.
pub(crate) const MAC: usize = 16;
/// Bytes a Noise message adds to its payload, at most (two keys and two tags).
const NOISE_OVERHEAD: usize = 32 + 32 + 16 + 16;
/// A server's cookie secret is replaced this often, and a client keeps a cookie this long.
pub(crate) const COOKIE_LIFETIME: std::time::Duration = std::time::Duration::from_secs(120);
/// Bytes of the initiation's timestamp.
const TIMESTAMP: usize = 8;

/// A key that is not one: not base64, or not 32 bytes once decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not a key: expected 32 bytes in base64 (44 characters), as `prism genkey` writes")]
pub struct BadKey(String);

/// An X25519 private key.
#[derive(Clone)]
pub struct PrivateKey(pub(crate) [u8; 32]);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

impl PrivateKey {
    /// A fresh random key; `None` if the operating system has no randomness to give.
    pub fn generate() -> Option<PrivateKey> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).ok()?;
        Some(PrivateKey(key))
    }

    /// The public key that goes with it.
    pub fn public_key(&self) -> PublicKey {
        #[cfg(fuzzing)]
        return PublicKey(crate::standin::public_key(&self.0));
        #[cfg(not(fuzzing))]
        PublicKey(curve25519_dalek::MontgomeryPoint::mul_base_clamped(self.0).to_bytes())
    }

    /// The key in base64, for a key file.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }
}

impl FromStr for PrivateKey {
    type Err = BadKey;
    fn from_str(s: &str) -> Result<Self, BadKey> {
        decode(s, "the private key").map(PrivateKey)
    }
}

/// An X25519 public key; shown in base64.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = BadKey;
    fn from_str(s: &str) -> Result<Self, BadKey> {
        decode(s, &format!("{s:?}")).map(PublicKey)
    }
}

fn decode(s: &str, what: &str) -> Result<[u8; 32], BadKey> {
    BASE64
        .decode(s.trim())
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| BadKey(what.to_owned()))
}

/// A client the server allows: its public key and the prefixes its packets may come from
/// (and replies to which go to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The client's public key.
    pub key: PublicKey,
    /// The addresses it may use.
    pub allowed: Vec<IpNet>,
}

/// A peer as `KEY,CIDR[,CIDR...]` (the key's base64 has no commas).
impl FromStr for Peer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let key = parts.next().unwrap_or_default().parse::<PublicKey>();
        let key = key.map_err(|e| e.to_string())?;
        let allowed = parts
            .map(|p| {
                p.trim()
                    .parse::<IpNet>()
                    .map_err(|_| format!("bad CIDR {p:?} in peer {s:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if allowed.is_empty() {
            return Err(format!(
                "peer {s:?} allows no address; expected KEY,CIDR[,CIDR...] such as \
                 KEY,10.99.0.2/32,fd99::2/128"
            ));
        }
        Ok(Peer { key, allowed })
    }
}

/// Why a handshake message was refused. Each is a counted drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// Not a well-formed Noise message under these keys.
    #[error("the handshake does not authenticate")]
    Noise,
    /// A client key the server does not allow.
    #[error("unknown client key")]
    UnknownKey,
    /// A timestamp not newer than the last one of this client: a replay.
    #[error("replayed initiation")]
    Replay,
    /// The local side could not build the message (never expected).
    #[error("the handshake message could not be built")]
    Build,
}

fn noise() -> snow::Builder<'static> {
    // The pattern is a constant that parses; a failure would show in every test.
    let params = PATTERN.parse().unwrap_or_else(|_| unreachable!());
    #[cfg(fuzzing)]
    return snow::Builder::with_resolver(params, Box::new(crate::standin::Resolver));
    #[cfg(not(fuzzing))]
    snow::Builder::new(params)
}

fn hash(label: &[u8], server: &PublicKey) -> [u8; 32] {
    let mut hash = Blake2s256::new();
    hash.update(label);
    hash.update(server.0);
    hash.finalize().into()
}

/// The key mac1 is made with: a hash of the server's public key, so anyone who knows the
/// server's public key can make it and nobody else.
pub(crate) fn mac1_key(server: &PublicKey) -> [u8; 32] {
    hash(MAC1_LABEL, server)
}

/// A keyed BLAKE2s-128 over `message`, ready to finalize or verify.
fn mac(key: &[u8], message: &[u8]) -> Blake2sMac<U16> {
    // BLAKE2s takes keys of 1 to 32 bytes: ours are 16 or 32.
    let mut mac =
        <Blake2sMac<U16> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(message);
    mac
}

/// An initiation's parts: what mac1 covers, mac1, and mac2. `None` if it is too short.
fn macs(datagram: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let mac2_at = datagram.len().checked_sub(MAC)?;
    let mac1_at = mac2_at.checked_sub(MAC)?;
    let (covered, macs) = datagram.split_at(mac1_at);
    let (mac1, mac2) = macs.split_at(MAC);
    Some((covered, mac1, mac2))
}

/// Whether an initiation carries a valid mac1 under `key` (constant time).
pub(crate) fn mac1_valid(key: &[u8; 32], datagram: &[u8]) -> bool {
    macs(datagram).is_some_and(|(covered, mac1, _)| mac(key, covered).verify_slice(mac1).is_ok())
}

/// An initiation's mac1 (all zeros if it is too short to have one).
pub(crate) fn mac1_of(datagram: &[u8]) -> [u8; MAC] {
    macs(datagram)
        .and_then(|(_, mac1, _)| <[u8; MAC]>::try_from(mac1).ok())
        .unwrap_or_default()
}

/// Whether an initiation carries a valid mac2 under `cookie` (constant time).
fn mac2_valid(cookie: &[u8; MAC], datagram: &[u8]) -> bool {
    let Some(end) = datagram.len().checked_sub(MAC) else {
        return false;
    };
    let (covered, mac2) = datagram.split_at(end);
    mac(cookie, covered).verify_slice(mac2).is_ok()
}

/// A handshake datagram: `header`, then the next Noise message carrying `payload`.
fn handshake_datagram(
    state: &mut snow::HandshakeState,
    header: &[u8; HEADER],
    payload: &[u8],
) -> Result<Vec<u8>, HandshakeError> {
    let mut datagram = vec![0u8; HEADER + payload.len() + NOISE_OVERHEAD];
    let (head, body) = datagram.split_at_mut(HEADER);
    head.copy_from_slice(header);
    let n = state
        .write_message(payload, body)
        .map_err(|_| HandshakeError::Build)?;
    datagram.truncate(HEADER + n);
    Ok(datagram)
}

fn prologue(header: &[u8; HEADER]) -> Vec<u8> {
    [PROLOGUE, header].concat()
}

/// A client's handshake in flight.
pub(crate) struct Initiation {
    state: snow::HandshakeState,
    /// The session it opens.
    pub session: [u8; 16],
    /// Its mac1: a cookie reply is sealed against it.
    pub mac1: [u8; MAC],
}

impl fmt::Debug for Initiation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Initiation").finish_non_exhaustive()
    }
}

/// Starts a handshake for `session`: the initiation datagram to send. `payload` follows the
/// timestamp, encrypted to the server; `cookie`, the server's latest, makes mac2.
pub(crate) fn initiate(
    local: &PrivateKey,
    server: &PublicKey,
    session: [u8; 16],
    timestamp: u64,
    payload: &[u8],
    cookie: Option<&[u8; MAC]>,
) -> Result<(Initiation, Vec<u8>), HandshakeError> {
    let header = Header {
        kind: Kind::Initiation,
        session,
        counter: 0,
    }
    .encode();
    let prologue = prologue(&header);
    let mut state = noise()
        .local_private_key(&local.0)
        .and_then(|b| b.remote_public_key(&server.0))
        .and_then(|b| b.prologue(&prologue))
        .and_then(snow::Builder::build_initiator)
        .map_err(|_| HandshakeError::Build)?;
    let clear = [&timestamp.to_be_bytes()[..], payload].concat();
    let mut datagram = handshake_datagram(&mut state, &header, &clear)?;
    let mac1: [u8; MAC] = mac(&mac1_key(server), &datagram).finalize_fixed().into();
    datagram.extend_from_slice(&mac1);
    let mac2: [u8; MAC] = match cookie {
        Some(cookie) => mac(cookie, &datagram).finalize_fixed().into(),
        None => [0; MAC],
    };
    datagram.extend_from_slice(&mac2);
    let initiation = Initiation {
        state,
        session,
        mac1,
    };
    Ok((initiation, datagram))
}

/// Finishes a handshake with the server's response: the session's keys. A response that does
/// not authenticate leaves the initiation as it was, for the genuine one.
pub(crate) fn complete(
    initiation: &mut Initiation,
    datagram: &[u8],
) -> Result<Keys, HandshakeError> {
    let header = Header {
        kind: Kind::Response,
        session: initiation.session,
        counter: 0,
    }
    .encode();
    if datagram.get(..HEADER) != Some(&header[..]) {
        return Err(HandshakeError::Noise);
    }
    let message = datagram.get(HEADER..).unwrap_or_default();
    let mut payload = vec![0u8; message.len()];
    initiation
        .state
        .read_message(message, &mut payload)
        .map_err(|_| HandshakeError::Noise)?;
    split(&mut initiation.state)
}

fn split(state: &mut snow::HandshakeState) -> Result<Keys, HandshakeError> {
    if !state.is_handshake_finished() {
        return Err(HandshakeError::Noise);
    }
    let (initiator_to_responder, responder_to_initiator) = state.dangerously_get_raw_split();
    Ok(Keys::from_split(
        initiator_to_responder,
        responder_to_initiator,
    ))
}

/// An initiation the server accepted.
#[derive(Debug)]
pub(crate) struct Accepted {
    /// The client's public key.
    pub client: PublicKey,
    /// The initiation's timestamp.
    pub timestamp: u64,
    /// What followed it (the client's addresses).
    pub payload: Vec<u8>,
    /// The new session's keys.
    pub keys: Keys,
    /// The response datagram to send back.
    pub response: Vec<u8>,
}

/// The server's side of a handshake. `datagram` is a whole initiation whose MACs the caller
/// checked; `admit` decides on the client's key and timestamp before the server does the rest
/// of the work (only two of the four Diffie-Hellman operations are spent on a refused key).
pub(crate) fn respond(
    local: &PrivateKey,
    header: &Header,
    datagram: &[u8],
    admit: impl FnOnce(&PublicKey, u64) -> Result<(), HandshakeError>,
) -> Result<Accepted, HandshakeError> {
    let end = datagram.len().saturating_sub(2 * MAC);
    let message = datagram.get(HEADER..end).ok_or(HandshakeError::Noise)?;
    let prologue = prologue(&header.encode());
    let mut state = noise()
        .local_private_key(&local.0)
        .and_then(|b| b.prologue(&prologue))
        .and_then(snow::Builder::build_responder)
        .map_err(|_| HandshakeError::Build)?;
    let mut clear = vec![0u8; message.len()];
    let n = state
        .read_message(message, &mut clear)
        .map_err(|_| HandshakeError::Noise)?;
    clear.truncate(n);
    let client = state
        .get_remote_static()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .map(PublicKey)
        .ok_or(HandshakeError::Noise)?;
    let timestamp = clear
        .get(..TIMESTAMP)
        .and_then(|t| <[u8; TIMESTAMP]>::try_from(t).ok())
        .map(u64::from_be_bytes)
        .ok_or(HandshakeError::Noise)?;
    admit(&client, timestamp)?;
    let response_header = Header {
        kind: Kind::Response,
        ..*header
    }
    .encode();
    let response = handshake_datagram(&mut state, &response_header, &[])?;
    let keys = split(&mut state)?;
    Ok(Accepted {
        client,
        timestamp,
        payload: clear.split_off(TIMESTAMP),
        keys,
        response,
    })
}

/// The server's cookies: a MAC of a client's source address under a secret replaced every
/// [`COOKIE_LIFETIME`].
pub(crate) struct CookieJar {
    secret: [u8; 32],
    since: std::time::Instant,
    /// Seals cookies to clients: a key from the server's public key, which clients know.
    cipher: XChaCha20Poly1305,
    /// Nonces: a random prefix and a count.
    nonce_prefix: [u8; 16],
    sealed: u64,
}

impl fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CookieJar").finish_non_exhaustive()
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // Without randomness the secret is still unknown to a remote party only through the
    // address it cannot receive at; getrandom fails only on a broken system.
    let _ = getrandom::fill(&mut bytes);
    bytes
}

fn cookie_cipher(server: &PublicKey) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(&hash(COOKIE_LABEL, server).into())
}

impl CookieJar {
    pub(crate) fn new(server: &PublicKey) -> CookieJar {
        CookieJar {
            secret: random(),
            since: std::time::Instant::now(),
            cipher: cookie_cipher(server),
            nonce_prefix: random(),
            sealed: 0,
        }
    }

    /// The cookie of `source` now.
    fn cookie(&mut self, source: std::net::SocketAddr) -> [u8; MAC] {
        if self.since.elapsed() >= COOKIE_LIFETIME {
            self.secret = random();
            self.since = std::time::Instant::now();
        }
        let mut address = Vec::with_capacity(18);
        match source.ip() {
            std::net::IpAddr::V4(ip) => address.extend_from_slice(&ip.octets()),
            std::net::IpAddr::V6(ip) => address.extend_from_slice(&ip.octets()),
        }
        address.extend_from_slice(&source.port().to_be_bytes());
        mac(&self.secret, &address).finalize_fixed().into()
    }

    /// Whether an initiation from `source` carries the cookie of that source as mac2.
    pub(crate) fn proven(&mut self, datagram: &[u8], source: std::net::SocketAddr) -> bool {
        mac2_valid(&self.cookie(source), datagram)
    }

    /// The cookie reply to an initiation from `source`; `None` if the cipher refused.
    pub(crate) fn reply(
        &mut self,
        header: &Header,
        datagram: &[u8],
        source: std::net::SocketAddr,
    ) -> Option<Vec<u8>> {
        let mut sealed = self.cookie(source).to_vec();
        let mut nonce = [0u8; 24];
        nonce[..16].copy_from_slice(&self.nonce_prefix);
        nonce[16..].copy_from_slice(&self.sealed.to_be_bytes());
        self.sealed += 1;
        let tag = self
            .cipher
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), &mac1_of(datagram), &mut sealed)
            .ok()?;
        let reply_header = Header {
            kind: Kind::Cookie,
            session: header.session,
            counter: 0,
        }
        .encode();
        Some([&reply_header[..], &nonce, &sealed, &tag].concat())
    }
}

/// A client's reading of a cookie reply to `initiation`, from the server `server`.
pub(crate) fn open_cookie(
    server: &PublicKey,
    initiation: &Initiation,
    datagram: &[u8],
) -> Option<[u8; MAC]> {
    let rest = datagram.get(HEADER..)?;
    if rest.len() != 24 + MAC + 16 {
        return None;
    }
    let (nonce, sealed) = rest.split_at(24);
    let (cookie, tag) = sealed.split_at(MAC);
    let mut cookie: [u8; MAC] = cookie.try_into().ok()?;
    cookie_cipher(server)
        .decrypt_in_place_detached(
            XNonce::from_slice(nonce),
            &initiation.mac1,
            &mut cookie,
            tag.into(),
        )
        .ok()?;
    Some(cookie)
}

/// Now as nanoseconds since the Unix epoch, for an initiation's timestamp.
pub(crate) fn now_timestamp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]

    use super::*;
    use crate::frame;
    use bytes::BytesMut;

    /// The header of a handshake datagram, when it is one.
    fn handshake_header(datagram: &[u8]) -> Option<Header> {
        frame::peek(datagram)
            .ok()
            .filter(|h| matches!(h.kind, Kind::Initiation | Kind::Response))
    }

    fn pair() -> (PrivateKey, PublicKey) {
        let private = PrivateKey::generate().unwrap();
        let public = private.public_key();
        (private, public)
    }

    fn server_side(
        server: &PrivateKey,
        datagram: &[u8],
        allowed: &PublicKey,
    ) -> Result<Accepted, String> {
        if !mac1_valid(&mac1_key(&server.public_key()), datagram) {
            return Err("mac1".to_owned());
        }
        let header = handshake_header(datagram).ok_or("not a handshake")?;
        let admit = |client: &PublicKey, _| {
            if client == allowed {
                Ok(())
            } else {
                Err(HandshakeError::UnknownKey)
            }
        };
        respond(server, &header, datagram, admit).map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn keys_round_trip_through_base64_and_public_keys_match_noise() {
        let (private, public) = pair();
        let again: PrivateKey = private.to_base64().parse().unwrap();
        assert_eq!(again.public_key(), public);
        assert_eq!(public.to_string().parse::<PublicKey>().unwrap(), public);
        assert_eq!(public.to_string().len(), 44);
        // snow's own key generation agrees with our public key derivation.
        let keypair = noise().generate_keypair().unwrap();
        let ours = PrivateKey(keypair.private.try_into().unwrap()).public_key();
        assert_eq!(ours.0[..], keypair.public[..]);
        assert!("not base64!".parse::<PublicKey>().is_err());
        assert!(BASE64.encode([1u8; 31]).parse::<PublicKey>().is_err());
    }

    /// The fuzz builds' stand-in for X25519 completes the same handshake with the same keys on
    /// both sides: otherwise fuzzing would never get past an initiation.
    #[test]
    fn the_fuzzing_stand_in_completes_a_handshake() {
        let builder = |private: &[u8; 32], remote: Option<&[u8]>| {
            let params = PATTERN.parse().unwrap();
            let b = snow::Builder::with_resolver(params, Box::new(crate::standin::Resolver))
                .local_private_key(private)
                .unwrap();
            match remote {
                Some(remote) => b.remote_public_key(remote).unwrap().build_initiator(),
                None => b.build_responder(),
            }
            .unwrap()
        };
        let (client, server) = ([1u8; 32], [9u8; 32]);
        let mut initiator = builder(&client, Some(&crate::standin::public_key(&server)));
        let mut responder = builder(&server, None);
        let (mut message, mut payload) = ([0u8; 256], [0u8; 256]);
        let n = initiator.write_message(b"hi", &mut message).unwrap();
        let read = responder.read_message(&message[..n], &mut payload).unwrap();
        assert_eq!(&payload[..read], b"hi");
        assert_eq!(
            responder.get_remote_static().unwrap(),
            crate::standin::public_key(&client)
        );
        let n = responder.write_message(&[], &mut message).unwrap();
        initiator.read_message(&message[..n], &mut payload).unwrap();
        assert_eq!(
            initiator.dangerously_get_raw_split(),
            responder.dangerously_get_raw_split()
        );
    }

    #[test]
    fn peers_parse_with_their_prefixes() {
        let (_, public) = pair();
        let peer: Peer = format!("{public},10.99.0.2/32, fd99::2/128")
            .parse()
            .unwrap();
        assert_eq!(peer.key, public);
        assert_eq!(peer.allowed.len(), 2);
        assert!(format!("{public}").parse::<Peer>().is_err(), "no prefix");
        assert!(format!("{public},10.99.0.2").parse::<Peer>().is_err());
    }

    #[test]
    fn a_handshake_gives_both_sides_the_same_keys_and_fresh_ones_each_time() {
        let (client, client_public) = pair();
        let (server, server_public) = pair();
        let mut sessions = Vec::new();
        for attempt in 0..2u8 {
            let session = [attempt; 16];
            let (mut initiation, datagram) =
                initiate(&client, &server_public, session, 7, b"addresses", None).unwrap();
            let accepted = server_side(&server, &datagram, &client_public).unwrap();
            assert_eq!(accepted.client, client_public);
            assert_eq!(accepted.timestamp, 7);
            assert_eq!(accepted.payload, b"addresses");
            let keys = complete(&mut initiation, &accepted.response).unwrap();
            // What the client seals, the server opens, and the other way round.
            let header = Header {
                kind: Kind::Data,
                session,
                counter: 1,
            };
            let up = frame::seal(&keys.to_server, &header, b"up").unwrap();
            assert!(frame::open(&accepted.keys.to_server, BytesMut::from(&up[..])).is_ok());
            let down = frame::seal(&accepted.keys.to_client, &header, b"down").unwrap();
            assert!(frame::open(&keys.to_client, BytesMut::from(&down[..])).is_ok());
            sessions.push((keys, up));
        }
        // Each handshake has its own keys: the second's open nothing of the first's.
        let (second, _) = &sessions[1];
        let (_, first_up) = &sessions[0];
        assert!(frame::open(&second.to_server, BytesMut::from(&first_up[..])).is_err());
    }

    #[test]
    fn a_wrong_server_key_an_unknown_client_and_any_flipped_bit_are_refused() {
        let (client, client_public) = pair();
        let (server, server_public) = pair();
        let (_, other_public) = pair();
        // Made for another server: mac1 fails first, for the price of a hash.
        let (_, datagram) = initiate(&client, &other_public, [1; 16], 1, b"", None).unwrap();
        assert_eq!(
            server_side(&server, &datagram, &client_public).unwrap_err(),
            "mac1"
        );
        // A client the server does not know.
        let (_, datagram) = initiate(&client, &server_public, [1; 16], 1, b"", None).unwrap();
        assert_eq!(
            server_side(&server, &datagram, &other_public).unwrap_err(),
            "UnknownKey"
        );
        // Every byte but mac2's, which only a server under load reads (see the cookie test).
        for i in 0..datagram.len() - MAC {
            let mut forged = datagram.clone();
            forged[i] ^= 0x20;
            assert!(
                server_side(&server, &forged, &client_public).is_err(),
                "byte {i}"
            );
        }
        for len in 0..datagram.len() {
            assert!(server_side(&server, &datagram[..len], &client_public).is_err());
        }
    }

    #[test]
    fn forged_responses_are_refused_and_leave_the_handshake_to_the_genuine_one() {
        let (client, client_public) = pair();
        let (server, server_public) = pair();
        let (mut initiation, datagram) =
            initiate(&client, &server_public, [1; 16], 1, b"", None).unwrap();
        let response = server_side(&server, &datagram, &client_public)
            .unwrap()
            .response;
        let (mut other, _) = initiate(&client, &server_public, [2; 16], 2, b"", None).unwrap();
        assert!(
            complete(&mut other, &response).is_err(),
            "another session's"
        );
        for i in 0..response.len() {
            let mut forged = response.clone();
            forged[i] ^= 1;
            assert!(complete(&mut initiation, &forged).is_err(), "byte {i}");
        }
        assert!(complete(&mut initiation, &response[..response.len() - 1]).is_err());
        assert!(
            complete(&mut initiation, &response).is_ok(),
            "after all the forgeries, the genuine response completes"
        );
    }

    #[test]
    fn a_cookie_proves_only_the_source_it_was_made_for() {
        let (client, _) = pair();
        let (_, server_public) = pair();
        let mut jar = CookieJar::new(&server_public);
        let source: std::net::SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let (initiation, datagram) =
            initiate(&client, &server_public, [1; 16], 1, b"", None).unwrap();
        assert!(!jar.proven(&datagram, source), "no cookie yet");
        let header = frame::peek(&datagram).unwrap();
        let reply = jar.reply(&header, &datagram, source).unwrap();
        assert_eq!(frame::peek(&reply).unwrap().kind, Kind::Cookie);
        let cookie = open_cookie(&server_public, &initiation, &reply).unwrap();
        // Sealed against this initiation's mac1: another initiation cannot read it.
        let (other, _) = initiate(&client, &server_public, [1; 16], 2, b"", None).unwrap();
        assert!(open_cookie(&server_public, &other, &reply).is_none());
        let mut forged = reply.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(open_cookie(&server_public, &initiation, &forged).is_none());
        // With it, the next initiation is proven from that source only.
        let (_, again) = initiate(&client, &server_public, [1; 16], 3, b"", Some(&cookie)).unwrap();
        assert!(mac1_valid(&mac1_key(&server_public), &again));
        assert!(jar.proven(&again, source));
        let elsewhere: std::net::SocketAddr = "192.0.2.8:5000".parse().unwrap();
        assert!(!jar.proven(&again, elsewhere));
    }
}
