//! `cargo xtask e2e`: Prism between the Linux kernel's TCP and real servers, in namespaces.
//!
//! For each upstream (microsocks without and with authentication, `direct` with a fwmark and
//! with a bound interface) and each family (IPv4, IPv6), the client namespace's kernel opens
//! connections to the target addresses routed into Prism's TUN, and every case checks what a
//! user relies on: bytes arrive intact (SHA-256), half-close works both ways, resets arrive,
//! a closed port is not reported as a clean close. Then the binary's contract: clean exit on
//! SIGINT/SIGTERM with the TUN gone, one-line errors for bad flags, no privilege, a busy device.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_util::future::try_join_all;
use nix::sys::signal::Signal;
use prism_tunnel::{Connector, Direct, Socks5, Target};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

use crate::netns::{self, Process};
use crate::servers::{self, Seen, Servers, pattern};
use crate::topology::{self, Topology};

const BULK: usize = 64 * 1024 * 1024;
const CONCURRENT: usize = 500;
const CASE_PATIENCE: Duration = Duration::from_secs(180);

/// How Prism reaches the servers in one pass of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upstream {
    Dante,
    Socks5Auth,
    DirectMark,
    /// `direct` bound to the veth, on a TUN without offload (plain IP packets): every other
    /// TUN pass uses offload, the default.
    DirectBind,
    /// dante behind a link that adds 150 ms, fast handshake.
    SlowFast,
    /// dante behind a link that adds 150 ms, consistent handshake.
    SlowConsistent,
    /// `direct` with a fwmark, consistent handshake.
    DirectConsistent,
    /// TAP mode through dante.
    TapDante,
    /// TAP mode, `direct` with a fwmark.
    TapDirect,
    /// TAP mode with 9000-byte jumbo frames, `direct`.
    TapJumbo,
    /// dante with the SOCKS5 exchange pipelined (`--socks5-pipeline`), fast handshake.
    DantePipelined,
    /// dante behind the 150 ms link, pipelined, fast handshake.
    SlowFastPipelined,
    /// dante behind the 150 ms link, pipelined, consistent handshake.
    SlowConsistentPipelined,
}

impl Upstream {
    const ALL: [Upstream; 13] = [
        Upstream::Dante,
        Upstream::Socks5Auth,
        Upstream::DirectMark,
        Upstream::DirectBind,
        Upstream::SlowFast,
        Upstream::SlowConsistent,
        Upstream::DirectConsistent,
        Upstream::TapDante,
        Upstream::TapDirect,
        Upstream::TapJumbo,
        Upstream::DantePipelined,
        Upstream::SlowFastPipelined,
        Upstream::SlowConsistentPipelined,
    ];

    fn name(self) -> &'static str {
        match self {
            Upstream::Dante => "socks5-dante",
            Upstream::Socks5Auth => "socks5-microsocks-auth",
            Upstream::DirectMark => "direct-fwmark",
            Upstream::DirectBind => "direct-bind-no-offload",
            Upstream::SlowFast => "fast-150ms-socks5",
            Upstream::SlowConsistent => "consistent-150ms-socks5",
            Upstream::DirectConsistent => "consistent-direct",
            Upstream::TapDante => "tap-socks5-dante",
            Upstream::TapDirect => "tap-direct",
            Upstream::TapJumbo => "tap-jumbo-9000",
            Upstream::DantePipelined => "socks5-dante-pipelined",
            Upstream::SlowFastPipelined => "fast-150ms-socks5-pipelined",
            Upstream::SlowConsistentPipelined => "consistent-150ms-socks5-pipelined",
        }
    }

    fn args(self, topo: &Topology) -> Vec<String> {
        let (upstream, extra) = match self {
            Upstream::Dante | Upstream::TapDante => (
                format!("socks5://{}:{}", topology::SERVER_V4, topology::DANTE_PORT),
                vec![],
            ),
            Upstream::DantePipelined => (
                format!("socks5://{}:{}", topology::SERVER_V4, topology::DANTE_PORT),
                vec!["--socks5-pipeline".to_owned()],
            ),
            Upstream::SlowFastPipelined | Upstream::SlowConsistentPipelined => (
                format!("socks5://{}:{}", topology::SERVER_V4, topology::DELAY_PORT),
                vec!["--socks5-pipeline".to_owned()],
            ),
            Upstream::Socks5Auth => (
                format!(
                    "socks5://{}:{}@[{}]:{}",
                    topology::SOCKS_USER,
                    topology::SOCKS_PASS.replace(':', "%3A"),
                    topology::SERVER_V6,
                    topology::SOCKS_AUTH_PORT
                ),
                vec![],
            ),
            Upstream::DirectMark => (
                "direct".to_owned(),
                vec!["--fwmark".to_owned(), topology::FWMARK.to_owned()],
            ),
            Upstream::DirectBind => (
                "direct".to_owned(),
                vec![
                    "--bind-interface".to_owned(),
                    topo.client_veth.clone(),
                    "--no-offload".to_owned(),
                ],
            ),
            Upstream::SlowFast | Upstream::SlowConsistent => (
                format!("socks5://{}:{}", topology::SERVER_V4, topology::DELAY_PORT),
                vec![],
            ),
            Upstream::DirectConsistent | Upstream::TapDirect => (
                "direct".to_owned(),
                vec!["--fwmark".to_owned(), topology::FWMARK.to_owned()],
            ),
            Upstream::TapJumbo => (
                "direct".to_owned(),
                vec![
                    "--fwmark".to_owned(),
                    topology::FWMARK.to_owned(),
                    "--mtu".to_owned(),
                    "9000".to_owned(),
                ],
            ),
        };
        let mode = match self {
            Upstream::SlowConsistent
            | Upstream::DirectConsistent
            | Upstream::SlowConsistentPipelined => "consistent",
            _ => "fast",
        };
        let extra = [extra, vec!["--handshake".to_owned(), mode.to_owned()]].concat();
        let mut args = if self.is_tap() {
            topo.prism_tap_args(&upstream)
        } else {
            topo.prism_args(&upstream)
        };
        args.extend(extra);
        args
    }

    /// Whether Prism runs on a TUN with offload (the default) in this pass.
    fn offloads(self) -> bool {
        !self.is_tap() && self != Upstream::DirectBind
    }

    fn is_tap(self) -> bool {
        matches!(
            self,
            Upstream::TapDante | Upstream::TapDirect | Upstream::TapJumbo
        )
    }

    /// The cases this upstream can carry. microsocks closes both directions at the first EOF
    /// (no half-close), so through it only the cases that need no half-close from the proxy
    /// run; dante carries half-closes and runs them all.
    fn cases(self) -> &'static [Case] {
        match self {
            Upstream::Socks5Auth => &[
                Case::Download,
                Case::ResetByServer,
                Case::ResetByClient,
                Case::ClosedPort,
            ],
            Upstream::SlowFast | Upstream::SlowFastPipelined => {
                &[Case::FastConnectIsImmediate, Case::FirstAnswer]
            }
            Upstream::SlowConsistent => &[
                Case::ConsistentConnectWaits,
                Case::ConsistentClosedPort,
                Case::ConsistentUnreachable,
            ],
            Upstream::SlowConsistentPipelined => {
                &[Case::ConsistentConnectWaits, Case::ConsistentClosedPort]
            }
            Upstream::DirectConsistent => &[
                Case::ConsistentClosedPort,
                Case::ConsistentUnreachable,
                Case::Upload,
                Case::Concurrent,
                Case::HalfCloseClientFirst,
                Case::ResetByServer,
            ],
            Upstream::TapDante => &[
                Case::Upload,
                Case::Download,
                Case::Concurrent,
                Case::HalfCloseClientFirst,
                Case::HalfCloseServerFirst,
                Case::ResetByServer,
                Case::ResetByClient,
                Case::ClosedPort,
                Case::PortReuse,
                Case::GatewayResolved,
                Case::Arping,
                Case::GarbageFrames,
            ],
            Upstream::TapJumbo => &[Case::Upload, Case::Download, Case::Concurrent],
            Upstream::DirectMark => &[
                Case::Upload,
                Case::Download,
                Case::Concurrent,
                Case::HalfCloseClientFirst,
                Case::HalfCloseServerFirst,
                Case::ResetByServer,
                Case::ResetByClient,
                Case::ClosedPort,
                Case::PortReuse,
                Case::PingProhibited,
            ],
            _ => &Case::ALL,
        }
    }

    /// Whether a reset crosses this upstream as a reset. microsocks, like most SOCKS5
    /// servers (dante too), closes its other side with FIN when one side resets.
    fn carries_resets(self) -> bool {
        matches!(
            self,
            Upstream::DirectMark
                | Upstream::DirectBind
                | Upstream::DirectConsistent
                | Upstream::TapDirect
                | Upstream::TapJumbo
        )
    }
}

