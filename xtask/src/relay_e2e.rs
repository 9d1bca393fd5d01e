//! The blind relay end to end: client namespace (kernel tools, Prism with `--relay`), server
//! namespace (`prism relay-server`, its TUN, nftables masquerade), target namespace (the hosts
//! the tools talk to). Real tools from Debian: ping, ping -6, dig against dnsmasq; 64 MiB of
//! UDP compared by SHA-256; forged datagrams at the relay port change nothing but counters.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;

use crate::netns::{Netns, NsTask, Process, run as sh, veth, wait_for};
use crate::servers::pattern;
use crate::topology::{self, Topology};

const RELAY_PORT: u16 = 5555;
/// What the relay server's warning says when a family it serves is not forwarded, in both the
/// test that expects it and the one that expects none.
pub(crate) const NOT_FORWARDING: &str = "is 0: the clients' packets reach this host";
const TARGET_V4: &str = "172.32.0.2";
const TARGET_V6: &str = "fd32::2";
const DNS_NAME: &str = "relay.prism.test";
const DNS_ANSWER: &str = "10.1.2.3";
const UDP_PORT: u16 = 7000;
const UDP_BULK: usize = 64 * 1024 * 1024;
const CHUNK: usize = 1200;
/// The seed of the pattern the sink sends down.
const DOWNLOAD_SEED: u64 = 78;
const FORGED: usize = 20;

/// The target namespace behind the relay server, with NAT towards it.
struct Target {
    ns: Netns,
}

impl Target {
    fn build(topo: &Topology) -> Result<Self> {
        let ns = Netns::create("target")?;
        let pid = std::process::id();
        let (sv, tv) = (format!("pts{pid}"), format!("ptt{pid}"));
        veth(&topo.server, &sv, &ns, &tv)?;
        topo.server
            .ip(&format!("addr add 172.32.0.1/24 dev {sv}"))?;
        topo.server
            .ip(&format!("-6 addr add fd32::1/64 dev {sv} nodad"))?;
        topo.server.ip(&format!("link set {sv} up"))?;
        ns.ip(&format!("addr add {TARGET_V4}/24 dev {tv}"))?;
        ns.ip(&format!("-6 addr add {TARGET_V6}/64 dev {tv} nodad"))?;
        ns.ip(&format!("link set {tv} up"))?;
        // The relay server's kernel NATs the clients' packets towards the target.
        topo.server
            .exec(&["nft", "add", "table", "inet", "prism_relay"])?;
        topo.server.exec(&[
            "nft",
            "add",
            "chain",
            "inet",
            "prism_relay",
            "post",
            "{ type nat hook postrouting priority 100 ; }",
        ])?;
        topo.server.exec(&[
            "nft",
            "add",
            "rule",
            "inet",
            "prism_relay",
            "post",
            "oifname",
            &sv,
            "masquerade",
        ])?;
        Ok(Self { ns })
    }
}

/// Starts `prism relay-server` in `ns` listening on `listen`, with its TUN `prelay0` at
/// 10.99.0.254/24 and `args` after those, logging to `logs/log`, and waits for the TUN.
pub(crate) fn start_relay_server(
    ns: &Netns,
    prism: &Path,
    listen: &str,
    args: &[&std::ffi::OsStr],
    logs: &Path,
    log: &str,
) -> Result<Process> {
    let mut command = ns.command(prism);
    command.args(["relay-server", "--listen", listen]);
    command.args(["--tun", "prelay0", "--address", "10.99.0.254/24"]);
    command.args(args);
    let server = Process::spawn("prism relay-server", command, Some(&logs.join(log)))?;
    wait_for("the relay server's TUN", Duration::from_secs(10), || {
        ns.ip("link show prelay0").is_ok()
    })
    .with_context(|| server.log())?;
    Ok(server)
}

