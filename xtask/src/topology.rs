//! The standard e2e topology:
//!
//! ```text
//!  client ns                                          server ns
//!  kernel TCP client ── prism0 (TUN) ── prism ── veth ── microsocks, test servers
//!  10.99.0.1/24, fd99::1/64            172.31.0.1   172.31.0.2   targets 10.200.0.1,
//!                                      fd31::1      fd31::2      fd00:200::1 (on lo)
//! ```
//!
//! The targets are routed into the TUN. `direct` upstream sockets must bypass it: with
//! `--fwmark 0x99`, a rule sends marked packets to table 99, which routes the targets over the
//! veth; with `--bind-interface`, a higher-metric veth route in the main table is the only one
//! a socket bound to the veth can use.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::{Netns, Process, wait_for};

pub const TARGET_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1));
pub const TARGET_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1));
pub const TARGET_HOST: &str = "target.prism.test";
/// The IPv4 network the targets are in: what every system under test routes into its TUN.
pub const TARGET_NET_V4: &str = "10.200.0.0/16";
/// The IPv6 network the targets are in.
pub const TARGET_NET_V6: &str = "fd00:200::/64";
/// Addresses routed into the TUN that the server side cannot reach (an `unreachable` route).
pub const UNREACHABLE_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 9, 9));
pub const UNREACHABLE_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 9, 9));
/// The delay link in front of dante.
pub const DELAY_PORT: u16 = 1090;
/// What the delay link adds.
pub const DELAY: std::time::Duration = std::time::Duration::from_millis(150);
pub const SERVER_V4: &str = "172.31.0.2";
pub const SERVER_V6: &str = "fd31::2";
pub const TUN: &str = "prism0";
/// Prism's gateway on the TAP segment.
pub const TAP_GATEWAY_V4: &str = "10.99.0.2";
pub const TAP_GATEWAY_V6: &str = "fd99::2";
/// The gateway's default MAC, as `ip neigh` prints it.
pub const GATEWAY_MAC: &str = "02:50:52:49:53:4d";
pub const FWMARK: &str = "0x99";
/// microsocks, with username/password authentication.
pub const SOCKS_AUTH_PORT: u16 = 1081;
/// dante (danted), which carries half-closes.
pub const DANTE_PORT: u16 = 1082;
pub const SOCKS_USER: &str = "prism";
pub const SOCKS_PASS: &str = "s3cret:pw";

/// Both namespaces and the link between them.
#[derive(Debug)]
pub struct Topology {
    pub client: Netns,
    pub server: Netns,
    /// The client's end of the veth.
    pub client_veth: String,
}

/// Waits until `ns` has at least `sockets` TCP listeners on `port`.
pub fn wait_listening(ns: &Netns, port: u16, sockets: usize, what: &str) -> Result<()> {
    let filter = format!("sport = :{port}");
    wait_for(
        &format!("{what} to listen on {port}"),
        Duration::from_secs(10),
        || {
            ns.exec(&["ss", "-Hltn", &filter])
                .is_ok_and(|out| out.lines().count() >= sockets)
        },
    )
}

/// Starts dante's `danted` in `ns`, listening on `addresses` at `port` and connecting out of
/// `lo` (where the targets are), with its configuration and log in `dir`.
pub fn dante(ns: &Netns, addresses: &[&str], port: u16, dir: &Path) -> Result<Process> {
    let config = dir.join(format!("danted-{}.conf", ns.name()));
    let internal: String = addresses
        .iter()
        .map(|a| format!("internal: {a} port = {port}\n"))
        .collect();
    std::fs::write(
        &config,
        format!(
            "logoutput: stderr\n\
             {internal}\
             external: lo\n\
             clientmethod: none\n\
             socksmethod: none\n\
             user.privileged: root\n\
             user.unprivileged: nobody\n\
             client pass {{ from: 0/0 to: 0/0 log: error }}\n\
             socks pass {{ from: 0/0 to: 0/0 log: error }}\n"
        ),
    )?;
    let log = dir.join(format!("danted-{}.log", ns.name()));
    let mut command = ns.command("danted");
    command
        .arg("-f")
        .arg(&config)
        .args(["-p"])
        .arg(dir.join(format!("danted-{}.pid", ns.name())));
    let process = Process::spawn("danted", command, Some(&log))?;
    // One listening socket per address.
    wait_listening(ns, port, addresses.len(), "danted")
        .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    Ok(process)
}

/// The MAC address of `dev` in `ns`.
fn mac(ns: &Netns, dev: &str) -> Result<String> {
    let out = ns.ip(&format!("-br link show dev {dev}"))?;
    out.split_whitespace()
        .find(|w| w.len() == 17 && w.matches(':').count() == 5)
        .map(str::to_owned)
        .with_context(|| format!("no MAC address for {dev} in {out:?}"))
}

