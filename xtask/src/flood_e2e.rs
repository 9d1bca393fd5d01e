//! The SYN flood (`cargo xtask e2e flood`): spoofed SYNs from a raw socket in the client
//! namespace, as fast as it sends them, to random addresses and ports routed into Prism's TUN,
//! while a real client opens 1,000 connections and moves bytes through each. For both
//! handshakes: at least 99% of the real connections carry their bytes intact, the SYNs answered
//! with cookies are counted, and Prism's peak RSS stays under a bound derived from its caps.
//!
//! The spoofed sources are in 198.18.0.0/15 (RFC 2544's benchmarking range), which the client
//! namespace has no route to: Prism's answers to them go nowhere. In consistent mode each
//! spoofed SYN below the pending cap asks for an upstream connect, to addresses the server
//! namespace cannot reach (they hang, or fail with a rate-limited ICMP error); beyond the caps
//! SYNs are answered with cookies, which cost no state.
//!
//! And without a flood: with a half-open cap of one, held by one spoofed SYN, a real client's
//! connection opened through a cookie has timestamps, SACK and window scaling in the client
//! kernel's own view (`ss`), and carries 4 MiB each way intact.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures_util::StreamExt;
use nix::sys::signal::Signal;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::e2e::{Report, counter, in_netns};
use crate::netns::{self, Process, status_kib};
use crate::servers::{self, pattern};
use crate::topology::{self, Topology};

/// Spoofed SYNs sent at least; the flood goes on until the real client is done.
const FLOOD: u64 = 200_000;
/// Real connections, and how many at a time.
const REAL: usize = 1_000;
const REAL_AT_ONCE: usize = 50;
/// Bytes each real connection sends and gets back.
const MESSAGE: usize = 16 * 1024;
/// How long one real connection may take: the kernel retransmits a SYN the flood crowded
/// out of the TUN's queue after 1, 3, 7, 15 and 31 s, and backs off its data retransmissions
/// likewise. With SACK and timestamps kept through the cookie the slowest takes seconds; when
/// cookie connections had neither, a few went past a minute (ARCHITECTURE, SYN cookies). Two
/// minutes is Linux's largest retransmission interval and how long Prism waits on a silent
/// client; a connection that hangs still fails.
const PATIENCE: Duration = Duration::from_secs(120);
/// The caps Prism runs with (its defaults).
const MAX_HALF_OPEN: u64 = 4096;
const MAX_PENDING: u64 = 1024;
/// The RSS bound: the idle process, plus what each half-open connection and each pending
/// handshake may hold at the caps, plus what the allocator keeps. Beyond the caps SYNs are
/// answered with cookies, which keep nothing.
///
/// A half-open connection (its socket with two 1 KiB buffers, its state and table entries)
/// takes about 5 KB: 4,096 of them added 21 MiB to the idle process with jemalloc told to
/// return freed pages at once. Twice that is allowed. A pending handshake also holds the task
/// connecting upstream.
const PER_HANDSHAKE_KIB: u64 = 10;
const PER_PENDING_KIB: u64 = 10;
/// What does not scale with a cap, mostly jemalloc's: it keeps freed pages about 10 s before
/// returning them, and a flood churns through 150,000 cookie answers and queued packets a
/// second (its 40-byte SYNs in 256 KiB read arenas) and 4,096 expiring half-open connections
/// every 30 s. Measured at 40-50 MiB; the queues themselves hold 4,096 packets each way.
const FIXED_KIB: u64 = 64 * 1024;

pub(crate) fn run(topo: &Topology, prism: &Path, logs: &Path, report: &mut Report) {
    report.record(
        "flood cookie",
        "a connection opened through a SYN cookie keeps the client's timestamps, SACK and window \
         scaling",
        cookie_options(topo, prism, logs),
    );
    for mode in ["fast", "consistent"] {
        report.record(
            &format!("flood {mode}"),
            "spoofed SYNs: 99% of 1,000 real connections carry their bytes, RSS bounded",
            flood(topo, prism, logs, mode),
        );
    }
}

