//! `cargo xtask bench --wan`: VPNs across a lossy, delayed WAN, to measure what terminating TCP
//! is for (no TCP-over-TCP "meltdown").
//!
//! ```text
//!  client ns                                                   far ns
//!  kernel TCP/UDP clients ── the system's tunnel ── pwana ══ WAN link ══ pwanb ── servers
//!  (targets 10.200.0.0/16)                       10.97.0.1          10.97.0.2    targets on lo
//! ```
//!
//! The WAN link is `wan.rs` (one-way delay, random loss, an optional rate cap with a 50 ms
//! drop-tail queue). Systems, each set up here: no VPN (the kernel routes the targets across
//! the link), and Prism (TCP through dante on the far side with the SOCKS5 exchange pipelined,
//! `--socks5-pipeline`, everything else through `prism relay-server` there). For every cell
//! (20 ms each way; loss 0, 0.5% and 2%; uncapped and capped at 100 Mbit/s) it measures, in
//! the client namespace:
//! - one TCP flow up and down and 4 flows each way (iperf3, median of the runs);
//! - round trips under load: ping and a 1-byte TCP request/response while 4 flows download
//!   (p50, p99; the median of the runs);
//! - a page load: 200 fetches of 100 KB, 8 at a time (total seconds);
//! - UDP: the highest rate losing under 1% beyond the link's own loss (`udp_load`: GSO batches
//!   of 1,200-byte datagrams, by bisection); ping at idle.
//!
//! `PRISM_WAN_SECONDS` (20) and `PRISM_WAN_RUNS` (3) set the iperf3 runs; `PRISM_WAN_LOSS`
//! ("0,0.5,2", percent) and `PRISM_WAN_CAPS` ("none,100", Mbit/s) the cells; `PRISM_WAN_ONLY`
//! the systems ("none,openvpn-tcp,openvpn-udp,wireguard-go,prism"). A whole run writes
//! `docs/bench/wan.{json,md,svg}` afresh. A subset is only printed, unless `PRISM_WAN_WRITE=1`:
//! then its cells replace the same (system, loss, cap) cells in `wan.json` and the rest stay,
//! so a full run can be made in parts (it takes about 2.75 hours); each row of the table says
//! when it was measured and with how long a run.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::chart;
use crate::e2e::in_netns;
use crate::netns::{Netns, Process};
use crate::servers;
use crate::stats::{self, percentile};
use crate::tools;
use crate::udp_load;
use crate::wan::{ADDR_A, ADDR_B, DEV_A, DEV_B, Shape, Wan};

const TARGET: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1));
const TARGET_NET: &str = "10.200.0.0/16";
const IPERF_PORT: u16 = 5201;
/// Where the UDP load generator's sink listens, on `TARGET`.
const UDP_LOAD_PORT: u16 = 5202;
const DANTE_PORT: u16 = 1082;
const RELAY_PORT: u16 = 5555;
const DELAY: Duration = Duration::from_millis(20);
/// What a page load fetches: this many objects of this size, this many at a time.
const PAGE_OBJECTS: usize = 200;
/// The demo's shorter page load.
const DEMO_OBJECTS: usize = 40;
const PAGE_OBJECT: u64 = 100_000;
const PAGE_PARALLEL: usize = 8;

/// One system in one cell.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Cell {
    system: String,
    loss_percent: f64,
    cap_mbit: Option<u64>,
    up_mbit: Option<f64>,
    down_mbit: Option<f64>,
    up4_mbit: Option<f64>,
    down4_mbit: Option<f64>,
    ping_load_p50_ms: Option<f64>,
    ping_load_p99_ms: Option<f64>,
    rr_load_p50_ms: Option<f64>,
    rr_load_p99_ms: Option<f64>,
    page_load_s: Option<f64>,
    udp_max_mbit: Option<f64>,
    ping_idle_ms: Option<f64>,
    /// Share of the machine's CPU time that was busy during the 4-flow tests (median): near 1,
    /// the link, both tunnel ends and the servers were short of CPU, not of bandwidth.
    cpu_busy_4flows: Option<f64>,
    /// Share of packets the link itself sent over 1 ms late, and its latest (ms).
    link_late_share: f64,
    link_latest_ms: f64,
    failures: Vec<String>,
    /// When (UTC day) and with how long iperf3 runs (seconds, how many) the cell was measured.
    measured: String,
    seconds: u64,
    runs: usize,
    /// Of how many runs the round trips under load are the median, p50 and p99 each its own
    /// (0 in cells measured before they were: one run).
    load_runs: usize,
}

impl Cell {
    /// Runs one measurement; a failure is recorded, not fatal.
    fn attempt<T>(&mut self, what: &str, measure: impl FnOnce() -> Result<T>) -> Option<T> {
        attempt(&mut self.failures, what, measure)
    }
}

/// Runs one measurement; a failure is printed and added to `failures`, not fatal.
fn attempt<T>(
    failures: &mut Vec<String>,
    what: &str,
    measure: impl FnOnce() -> Result<T>,
) -> Option<T> {
    match measure() {
        Ok(value) => Some(value),
        Err(error) => {
            println!("    {what} failed: {error:#}");
            failures.push(format!("{what}: {error:#}"));
            None
        }
    }
}

/// One system in the local relay bench.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct RelayFigures {
    system: String,
    udp_max_mbit: Option<f64>,
    /// The same from the far side down to the client.
    udp_down_max_mbit: Option<f64>,
    rr_p50_us: Option<f64>,
    rr_p99_us: Option<f64>,
    rr_per_second: Option<f64>,
    ping_idle_ms: Option<f64>,
    failures: Vec<String>,
}

