//! `cargo xtask soak --minutes N`: `prism run` left running under connection churn of every
//! kind, in the e2e topology, with the relay carrying UDP. Every 10 s it samples Prism's RSS,
//! open file descriptors, tokio tasks and open connections, and prints them as a table (also
//! written to `soak.md` in the log directory). After the warm-up nothing may grow by more
//! than 5% (the last third of the samples against the first third, with a small absolute
//! allowance for small counts), and once the churn stops the connections return to zero and the
//! tasks and descriptors to where they were before it began.
//!
//! The churn, in the client namespace, all at once: short echoes; long connections that talk
//! once a second; the server closing first (half-close); resets from the client and from the
//! server; slow readers of a download; connections to a closed port; UDP echoes through the
//! relay. Every outcome other than the expected one is counted and fails the run (UDP may lose
//! under 1% of its datagrams).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::e2e::in_netns;
use crate::netns::{self, NsTask, Process, status_kib, wait_for};
use crate::servers::{self, Servers, pattern};
use crate::topology::{self, Topology};

const EVERY: Duration = Duration::from_secs(10);
const METRICS: &str = "127.0.0.1:9464";
const RELAY_PORT: u16 = 5555;
const UDP_ECHO: u16 = 7001;
/// Long connections held at once, and how long each lives.
const LONG: usize = 20;
const LONG_LIFE: Duration = Duration::from_secs(20);

/// One sample of Prism.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: u64,
    tasks: u64,
    open: u64,
}

/// What each kind of churn did: as expected, and not.
#[derive(Debug, Default)]
struct Tally {
    kinds: [(AtomicU64, AtomicU64); KINDS.len()],
}

const UDP: &str = "UDP via relay";
const KINDS: [&str; 8] = [
    "short echo",
    "long",
    "server closes first",
    "client resets",
    "server resets",
    "slow reader",
    "closed port",
    UDP,
];

impl Tally {
    fn count(&self, kind: usize, outcome: Result<()>) {
        let Some((ok, bad)) = self.kinds.get(kind) else {
            return;
        };
        match outcome {
            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => bad.fetch_add(1, Ordering::Relaxed),
        };
    }
}