fn flood(topo: &Topology, prism: &Path, logs: &Path, mode: &str) -> Result<String> {
    let stats = logs.join(format!("stats-flood-{mode}.json"));
    let mut args = topo.prism_args("direct");
    args.extend(
        [
            "--fwmark",
            topology::FWMARK,
            "--handshake",
            mode,
            "--stats-file",
            &stats.display().to_string(),
        ]
        .map(str::to_owned),
    );
    let mut process =
        topo.start_prism(prism, &args, &logs.join(format!("prism-flood-{mode}.log")))?;
    let pid = process.pid();
    let idle_kib = status_kib(pid, "VmRSS")?;

    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let (ns, stop) = (topo.client.name().to_owned(), Arc::clone(&stop));
        std::thread::spawn(move || -> Result<(u64, Duration)> {
            netns::enter(&ns)?;
            send_syns(&stop)
        })
    };
    // Let the flood fill the caps before the real client starts.
    std::thread::sleep(Duration::from_millis(500));
    let real = in_netns(topo.client.name(), async || Ok(real_client().await));
    stop.store(true, Ordering::Relaxed);
    let (sent, flooded_for) = flooder
        .join()
        .map_err(|_| anyhow::anyhow!("the flooding thread panicked"))??;
    let Real {
        succeeded,
        failures,
        took,
        slowest,
    } = real?;
    let peak_kib = status_kib(pid, "VmHWM")?;
    let drops = topo.tun_drops().unwrap_or(0);

    let counters = stop_prism(&mut process, &stats)?;
    let cookies = counter(&counters, "syn_cookies_sent")?;
    let rebuilt = counter(&counters, "syn_cookies_accepted")?;
    let opened = counter(&counters, "connections_opened")?;
    let cancelled = counter(&counters, "upstream_cancelled")?;

    let bound_kib = idle_kib
        + FIXED_KIB
        + MAX_HALF_OPEN * PER_HANDSHAKE_KIB
        + if mode == "consistent" {
            MAX_PENDING * PER_PENDING_KIB
        } else {
            0
        };
    let failed = if failures.is_empty() {
        String::new()
    } else {
        format!(" (failures: {failures:?})")
    };
    let summary = format!(
        "{succeeded} of {REAL} real connections{failed} in {took:.1} s, the slowest {slowest:.1} \
         s; {sent} SYNs in {:.1} s \
         ({:.0}/s), {drops} dropped at the TUN's queue; {cookies} answered with cookies, {rebuilt} \
         connections rebuilt from one, {opened} opened in all, {cancelled} upstream connects \
         cancelled; RSS {} MiB idle, {} MiB peak, bound \
         {} MiB",
        flooded_for.as_secs_f64(),
        sent as f64 / flooded_for.as_secs_f64().max(1e-9),
        idle_kib / 1024,
        peak_kib / 1024,
        bound_kib / 1024,
    );
    ensure!(succeeded * 100 >= REAL * 99, "{summary}");
    ensure!(sent >= FLOOD, "the flood was too short: {summary}");
    ensure!(cookies > 0, "the flood never reached a cap: {summary}");
    ensure!(peak_kib <= bound_kib, "RSS above the bound: {summary}");
    Ok(format!(" ({summary})"))
}

/// Bytes the cookie connection sends each way: far beyond an unscaled 64 KiB window.
const COOKIE_MESSAGE: usize = 4 << 20;