/// One behaviour, checked for one upstream and family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    Upload,
    Download,
    Concurrent,
    HalfCloseClientFirst,
    HalfCloseServerFirst,
    ResetByServer,
    ResetByClient,
    ClosedPort,
    PortReuse,
    FastConnectIsImmediate,
    ConsistentConnectWaits,
    ConsistentClosedPort,
    ConsistentUnreachable,
    GatewayResolved,
    Arping,
    GarbageFrames,
    PingProhibited,
    FirstAnswer,
}

impl Case {
    const ALL: [Case; 9] = [
        Case::Upload,
        Case::Download,
        Case::Concurrent,
        Case::HalfCloseClientFirst,
        Case::HalfCloseServerFirst,
        Case::ResetByServer,
        Case::ResetByClient,
        Case::ClosedPort,
        Case::PortReuse,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::Upload => "upload 64 MiB, SHA-256 checked",
            Case::Download => "download 64 MiB, SHA-256 checked",
            Case::Concurrent => "500 concurrent connections",
            Case::HalfCloseClientFirst => "half-close, client first",
            Case::HalfCloseServerFirst => "half-close, server first",
            Case::ResetByServer => "reset by the server reaches the client",
            Case::ResetByClient => "reset by the client reaches the server",
            Case::ClosedPort => "closed port resets the client",
            Case::PortReuse => "a port in TIME-WAIT is reused at once (TCP timestamps)",
            Case::FastConnectIsImmediate => "fast: connect() returns at once",
            Case::ConsistentConnectWaits => "consistent: connect() waits for the upstream",
            Case::ConsistentClosedPort => "consistent: closed port is ECONNREFUSED",
            Case::ConsistentUnreachable => "consistent: unreachable host never connects",
            Case::GatewayResolved => "the kernel resolved the gateway by ARP and NDP",
            Case::Arping => "arping gets the gateway's answer",
            Case::GarbageFrames => "garbage frames change nothing but drop counters",
            Case::PingProhibited => "without a relay, ping is told administratively prohibited",
            Case::FirstAnswer => "the first answer takes one delayed reply pipelined, three not",
        }
    }
}

/// What a case runs with.
#[derive(Debug, Clone)]
struct Ctx {
    target: IpAddr,
    upstream: Upstream,
    seen: Arc<Mutex<mpsc::UnboundedReceiver<Seen>>>,
}

impl Ctx {
    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.target, port)
    }

    async fn next_seen(&self) -> Result<Seen> {
        let mut seen = self.seen.lock().await;
        tokio::time::timeout(Duration::from_secs(20), seen.recv())
            .await
            .context("the server reported nothing within 20 s")?
            .context("the servers stopped")
    }

    async fn forget_seen(&self) {
        let mut seen = self.seen.lock().await;
        while seen.try_recv().is_ok() {}
    }
}

/// Runs `work` on a fresh thread inside namespace `ns`, on a single-threaded runtime.
pub(crate) fn in_netns<T: Send + 'static>(
    ns: &str,
    work: impl AsyncFnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        netns::enter(&ns)?;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(work())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("a test thread panicked"))?
}

/// Builds the release `prism` binary and returns its path.
pub fn build_prism() -> Result<PathBuf> {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--package", "prism"])
        .status()
        .context("cannot run cargo")?;
    ensure!(status.success(), "building prism failed");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    Ok(root.join("target/release/prism"))
}

