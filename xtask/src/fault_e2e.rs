//! Upstream faults (`cargo xtask e2e fault`): what a client sees when the far side misbehaves,
//! through `direct` and through SOCKS5, with a 2 s connect timeout. Each fault must be answered
//! (a timeout, a RST, a FIN) without anything hanging past its timeout, and a far side that
//! stops reading must close the client's window instead of growing Prism's memory.
//!
//! - Never answers: `direct` to a blackholed address (the SYN vanishes); SOCKS5 to a proxy that
//!   accepts and never says a word. Fast handshake: the client's connection is reset after the
//!   timeout. Consistent: its connect fails after the timeout.
//! - Never reads, and reads at 1 MB/s while the client tries to upload 1 GiB: the client's
//!   writes stall, Prism's RSS stays within its buffers.
//! - Resets after 1 MiB: the client's connection is reset.
//! - Dies with 500 connections open (a process killed with SIGKILL: a holder of sockets behind
//!   `direct`, microsocks behind SOCKS5): every client hears of it.
//!
//! Through SOCKS5 the middle faults go through dante, which relays them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_util::future::join_all;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::e2e::{Report, counter, in_netns};
use crate::netns::{NsTask, Process, status_kib};
use crate::topology::{self, Topology};

/// What Prism is given as its connect timeout here.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How late past the connect timeout an answer may come.
const SLACK: Duration = Duration::from_secs(3);
/// Ports of the faulty servers on the target address.
const NEVER_READS: u16 = 5101;
const SLOW: u16 = 5102;
const RESETS: u16 = 5103;
const HOLDER: u16 = 5105;
/// Target ports that take the consistent handshake (the rest are fast).
const CONSISTENT_PORT: u16 = 5198;
const FAST_PORT: u16 = 5199;
/// A silent SOCKS5 server, and a microsocks to kill, in the server namespace.
const SILENT_SOCKS: u16 = 1086;
const DOOMED_SOCKS: u16 = 1087;
/// An address the server namespace drops silently (a blackhole route).
const BLACKHOLE: Ipv4Addr = Ipv4Addr::new(10, 200, 8, 1);
/// The slow server's pace.
const SLOW_RATE: u64 = 1_000_000;
/// How long the upload against a server that reads slowly or not at all runs.
const UPLOAD_FOR: Duration = Duration::from_secs(8);
/// The connections held when the far side dies.
const HELD: usize = 500;
/// How much more than its idle RSS Prism may take while one client uploads into a stalled
/// far side: its stream queue and socket buffers (256 KiB each way, each) with allocator slack.
const STALL_RSS_KIB: u64 = 8 * 1024;

pub(crate) fn run(topo: &Topology, prism: &Path, logs: &Path, report: &mut Report) {
    if let Err(error) = suite(topo, prism, logs, report) {
        report.record("fault", "the upstream-fault suite runs", Err(error));
    }
}

