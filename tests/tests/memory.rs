//! Memory per connection at rest, in process: 100,000 connections (or
//! `PRISM_MEMORY_CONNECTIONS`) through the engine to an in-memory upstream that holds each one
//! open and idle, so no file-descriptor limit applies. Ignored by default (it takes a while
//! and measures rather than checks); run it with
//!
//! ```text
//! cargo test --release -p prism-tests --test memory -- --ignored --nocapture
//! ```
//!
//! and write the figure down in docs/bench/memory.md. With `--features dhat-heap` it also
//! profiles the heap with dhat (slower, and dhat's bookkeeping is in the RSS) and prints what
//! is live per connection once all are open; `dhat-heap.json` has the whole profile, by
//! allocation site.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prism_engine::{
    ConnectError, Connecting, Connector, Engine, Framing, Source, StackConfig, Target, Upstream,
};
use prism_tests::{tcp_ack, tcp_v4};
use smoltcp::wire::{Ipv4Packet, TcpControl, TcpPacket};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[cfg(feature = "dhat-heap")]
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

/// An upstream that takes every byte and never sends one: a connection at rest.
struct Idle;

impl AsyncRead for Idle {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for Idle {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Upstream for Idle {
    /// Never readable, so the relay waits without holding a read buffer, as it does for a
    /// socket.
    fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

struct IdleConnector;

impl Connector for IdleConnector {
    fn connect<'a>(&'a self, _: &'a Target) -> Connecting<'a> {
        Box::pin(async { Ok::<Box<dyn Upstream>, ConnectError>(Box::new(Idle)) })
    }
}

/// This process's resident set, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

fn client(i: u32) -> SocketAddrV4 {
    // 60,000 ports per source address.
    let host = i / 60_000;
    SocketAddrV4::new(
        Ipv4Addr::new(10, 1, (host >> 8) as u8, host as u8),
        1024 + (i % 60_000) as u16,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it by hand, see the module documentation"]
async fn memory_per_connection_at_rest() {
    let count: u32 = std::env::var("PRISM_MEMORY_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    const BATCH: u32 = 1000;
    #[cfg(feature = "dhat-heap")]
    let profiler = dhat::Profiler::builder().build();
    let (source, link) = Source::queues(Framing::Plain, 8192);
    let mut config = StackConfig::default();
    // The handshakes complete in bursts of a batch; the queue holds them all.
    config.request_queue = count as usize;
    let engine = Engine::builder(source)
        .address("10.0.0.1".parse().unwrap(), 8)
        .stack(config)
        .connector(Arc::new(IdleConnector))
        .start()
        .await
        .unwrap();
    let (mut from_engine, to_engine) = link.split();
    let server = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 7), 80);
    let before = rss();
    let started = Instant::now();
    let mut batch = Vec::new();
    for first in (0..count).step_by(BATCH as usize) {
        let last = (first + BATCH).min(count);
        for i in first..last {
            to_engine
                .send(tcp_v4(
                    client(i).into(),
                    server.into(),
                    TcpControl::Syn,
                    1,
                    &[],
                ))
                .await
                .unwrap();
        }
        // Each SYN-ACK's sequence number, by the client port it answers.
        let mut isn = HashMap::new();
        while isn.len() < (last - first) as usize {
            let n = tokio::time::timeout(
                Duration::from_secs(10),
                from_engine.recv_many(&mut batch, 256),
            )
            .await
            .expect("SYN-ACKs");
            assert!(n > 0, "the engine closed its queues");
            for packet in batch.drain(..) {
                let ip = Ipv4Packet::new_checked(&packet[..]).unwrap();
                let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
                if tcp.syn() && tcp.ack() {
                    isn.insert((ip.dst_addr(), tcp.dst_port()), tcp.seq_number().0 as u32);
                }
            }
        }
        for i in first..last {
            let c = client(i);
            let their = isn[&(*c.ip(), c.port())];
            to_engine
                .send(tcp_ack(c.into(), server.into(), 2, their.wrapping_add(1)))
                .await
                .unwrap();
        }
    }
    // Every connection established and handed to its idle upstream.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stats = engine.stats().await;
        if stats.open == count as usize && stats.upstream.connected == u64::from(count) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all open: {} of {count}: {} / upstream {}",
            stats.open,
            stats.stack,
            stats.upstream
        );
        while from_engine.try_recv().is_ok() {}
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = rss();
    #[cfg(feature = "dhat-heap")]
    {
        let heap = dhat::HeapStats::get();
        println!(
            "heap: {} bytes in {} blocks live, {:.0} bytes and {:.1} blocks per connection",
            heap.curr_bytes,
            heap.curr_blocks,
            heap.curr_bytes as f64 / f64::from(count),
            heap.curr_blocks as f64 / f64::from(count),
        );
    }
    let per = (after.saturating_sub(before)) as f64 / f64::from(count);
    println!(
        "{count} connections at rest: RSS {:.1} MB before, {:.1} MB after, {:.0} bytes each ({:.1} s to open)",
        before as f64 / 1e6,
        after as f64 / 1e6,
        per,
        started.elapsed().as_secs_f64()
    );
    let stats = engine.shutdown(Duration::from_millis(100)).await;
    assert_eq!(stats.stack.connections_opened, u64::from(count));
    #[cfg(feature = "dhat-heap")]
    drop(profiler);
}