pub fn run(minutes: f64) -> Result<()> {
    ensure!(
        crate::tools::is_root(),
        "soak needs root (network namespaces, TUN devices)"
    );
    ensure!(minutes > 0.0, "--minutes must be above zero");
    netns::sweep();
    crate::tools::ensure(&[("ip", "iproute2"), ("curl", "curl")])?;
    let prism = crate::e2e::build_prism()?;
    let logs = std::env::temp_dir().join(format!("prism-soak-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;
    println!("soak: {minutes} minutes, logs in {}", logs.display());

    let topo = Topology::build()?;
    let servers = Servers::start(&topo.server, vec![topology::TARGET_V4])?;
    let _udp_echo = udp_echo(&topo)?;
    let mut relay = relay_server(&topo, &prism, &logs)?;
    let mut args = topo.prism_args("direct");
    args.extend(
        [
            "--fwmark",
            topology::FWMARK,
            "--relay",
            &format!("udp://{}:{RELAY_PORT}", topology::SERVER_V4),
            "--relay-key-file",
            &logs.join("relay.key").display().to_string(),
            "--metrics",
            METRICS,
        ]
        .map(str::to_owned),
    );
    let mut prism_run = topo.start_prism(&prism, &args, &logs.join("prism-soak.log"))?;
    let pid = prism_run.pid();
    let before = sample(&topo, pid, Duration::ZERO)?;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let churn = {
        let (ns, stop, tally) = (
            topo.client.name().to_owned(),
            Arc::clone(&stop),
            Arc::clone(&tally),
        );
        std::thread::spawn(move || in_netns(&ns, async move || Ok(churn(stop, tally).await)))
    };
    // The servers report what they saw on a channel nobody reads here: keep it empty.
    let seen = servers.seen();

    let length = Duration::from_secs_f64(minutes * 60.0);
    let started = Instant::now();
    let mut samples = Vec::new();
    println!("{}", header());
    while started.elapsed() < length {
        std::thread::sleep(EVERY.min(length.saturating_sub(started.elapsed())));
        while seen.try_lock().is_ok_and(|mut s| s.try_recv().is_ok()) {}
        let s = sample(&topo, pid, started.elapsed())?;
        println!("{}", row(&s));
        samples.push(s);
        ensure!(
            prism_run.try_status().is_none(),
            "prism exited during the soak:\n{}",
            prism_run.log()
        );
    }
    stop.store(true, Ordering::Relaxed);
    churn
        .join()
        .map_err(|_| anyhow::anyhow!("the churn thread panicked"))??;

    // Everything the churn opened ends (TIME-WAIT included).
    let mut after = sample(&topo, pid, started.elapsed())?;
    let settled = wait_for("the connections to drain", Duration::from_secs(60), || {
        sample(&topo, pid, started.elapsed()).is_ok_and(|s| {
            after = s;
            s.open == 0 && s.tasks <= before.tasks && s.fds <= before.fds
        })
    });
    let mut table = format!("{}\n", header());
    for s in &samples {
        writeln!(table, "{}", row(s))?;
    }
    writeln!(table, "{} (after the churn)", row(&after))?;
    writeln!(table, "\n| kind | as expected | not |\n|---|---|---|")?;
    let mut unexpected = 0;
    for (kind, (ok, bad)) in KINDS.iter().zip(&tally.kinds) {
        let (ok, bad) = (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed));
        writeln!(table, "| {kind} | {ok} | {bad} |")?;
        ensure!(ok > 0, "no {kind} succeeded");
        // UDP may lose a datagram now and then, as UDP does; under 1% passes.
        if *kind != UDP || bad * 100 > ok + bad {
            unexpected += bad;
        }
    }
    std::fs::write(logs.join("soak.md"), &table)?;
    println!("{table}");

    prism_run.stop_cleanly(Signal::SIGINT)?;
    relay.stop(Signal::SIGINT, Duration::from_secs(10))?;
    settled.with_context(|| {
        format!(
            "after the churn: {} open, {} tasks (before: {}), {} fds (before: {})",
            after.open, after.tasks, before.tasks, after.fds, before.fds
        )
    })?;
    ensure!(
        unexpected == 0,
        "{unexpected} unexpected outcomes (table above)"
    );
    growth(&samples)?;
    println!("soak: passed");
    Ok(())
}

fn header() -> String {
    "| time | RSS (KiB) | fds | tasks | open |\n|---|---|---|---|---|".to_owned()
}

fn row(s: &Sample) -> String {
    format!(
        "| {:.0} s | {} | {} | {} | {} |",
        s.at.as_secs_f64(),
        s.rss_kib,
        s.fds,
        s.tasks,
        s.open
    )
}

/// A column of the samples.
type Field = fn(&Sample) -> u64;

/// After the warm-up (the first third, and at least 20 s), the mean of the last third of the
/// samples may exceed the mean of the first third by 5%, plus an allowance for small counts.
fn growth(samples: &[Sample]) -> Result<()> {
    let steady: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= Duration::from_secs(20))
        .skip(samples.len() / 3)
        .collect();
    ensure!(steady.len() >= 2, "too short a soak to judge growth");
    let third = (steady.len() / 3).max(1);
    let (first, last) = (&steady[..third], &steady[steady.len() - third..]);
    let mean = |part: &[&Sample], f: Field| {
        part.iter().map(|s| f(s)).sum::<u64>() as f64 / part.len() as f64
    };
    let checks: [(&str, Field, f64); 4] = [
        ("RSS (KiB)", |s| s.rss_kib, 1024.0),
        ("fds", |s| s.fds, 8.0),
        ("tasks", |s| s.tasks, 16.0),
        ("open", |s| s.open, 16.0),
    ];
    for (name, f, allowance) in checks {
        let (early, late) = (mean(first, f), mean(last, f));
        if late > early * 1.05 + allowance {
            bail!("{name} grew from {early:.0} to {late:.0}");
        }
    }
    Ok(())
}

/// Prism's RSS and descriptors from /proc, its tasks and open connections from `--metrics`.
fn sample(topo: &Topology, pid: u32, at: Duration) -> Result<Sample> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    let text = topo
        .client
        .exec(&["curl", "-sf", &format!("http://{METRICS}/metrics")])
        .context("the metrics endpoint did not answer")?;
    let value = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {name} in the metrics"))
    };
    Ok(Sample {
        at,
        rss_kib: status_kib(pid, "VmRSS")?,
        fds,
        tasks: value("prism_tasks")?,
        open: value("prism_open")?,
    })
}

/// `prism relay-server` in the server namespace; its TUN routes the client's addresses back,
/// and the targets are local there.
fn relay_server(topo: &Topology, prism: &Path, logs: &Path) -> Result<Process> {
    let key = logs.join("relay.key");
    std::fs::write(
        &key,
        "7a1c2b9a7e3d5a60c8b2e9f1d4a7c3b50e6f8a2d1c9b7e4f3a5d2c8b6e1f7a91\n",
    )?;
    let mut command = topo.server.command(prism);
    command
        .args([
            "relay-server",
            "--listen",
            &format!("{}:{RELAY_PORT}", topology::SERVER_V4),
            "--tun",
            "psoak0",
            "--address",
            "10.99.0.254/24",
            "--key-file",
        ])
        .arg(&key);
    let server = Process::spawn("prism relay-server", command, Some(&logs.join("relay.log")))?;
    wait_for("the relay server's TUN", Duration::from_secs(10), || {
        topo.server.ip("link show psoak0").is_ok()
    })?;
    Ok(server)
}