fn suite(topo: &Topology, prism: &Path, logs: &Path, report: &mut Report) -> Result<()> {
    topo.server
        .ip(&format!("route add blackhole {BLACKHOLE}/32"))?;
    let read_slowly = Arc::new(AtomicU64::new(0));
    let _servers = faulty_servers(topo, Arc::clone(&read_slowly))?;
    let target = |port| SocketAddr::new(topology::TARGET_V4, port);

    // `direct`.
    let direct = ["direct", "--fwmark", topology::FWMARK];
    let mut prism_run = start(topo, prism, logs, "direct", &direct)?;
    let blackholed = |port| SocketAddr::new(IpAddr::V4(BLACKHOLE), port);
    report.record(
        "fault direct",
        "never answers (fast): the client is reset after the timeout",
        in_netns(topo.client.name(), async move || {
            reset_after_timeout(blackholed(FAST_PORT)).await
        }),
    );
    report.record(
        "fault direct",
        "never answers (consistent): the connect fails after the timeout",
        in_netns(topo.client.name(), async move || {
            connect_fails_after_timeout(blackholed(CONSISTENT_PORT)).await
        }),
    );
    stalled_cases(
        topo,
        &prism_run,
        "fault direct",
        &read_slowly,
        report,
        target,
    );
    report.record(
        "fault direct",
        &format!("dies with {HELD} connections open: every client hears of it"),
        dies(topo, &mut holder(topo, logs)?, target(HOLDER)),
    );
    report.record(
        "fault direct",
        "prism exits cleanly, upstream timeouts counted",
        stop(&mut prism_run, logs, "direct", "upstream_timed_out"),
    );

    // SOCKS5 that accepts and never answers.
    let silent = format!("socks5://{}:{SILENT_SOCKS}", topology::SERVER_V4);
    let mut prism_run = start(topo, prism, logs, "silent-socks", &[&silent])?;
    report.record(
        "fault socks5",
        "a proxy that never answers (fast): the client is reset after the timeout",
        in_netns(topo.client.name(), async move || {
            reset_after_timeout(target(FAST_PORT)).await
        }),
    );
    report.record(
        "fault socks5",
        "a proxy that never answers (consistent): the connect fails after the timeout",
        in_netns(topo.client.name(), async move || {
            connect_fails_after_timeout(target(CONSISTENT_PORT)).await
        }),
    );
    report.record(
        "fault socks5",
        "prism exits cleanly, proxy timeouts counted",
        stop(&mut prism_run, logs, "silent-socks", "upstream_timed_out"),
    );

    // dante, relaying the far side's faults.
    let dante = format!("socks5://{}:{}", topology::SERVER_V4, topology::DANTE_PORT);
    let mut prism_run = start(topo, prism, logs, "dante", &[&dante])?;
    stalled_cases(
        topo,
        &prism_run,
        "fault socks5",
        &read_slowly,
        report,
        target,
    );
    report.record(
        "fault socks5",
        "prism exits cleanly",
        stop(&mut prism_run, logs, "dante", "upstream_connected"),
    );

    // microsocks, killed.
    let mut doomed = topo.start_socks(DOOMED_SOCKS, false, &logs.join("microsocks-doomed.log"))?;
    let socks = format!("socks5://{}:{DOOMED_SOCKS}", topology::SERVER_V4);
    let mut prism_run = start(topo, prism, logs, "doomed-socks", &[&socks])?;
    report.record(
        "fault socks5",
        &format!("the proxy dies with {HELD} connections open: every client hears of it"),
        dies(topo, &mut doomed, target(crate::servers::ECHO)),
    );
    report.record(
        "fault socks5",
        "prism exits cleanly",
        stop(&mut prism_run, logs, "doomed-socks", "upstream_connected"),
    );
    Ok(())
}

/// Starts prism with `upstream` (and its flags), a 2 s connect timeout and the consistent
/// handshake on [`CONSISTENT_PORT`].
fn start(
    topo: &Topology,
    prism: &Path,
    logs: &Path,
    name: &str,
    upstream: &[&str],
) -> Result<Process> {
    let [url, flags @ ..] = upstream else {
        bail!("no upstream given");
    };
    let mut args = topo.prism_args(url);
    args.extend(flags.iter().map(|f| f.to_string()));
    args.extend([
        "--connect-timeout".to_owned(),
        CONNECT_TIMEOUT.as_secs().to_string(),
        "--handshake-port".to_owned(),
        format!("{CONSISTENT_PORT}=consistent"),
        "--stats-file".to_owned(),
        logs.join(format!("stats-fault-{name}.json"))
            .display()
            .to_string(),
    ]);
    topo.start_prism(prism, &args, &logs.join(format!("prism-fault-{name}.log")))
}

/// Stops prism with SIGINT; its stats must show `counted` above zero.
fn stop(process: &mut Process, logs: &Path, name: &str, counted: &str) -> Result<String> {
    process.stop_cleanly(Signal::SIGINT)?;
    let stats = std::fs::read_to_string(logs.join(format!("stats-fault-{name}.json")))?;
    let n = counter(&stats, counted)?;
    ensure!(n > 0, "{counted} is 0: {stats}");
    Ok(format!(" ({counted} {n})"))
}

/// The cases where the far side stalls or resets, against the faulty servers.
fn stalled_cases(
    topo: &Topology,
    prism: &Process,
    group: &str,
    read_slowly: &Arc<AtomicU64>,
    report: &mut Report,
    target: impl Fn(u16) -> SocketAddr,
) {
    let pid = prism.pid();
    let (never, slow, resets) = (target(NEVER_READS), target(SLOW), target(RESETS));
    report.record(
        group,
        "never reads: the client's writes stall, Prism's memory stays bounded",
        in_netns(topo.client.name(), async move || {
            stall(never, pid, None).await
        }),
    );
    let read = Arc::clone(read_slowly);
    report.record(
        group,
        "reads at 1 MB/s under a 1 GiB upload: the window closes, memory bounded",
        in_netns(topo.client.name(), async move || {
            stall(slow, pid, Some(read)).await
        }),
    );
    report.record(
        group,
        "resets after 1 MiB: the client is reset",
        in_netns(topo.client.name(), async move || {
            reset_mid_stream(resets).await
        }),
    );
}