pub(crate) fn run(
    topo: &Topology,
    prism: &Path,
    logs: &Path,
    report: &mut crate::e2e::Report,
) -> Result<()> {
    crate::tools::ensure(&[
        ("ping", "iputils-ping"),
        ("dnsmasq", "dnsmasq-base"),
        ("dig", "dnsutils"),
        ("nft", "nftables"),
    ])?;
    let target = Target::build(topo)?;
    let key = logs.join("relay.key");
    std::fs::write(
        &key,
        "4f1c2b9a7e3d5a60c8b2e9f1d4a7c3b50e6f8a2d1c9b7e4f3a5d2c8b6e1f7a90\n",
    )?;

    let server_stats = logs.join("stats-relay-server.json");
    let listen = format!("{}:{RELAY_PORT}", topology::SERVER_V4);
    let mut server = start_relay_server(
        &topo.server,
        prism,
        &listen,
        &[
            "--address".as_ref(),
            "fd99::fe/64".as_ref(),
            "--key-file".as_ref(),
            key.as_os_str(),
            "--stats-file".as_ref(),
            server_stats.as_os_str(),
        ],
        logs,
        "relay-server.log",
    )?;

    let mut dns_cmd = target.ns.command("dnsmasq");
    dns_cmd.args([
        "--no-daemon",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        &format!("--listen-address={TARGET_V4}"),
        &format!("--address=/{DNS_NAME}/{DNS_ANSWER}"),
        "--port=53",
        "--user=root",
    ]);
    let _dns = Process::spawn("dnsmasq", dns_cmd, Some(&logs.join("dnsmasq.log")))?;
    let sink = UdpSink::start(&target.ns)?;

    let stats = logs.join("stats-relay-client.json");
    let mut args = topo.prism_args("direct");
    args.extend(
        [
            "--fwmark",
            topology::FWMARK,
            "--route",
            "172.32.0.0/24",
            "--route",
            "fd32::/64",
            "--relay",
            &format!("udp://{}:{RELAY_PORT}", topology::SERVER_V4),
            "--relay-key-file",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.push(key.display().to_string());
    args.extend(["--stats-file".to_owned(), stats.display().to_string()]);
    let mut client = topo.start_prism(prism, &args, &logs.join("prism-relay.log"))?;
    println!("e2e: relay");

    report.record(
        "relay v4",
        "ping gets replies through the relay",
        ping(topo, TARGET_V4, false),
    );
    report.record(
        "relay v6",
        "ping -6 gets replies through the relay",
        ping(topo, TARGET_V6, true),
    );
    report.record(
        "relay v4",
        "dig gets dnsmasq's answer through the relay",
        dig(topo),
    );
    report.record(
        "relay v4",
        "64 MiB of UDP arrive with their SHA-256, written to the server's TUN coalesced",
        coalesced_bulk(topo, &sink, &logs.join("relay-server.log")),
    );
    report.record(
        "relay v4",
        "64 MiB of UDP come down with their SHA-256, written to the client's TUN coalesced",
        coalesced_download(topo, &logs.join("prism-relay.log")),
    );
    // From here until the restart below, this client sends full-size runs one by one: none
    // of the cases in between is a bulk transfer.
    report.record(
        "relay v4",
        "on a path narrower than the relay's datagrams, batches go one by one and arrive",
        narrow_path(topo, &sink, &stats),
    );
    report.record(
        "relay v4",
        "too big for the relay: ICMP fragmentation needed, then fits",
        path_mtu(topo, false),
    );
    report.record(
        "relay v6",
        "too big for the relay: ICMPv6 packet too big, then fits",
        path_mtu(topo, true),
    );
    report.record(
        "relay v4",
        "raw GRE (47) and ESP (50) packets cross and come back",
        raw_protocols(topo, &target),
    );
    let gre_what = "a GRE tunnel inside the relay carries a ping";
    let esp_what = "an ESP tunnel inside the relay carries a ping";
    match kernel_lacks(topo) {
        None => {
            report.record("relay v4", gre_what, gre(topo, &target));
            report.record("relay v4", esp_what, esp(topo, &target));
        }
        Some(why) => {
            report.skip("relay v4", gre_what, why);
            report.skip("relay v4", esp_what, why);
        }
    }
    report.record(
        "relay",
        "forged datagrams at the relay port are refused",
        forge(topo),
    );
    report.record(
        "relay v4",
        "still working after the forgeries",
        ping(topo, TARGET_V4, false),
    );

    // A restarted client is a new session with the same addresses: it takes them over at
    // once instead of waiting for the old session to idle out (60 s).
    client.stop_cleanly(Signal::SIGINT)?;
    client = topo.start_prism(prism, &args, &logs.join("prism-relay-restarted.log"))?;
    let restarted = Instant::now();
    report.record(
        "relay v4",
        "a restarted client gets replies at once (its new session takes the addresses over)",
        ping(topo, TARGET_V4, false).map(|note| {
            format!(
                "{note} {:.1} s after the restart",
                restarted.elapsed().as_secs_f64()
            )
        }),
    );
    client.stop_cleanly(Signal::SIGINT)?;
    report.record(
        "relay",
        "a wrong key is one warning on each side at the default level",
        wrong_key(topo, prism, logs, &args, &key, &server),
    );
    // Prism embedded through its C ABI, on the same relay server.
    crate::ffi_e2e::run(topo, logs, &key, report);
    server.stop_cleanly(Signal::SIGINT)?;
    report.record(
        "relay",
        "the forgeries are in the server's counters",
        forgeries_counted(&server_stats),
    );
    report.record(
        "relay",
        "a server on a host that forwards both families says nothing of forwarding",
        if server.log().contains(NOT_FORWARDING) {
            Err(anyhow::anyhow!(
                "a forwarding warning on a forwarding host:\n{}",
                server.log()
            ))
        } else {
            Ok(String::new())
        },
    );
    identities(topo, prism, logs, &args, report)?;
    drop(sink);
    drop(target);
    Ok(())
}

/// The relay with identities: keys made by `prism genkey` and `prism pubkey`, the server
/// allowing the client's public key for the client's addresses. Pings cross both families; a
/// client whose key the server does not allow gets nothing through, and each side says why
/// in one warning.
fn identities(
    topo: &Topology,
    prism: &Path,
    logs: &Path,
    shared_args: &[String],
    report: &mut crate::e2e::Report,
) -> Result<()> {
    let keypair = |name: &str| -> Result<(PathBuf, String)> {
        let private = logs.join(format!("{name}.key"));
        std::fs::write(&private, sh(&prism.display().to_string(), &["genkey"])?)?;
        let public = std::process::Command::new(prism)
            .arg("pubkey")
            .stdin(std::fs::File::open(&private)?)
            .output()
            .context("cannot run prism pubkey")?;
        ensure!(public.status.success(), "prism pubkey failed");
        Ok((
            private,
            String::from_utf8_lossy(&public.stdout).trim().to_owned(),
        ))
    };
    let (server_key, server_public) = keypair("server")?;
    let (client_key, client_public) = keypair("client")?;
    let (stranger_key, _) = keypair("stranger")?;

    let listen = format!("{}:{RELAY_PORT}", topology::SERVER_V4);
    let peer = format!("{client_public},10.99.0.1/32,fd99::1/128");
    let mut server = start_relay_server(
        &topo.server,
        prism,
        &listen,
        &[
            "--address".as_ref(),
            "fd99::fe/64".as_ref(),
            "--peer".as_ref(),
            peer.as_ref(),
            "--private-key-file".as_ref(),
            server_key.as_os_str(),
        ],
        logs,
        "relay-server-identities.log",
    )?;
    let with_key = |private: &Path| -> Vec<String> {
        let mut args = Vec::new();
        let mut rest = shared_args.iter();
        while let Some(arg) = rest.next() {
            if arg == "--relay-key-file" {
                rest.next();
                continue;
            }
            args.push(arg.clone());
        }
        args.extend([
            "--relay-private-key-file".to_owned(),
            private.display().to_string(),
            "--relay-server-key".to_owned(),
            server_public.clone(),
        ]);
        args
    };
    let mut client = topo.start_prism(
        prism,
        &with_key(&client_key),
        &logs.join("prism-relay-identities.log"),
    )?;
    println!("e2e: relay with identities");
    report.record(
        "relay identities v4",
        "ping gets replies through the relay, the client with its own key",
        ping(topo, TARGET_V4, false),
    );
    report.record(
        "relay identities v6",
        "ping -6 gets replies through the relay, the client with its own key",
        ping(topo, TARGET_V6, true),
    );
    client.stop_cleanly(Signal::SIGINT)?;
    report.record(
        "relay identities",
        "a client key the server does not allow: no reply, one warning on each side",
        stranger(topo, prism, logs, &with_key(&stranger_key), &server),
    );
    server.stop_cleanly(Signal::SIGINT)?;
    Ok(())
}

/// A client whose key the server does not allow: the handshake is refused, the client says the
/// relay is silent and the server names the key to add.
fn stranger(
    topo: &Topology,
    prism: &Path,
    logs: &Path,
    args: &[String],
    server: &Process,
) -> Result<String> {
    refused(
        topo,
        prism,
        args,
        &logs.join("prism-relay-stranger.log"),
        server,
        "does not allow",
    )
}

/// A client the relay server refuses: no ping gets through, the client warns once that the
/// relay is silent, and the server warns once, saying `server_says`.
fn refused(
    topo: &Topology,
    prism: &Path,
    args: &[String],
    log: &Path,
    server: &Process,
    server_says: &str,
) -> Result<String> {
    let mut client = topo.start_prism(prism, args, log)?;
    let pinged = ping(topo, TARGET_V4, false);
    let said = wait_for(
        "the client to say the relay is silent",
        Duration::from_secs(20),
        || client.log().contains("is silent"),
    );
    let stopped = client.stop_cleanly(Signal::SIGINT);
    said.with_context(|| client.log())?;
    stopped?;
    ensure!(
        pinged.is_err(),
        "a ping got through the relay server that refuses this client"
    );
    let warned = |log: &str, says: &str| crate::routed_e2e::warnings(log, says).len();
    ensure!(
        warned(&client.log(), "is silent") == 1,
        "the client should warn once:\n{}",
        client.log()
    );
    ensure!(
        warned(&server.log(), server_says) == 1,
        "the server should warn once ({server_says}):\n{}",
        server.log()
    );
    Ok(String::new())
}

/// A client whose key differs from the server's: its hellos never authenticate. The client says
/// the relay is silent after 10 s; the server says which source fails authentication.
fn wrong_key(
    topo: &Topology,
    prism: &Path,
    logs: &Path,
    args: &[String],
    key: &Path,
    server: &Process,
) -> Result<String> {
    let wrong = logs.join("wrong.key");
    std::fs::write(&wrong, "a different key of more than sixteen bytes\n")?;
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if Path::new(a) == key {
                wrong.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    // The server's warning is per source, at most every 30 s: the forgeries before and this
    // key count as one.
    refused(
        topo,
        prism,
        &args,
        &logs.join("prism-relay-wrong-key.log"),
        server,
        "fail authentication",
    )
}

fn ping(topo: &Topology, to: &str, v6: bool) -> Result<String> {
    let mut args = vec!["ping", "-c", "3", "-i", "0.2", "-W", "2"];
    if v6 {
        args.push("-6");
    }
    args.push(to);
    let out = topo.client.exec(&args)?;
    let summary = out
        .lines()
        .find(|l| l.contains("rtt") || l.contains("round-trip"));
    ensure!(
        out.contains("3 received"),
        "not every echo came back:\n{out}"
    );
    Ok(format!(" ({})", summary.unwrap_or_default().trim()))
}

/// The relay server is reached over IPv4 with a 1500-byte path, so the relay carries packets of
/// up to 1430 bytes (1500 less 28 bytes of outer IPv4 and UDP, less 42 of relay header and
/// tag), whatever their own family. A larger ping that may not be fragmented is answered with
/// that MTU: over IPv4 one that fits then gets through; over IPv6 the kernel learns the MTU from
/// "packet too big" and fragments, and the fragments are relayed.
fn path_mtu(topo: &Topology, v6: bool) -> Result<String> {
    let ping = |extra: &[&str]| -> Result<String> {
        let mut command = topo.client.command("ping");
        command.args(["-c", "1", "-W", "2"]).args(extra);
        let output = command.output()?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    };
    if v6 {
        let first = ping(&["-6", "-s", "1450", TARGET_V6])?;
        ensure!(
            first.to_lowercase().contains("mtu=1430")
                || first.to_lowercase().contains("mtu = 1430"),
            "no packet-too-big with mtu 1430:\n{first}"
        );
        let second = ping(&["-6", "-s", "1450", TARGET_V6])?;
        ensure!(
            second.contains("1 received"),
            "after learning the MTU the ping still fails:\n{second}"
        );
        return Ok(" (told mtu 1430, then fragmented and delivered)".to_owned());
    }
    let first = ping(&["-M", "do", "-s", "1450", TARGET_V4])?;
    ensure!(
        first.contains("mtu = 1430") || first.contains("mtu=1430"),
        "no fragmentation-needed with mtu 1430:\n{first}"
    );
    let fits = ping(&["-M", "do", "-s", "1400", TARGET_V4])?;
    ensure!(
        fits.contains("1 received"),
        "a 1428-byte ping did not get through:\n{fits}"
    );
    Ok(" (told mtu 1430; 1428 bytes then get through)".to_owned())
}

/// Whether this kernel can make GRE devices and ESP states; `Some(reason)` if not.
fn kernel_lacks(topo: &Topology) -> Option<&'static str> {
    let gre = topo
        .client
        .ip("link add pgreprobe type gre local 10.99.0.1 remote 172.32.0.2");
    let _ = topo.client.ip("link del pgreprobe");
    let esp = topo.client.ip(
        "xfrm state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 0x999 mode tunnel \
         enc cbc(aes) 0x0102030405060708090a0b0c0d0e0f10 auth-trunc hmac(sha256) \
         0x0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20 128",
    );
    let _ = topo.client.ip("xfrm state flush");
    match (gre, esp) {
        (Ok(_), Ok(_)) => None,
        _ => Some("this kernel has no GRE or ESP (xfrm) support and no modules to load"),
    }
}

/// Raw IP packets of protocols 47 (GRE) and 50 (ESP) from the client's tunnel address to the
/// target, and the target's raw reply back: the relay carries any protocol, whole, both ways
/// through the server's NAT.
fn raw_protocols(topo: &Topology, target: &Target) -> Result<String> {
    let responder = r#"
import socket, select, sys
socks = [socket.socket(socket.AF_INET, socket.SOCK_RAW, p) for p in (47, 50)]
for s in socks: s.settimeout(10)
answered = 0
while answered < 2:
    ready, _, _ = select.select(socks, [], [], 10)
    if not ready: sys.exit(1)
    for s in ready:
        data, (src, _) = s.recvfrom(2048)
        payload = data[(data[0] & 15) * 4:]
        if b"prism relay" in payload:
            s.sendto(payload.replace(b"prism relay", b"echo! relay"), (src, 0))
            answered += 1
"#;
    let mut responder_cmd = target.ns.command("python3");
    responder_cmd.args(["-c", responder]);
    let mut responder = Process::spawn("raw responder", responder_cmd, None)?;
    std::thread::sleep(Duration::from_millis(300));
    let sender = format!(
        r#"
import socket
# GRE version 0 carrying IPv4 (flags 0, protocol 0x0800); ESP: SPI and sequence number.
headers = {{47: bytes([0, 0, 8, 0]), 50: bytes([0, 0, 1, 0, 0, 0, 0, 1])}}
for proto in (50, 47):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    s.settimeout(5)
    message = headers[proto] + b"prism relay protocol %d" % proto
    s.sendto(message, ("{TARGET_V4}", 0))
    try:
        while True:
            data, (src, _) = s.recvfrom(2048)
            payload = data[(data[0] & 15) * 4:]
            if payload == message.replace(b"prism relay", b"echo! relay"):
                print("protocol", proto, "from", src)
                break
    except TimeoutError:
        print("protocol", proto, "timed out")
"#
    );
    let out = topo.client.exec(&["python3", "-c", &sender]);
    let _ = responder.stop(Signal::SIGTERM, Duration::from_secs(2));
    let out = out?;
    ensure!(
        out.lines().count() == 2,
        "not both protocols came back: {out:?}"
    );
    Ok(format!(" ({})", out.lines().collect::<Vec<_>>().join(", ")))
}

/// The relay server masquerades, so the target sees the client's outer packets from the
/// server's address on the target link.
const NATED_CLIENT: &str = "172.32.0.1";
const CLIENT_TUNNEL: &str = "10.99.0.1";

/// A GRE tunnel (IP protocol 47) from the client's tunnel address to the target, with its own
/// inner addresses; a ping across it must come back.
fn gre(topo: &Topology, target: &Target) -> Result<String> {
    topo.client.ip(&format!(
        "tunnel add pgre mode gre local {CLIENT_TUNNEL} remote {TARGET_V4} ttl 64"
    ))?;
    topo.client.ip("addr add 192.168.77.1/30 dev pgre")?;
    topo.client.ip("link set pgre up")?;
    target.ns.ip(&format!(
        "tunnel add pgre mode gre local {TARGET_V4} remote {NATED_CLIENT} ttl 64"
    ))?;
    target.ns.ip("addr add 192.168.77.2/30 dev pgre")?;
    target.ns.ip("link set pgre up")?;
    let out = topo
        .client
        .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "192.168.77.2"]);
    let _ = topo.client.ip("tunnel del pgre");
    let _ = target.ns.ip("tunnel del pgre");
    let out = out?;
    ensure!(
        out.contains("3 received"),
        "not every echo came back over GRE:\n{out}"
    );
    let rtt = out.lines().find(|l| l.contains("rtt")).unwrap_or_default();
    Ok(format!(" ({})", rtt.trim()))
}

