//! The whole machine through Prism, on a routed topology: the proxy and the servers are on
//! the far side of a router, not on the client's subnet.
//!
//! ```text
//!  client ns                      router ns                      far ns
//!  prism run --default-route ── c0 ──── r0 (forwards) r1 ──── f0  dante 10.70.2.2:1080
//!  10.70.1.2, fd70:1::2            10.70.1.1  10.70.2.1           servers 10.70.3.1, fd70:3::1
//! ```
//!
//! With `--default-route`, every unmarked packet of the client enters the TUN; Prism's own
//! sockets (to the proxy, or direct) carry its mark and leave by the main table. A loop would
//! show as more connections than the client opened. After SIGTERM the policy rules and every
//! routing table are exactly as before; after kill -9, the next start removes what was left.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::e2e::{Report, counter, in_netns};
use crate::netns::{Netns, Process, run as sh, wait_for};
use crate::servers::{ECHO, Servers, pattern};

const PROXY: &str = "10.70.2.2";
const PROXY_PORT: u16 = 1080;
const WEB_V4: &str = "10.70.3.1";
const WEB_V6: &str = "fd70:3::1";
const TUN: &str = "prism0";
/// The far side's web server.
const WEB_PORT: u16 = 8080;
/// Where the socks5 runs serve their Prometheus metrics.
const METRICS: &str = "127.0.0.1:9477";
/// What the far side's dnsmasq answers with WEB_V4.
const WEB_NAME: &str = "web.prism.test";

struct Routed {
    client: Netns,
    _router: Netns,
    far: Netns,
}

fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<()> {
    sh(
        "ip",
        &[
            "link",
            "add",
            a_name,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_name,
            "netns",
            b.name(),
        ],
    )?;
    Ok(())
}

impl Routed {
    fn build() -> Result<Routed> {
        let client = Netns::create("rclient")?;
        let router = Netns::create("router")?;
        let far = Netns::create("far")?;
        let pid = std::process::id();
        let (c0, r0, r1, f0) = (
            format!("rc{pid}"),
            format!("rr{pid}"),
            format!("rs{pid}"),
            format!("rf{pid}"),
        );
        veth(&client, &c0, &router, &r0)?;
        veth(&router, &r1, &far, &f0)?;
        for (ns, dev, v4, v6) in [
            (&client, &c0, "10.70.1.2/24", "fd70:1::2/64"),
            (&router, &r0, "10.70.1.1/24", "fd70:1::1/64"),
            (&router, &r1, "10.70.2.1/24", "fd70:2::1/64"),
            (&far, &f0, "10.70.2.2/24", "fd70:2::2/64"),
        ] {
            ns.ip(&format!("addr add {v4} dev {dev}"))?;
            ns.ip(&format!("-6 addr add {v6} dev {dev} nodad"))?;
            ns.ip(&format!("link set {dev} up"))?;
        }
        client.ip("route add default via 10.70.1.1")?;
        client.ip("-6 route add default via fd70:1::1")?;
        far.ip("route add default via 10.70.2.1")?;
        far.ip("-6 route add default via fd70:2::1")?;
        far.ip(&format!("addr add {WEB_V4}/32 dev lo"))?;
        far.ip(&format!("-6 addr add {WEB_V6}/128 dev lo nodad"))?;
        router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        router.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        router.ip("route add 10.70.3.0/24 via 10.70.2.2")?;
        router.ip("-6 route add fd70:3::/64 via fd70:2::2")?;
        Ok(Routed {
            client,
            _router: router,
            far,
        })
    }

