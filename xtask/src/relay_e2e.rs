//! The blind relay end to end: client namespace (kernel tools, Prism with `--relay`), server
//! namespace (`prism relay-server`, its TUN, nftables masquerade), target namespace (the hosts
//! the tools talk to). Real tools from Debian: ping, ping -6, dig against dnsmasq; 64 MiB of
//! UDP compared by SHA-256; forged datagrams at the relay port change nothing but counters.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;

use crate::netns::{Netns, Process, run as sh, wait_for};
use crate::servers::pattern;
use crate::topology::{self, Topology};

const RELAY_PORT: u16 = 5555;
const TARGET_V4: &str = "172.32.0.2";
const TARGET_V6: &str = "fd32::2";
const DNS_NAME: &str = "relay.prism.test";
const DNS_ANSWER: &str = "10.1.2.3";
const UDP_PORT: u16 = 7000;
const UDP_BULK: usize = 64 * 1024 * 1024;
const CHUNK: usize = 1200;
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
        sh(
            "ip",
            &[
                "link",
                "add",
                &sv,
                "netns",
                topo.server.name(),
                "type",
                "veth",
                "peer",
                "name",
                &tv,
                "netns",
                ns.name(),
            ],
        )?;
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
    let mut server_cmd = topo.server.command(prism);
    server_cmd.args([
        "relay-server",
        "--listen",
        &format!("{}:{RELAY_PORT}", topology::SERVER_V4),
        "--tun",
        "prelay0",
        "--address",
        "10.99.0.254/24",
        "--address",
        "fd99::fe/64",
        "--key-file",
    ]);
    server_cmd.arg(&key).arg("--stats-file").arg(&server_stats);
    let mut server = Process::spawn(
        "prism relay-server",
        server_cmd,
        Some(&logs.join("relay-server.log")),
    )?;
    wait_for("the relay server's TUN", Duration::from_secs(10), || {
        topo.server.ip("link show prelay0").is_ok()
    })?;

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
        "64 MiB of UDP arrive with their SHA-256",
        udp_bulk(topo, &sink),
    );
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

    let stopped = client.stop(Signal::SIGINT, Duration::from_secs(10))?;
    ensure!(stopped.success(), "prism exited with {stopped}");
    let stopped = server.stop(Signal::SIGINT, Duration::from_secs(10))?;
    ensure!(stopped.success(), "relay-server exited with {stopped}");
    report.record(
        "relay",
        "the forgeries are in the server's counters",
        forgeries_counted(&server_stats),
    );
    drop(sink);
    drop(target);
    Ok(())
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
    let count = |name: &str| -> u64 {
        counters
            .split(&format!("\"{name}\": "))
            .nth(1)
            .and_then(|rest| rest.split([',', '}']).next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    ensure!(
        count("drop_auth") >= FORGED as u64,
        "drop_auth is {} in {counters}",
        count("drop_auth")
    );
    ensure!(
        count("drop_truncated") >= 1,
        "drop_truncated is 0 in {counters}"
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
/// missing, or the SHA-256 of the whole once complete.
struct UdpSink {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpSink {
    fn start(ns: &Netns) -> Result<Self> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let name = ns.name().to_owned();
        let thread = std::thread::spawn(move || {
            let ready = ready_tx.clone();
            let run = move || -> Result<()> {
                crate::netns::enter(&name)?;
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(async move {
                        let socket =
                            UdpSocket::bind((TARGET_V4.parse::<Ipv4Addr>()?, UDP_PORT)).await?;
                        let _ = ready.send(Ok(()));
                        tokio::select! {
                            r = sink(socket) => r,
                            _ = stop_rx => Ok(()),
                        }
                    })
            };
            if let Err(e) = run() {
                let _ = ready_tx.send(Err(e));
            }
        });
        ready_rx.recv().context("the UDP sink died")??;
        Ok(Self {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

const CHUNKS: usize = UDP_BULK.div_ceil(CHUNK);

async fn sink(socket: UdpSocket) -> Result<()> {
    let mut data = vec![0u8; UDP_BULK];
    let mut have = vec![false; CHUNKS];
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        let Some((&kind, rest)) = buf[..n].split_first() else {
            continue;
        };
        match kind {
            b'D' if rest.len() > 4 => {
                let seq = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let chunk = &rest[4..];
                if seq < CHUNKS {
                    let at = seq * CHUNK;
                    let end = (at + chunk.len()).min(UDP_BULK);
                    data[at..end].copy_from_slice(&chunk[..end - at]);
                    have[seq] = true;
                }
            }
            b'?' => {
                let missing: Vec<u32> = (0..CHUNKS)
                    .filter(|&i| !have[i])
                    .take(300)
                    .map(|i| i as u32)
                    .collect();
                let mut reply = Vec::new();
                if missing.is_empty() {
                    reply.push(b'=');
                    reply.extend_from_slice(&Sha256::digest(&data));
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

/// Sends the 64 MiB as numbered chunks, then asks what is missing and resends it until the
/// sink has everything, and compares its SHA-256 with ours.
fn udp_bulk(topo: &Topology, _sink: &UdpSink) -> Result<String> {
    crate::e2e::in_netns(topo.client.name(), async || {
        let data = pattern(77, UDP_BULK);
        let expected = Sha256::digest(&data);
        let socket = UdpSocket::bind("0.0.0.0:0").await?;
        socket
            .connect(SocketAddr::new(IpAddr::V4(TARGET_V4.parse()?), UDP_PORT))
            .await?;
        let send = |seq: usize| {
            let mut d = Vec::with_capacity(CHUNK + 5);
            d.push(b'D');
            d.extend_from_slice(&(seq as u32).to_be_bytes());
            d.extend_from_slice(&data[seq * CHUNK..((seq + 1) * CHUNK).min(UDP_BULK)]);
            d
        };
        let started = Instant::now();
        for seq in 0..CHUNKS {
            socket.send(&send(seq)).await?;
            if seq % 32 == 31 {
                // Pace: a burst of 32 datagrams at a time, so queues are not simply overrun.
                tokio::time::sleep(Duration::from_micros(300)).await;
            }
        }
        let mut resent = 0usize;
        let mut reply = vec![0u8; 2048];
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
                        " ({:.0} Mbit/s, {resent} of {CHUNKS} datagrams resent)",
                        UDP_BULK as f64 * 8.0 / secs / 1e6
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