/// An ESP tunnel (IP protocol 50) with static keys (`ip xfrm`) between the client and the
/// target; a ping between the inner addresses 192.168.88.1 and .2 must come back.
fn esp(topo: &Topology, target: &Target) -> Result<String> {
    const KEY: &str = "0x6d6f72652074686e2033322062797465732c206f6620636f757273652e2e2e21";
    const AUTH: &str = "0x0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20";
    let sa = |ns: &Netns, src: &str, dst: &str, spi: &str| {
        ns.ip(&format!(
            "xfrm state add src {src} dst {dst} proto esp spi {spi} mode tunnel \
             enc cbc(aes) {KEY} auth-trunc hmac(sha256) {AUTH} 128"
        ))
    };
    let policy = |ns: &Netns, inner: (&str, &str), outer: (&str, &str), dir: &str, spi: &str| {
        ns.ip(&format!(
            "xfrm policy add src {}/32 dst {}/32 dir {dir} tmpl src {} dst {} proto esp spi {spi} mode tunnel",
            inner.0, inner.1, outer.0, outer.1
        ))
    };
    let (c, t) = (&topo.client, &target.ns);
    // Client: out 10.99.0.1 -> target (spi 0x100), in target -> 10.99.0.1 (spi 0x200).
    sa(c, CLIENT_TUNNEL, TARGET_V4, "0x100")?;
    sa(c, TARGET_V4, CLIENT_TUNNEL, "0x200")?;
    policy(
        c,
        ("192.168.88.1", "192.168.88.2"),
        (CLIENT_TUNNEL, TARGET_V4),
        "out",
        "0x100",
    )?;
    policy(
        c,
        ("192.168.88.2", "192.168.88.1"),
        (TARGET_V4, CLIENT_TUNNEL),
        "in",
        "0x200",
    )?;
    c.ip("addr add 192.168.88.1/32 dev lo")?;
    c.ip(&format!(
        "route add 192.168.88.2/32 dev {} src 192.168.88.1",
        topology::TUN
    ))?;
    // Target: the client appears as the NATed 172.32.0.1.
    sa(t, NATED_CLIENT, TARGET_V4, "0x100")?;
    sa(t, TARGET_V4, NATED_CLIENT, "0x200")?;
    policy(
        t,
        ("192.168.88.1", "192.168.88.2"),
        (NATED_CLIENT, TARGET_V4),
        "in",
        "0x100",
    )?;
    policy(
        t,
        ("192.168.88.2", "192.168.88.1"),
        (TARGET_V4, NATED_CLIENT),
        "out",
        "0x200",
    )?;
    t.ip("addr add 192.168.88.2/32 dev lo")?;
    t.ip(&format!(
        "route add 192.168.88.1/32 via {NATED_CLIENT} src 192.168.88.2"
    ))?;
    let out = c.exec(&[
        "ping",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "2",
        "-I",
        "192.168.88.1",
        "192.168.88.2",
    ]);
    for ns in [c, t] {
        let _ = ns.ip("xfrm policy flush");
        let _ = ns.ip("xfrm state flush");
    }
    let out = out?;
    ensure!(
        out.contains("3 received"),
        "not every echo came back over ESP:\n{out}"
    );
    let rtt = out.lines().find(|l| l.contains("rtt")).unwrap_or_default();
    Ok(format!(" ({})", rtt.trim()))
}