pub fn run(filter: Option<&str>) -> Result<()> {
    ensure!(
        crate::tools::is_root(),
        "e2e needs root (network namespaces, TUN devices)"
    );
    netns::sweep();
    crate::tools::ensure(&[
        ("microsocks", "microsocks"),
        ("danted", "dante-server"),
        ("ip", "iproute2"),
        ("ss", "iproute2"),
        ("setpriv", "util-linux"),
        ("arping", "iputils-arping"),
        ("ping", "iputils-ping"),
        ("python3", "python3"),
    ])?;
    let prism = build_prism()?;
    let logs = std::env::temp_dir().join(format!("prism-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;
    println!("e2e: logs in {}", logs.display());

    let topo = Topology::build()?;
    let servers = Servers::start(&topo.server, vec![topology::TARGET_V4, topology::TARGET_V6])?;
    let _socks_auth = topo.start_socks(
        topology::SOCKS_AUTH_PORT,
        true,
        &logs.join("microsocks-auth.log"),
    )?;
    let _dante = topo.start_dante(&logs)?;
    let _delay = crate::delay::start(
        &topo.server,
        SocketAddr::new(topology::SERVER_V4.parse()?, topology::DELAY_PORT),
        SocketAddr::new(topology::SERVER_V4.parse()?, topology::DANTE_PORT),
        topology::DELAY,
    )?;

    let mut report = Report::default();
    for upstream in Upstream::ALL {
        suite(
            &topo,
            &servers,
            &prism,
            &logs,
            upstream,
            filter,
            &mut report,
        );
    }
    if selected(filter, "domain") {
        report.record(
            "socks5 domain",
            "CONNECT by host name through dante",
            domain(&topo),
        );
    }
    if selected(filter, "routed") {
        crate::routed_e2e::run(&prism, &logs, &mut report);
    }
    if selected(filter, "embed") {
        report.record(
            "embed",
            "the README's embedding example serves through dante and stops on SIGTERM",
            embed_example(&topo, &logs),
        );
    }
    if selected(filter, "relay") {
        if let Err(error) = crate::relay_e2e::run(&topo, &prism, &logs, &mut report) {
            report.record("relay", "the relay suite runs", Err(error));
        }
    }
    if selected(filter, "fault") {
        crate::fault_e2e::run(&topo, &prism, &logs, &mut report);
    }
    if selected(filter, "wan") {
        crate::wan_e2e::run(&logs, &mut report);
    }
    if selected(filter, "flood") {
        crate::flood_e2e::run(&topo, &prism, &logs, &mut report);
    }
    if selected(filter, "contract") {
        report.record(
            "binary",
            "one-line errors and clean exits",
            contract(&topo, &prism, &logs),
        );
    }
    drop(servers);
    drop(topo);
    report.finish()
}

fn selected(filter: Option<&str>, name: &str) -> bool {
    filter.is_none_or(|f| name.contains(f))
}

#[derive(Debug, Default)]
pub(crate) struct Report {
    passed: usize,
    failed: Vec<String>,
    skipped: Vec<String>,
}

impl Report {
    pub(crate) fn record(&mut self, group: &str, what: &str, result: Result<String>) {
        match result {
            Ok(note) => {
                self.passed += 1;
                println!("  ok    {group:<22} {what}{note}");
            }
            Err(error) => {
                println!("  FAIL  {group:<22} {what}: {error:#}");
                self.failed.push(format!("{group}: {what}: {error:#}"));
            }
        }
    }

    /// A check this machine cannot run, with the reason; never counted as passed.
    pub(crate) fn skip(&mut self, group: &str, what: &str, why: &str) {
        println!("  SKIP  {group:<22} {what}: {why}");
        self.skipped.push(format!("{group}: {what}: {why}"));
    }

    fn finish(self) -> Result<()> {
        println!(
            "e2e: {} passed, {} failed, {} skipped",
            self.passed,
            self.failed.len(),
            self.skipped.len()
        );
        if self.failed.is_empty() {
            Ok(())
        } else {
            bail!("e2e failures:\n{}", self.failed.join("\n"))
        }
    }
}

fn suite(
    topo: &Topology,
    servers: &Servers,
    prism: &Path,
    logs: &Path,
    upstream: Upstream,
    filter: Option<&str>,
    report: &mut Report,
) {
    let cases: Vec<(IpAddr, Case)> = [topology::TARGET_V4, topology::TARGET_V6]
        .into_iter()
        .flat_map(|t| upstream.cases().iter().map(move |&c| (t, c)))
        // ARP and the raw-frame injection are the same for both families: IPv4 only.
        .filter(|(t, c)| t.is_ipv4() || !matches!(c, Case::Arping | Case::GarbageFrames))
        .filter(|(t, c)| {
            let family = if t.is_ipv4() { "v4" } else { "v6" };
            selected(filter, &format!("{} {family} {:?}", upstream.name(), c))
        })
        .collect();
    if cases.is_empty() {
        return;
    }
    // Which bulk transfers run over IPv4, where offload moves super-packets both ways.
    let bulk = |wanted: Case| cases.iter().any(|&(t, c)| t.is_ipv4() && c == wanted);
    let (upload, download) = (bulk(Case::Upload), bulk(Case::Download));
    println!("e2e: upstream {}", upstream.name());
    let stats = logs.join(format!("stats-{}.json", upstream.name()));
    let mut args = upstream.args(topo);
    args.extend(["--stats-file".to_owned(), stats.display().to_string()]);
    let log = logs.join(format!("prism-{}.log", upstream.name()));
    let mut process = match topo.start_prism(prism, &args, &log) {
        Ok(p) => p,
        Err(error) => {
            report.record(upstream.name(), "prism starts", Err(error));
            return;
        }
    };
    for (target, case) in cases {
        let family = if target.is_ipv4() { "v4" } else { "v6" };
        let ctx = Ctx {
            target,
            upstream,
            seen: servers.seen(),
        };
        let started = Instant::now();
        let result = match case {
            Case::GatewayResolved => gateway_resolved(topo, target),
            Case::Arping => arping(topo),
            Case::GarbageFrames => garbage_frames(topo, target),
            Case::PingProhibited => ping_prohibited(topo, target),
            _ => in_netns(topo.client.name(), async move || {
                ctx.forget_seen().await;
                tokio::time::timeout(CASE_PATIENCE, run_case(case, &ctx))
                    .await
                    .with_context(|| format!("no result within {CASE_PATIENCE:?}"))?
            }),
        };
        let group = format!("{} {family}", upstream.name());
        if result.is_err() {
            save_kernel_counters(topo, logs, &format!("{group} {case:?}"));
        }
        let result =
            result.map(|note| format!("{note} [{:.1} s]", started.elapsed().as_secs_f64()));
        report.record(&group, case.name(), result);
        if process.try_status().is_some() {
            report.record(
                &group,
                "prism still running",
                Err(anyhow::anyhow!(process.log())),
            );
            return;
        }
    }
    report.record(
        upstream.name(),
        "SIGINT: exit 0, TUN and routes removed, no malformed drops",
        stop_and_check_teardown(topo, &mut process, Signal::SIGINT, &stats),
    );
    if !upstream.offloads() || upload || download {
        report.record(
            upstream.name(),
            "offload: super-packets cross exactly when the TUN offloads",
            offload_at_work(&stats, upstream.offloads(), upload, download),
        );
    }
    if upload || download {
        report.record(
            upstream.name(),
            "buffers: a bulk transfer grows them from their initial size",
            buffers_grew(&stats, upload, download),
        );
    }
    let closed = format!("{} v4 {:?}", upstream.name(), Case::ClosedPort);
    if upstream == Upstream::DantePipelined && selected(filter, &closed) {
        report.record(
            upstream.name(),
            "a refusal found after the early hand-over is counted as refused",
            late_refusals_counted(&stats),
        );
    }
    let garbage = format!("{} v4 {:?}", upstream.name(), Case::GarbageFrames);
    if upstream.cases().contains(&Case::GarbageFrames) && selected(filter, &garbage) {
        report.record(
            upstream.name(),
            "the garbage is in the gateway's drop counters",
            garbage_counted(&stats),
        );
    }
}

/// Keeps both kernels' TCP counters after a failure, to tell drops, overflows and resets apart.
fn save_kernel_counters(topo: &Topology, logs: &Path, what: &str) {
    let file = what.replace(' ', "-");
    for ns in [&topo.client, &topo.server] {
        if let Ok(counters) = ns.exec(&["nstat", "-az"]) {
            let _ = std::fs::write(
                logs.join(format!("nstat-{file}-{}.txt", ns.name())),
                counters,
            );
        }
    }
}

/// Stops prism with `signal` and checks the exit, the TUN and the counters.
fn stop_and_check_teardown(
    topo: &Topology,
    process: &mut Process,
    signal: Signal,
    stats: &Path,
) -> Result<String> {
    let drops = tun_drops(topo);
    process.stop_cleanly(signal)?;
    ensure!(topo.tun_gone(), "the TUN is still there after exit");
    let routes = topo
        .client
        .ip(&format!("route show {}", topology::TARGET_NET_V4))?;
    ensure!(
        !routes.contains(topology::TUN),
        "a route through the TUN is left: {routes}"
    );
    let counters = std::fs::read_to_string(stats).context("prism wrote no stats file")?;
    for bad in ["drop_checksum", "drop_truncated", "drop_version"] {
        ensure!(
            counter(&counters, bad)? == 0,
            "kernel traffic was counted as malformed: {counters}"
        );
    }
    ensure!(
        counter(&counters, "tun_refused_writes")? == 0,
        "the kernel refused packets Prism wrote to the TUN: {counters}"
    );
    Ok(drops)
}

/// With offload, a bulk upload reaches the stack as kernel super-packets and a bulk download
/// leaves it as super-packets for the kernel to segment; without offload there are none.
fn offload_at_work(stats: &Path, offloads: bool, upload: bool, download: bool) -> Result<String> {
    let counters = std::fs::read_to_string(stats).context("prism wrote no stats file")?;
    let (inbound, outbound) = (
        stat(&counters, "super_packets_in"),
        stat(&counters, "super_packets_out"),
    );
    if offloads {
        ensure!(
            !upload || inbound > 0,
            "an upload with offload brought no super-packets in"
        );
        ensure!(
            !download || outbound > 0,
            "a download with offload sent no super-packets out"
        );
    } else {
        ensure!(
            inbound == 0 && outbound == 0,
            "super-packets without offload: {inbound} in, {outbound} out"
        );
    }
    Ok(format!(" ({inbound} in, {outbound} out)"))
}

/// Connections start with small buffers; a bulk upload from the kernel's TCP must grow a
/// receive buffer, a bulk download a send buffer. Without growth the transfers still arrive,
/// only at a trickle, so this is what shows it works against a real client.
fn buffers_grew(stats: &Path, upload: bool, download: bool) -> Result<String> {
    let counters = std::fs::read_to_string(stats).context("prism wrote no stats file")?;
    let (rx, tx) = (
        stat(&counters, "rx_buffers_grown"),
        stat(&counters, "tx_buffers_grown"),
    );
    let opened = stat(&counters, "connections_opened");
    ensure!(
        !upload || rx > 0,
        "an upload grew no receive buffer ({rx} of {opened} connections)"
    );
    ensure!(
        !download || tx > 0,
        "a download grew no send buffer ({tx} of {opened} connections)"
    );
    // A receive buffer grows once; a send buffer is given back whenever its connection idles,
    // so a download may grow one again.
    ensure!(
        rx <= opened,
        "more receive buffers grew than connections opened: {rx} of {opened}"
    );
    Ok(format!(
        " (receive {rx}, send {tx}, of {opened} connections)"
    ))
}

/// Packets the kernel dropped at the TUN (its queue towards Prism full), for the report.
fn tun_drops(topo: &Topology) -> String {
    topo.tun_drops()
        .map(|d| format!(" (kernel dropped {d} packets at the TUN queue)"))
        .unwrap_or_default()
}

async fn run_case(case: Case, ctx: &Ctx) -> Result<String> {
    match case {
        Case::Upload => upload(ctx).await,
        Case::Download => download(ctx).await,
        Case::Concurrent => concurrent(ctx).await,
        Case::HalfCloseClientFirst => half_close_client_first(ctx).await,
        Case::HalfCloseServerFirst => half_close_server_first(ctx).await,
        Case::ResetByServer => reset_by_server(ctx).await,
        Case::ResetByClient => reset_by_client(ctx).await,
        Case::ClosedPort => closed_port(ctx).await,
        Case::PortReuse => port_reuse(ctx).await,
        Case::FastConnectIsImmediate => connect_times(ctx, false).await,
        Case::ConsistentConnectWaits => connect_times(ctx, true).await,
        Case::FirstAnswer => first_answer(ctx).await,
        Case::ConsistentClosedPort => consistent_closed_port(ctx).await,
        Case::ConsistentUnreachable => consistent_unreachable(ctx).await,
        Case::GatewayResolved | Case::Arping | Case::GarbageFrames | Case::PingProhibited => {
            bail!("{case:?} runs outside the client thread")
        }
    }
}

fn rate(bytes: usize, since: Instant) -> String {
    let secs = since.elapsed().as_secs_f64().max(1e-9);
    format!(" ({:.0} Mbit/s)", bytes as f64 * 8.0 / secs / 1e6)
}

async fn upload(ctx: &Ctx) -> Result<String> {
    let data = pattern(1, BULK);
    let expected = Sha256::digest(&data);
    let started = Instant::now();
    let mut stream = TcpStream::connect(ctx.addr(servers::SINK)).await?;
    stream.write_all(&data).await?;
    stream.shutdown().await?;
    let mut digest = [0u8; 32];
    stream
        .read_exact(&mut digest)
        .await
        .context("no digest from the server")?;
    ensure!(
        digest[..] == expected[..],
        "the server received different bytes"
    );
    Ok(rate(BULK, started))
}

async fn download(ctx: &Ctx) -> Result<String> {
    let expected = Sha256::digest(pattern(2, BULK));
    let started = Instant::now();
    let mut stream = TcpStream::connect(ctx.addr(servers::SOURCE)).await?;
    stream.write_u64(BULK as u64).await?;
    stream.write_u64(2).await?;
    let mut sha = Sha256::new();
    let mut received = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        received += n;
        sha.update(&buf[..n]);
    }
    ensure!(received == BULK, "received {received} bytes of {BULK}");
    ensure!(
        sha.finalize()[..] == expected[..],
        "the client received different bytes"
    );
    Ok(rate(BULK, started))
}

async fn concurrent(ctx: &Ctx) -> Result<String> {
    let addr = ctx.addr(servers::ECHO);
    let streams = try_join_all((0..CONCURRENT).map(|_| TcpStream::connect(addr)))
        .await
        .context("not every connection was accepted")?;
    // All are open at once; now each exchanges its own message.
    try_join_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, mut stream)| async move {
                let message = pattern(i as u64 + 100, 1000 + i);
                stream.write_all(&message).await?;
                stream.shutdown().await?;
                let mut echoed = Vec::new();
                stream.read_to_end(&mut echoed).await?;
                ensure!(echoed == message, "connection {i}: echo differs");
                Ok(())
            }),
    )
    .await?;
    Ok(String::new())
}

