//! The peers `cargo xtask bench --peers` measures beside Prism, on the same topology: tun2proxy
//! (ipstack) through the same dante, and shadowsocks-rust's `sslocal` in tun mode (smoltcp)
//! through its own `ssserver -m none` in the server namespace.
//!
//! Both are built from crates.io with `cargo install` into a cache directory
//! (`$PRISM_PEER_CACHE`, else `~/.cache/prism-bench`), once; later runs reuse the binaries.
//! Each peer opens its TUN; the bench then gives it an address of each family and routes the
//! targets of both into it, the way Prism's own `--route` does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::netns::{Process, wait_for};
use crate::topology::{self, Topology};

/// A peer the bench knows how to install and start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    Tun2proxy,
    Shadowsocks,
}

/// The shadowsocks server's port in the server namespace.
const SSSERVER_PORT: u16 = 8388;
/// The TUN each peer opens in the client namespace, and its address.
const PEER_TUN: &str = "peer0";
const PEER_ADDRESS: &str = "10.98.0.1/24";
const PEER_ADDRESS_V6: &str = "fd98::1/64";

impl Peer {
    pub(crate) const ALL: [Peer; 2] = [Peer::Tun2proxy, Peer::Shadowsocks];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Peer::Tun2proxy => "tun2proxy 0.8.7, SOCKS5 (dante)",
            Peer::Shadowsocks => "shadowsocks-rust 1.25 tun, ssserver -m none",
        }
    }

    /// `cargo install` arguments: crate, version, features, and the binary it yields.
    fn crate_spec(
        self,
    ) -> (
        &'static str,
        &'static str,
        &'static [&'static str],
        &'static str,
    ) {
        match self {
            Peer::Tun2proxy => ("tun2proxy", "0.8.7", &[], "tun2proxy-bin"),
            Peer::Shadowsocks => ("shadowsocks-rust", "1.25.0", &["local-tun"], "sslocal"),
        }
    }
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PRISM_PEER_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/prism-bench")
}

/// The peer's binary, installing it first if the cache lacks it.
pub(crate) fn install(peer: Peer) -> Result<PathBuf> {
    let (name, version, features, bin) = peer.crate_spec();
    let root = cache_dir();
    let path = root.join("bin").join(bin);
    if path.exists() {
        return Ok(path);
    }
    println!(
        "bench: cargo install {name} {version} into {}",
        root.display()
    );
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command
        .args(["install", "--locked", name, "--version", version, "--root"])
        .arg(&root);
    if !features.is_empty() {
        command.args(["--features", &features.join(",")]);
    }
    let status = command
        .status()
        .with_context(|| format!("cannot run cargo install {name}"))?;
    ensure!(status.success(), "cargo install {name} failed ({status})");
    ensure!(path.exists(), "cargo install {name} did not produce {bin}");
    Ok(path)
}

/// A running peer and what it needs kept alive (shadowsocks' server).
#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) process: Process,
    _server: Option<Process>,
}

/// Starts `peer` in the client namespace and routes the targets into its TUN.
pub(crate) fn start(peer: Peer, topo: &Topology, logs: &Path) -> Result<Running> {
    let bin = install(peer)?;
    let server = match peer {
        Peer::Tun2proxy => None,
        Peer::Shadowsocks => {
            let ssserver = bin.with_file_name("ssserver");
            let listen = format!("{}:{SSSERVER_PORT}", topology::SERVER_V4);
            let mut command = topo.server.command(&ssserver);
            command.args(["-s", &listen, "-m", "none", "-k", "", "-U"]);
            let process = Process::spawn("ssserver", command, Some(&logs.join("ssserver.log")))?;
            topology::wait_listening(&topo.server, SSSERVER_PORT, 1, "ssserver")?;
            Some(process)
        }
    };
    let mut command = topo.client.command(&bin);
    match peer {
        Peer::Tun2proxy => {
            let proxy = format!("socks5://{}:{}", topology::SERVER_V4, topology::DANTE_PORT);
            command.args([
                "--tun",
                PEER_TUN,
                "--proxy",
                &proxy,
                "--max-sessions",
                "20000",
                "--tcp-mss",
                "1460",
                "-v",
                "warn",
            ]);
        }
        Peer::Shadowsocks => {
            let server = format!("{}:{SSSERVER_PORT}", topology::SERVER_V4);
            command.args([
                "--protocol",
                "tun",
                "--tun-interface-name",
                PEER_TUN,
                "--tun-interface-address",
                PEER_ADDRESS,
                "-s",
                &server,
                "-m",
                "none",
                "-k",
                "",
            ]);
        }
    }
    let log = logs.join(format!("{PEER_TUN}-{peer:?}.log"));
    let mut process = Process::spawn(peer.name(), command, Some(&log))?;
    let opened = wait_for("the peer's TUN", Duration::from_secs(20), || {
        topo.client.ip(&format!("link show {PEER_TUN}")).is_ok()
    });
    if let Err(error) = opened {
        if let Some(status) = process.try_status() {
            bail!("{} exited with {status}:\n{}", peer.name(), process.log());
        }
        return Err(error).context(process.log());
    }
    let addresses = topo.client.ip(&format!("addr show {PEER_TUN}"))?;
    if !addresses.contains("inet ") {
        topo.client
            .ip(&format!("addr add {PEER_ADDRESS} dev {PEER_TUN}"))?;
    }
    topo.client.ip(&format!("link set {PEER_TUN} up"))?;
    topo.client
        .ip(&format!("link set {PEER_TUN} txqueuelen 4096"))?;
    topo.client.ip(&format!(
        "route add {} dev {PEER_TUN}",
        topology::TARGET_NET_V4
    ))?;
    // IPv6 too, ahead of the veth's route (metric 2000): a peer that cannot carry it shows
    // empty IPv6 cells, not kernel routing's figures.
    topo.client.ip(&format!(
        "-6 addr add {PEER_ADDRESS_V6} dev {PEER_TUN} nodad"
    ))?;
    topo.client.ip(&format!(
        "-6 route add {} dev {PEER_TUN} metric 100",
        topology::TARGET_NET_V6
    ))?;
    Ok(Running {
        process,
        _server: server,
    })
}

/// Waits until the peer's TUN is gone after its process ended.
pub(crate) fn wait_gone(topo: &Topology) -> Result<()> {
    wait_for("the peer's TUN to go", Duration::from_secs(10), || {
        topo.client.ip(&format!("link show {PEER_TUN}")).is_err()
    })
}
