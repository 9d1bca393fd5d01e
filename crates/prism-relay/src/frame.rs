//! Relay datagrams: authenticated and encrypted with XChaCha20-Poly1305, under keys derived
//! from the pre-shared key or, with identities, from a session's handshake (`identity`, whose
//! handshake datagrams share this header).
//!
//! ```text
//!  0        1      2 .. 17        18 .. 25          26 ..            last 16
//!  version  kind   session id     counter (BE)      ciphertext       Poly1305 tag
//! ```
//!
//! The header is authenticated as associated data. The 24-byte nonce is the session id (16
//! random bytes a client picks for each session) followed by the counter, so clients that share
//! a key never reuse a nonce; each direction has its own key (HKDF-SHA256 of the pre-shared
//! key, or the handshake's split).
//!
//! XChaCha20-Poly1305 is computed as its definition composes it: HChaCha20 of the key and the
//! nonce's first 16 bytes (RustCrypto's `chacha20`) gives a subkey for ChaCha20-Poly1305 with
//! the last 8 (ring's, BoringSSL's assembly). RustCrypto's `XChaCha20Poly1305` does the same
//! in portable Rust at a third of the speed (3.6 against 1.2 µs for a 1,200-byte datagram,
//! measured), and the relay spent half its time there; the bytes on the wire are the same
//! (a test seals with one and opens with the other).
//! Pure: the caller moves the datagrams.

use std::net::IpAddr;

use bytes::{Bytes, BytesMut};
use hkdf::Hkdf;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};
use sha2::Sha256;

/// The version this code speaks.
pub(crate) const VERSION: u8 = 1;
/// Header bytes before the ciphertext.
pub(crate) const HEADER: usize = 1 + 1 + 16 + 8;
/// Authentication tag bytes after it.
pub(crate) const TAG: usize = 16;
/// Bytes a datagram adds to what it carries.
pub const OVERHEAD: usize = HEADER + TAG;
/// Shortest pre-shared key accepted.
pub(crate) const MIN_KEY: usize = 16;

/// What a datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A client announcing its session (with a pre-shared key, and its tunnel addresses), and
    /// the server's acknowledgement.
    Hello = 1,
    /// One whole IP packet.
    Data = 2,
    /// A client's handshake initiation (identities; see `identity`).
    Initiation = 3,
    /// The server's handshake response.
    Response = 4,
    /// A server under load answering an initiation with a cookie.
    Cookie = 5,
}

/// The clear part of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// What the payload is.
    pub kind: Kind,
    /// The client session the datagram belongs to.
    pub session: [u8; 16],
    /// Per-direction, per-session sequence number; each value is used once.
    pub counter: u64,
}

impl Header {
    pub(crate) fn encode(&self) -> [u8; HEADER] {
        let mut out = [0u8; HEADER];
        out[0] = VERSION;
        out[1] = self.kind as u8;
        out[2..18].copy_from_slice(&self.session);
        out[18..26].copy_from_slice(&self.counter.to_be_bytes());
        out
    }

    /// The XChaCha20-Poly1305 nonce: the session id, then the counter.
    fn nonce(&self) -> [u8; 24] {
        let mut nonce = [0u8; 24];
        nonce[..16].copy_from_slice(&self.session);
        nonce[16..].copy_from_slice(&self.counter.to_be_bytes());
        nonce
    }
}

/// Why a datagram was refused. Each is a counted drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum FrameError {
    /// Shorter than header and tag.
    #[error("truncated datagram")]
    Truncated,
    /// Another protocol version.
    #[error("unknown version")]
    Version,
    /// An unknown kind.
    #[error("unknown kind")]
    Kind,
    /// Forged, corrupted, or sealed with another key.
    #[error("authentication failed")]
    Auth,
}

/// A pre-shared key that is too short to be one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the relay key must be at least {MIN_KEY} bytes; use 32 random bytes, for example `openssl rand -hex 32`"
)]
pub struct KeyTooShort;

/// One direction's cipher: an XChaCha20-Poly1305 key.
#[derive(Clone)]
pub struct Key {
    key: [u8; 32],
    /// The ChaCha20-Poly1305 key of the first session id used with this key: every datagram
    /// of a session shares the nonce's first 16 bytes, so their HChaCha20 is computed once
    /// per session (a key made by a handshake serves one session; a pre-shared one serves
    /// every client's, and the others are derived per datagram).
    first: std::sync::OnceLock<Box<([u8; 16], LessSafeKey)>>,
}