async fn half_close_client_first(ctx: &Ctx) -> Result<String> {
    let message = pattern(3, 1024 * 1024);
    let mut stream = TcpStream::connect(ctx.addr(servers::ECHO)).await?;
    let (mut reader, mut writer) = stream.split();
    let write = async {
        writer.write_all(&message).await?;
        writer.shutdown().await // our FIN; the echo keeps coming
    };
    let mut echoed = Vec::new();
    let (w, r) = tokio::join!(write, reader.read_to_end(&mut echoed));
    w?;
    r?;
    ensure!(
        echoed == message,
        "after our FIN the server's remaining bytes did not all arrive"
    );
    Ok(String::new())
}

async fn half_close_server_first(ctx: &Ctx) -> Result<String> {
    let mut stream = TcpStream::connect(ctx.addr(servers::CLOSES_FIRST)).await?;
    let mut greeting = Vec::new();
    stream.read_to_end(&mut greeting).await?;
    ensure!(
        greeting == servers::SERVER_FIRST,
        "the server's bytes before its FIN differ"
    );
    let after = pattern(4, 256 * 1024);
    stream
        .write_all(&after)
        .await
        .context("cannot write after the server's FIN")?;
    stream.shutdown().await?;
    let expected = Seen::AfterFin {
        bytes: after.len() as u64,
        sha256: Sha256::digest(&after).into(),
    };
    let seen = ctx.next_seen().await?;
    ensure!(seen == expected, "the server saw {seen:?} after its FIN");
    Ok(String::new())
}