/// The fast handshake to a far side that never answers: connected at once, then reset when the
/// upstream connect times out.
async fn reset_after_timeout(addr: SocketAddr) -> Result<String> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(b"hello?").await?;
    let mut buf = [0; 16];
    let read = tokio::time::timeout(CONNECT_TIMEOUT + SLACK, stream.read(&mut buf)).await;
    let took = started.elapsed();
    match read {
        Err(_) => bail!("nothing within {:?}", CONNECT_TIMEOUT + SLACK),
        Ok(Ok(0)) => bail!("a clean close: the client would take the silence for an answer"),
        Ok(Ok(n)) => bail!("{n} bytes from nowhere"),
        Ok(Err(error)) => {
            ensure!(
                took >= CONNECT_TIMEOUT / 2,
                "reset before the timeout, in {took:?}"
            );
            Ok(format!(" ({error} after {:.1} s)", took.as_secs_f64()))
        }
    }
}

/// The consistent handshake to a far side that never answers: the client's connect fails once
/// the upstream connect times out.
async fn connect_fails_after_timeout(addr: SocketAddr) -> Result<String> {
    let started = Instant::now();
    let connect = tokio::time::timeout(CONNECT_TIMEOUT + SLACK, TcpStream::connect(addr)).await;
    let took = started.elapsed();
    match connect {
        Err(_) => bail!("the connect hung past {:?}", CONNECT_TIMEOUT + SLACK),
        Ok(Ok(_)) => bail!("connected to a far side that never answered"),
        Ok(Err(error)) => {
            ensure!(
                took >= CONNECT_TIMEOUT / 2,
                "failed before the timeout, in {took:?}"
            );
            Ok(format!(" ({error} after {:.1} s)", took.as_secs_f64()))
        }
    }
}

/// Uploads for [`UPLOAD_FOR`] (at most 1 GiB) to a far side that reads slowly or not at all:
/// the client's writes must stall once the buffers between are full, and Prism's RSS must stay
/// within [`STALL_RSS_KIB`] of where it started. `read`: what the slow server has read.
async fn stall(addr: SocketAddr, pid: u32, read: Option<Arc<AtomicU64>>) -> Result<String> {
    let before = status_kib(pid, "VmRSS")?;
    let read_before = read.as_ref().map_or(0, |r| r.load(Ordering::Relaxed));
    let mut stream = TcpStream::connect(addr).await?;
    let chunk = vec![0x5a; 64 * 1024];
    let mut written = 0u64;
    let mut written_at_half = 0;
    let mut peak = before;
    let started = Instant::now();
    while started.elapsed() < UPLOAD_FOR && written < 1 << 30 {
        match tokio::time::timeout(Duration::from_millis(200), stream.write(&chunk)).await {
            Ok(Ok(n)) => written += n as u64,
            Ok(Err(error)) => bail!("the upload failed after {written} bytes: {error}"),
            Err(_) => {} // stalled: the window is closed
        }
        if started.elapsed() < UPLOAD_FOR / 2 {
            written_at_half = written;
        }
        peak = peak.max(status_kib(pid, "VmRSS")?);
    }
    let server_read = read
        .as_ref()
        .map_or(0, |r| r.load(Ordering::Relaxed) - read_before);
    // Between the client and the far side: kernel socket buffers (a few MB each, autotuned)
    // and Prism's own queues. What the client got rid of beyond what the far side read sits
    // there; it must not keep growing.
    let in_flight = written - server_read;
    let late = written - written_at_half;
    let half = UPLOAD_FOR.as_secs_f64() / 2.0;
    ensure!(
        late as f64 <= SLOW_RATE as f64 * half * 1.5 + 1e6,
        "the client's writes did not stall: {written} bytes written, {late} in the second \
         half, the far side read {server_read}"
    );
    ensure!(
        peak - before <= STALL_RSS_KIB,
        "Prism's RSS grew from {before} KiB to {peak} KiB"
    );
    Ok(format!(
        " ({:.1} MB written, {:.1} MB read by the far side, {:.1} MB between; RSS {} -> {} \
         KiB)",
        written as f64 / 1e6,
        server_read as f64 / 1e6,
        in_flight as f64 / 1e6,
        before,
        peak
    ))
}

/// Writes until the far side resets (after it read 1 MiB): the client must see the reset.
async fn reset_mid_stream(addr: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    let chunk = vec![0xa5; 64 * 1024];
    let started = Instant::now();
    let mut written = 0u64;
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.write(&chunk).await {
                Ok(n) => written += n as u64,
                Err(error) => return error,
            }
        }
    })
    .await
    .context("no reset within 10 s")?;
    ensure!(
        outcome.kind() == std::io::ErrorKind::ConnectionReset
            || outcome.kind() == std::io::ErrorKind::BrokenPipe,
        "the upload ended with {outcome} rather than a reset"
    );
    Ok(format!(
        " ({outcome} after {:.1} MB, {:.1} s)",
        written as f64 / 1e6,
        started.elapsed().as_secs_f64()
    ))
}