/// The local relay bench (`cargo xtask bench --relay`, and the end of `cargo xtask bench`):
/// UDP through Prism's relay and through wireguard-go, each between the same two namespaces
/// joined by a veth pair (no WAN link, no shaping), with no VPN beside them. For each: the
/// highest UDP rate losing under 1% (`udp_load`, 1,200-byte datagrams, by bisection up to
/// 20 Gbit/s) from the client to the far side and back down, 4-byte UDP request/response for
/// 5 s (round trip p50 and p99, transactions a second), and ping at idle. Writes `docs/bench/relay.{json,md}`. `PRISM_BENCH_BINARY`
/// measures that `prism` binary instead of building this tree's.
pub(crate) fn relay_local() -> Result<()> {
    ensure!(tools::is_root(), "bench --relay needs root");
    crate::netns::sweep();
    tools::ensure(&[
        ("iperf3", "iperf3"),
        ("danted", "dante-server"),
        ("ping", "iputils-ping"),
        ("wireguard-go", "wireguard-go"),
        ("wg", "wireguard-tools"),
    ])?;
    // Another build to compare with, when given.
    let prism = match std::env::var_os("PRISM_BENCH_BINARY") {
        Some(binary) => binary.into(),
        None => crate::e2e::build_prism()?,
    };
    let logs = std::env::temp_dir().join(format!("prism-relay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;
    println!("bench --relay: logs in {}", logs.display());
    let bench = Bench::build(&logs, &prism, false)?;
    let mut results = Vec::new();
    // PRISM_BENCH_ONLY=none|wireguard-go|prism, or several separated by commas, measures those
    // only (for experiments; the table is printed, not written).
    let only = std::env::var("PRISM_BENCH_ONLY").unwrap_or_default();
    let wanted = |system: System| only.is_empty() || only.split(',').any(|k| k == system.key());
    for system in [System::None, System::WireGuardGo, System::Prism] {
        if !wanted(system) {
            continue;
        }
        println!("bench --relay: {}", system.name());
        let mut running = bench.start(system)?;
        let mut f = RelayFigures {
            system: system.name().to_owned(),
            ..RelayFigures::default()
        };
        f.udp_max_mbit = attempt(&mut f.failures, "UDP", || {
            bench.udp_max(0.0, 20_000.0, Way::Up)
        });
        if let Some(client) = system.client_address() {
            f.udp_down_max_mbit = attempt(&mut f.failures, "UDP down", || {
                bench.udp_max(0.0, 20_000.0, Way::Down(client))
            });
        }
        if let Some((p50, p99, rate)) =
            attempt(&mut f.failures, "UDP request/response", || bench.udp_rr())
        {
            f.rr_p50_us = Some(p50);
            f.rr_p99_us = Some(p99);
            f.rr_per_second = Some(rate);
        }
        f.ping_idle_ms = attempt(&mut f.failures, "idle ping", || bench.ping(20, "0.1"))
            .map(|rtts| percentile(&rtts, 50));
        println!("    {f:?}");
        results.push(f);
        for process in &mut running {
            let _ = process.stop(Signal::SIGINT, Duration::from_secs(10));
        }
        drop(running);
        bench.stop(system)?;
    }
    let md = relay_table(&results);
    println!("{md}");
    if !only.is_empty() {
        return Ok(());
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench");
    std::fs::write(
        dir.join("relay.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(dir.join("relay.md"), md)?;
    println!("bench --relay: wrote docs/bench/relay.json and relay.md");
    Ok(())
}

/// The demo's last scene: OpenVPN over TCP and Prism side by side across the WAN link at 2%
/// loss (20 ms each way, 100 Mbit/s): one download, ping while 4 flows download, and a short
/// page load. About a minute.
pub(crate) fn demo_scene(prism: &Path) -> Result<()> {
    tools::ensure(&[
        ("iperf3", "iperf3"),
        ("ping", "iputils-ping"),
        ("openvpn", "openvpn"),
        ("openssl", "openssl"),
    ])?;
    let logs = std::env::temp_dir().join(format!("prism-demo-wan-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;
    let started = Instant::now();
    let bench = Bench::build(&logs, prism, true)?;
    let wan = bench.wan.as_ref().context("the WAN link")?;
    wan.set_shape(Shape {
        loss: 0.02,
        rate: Some((100_000_000, Duration::from_millis(50))),
        ..Shape::delay(DELAY)
    });
    println!();
    println!(
        "  Across a lossy WAN (the userspace link of `cargo xtask bench --wan`: 20 ms each way, \
         2% loss, 100 Mbit/s):"
    );
    println!("  TCP over OpenVPN's TCP tunnel (TCP over TCP) against Prism (TCP terminated, only");
    println!("  payload crosses, here through SOCKS5).");
    let mut columns = Vec::new();
    for system in [System::OpenVpnTcp, System::Prism] {
        let mut running = bench.start(system)?;
        let mut failures = Vec::new();
        let down = attempt(&mut failures, "download", || bench.iperf_once(5, &["-R"]));
        let ping = attempt(&mut failures, "ping under load", || bench.ping_under_load());
        let page = attempt(&mut failures, "page load", || bench.page_load(DEMO_OBJECTS));
        for process in &mut running {
            let _ = process.stop(Signal::SIGINT, Duration::from_secs(10));
        }
        drop(running);
        bench.stop(system)?;
        ensure!(
            failures.is_empty(),
            "{}: {}",
            system.name(),
            failures.join("; ")
        );
        columns.push((down, ping, page));
    }
    let show = |v: Option<f64>, unit: &str| v.map_or("-".to_owned(), |v| format!("{v:.1} {unit}"));
    let pings = |v: Option<(f64, f64)>| {
        v.map_or("-".to_owned(), |(p50, p99)| {
            format!("{p50:.0} / {p99:.0} ms")
        })
    };
    let [(vpn_down, vpn_ping, vpn_page), (down, ping, page)] = columns[..] else {
        bail!("two systems measured");
    };
    println!("  {:<46} {:<18} Prism", "", "OpenVPN over TCP");
    for (name, vpn, prism) in [
        (
            "one TCP download, 5 s",
            show(vpn_down, "Mbit/s"),
            show(down, "Mbit/s"),
        ),
        (
            "ping while 4 flows download, p50 / p99",
            pings(vpn_ping),
            pings(ping),
        ),
        (
            "page load: 40 objects of 100 KB, 8 at a time",
            show(vpn_page, "s"),
            show(page, "s"),
        ),
    ] {
        println!("  {name:<46} {vpn:<18} {prism}");
    }
    println!(
        "  (Ping crosses the link's 50 ms queue at the cap, full while the downloads keep up \
         with the link.) {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    drop(bench);
    let _ = std::fs::remove_dir_all(&logs);
    Ok(())
}

fn relay_table(results: &[RelayFigures]) -> String {
    let cell =
        |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    let mut md = String::from(
        "# The relay, locally\n\n`cargo xtask bench --relay` (also run by `cargo xtask bench`): \
         two namespaces joined by a veth pair, UDP from the client namespace to a target on the \
         far side: through no VPN, through wireguard-go, and through Prism's relay (`prism run` \
         with a pre-shared key, `prism relay-server` on the far side). The UDP load is sent as a \
         fast sender (QUIC) sends it: batches of 1,200-byte datagrams, one `sendmsg` each with \
         UDP GSO (`xtask/src/udp_load.rs`; iperf3 3.12, one datagram per call, measured itself \
         at about 700 Mbit/s here).\n\n\
         | system | UDP up, highest rate under 1% loss (Mbit/s) | UDP down (Mbit/s) | UDP \
         request/response p50 / p99 (µs) | transactions/s | ping at idle (ms) |\n\
         |---|---|---|---|---|---|\n",
    );
    for f in results {
        md.push_str(&format!(
            "| {} | {} | {} | {} / {} | {} | {} |\n",
            f.system,
            cell(f.udp_max_mbit, 0),
            cell(f.udp_down_max_mbit, 0),
            cell(f.rr_p50_us, 0),
            cell(f.rr_p99_us, 0),
            cell(f.rr_per_second, 0),
            cell(f.ping_idle_ms, 3),
        ));
        for failure in &f.failures {
            md.push_str(&format!("\n{}: {failure}\n", f.system));
        }
    }
    md
}

fn list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Which way a UDP test goes: from the client to the far side's target, or from the far
/// side down to the client's address in the system under test.
#[derive(Debug, Clone, Copy)]
enum Way {
    Up,
    Down(IpAddr),
}

/// The systems under test.
#[derive(Debug, Clone, Copy, PartialEq)]
enum System {
    None,
    OpenVpnTcp,
    OpenVpnUdp,
    WireGuardGo,
    Prism,
}

impl System {
    const ALL: [System; 5] = [
        System::None,
        System::OpenVpnTcp,
        System::OpenVpnUdp,
        System::WireGuardGo,
        System::Prism,
    ];

    /// The client's own address in this system, which the far side sends to (`None`: not
    /// measured that way).
    fn client_address(self) -> Option<IpAddr> {
        match self {
            System::None => Some(ADDR_A.into()),
            System::WireGuardGo => Some(Ipv4Addr::new(10, 9, 0, 2).into()),
            System::Prism => Some(Ipv4Addr::new(10, 99, 0, 1).into()),
            System::OpenVpnTcp | System::OpenVpnUdp => None,
        }
    }

    fn key(self) -> &'static str {
        match self {
            System::None => "none",
            System::OpenVpnTcp => "openvpn-tcp",
            System::OpenVpnUdp => "openvpn-udp",
            System::WireGuardGo => "wireguard-go",
            System::Prism => "prism",
        }
    }

    fn name(self) -> &'static str {
        match self {
            System::None => "no VPN (kernel routing)",
            System::OpenVpnTcp => "OpenVPN over TCP",
            System::OpenVpnUdp => "OpenVPN over UDP",
            System::WireGuardGo => "wireguard-go",
            System::Prism => "Prism (TCP via SOCKS5, the rest via its relay)",
        }
    }
}

/// Every tunnel's TUN gets this transmit queue (Prism's default).
const TUN_QUEUE: &str = "4096";
const OPENVPN_PORT: &str = "1194";

/// The namespaces, the link, and the far side's servers.
struct Bench {
    client: Netns,
    far: Netns,
    /// The WAN link; `None`: a veth pair with the same devices and addresses (the local
    /// relay bench).
    wan: Option<Wan>,
    logs: std::path::PathBuf,
    prism: std::path::PathBuf,
    _servers: Vec<Process>,
}

pub(crate) fn run() -> Result<()> {
    ensure!(tools::is_root(), "bench --wan needs root");
    // The variables are read first: a wrong one fails before anything is set up.
    let seconds = tools::positive_env("PRISM_WAN_SECONDS", 20)?;
    let runs = tools::positive_env("PRISM_WAN_RUNS", 3)? as usize;
    let losses: Vec<f64> = list("PRISM_WAN_LOSS", "0,0.5,2")
        .iter()
        .map(|l| l.parse().context("PRISM_WAN_LOSS: percentages"))
        .collect::<Result<_>>()?;
    let caps: Vec<Option<u64>> = list("PRISM_WAN_CAPS", "none,100")
        .iter()
        .map(|c| match c.as_str() {
            "none" => Ok(None),
            mbit => mbit
                .parse()
                .map(Some)
                .context("PRISM_WAN_CAPS: none or Mbit/s"),
        })
        .collect::<Result<_>>()?;
    let only = list("PRISM_WAN_ONLY", "");
    if let Some(unknown) = only
        .iter()
        .find(|o| !System::ALL.iter().any(|s| s.key() == o.as_str()))
    {
        let known: Vec<&str> = System::ALL.iter().map(|s| s.key()).collect();
        bail!(
            "PRISM_WAN_ONLY: no system {unknown:?} (one of {})",
            known.join(", ")
        );
    }
    let subset = !only.is_empty()
        || std::env::var_os("PRISM_WAN_LOSS").is_some()
        || std::env::var_os("PRISM_WAN_CAPS").is_some();
    crate::netns::sweep();
    tools::ensure(&[
        ("iperf3", "iperf3"),
        ("danted", "dante-server"),
        ("ping", "iputils-ping"),
        ("openvpn", "openvpn"),
        ("openssl", "openssl"),
        ("wireguard-go", "wireguard-go"),
        ("wg", "wireguard-tools"),
    ])?;
    let prism = crate::e2e::build_prism()?;
    let logs = std::env::temp_dir().join(format!("prism-wan-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;
    println!("bench --wan: logs in {}", logs.display());
    let bench = Bench::build(&logs, &prism, true)?;
    let wan = bench.wan.as_ref().context("the WAN link")?;

    let today = today()?;
    let mut cells = Vec::new();
    for system in System::ALL {
        if !only.is_empty() && !only.iter().any(|o| o == system.key()) {
            continue;
        }
        println!("bench --wan: {}", system.name());
        let mut running = bench.start(system)?;
        for &cap in &caps {
            for &loss in &losses {
                let shape = Shape {
                    loss: loss / 100.0,
                    rate: cap.map(|mbit| (mbit * 1_000_000, Duration::from_millis(50))),
                    ..Shape::delay(DELAY)
                };
                wan.set_shape(shape);
                println!(
                    "  loss {loss}%, {}",
                    cap.map_or("uncapped".to_owned(), |c| format!("{c} Mbit/s"))
                );
                let mut cell = Cell {
                    system: system.name().to_owned(),
                    loss_percent: loss,
                    cap_mbit: cap,
                    measured: today.clone(),
                    seconds,
                    runs,
                    ..Cell::default()
                };
                let before = late(wan);
                bench.measure(&mut cell, seconds, runs);
                let after = late(wan);
                let packets = (after.0 - before.0).max(1) as f64;
                cell.link_late_share = (after.1 - before.1) as f64 / packets;
                cell.link_latest_ms = after.2 as f64 / 1000.0;
                println!("    {cell:?}");
                cells.push(cell);
            }
        }
        for process in &mut running {
            let _ = process.stop(Signal::SIGINT, Duration::from_secs(10));
        }
        drop(running);
        bench.stop(system)?;
    }
    println!("{}", table(&cells));
    if subset && std::env::var_os("PRISM_WAN_WRITE").is_none() {
        println!(
            "bench --wan: a subset was asked; docs/bench/wan.* left as they are \
             (PRISM_WAN_WRITE=1 puts its cells in them)"
        );
        return Ok(());
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench");
    if subset {
        let json = std::fs::read_to_string(dir.join("wan.json"))?;
        let earlier: Vec<Cell> = serde_json::from_str(&json).context("docs/bench/wan.json")?;
        cells = merge(earlier, cells);
    }
    std::fs::write(dir.join("wan.json"), serde_json::to_string_pretty(&cells)?)?;
    let md = dir.join("wan.md");
    let earlier = std::fs::read_to_string(&md).unwrap_or_default();
    std::fs::write(&md, keep_commentary(table(&cells), &earlier))?;
    std::fs::write(dir.join("wan.svg"), chart(&cells)?)?;
    println!("bench --wan: wrote docs/bench/wan.json, wan.md and wan.svg");
    Ok(())
}

/// One run of round trips under load, in ms: (p50, p99) of ping and of request/response.
struct UnderLoad {
    ping: (f64, f64),
    rr: (f64, f64),
}

/// The machine's CPU time so far (all cores, in clock ticks): busy and in all.
struct CpuTimes {
    busy: u64,
    total: u64,
}

impl CpuTimes {
    fn now() -> Result<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat")?)
    }

    /// From `/proc/stat`'s first line: user nice system idle iowait irq softirq steal (guest
    /// time is within user); idle and iowait are not busy.
    fn parse(stat: &str) -> Result<CpuTimes> {
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .context("no cpu line in /proc/stat")?
            .split_whitespace()
            .take(8)
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        let &[user, nice, system, idle, iowait, irq, softirq, steal] = &ticks[..] else {
            bail!("a short cpu line in /proc/stat");
        };
        let busy = user + nice + system + irq + softirq + steal;
        Ok(CpuTimes {
            busy,
            total: busy + idle + iowait,
        })
    }

    /// The share of CPU time since `before` that was busy.
    fn busy_since(&self, before: &CpuTimes) -> f64 {
        // iowait, counted as idle, may step back: saturate rather than wrap.
        let busy = self.busy.saturating_sub(before.busy);
        busy as f64 / self.total.saturating_sub(before.total).max(1) as f64
    }
}

/// Today's UTC date, as `date` prints it (YYYY-MM-DD).
fn today() -> Result<String> {
    let out = std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .context("running date")?;
    ensure!(out.status.success(), "date -u +%F failed");
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// `earlier` cells with those `fresh` measured again replaced, in the table's order: by
/// system (as in `System::ALL`, unknown names last), cap (uncapped first), then loss.
fn merge(earlier: Vec<Cell>, fresh: Vec<Cell>) -> Vec<Cell> {
    let same = |a: &Cell, b: &Cell| {
        a.system == b.system && a.loss_percent == b.loss_percent && a.cap_mbit == b.cap_mbit
    };
    let mut cells: Vec<Cell> = earlier
        .into_iter()
        .filter(|old| !fresh.iter().any(|new| same(old, new)))
        .collect();
    cells.extend(fresh);
    let rank = |c: &Cell| {
        System::ALL
            .iter()
            .position(|s| s.name() == c.system)
            .unwrap_or(System::ALL.len())
    };
    cells.sort_by(|a, b| {
        (rank(a), a.cap_mbit.is_some(), a.cap_mbit)
            .cmp(&(rank(b), b.cap_mbit.is_some(), b.cap_mbit))
            .then(a.loss_percent.total_cmp(&b.loss_percent))
    });
    cells
}

/// The link's (packets, packets over 1 ms late, latest µs) so far, both directions.
fn late(wan: &Wan) -> (u64, u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    wan.counts.iter().fold((0, 0, 0), |(p, l, m), c| {
        (
            p + c.forwarded.load(Relaxed),
            l + c.late.load(Relaxed),
            m.max(c.latest_us.swap(0, Relaxed)),
        )
    })
}

impl Bench {
    fn build(logs: &Path, prism: &Path, wan: bool) -> Result<Bench> {
        let client = Netns::create("wanc")?;
        let far = Netns::create("wanf")?;
        for ns in [&client, &far] {
            ns.ip("link set lo up")?;
            // Windows for a long fat link (Linux's default 6 MB caps a flow near 600 Mbit/s
            // over a 40 ms round trip), and every system gets the same.
            for (key, value) in [
                ("net.ipv4.tcp_rmem", "4096 131072 33554432"),
                ("net.ipv4.tcp_wmem", "4096 16384 33554432"),
                ("net.ipv4.tcp_congestion_control", "bbr"),
            ] {
                let _ = ns.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")]);
            }
        }
        far.ip(&format!("addr add {TARGET}/32 dev lo"))?;
        let wan = if wan {
            Some(Wan::start(&client, &far, Shape::delay(DELAY))?)
        } else {
            crate::netns::veth(&client, DEV_A, &far, DEV_B)?;
            client.ip(&format!("addr add {ADDR_A}/30 dev {DEV_A}"))?;
            far.ip(&format!("addr add {ADDR_B}/30 dev {DEV_B}"))?;
            client.ip(&format!("link set {DEV_A} up"))?;
            far.ip(&format!("link set {DEV_B} up"))?;
            None
        };
        // The far side reaches the client's tunnel addresses (10.99.0.0/24 comes back through
        // the relay server's TUN, which routes it itself).
        let mut servers = Vec::new();
        let mut targets = std::process::Command::new(std::env::current_exe()?);
        targets.args(["serve-targets", far.name(), &TARGET.to_string()]);
        servers.push(Process::spawn(
            "test servers",
            targets,
            Some(&logs.join("servers.log")),
        )?);
        crate::topology::wait_listening(&far, servers::SOURCE, 1, "the test servers")?;
        let mut iperf = far.command("iperf3");
        // A test a tunnel wedges must not keep the server busy for the next ones.
        iperf.args(["--snd-timeout", "10000", "--rcv-timeout", "15000"]);
        iperf.args([
            "-s",
            "-B",
            &TARGET.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
        ]);
        servers.push(Process::spawn(
            "iperf3 server",
            iperf,
            Some(&logs.join("iperf3.log")),
        )?);
        crate::topology::wait_listening(&far, IPERF_PORT, 1, "iperf3")?;
        servers.push(crate::topology::dante(
            &far,
            &[&ADDR_B.to_string()],
            DANTE_PORT,
            logs,
        )?);
        crate::topology::wait_listening(&far, DANTE_PORT, 1, "dante")?;
        Ok(Bench {
            client,
            far,
            wan,
            logs: logs.to_owned(),
            prism: prism.to_owned(),
            _servers: servers,
        })
    }

    /// Sets `system` up; the processes to stop afterwards.
    fn start(&self, system: System) -> Result<Vec<Process>> {
        match system {
            System::None => {
                self.client
                    .ip(&format!("route add {TARGET_NET} dev {DEV_A}"))?;
                Ok(Vec::new())
            }
            System::OpenVpnTcp | System::OpenVpnUdp => self.openvpn(system == System::OpenVpnTcp),
            System::WireGuardGo => self.wireguard_go(),
            System::Prism => {
                let key = self.logs.join("relay.key");
                std::fs::write(&key, "a pre-shared key for the WAN bench relay\n")?;
                let listen = format!("{ADDR_B}:{RELAY_PORT}");
                let relay = crate::relay_e2e::start_relay_server(
                    &self.far,
                    &self.prism,
                    &listen,
                    &["--key-file".as_ref(), key.as_os_str()],
                    &self.logs,
                    "relay-server.log",
                )?;
                let mut client = self.client.command(&self.prism);
                client.args([
                    "run",
                    "--tun",
                    "prism0",
                    "--address",
                    "10.99.0.1/24",
                    "--route",
                    TARGET_NET,
                    "--upstream",
                    &format!("socks5://{ADDR_B}:{DANTE_PORT}"),
                    "--socks5-pipeline",
                    "--relay",
                    &format!("udp://{ADDR_B}:{RELAY_PORT}"),
                    "--relay-key-file",
                ]);
                client.arg(&key);
                let process =
                    Process::spawn("prism run", client, Some(&self.logs.join("prism.log")))?;
                crate::netns::wait_for("prism's route", Duration::from_secs(10), || {
                    self.client
                        .ip("route show 10.200.0.0/16")
                        .is_ok_and(|r| r.contains("prism0"))
                })?;
                Ok(vec![process, relay])
            }
        }
    }

    /// OpenVPN point to point with TLS (self-signed certificates pinned by fingerprint, the
    /// AES-256-GCM data channel it negotiates by default), in userspace (no DCO module here):
    /// 10.8.0.1 on the far side, 10.8.0.2 here, the targets routed into it.
    fn openvpn(&self, tcp: bool) -> Result<Vec<Process>> {
        let cert = |name: &str| -> Result<(std::path::PathBuf, std::path::PathBuf, String)> {
            let (crt, key) = (
                self.logs.join(format!("{name}.crt")),
                self.logs.join(format!("{name}.key")),
            );
            crate::netns::run(
                "openssl",
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    "30",
                    "-subj",
                    &format!("/CN={name}"),
                    "-keyout",
                    &key.display().to_string(),
                    "-out",
                    &crt.display().to_string(),
                ],
            )?;
            let fingerprint = crate::netns::run(
                "openssl",
                &[
                    "x509",
                    "-in",
                    &crt.display().to_string(),
                    "-noout",
                    "-fingerprint",
                    "-sha256",
                ],
            )?;
            let fingerprint = fingerprint
                .trim()
                .rsplit('=')
                .next()
                .context("no fingerprint")?
                .to_owned();
            Ok((crt, key, fingerprint))
        };
        let (server_crt, server_key, server_fp) = cert("openvpn-server")?;
        let (client_crt, client_key, client_fp) = cert("openvpn-client")?;
        let common = |cmd: &mut std::process::Command, crt: &Path, key: &Path, peer: &str| {
            cmd.args([
                "--dev",
                "tun",
                "--dev-type",
                "tun",
                "--disable-dco",
                "--verb",
                "3",
            ]);
            cmd.args(["--txqueuelen", TUN_QUEUE, "--dh", "none", "--cert"]);
            cmd.arg(crt).arg("--key").arg(key);
            cmd.args([
                "--peer-fingerprint",
                peer,
                "--ping",
                "5",
                "--ping-restart",
                "30",
            ]);
        };
        let mut server = self.far.command("openvpn");
        common(&mut server, &server_crt, &server_key, &client_fp);
        server.args(["--tls-server", "--ifconfig", "10.8.0.1", "10.8.0.2"]);
        server.args(["--local", &ADDR_B.to_string(), "--lport", OPENVPN_PORT]);
        server.args(["--proto", if tcp { "tcp-server" } else { "udp" }]);
        let server = Process::spawn(
            "openvpn server",
            server,
            Some(&self.logs.join(format!("openvpn-server-{tcp}.log"))),
        )?;
        let mut client = self.client.command("openvpn");
        common(&mut client, &client_crt, &client_key, &server_fp);
        client.args(["--tls-client", "--ifconfig", "10.8.0.2", "10.8.0.1"]);
        client.args(["--remote", &ADDR_B.to_string(), OPENVPN_PORT]);
        client.args(["--proto", if tcp { "tcp-client" } else { "udp" }]);
        client.args(["--route", "10.200.0.0", "255.255.0.0", "10.8.0.1"]);
        let client = Process::spawn(
            "openvpn client",
            client,
            Some(&self.logs.join(format!("openvpn-client-{tcp}.log"))),
        )?;
        crate::netns::wait_for("OpenVPN's tunnel", Duration::from_secs(30), || {
            client.log().contains("Initialization Sequence Completed")
        })
        .with_context(|| client.log())?;
        Ok(vec![client, server])
    }

    /// wireguard-go (Debian's) configured with wireguard-tools' `wg`: 10.9.0.1 on the far
    /// side, 10.9.0.2 here, the targets routed into it.
    fn wireguard_go(&self) -> Result<Vec<Process>> {
        let key = || -> Result<(String, String)> {
            let private = crate::netns::run("wg", &["genkey"])?.trim().to_owned();
            let mut pubkey = std::process::Command::new("wg")
                .arg("pubkey")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()?;
            if let Some(mut stdin) = pubkey.stdin.take() {
                std::io::Write::write_all(&mut stdin, private.as_bytes())?;
            }
            let public = String::from_utf8_lossy(&pubkey.wait_with_output()?.stdout)
                .trim()
                .to_owned();
            Ok((private, public))
        };
        let (far_private, far_public) = key()?;
        let (client_private, client_public) = key()?;
        let mut processes = Vec::new();
        for (ns, dev, private, address) in [
            (&self.far, "pwgf", &far_private, "10.9.0.1/24"),
            (&self.client, "pwgc", &client_private, "10.9.0.2/24"),
        ] {
            let mut daemon = ns.command("wireguard-go");
            daemon.args(["-f", dev]);
            processes.push(Process::spawn(
                "wireguard-go",
                daemon,
                Some(&self.logs.join(format!("{dev}.log"))),
            )?);
            // wg talks to wireguard-go over its socket, which comes a moment after the TUN;
            // asked before, wg turns to the kernel's WireGuard, which this machine lacks.
            let socket = format!("/var/run/wireguard/{dev}.sock");
            crate::netns::wait_for(
                "wireguard-go's TUN and socket",
                Duration::from_secs(10),
                || ns.ip(&format!("link show {dev}")).is_ok() && Path::new(&socket).exists(),
            )?;
            let file = self.logs.join(format!("{dev}.key"));
            std::fs::write(&file, private)?;
            ns.exec(&["wg", "set", dev, "private-key", &file.display().to_string()])?;
            ns.ip(&format!("addr add {address} dev {dev}"))?;
            ns.ip(&format!(
                "link set {dev} mtu 1420 txqueuelen {TUN_QUEUE} up"
            ))?;
        }
        self.far.exec(&[
            "wg",
            "set",
            "pwgf",
            "listen-port",
            "51820",
            "peer",
            &client_public,
            "allowed-ips",
            "10.9.0.2/32",
        ])?;
        self.client.exec(&[
            "wg",
            "set",
            "pwgc",
            "peer",
            &far_public,
            "endpoint",
            &format!("{ADDR_B}:51820"),
            "allowed-ips",
            "10.9.0.1/32,10.200.0.0/16",
            "persistent-keepalive",
            "25",
        ])?;
        self.client
            .ip(&format!("route add {TARGET_NET} dev pwgc"))?;
        Ok(processes)
    }

    fn stop(&self, system: System) -> Result<()> {
        if system == System::None {
            self.client
                .ip(&format!("route del {TARGET_NET} dev {DEV_A}"))?;
        }
        Ok(())
    }

    fn measure(&self, cell: &mut Cell, seconds: u64, runs: usize) {
        // Each test's Mbit/s and the share of the machine's CPU time that was busy meanwhile.
        let tests = |cell: &mut Cell, what: &str, args: &[&str]| -> Vec<(f64, f64)> {
            (0..runs)
                .filter_map(|_| {
                    cell.attempt(what, || {
                        tools::retried(&format!("iperf3 {args:?}"), Duration::from_secs(2), || {
                            let before = CpuTimes::now()?;
                            let mbit = self.iperf_once(seconds, args)?;
                            Ok((mbit, CpuTimes::now()?.busy_since(&before)))
                        })
                    })
                })
                .collect()
        };
        let mbit = |tests: &[(f64, f64)]| stats::median(tests.iter().map(|t| t.0).collect());
        cell.up_mbit = mbit(&tests(cell, "1 flow up", &[]));
        cell.down_mbit = mbit(&tests(cell, "1 flow down", &["-R"]));
        let up4 = tests(cell, "4 flows up", &["-P", "4"]);
        let down4 = tests(cell, "4 flows down", &["-P", "4", "-R"]);
        cell.up4_mbit = mbit(&up4);
        cell.down4_mbit = mbit(&down4);
        cell.cpu_busy_4flows = stats::median(up4.iter().chain(&down4).map(|t| t.1).collect());
        // Like iperf3's, the round trips under load are the median of the runs: whether four
        // flows fill the link's queue differs from run to run at low loss, for any system.
        let loaded: Vec<_> = (0..runs)
            .filter_map(|_| cell.attempt("round trips under load", || self.under_load()))
            .collect();
        let of_runs =
            |figure: fn(&UnderLoad) -> f64| stats::median(loaded.iter().map(figure).collect());
        cell.ping_load_p50_ms = of_runs(|l| l.ping.0);
        cell.ping_load_p99_ms = of_runs(|l| l.ping.1);
        cell.rr_load_p50_ms = of_runs(|l| l.rr.0);
        cell.rr_load_p99_ms = of_runs(|l| l.rr.1);
        cell.load_runs = loaded.len();
        cell.page_load_s = cell.attempt("page load", || self.page_load(PAGE_OBJECTS));
        let loss = cell.loss_percent;
        cell.udp_max_mbit = cell.attempt("UDP", || self.udp_max(loss, 2000.0, Way::Up));
        cell.ping_idle_ms = cell
            .attempt("idle ping", || self.ping(20, "0.1"))
            .map(|rtts| percentile(&rtts, 50));
    }

    /// Mbit/s an iperf3 TCP test received.
    fn iperf_once(&self, seconds: u64, extra: &[&str]) -> Result<f64> {
        let target = TARGET.to_string();
        let port = IPERF_PORT.to_string();
        let secs = seconds.to_string();
        let deadline = (seconds + 30).to_string();
        let mut args = vec![
            "timeout", &deadline, "iperf3", "-c", &target, "-p", &port, "-t", &secs, "-J",
        ];
        args.extend_from_slice(extra);
        let out = self.client.exec(&args)?;
        json_number(&out, "sum_received", "bits_per_second").map(|bps| bps / 1e6)
    }

    /// Per-echo round trips (ms) of `count` pings at `interval` seconds.
    fn ping(&self, count: usize, interval: &str) -> Result<Vec<f64>> {
        let out = self
            .client
            .command("ping")
            .args(["-c", &count.to_string(), "-i", interval, "-W", "2"])
            .arg(TARGET.to_string())
            .output()?;
        let out = String::from_utf8_lossy(&out.stdout);
        let mut rtts: Vec<f64> = out
            .lines()
            .filter_map(|l| l.split("time=").nth(1))
            .filter_map(|t| t.trim_end_matches(" ms").trim().parse().ok())
            .collect();
        ensure!(!rtts.is_empty(), "no echo came back:\n{out}");
        rtts.sort_by(f64::total_cmp);
        Ok(rtts)
    }

    /// Ping (p50, p99) for 5 s while 4 flows download.
    fn ping_under_load(&self) -> Result<(f64, f64)> {
        let mut load = self.client.command("iperf3");
        load.args(["-c", &TARGET.to_string(), "-p", &IPERF_PORT.to_string()]);
        load.args(["-t", "9", "-P", "4", "-R"]);
        let mut load = Process::spawn("iperf3 load", load, Some(&self.logs.join("load.log")))?;
        std::thread::sleep(Duration::from_secs(2));
        let pings = self.ping(50, "0.1");
        let _ = load.stop(Signal::SIGINT, Duration::from_secs(5));
        let pings = pings?;
        Ok((percentile(&pings, 50), percentile(&pings, 99)))
    }

    /// Ping and a 1-byte TCP request/response, each for 5 s, while 4 flows download.
    fn under_load(&self) -> Result<UnderLoad> {
        let mut load = self.client.command("iperf3");
        load.args(["-c", &TARGET.to_string(), "-p", &IPERF_PORT.to_string()]);
        load.args(["-t", "14", "-P", "4", "-R"]);
        let mut load = Process::spawn("iperf3 load", load, Some(&self.logs.join("load.log")))?;
        std::thread::sleep(Duration::from_secs(2));
        let pings = self.ping(100, "0.05");
        let rr = in_netns(self.client.name(), async || {
            let addr = SocketAddr::new(TARGET, servers::ECHO);
            let mut stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let mut times = Vec::new();
            let mut byte = [0u8; 1];
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                let started = Instant::now();
                stream.write_all(b"x").await?;
                stream.read_exact(&mut byte).await?;
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            Ok(times)
        });
        let _ = load.stop(Signal::SIGINT, Duration::from_secs(5));
        let (pings, rr) = (pings?, rr?);
        ensure!(!rr.is_empty(), "no request/response completed");
        Ok(UnderLoad {
            ping: (percentile(&pings, 50), percentile(&pings, 99)),
            rr: (percentile(&rr, 50), percentile(&rr, 99)),
        })
    }

    /// Seconds to fetch `objects` objects of a page, a few at a time, each on a new
    /// connection.
    fn page_load(&self, objects: usize) -> Result<f64> {
        in_netns(self.client.name(), async move || {
            let started = Instant::now();
            let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let workers = (0..PAGE_PARALLEL).map(|_| {
                let next = std::sync::Arc::clone(&next);
                async move {
                    while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < objects {
                        fetch(PAGE_OBJECT).await?;
                    }
                    anyhow::Ok(())
                }
            });
            for result in futures_util::future::join_all(workers).await {
                result?;
            }
            Ok(started.elapsed().as_secs_f64())
        })
    }

    /// The highest UDP rate (Mbit/s, at most `highest`) that gets across `way` losing under 1%
    /// beyond what the link itself drops (`link_loss`, percent), by bisection.
    fn udp_max(&self, link_loss: f64, highest: f64, way: Way) -> Result<f64> {
        let sink = match way {
            Way::Up => udp_load::Sink::start(&self.far, SocketAddr::new(TARGET, UDP_LOAD_PORT))?,
            Way::Down(_) => udp_load::Sink::start(
                &self.client,
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), UDP_LOAD_PORT),
            )?,
        };
        let (mut low, mut high) = (1.0f64, highest);
        let mut best = None;
        for _ in 0..7 {
            let rate = (low * high).sqrt();
            let (received, lost) = self.udp_at(&sink, rate, way)?;
            if lost < 1.0 + link_loss {
                best = Some(received);
                low = rate;
            } else {
                high = rate;
            }
        }
        best.context("under 1% loss at no rate tried (from 1 Mbit/s)")
    }

    /// UDP at `mbit` for 3 s (GSO batches of 1,200-byte datagrams, `udp_load`): (Mbit/s
    /// received, percent lost).
    fn udp_at(&self, sink: &udp_load::Sink, mbit: f64, way: Way) -> Result<(f64, f64)> {
        // After a test through a slow tunnel, its queues may still be draining.
        std::thread::sleep(Duration::from_secs(1));
        let (from, to) = match way {
            Way::Up => (&self.client, SocketAddr::new(TARGET, UDP_LOAD_PORT)),
            Way::Down(client) => (&self.far, SocketAddr::new(client, UDP_LOAD_PORT)),
        };
        let before = self.drops();
        let (received, lost) = udp_load::run(from, sink, to, mbit, Duration::from_secs(3))?;
        let after = self.drops();
        let grew: Vec<String> = after
            .iter()
            .filter_map(|(name, n)| {
                let was = before.get(name).copied().unwrap_or(0);
                (*n > was).then(|| format!("{name} {}", n - was))
            })
            .collect();
        println!(
            "      UDP at {mbit:.0} Mbit/s: {received:.0} received, {lost:.2}% lost{}",
            if grew.is_empty() {
                String::new()
            } else {
                format!(" (drops: {})", grew.join(", "))
            }
        );
        Ok((received, lost))
    }

    /// Where datagrams are dropped, on both sides: the kernel's UDP receive and send buffer
    /// overflows, and each interface's receive and transmit drops (a TUN's full queue).
    fn drops(&self) -> std::collections::BTreeMap<String, u64> {
        let mut found = std::collections::BTreeMap::new();
        for (side, ns) in [("client", &self.client), ("far", &self.far)] {
            if let Ok(out) = ns.exec(&["nstat", "-az", "UdpRcvbufErrors", "UdpSndbufErrors"]) {
                for line in out.lines() {
                    let mut fields = line.split_whitespace();
                    if let (Some(name), Some(Ok(n))) =
                        (fields.next(), fields.next().map(str::parse))
                    {
                        found.insert(format!("{side} {name}"), n);
                    }
                }
            }
            // Each UDP socket's own drops, by local port (the last column).
            for (family, table) in [("UDP", "/proc/net/udp"), ("UDP6", "/proc/net/udp6")] {
                let Ok(out) = ns.exec(&["cat", table]) else {
                    continue;
                };
                for line in out.lines().skip(1) {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let port = fields
                        .get(1)
                        .and_then(|a| a.rsplit(':').next())
                        .and_then(|p| u16::from_str_radix(p, 16).ok());
                    if let (Some(port), Some(Ok(n))) =
                        (port, fields.last().map(|d| d.parse::<u64>()))
                    {
                        // Sockets sharing a port (one per address) add up.
                        *found
                            .entry(format!("{side} {family} port {port} socket"))
                            .or_insert(0) += n;
                    }
                }
            }
            if let Ok(out) = ns.exec(&["ip", "-s", "-o", "link"]) {
                for line in out.lines() {
                    let name = line.split(':').nth(1).unwrap_or("?").trim().to_owned();
                    // `ip -o -s link`: "RX: bytes packets errors dropped ..." then "TX: ...".
                    let numbers = |tag: &str| -> Option<u64> {
                        let rest = line.split(tag).nth(1)?;
                        let row = rest.split('\\').nth(1)?;
                        row.split_whitespace().nth(3)?.parse().ok()
                    };
                    for (tag, what) in [("RX:", "rx dropped"), ("TX:", "tx dropped")] {
                        if let Some(n) = numbers(tag) {
                            found.insert(format!("{side} {name} {what}"), n);
                        }
                    }
                }
            }
        }
        found
    }

    /// 4-byte UDP datagrams (a sequence number) to the echo service, one at a time for 5 s:
    /// round trip p50 and p99 (µs), and transactions a second. A datagram unanswered within a
    /// second is lost.
    fn udp_rr(&self) -> Result<(f64, f64, f64)> {
        in_netns(self.client.name(), async || {
            let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
            socket
                .connect(SocketAddr::new(TARGET, servers::ECHO))
                .await?;
            let (mut times, mut lost) = (Vec::new(), 0u32);
            let mut echo = [0u8; 16];
            let started = Instant::now();
            let mut sequence = 0u32;
            while started.elapsed() < Duration::from_secs(5) {
                sequence += 1;
                let sent = Instant::now();
                socket.send(&sequence.to_be_bytes()).await?;
                // A late echo of an earlier request is not this one's answer.
                let answered = tokio::time::timeout(Duration::from_secs(1), async {
                    loop {
                        let n = socket.recv(&mut echo).await?;
                        if echo.get(..n) == Some(&sequence.to_be_bytes()[..]) {
                            return anyhow::Ok(());
                        }
                    }
                });
                match answered.await {
                    Ok(received) => {
                        received?;
                        times.push(sent.elapsed().as_secs_f64() * 1e6);
                    }
                    Err(_) => lost += 1,
                }
            }
            ensure!(times.len() > 10, "{} answered, {lost} lost", times.len());
            let rate = times.len() as f64 / started.elapsed().as_secs_f64();
            times.sort_by(f64::total_cmp);
            Ok((percentile(&times, 50), percentile(&times, 99), rate))
        })
    }
}

/// Fetches `len` bytes from the test servers' source service on a new connection.
async fn fetch(len: u64) -> Result<()> {
    let mut stream = TcpStream::connect(SocketAddr::new(TARGET, servers::SOURCE)).await?;
    let mut header = [0u8; 16];
    header[..8].copy_from_slice(&len.to_be_bytes());
    stream.write_all(&header).await?;
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    ensure!(got == len, "fetched {got} of {len} bytes");
    Ok(())
}

/// The number after `"key":` in the part of iperf3's JSON after `section`.
pub(crate) fn json_number(out: &str, section: &str, key: &str) -> Result<f64> {
    let Some(rest) = out.rsplit(section).next().filter(|_| out.contains(section)) else {
        let error = out
            .split("\"error\":")
            .nth(1)
            .and_then(|e| e.lines().next())
            .unwrap_or("no error given");
        bail!("iperf3 printed no {section}: {}", error.trim());
    };
    rest.split(&format!("\"{key}\":"))
        .nth(1)
        .and_then(|r| r.split([',', '\n', '}']).next())
        .and_then(|r| r.trim().parse().ok())
        .with_context(|| format!("iperf3 printed no {key}"))
}

/// The chart of `docs/bench/wan.svg`: a bar per system in each cell. One download and one
/// upload get a panel per rate cap (the capped cells, where TCP over TCP shows, would be
/// flat beside the uncapped ones); ping under load and the page load one panel each.
pub(crate) fn chart(cells: &[Cell]) -> Result<String> {
    let mut systems: Vec<&str> = Vec::new();
    let mut caps: Vec<Option<u64>> = Vec::new();
    for c in cells {
        if !systems.contains(&c.system.as_str()) {
            systems.push(&c.system);
        }
        if !caps.contains(&c.cap_mbit) {
            caps.push(c.cap_mbit);
        }
    }
    let cap_name = |cap: Option<u64>| cap.map_or("uncapped".to_owned(), |m| format!("{m} Mbit/s"));
    // A panel over the cells `keep` picks, in the order they were measured.
    let panel = |title: String, keep: &dyn Fn(&Cell) -> bool, value: fn(&Cell) -> Option<f64>| {
        let mut groups: Vec<(f64, Option<u64>)> = Vec::new();
        for c in cells.iter().filter(|c| keep(c)) {
            if !groups.contains(&(c.loss_percent, c.cap_mbit)) {
                groups.push((c.loss_percent, c.cap_mbit));
            }
        }
        let find = |system: &str, (loss, cap): (f64, Option<u64>)| {
            cells
                .iter()
                .find(|c| c.system == system && c.loss_percent == loss && c.cap_mbit == cap)
                .and_then(value)
        };
        chart::Grouped {
            title,
            groups: groups
                .iter()
                .map(|&(loss, cap)| format!("{loss}% loss, {}", cap_name(cap)))
                .collect(),
            series: systems
                .iter()
                .map(|&s| (s.to_owned(), groups.iter().map(|&g| find(s, g)).collect()))
                .collect(),
            legend: false,
        }
    };
    let mut panels = Vec::new();
    for (what, value) in [
        (
            "download",
            (|c: &Cell| c.down_mbit) as fn(&Cell) -> Option<f64>,
        ),
        ("upload", |c: &Cell| c.up_mbit),
    ] {
        for &cap in &caps {
            panels.push(panel(
                format!(
                    "one TCP flow, {what}, Mbit/s, {} (higher is better)",
                    cap_name(cap)
                ),
                &|c: &Cell| c.cap_mbit == cap,
                value,
            ));
        }
    }
    panels.push(panel(
        "ping while 4 flows download, p50, ms (lower is better; the path is 40 ms)".to_owned(),
        &|_| true,
        |c| c.ping_load_p50_ms,
    ));
    panels.push(panel(
        format!(
            "page load: {PAGE_OBJECTS} fetches of {} KB, {PAGE_PARALLEL} at a time, s (lower \
             is better)",
            PAGE_OBJECT / 1000
        ),
        &|_| true,
        |c| c.page_load_s,
    ));
    if let Some(first) = panels.first_mut() {
        first.legend = true;
    }
    chart::render_grouped(&panels)
}

/// Draws `docs/bench/wan.svg` again from `docs/bench/wan.json`.
pub(crate) fn redraw_chart() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench");
    let json = std::fs::read_to_string(dir.join("wan.json"))?;
    let cells: Vec<Cell> = serde_json::from_str(&json).context("docs/bench/wan.json")?;
    std::fs::write(dir.join("wan.svg"), chart(&cells)?)?;
    println!("bench: wrote docs/bench/wan.svg");
    Ok(())
}

fn table(cells: &[Cell]) -> String {
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    let mut md = format!(
        "# VPNs across a WAN\n\n`cargo xtask bench --wan`: 20 ms each way. Mbit/s (iperf3, the \
         median of the runs the last column names); round trips in ms (p50/p99) under a 4-flow \
         download (one run, or the median of the runs the last column names); page load: \
         {PAGE_OBJECTS} fetches of {} KB, {PAGE_PARALLEL} at a time, in s; UDP: highest rate \
         with under 1% loss. \"CPU busy\": share of the machine's CPU time busy during the \
         4-flow tests (median; the link, both ends and the servers share it). \"link late\": \
         share of packets the WAN link itself sent over 1 ms late.\n\n| system | loss % | cap \
         | up | down | 4 up | 4 down | ping load | RR load | page s | UDP max | idle ping | CPU \
         busy | link late | measured |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\
         ---|---|\n",
        PAGE_OBJECT / 1000
    );
    for c in cells {
        let measured = if c.measured.is_empty() {
            "-".to_owned()
        } else {
            let load = match c.load_runs {
                0 | 1 => String::new(),
                n => format!(", round trips × {n}"),
            };
            format!("{}, {} s × {}{load}", c.measured, c.seconds, c.runs)
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {}/{} | {}/{} | {} | {} | {} | {} | {:.1}% | {} \
             |\n",
            c.system,
            c.loss_percent,
            c.cap_mbit
                .map_or("none".to_owned(), |m| format!("{m} Mbit/s")),
            f(c.up_mbit),
            f(c.down_mbit),
            f(c.up4_mbit),
            f(c.down4_mbit),
            f(c.ping_load_p50_ms),
            f(c.ping_load_p99_ms),
            f(c.rr_load_p50_ms),
            f(c.rr_load_p99_ms),
            f(c.page_load_s),
            f(c.udp_max_mbit),
            f(c.ping_idle_ms),
            c.cpu_busy_4flows
                .map_or("-".to_owned(), |b| format!("{:.0}%", b * 100.0)),
            c.link_late_share * 100.0,
            measured,
        ));
    }
    md
}

/// The new table followed by the hand-written commentary of the file it replaces: everything
/// from the earlier file's first `## ` heading on, so a run does not erase what was said about
/// the earlier ones.
fn keep_commentary(table: String, earlier: &str) -> String {
    match earlier.find("\n## ") {
        Some(at) => format!("{table}\n{}", &earlier[at + 1..]),
        None => table,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 800 40 3 2 0 7 0\ncpu0 50 2 25 400 20 1 1 0 3 0\n";
        let times = CpuTimes::parse(stat).unwrap();
        assert_eq!((times.busy, times.total), (160, 1000));
        assert!(CpuTimes::parse("cpu  1 2 3\n").is_err());
        assert!(CpuTimes::parse("intr 5\n").is_err());
    }

    #[test]
    fn one_spinning_core_shows_in_the_busy_share() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let before = CpuTimes::now().unwrap();
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(200) {}
        let busy = CpuTimes::now().unwrap().busy_since(&before);
        // This thread alone keeps one core of `cores` busy (ticks are 10 ms).
        assert!(
            busy >= 0.5 / cores && busy <= 1.0,
            "{busy} on {cores} cores"
        );
    }

    #[test]
    fn a_rewritten_table_keeps_the_commentary_under_it() {
        let earlier = "# VPNs\n\n| old | table |\n\n## What it shows\n\nwords\n";
        assert_eq!(
            keep_commentary("# VPNs\n\n| new |\n".to_owned(), earlier),
            "# VPNs\n\n| new |\n\n## What it shows\n\nwords\n"
        );
        assert_eq!(keep_commentary("| new |\n".to_owned(), ""), "| new |\n");
    }

    fn cell(system: System, loss: f64, cap: Option<u64>, measured: &str) -> Cell {
        Cell {
            system: system.name().to_owned(),
            loss_percent: loss,
            cap_mbit: cap,
            measured: measured.to_owned(),
            ..Cell::default()
        }
    }

    #[test]
    fn a_part_run_replaces_its_cells_and_keeps_the_rest_in_order() {
        let earlier = vec![
            cell(System::None, 0.0, None, "old"),
            cell(System::None, 2.0, None, "old"),
            cell(System::OpenVpnTcp, 0.0, None, "old"),
            cell(System::Prism, 0.0, Some(100), "old"),
        ];
        let fresh = vec![
            cell(System::Prism, 0.0, None, "new"),
            cell(System::Prism, 0.0, Some(100), "new"),
            cell(System::None, 0.5, None, "new"),
            cell(System::None, 2.0, None, "new"),
        ];
        let merged: Vec<(String, f64, Option<u64>, String)> = merge(earlier, fresh)
            .into_iter()
            .map(|c| (c.system, c.loss_percent, c.cap_mbit, c.measured))
            .collect();
        let row = |s: System, loss, cap, m: &str| (s.name().to_owned(), loss, cap, m.to_owned());
        assert_eq!(
            merged,
            vec![
                row(System::None, 0.0, None, "old"),
                row(System::None, 0.5, None, "new"),
                row(System::None, 2.0, None, "new"),
                row(System::OpenVpnTcp, 0.0, None, "old"),
                row(System::Prism, 0.0, None, "new"),
                row(System::Prism, 0.0, Some(100), "new"),
            ]
        );
    }
}