fn cookie_options(topo: &Topology, prism: &Path, logs: &Path) -> Result<String> {
    let stats = logs.join("stats-flood-cookie.json");
    let mut args = topo.prism_args("direct");
    args.extend(
        [
            "--fwmark",
            topology::FWMARK,
            "--max-half-open",
            "1",
            "--stats-file",
            &stats.display().to_string(),
        ]
        .map(str::to_owned),
    );
    let mut process = topo.start_prism(prism, &args, &logs.join("prism-flood-cookie.log"))?;
    // One spoofed SYN fills the cap for 30 s: Prism's SYN|ACK goes nowhere.
    in_netns(topo.client.name(), async || {
        let (source, destination) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(10, 200, 9, 9));
        let syn = syn(source, destination, 40_000, 80, 1);
        raw_socket()?
            .send_to(&syn, &SockAddr::from(SocketAddrV4::new(destination, 0)))
            .context("cannot send the spoofed SYN")?;
        Ok(())
    })?;
    std::thread::sleep(Duration::from_millis(500));

    let seen = in_netns(topo.client.name(), async move || {
        let addr = SocketAddr::new(topology::TARGET_V4, servers::ECHO);
        let stream = TcpStream::connect(addr).await?;
        let port = stream.local_addr()?.port();
        let (mut from, mut to) = stream.into_split();
        let message = pattern(11, COOKIE_MESSAGE);
        let writer = tokio::spawn(async move {
            to.write_all(&message).await?;
            // The client's view, mid-transfer (`ss` runs in this thread's namespace).
            let seen = netns::run(
                "ss",
                // This ss (iproute2 6.1) prints `ts` and `sack` only with `-e`.
                &[
                    "-tineH",
                    "state",
                    "established",
                    &format!("sport = :{port}"),
                ],
            )?;
            to.shutdown().await?;
            anyhow::Ok(seen)
        });
        let mut echoed = Vec::with_capacity(COOKIE_MESSAGE);
        from.read_to_end(&mut echoed).await?;
        let seen = writer.await??;
        ensure!(
            echoed == pattern(11, COOKIE_MESSAGE),
            "the echo differs ({} of {COOKIE_MESSAGE} bytes)",
            echoed.len()
        );
        anyhow::Ok(seen)
    });
    let counters = stop_prism(&mut process, &stats)?;
    let seen = seen?;
    let rebuilt = counter(&counters, "syn_cookies_accepted")?;
    ensure!(
        rebuilt == 1,
        "{rebuilt} connections rebuilt from a cookie, not the one"
    );
    let words: Vec<&str> = seen.split_whitespace().collect();
    let wscale = words
        .iter()
        .find_map(|w| w.strip_prefix("wscale:"))
        .with_context(|| format!("no window scaling: {seen}"))?;
    // The scale the peer (Prism) applies, then the client's own.
    let prisms = wscale
        .split_once(',')
        .and_then(|(prisms, _)| prisms.parse::<u8>().ok())
        .with_context(|| format!("ss shows no window scale of Prism's: {seen}"))?;
    // Prism's default 256 KiB receive buffer takes a shift of 3.
    ensure!(
        prisms == 3,
        "Prism's window scale is {prisms}, not 3: {seen}"
    );
    ensure!(words.contains(&"ts"), "no timestamps: {seen}");
    ensure!(words.contains(&"sack"), "no SACK: {seen}");
    Ok(format!(
        " (ss: ts sack wscale:{wscale}; {COOKIE_MESSAGE} bytes echoed)"
    ))
}

/// Stops prism with SIGINT; it must exit cleanly. Returns the stats it wrote.
fn stop_prism(process: &mut Process, stats: &Path) -> Result<String> {
    process.stop_cleanly(Signal::SIGINT)?;
    std::fs::read_to_string(stats).context("prism wrote no stats file")
}

/// A raw IPv4 socket whose packets carry their own IP header (IPPROTO_RAW: IP_HDRINCL).
fn raw_socket() -> Result<Socket> {
    Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))
        .context("cannot open a raw socket")
}

/// How the real client fared.
struct Real {
    succeeded: usize,
    /// The first few failures.
    failures: Vec<String>,
    /// Seconds for all of them, and for the slowest successful one.
    took: f64,
    slowest: f64,
}