fn dig(topo: &Topology) -> Result<String> {
    let out = topo.client.exec(&[
        "dig",
        "+short",
        "+time=2",
        "+tries=2",
        &format!("@{TARGET_V4}"),
        DNS_NAME,
    ])?;
    ensure!(
        out.trim() == DNS_ANSWER,
        "dig answered {out:?}, expected {DNS_ANSWER}"
    );
    Ok(format!(" ({DNS_NAME} -> {})", out.trim()))
}

/// Sends datagrams at the relay from a test socket: garbage, bit-flipped and truncated.
fn forge(topo: &Topology) -> Result<String> {
    crate::e2e::in_netns(topo.client.name(), async || {
        let socket = UdpSocket::bind("0.0.0.0:0").await?;
        let relay: SocketAddr = format!("{}:{RELAY_PORT}", topology::SERVER_V4).parse()?;
        for i in 0..FORGED {
            let mut datagram = pattern(i as u64, 60 + i * 7);
            datagram[0] = 1; // our version byte, so it gets as far as authentication
            datagram[1] = 2;
            socket.send_to(&datagram, relay).await?;
        }
        socket.send_to(&[1, 2, 3], relay).await?;
        Ok(format!(" ({} sent)", FORGED + 1))
    })
}

fn forgeries_counted(stats: &Path) -> Result<String> {
    let counters = std::fs::read_to_string(stats).context("the relay server wrote no stats")?;
    let count = |name: &str| crate::e2e::stat(&counters, name);
    ensure!(
        count("drop_auth") >= FORGED as u64,
        "drop_auth is {} in {counters}",
        count("drop_auth")
    );
    ensure!(
        count("drop_truncated") >= 1,
        "drop_truncated is 0 in {counters}"
    );
    // Everything the server wrote to its TUN, coalesced runs among it, the kernel took.
    let refused = crate::e2e::counter(&counters, "tun_refused_writes").ok();
    ensure!(
        refused == Some(0),
        "tun_refused_writes is {refused:?} in {counters}"
    );
    Ok(format!(
        " (auth {}, truncated {}, replay {}, spoofed {})",
        count("drop_auth"),
        count("drop_truncated"),
        count("drop_replay"),
        count("drop_spoofed")
    ))
}