    /// The client's policy rules and every routing table, as text, for before/after.
    /// The client's policy rules and every routing table, as text, for before/after. IPv6
    /// link-local routes are left out: the kernel adds them when its address detection ends,
    /// whenever that is.
    fn routing(&self) -> Result<String> {
        let all = [
            self.client.ip("rule")?,
            self.client.ip("-6 rule")?,
            self.client.ip("route show table all")?,
            self.client.ip("-6 route show table all")?,
        ];
        Ok(all
            .iter()
            .flat_map(|table| table.lines())
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.contains("fe80:"))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    fn start_prism(
        &self,
        prism: &Path,
        upstream: &str,
        stats: &Path,
        log: &Path,
    ) -> Result<Process> {
        self.start_prism_with(prism, upstream, stats, log, &[])
    }

    /// As `start_prism`, with `extra` flags.
    fn start_prism_with(
        &self,
        prism: &Path,
        upstream: &str,
        stats: &Path,
        log: &Path,
        extra: &[String],
    ) -> Result<Process> {
        let mut command = self.client.command(prism);
        command.arg("run").args(extra);
        if upstream.starts_with("socks5://") {
            // Through a configuration file, as the README shows; the stats file stays a flag.
            let config = stats.with_extension("toml");
            std::fs::write(
                &config,
                format!(
                    "tun = \"{TUN}\"\naddress = [\"10.98.0.1/24\", \"fd98::1/64\"]\n\
                     default_route = true\nupstream = \"{upstream}\"\nmetrics = \"{METRICS}\"\n"
                ),
            )?;
            command.arg("--config").arg(config);
        } else {
            command
                .args([
                    "--tun",
                    TUN,
                    "--address",
                    "10.98.0.1/24",
                    "--address",
                    "fd98::1/64",
                ])
                .args(["--default-route", "--upstream", upstream]);
        }
        command.arg("--stats-file").arg(stats);
        let mut process = Process::spawn("prism", command, Some(log))?;
        let ready = wait_for("prism's default route", Duration::from_secs(20), || {
            self.client
                .ip("route show table 0x7072")
                .is_ok_and(|r| r.contains(TUN))
        });
        if let Err(error) = ready {
            return Err(error).context(process.log());
        }
        if let Some(status) = process.try_status() {
            anyhow::bail!("prism exited with {status}: {}", process.log());
        }
        Ok(process)
    }
}

/// `curl http://web.prism.test:8080/big` in the client namespace: the 64 MiB arrive intact.
fn curl_big(topo: &Routed, logs: &Path, name: &str) -> Result<()> {
    let out = logs.join(format!("routed-curl-{name}.bin"));
    let url = format!("http://{WEB_NAME}:{WEB_PORT}/big");
    let output = topo
        .client
        .command("curl")
        .args(["-sS", "--fail", "--max-time", "60", "-o"])
        .arg(&out)
        .arg(&url)
        .output()
        .context("cannot run curl")?;
    ensure!(
        output.status.success(),
        "curl {url} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let body = std::fs::read(&out)?;
    let _ = std::fs::remove_file(&out);
    ensure!(
        Sha256::digest(&body) == Sha256::digest(pattern(64, 64 << 20)),
        "the 64 MiB from {url} differ ({} bytes)",
        body.len()
    );
    Ok(())
}

/// Three echoes from the client namespace that must all fail (`why` says what would be wrong
/// if one worked).
fn every_echo_fails(topo: &Routed, target: SocketAddr, why: &str) -> Result<()> {
    for _ in 0..3 {
        ensure!(echo(&topo.client, target, 100).is_err(), "{why}");
    }
    Ok(())
}

/// The warning lines of `log` that contain `says`.
pub(crate) fn warnings<'a>(log: &'a str, says: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains("WARN") && l.contains(says))
        .collect()
}

/// Echoes `len` bytes from the client namespace to `target` and compares their SHA-256.
fn echo(client: &Netns, target: SocketAddr, len: usize) -> Result<()> {
    in_netns(client.name(), async move || {
        let message = pattern(len as u64, len);
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(target))
            .await
            .with_context(|| format!("connecting to {target} timed out"))??;
        let (mut read, mut write) = stream.into_split();
        let sent = message.clone();
        let writer = tokio::spawn(async move { write.write_all(&sent).await });
        let mut echoed = vec![0u8; len];
        tokio::time::timeout(Duration::from_secs(30), read.read_exact(&mut echoed))
            .await
            .context("the echo stalled")??;
        writer.await??;
        ensure!(
            Sha256::digest(&echoed) == Sha256::digest(&message),
            "the echo of {len} bytes from {target} differs"
        );
        Ok(())
    })
}