impl Topology {
    pub fn build() -> Result<Self> {
        let client = Netns::create("client")?;
        let server = Netns::create("server")?;
        let pid = std::process::id();
        let (cv, sv) = (format!("pvc{pid}"), format!("pvs{pid}"));
        crate::netns::veth(&client, &cv, &server, &sv)?;
        client.ip(&format!("addr add 172.31.0.1/24 dev {cv}"))?;
        client.ip(&format!("-6 addr add fd31::1/64 dev {cv} nodad"))?;
        client.ip(&format!("link set {cv} up"))?;
        server.ip(&format!("addr add {SERVER_V4}/24 dev {sv}"))?;
        server.ip(&format!("-6 addr add {SERVER_V6}/64 dev {sv} nodad"))?;
        server.ip(&format!("link set {sv} up"))?;
        server.ip(&format!("addr add {TARGET_V4}/32 dev lo"))?;
        server.ip(&format!("-6 addr add {TARGET_V6}/128 dev lo nodad"))?;
        // Bypass routes for `direct`: by mark (table 99) and by interface (higher metric).
        client.ip(&format!("rule add fwmark {FWMARK} lookup 99"))?;
        client.ip(&format!("-6 rule add fwmark {FWMARK} lookup 99"))?;
        client.ip(&format!(
            "route add {TARGET_NET_V4} via {SERVER_V4} dev {cv} table 99"
        ))?;
        client.ip(&format!(
            "-6 route add fd00:200::/64 via {SERVER_V6} dev {cv} table 99"
        ))?;
        client.ip(&format!(
            "route add {TARGET_NET_V4} via {SERVER_V4} dev {cv} metric 500"
        ))?;
        client.ip(&format!(
            "-6 route add fd00:200::/64 via {SERVER_V6} dev {cv} metric 2000"
        ))?;
        // Static neighbours: a burst of 500 connects would otherwise queue behind neighbour
        // discovery and overflow the kernel's per-neighbour queue (noise in the test network,
        // not in Prism).
        let (client_mac, server_mac) = (mac(&client, &cv)?, mac(&server, &sv)?);
        client.ip(&format!(
            "neigh replace {SERVER_V4} lladdr {server_mac} dev {cv} nud permanent"
        ))?;
        client.ip(&format!(
            "-6 neigh replace {SERVER_V6} lladdr {server_mac} dev {cv} nud permanent"
        ))?;
        server.ip(&format!(
            "neigh replace 172.31.0.1 lladdr {client_mac} dev {sv} nud permanent"
        ))?;
        server.ip(&format!(
            "-6 neigh replace fd31::1 lladdr {client_mac} dev {sv} nud permanent"
        ))?;
        // Some targets are unreachable: dante's connects fail there, and with forwarding on, so
        // do direct connects (the server answers with ICMP host unreachable).
        server.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        server.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        server.ip("route add unreachable 10.200.9.0/24")?;
        server.ip("-6 route add unreachable fd00:200::9:0/112")?;
        server.set_hosts(&format!("127.0.0.1 localhost\n{TARGET_V4} {TARGET_HOST}\n"))?;
        Ok(Self {
            client,
            server,
            client_veth: cv,
        })
    }

    /// Starts microsocks in the server namespace on `port`, with credentials if `auth`.
    pub fn start_socks(&self, port: u16, auth: bool, log: &Path) -> Result<Process> {
        let mut command = self.server.command("microsocks");
        command.args(["-i", "::", "-p", &port.to_string()]);
        if auth {
            command.args(["-u", SOCKS_USER, "-P", SOCKS_PASS]);
        }
        let process = Process::spawn("microsocks", command, Some(log))?;
        wait_listening(&self.server, port, 1, "microsocks")?;
        Ok(process)
    }

    /// Starts dante's `danted` in the server namespace, with its configuration in `dir`.
    pub fn start_dante(&self, dir: &Path) -> Result<Process> {
        dante(&self.server, &[SERVER_V4, SERVER_V6], DANTE_PORT, dir)
    }

    /// Packets the client's kernel dropped at the TUN's queue (Prism not reading fast enough),
    /// if the TUN is there.
    pub fn tun_drops(&self) -> Option<u64> {
        let out = self.client.ip(&format!("-s link show {TUN}")).ok()?;
        // `ip -s link`: the line after "TX:" holds bytes, packets, errors, dropped, ...
        let mut lines = out.lines();
        lines
            .by_ref()
            .find(|l| l.trim_start().starts_with("TX:"))
            .and_then(|_| lines.next())
            .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
    }

    /// The arguments of `prism run` in this topology.
    pub fn prism_args(&self, upstream: &str) -> Vec<String> {
        [
            "run",
            "--tun",
            TUN,
            "--address",
            "10.99.0.1/24",
            "--address",
            "fd99::1/64",
            "--route",
            TARGET_NET_V4,
            "--route",
            "fd00:200::/64",
            "--upstream",
            upstream,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The arguments of `prism run --tap` in this topology: Prism is the gateway 10.99.0.2 and
    /// fd99::2 on the TAP segment.
    pub fn prism_tap_args(&self, upstream: &str) -> Vec<String> {
        let mut args = self.prism_args(upstream);
        args.insert(1, "--tap".to_owned());
        args.extend(["--gateway", TAP_GATEWAY_V4, "--gateway", TAP_GATEWAY_V6].map(str::to_owned));
        args
    }

    /// Starts `prism` in the client namespace and waits until its routes are in place.
    pub fn start_prism(&self, prism: &Path, args: &[String], log: &Path) -> Result<Process> {
        let mut command: Command = self.client.command(prism);
        command.args(args).env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or("info".into()),
        );
        let mut process = Process::spawn("prism", command, Some(log))?;
        let ready = wait_for(
            "prism to route into its TUN",
            Duration::from_secs(20),
            || {
                self.client
                    .ip(&format!("route show dev {TUN}"))
                    .is_ok_and(|r| r.contains(TARGET_NET_V4))
                    && self
                        .client
                        .ip(&format!("-6 route show dev {TUN}"))
                        .is_ok_and(|r| r.contains("fd00:200::/64"))
            },
        );
        if let Err(error) = ready {
            if let Some(status) = process.try_status() {
                bail!(
                    "prism exited with {status} before it was ready:\n{}",
                    process.log()
                );
            }
            return Err(error).context(process.log());
        }
        Ok(process)
    }

    /// Whether the TUN is gone from the client namespace.
    pub fn tun_gone(&self) -> bool {
        self.client.ip(&format!("link show {TUN}")).is_err()
    }
}