/// A UDP sink in the target namespace: numbered chunks in, and on request the list of what is
/// missing, or the SHA-256 of the whole once complete. Stops when dropped.
struct UdpSink(#[allow(dead_code, reason = "held for its Drop")] NsTask);

impl UdpSink {
    fn start(ns: &Netns) -> Result<Self> {
        let task = NsTask::start(ns.name(), "the UDP sink", || async {
            let socket = UdpSocket::bind((TARGET_V4.parse::<Ipv4Addr>()?, UDP_PORT)).await?;
            Ok(async move {
                let _ = sink(socket).await;
            })
        })?;
        Ok(Self(task))
    }
}

/// What the sink gathers: `total` bytes in chunks of `chunk`.
struct Bulk {
    chunk: usize,
    data: Vec<u8>,
    have: Vec<bool>,
}

impl Bulk {
    fn new(chunk: usize, total: usize) -> Self {
        Self {
            chunk,
            data: vec![0; total],
            have: vec![false; total.div_ceil(chunk)],
        }
    }

    /// Keeps chunk `seq`; false if it is out of range or was there already.
    fn put(&mut self, seq: usize, chunk: &[u8]) -> bool {
        if seq >= self.have.len() || self.have[seq] {
            return false;
        }
        let at = seq * self.chunk;
        let end = (at + chunk.len()).min(self.data.len());
        self.data[at..end].copy_from_slice(&chunk[..end - at]);
        self.have[seq] = true;
        true
    }

    /// Up to 300 of the chunks still missing.
    fn missing(&self) -> Vec<u32> {
        (0..self.have.len())
            .filter(|&i| !self.have[i])
            .take(300)
            .map(|i| i as u32)
            .collect()
    }
}

/// The sink's protocol: `R` + chunk size (u16) + total (u32) starts over (answered `r`); `D` +
/// sequence number (u32) + a chunk; `?` asks what is missing (`!` + up to 300 sequence
/// numbers), or for the SHA-256 once complete (`=` + digest). The other way: `P`, a chunk size
/// and a total ask for [`DOWNLOAD_SEED`]'s pattern, sent as `D` datagrams; `M` and sequence
/// numbers ask for those again.
async fn sink(socket: UdpSocket) -> Result<()> {
    let mut bulk = Bulk::new(CHUNK, UDP_BULK);
    let mut buf = vec![0u8; 2048];
    let mut download = (CHUNK, Vec::new());
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        let Some((&kind, rest)) = buf[..n].split_first() else {
            continue;
        };
        match kind {
            b'P' if rest.len() == 6 => {
                let chunk = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let total = u32::from_be_bytes([rest[2], rest[3], rest[4], rest[5]]) as usize;
                if chunk == 0 || total > UDP_BULK {
                    continue;
                }
                download = (chunk, pattern(DOWNLOAD_SEED, total));
                let (chunk, data) = (download.0, &download.1);
                for seq in 0..total.div_ceil(chunk) {
                    socket.send_to(&numbered(data, chunk, seq), from).await?;
                    if seq % 32 == 31 {
                        tokio::time::sleep(Duration::from_micros(300)).await;
                    }
                }
            }
            b'M' => {
                let (chunk, data) = (download.0, &download.1);
                for seq in rest.chunks_exact(4) {
                    let seq = u32::from_be_bytes([seq[0], seq[1], seq[2], seq[3]]) as usize;
                    if seq < data.len().div_ceil(chunk) {
                        socket.send_to(&numbered(data, chunk, seq), from).await?;
                    }
                }
            }
            b'R' if rest.len() == 6 => {
                let chunk = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let total = u32::from_be_bytes([rest[2], rest[3], rest[4], rest[5]]) as usize;
                if chunk > 0 && total <= UDP_BULK {
                    bulk = Bulk::new(chunk, total);
                    socket.send_to(b"r", from).await?;
                }
            }
            b'D' if rest.len() > 4 => {
                let seq = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                bulk.put(seq, &rest[4..]);
            }
            b'?' => {
                let missing = bulk.missing();
                let mut reply = Vec::new();
                if missing.is_empty() {
                    reply.push(b'=');
                    reply.extend_from_slice(&Sha256::digest(&bulk.data));
                } else {
                    reply.push(b'!');
                    for seq in missing {
                        reply.extend_from_slice(&seq.to_be_bytes());
                    }
                }
                socket.send_to(&reply, from).await?;
            }
            _ => {}
        }
    }
}

