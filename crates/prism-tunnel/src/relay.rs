//! [`relay`]: bytes both ways between a client stream and an upstream, with half-close and
//! resets carried across.

use std::io;

use prism_stack::Stream;

use crate::Upstream;

/// Copies bytes both ways until both directions have ended. End-of-file on one side becomes a
/// FIN (shutdown) on the other, and the other direction goes on. A reset or error on either
/// side resets both: the client gets a TCP RST, the upstream is closed abruptly. Returns the
/// bytes moved (client to upstream, upstream to client).
pub async fn relay<U: Upstream>(mut stream: Stream, mut upstream: U) -> io::Result<(u64, u64)> {
    match tokio::io::copy_bidirectional(&mut stream, &mut upstream).await {
        Ok(moved) => Ok(moved),
        Err(error) => {
            upstream.reset();
            stream.abort();
            Err(error)
        }
    }
}