/// A UDP echo on the target address in the server namespace.
fn udp_echo(topo: &Topology) -> Result<NsTask> {
    let addr = SocketAddr::new(topology::TARGET_V4, UDP_ECHO);
    NsTask::start(topo.server.name(), "the UDP echo", move || async move {
        let socket = UdpSocket::bind(addr).await?;
        Ok(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(buf.get(..n).unwrap_or_default(), from).await;
            }
        })
    })
}

/// Runs every kind of churn until `stop`.
async fn churn(stop: Arc<AtomicBool>, tally: Arc<Tally>) -> String {
    let target = |port| SocketAddr::new(topology::TARGET_V4, port);
    let mut workers = tokio::task::JoinSet::new();
    let mut spawn = |kind: usize, pause: Duration, work: fn(SocketAddr) -> Outcome, port| {
        let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
        workers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let outcome = tokio::time::timeout(Duration::from_secs(30), work(target(port)))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("no outcome within 30 s")));
                if let Err(error) = &outcome {
                    eprintln!("soak: {}: {error:#}", KINDS.get(kind).unwrap_or(&"?"));
                }
                tally.count(kind, outcome);
                tokio::time::sleep(pause).await;
            }
        });
    };
    for _ in 0..4 {
        spawn(
            0,
            Duration::from_millis(5),
            |a| Box::pin(short_echo(a)),
            servers::ECHO,
        );
    }
    for _ in 0..LONG {
        spawn(1, Duration::ZERO, |a| Box::pin(long(a)), servers::ECHO);
    }
    let every = Duration::from_millis(50);
    spawn(
        2,
        every,
        |a| Box::pin(server_closes_first(a)),
        servers::CLOSES_FIRST,
    );
    spawn(3, every, |a| Box::pin(client_resets(a)), servers::ECHO);
    spawn(4, every, |a| Box::pin(server_resets(a)), servers::RESETS);
    spawn(5, every, |a| Box::pin(slow_reader(a)), servers::SOURCE);
    spawn(6, every, |a| Box::pin(closed_port(a)), servers::CLOSED);
    spawn(
        7,
        Duration::from_millis(20),
        |a| Box::pin(udp_echo_once(a)),
        UDP_ECHO,
    );
    while workers.join_next().await.is_some() {}
    String::new()
}

type Outcome = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

async fn short_echo(addr: SocketAddr) -> Result<()> {
    let message = pattern(11, 1024);
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(&message).await?;
    stream.shutdown().await?;
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).await?;
    ensure!(echoed == message, "the echo differs");
    Ok(())
}

async fn long(addr: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    let started = Instant::now();
    let mut buf = [0u8; 100];
    while started.elapsed() < LONG_LIFE {
        stream.write_all(&[7; 100]).await?;
        stream.read_exact(&mut buf).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

async fn server_closes_first(addr: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut first = Vec::new();
    // The server's FIN ends this read; the client's half stays open.
    let (mut reader, mut writer) = stream.split();
    reader.read_to_end(&mut first).await?;
    ensure!(first == servers::SERVER_FIRST, "unexpected {first:?}");
    writer.write_all(b"after your FIN").await?;
    writer.shutdown().await?;
    Ok(())
}

async fn client_resets(addr: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(b"going away").await?;
    stream.set_zero_linger()?;
    Ok(())
}

async fn server_resets(addr: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(b"ping").await?;
    let mut buf = [0u8; 16];
    match stream.read(&mut buf).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        other => bail!("expected a reset, got {other:?}"),
    }
}

async fn slow_reader(addr: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_u64(4 * 1024 * 1024).await?;
    stream.write_u64(3).await?;
    // Reads a little, slowly, then leaves with most of it unread.
    let mut buf = vec![0u8; 16 * 1024];
    for _ in 0..10 {
        stream.read_exact(&mut buf).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn closed_port(addr: SocketAddr) -> Result<()> {
    // The fast handshake connects, then the failed upstream connect resets the client: often
    // before the kernel has told the connecting socket it is connected.
    let reset = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionReset;
    let mut stream = match TcpStream::connect(addr).await {
        Err(e) if reset(&e) => return Ok(()),
        connected => connected?,
    };
    let mut buf = [0u8; 16];
    match stream.read(&mut buf).await {
        Err(e) if reset(&e) => Ok(()),
        other => bail!("expected a reset, got {other:?}"),
    }
}

async fn udp_echo_once(addr: SocketAddr) -> Result<()> {
    let socket = UdpSocket::bind((IpAddr::from([0, 0, 0, 0]), 0)).await?;
    socket.send_to(b"through the relay", addr).await?;
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf))
        .await
        .context("no UDP echo within 2 s")??;
    ensure!(
        buf.get(..n) == Some(&b"through the relay"[..]),
        "the echo differs"
    );
    Ok(())
}
