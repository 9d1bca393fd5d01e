//! `cargo xtask bench`: Prism against the kernel on the same topology, measured in one run.
//!
//! Systems: the kernel routing the traffic with no TUN (the client's bypass route over the
//! veth), Prism with a SOCKS5 upstream (dante in the server namespace), and Prism `direct`.
//! Measures: one TCP flow up and down and 8 flows (iperf3, 10 s each, the median of three
//! runs); 1-byte request/response p50 and p99 on one connection (the median of five rounds);
//! new connections per second (connect, one exchange, close; 5 s, the median of three runs);
//! all of these again over IPv6; RSS of the stack's process with 2,000 connections open
//! through SOCKS5 and 10,000 through `direct`, and one flow's throughput while the 10,000 stay
//! open; Prism's CPU seconds per GB. Writes `docs/bench/results.{json,md,svg}`. Nothing here
//! asserts a speed. `PRISM_BENCH_BINARY` measures that `prism` binary instead of this tree's
//! (with `PRISM_BENCH_ONLY`, to compare two builds).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_util::future::try_join_all;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::chart;
use crate::e2e::{build_prism, in_netns};
use crate::netns::{Process, wait_for};
use crate::peers::{self, Peer};
use crate::servers::{self, Servers};
use crate::stats::{self, percentile};
use crate::tools;
use crate::topology::{self, Topology};

const IPERF_PORT: u16 = 5201;
/// The window of the busy-polling pass (`prism run --busy-poll-us`): a local round trip.
const BUSY_POLL_US: &str = "50";
const IPERF_SECONDS: &str = "10";
/// An iperf3 run still going after this many seconds is killed and counts as failed: a peer
/// whose stack wedges a connection leaves iperf3 waiting for ever (shadowsocks-rust did).
const IPERF_DEADLINE: &str = "40";

/// One system's figures; `None` where a measure does not apply.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Figures {
    #[serde(rename = "system")]
    pub(crate) name: String,
    #[serde(rename = "upload_mbit")]
    pub(crate) up_mbit: Option<f64>,
    #[serde(rename = "download_mbit")]
    pub(crate) down_mbit: Option<f64>,
    #[serde(rename = "parallel8_mbit")]
    pub(crate) parallel_mbit: Option<f64>,
    pub(crate) rr_p50_us: Option<f64>,
    pub(crate) rr_p99_us: Option<f64>,
    /// The same one flow each way, 8 flows, request/response and new connections over IPv6
    /// (`None` for the forwarder, which routes IPv4 only).
    #[serde(rename = "upload_v6_mbit")]
    pub(crate) up_v6_mbit: Option<f64>,
    #[serde(rename = "download_v6_mbit")]
    pub(crate) down_v6_mbit: Option<f64>,
    #[serde(rename = "parallel8_v6_mbit")]
    pub(crate) parallel_v6_mbit: Option<f64>,
    pub(crate) rr_v6_p50_us: Option<f64>,
    pub(crate) rr_v6_p99_us: Option<f64>,
    pub(crate) conn_per_s: Option<f64>,
    pub(crate) conn_v6_per_s: Option<f64>,
    pub(crate) rss_2000_mb: Option<f64>,
    pub(crate) rss_10000_mb: Option<f64>,
    #[serde(rename = "upload_with_10000_idle_mbit")]
    pub(crate) up_with_10000_idle_mbit: Option<f64>,
    pub(crate) cpu_s_per_gb: Option<f64>,
    /// Measures that failed, each with its error; their cells stay empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) failed: Vec<String>,
}

impl Figures {
    fn named(name: &str) -> Figures {
        Figures {
            name: name.to_owned(),
            ..Figures::default()
        }
    }

    /// Runs one measure. A failure is printed and noted instead of ending the run: a peer
    /// that wedges under one test (shadowsocks-rust did) still gets its other figures, and
    /// the table says what failed and why.
    fn attempt<T>(&mut self, what: &str, measure: impl FnOnce() -> Result<T>) -> Option<T> {
        match measure() {
            Ok(value) => Some(value),
            Err(error) => {
                println!("  {what} failed: {error:#}");
                self.failed.push(format!("{what}: {error:#}"));
                None
            }
        }
    }
}