pub(crate) fn run(prism: &Path, logs: &Path, report: &mut Report) {
    let tools = crate::tools::ensure(&[
        ("danted", "dante-server"),
        ("dnsmasq", "dnsmasq-base"),
        ("getent", "libc-bin"),
        ("curl", "curl"),
        ("microsocks", "microsocks"),
    ]);
    let built = tools.and_then(|()| Routed::build()).and_then(|topo| {
        // dante: microsocks cuts a bulk echo short (see NOTES).
        let socks = crate::topology::dante(&topo.far, &[PROXY], PROXY_PORT, logs)?;
        let servers = Servers::start(&topo.far, vec![WEB_V4.parse()?, WEB_V6.parse()?])?;
        // A resolver on the far side, reached only through the proxy (or direct, routed): the
        // client's resolv.conf names it.
        let mut dns = topo.far.command("dnsmasq");
        dns.args([
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={WEB_V4}"),
            &format!("--address=/{WEB_NAME}/{WEB_V4}"),
            "--port=53",
            "--user=root",
        ]);
        let dns = Process::spawn("dnsmasq", dns, Some(&logs.join("routed-dnsmasq.log")))?;
        topo.client.set_resolver(WEB_V4)?;
        // A web server with a 64 MiB file, for curl by name.
        let site = logs.join("routed-site");
        std::fs::create_dir_all(&site)?;
        std::fs::write(site.join("big"), pattern(64, 64 << 20))?;
        let mut web = topo.far.command("python3");
        web.args([
            "-m",
            "http.server",
            "--bind",
            WEB_V4,
            &WEB_PORT.to_string(),
            "--directory",
        ])
        .arg(&site);
        let web = Process::spawn("http.server", web, Some(&logs.join("routed-http.log")))?;
        crate::topology::wait_listening(&topo.far, WEB_PORT, 1, "http.server")?;
        Ok((topo, socks, servers, (dns, web)))
    });
    let (topo, _socks, _servers, _dns) = match built {
        Ok(parts) => parts,
        Err(error) => {
            report.record("default route", "the routed topology is built", Err(error));
            return;
        }
    };
    let proxy = format!("socks5://{PROXY}:{PROXY_PORT}");
    for (name, upstream) in [("socks5", proxy.as_str()), ("direct", "direct")] {
        report.record(
            "default route",
            &format!("{name} via a router: both families, no loop, routing restored on exit"),
            whole_machine(&topo, prism, logs, upstream, name),
        );
    }
    report.record(
        "default route",
        "kill -9 leaves rules; the next start removes them and works",
        after_a_kill(&topo, prism, logs, &proxy),
    );
    report.record(
        "default route",
        "a proxy that is down is one warning line at the default level",
        proxy_down(&topo, prism, logs),
    );
    report.record(
        "default route",
        "a route that would loop (the proxy inside --route) is refused, with the fix, once",
        loop_refused(&topo, prism, logs),
    );
    report.record(
        "default route",
        "SOCKS5 credentials the proxy refuses are one warning line",
        wrong_password(&topo, prism, logs),
    );
    report.record(
        "default route",
        "with --relay too: ping and DNS cross the relay, TCP the proxy, routing restored; the server warns about an address outside its prefixes and serves metrics",
        with_relay(&topo, prism, logs, &proxy),
    );
}

