//! A stand-in for X25519 in fuzz builds only: the public key is the private key itself and
//! the shared secret the two keys XORed, so both sides of a handshake agree at the cost of a
//! few instructions. Fuzzing exercises Prism's handshake handling (session tables, rotation,
//! replay, cookies, address checks), not the curve, which spent three quarters of the relay
//! target's time in scalar multiplications; ordinary builds and tests use snow's X25519.
//! Everything else of Noise (BLAKE2s, ChaCha20-Poly1305) stays real.

use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};

/// Keys of the stand-in, 32 bytes as X25519's.
const LEN: usize = 32;

/// The stand-in's public key for `private`.
pub(crate) fn public_key(private: &[u8; LEN]) -> [u8; LEN] {
    *private
}

#[derive(Default)]
struct XorDh {
    private: [u8; LEN],
}

impl Dh for XorDh {
    fn name(&self) -> &'static str {
        "25519"
    }
    fn pub_len(&self) -> usize {
        LEN
    }
    fn priv_len(&self) -> usize {
        LEN
    }
    fn set(&mut self, private: &[u8]) {
        self.private = [0; LEN];
        for (to, from) in self.private.iter_mut().zip(private) {
            *to = *from;
        }
    }
    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        rng.try_fill_bytes(&mut self.private)
    }
    fn pubkey(&self) -> &[u8] {
        &self.private
    }
    fn privkey(&self) -> &[u8] {
        &self.private
    }
    fn dh(&self, public: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        for ((o, a), b) in out.iter_mut().zip(self.private).zip(public) {
            *o = a ^ b;
        }
        Ok(())
    }
}

/// snow's own primitives, but the stand-in for the key exchange.
pub(crate) struct Resolver;

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        DefaultResolver.resolve_rng()
    }
    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        matches!(choice, DHChoice::Curve25519).then(|| Box::new(XorDh::default()) as Box<dyn Dh>)
    }
    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }
    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        DefaultResolver.resolve_cipher(choice)
    }
}
