//! `cargo xtask demo`: the main job on an embedded default.
//!
//! Builds the e2e topology, serves a 64 MiB file and a small page with Python's `http.server`
//! in the server namespace, starts dante as the SOCKS5 proxy and `prism run` with a SOCKS5
//! upstream in the client namespace, then fetches through Prism with curl (IPv4, IPv6, and
//! many small pages at once), checks what arrived, and prints what moved and how fast.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};

use crate::netns::{Process, wait_for};
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

fn demo(prism: &Path, dir: &Path) -> Result<()> {
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
    let mut prism = topo.start_prism(prism, &args, &dir.join("prism.log"))?;

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

    let status = prism.stop(Signal::SIGINT, Duration::from_secs(10))?;
    ensure!(status.success(), "prism exited with {status}");
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
    Ok(())
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
    let ss = format!("sport = :{PORT}");
    wait_for("the web server to listen", Duration::from_secs(10), || {
        topo.server
            .exec(&["ss", "-Hltn", &ss])
            .is_ok_and(|out| !out.trim().is_empty())
    })?;
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