/// `prism relay-server` on the far side; the client routes everything through Prism, TCP
/// through dante and the rest through the relay, whose socket carries the mark like the
/// proxy's.
fn with_relay(topo: &Routed, prism: &Path, logs: &Path, proxy: &str) -> Result<String> {
    let key = logs.join("routed-relay.key");
    std::fs::write(&key, "routed relay key, more than sixteen bytes\n")?;
    let mut server = topo.far.command(prism);
    server
        .args([
            "relay-server",
            "--listen",
            &format!("{PROXY}:5555"),
            "--tun",
            "prelay0",
        ])
        .args([
            "--address",
            "10.98.0.254/24",
            "--metrics",
            "127.0.0.1:9478",
            "--key-file",
        ])
        .arg(&key);
    let mut server = Process::spawn(
        "prism relay-server",
        server,
        Some(&logs.join("routed-relay-server.log")),
    )?;
    wait_for("the relay server's TUN", Duration::from_secs(10), || {
        topo.far.ip("link show prelay0").is_ok()
    })?;
    let before = topo.routing()?;
    let stats = logs.join("stats-routed-relay.json");
    let extra = [
        "--relay".to_owned(),
        format!("udp://{PROXY}:5555"),
        "--relay-key-file".to_owned(),
        key.display().to_string(),
    ];
    let mut client = topo.start_prism_with(
        prism,
        proxy,
        &stats,
        &logs.join("prism-routed-relay.log"),
        &extra,
    )?;
    let pinged = topo
        .client
        .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", WEB_V4]);
    let resolved = topo.client.exec(&["getent", "ahostsv4", WEB_NAME]);
    let echoed = echo(
        &topo.client,
        SocketAddr::new(WEB_V4.parse::<IpAddr>()?, ECHO),
        1 << 20,
    );
    let scraped = topo
        .far
        .exec(&["curl", "-sf", "http://127.0.0.1:9478/metrics"]);
    let stopped = client.stop(Signal::SIGTERM, Duration::from_secs(10))?;
    let _ = server.stop(Signal::SIGTERM, Duration::from_secs(10));
    let pinged = pinged.with_context(|| client.log())?;
    ensure!(
        pinged.contains("3 received"),
        "not every echo came back:\n{pinged}"
    );
    ensure!(
        resolved
            .with_context(|| format!("{WEB_NAME} did not resolve"))?
            .contains(WEB_V4),
        "{WEB_NAME} resolved to something else"
    );
    echoed.with_context(|| client.log())?;
    ensure!(stopped.success(), "prism exited with {stopped}");
    let scraped = scraped.context("the relay server's metrics did not answer")?;
    ensure!(
        scraped.contains("prism_relay_hellos_total")
            && scraped.contains("prism_relay_received_total"),
        "the relay server's metrics lack its counters:\n{scraped}"
    );
    // The client also claims fd98::1, which the server's one IPv4 prefix does not cover.
    let outside = server
        .log()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("outside this server's prefixes"))
        .count();
    ensure!(
        outside == 1 && server.log().contains("fd98::1"),
        "expected one warning about fd98::1 outside the server's prefixes:\n{}",
        server.log()
    );
    let counters = std::fs::read_to_string(&stats).context("prism wrote no stats file")?;
    ensure!(
        counter(&counters, "relay_sent")? >= 4,
        "nothing crossed the relay: {counters}"
    );
    ensure!(
        counter(&counters, "relay_dns_queries")? == 0,
        "with a relay, DNS should cross it: {counters}"
    );
    let after = topo.routing()?;
    ensure!(
        after == before,
        "routing differs:\nbefore:\n{before}\nafter:\n{after}"
    );
    Ok(String::new())
}

/// microsocks with a password on the far side; Prism gives the wrong one.
fn wrong_password(topo: &Routed, prism: &Path, logs: &Path) -> Result<String> {
    const AUTH_PORT: u16 = 1081;
    let mut socks = topo.far.command("microsocks");
    socks.args([
        "-i",
        PROXY,
        "-p",
        &AUTH_PORT.to_string(),
        "-u",
        "prism",
        "-P",
        "right",
    ]);
    let _socks = Process::spawn(
        "microsocks",
        socks,
        Some(&logs.join("routed-microsocks.log")),
    )?;
    crate::topology::wait_listening(&topo.far, AUTH_PORT, 1, "microsocks")?;
    let stats = logs.join("stats-routed-auth.json");
    let upstream = format!("socks5://prism:wrong@{PROXY}:{AUTH_PORT}");
    let mut refused = topo.start_prism(
        prism,
        &upstream,
        &stats,
        &logs.join("prism-routed-auth.log"),
    )?;
    let target = SocketAddr::new(WEB_V4.parse::<IpAddr>()?, ECHO);
    every_echo_fails(topo, target, "an echo worked with the wrong password")?;
    let stopped = refused.stop(Signal::SIGTERM, Duration::from_secs(10))?;
    ensure!(stopped.success(), "prism exited with {stopped}");
    let log = refused.log();
    let warnings = warnings(&log, &format!("SOCKS5 proxy {PROXY}:{AUTH_PORT}"));
    ensure!(
        warnings.len() == 1,
        "expected one warning naming the proxy, got:\n{log}"
    );
    ensure!(!log.contains("wrong"), "the password is in the log:\n{log}");
    ensure!(
        warnings[0].contains("user and password"),
        "the warning does not say what to check:\n{log}"
    );
    Ok(format!(
        " ({})",
        warnings[0].split("fail: ").nth(1).unwrap_or_default()
    ))
}