async fn reset_by_server(ctx: &Ctx) -> Result<String> {
    let mut stream = TcpStream::connect(ctx.addr(servers::RESETS)).await?;
    stream.write_all(b"ping").await?;
    let mut buf = [0u8; 16];
    let outcome = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
        .await
        .context("the connection neither reset nor closed")?;
    match outcome {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(" (RST)".to_owned()),
        Ok(0) if !ctx.upstream.carries_resets() => {
            Ok(" (FIN: the SOCKS5 server turns RST into FIN)".to_owned())
        }
        other => bail!("expected a reset, got {other:?}"),
    }
}

async fn reset_by_client(ctx: &Ctx) -> Result<String> {
    let mut stream = TcpStream::connect(ctx.addr(servers::OBSERVES)).await?;
    stream.write_all(&[7u8; 1000]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.set_zero_linger()?;
    drop(stream);
    match ctx.next_seen().await? {
        Seen::Ended {
            bytes: 1000,
            reset: true,
        } => Ok(" (RST)".to_owned()),
        Seen::Ended {
            bytes: 1000,
            reset: false,
        } if !ctx.upstream.carries_resets() => {
            Ok(" (FIN: the SOCKS5 server turns RST into FIN)".to_owned())
        }
        other => bail!("expected the server to see 1000 bytes then a reset, saw {other:?}"),
    }
}

/// The client closes first, so its side waits in TIME-WAIT, then connects again from the same
/// port at once. Linux allows that only when the peer sent TCP timestamps (PAWS keeps the old
/// connection's segments out); without them the second connect fails with EADDRNOTAVAIL, and
/// a client making many short connections runs out of ports.
async fn port_reuse(ctx: &Ctx) -> Result<String> {
    let addr = ctx.addr(servers::ECHO);
    let any = if addr.is_ipv4() {
        IpAddr::from([0u8; 4])
    } else {
        IpAddr::from([0u16; 8])
    };
    let socket = |reuse: bool, port: u16| -> std::io::Result<tokio::net::TcpSocket> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(reuse)?;
        socket.bind(SocketAddr::new(any, port))?;
        Ok(socket)
    };
    let first = socket(true, 0)?;
    let port = first.local_addr()?.port();
    echo_then_close(first.connect(addr).await?, b"first").await?;
    match socket(false, port) {
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {}
        other => bail!("port {port} is not in TIME-WAIT after the client closed first: {other:?}"),
    }
    let again = socket(true, port)?
        .connect(addr)
        .await
        .with_context(|| format!("connecting again from port {port} in TIME-WAIT"))?;
    echo_then_close(again, b"second").await?;
    Ok(format!(" (port {port})"))
}

