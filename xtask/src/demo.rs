//! `cargo xtask demo`: the main job on an embedded default.
//!
//! Builds the e2e topology, serves a 64 MiB file and a small page with Python's `http.server`
//! in the server namespace, starts dante as the SOCKS5 proxy and `prism run` with a SOCKS5
//! upstream in the client namespace, then fetches through Prism with curl (IPv4, IPv6, and
//! many small pages at once), checks what arrived, and prints what moved and how fast. Then
//! the fast and consistent handshakes side by side through a proxy 150 ms away. Last, OpenVPN
//! over TCP and Prism side by side across a lossy WAN (`wan_bench::demo_scene`).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::netns::Process;
use crate::servers::pattern;
use crate::topology::{self, Topology};

const BLOB: usize = 64 * 1024 * 1024;
const PORT: u16 = 8080;
const SMALL_FETCHES: usize = 200;

pub fn run() -> Result<()> {
    ensure!(
        crate::tools::is_root(),
        "the demo needs root (network namespaces, a TUN device)"
    );
    crate::netns::sweep();
    crate::tools::ensure(&[
        ("curl", "curl"),
        ("python3", "python3"),
        ("danted", "dante-server"),
        ("ip", "iproute2"),
        ("ss", "iproute2"),
    ])?;
    println!("demo: building prism (release)");
    let prism = crate::e2e::build_prism()?;
    let dir = std::env::temp_dir().join(format!("prism-demo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("www"))?;
    let result = demo(&prism, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn demo(prism_path: &Path, dir: &Path) -> Result<()> {
    let www = dir.join("www");
    let blob = pattern(42, BLOB);
    let blob_sha = Sha256::digest(&blob);
    std::fs::write(www.join("blob.bin"), &blob)?;
    std::fs::write(
        www.join("index.html"),
        "<html><body>Hello through Prism</body></html>\n",
    )?;

    let topo = Topology::build()?;
    let _web = start_web(&topo, &www, &dir.join("http.log"))?;
    let _dante = topo.start_dante(dir)?;
    let stats = dir.join("stats.json");
    let mut args = topo.prism_args(&format!(
        "socks5://{}:{}",
        topology::SERVER_V4,
        topology::DANTE_PORT
    ));
    args.extend(["--stats-file".to_owned(), stats.display().to_string()]);
    let mut prism = topo.start_prism(prism_path, &args, &dir.join("prism.log"))?;

    println!();
    println!(
        "Prism demo: curl (kernel TCP, client namespace) -> TUN {} -> Prism -> SOCKS5 (dante) -> web server",
        topology::TUN
    );
    println!();
    let v4 = format!("http://{}:{PORT}", topology::TARGET_V4);
    let v6 = format!("http://[{}]:{PORT}", topology::TARGET_V6);
    for (family, base) in [("IPv4", &v4), ("IPv6", &v6)] {
        let out = dir.join("fetched.bin");
        let started = Instant::now();
        curl(
            &topo,
            &[
                &format!("{base}/blob.bin"),
                "-o",
                &out.display().to_string(),
            ],
        )?;
        let secs = started.elapsed().as_secs_f64();
        let fetched = std::fs::read(&out)?;
        ensure!(
            fetched.len() == BLOB,
            "{family}: got {} bytes of {BLOB}",
            fetched.len()
        );
        ensure!(
            Sha256::digest(&fetched) == blob_sha,
            "{family}: the file arrived changed"
        );
        println!(
            "  {family}: fetched 64 MiB in {secs:.2} s = {:.0} Mbit/s, SHA-256 matches",
            BLOB as f64 * 8.0 / secs / 1e6
        );
    }

    let page = format!("{v4}/index.html");
    let urls: Vec<&str> = std::iter::repeat_n(page.as_str(), SMALL_FETCHES).collect();
    let mut fetch_args = vec![
        "--parallel",
        "--parallel-max",
        "50",
        "-w",
        "%{http_code}\n",
        "-o",
        "/dev/null",
    ];
    for url in &urls {
        fetch_args.extend([*url, "-o", "/dev/null"]);
    }
    let started = Instant::now();
    let codes = curl(&topo, &fetch_args)?;
    let secs = started.elapsed().as_secs_f64();
    let ok = codes.lines().filter(|c| c.trim() == "200").count();
    ensure!(
        ok == SMALL_FETCHES,
        "{ok} of {SMALL_FETCHES} small fetches answered 200"
    );
    println!(
        "  {SMALL_FETCHES} page fetches, 50 at a time: all 200 OK in {secs:.2} s ({:.0} connections/s)",
        SMALL_FETCHES as f64 / secs
    );

    prism.stop_cleanly(Signal::SIGINT)?;
    let counters = std::fs::read_to_string(&stats).context("prism wrote no stats")?;
    println!();
    println!("  Prism's counters: {}", counters.trim());
    println!(
        "  Prism stopped cleanly; the TUN is {}.",
        if topo.tun_gone() {
            "gone"
        } else {
            "STILL THERE"
        }
    );
    handshakes(prism_path, &topo, dir)?;
    drop(topo);
    crate::wan_bench::demo_scene(prism_path)
}

/// The two handshakes side by side, through a SOCKS5 proxy 150 ms away: how long connect()
/// takes, and what a closed port and an unroutable host look like to the client.
fn handshakes(prism: &Path, topo: &Topology, dir: &Path) -> Result<()> {
    let server: IpAddr = topology::SERVER_V4.parse()?;
    let _delay = crate::delay::start(
        &topo.server,
        SocketAddr::new(server, topology::DELAY_PORT),
        SocketAddr::new(server, topology::DANTE_PORT),
        topology::DELAY,
    )?;
    let upstream = format!("socks5://{}:{}", topology::SERVER_V4, topology::DELAY_PORT);
    let mut columns: Vec<[String; 3]> = Vec::new();
    for mode in ["fast", "consistent"] {
        let mut args = topo.prism_args(&upstream);
        args.extend(["--handshake".to_owned(), mode.to_owned()]);
        let log = dir.join(format!("prism-{mode}.log"));
        let mut prism = topo.start_prism(prism, &args, &log)?;
        let seen = crate::e2e::in_netns(topo.client.name(), async || {
            let open = SocketAddr::new(topology::TARGET_V4, PORT);
            let closed = SocketAddr::new(topology::TARGET_V4, crate::servers::CLOSED);
            let unroutable = SocketAddr::new(topology::UNREACHABLE_V4, PORT);
            let mut times = Vec::new();
            for _ in 0..5 {
                let started = Instant::now();
                let stream = TcpStream::connect(open).await?;
                times.push(started.elapsed());
                drop(stream);
            }
            times.sort();
            Ok([
                format!("{:.1} ms", times[2].as_secs_f64() * 1e3),
                outcome(closed).await,
                outcome(unroutable).await,
            ])
        })?;
        prism
            .stop_cleanly(Signal::SIGINT)
            .with_context(|| format!("the {mode} handshake"))?;
        columns.push(seen);
    }
    println!();
    println!("  Handshakes side by side, SOCKS5 proxy 150 ms away (prism run --handshake ...):");
    println!("  {:<40} {:<28} consistent", "", "fast");
    let rows = [
        "connect() to an open port (median of 5)",
        "connect() to a closed port",
        "connect() to an unroutable host",
    ];
    for (i, row) in rows.iter().enumerate() {
        println!("  {row:<40} {:<28} {}", columns[0][i], columns[1][i]);
    }
    Ok(())
}

/// What a client sees when it connects to `addr` and reads.
async fn outcome(addr: SocketAddr) -> String {
    let connect = tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(addr));
    match connect.await {
        Err(_) => "no answer in 20 s".to_owned(),
        Ok(Err(e)) => format!("fails: {e}"),
        Ok(Ok(mut stream)) => {
            let mut buf = [0u8; 1];
            match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await {
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    "connects, then reset".to_owned()
                }
                Ok(Ok(0)) => "connects, then closed".to_owned(),
                Ok(other) => format!("connects, then {other:?}"),
                Err(_) => "connects, then silence".to_owned(),
            }
        }
    }
}

fn start_web(topo: &Topology, www: &Path, log: &Path) -> Result<Process> {
    let mut command = topo.server.command("python3");
    command
        .args([
            "-m",
            "http.server",
            &PORT.to_string(),
            "--bind",
            "::",
            "--directory",
        ])
        .arg(www);
    let process = Process::spawn("python3 http.server", command, Some(log))?;
    topology::wait_listening(&topo.server, PORT, 1, "the web server")?;
    Ok(process)
}

/// Runs curl in the client namespace; fails on any transfer error.
fn curl(topo: &Topology, args: &[&str]) -> Result<String> {
    let output: std::process::Output = {
        let mut command: Command = topo.client.command("curl");
        command
            .args(["-sS", "--fail", "--max-time", "60"])
            .args(args);
        command.output().context("cannot run curl")?
    };
    ensure!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
