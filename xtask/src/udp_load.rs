//! A UDP load generator for the relay's throughput: iperf3 3.12 sends one datagram per system
//! call and tops out near 700 Mbit/s on the 2-core development machine with no VPN at all, so
//! it measured itself, not the tunnels. This one sends as QUIC stacks do, a batch of equal
//! datagrams per `sendmsg` with UDP GSO, and its sink reads with GRO: the kernel, and any
//! tunnel whose TUN takes UDP offload, see them as they would see a fast real sender's.
//!
//! Every datagram is `DATAGRAM` bytes, so the sink counts datagrams by bytes.

use std::io::IoSlice;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, setsockopt, sockopt};

use crate::netns::Netns;

/// Bytes of UDP payload in each datagram (as iperf3's `-l 1200` in the bench before).
pub const DATAGRAM: usize = 1200;
/// Datagrams per `sendmsg`: as many as fit 64 KB.
const PER_SEND: usize = 65_000 / DATAGRAM;
/// Socket buffers asked for on both ends (the kernel caps them at its `*mem_max`).
const BUFFER: usize = 8 << 20;

/// Counts what reaches `addr` in namespace `ns` until dropped.
pub struct Sink {
    datagrams: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Sink {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Sink> {
        let (datagrams, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let name = ns.name().to_owned();
        let thread = std::thread::spawn({
            let (datagrams, stop) = (Arc::clone(&datagrams), Arc::clone(&stop));
            move || -> Result<()> {
                let socket = (|| {
                    crate::netns::enter(&name)?;
                    let socket = UdpSocket::bind(addr)?;
                    setsockopt(&socket, sockopt::RcvBuf, &BUFFER)?;
                    setsockopt(&socket, sockopt::UdpGroSegment, &true)?;
                    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
                    Ok::<_, anyhow::Error>(socket)
                })();
                let socket = match socket {
                    Ok(socket) => {
                        let _ = ready_tx.send(Ok(()));
                        socket
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                        return Ok(());
                    }
                };
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    // GRO may join several datagrams in one read; each is DATAGRAM bytes.
                    if let Ok(n) = socket.recv(&mut buf) {
                        datagrams.fetch_add(n.div_ceil(DATAGRAM) as u64, Ordering::Relaxed);
                    }
                }
                Ok(())
            }
        });
        ready_rx
            .recv()
            .context("the UDP sink's thread ended")?
            .context("starting the UDP sink")?;
        Ok(Sink {
            datagrams,
            stop,
            thread: Some(thread),
        })
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.datagrams.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends datagrams from namespace `ns` to `to` at `mbit` (of UDP payload) for `time`, paced in
/// batches; the number sent. A send the kernel refuses ends it with an error, except a full
/// buffer, which only waits.
pub fn send(ns: &Netns, to: SocketAddr, mbit: f64, time: Duration) -> Result<u64> {
    let name = ns.name().to_owned();
    std::thread::spawn(move || -> Result<u64> {
        crate::netns::enter(&name)?;
        let local: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let socket = UdpSocket::bind(local)?;
        setsockopt(&socket, sockopt::SndBuf, &BUFFER)?;
        socket.connect(to)?;
        let batch = vec![0x5au8; PER_SEND * DATAGRAM];
        let segment = DATAGRAM as u16;
        let bytes_per_second = mbit * 1e6 / 8.0;
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < time {
            let due = (started.elapsed().as_secs_f64() * bytes_per_second) as u64;
            let ahead = sent * DATAGRAM as u64;
            if ahead >= due {
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            let count = (((due - ahead) as usize).div_ceil(DATAGRAM)).min(PER_SEND);
            let contents = batch.get(..count * DATAGRAM).unwrap_or_default();
            let gso = [ControlMessage::UdpGsoSegments(&segment)];
            let cmsgs: &[ControlMessage] = if count > 1 { &gso } else { &[] };
            match nix::sys::socket::sendmsg::<SockaddrStorage>(
                socket.as_raw_fd(),
                &[IoSlice::new(contents)],
                cmsgs,
                MsgFlags::empty(),
                None,
            ) {
                Ok(_) => sent += count as u64,
                Err(nix::errno::Errno::ENOBUFS | nix::errno::Errno::EAGAIN) => {
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(error) => return Err(error).context("sending UDP load"),
            }
        }
        Ok(sent)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the UDP sender panicked"))?
}

/// One run at `mbit` for `time` into `sink`: (Mbit/s of payload received, percent lost).
pub fn run(
    ns: &Netns,
    sink: &Sink,
    to: SocketAddr,
    mbit: f64,
    time: Duration,
) -> Result<(f64, f64)> {
    let before = sink.received();
    let sent = send(ns, to, mbit, time)?;
    ensure!(sent > 0, "nothing was sent");
    // Stragglers still in queues.
    std::thread::sleep(Duration::from_millis(300));
    let received = sink.received() - before;
    let lost = 100.0 * (1.0 - received as f64 / sent as f64);
    let mbit = received as f64 * DATAGRAM as f64 * 8.0 / time.as_secs_f64() / 1e6;
    Ok((mbit, lost.max(0.0)))
}