/// Sends `message`, then FIN, and expects it echoed before the server's FIN.
async fn echo_then_close(mut stream: TcpStream, message: &[u8]) -> Result<()> {
    stream.write_all(message).await?;
    stream.shutdown().await?;
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).await?;
    ensure!(echoed == message, "the echo differs");
    Ok(())
}

async fn closed_port(ctx: &Ctx) -> Result<String> {
    // Fast handshake: the handshake completes at once and the refusal then arrives as a reset,
    // sometimes before connect() has even returned.
    let mut stream = match TcpStream::connect(ctx.addr(servers::CLOSED)).await {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            return Ok(" (reset before connect returned)".to_owned());
        }
        Err(e) => return Err(e.into()),
    };
    let mut buf = [0u8; 16];
    let outcome = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
        .await
        .context("the connection to a closed port stayed open")?;
    match outcome {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(String::new()),
        other => bail!("expected a reset for a closed port, got {other:?}"),
    }
}

/// Times five connects through the 150 ms proxy. Fast: the handshake completes at once (the
/// quickest under 5 ms). Consistent: each takes at least the 150 ms the proxy's answer needs.
/// Either way the connection then carries an echo.
async fn connect_times(ctx: &Ctx, consistent: bool) -> Result<String> {
    let mut times = Vec::new();
    for i in 0..5u64 {
        let started = Instant::now();
        let mut stream = TcpStream::connect(ctx.addr(servers::ECHO)).await?;
        times.push(started.elapsed());
        let message = pattern(i, 1000);
        stream.write_all(&message).await?;
        stream.shutdown().await?;
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).await?;
        ensure!(echoed == message, "connection {i}: echo differs");
    }
    times.sort();
    let (min, median) = (times[0], times[2]);
    if consistent {
        ensure!(
            min >= topology::DELAY,
            "a connect returned after {min:?}, before the upstream could have answered"
        );
        // Pipelined, both replies come back together: one delay, not two.
        let max = times[4];
        ensure!(
            ctx.upstream != Upstream::SlowConsistentPipelined || max < 2 * topology::DELAY,
            "a pipelined connect took {max:?}: the replies came one by one"
        );
    } else {
        ensure!(
            min < Duration::from_millis(5),
            "the quickest connect took {min:?}"
        );
    }
    Ok(format!(" (median {:.1} ms)", median.as_secs_f64() * 1e3))
}

/// Through the 150 ms link, from connect to the first byte echoed: dante's replies to the
/// greeting and to the CONNECT, then the echo, each arrive 150 ms late, one after the other
/// (at least 450 ms) unless the exchange is pipelined, when they come back together (under
/// 300 ms).
async fn first_answer(ctx: &Ctx) -> Result<String> {
    let pipelined = matches!(ctx.upstream, Upstream::SlowFastPipelined);
    let mut times = Vec::new();
    for i in 0..5u64 {
        let started = Instant::now();
        let mut stream = TcpStream::connect(ctx.addr(servers::ECHO)).await?;
        let message = pattern(i, 1000);
        stream.write_all(&message).await?;
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await?;
        times.push(started.elapsed());
        ensure!(first[0] == message[0], "connection {i}: the echo differs");
    }
    times.sort();
    let (min, max) = (times[0], times[4]);
    if pipelined {
        ensure!(
            max < 2 * topology::DELAY,
            "an answer took {max:?}: more than one delayed reply"
        );
    } else {
        ensure!(
            min >= 3 * topology::DELAY,
            "an answer came after {min:?}, before three delayed replies could have"
        );
    }
    Ok(format!(" (median {:.0} ms)", times[2].as_secs_f64() * 1e3))
}

async fn consistent_closed_port(ctx: &Ctx) -> Result<String> {
    match TcpStream::connect(ctx.addr(servers::CLOSED)).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(String::new()),
        other => bail!("expected ECONNREFUSED, got {other:?}"),
    }
}

async fn consistent_unreachable(ctx: &Ctx) -> Result<String> {
    let target = if ctx.target.is_ipv4() {
        topology::UNREACHABLE_V4
    } else {
        topology::UNREACHABLE_V6
    };
    let attempt = tokio::time::timeout(
        Duration::from_secs(30),
        TcpStream::connect(SocketAddr::new(target, servers::ECHO)),
    )
    .await;
    use std::io::ErrorKind as K;
    match attempt {
        Err(_) => Ok(" (timed out)".to_owned()),
        Ok(Err(e)) if matches!(e.kind(), K::HostUnreachable | K::NetworkUnreachable) => {
            Ok(format!(" ({e})"))
        }
        Ok(Err(e)) if e.kind() == K::TimedOut => Ok(" (ETIMEDOUT)".to_owned()),
        Ok(Ok(_)) => bail!("connected to an unreachable host"),
        Ok(Err(e)) => bail!("expected EHOSTUNREACH or a timeout, got {e}"),
    }
}

