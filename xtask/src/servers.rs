//! The far end of the e2e tests: TCP servers on the target addresses, in the server namespace.
//!
//! They run in this process (a thread moved into the namespace), so they can report what they
//! saw, such as whether a connection ended with FIN or RST, back to the test.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};

use crate::netns::{Netns, NsTask};

/// Reads to EOF, answers with the SHA-256 of what it read, closes.
pub const SINK: u16 = 5001;
/// Reads a 16-byte header (length, seed; big-endian u64s), sends that many pattern bytes, FIN.
pub const SOURCE: u16 = 5002;
/// Echoes until EOF, then FIN; on UDP, echoes each datagram.
pub const ECHO: u16 = 5003;
/// Sends `SERVER_FIRST`, FIN, then reads to EOF and reports [`Seen::AfterFin`].
pub const CLOSES_FIRST: u16 = 5004;
/// Reads 4 bytes, then resets the connection.
pub const RESETS: u16 = 5005;
/// Reads until the connection ends and reports [`Seen::Ended`].
pub const OBSERVES: u16 = 5006;
/// A port nobody listens on.
pub const CLOSED: u16 = 5999;

/// What [`CLOSES_FIRST`] sends before its FIN.
pub const SERVER_FIRST: &[u8] = b"server speaks first, then closes\n";

/// What a server saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// After its own FIN, [`CLOSES_FIRST`] read this many bytes with this SHA-256, then EOF.
    AfterFin { bytes: u64, sha256: [u8; 32] },
    /// [`OBSERVES`]' connection ended, after this many bytes, by FIN (`reset: false`) or RST.
    Ended { bytes: u64, reset: bool },
}

/// Deterministic test data: `len` bytes from `seed` (xorshift64*).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The servers, running until dropped.
#[derive(Debug)]
pub struct Servers {
    _task: NsTask,
    seen: Arc<Mutex<mpsc::UnboundedReceiver<Seen>>>,
}

impl Servers {
    /// Starts every server on each of `addresses` inside `ns`.
    pub fn start(ns: &Netns, addresses: Vec<std::net::IpAddr>) -> Result<Self> {
        Self::start_in(ns.name(), addresses)
    }

    /// Starts every server on each of `addresses` inside the namespace named `name`.
    pub fn start_in(name: &str, addresses: Vec<std::net::IpAddr>) -> Result<Self> {
        let (seen_tx, seen_rx) = mpsc::unbounded_channel();
        let task = NsTask::start(name, "the test servers", move || async move {
            let mut listeners = Vec::new();
            let mut udp = Vec::new();
            for ip in addresses {
                let addr = SocketAddr::new(ip, ECHO);
                let socket = std::net::UdpSocket::bind(addr)
                    .with_context(|| format!("cannot bind UDP {addr}"))?;
                socket.set_nonblocking(true)?;
                udp.push(tokio::net::UdpSocket::from_std(socket)?);
                for port in [SINK, SOURCE, ECHO, CLOSES_FIRST, RESETS, OBSERVES] {
                    let addr = SocketAddr::new(ip, port);
                    let listener =
                        listen(addr).with_context(|| format!("cannot listen on {addr}"))?;
                    listeners.push((port, listener));
                }
            }
            Ok(async move {
                for (port, listener) in listeners {
                    tokio::spawn(accept_loop(port, listener, seen_tx.clone()));
                }
                for socket in udp {
                    tokio::spawn(echo_datagrams(socket));
                }
                std::future::pending::<()>().await
            })
        })?;
        Ok(Self {
            _task: task,
            seen: Arc::new(Mutex::new(seen_rx)),
        })
    }

    /// The queue of what the servers saw.
    pub fn seen(&self) -> Arc<Mutex<mpsc::UnboundedReceiver<Seen>>> {
        Arc::clone(&self.seen)
    }
}

/// A listener with a backlog deep enough for the concurrency case (tokio's `bind` uses 128,
/// which a burst of 500 connects overflows into SYN cookies and resets).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Sends every datagram back to where it came from.
async fn echo_datagrams(socket: tokio::net::UdpSocket) {
    let mut buf = vec![0u8; 65536];
    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
        let _ = socket.send_to(buf.get(..n).unwrap_or_default(), from).await;
    }
}

async fn accept_loop(port: u16, listener: TcpListener, seen: mpsc::UnboundedSender<Seen>) {
    while let Ok((stream, _)) = listener.accept().await {
        let seen = seen.clone();
        tokio::spawn(async move {
            // Errors here are the client's doing (a reset test, say); the test checks what
            // the client saw.
            let _ = serve(port, stream, seen).await;
        });
    }
}

async fn serve(port: u16, mut stream: TcpStream, seen: mpsc::UnboundedSender<Seen>) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 256 * 1024];
    match port {
        SINK => {
            let mut sha = Sha256::new();
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                sha.update(buf.get(..n).unwrap_or_default());
            }
            stream.write_all(&sha.finalize()).await?;
            stream.shutdown().await?;
        }
        SOURCE => {
            let len = stream.read_u64().await?;
            let seed = stream.read_u64().await?;
            let data = pattern(seed, usize::try_from(len)?);
            stream.write_all(&data).await?;
            stream.shutdown().await?;
            while stream.read(&mut buf).await? > 0 {}
        }
        ECHO => {
            let (mut r, mut w) = stream.split();
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await?;
        }
        CLOSES_FIRST => {
            stream.write_all(SERVER_FIRST).await?;
            stream.shutdown().await?;
            let mut sha = Sha256::new();
            let mut bytes = 0u64;
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                bytes += n as u64;
                sha.update(buf.get(..n).unwrap_or_default());
            }
            let _ = seen.send(Seen::AfterFin {
                bytes,
                sha256: sha.finalize().into(),
            });
        }
        RESETS => {
            let mut ping = [0u8; 4];
            stream.read_exact(&mut ping).await?;
            stream.set_zero_linger()?;
            drop(stream);
        }
        OBSERVES => {
            let mut bytes = 0u64;
            let reset = loop {
                match stream.read(&mut buf).await {
                    Ok(0) => break false,
                    Ok(n) => bytes += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                    Err(e) => return Err(e.into()),
                }
            };
            let _ = seen.send(Seen::Ended { bytes, reset });
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_seed_dependent() {
        assert_eq!(pattern(7, 1000), pattern(7, 1000));
        assert_ne!(pattern(7, 1000), pattern(8, 1000));
        assert_eq!(pattern(7, 1003).get(..1000), Some(&pattern(7, 1000)[..]));
    }
}