impl Key {
    fn new(key: [u8; 32]) -> Key {
        Key {
            key,
            first: std::sync::OnceLock::new(),
        }
    }

    /// Runs `f` with the ChaCha20-Poly1305 key and nonce that XChaCha20-Poly1305 uses under
    /// `nonce`; `None` only if ring refused a 32-byte key, which it does not.
    fn with_cipher<R>(
        &self,
        nonce: &[u8; 24],
        f: impl FnOnce(&LessSafeKey, Nonce) -> R,
    ) -> Option<R> {
        let (prefix, suffix) = nonce.split_first_chunk::<16>()?;
        let mut short = [0u8; 12];
        short.get_mut(4..)?.copy_from_slice(suffix);
        let nonce = Nonce::assume_unique_for_key(short);
        let derive = || {
            let subkey = chacha20::hchacha::<chacha20::cipher::consts::U10>(
                &self.key.into(),
                &(*prefix).into(),
            );
            UnboundKey::new(&CHACHA20_POLY1305, &subkey)
                .ok()
                .map(LessSafeKey::new)
        };
        let (first, cipher) = match self.first.get() {
            Some(kept) => &**kept,
            None => {
                let cipher = derive()?;
                &**self.first.get_or_init(|| Box::new((*prefix, cipher)))
            }
        };
        if first == prefix {
            Some(f(cipher, nonce))
        } else {
            // Another session's: the key kept the first one's.
            derive().map(|cipher| f(&cipher, nonce))
        }
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Both directions' keys, derived from the pre-shared key.
#[derive(Debug, Clone)]
pub struct Keys {
    /// Client to server.
    pub to_server: Key,
    /// Server to client.
    pub to_client: Key,
}

impl Keys {
    /// Derives the keys from a pre-shared key of at least 16 bytes.
    pub fn derive(psk: &[u8]) -> Result<Keys, KeyTooShort> {
        if psk.len() < MIN_KEY {
            return Err(KeyTooShort);
        }
        let hkdf = Hkdf::<Sha256>::new(Some(b"prism relay v1"), psk);
        let key = |info: &[u8]| {
            let mut k = [0u8; 32];
            // 32 bytes is far below HKDF-SHA256's limit of 8160; expand cannot fail.
            let _ = hkdf.expand(info, &mut k);
            Key::new(k)
        };
        Ok(Keys {
            to_server: key(b"client to server"),
            to_client: key(b"server to client"),
        })
    }
}

impl Keys {
    /// The keys of one session, from a handshake's split.
    pub(crate) fn from_split(to_server: [u8; 32], to_client: [u8; 32]) -> Keys {
        Keys {
            to_server: Key::new(to_server),
            to_client: Key::new(to_client),
        }
    }
}

/// The cipher refused to seal a payload (it does only beyond 256 GiB): the datagram is not
/// sent, rather than sent with a tag that authenticates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the relay could not seal a datagram")]
pub(crate) struct SealFailed;

/// Seals `payload` into a datagram.
#[cfg(any(test, fuzzing))]
pub(crate) fn seal(key: &Key, header: &Header, payload: &[u8]) -> Result<Vec<u8>, SealFailed> {
    let mut datagram = Vec::with_capacity(OVERHEAD + payload.len());
    seal_into(key, header, payload, &mut datagram)?;
    Ok(datagram)
}

/// Seals `payload` into a datagram appended to `out` (a batch's buffer); on failure `out` is
/// as it was.
pub(crate) fn seal_into(
    key: &Key,
    header: &Header,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), SealFailed> {
    let aad = header.encode();
    let start = out.len();
    out.extend_from_slice(&aad);
    out.extend_from_slice(payload);
    let body = out.get_mut(start + HEADER..).unwrap_or_default();
    let sealed = key
        .with_cipher(&header.nonce(), |cipher, nonce| {
            cipher
                .seal_in_place_separate_tag(nonce, Aad::from(&aad), body)
                .ok()
        })
        .flatten();
    match sealed {
        Some(tag) => {
            out.extend_from_slice(tag.as_ref());
            Ok(())
        }
        None => {
            out.truncate(start);
            Err(SealFailed)
        }
    }
}

/// Opens a datagram in place; the payload comes back as a slice of the same buffer.
pub(crate) fn open(key: &Key, datagram: BytesMut) -> Result<(Header, Bytes), FrameError> {
    open_behind(key, datagram, &[])
}

/// Opens a datagram in place, as [`open`], and writes `prefix` (at most [`HEADER`] bytes) into
/// the clear header's room just before the payload, which comes back behind it: how a packet
/// gets its link's framing without a copy.
pub(crate) fn open_behind(
    key: &Key,
    mut datagram: BytesMut,
    prefix: &[u8],
) -> Result<(Header, Bytes), FrameError> {
    let start = HEADER
        .checked_sub(prefix.len())
        .ok_or(FrameError::Truncated)?;
    if datagram.len() < OVERHEAD {
        return Err(FrameError::Truncated);
    }
    let header = parse_header(&datagram)?;
    let aad: [u8; HEADER] = header.encode();
    let end = datagram.len() - TAG;
    let tag =
        Tag::try_from(datagram.get(end..).unwrap_or_default()).map_err(|_| FrameError::Auth)?;
    let body = datagram.get_mut(HEADER..end).unwrap_or_default();
    key.with_cipher(&header.nonce(), |cipher, nonce| {
        cipher
            .open_in_place_separate_tag(nonce, Aad::from(&aad), tag, body, 0..)
            .map(|_| ())
    })
    .ok_or(FrameError::Auth)?
    .map_err(|_| FrameError::Auth)?;
    // `start..HEADER` is as long as `prefix`, inside a datagram of at least `OVERHEAD` bytes.
    if let Some(room) = datagram.get_mut(start..HEADER) {
        room.copy_from_slice(prefix);
    }
    Ok((header, datagram.freeze().slice(start..end)))
}

/// The clear header of a datagram, unauthenticated.
pub(crate) fn peek(datagram: &[u8]) -> Result<Header, FrameError> {
    if datagram.len() < HEADER {
        return Err(FrameError::Truncated);
    }
    parse_header(datagram)
}

fn parse_header(datagram: &[u8]) -> Result<Header, FrameError> {
    let get = |range: std::ops::Range<usize>| datagram.get(range).ok_or(FrameError::Truncated);
    if get(0..1)? != [VERSION] {
        return Err(FrameError::Version);
    }
    let kind = match get(1..2)? {
        [1] => Kind::Hello,
        [2] => Kind::Data,
        [3] => Kind::Initiation,
        [4] => Kind::Response,
        [5] => Kind::Cookie,
        _ => return Err(FrameError::Kind),
    };
    let mut session = [0u8; 16];
    session.copy_from_slice(get(2..18)?);
    let mut counter = [0u8; 8];
    counter.copy_from_slice(get(18..26)?);
    Ok(Header {
        kind,
        session,
        counter: u64::from_be_bytes(counter),
    })
}

/// A hello's payload: the client's tunnel addresses.
pub(crate) fn encode_addresses(addresses: &[IpAddr]) -> Vec<u8> {
    let mut out = Vec::new();
    for address in addresses {
        match address {
            IpAddr::V4(a) => {
                out.push(4);
                out.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.push(6);
                out.extend_from_slice(&a.octets());
            }
        }
    }
    out
}

/// Reads a hello's payload; `None` if it is not a well-formed address list.
pub(crate) fn decode_addresses(mut bytes: &[u8]) -> Option<Vec<IpAddr>> {
    let mut out = Vec::new();
    while let Some((&family, rest)) = bytes.split_first() {
        let (address, rest): (IpAddr, &[u8]) = match family {
            4 => {
                let octets: [u8; 4] = rest.get(..4)?.try_into().ok()?;
                (octets.into(), rest.get(4..)?)
            }
            6 => {
                let octets: [u8; 16] = rest.get(..16)?.try_into().ok()?;
                (octets.into(), rest.get(16..)?)
            }
            _ => return None,
        };
        out.push(address);
        bytes = rest;
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::derive(b"a pre-shared key of enough bytes").unwrap()
    }

    fn header(counter: u64) -> Header {
        Header {
            kind: Kind::Data,
            session: [7; 16],
            counter,
        }
    }

    #[test]
    fn a_sealed_packet_opens_to_itself() {
        let k = keys();
        let packet = b"\x45\x00 an IP packet".to_vec();
        let datagram = seal(&k.to_server, &header(42), &packet).unwrap();
        assert_eq!(datagram.len(), packet.len() + OVERHEAD);
        let (h, payload) = open(&k.to_server, BytesMut::from(&datagram[..])).unwrap();
        assert_eq!(h, header(42));
        assert_eq!(&payload[..], &packet[..]);
    }

    #[test]
    fn a_packet_opens_behind_a_prefix_written_into_the_header_room() {
        let k = keys();
        let packet = b"\x45\x00 an IP packet".to_vec();
        let datagram = seal(&k.to_server, &header(42), &packet).unwrap();
        let prefix = [0xaa; 10];
        let (h, framed) =
            open_behind(&k.to_server, BytesMut::from(&datagram[..]), &prefix).unwrap();
        assert_eq!(h, header(42));
        assert_eq!(framed[..10], prefix);
        assert_eq!(&framed[10..], &packet[..]);
        // The whole header's room, and no more.
        let (_, framed) =
            open_behind(&k.to_server, BytesMut::from(&datagram[..]), &[1; HEADER]).unwrap();
        assert_eq!(framed.len(), HEADER + packet.len());
        assert!(
            open_behind(
                &k.to_server,
                BytesMut::from(&datagram[..]),
                &[1; HEADER + 1]
            )
            .is_err()
        );
    }

    /// The datagrams are XChaCha20-Poly1305 as RustCrypto's `XChaCha20Poly1305` makes it (the
    /// cipher before this one, and the reference): a peer of either build reads the other's.
    /// Under the session the key served first (its subkey kept) and under others (derived
    /// each time) alike.
    #[test]
    fn the_cipher_is_xchacha20_poly1305_as_rustcrypto_computes_it() {
        use chacha20poly1305::aead::{AeadInPlace, KeyInit};
        use chacha20poly1305::{XChaCha20Poly1305, XNonce};
        let raw = [0x42u8; 32];
        let (ours, reference) = (Key::new(raw), XChaCha20Poly1305::new(&raw.into()));
        let lens = [0usize, 1, 63, 64, 65, 1200, 1500];
        for (session, len) in [[7u8; 16], [8; 16]]
            .into_iter()
            .flat_map(|s| lens.map(|l| (s, l)))
        {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let h = Header {
                session,
                ..header(len as u64 + 1)
            };
            let nonce = XNonce::from(h.nonce());
            let aad = h.encode();

            let datagram = seal(&ours, &h, &payload).unwrap();
            let (body, tag) = datagram[HEADER..].split_at(len);
            let mut opened = body.to_vec();
            reference
                .decrypt_in_place_detached(&nonce, &aad, &mut opened, tag.into())
                .unwrap();
            assert_eq!(opened, payload, "len {len}");

            let mut theirs = payload.clone();
            let tag = reference
                .encrypt_in_place_detached(&nonce, &aad, &mut theirs)
                .unwrap();
            let mut datagram = aad.to_vec();
            datagram.extend_from_slice(&theirs);
            datagram.extend_from_slice(&tag);
            let (_, opened) = open(&ours, BytesMut::from(&datagram[..])).unwrap();
            assert_eq!(&opened[..], &payload[..], "len {len}");
        }
    }

    #[test]
    fn the_wrong_key_direction_or_session_fails_authentication() {
        let k = keys();
        let datagram = seal(&k.to_server, &header(1), b"payload").unwrap();
        let other = Keys::derive(b"another pre-shared key entirely").unwrap();
        for key in [&other.to_server, &k.to_client] {
            assert_eq!(
                open(key, BytesMut::from(&datagram[..])).unwrap_err(),
                FrameError::Auth
            );
        }
    }

    #[test]
    fn every_flipped_bit_and_every_truncation_is_refused() {
        let k = keys();
        let datagram = seal(&k.to_server, &header(9), b"some packet bytes").unwrap();
        for i in 0..datagram.len() {
            for bit in 0..8 {
                let mut forged = datagram.clone();
                forged[i] ^= 1 << bit;
                assert!(
                    open(&k.to_server, BytesMut::from(&forged[..])).is_err(),
                    "byte {i} bit {bit}"
                );
            }
        }
        for len in 0..datagram.len() {
            assert!(
                open(&k.to_server, BytesMut::from(&datagram[..len])).is_err(),
                "length {len}"
            );
        }
    }

    #[test]
    fn short_keys_are_refused() {
        assert_eq!(Keys::derive(b"short").unwrap_err(), KeyTooShort);
    }

    #[test]
    fn address_lists_round_trip_and_junk_is_refused() {
        let addresses: Vec<IpAddr> = vec!["10.99.0.1".parse().unwrap(), "fd99::1".parse().unwrap()];
        assert_eq!(
            decode_addresses(&encode_addresses(&addresses)),
            Some(addresses)
        );
        assert_eq!(decode_addresses(&[]), None);
        assert_eq!(decode_addresses(&[4, 1, 2]), None);
        assert_eq!(decode_addresses(&[5, 1, 2, 3, 4]), None);
    }
}