/// Without `--relay`, non-TCP gets ICMP "administratively prohibited" back at once; iputils
/// ping reports it ("Packet filtered" / "Administratively prohibited") and fails.
fn ping_prohibited(topo: &Topology, target: IpAddr) -> Result<String> {
    let to = target.to_string();
    let mut args = vec!["ping", "-c", "1", "-W", "2"];
    if target.is_ipv6() {
        args.push("-6");
    }
    args.push(&to);
    let output = topo.client.command(args[0]).args(&args[1..]).output()?;
    let out = String::from_utf8_lossy(&output.stdout).to_lowercase();
    ensure!(
        !output.status.success(),
        "ping succeeded without a relay:\n{out}"
    );
    ensure!(
        out.contains("packet filtered") || out.contains("administratively prohibited"),
        "ping did not report the prohibition:\n{out}"
    );
    let line = out.lines().find(|l| l.contains("from")).unwrap_or_default();
    Ok(format!(" ({})", line.trim()))
}

/// After traffic, the client kernel's neighbor table holds the gateway's MAC for its IPv4 and
/// IPv6 addresses, learned by real ARP and neighbor discovery.
fn gateway_resolved(topo: &Topology, target: IpAddr) -> Result<String> {
    let gateway = if target.is_ipv4() {
        topology::TAP_GATEWAY_V4
    } else {
        topology::TAP_GATEWAY_V6
    };
    let neigh = topo
        .client
        .ip(&format!("neigh show {gateway} dev {}", topology::TUN))?;
    ensure!(
        neigh.contains(topology::GATEWAY_MAC),
        "the neighbor table has no {} for {gateway}: {neigh:?}",
        topology::GATEWAY_MAC
    );
    Ok(format!(" ({})", neigh.trim()))
}

/// `arping` (iputils) asks for the gateway and gets its MAC back.
fn arping(topo: &Topology) -> Result<String> {
    let out = topo.client.exec(&[
        "arping",
        "-c",
        "2",
        "-w",
        "5",
        "-I",
        topology::TUN,
        topology::TAP_GATEWAY_V4,
    ])?;
    ensure!(
        out.to_lowercase().contains(topology::GATEWAY_MAC),
        "arping saw no reply from {}: {out}",
        topology::GATEWAY_MAC
    );
    let line = out
        .lines()
        .find(|l| l.contains("reply"))
        .unwrap_or_default();
    Ok(format!(" ({})", line.trim()))
}

/// Frames the gateway must drop, injected on the TAP from the client side with an AF_PACKET
/// socket: random bytes, a VLAN-tagged frame, LLDP, an IPv4 frame too short to hold a header,
/// and frames for another MAC. Afterwards a connection still works; the counts are checked
/// when prism stops.
fn garbage_frames(topo: &Topology, target: IpAddr) -> Result<String> {
    let script = format!(
        r#"
import os, random, socket
random.seed(7)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("{tun}", 0))
gw = bytes.fromhex("{mac}")
me = bytes.fromhex("020000000001")
frames = [os.urandom(random.randint(14, 200)) for _ in range({random})]
frames += [gw + me + b"\x81\x00\x00\x05\x08\x00" + os.urandom(46)] * {vlan}
frames += [gw + me + b"\x88\xcc" + os.urandom(46)] * {lldp}
frames += [gw + me + b"\x08\x00" + os.urandom(10)] * {short}
frames += [bytes.fromhex("020000000099") + me + b"\x08\x00" + os.urandom(46)] * {stranger}
sent = 0
for f in frames:
    try:
        s.send(f)
        sent += 1
    except OSError:
        pass
print(sent)
"#,
        tun = topology::TUN,
        mac = topology::GATEWAY_MAC.replace(':', ""),
        random = GARBAGE.random,
        vlan = GARBAGE.vlan,
        lldp = GARBAGE.lldp,
        short = GARBAGE.short,
        stranger = GARBAGE.stranger,
    );
    let sent = topo.client.exec(&["python3", "-c", &script])?;
    let ctx_target = target;
    in_netns(topo.client.name(), async move || {
        let mut stream = TcpStream::connect(SocketAddr::new(ctx_target, servers::ECHO)).await?;
        let message = pattern(9, 10_000);
        stream.write_all(&message).await?;
        stream.shutdown().await?;
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).await?;
        ensure!(echoed == message, "after the garbage, an echo differs");
        Ok(())
    })?;
    Ok(format!(" ({} frames injected)", sent.trim()))
}

/// How many of each kind of garbage frame the TAP pass injects.
struct Garbage {
    random: usize,
    vlan: usize,
    lldp: usize,
    short: usize,
    stranger: usize,
}

const GARBAGE: Garbage = Garbage {
    random: 50,
    vlan: 3,
    lldp: 3,
    short: 3,
    stranger: 3,
};

/// One counter from a stats file's JSON object; an error if it is not there.
pub(crate) fn counter(counters: &str, name: &str) -> Result<u64> {
    serde_json::from_str::<serde_json::Value>(counters)
        .ok()
        .and_then(|stats| stats.get(name).and_then(serde_json::Value::as_u64))
        .with_context(|| format!("no counter {name} in the stats: {counters}"))
}

/// One counter from a stats file's JSON object (0 if absent or not a number).
pub(crate) fn stat(counters: &str, name: &str) -> u64 {
    counter(counters, name).unwrap_or(0)
}

/// Pipelined with the fast handshake, a connection to a closed port is handed over before
/// dante's refusal arrives; the closed-port cases' refusals must still be counted as such.
fn late_refusals_counted(stats: &Path) -> Result<String> {
    let counters = std::fs::read_to_string(stats).context("prism wrote no stats file")?;
    let refused = stat(&counters, "upstream_refused");
    ensure!(refused >= 1, "no refusal counted: {counters}");
    Ok(format!(" ({refused} refused)"))
}

/// The gateway counted the injected garbage by kind.
fn garbage_counted(stats: &Path) -> Result<String> {
    let counters = std::fs::read_to_string(stats).context("prism wrote no stats file")?;
    let count = |name: &str| stat(&counters, name);
    let checks = [
        ("l2_drop_vlan", GARBAGE.vlan),
        ("l2_drop_malformed", GARBAGE.short),
        ("l2_drop_not_for_us", GARBAGE.stranger),
        ("l2_drop_ethertype", GARBAGE.lldp),
    ];
    for (name, at_least) in checks {
        ensure!(
            count(name) >= at_least as u64,
            "{name} is {} in {counters}",
            count(name)
        );
    }
    Ok(format!(
        " (vlan {}, malformed {}, not for us {}, ethertype {})",
        count("l2_drop_vlan"),
        count("l2_drop_malformed"),
        count("l2_drop_not_for_us"),
        count("l2_drop_ethertype")
    ))
}