/// The client's link to the relay server narrowed to 1,400 bytes, below the relay's datagrams
/// (the relay's own MTU, 1,430, assumes 1,500): the kernel refuses to segment a batch of them
/// (UDP GSO), so the relay sends them one at a time for the kernel to fragment. 16 MiB in
/// 1,350-byte datagrams arrive whole; during the transfer batches were refused
/// (`relay_gso_refused` grew) and no datagram was lost to it (`relay_drop_send` did not).
fn narrow_path(topo: &Topology, sink: &UdpSink, stats: &Path) -> Result<String> {
    let before = fresh_stats(stats)?;
    let sent = {
        let _narrow = Narrow::new(topo, 1400)?;
        udp_bulk(topo, sink, 1350, 16 * 1024 * 1024)?
    };
    let after = fresh_stats(stats)?;
    let grew = |name: &str| crate::e2e::stat(&after, name) - crate::e2e::stat(&before, name);
    let (refused, lost) = (grew("relay_gso_refused"), grew("relay_drop_send"));
    ensure!(refused > 0, "no batch was refused: {after}");
    ensure!(lost == 0, "{lost} datagrams were lost: {after}");
    Ok(format!("{sent}; batches refused: {refused}"))
}

/// The 64 MiB bulk transfer, counting the relay server's writes to its TUN (what its kernel
/// counts as received packets): runs of one flow's datagrams go in as one super-packet, so
/// there are far fewer writes than datagrams (at most half; a server writing one packet per
/// call makes as many writes as datagrams, and more with the resent ones).
fn coalesced_bulk(topo: &Topology, sink: &UdpSink, log: &Path) -> Result<String> {
    let writes = || -> Result<u64> {
        let count = topo
            .server
            .exec(&["cat", "/sys/class/net/prelay0/statistics/rx_packets"])?;
        count.trim().parse().context("the TUN's packet count")
    };
    let before = writes()?;
    let sent = udp_bulk(topo, sink, CHUNK, UDP_BULK)?;
    let written = writes()? - before;
    let datagrams = UDP_BULK.div_ceil(CHUNK) as u64;
    if !udp_offload_granted(log, "relay server's TUN open")? {
        return Ok(format!("{sent}; the TUN takes no UDP super-packets here"));
    }
    ensure!(
        written * 2 <= datagrams,
        "{written} TUN writes for {datagrams} datagrams: not coalesced"
    );
    Ok(format!(
        "{sent}; {written} TUN writes for {datagrams} datagrams"
    ))
}

