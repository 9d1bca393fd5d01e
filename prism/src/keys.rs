//! `prism genkey` and `prism pubkey`: key pairs for relay identities, as `wg genkey` and
//! `wg pubkey` make them (base64, one per line), so they pipe the same way:
//! `prism genkey | tee client.key | prism pubkey > client.pub`.

use std::io::{Read, Write};

use anyhow::{Context, Result};
use prism_engine::PrivateKey;

/// Writes a new private key.
pub(crate) fn genkey() -> Result<()> {
    let key = PrivateKey::generate().context("the system has no randomness to give")?;
    writeln!(std::io::stdout(), "{}", key.to_base64()).context("cannot write the key")
}

/// Reads a private key from standard input and writes its public key.
pub(crate) fn pubkey() -> Result<()> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("cannot read a private key from standard input")?;
    let key: PrivateKey = text.parse().map_err(|_| {
        anyhow::anyhow!(
            "standard input does not hold a private key: expected 32 bytes in base64 (44 \
             characters), as `prism genkey` writes"
        )
    })?;
    writeln!(std::io::stdout(), "{}", key.public_key()).context("cannot write the key")
}