/// SOCKS5 CONNECT by host name (address type 3) through dante, which resolves it in the
/// server namespace.
fn domain(topo: &Topology) -> Result<String> {
    in_netns(topo.client.name(), async || {
        let url = format!("socks5://{}:{}", topology::SERVER_V4, topology::DANTE_PORT).parse()?;
        let socks = Socks5::new(url, Direct::new());
        let mut stream = socks
            .connect(&Target::Domain(topology::TARGET_HOST.into(), servers::ECHO))
            .await?;
        let message = pattern(5, 4096);
        stream.write_all(&message).await?;
        stream.shutdown().await?;
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).await?;
        ensure!(echoed == message, "echo by host name differs");
        Ok(String::new())
    })
}

/// The README's embedding example (`crates/prism-engine/examples/embed.rs`), built and run as
/// a user would: it opens `prism0` itself; the targets are routed into it; a kernel client's
/// bytes come back from the echo server through dante; SIGTERM stops it cleanly with its stats.
fn embed_example(topo: &Topology, logs: &Path) -> Result<String> {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--package", "prism-engine"])
        .args(["--example", "embed"])
        .status()
        .context("cannot run cargo")?;
    ensure!(status.success(), "building the embed example failed");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    let mut command = topo
        .client
        .command(root.join("target/release/examples/embed"));
    command.arg(format!(
        "socks5://{}:{}",
        topology::SERVER_V4,
        topology::DANTE_PORT
    ));
    let mut example = Process::spawn("embed example", command, Some(&logs.join("embed.log")))?;
    netns::wait_for("the example's TUN", Duration::from_secs(10), || {
        topo.client
            .ip(&format!("link show {}", topology::TUN))
            .is_ok()
    })?;
    topo.client.ip(&format!(
        "route add {} dev {}",
        topology::TARGET_NET_V4,
        topology::TUN
    ))?;
    let message = pattern(11, 100_000);
    let sent = message.clone();
    let echoed = in_netns(topo.client.name(), async move || {
        let target = SocketAddr::new(topology::TARGET_V4, servers::ECHO);
        let stream = TcpStream::connect(target).await?;
        let (mut read, mut write) = stream.into_split();
        let writer = tokio::spawn(async move {
            write.write_all(&sent).await?;
            write.shutdown().await
        });
        let mut echoed = Vec::new();
        read.read_to_end(&mut echoed).await?;
        writer.await??;
        Ok(echoed)
    });
    // SIGTERM, as systemd or kill stops it (Ctrl-C is the same path in the example).
    let stopped = example.stop_cleanly(Signal::SIGTERM);
    let echoed = echoed?;
    ensure!(echoed == message, "the echo through the example differs");
    stopped?;
    let log = example.log();
    let up = log
        .split("stopped: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok())
        .with_context(|| format!("the example printed no stats: {log}"))?;
    ensure!(
        up >= message.len(),
        "the example counted {up} bytes up: {log}"
    );
    ensure!(
        topo.tun_gone(),
        "the example's TUN is still there after it stopped"
    );
    Ok(format!(" ({up} bytes up)"))
}

/// The binary's contract: errors are one clear line and a non-zero exit; SIGTERM is a clean stop.
fn contract(topo: &Topology, prism: &Path, logs: &Path) -> Result<String> {
    let prism_str = prism.to_str().context("non-UTF-8 path")?;
    let base = topo.prism_args("direct");
    let with = |extra: &[&str]| -> Vec<String> {
        let mut args = base.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let expect_error = |args: Vec<String>, as_nobody: bool, says: &str| -> Result<()> {
        let mut command = if as_nobody {
            let mut c = topo.client.command("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                prism_str,
            ]);
            c
        } else {
            topo.client.command(prism)
        };
        let output = command.args(&args).output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(!output.status.success(), "{args:?} succeeded");
        ensure!(
            stderr.contains(says),
            "{args:?}: expected {says:?} in:\n{stderr}"
        );
        ensure!(topo.tun_gone(), "{args:?} left a TUN behind");
        Ok(())
    };
    let mut bad_cidr = base.clone();
    if let Some(a) = bad_cidr.iter_mut().find(|a| *a == "10.99.0.1/24") {
        *a = "10.99.0.1/33".into();
    }
    expect_error(bad_cidr, false, "bad CIDR")?;
    let mut bad_url = base.clone();
    if let Some(a) = bad_url.iter_mut().find(|a| *a == "direct") {
        *a = "socks5://nowhere".into();
    }
    expect_error(bad_url, false, "bad SOCKS5 URL")?;
    expect_error(with(&[]), true, "permission denied; run as root")?;
    let one_line = topo
        .client
        .command("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            prism_str,
        ])
        .args(&base)
        .output()?;
    let lines = String::from_utf8_lossy(&one_line.stderr).lines().count();
    ensure!(lines == 1, "an error should be one line, got {lines}");

    // A second prism on the same TUN name is refused (an existing interface is never
    // adopted). Then SIGTERM stops the first cleanly.
    let stats = logs.join("stats-contract.json");
    let mut first = topo.start_prism(
        prism,
        &with(&["--stats-file", &stats.display().to_string()]),
        &logs.join("prism-contract.log"),
    )?;
    let second = topo.client.command(prism).args(&base).output()?;
    let stderr = String::from_utf8_lossy(&second.stderr);
    ensure!(
        !second.status.success(),
        "a second prism on {} started",
        topology::TUN
    );
    ensure!(
        stderr.contains("exists already") && stderr.lines().count() == 1,
        "expected one line saying the interface exists already, in:\n{stderr}"
    );
    stop_and_check_teardown(topo, &mut first, Signal::SIGTERM, &stats)?;
    Ok(String::new())
}