/// Chunk `seq` of `data` as a `D` datagram: the sequence number, then the bytes.
fn numbered(data: &[u8], chunk: usize, seq: usize) -> Vec<u8> {
    let mut d = Vec::with_capacity(chunk + 5);
    d.push(b'D');
    d.extend_from_slice(&(seq as u32).to_be_bytes());
    d.extend_from_slice(&data[seq * chunk..((seq + 1) * chunk).min(data.len())]);
    d
}

/// 64 MiB of UDP from the target down to the client through the relay, counting the client
/// TUN's packets (what Prism writes to it): runs of the download's datagrams go in as one
/// super-packet, so there are fewer writes than datagrams (one write per datagram, as before,
/// makes as many; how many a run holds depends on how the datagrams bunch up).
fn coalesced_download(topo: &Topology, log: &Path) -> Result<String> {
    let writes = || -> Result<u64> {
        let path = format!("/sys/class/net/{}/statistics/rx_packets", topology::TUN);
        let count = topo.client.exec(&["cat", &path])?;
        count.trim().parse().context("the TUN's packet count")
    };
    let before = writes()?;
    let received = udp_download(topo, CHUNK, UDP_BULK)?;
    let written = writes()? - before;
    let datagrams = UDP_BULK.div_ceil(CHUNK) as u64;
    if !udp_offload_granted(log, "device open")? {
        return Ok(format!(
            "{received}; the TUN takes no UDP super-packets here"
        ));
    }
    ensure!(
        written < datagrams,
        "{written} TUN writes for {datagrams} datagrams: not coalesced"
    );
    Ok(format!(
        "{received}; {written} TUN writes for {datagrams} datagrams"
    ))
}

/// Asks the sink for `total` bytes in chunks of `chunk`, gathers them, asks again for what is
/// missing until everything is there, and compares the SHA-256 with the pattern's.
fn udp_download(topo: &Topology, chunk: usize, total: usize) -> Result<String> {
    crate::e2e::in_netns(topo.client.name(), async move || {
        let expected = Sha256::digest(pattern(DOWNLOAD_SEED, total));
        let socket = UdpSocket::bind("0.0.0.0:0").await?;
        socket
            .connect(SocketAddr::new(IpAddr::V4(TARGET_V4.parse()?), UDP_PORT))
            .await?;
        let mut request = vec![b'P'];
        request.extend_from_slice(&u16::try_from(chunk)?.to_be_bytes());
        request.extend_from_slice(&u32::try_from(total)?.to_be_bytes());
        let mut bulk = Bulk::new(chunk, total);
        let mut buf = vec![0u8; 2048];
        let (mut received, mut asked) = (0usize, 0usize);
        let started = Instant::now();
        for _round in 0..2000 {
            if received == 0 {
                socket.send(&request).await?;
            }
            // Gather until the sender has been quiet for a while.
            while let Ok(n) =
                tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf)).await
            {
                let n = n?;
                let Some((b'D', rest)) = buf[..n].split_first() else {
                    continue;
                };
                let Some((seq, data)) = rest.split_first_chunk::<4>() else {
                    continue;
                };
                if bulk.put(u32::from_be_bytes(*seq) as usize, data) {
                    received += 1;
                }
            }
            let missing = bulk.missing();
            if missing.is_empty() {
                ensure!(
                    Sha256::digest(&bulk.data) == expected,
                    "the download's SHA-256 differs"
                );
                // The quiet period at the end is not the transfer's.
                let secs = (started.elapsed().as_secs_f64() - 0.3).max(0.001);
                return Ok(format!(
                    " ({:.0} Mbit/s, {asked} of {} datagrams asked again)",
                    total as f64 * 8.0 / secs / 1e6,
                    bulk.have.len()
                ));
            }
            if received > 0 {
                asked += missing.len();
                let mut again = vec![b'M'];
                for seq in missing {
                    again.extend_from_slice(&seq.to_be_bytes());
                }
                socket.send(&again).await?;
            }
        }
        bail!("the download never completed ({received} datagrams received)")
    })
}