/// Raises this process's soft descriptor limit to its hard limit where it is lower (children
/// inherit it). Best effort: some sandboxes refuse any setrlimit; 20,000 per process is what
/// the bench is built around.
fn raise_fd_limit() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    Ok(())
}

/// `xtask serve-targets NS ADDR...`: the test servers, until killed.
pub(crate) fn serve_targets(ns: &str, addresses: Vec<std::net::IpAddr>) -> Result<()> {
    raise_fd_limit()?;
    let _servers = Servers::start_in(ns, addresses)?;
    loop {
        std::thread::park();
    }
}

pub(crate) fn run(peers: bool) -> Result<()> {
    ensure!(
        tools::is_root(),
        "bench needs root (network namespaces, TUN)"
    );
    // A wrong PRISM_BENCH_RUNS fails here, before anything is set up.
    runs()?;
    crate::netns::sweep();
    tools::ensure(&[
        ("iperf3", "iperf3"),
        ("danted", "dante-server"),
        ("ip", "iproute2"),
        ("ss", "iproute2"),
    ])?;
    raise_fd_limit()?;
    let prism = match std::env::var_os("PRISM_BENCH_BINARY") {
        Some(binary) => binary.into(),
        None => build_prism()?,
    };
    if peers {
        for peer in Peer::ALL {
            peers::install(peer)?;
        }
    }
    let logs = std::env::temp_dir().join(format!("prism-bench-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;
    println!("bench: logs in {}", logs.display());

    let topo = Topology::build()?;
    // The client is a load generator: tens of thousands of short connections to one server
    // port within a minute. Without these, the kernel's search for a free local port among the
    // TIME-WAIT sockets of earlier phases dominates (seen with perf). Reuse needs the peer's
    // TCP timestamps: a stack that sends none leaves every port it used blocked for 60 s, and
    // its figure shows it. Every system gets the same settings.
    for setting in [
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65000",
    ] {
        topo.client.exec(&["sysctl", "-q", "-w", setting])?;
    }
    // The servers run in a process of their own: with 10,000 connections held, the client
    // sockets and the accepted ones would not fit one process's 20,000 descriptors.
    let mut servers_cmd = std::process::Command::new(std::env::current_exe()?);
    servers_cmd.args([
        "serve-targets",
        topo.server.name(),
        &topology::TARGET_V4.to_string(),
        &topology::TARGET_V6.to_string(),
    ]);
    let servers = Process::spawn("test servers", servers_cmd, Some(&logs.join("servers.log")))?;
    topology::wait_listening(&topo.server, servers::ECHO, 1, "the test servers")?;
    let _dante = topo.start_dante(&logs)?;
    // One iperf3 server per family (each binds its target address).
    let mut iperfs = Vec::new();
    for target in [topology::TARGET_V4, topology::TARGET_V6] {
        let mut iperf_cmd = topo.server.command("iperf3");
        // A test whose connection a stack wedges must not keep the server busy for the next
        // ones: unacknowledged data for 10 s, or nothing received for 15 s, ends it.
        iperf_cmd.args([
            "--snd-timeout",
            "10000",
            "--rcv-timeout",
            "15000",
            "-s",
            "-B",
            &target.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
        ]);
        let log = logs.join(format!(
            "iperf3-{}.log",
            if target.is_ipv4() { 4 } else { 6 }
        ));
        iperfs.push(Process::spawn("iperf3 server", iperf_cmd, Some(&log))?);
    }
    topology::wait_listening(&topo.server, IPERF_PORT, 2, "iperf3")?;

    let mut results = Vec::new();
    // PRISM_BENCH_ONLY=kernel|forward|prism[-socks|-direct|-busy]|peers, or several separated by
    // commas, measures those kinds of system only (for experiments; the table is printed, not
    // written). A kind names its variants by prefix: "prism" measures every Prism pass,
    // "prism-direct" one.
    let only = std::env::var("PRISM_BENCH_ONLY").unwrap_or_default();
    let wanted = |kind: &str| only.is_empty() || only.split(',').any(|k| kind.starts_with(k));

    if wanted("kernel") {
        println!("bench: kernel routing (no TUN)");
        let f = Figures::named("kernel routing, no TUN");
        results.push(measure(&topo, f, None, false)?);
    }

    for offload in [false, true].into_iter().filter(|_| wanted("forward")) {
        let name = if offload {
            "bare TUN forwarder, offload"
        } else {
            "bare TUN forwarder"
        };
        println!("bench: {name}");
        let mut command = std::process::Command::new(std::env::current_exe()?);
        command.args(["tun-forward", topo.client.name(), topo.server.name()]);
        if offload {
            command.arg("--offload");
        }
        let log = logs.join(format!("forward-{offload}.log"));
        let mut forwarder = Process::spawn(name, command, Some(&log))?;
        wait_for("the forwarder's routes", Duration::from_secs(10), || {
            topo.server
                .ip(&format!("link show {} up", crate::forward::SERVER_TUN))
                .is_ok_and(|o| o.contains("UP"))
        })
        .with_context(|| forwarder.log())?;
        let mut f = Figures::named(name);
        flows(&topo, &mut f, None, false)?;
        println!("  {f:?}");
        results.push(f);
        let _ = forwarder.stop(Signal::SIGTERM, Duration::from_secs(5));
        // The TUNs go with the process; wait until the client's route is gone.
        wait_for("the forwarder's TUN to go", Duration::from_secs(10), || {
            topo.client
                .ip(&format!("link show {}", crate::forward::CLIENT_TUN))
                .is_err()
        })?;
    }

    if wanted("prism-socks") {
        let socks = format!("socks5://{}:{}", topology::SERVER_V4, topology::DANTE_PORT);
        println!("bench: prism, SOCKS5 upstream (dante)");
        let mut args = topo.prism_args(&socks);
        args.extend(extra_args());
        let mut p = topo.start_prism(&prism, &args, &logs.join("prism-socks.log"))?;
        results.push(measure_stack(&topo, "prism, SOCKS5 (dante)", p.pid())?);
        stop(&mut p)?;
    }

    if wanted("prism-direct") {
        println!("bench: prism, direct upstream");
        let mut args = topo.prism_args("direct");
        args.extend(["--fwmark".to_owned(), topology::FWMARK.to_owned()]);
        args.extend(extra_args());
        let mut p = topo.start_prism(&prism, &args, &logs.join("prism-direct.log"))?;
        let pid = p.pid();
        results.push(measure(
            &topo,
            Figures::named("prism, direct"),
            Some(pid),
            true,
        )?);
        stop(&mut p)?;
    }

    if wanted("prism-busy") {
        println!("bench: prism, direct upstream, busy polling");
        let mut args = topo.prism_args("direct");
        args.extend(
            ["--fwmark", topology::FWMARK, "--busy-poll-us", BUSY_POLL_US].map(str::to_owned),
        );
        args.extend(extra_args());
        let mut p = topo.start_prism(&prism, &args, &logs.join("prism-busy.log"))?;
        let pid = p.pid();
        let name = format!("prism, direct, busy polling {BUSY_POLL_US} µs");
        results.push(measure(&topo, Figures::named(&name), Some(pid), false)?);
        stop(&mut p)?;
    }

    if peers && wanted("peers") {
        for peer in Peer::ALL {
            println!("bench: {}", peer.name());
            let mut running = peers::start(peer, &topo, &logs)?;
            results.push(measure_stack(&topo, peer.name(), running.process.pid())?);
            // Peers exit on SIGINT or SIGTERM; what they return then is not the bench's concern.
            let _ = running
                .process
                .stop(Signal::SIGTERM, Duration::from_secs(10));
            drop(running);
            peers::wait_gone(&topo)?;
        }
    }
    drop(servers);

    if only.is_empty() {
        write_results(&results)?;
        crate::wan_bench::relay_local()?;
    } else {
        println!("\n{}", markdown(&results));
    }
    Ok(())
}

/// Writes the table, the JSON and the chart into docs/bench.
fn write_results(results: &[Figures]) -> Result<()> {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench");
    std::fs::create_dir_all(&out)?;
    let table = markdown(results);
    println!("\n{table}");
    std::fs::write(out.join("results.md"), &table)?;
    let mut json = serde_json::to_string_pretty(results)?;
    json.push('\n');
    std::fs::write(out.join("results.json"), json)?;
    std::fs::write(out.join("results.svg"), chart::render(results)?)?;
    println!("bench: wrote docs/bench/results.md, results.json and results.svg");
    Ok(())
}

/// Extra flags for prism from `PRISM_BENCH_ARGS` (whitespace-separated), for experiments such
/// as `--tcp-buffer-kib 256`. The figures committed in docs/bench use none.
fn extra_args() -> Vec<String> {
    std::env::var("PRISM_BENCH_ARGS")
        .map(|a| a.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// A userspace stack behind SOCKS5 (or a peer's own proxy): RSS with 2,000 connections held,
/// then everything else. The connections come first, on a fresh process: later tests free
/// memory that allocators return to the OS only after a while, which would blur the figure.
fn measure_stack(topo: &Topology, name: &str, pid: u32) -> Result<Figures> {
    let mut f = Figures::named(name);
    f.rss_2000_mb = f.attempt("2,000 connections", || hold_connections(topo, 2000, pid));
    // Let the stack finish closing them before the next test (shadowsocks-rust refused the
    // next connection when it came at once).
    std::thread::sleep(Duration::from_secs(3));
    measure(topo, f, Some(pid), false)
}

fn stop(process: &mut Process) -> Result<()> {
    process.stop_cleanly(Signal::SIGINT)
}

/// Everything but the 2,000 connections, for one system (10,000 direct ones when `many`).
fn measure(topo: &Topology, mut f: Figures, pid: Option<u32>, many: bool) -> Result<Figures> {
    if let (true, Some(pid)) = (many, pid) {
        if let Some((rss, up_idle)) = f.attempt("10,000 connections", || ten_thousand(topo, pid)) {
            f.rss_10000_mb = Some(rss);
            f.up_with_10000_idle_mbit = Some(up_idle);
        }
    }
    flows(topo, &mut f, pid, true)?;
    let before = retransmissions(topo);
    f.conn_per_s = f.attempt("connections per second", || {
        median_of_runs("connections per second", || {
            connections_per_second(topo, topology::TARGET_V4)
        })
    });
    f.conn_v6_per_s = f.attempt("IPv6 connections per second", || {
        median_of_runs("IPv6 connections per second", || {
            connections_per_second(topo, topology::TARGET_V6)
        })
    });
    let after = retransmissions(topo);
    println!(
        "  retransmitted segments during it (client namespace, server namespace): {:?}",
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>()
    );
    println!("  {f:?}");
    Ok(f)
}

/// One flow each way, 8 flows, and request/response; the CPU `pid` spends per GB of the single
/// flows when there is a process to ask; with `v6`, all of them again over IPv6.
fn flows(topo: &Topology, f: &mut Figures, pid: Option<u32>, v6: bool) -> Result<()> {
    const V4: IpAddr = topology::TARGET_V4;
    let cpu_before = pid.map(cpu_seconds).transpose()?;
    let up = f.attempt("upload", || iperf(topo, V4, &[]));
    let down = f.attempt("download", || iperf(topo, V4, &["-R"]));
    if let (Some(before), Some(pid), Some((_, up_bytes)), Some((_, down_bytes))) =
        (cpu_before, pid, up, down)
    {
        let used = cpu_seconds(pid)? - before;
        f.cpu_s_per_gb = Some(used / ((up_bytes + down_bytes) as f64 / 1e9));
    }
    f.up_mbit = up.map(|(mbit, _)| mbit);
    f.down_mbit = down.map(|(mbit, _)| mbit);
    f.parallel_mbit = f
        .attempt("8 flows", || iperf(topo, V4, &["-P", "8"]))
        .map(|(mbit, _)| mbit);
    if let Some((p50, p99)) = f.attempt("request/response", || request_response(topo, V4)) {
        f.rr_p50_us = Some(p50);
        f.rr_p99_us = Some(p99);
    }
    if v6 {
        const V6: IpAddr = topology::TARGET_V6;
        f.up_v6_mbit = f
            .attempt("IPv6 upload", || iperf(topo, V6, &[]))
            .map(|(mbit, _)| mbit);
        f.down_v6_mbit = f
            .attempt("IPv6 download", || iperf(topo, V6, &["-R"]))
            .map(|(mbit, _)| mbit);
        f.parallel_v6_mbit = f
            .attempt("IPv6 8 flows", || iperf(topo, V6, &["-P", "8"]))
            .map(|(mbit, _)| mbit);
        if let Some((p50, p99)) = f.attempt("IPv6 request/response", || request_response(topo, V6))
        {
            f.rr_v6_p50_us = Some(p50);
            f.rr_v6_p99_us = Some(p99);
        }
    }
    Ok(())
}

/// How many times each iperf3 test and each connections-per-second test runs; the figure is
/// their median. `PRISM_BENCH_RUNS`, 3 unless set: on a shared machine one 10-second test can
/// land in a slow minute (docs/bench/spread.md).
fn runs() -> Result<usize> {
    Ok(tools::positive_env("PRISM_BENCH_RUNS", 3)? as usize)
}

/// The median of `runs()` results of `measure`, each printed; an error ends it.
fn median_of_runs(what: &str, mut measure: impl FnMut() -> Result<f64>) -> Result<f64> {
    let got = (0..runs()?)
        .map(|_| measure())
        .collect::<Result<Vec<f64>>>()?;
    let shown: Vec<String> = got.iter().map(|v| format!("{v:.0}")).collect();
    println!("  {what}: runs [{}]", shown.join(", "));
    stats::median(got).context("no runs")
}

/// iperf3 from the client namespace, `runs()` times; (the median Mbit/s received, the bytes of
/// all the runs). A run that fails is tried again, three times in all, and each failure is
/// printed: a peer that drops a test's connection under load should cost that run, not the
/// whole bench.
fn iperf(topo: &Topology, target: IpAddr, extra: &[&str]) -> Result<(f64, u64)> {
    let mut bytes = 0;
    let what = format!("iperf3 to {target} {extra:?}, Mbit/s");
    let mbit = median_of_runs(&what, || {
        let (mbit, moved) =
            tools::retried(&format!("iperf3 {extra:?}"), Duration::from_secs(1), || {
                iperf_once(topo, target, extra)
            })?;
        bytes += moved;
        Ok(mbit)
    })?;
    Ok((mbit, bytes))
}

/// One iperf3 run from the client namespace; (Mbit/s received, bytes).
fn iperf_once(topo: &Topology, target: IpAddr, extra: &[&str]) -> Result<(f64, u64)> {
    let target = target.to_string();
    let port = IPERF_PORT.to_string();
    let mut args = vec![
        "timeout",
        "--kill-after=5",
        IPERF_DEADLINE,
        "iperf3",
        "-c",
        &target,
        "-p",
        &port,
        "-t",
        IPERF_SECONDS,
        "-J",
    ];
    args.extend_from_slice(extra);
    let out = topo.client.exec(&args)?;
    let Some(received) = out.split("\"sum_received\"").nth(1) else {
        let error = out
            .split("\"error\":")
            .nth(1)
            .and_then(|e| e.lines().next())
            .unwrap_or("no error given");
        bail!("iperf3 printed no sum_received: {}", error.trim());
    };
    let number = |key: &str| -> Result<f64> {
        received
            .split(&format!("\"{key}\":"))
            .nth(1)
            .and_then(|r| r.split([',', '}']).next())
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("no {key} in iperf3's output"))
    };
    Ok((number("bits_per_second")? / 1e6, number("bytes")? as u64))
}

/// Rounds of 20,000 one-byte round trips on one connection to the echo server, after 1,000 to
/// warm up; (p50, p99) in µs, each the median over the rounds. One round's figures move with
/// whatever else the machine does for that second or two; the median of five is steadier.
fn request_response(topo: &Topology, target: IpAddr) -> Result<(f64, f64)> {
    const ROUNDS: usize = 5;
    const TRIPS: usize = 20_000;
    in_netns(topo.client.name(), async move || {
        let mut stream = TcpStream::connect(SocketAddr::new(target, servers::ECHO)).await?;
        stream.set_nodelay(true)?;
        let mut byte = [0u8; 1];
        for i in 0..1000u32 {
            stream.write_all(&[i as u8]).await?;
            stream.read_exact(&mut byte).await?;
        }
        let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
        let mut times = Vec::with_capacity(TRIPS);
        for _ in 0..ROUNDS {
            times.clear();
            for i in 0..TRIPS {
                let started = Instant::now();
                stream.write_all(&[i as u8]).await?;
                stream.read_exact(&mut byte).await?;
                times.push(started.elapsed().as_secs_f64() * 1e6);
            }
            times.sort_by(f64::total_cmp);
            p50s.push(percentile(&times, 50));
            p99s.push(percentile(&times, 99));
        }
        println!("  request/response rounds, p50 {p50s:.1?}, p99 {p99s:.1?} µs");
        let p50 = stats::median(p50s).context("no rounds")?;
        let p99 = stats::median(p99s).context("no rounds")?;
        Ok((p50, p99))
    })
}

/// Connect, one exchange, close, for 5 s, 16 at a time; connections per second. Failed
/// attempts are not counted (and are printed), and so is how long the connects and the
/// exchanges took: a slow connection shows which of the two stalled.
fn connections_per_second(topo: &Topology, target: IpAddr) -> Result<f64> {
    in_netns(topo.client.name(), async move || {
        let addr = SocketAddr::new(target, servers::ECHO);
        let deadline = Instant::now() + Duration::from_secs(5);
        let started = Instant::now();
        let workers = (0..16).map(|_| async move {
            let (mut connects, mut exchanges, mut failed) = (Vec::new(), Vec::new(), 0u64);
            while Instant::now() < deadline {
                let began = Instant::now();
                let Ok(mut stream) = TcpStream::connect(addr).await else {
                    failed += 1;
                    continue;
                };
                let connected = Instant::now();
                if exchange(&mut stream).await.is_err() {
                    failed += 1;
                    continue;
                }
                drop(stream);
                connects.push((connected - began).as_secs_f64() * 1e3);
                exchanges.push(connected.elapsed().as_secs_f64() * 1e3);
            }
            (connects, exchanges, failed)
        });
        let results = futures_util::future::join_all(workers).await;
        let failed: u64 = results.iter().map(|r| r.2).sum();
        let (mut connects, mut exchanges) = (Vec::new(), Vec::new());
        for (c, e, _) in results {
            connects.extend(c);
            exchanges.extend(e);
        }
        let done = connects.len();
        println!(
            "  connections per second to {target}: {done} done, {failed} failed; connect {}, exchange {}",
            spread(&mut connects),
            spread(&mut exchanges)
        );
        Ok(done as f64 / started.elapsed().as_secs_f64())
    })
}

/// "p50 …, p99 …, max … ms" of durations in milliseconds.
fn spread(times: &mut [f64]) -> String {
    times.sort_by(f64::total_cmp);
    format!(
        "p50 {:.2}, p99 {:.2}, max {:.1} ms",
        percentile(times, 50),
        percentile(times, 99),
        times.last().copied().unwrap_or(0.0)
    )
}

/// Opens `n` connections (each exchanges a byte) and holds them while it reads the RSS of `pid`
/// (MB) and runs `during`.
fn holding<T>(
    topo: &Topology,
    n: usize,
    pid: u32,
    during: impl FnOnce() -> Result<T>,
) -> Result<(f64, T)> {
    let name = topo.client.name().to_owned();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = std::thread::spawn(move || {
        in_netns(&name, async move || {
            let streams = open_many(n).await?;
            let _ = ready_tx.send(streams.len());
            let _ = done_rx.await;
            drop(streams);
            Ok(())
        })
    });
    let Ok(opened) = ready_rx.recv() else {
        // The holder ended without opening them all: its error says why.
        let error = match holder.join() {
            Ok(Err(error)) => error,
            _ => anyhow::anyhow!("the holder ended early"),
        };
        return Err(error.context(format!("opening {n} connections")));
    };
    ensure!(opened == n, "only {opened} of {n} connections opened");
    std::thread::sleep(Duration::from_millis(500));
    let rss = rss_mb(pid)?;
    let result = during();
    let _ = done_tx.send(());
    holder
        .join()
        .map_err(|_| anyhow::anyhow!("the holder panicked"))??;
    Ok((rss, result?))
}

fn hold_connections(topo: &Topology, n: usize, pid: u32) -> Result<f64> {
    holding(topo, n, pid, || Ok(())).map(|(rss, ())| rss)
}

/// RSS with 10,000 direct connections open, and one upload's throughput meanwhile.
fn ten_thousand(topo: &Topology, pid: u32) -> Result<(f64, f64)> {
    holding(topo, 10_000, pid, || {
        Ok(iperf(topo, topology::TARGET_V4, &[])?.0)
    })
}

/// Opens `n` connections, 500 at a time, each exchanging a byte. A connection that fails is
/// tried again, up to 5 times in all: some peers refuse SYNs that arrive in a burst, and the
/// memory figure is about holding connections, not about opening them (the refusals are
/// printed).
async fn open_many(n: usize) -> Result<Vec<TcpStream>> {
    let addr = SocketAddr::new(topology::TARGET_V4, servers::ECHO);
    let refusals = std::sync::atomic::AtomicUsize::new(0);
    let mut streams = Vec::with_capacity(n);
    for start in (0..n).step_by(500) {
        let opened = try_join_all((start..n.min(start + 500)).map(|_| async {
            let mut attempt = 0;
            loop {
                match exchange_one(addr).await {
                    Ok(stream) => return Ok::<TcpStream, anyhow::Error>(stream),
                    Err(error) if attempt >= 4 => return Err(error),
                    Err(_) => {
                        refusals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }))
        .await?;
        streams.extend(opened);
    }
    let refusals = refusals.into_inner();
    if refusals > 0 {
        println!("  opening {n} connections: {refusals} attempts failed and were retried");
    }
    Ok(streams)
}

/// Connects and exchanges one byte with the echo server.
async fn exchange_one(addr: SocketAddr) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    exchange(&mut stream).await?;
    Ok(stream)
}

/// Sends a byte to the echo server and reads it back.
async fn exchange(stream: &mut TcpStream) -> Result<()> {
    stream.write_all(b"x").await?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    Ok(())
}

/// TCP segments the kernel retransmitted so far, in the client and the server namespace.
fn retransmissions(topo: &Topology) -> Vec<i64> {
    [&topo.client, &topo.server]
        .iter()
        .map(|ns| {
            ns.exec(&["nstat", "-asz", "TcpRetransSegs"])
                .ok()
                .and_then(|out| {
                    out.lines()
                        .find_map(|l| l.strip_prefix("TcpRetransSegs"))
                        .and_then(|v| v.split_whitespace().next()?.parse().ok())
                })
                .unwrap_or(0)
        })
        .collect()
}

fn rss_mb(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let after = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Ok(ticks / hz)
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".to_owned())
}

fn markdown(results: &[Figures]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| system | upload Mbit/s | download Mbit/s | 8 flows Mbit/s | RR p50/p99 µs | new conn/s | IPv6 upload Mbit/s | IPv6 download Mbit/s | IPv6 8 flows Mbit/s | IPv6 RR p50/p99 µs | IPv6 new conn/s | RSS 2000 conns MB | RSS 10000 conns MB | upload with 10000 idle Mbit/s | CPU s/GB |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for f in results {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {}/{} | {} | {} | {} | {} | {}/{} | {} | {} | {} | {} | {} |",
            f.name,
            cell(f.up_mbit, 0),
            cell(f.down_mbit, 0),
            cell(f.parallel_mbit, 0),
            cell(f.rr_p50_us, 0),
            cell(f.rr_p99_us, 0),
            cell(f.conn_per_s, 0),
            cell(f.up_v6_mbit, 0),
            cell(f.down_v6_mbit, 0),
            cell(f.parallel_v6_mbit, 0),
            cell(f.rr_v6_p50_us, 0),
            cell(f.rr_v6_p99_us, 0),
            cell(f.conn_v6_per_s, 0),
            cell(f.rss_2000_mb, 1),
            cell(f.rss_10000_mb, 1),
            cell(f.up_with_10000_idle_mbit, 0),
            cell(f.cpu_s_per_gb, 2),
        );
    }
    let failures: Vec<_> = results
        .iter()
        .flat_map(|f| f.failed.iter().map(move |why| (&f.name, why)))
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(s, "\nFailed in this run (empty cells):\n");
        for (name, why) in failures {
            let _ = writeln!(s, "- {name}, {why}");
        }
    }
    s
}

/// `xtask bench-chart`: draws docs/bench/results.svg again from results.json.
pub(crate) fn redraw_chart() -> Result<()> {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench");
    let json = std::fs::read_to_string(out.join("results.json"))?;
    let results: Vec<Figures> = serde_json::from_str(&json).context("docs/bench/results.json")?;
    std::fs::write(out.join("results.svg"), chart::render(&results)?)?;
    println!("bench: wrote docs/bench/results.svg");
    Ok(())
}