/// Opens [`HELD`] connections to `addr` through Prism, kills `far_side` with SIGKILL, and
/// checks that every client hears of it (EOF or reset) within 10 s.
fn dies(topo: &Topology, far_side: &mut Process, addr: SocketAddr) -> Result<String> {
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<Result<()>>();
    let (killed_tx, killed_rx) = tokio::sync::oneshot::channel::<()>();
    let client = topo.client.name().to_owned();
    let clients = std::thread::spawn(move || {
        in_netns(&client, async move || {
            let mut streams = Vec::new();
            for _ in 0..HELD {
                match TcpStream::connect(addr).await {
                    Ok(mut stream) => {
                        stream.write_all(b"hold").await?;
                        streams.push(stream);
                    }
                    Err(error) => {
                        let _ = opened_tx.send(Err(error.into()));
                        return Ok(String::new());
                    }
                }
            }
            let _ = opened_tx.send(Ok(()));
            killed_rx.await?;
            let started = Instant::now();
            let heard = join_all(streams.into_iter().map(|mut stream| async move {
                let mut buf = [0; 64];
                loop {
                    match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await
                    {
                        Ok(Ok(0) | Err(_)) => return true,
                        Ok(Ok(_)) => {} // an echo of "hold"
                        Err(_) => return false,
                    }
                }
            }))
            .await;
            let deaf = heard.iter().filter(|h| !**h).count();
            ensure!(
                deaf == 0,
                "{deaf} of {HELD} clients heard nothing within 10 s"
            );
            Ok(format!(
                " (all {HELD} heard within {:.1} s)",
                started.elapsed().as_secs_f64()
            ))
        })
    });
    opened_rx
        .recv()
        .context("the client thread ended")?
        .context("opening the connections")?;
    // Let the last connections reach the far side before it dies.
    std::thread::sleep(Duration::from_millis(500));
    far_side.stop(Signal::SIGKILL, Duration::from_secs(5))?;
    let _ = killed_tx.send(());
    clients
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
}

/// A process in the server namespace that accepts on [`HOLDER`] and holds every connection.
fn holder(topo: &Topology, logs: &Path) -> Result<Process> {
    let mut command = topo.server.command("python3");
    command.args([
        "-c",
        &format!(
            "import socket\n\
             s = socket.socket()\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('{}', {HOLDER}))\n\
             s.listen(1024)\n\
             held = []\n\
             while True:\n    held.append(s.accept()[0])\n",
            topology::TARGET_V4
        ),
    ]);
    let process = Process::spawn("socket holder", command, Some(&logs.join("holder.log")))?;
    topology::wait_listening(&topo.server, HOLDER, 1, "the socket holder")?;
    Ok(process)
}

/// The faulty far sides, on the target address, and the silent SOCKS5 server.
fn faulty_servers(topo: &Topology, read_slowly: Arc<AtomicU64>) -> Result<NsTask> {
    let target = topology::TARGET_V4;
    let proxy: IpAddr = topology::SERVER_V4.parse()?;
    NsTask::start(
        topo.server.name(),
        "the faulty servers",
        move || async move {
            let never_reads = TcpListener::bind((target, NEVER_READS)).await?;
            let slow = TcpListener::bind((target, SLOW)).await?;
            let resets = TcpListener::bind((target, RESETS)).await?;
            let silent = TcpListener::bind((proxy, SILENT_SOCKS)).await?;
            Ok(async move {
                // Each holds its connection and reads nothing.
                let holding = serve(never_reads, |stream| async move {
                    let _held = stream;
                    std::future::pending::<()>().await;
                });
                let silent = serve(silent, |stream| async move {
                    let _held = stream;
                    std::future::pending::<()>().await;
                });
                let slow = serve(slow, move |mut stream| {
                    let read = Arc::clone(&read_slowly);
                    async move {
                        let mut buf = vec![0; 64 * 1024];
                        let tick = Duration::from_secs_f64(buf.len() as f64 / SLOW_RATE as f64);
                        let mut interval = tokio::time::interval(tick);
                        loop {
                            interval.tick().await;
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => read.fetch_add(n as u64, Ordering::Relaxed),
                            };
                        }
                    }
                });
                let resets = serve(resets, |mut stream| async move {
                    let mut buf = vec![0; 64 * 1024];
                    let mut total = 0;
                    while total < 1 << 20 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => total += n,
                        }
                    }
                    let _ = stream.set_zero_linger();
                });
                tokio::join!(holding, silent, slow, resets);
            })
        },
    )
}

/// Accepts on `listener` for ever, running `handle` for each connection.
async fn serve<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(handle(stream));
    }
}