/// Whether Prism's log says, on its `opened` line, that the kernel granted UDP offload on the
/// TUN (what lets UDP be written coalesced). Linux 6.2 and later must: a refusal there fails.
fn udp_offload_granted(log: &Path, opened: &str) -> Result<bool> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let line = text
        .lines()
        .find(|l| l.contains(opened))
        .with_context(|| format!("no {opened:?} line in {}", log.display()))?;
    let granted = line.contains("udp_offload=true");
    ensure!(
        granted || !kernel_at_least(6, 2),
        "Linux 6.2 or later, yet no UDP offload on the TUN: {line}"
    );
    Ok(granted)
}

/// Whether the running kernel's version is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    version >= (major, minor)
}

/// The client's link narrowed to `mtu` bytes until dropped.
struct Narrow<'a> {
    topo: &'a Topology,
}

impl<'a> Narrow<'a> {
    fn new(topo: &'a Topology, mtu: u16) -> Result<Self> {
        topo.client
            .ip(&format!("link set {} mtu {mtu}", topo.client_veth))?;
        Ok(Self { topo })
    }
}

impl Drop for Narrow<'_> {
    fn drop(&mut self) {
        let _ = self
            .topo
            .client
            .ip(&format!("link set {} mtu 1500", self.topo.client_veth));
    }
}

/// The stats file as Prism writes it next (every 5 s, whole: renamed into place), so its
/// counts are from after this call.
fn fresh_stats(stats: &Path) -> Result<String> {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let now = std::time::SystemTime::now();
    wait_for("a fresh stats file", Duration::from_secs(12), || {
        modified(stats).is_some_and(|at| at > now)
    })?;
    std::fs::read_to_string(stats).context("reading the stats file")
}

/// Sends `total` bytes in numbered chunks of `chunk`, then asks what is missing and resends it
/// until the sink has everything, and compares its SHA-256 with ours.
fn udp_bulk(topo: &Topology, _sink: &UdpSink, chunk: usize, total: usize) -> Result<String> {
    let chunks = total.div_ceil(chunk);
    crate::e2e::in_netns(topo.client.name(), async move || {
        let data = pattern(77, total);
        let expected = Sha256::digest(&data);
        let socket = UdpSocket::bind("0.0.0.0:0").await?;
        socket
            .connect(SocketAddr::new(IpAddr::V4(TARGET_V4.parse()?), UDP_PORT))
            .await?;
        let mut reply = vec![0u8; 2048];
        let mut start = vec![b'R'];
        start.extend_from_slice(&u16::try_from(chunk)?.to_be_bytes());
        start.extend_from_slice(&u32::try_from(total)?.to_be_bytes());
        let mut ready = false;
        for _ in 0..20 {
            socket.send(&start).await?;
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut reply)).await
                && reply[..n] == *b"r"
            {
                ready = true;
                break;
            }
        }
        ensure!(ready, "the sink never answered its start");
        let send = |seq: usize| numbered(&data, chunk, seq);
        let started = Instant::now();
        for seq in 0..chunks {
            socket.send(&send(seq)).await?;
            if seq % 32 == 31 {
                // Pace: a burst of 32 datagrams at a time, so queues are not simply overrun.
                tokio::time::sleep(Duration::from_micros(300)).await;
            }
        }
        let mut resent = 0usize;
        for _round in 0..2000 {
            socket.send(b"?").await?;
            let n = match tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut reply))
                .await
            {
                Ok(r) => r?,
                Err(_) => continue,
            };
            match reply[..n].split_first() {
                Some((b'=', digest)) => {
                    ensure!(digest == &expected[..], "the sink's SHA-256 differs");
                    let secs = started.elapsed().as_secs_f64();
                    return Ok(format!(
                        " ({:.0} Mbit/s, {resent} of {chunks} datagrams resent)",
                        total as f64 * 8.0 / secs / 1e6
                    ));
                }
                Some((b'!', missing)) => {
                    for seq in missing.chunks_exact(4) {
                        let seq = u32::from_be_bytes([seq[0], seq[1], seq[2], seq[3]]) as usize;
                        socket.send(&send(seq)).await?;
                        resent += 1;
                    }
                }
                _ => bail!("an unexpected reply from the sink"),
            }
        }
        bail!("the sink never had everything ({resent} resent)")
    })
}