/// `--route 10.70.0.0/16` takes in the proxy's own address, without `--default-route`: each
/// connection to the proxy would re-enter the TUN. Prism refuses them instead of recursing.
fn loop_refused(topo: &Routed, prism: &Path, logs: &Path) -> Result<String> {
    let stats = logs.join("stats-routed-loop.json");
    let mut command = topo.client.command(prism);
    command
        .args(["run", "--tun", TUN, "--address", "10.98.0.1/24"])
        .args(["--route", "10.70.0.0/16", "--upstream"])
        .arg(format!("socks5://{PROXY}:{PROXY_PORT}"))
        .arg("--stats-file")
        .arg(&stats);
    let mut looping = Process::spawn("prism", command, Some(&logs.join("prism-routed-loop.log")))?;
    wait_for("prism's route", Duration::from_secs(20), || {
        topo.client
            .ip(&format!("route show dev {TUN}"))
            .is_ok_and(|r| r.contains("10.70.0.0/16"))
    })
    .with_context(|| looping.log())?;
    let target = SocketAddr::new(WEB_V4.parse::<IpAddr>()?, ECHO);
    every_echo_fails(topo, target, "an echo worked through a looping setup")?;
    let stopped = looping.stop(Signal::SIGTERM, Duration::from_secs(10))?;
    ensure!(stopped.success(), "prism exited with {stopped}");
    let log = looping.log();
    let warnings = warnings(&log, "routed back into Prism's own device");
    ensure!(
        warnings.len() == 1 && warnings[0].contains("--default-route"),
        "expected one warning with the fix, got:\n{log}"
    );
    let counters = std::fs::read_to_string(&stats).context("prism wrote no stats file")?;
    let opened = counter(&counters, "connections_opened")?;
    ensure!(
        opened <= 3,
        "{opened} connections for the client's 3 attempts: it recursed"
    );
    Ok(format!(" ({opened} connections, each refused)"))
}

/// Prometheus's view: the bytes counted so far and the open-connection gauge.
fn scrape(topo: &Routed) -> Result<()> {
    let text = topo
        .client
        .exec(&["curl", "-sf", &format!("http://{METRICS}/metrics")])
        .context("the metrics endpoint did not answer")?;
    let value = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    };
    ensure!(
        value("prism_bytes_from_clients_total").is_some_and(|b| b >= 5 << 20),
        "the bytes are not in the metrics:\n{text}"
    );
    ensure!(
        text.contains("# TYPE prism_open gauge") && value("prism_open").is_some(),
        "no open-connection gauge:\n{text}"
    );
    Ok(())
}

/// Prism runs here without RUST_LOG: what a user sees by default.
fn proxy_down(topo: &Routed, prism: &Path, logs: &Path) -> Result<String> {
    let stats = logs.join("stats-routed-down.json");
    let nobody = format!("socks5://{PROXY}:1099");
    let mut down = topo.start_prism(prism, &nobody, &stats, &logs.join("prism-routed-down.log"))?;
    let target = SocketAddr::new(WEB_V4.parse::<IpAddr>()?, ECHO);
    every_echo_fails(topo, target, "an echo worked through a proxy that is down")?;
    let stopped = down.stop(Signal::SIGTERM, Duration::from_secs(10))?;
    ensure!(stopped.success(), "prism exited with {stopped}");
    let log = down.log();
    let warnings = warnings(&log, "upstream connects fail");
    ensure!(
        warnings.len() == 1 && warnings[0].contains("cannot reach the proxy"),
        "expected one warning naming the proxy, got:\n{log}"
    );
    ensure!(
        !log.contains("\u{1b}["),
        "colour codes in a log file:\n{log}"
    );
    Ok(String::new())
}

