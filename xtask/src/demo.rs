//! `cargo xtask demo`: stub replaced below.
use anyhow::Result;
pub fn run() -> Result<()> {
    anyhow::bail!("not yet")
}