/// Opens [`REAL`] connections to the echo server, [`REAL_AT_ONCE`] at a time, each sending its
/// own message and checking the echo.
async fn real_client() -> Real {
    let started = Instant::now();
    let addr = SocketAddr::new(topology::TARGET_V4, servers::ECHO);
    let outcomes: Vec<Result<f64>> = futures_util::stream::iter(0..REAL)
        .map(|i| async move {
            let began = Instant::now();
            tokio::time::timeout(PATIENCE, echo(addr, i))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no echo within {PATIENCE:?}")))
                .map(|()| began.elapsed().as_secs_f64())
                .with_context(|| format!("connection {i}"))
        })
        .buffer_unordered(REAL_AT_ONCE)
        .collect()
        .await;
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    Real {
        succeeded: REAL - failures.len(),
        failures: failures.into_iter().take(5).collect(),
        took: started.elapsed().as_secs_f64(),
        slowest: outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok())
            .fold(0.0, |a: f64, &b| a.max(b)),
    }
}

async fn echo(addr: SocketAddr, i: usize) -> Result<()> {
    let message = pattern(i as u64 + 7, MESSAGE);
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(&message).await?;
    stream.shutdown().await?;
    let mut echoed = Vec::with_capacity(MESSAGE);
    stream.read_to_end(&mut echoed).await?;
    ensure!(echoed == message, "the echo differs");
    Ok(())
}

/// Sends spoofed SYNs until `stop` is set, and at least [`FLOOD`]. Returns how many were sent
/// and for how long.
fn send_syns(stop: &AtomicBool) -> Result<(u64, Duration)> {
    let socket = raw_socket()?;
    let mut rng = Rng::seeded();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut failed_in_a_row = 0;
    while sent < FLOOD || !stop.load(Ordering::Relaxed) {
        let r = rng.next();
        let source = Ipv4Addr::from(0xc612_0000 | (r as u32 & 0x0001_ffff)); // 198.18.0.0/15
        let destination = Ipv4Addr::new(10, 200, (r >> 20) as u8, (r >> 28) as u8);
        let ports = rng.next();
        let (sport, dport) = (
            1024 + (ports as u16) % 64_000,
            1 + ((ports >> 16) as u16) % 65_535,
        );
        let syn = syn(source, destination, sport, dport, (ports >> 32) as u32);
        let to = SockAddr::from(SocketAddrV4::new(destination, 0));
        // The TUN's queue drops what Prism has no time for; the send itself rarely fails.
        match socket.send_to(&syn, &to) {
            Ok(_) => {
                sent += 1;
                failed_in_a_row = 0;
            }
            Err(error) => {
                failed_in_a_row += 1;
                ensure!(
                    failed_in_a_row < 10_000,
                    "the raw socket cannot send: {error}"
                );
            }
        }
    }
    Ok((sent, started.elapsed()))
}

/// An IPv4 TCP SYN. The kernel fills in the IP header's checksum (IP_HDRINCL does).
fn syn(source: Ipv4Addr, destination: Ipv4Addr, sport: u16, dport: u16, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&source.octets());
    p[16..20].copy_from_slice(&destination.octets());
    let tcp = 20;
    p[tcp..tcp + 2].copy_from_slice(&sport.to_be_bytes());
    p[tcp + 2..tcp + 4].copy_from_slice(&dport.to_be_bytes());
    p[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
    p[tcp + 12] = 5 << 4;
    p[tcp + 13] = 0x02; // SYN
    p[tcp + 14..tcp + 16].copy_from_slice(&64_240u16.to_be_bytes());
    // The TCP checksum over the pseudo-header (addresses, protocol, length) and the segment.
    let mut sum: u32 = 6 + 20;
    for pair in p[12..20].chunks(2).chain(p[tcp..].chunks(2)) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[tcp + 16..tcp + 18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p
}

/// xorshift64: fast, and good enough to scatter addresses and ports.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self(nanos | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
