//! A link that adds latency: a TCP forwarder in front of a real server that delivers
//! everything the server sends `delay` late (the kernel here has no netem). Put in front of
//! dante it makes a SOCKS5 proxy whose CONNECT answers arrive at least `delay` late, which is
//! what the consistent handshake's e2e measures against.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::netns::{Netns, NsTask};

/// Listens on `listen` inside `ns` and forwards each connection to `server`, delaying the
/// server's bytes by `delay`; the link runs until the returned task is dropped.
pub fn start(
    ns: &Netns,
    listen: SocketAddr,
    server: SocketAddr,
    delay: Duration,
) -> Result<NsTask> {
    NsTask::start(ns.name(), "the delay link", move || async move {
        let listener = TcpListener::bind(listen).await?;
        Ok(accept_loop(listener, server, delay))
    })
}

async fn accept_loop(listener: TcpListener, server: SocketAddr, delay: Duration) {
    while let Ok((client, _)) = listener.accept().await {
        tokio::spawn(async move {
            if let Ok(upstream) = TcpStream::connect(server).await {
                let _ = forward(client, upstream, delay).await;
            }
        });
    }
}

async fn forward(client: TcpStream, upstream: TcpStream, delay: Duration) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = upstream.into_split();
    let onward = async move {
        tokio::io::copy(&mut client_read, &mut server_write).await?;
        server_write.shutdown().await
    };
    // Server to client: each chunk is stamped when read and written `delay` later, in order.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    let read_back = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = server_read.read(&mut buf).await?;
            let chunk = Bytes::copy_from_slice(&buf[..n]);
            if tx.send((Instant::now() + delay, chunk)).is_err() || n == 0 {
                return Ok::<(), std::io::Error>(());
            }
        }
    };
    let write_back = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if chunk.is_empty() {
                break;
            }
            client_write.write_all(&chunk).await?;
        }
        client_write.shutdown().await
    };
    let (a, b, c) = tokio::join!(onward, read_back, write_back);
    a.and(b).and(c)
}