fn whole_machine(
    topo: &Routed,
    prism: &Path,
    logs: &Path,
    upstream: &str,
    name: &str,
) -> Result<String> {
    let before = topo.routing()?;
    let stats = logs.join(format!("stats-routed-{name}.json"));
    let mut prism_run = topo.start_prism(
        prism,
        upstream,
        &stats,
        &logs.join(format!("prism-routed-{name}.log")),
    )?;
    // The name resolves by UDP DNS, which Prism carries over TCP through the upstream.
    let resolved = topo.client.exec(&["getent", "ahostsv4", WEB_NAME]);
    // curl by name: DNS, then 64 MiB through Prism, compared by SHA-256.
    let fetched = curl_big(topo, logs, name);
    let web4 = SocketAddr::new(WEB_V4.parse::<IpAddr>()?, ECHO);
    let web6 = SocketAddr::new(WEB_V6.parse::<IpAddr>()?, ECHO);
    let exchanged = echo(&topo.client, web4, 4 << 20)
        .and_then(|()| echo(&topo.client, web6, 1 << 20))
        .and_then(|()| (0..20).try_for_each(|_| echo(&topo.client, web4, 1000)));
    // The stats file is rewritten while Prism runs (every 5 s), not only at exit.
    let live = if name == "socks5" {
        wait_for(
            "the stats file while running",
            Duration::from_secs(8),
            || {
                std::fs::read_to_string(&stats)
                    .ok()
                    .and_then(|s| counter(&s, "bytes_from_clients").ok())
                    .is_some_and(|bytes| bytes >= 5 << 20)
            },
        )
    } else {
        Ok(())
    };
    // And a scraper sees the same while it runs.
    let scraped = if name == "socks5" {
        scrape(topo)
    } else {
        Ok(())
    };
    let stopped = prism_run.stop(Signal::SIGTERM, Duration::from_secs(10))?;
    exchanged.with_context(|| prism_run.log())?;
    fetched.with_context(|| prism_run.log())?;
    live?;
    scraped?;
    let resolved = resolved.with_context(|| format!("{WEB_NAME} did not resolve"))?;
    ensure!(
        resolved.contains(WEB_V4),
        "{WEB_NAME} resolved to something else: {resolved}"
    );
    ensure!(
        stopped.success(),
        "prism exited with {stopped}: {}",
        prism_run.log()
    );
    let counters = std::fs::read_to_string(&stats).context("prism wrote no stats file")?;
    let opened = counter(&counters, "connections_opened")?;
    ensure!(
        opened == 23,
        "{opened} connections for the client's 23 (curl and 22 echoes): a loop? {counters}"
    );
    ensure!(
        counter(&counters, "relay_dns_queries")? >= 1,
        "no DNS query was carried: {counters}"
    );
    let after = topo.routing()?;
    ensure!(
        after == before,
        "routing differs after prism stopped:\nbefore:\n{before}\nafter:\n{after}"
    );
    ensure!(
        prism_run.log().contains("default route through the TUN"),
        "no line at start says what is routed: {}",
        prism_run.log()
    );
    Ok(
        " (curl by name: 64 MiB intact; echoes of 4 MiB over IPv4, 1 MiB over IPv6, 20 short)"
            .to_owned(),
    )
}

fn after_a_kill(topo: &Routed, prism: &Path, logs: &Path, proxy: &str) -> Result<String> {
    let before = topo.routing()?;
    let stats = logs.join("stats-routed-killed.json");
    let mut killed =
        topo.start_prism(prism, proxy, &stats, &logs.join("prism-routed-killed.log"))?;
    killed.stop(Signal::SIGKILL, Duration::from_secs(10))?;
    ensure!(
        topo.client.ip("rule")?.contains("proto 112"),
        "a killed prism left no rules: the test shows nothing"
    );
    let mut again = topo.start_prism(prism, proxy, &stats, &logs.join("prism-routed-again.log"))?;
    let worked = echo(
        &topo.client,
        SocketAddr::new(WEB_V4.parse::<IpAddr>()?, ECHO),
        100_000,
    );
    let stopped = again.stop(Signal::SIGTERM, Duration::from_secs(10))?;
    worked.with_context(|| again.log())?;
    ensure!(stopped.success(), "prism exited with {stopped}");
    ensure!(
        again.log().contains("earlier run of prism left behind"),
        "the restart did not say it removed the stale rules: {}",
        again.log()
    );
    let after = topo.routing()?;
    ensure!(
        after == before,
        "routing differs:\nbefore:\n{before}\nafter:\n{after}"
    );
    Ok(String::new())
}
