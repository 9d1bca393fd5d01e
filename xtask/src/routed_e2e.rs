//! The whole machine through Prism, on a routed topology: the proxy and the servers are on
//! the far side of a router, not on the client's subnet. The addresses are the README's, so
//! its `prism run` commands and its configuration file run here word for word.
//!
//! ```text
//!  client ns                       router ns                        far ns
//!  prism run (the README's) ── c0 ──── r0 (forwards) r1 ──── f0  dante 192.168.1.10:1080
//!  192.168.0.2, fd70:1::2          192.168.0.1  192.168.1.1        servers 10.200.0.1, fd00:200::1
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
use crate::netns::{Netns, Process, veth, wait_for};
use crate::servers::{ECHO, Servers, pattern};

/// The README's proxy "behind your router".
const PROXY: &str = "192.168.1.10";
const PROXY_PORT: u16 = 1080;
/// Servers inside the README's `--route 10.200.0.0/16` and `--route fd00:200::/64`.
const WEB_V4: &str = "10.200.0.1";
const WEB_V6: &str = "fd00:200::1";
/// The README's `--tun`.
const TUN: &str = "prism0";
/// The far side's web server.
const WEB_PORT: u16 = 8080;
/// Where the socks5 runs serve their Prometheus metrics.
const METRICS: &str = "127.0.0.1:9477";
/// What the far side's dnsmasq answers with WEB_V4.
const WEB_NAME: &str = "web.prism.test";
/// What the far side's dnsmasq answers with PROXY.
const PROXY_NAME: &str = "proxy.prism.test";

/// The README's `prism run` recipes, word for word (after `sudo prism`).
struct Readme {
    /// Some prefixes through a proxy on the loopback (`--route`).
    routes: Vec<String>,
    /// The whole machine through a proxy behind the router (`--default-route`).
    default_route: Vec<String>,
    /// The configuration file.
    toml: String,
}

impl Readme {
    /// Reads the README; fails if it shows a `prism` command this suite does not run.
    fn read() -> Result<Readme> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut commands = Vec::new();
        let mut current = String::new();
        for line in text.lines().map(str::trim) {
            if current.is_empty() && !line.starts_with("sudo prism ") {
                continue;
            }
            current.push_str(line.trim_end_matches('\\'));
            current.push(' ');
            if !line.ends_with('\\') {
                commands.push(std::mem::take(&mut current));
            }
        }
        let words = |command: &String| -> Vec<String> {
            command
                .split_whitespace()
                .skip(2)
                .map(str::to_owned)
                .collect()
        };
        let (mut routes, mut default_route) = (None, None);
        for command in &commands {
            if command.contains("--default-route") && default_route.is_none() {
                default_route = Some(words(command));
            } else if command.contains("--route ") && routes.is_none() {
                routes = Some(words(command));
            } else {
                anyhow::bail!("the README shows a command this suite does not run: {command}");
            }
        }
        let toml = text
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .context("the README shows no configuration file")?;
        Ok(Readme {
            routes: routes.context("the README shows no `prism run --route` command")?,
            default_route: default_route
                .context("the README shows no `prism run --default-route` command")?,
            toml: toml.to_owned(),
        })
    }

    /// The `--default-route` command with `extra` flags after it (later flags win).
    fn default_route_and(&self, extra: &[&str]) -> Vec<String> {
        let extra = extra.iter().map(|s| (*s).to_owned());
        self.default_route.iter().cloned().chain(extra).collect()
    }
}

struct Routed {
    readme: Readme,
    client: Netns,
    _router: Netns,
    far: Netns,
}

impl Routed {
    fn build() -> Result<Routed> {
        let readme = Readme::read()?;
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
            (&client, &c0, "192.168.0.2/24", "fd70:1::2/64"),
            (&router, &r0, "192.168.0.1/24", "fd70:1::1/64"),
            (&router, &r1, "192.168.1.1/24", "fd70:2::1/64"),
            (&far, &f0, "192.168.1.10/24", "fd70:2::2/64"),
        ] {
            ns.ip(&format!("addr add {v4} dev {dev}"))?;
            ns.ip(&format!("-6 addr add {v6} dev {dev} nodad"))?;
            ns.ip(&format!("link set {dev} up"))?;
        }
        client.ip("route add default via 192.168.0.1")?;
        client.ip("-6 route add default via fd70:1::1")?;
        far.ip("route add default via 192.168.1.1")?;
        far.ip("-6 route add default via fd70:2::1")?;
        far.ip(&format!("addr add {WEB_V4}/32 dev lo"))?;
        far.ip(&format!("-6 addr add {WEB_V6}/128 dev lo nodad"))?;
        router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        router.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        router.ip(&format!("route add 10.200.0.0/16 via {PROXY}"))?;
        router.ip("-6 route add fd00:200::/64 via fd70:2::2")?;
        Ok(Routed {
            readme,
            client,
            _router: router,
            far,
        })
    }

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

    /// Fails unless the rules and routing tables are as `before` ([`Routed::routing`]) says.
    fn routing_is(&self, before: &str, when: &str) -> Result<()> {
        let now = self.routing()?;
        ensure!(
            now == before,
            "routing differs {when}:\nbefore:\n{before}\nnow:\n{now}"
        );
        Ok(())
    }

    /// Starts `prism` with `args` (a README recipe, and flags after it) and `--stats-file`, and
    /// waits for its routes: Prism's own table with `--default-route` or a configuration file,
    /// else the first `--route` through its TUN (`--tun`, the README's by default).
    fn start_prism(
        &self,
        prism: &Path,
        args: &[String],
        stats: &Path,
        log: &Path,
    ) -> Result<Process> {
        let mut command = self.client.command(prism);
        command.args(args).arg("--stats-file").arg(stats);
        let mut process = Process::spawn("prism", command, Some(log))?;
        let tun = args
            .iter()
            .skip_while(|a| *a != "--tun")
            .nth(1)
            .map_or(TUN, String::as_str);
        let route = args
            .iter()
            .skip_while(|a| *a != "--route")
            .nth(1)
            .filter(|_| {
                !args
                    .iter()
                    .any(|a| a == "--default-route" || a == "--config")
            });
        let ready = match route {
            Some(prefix) => wait_for("prism's route", Duration::from_secs(20), || {
                self.client
                    .ip(&format!("route show dev {tun}"))
                    .is_ok_and(|r| r.contains(prefix.as_str()))
            }),
            None => wait_for("prism's default route", Duration::from_secs(20), || {
                self.client
                    .ip("route show table 0x7072")
                    .is_ok_and(|r| r.contains(tun))
            }),
        };
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

/// Fails unless prism's stats file counts exactly `echoes` connections, each carried through
/// the proxy: one more would be a loop, one fewer a connection that never left.
fn through_the_proxy(stats: &Path, echoes: u64) -> Result<()> {
    let counters = std::fs::read_to_string(stats).context("prism wrote no stats file")?;
    ensure!(
        counter(&counters, "connections_opened")? == echoes
            && counter(&counters, "upstream_connected")? == echoes,
        "{echoes} echoes should be {echoes} connections through the proxy: {counters}"
    );
    Ok(())
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
        // The write half is kept until the echo is back: dropping it sends a FIN, and
        // microsocks ends both directions at the first one.
        let writer = tokio::spawn(async move { write.write_all(&sent).await.map(|()| write) });
        let mut echoed = vec![0u8; len];
        tokio::time::timeout(Duration::from_secs(30), read.read_exact(&mut echoed))
            .await
            .context("the echo stalled")??;
        drop(writer.await??);
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
        ("socat", "socat"),
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
            &format!("--address=/{PROXY_NAME}/{PROXY}"),
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
    report.record(
        "default route",
        "the README's --default-route command, word for word: curl by name through the proxy via a router, both families, no loop, live metrics, routing restored on exit",
        whole_machine(&topo, prism, logs, Recipe::Command),
    );
    report.record(
        "default route",
        "the README's configuration file with --upstream direct: the same, direct",
        whole_machine(&topo, prism, logs, Recipe::FileThenDirect),
    );
    report.record(
        "default route",
        "the README's --default-route command with --socks5-pipeline: the same through the proxy, pipelined",
        whole_machine(&topo, prism, logs, Recipe::Pipelined),
    );
    report.record(
        "default route",
        "the README's --route command, word for word, through a password-protected proxy on the loopback",
        readme_routes(&topo, prism, logs),
    );
    report.record(
        "default route",
        "kill -9 leaves rules; the next start removes them and works",
        after_a_kill(&topo, prism, logs),
    );
    report.record(
        "default route",
        "the proxy by name, its resolver inside the default route: resolved once at start, no loop",
        proxy_by_name(&topo, prism, logs),
    );
    report.record(
        "default route",
        "a second --default-route run is refused while the first serves; a --route run beside it leaves its rules",
        second_run(&topo, prism, logs),
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
        with_relay(&topo, prism, logs),
    );
}

/// `prism relay-server` on the far side; the client routes everything through Prism, TCP
/// through dante and the rest through the relay, whose socket carries the mark like the
/// proxy's.
fn with_relay(topo: &Routed, prism: &Path, logs: &Path) -> Result<String> {
    let key = logs.join("routed-relay.key");
    std::fs::write(&key, "routed relay key, more than sixteen bytes\n")?;
    let listen = format!("{PROXY}:5555");
    // The far side is a host, not a router: the relay server must say so, since packets for
    // anything beyond the host would go no further. (Its servers are its own addresses.)
    topo.far.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=0"])?;
    let mut server = crate::relay_e2e::start_relay_server(
        &topo.far,
        prism,
        &listen,
        &[
            "--metrics".as_ref(),
            "127.0.0.1:9478".as_ref(),
            "--key-file".as_ref(),
            key.as_os_str(),
        ],
        logs,
        "routed-relay-server.log",
    )?;
    let before = topo.routing()?;
    let stats = logs.join("stats-routed-relay.json");
    let relay = format!("udp://{PROXY}:5555");
    let key_file = key.display().to_string();
    let args = topo
        .readme
        .default_route_and(&["--relay", &relay, "--relay-key-file", &key_file]);
    let mut client =
        topo.start_prism(prism, &args, &stats, &logs.join("prism-routed-relay.log"))?;
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
    let stopped = client.stop_cleanly(Signal::SIGTERM);
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
    stopped?;
    let scraped = scraped.context("the relay server's metrics did not answer")?;
    ensure!(
        scraped.contains("prism_relay_hellos_total")
            && scraped.contains("prism_relay_received_total"),
        "the relay server's metrics lack its counters:\n{scraped}"
    );
    // The client also claims fd99::1, which the server's one IPv4 prefix does not cover.
    let outside = server
        .log()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("outside this server's prefixes"))
        .count();
    ensure!(
        outside == 1 && server.log().contains("fd99::1"),
        "expected one warning about fd99::1 outside the server's prefixes:\n{}",
        server.log()
    );
    // One prefix, IPv4: one warning, for IPv4 (relay_e2e checks a forwarding host hears none).
    let forwarding = warnings(&server.log(), crate::relay_e2e::NOT_FORWARDING)
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    ensure!(
        forwarding.len() == 1 && forwarding[0].contains("net.ipv4.ip_forward is 0"),
        "expected one warning that IPv4 forwarding is off:\n{}",
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
    topo.routing_is(&before, "after prism stopped")?;
    Ok(String::new())
}

/// The README's `--route` command as it stands: its proxy URL names the loopback and a user
/// and password. Here that is what `ssh -D` would be: socat on the client's loopback, carrying
/// each connection to microsocks (with that user and password) behind the router. Only the
/// two routed prefixes enter the TUN.
fn readme_routes(topo: &Routed, prism: &Path, logs: &Path) -> Result<String> {
    const FAR_PORT: u16 = 1082;
    let args = &topo.readme.routes;
    let url = args
        .iter()
        .skip_while(|a| *a != "--upstream")
        .nth(1)
        .context("the README's --route command has no --upstream")?;
    let (credentials, listen) = url
        .strip_prefix("socks5://")
        .and_then(|rest| rest.split_once('@'))
        .with_context(|| format!("{url} is not socks5://USER:PASS@HOST:PORT"))?;
    let (user, password) = credentials
        .split_once(':')
        .with_context(|| format!("{url} has no password"))?;
    let (host, port) = listen
        .rsplit_once(':')
        .with_context(|| format!("{url} has no port"))?;
    let mut socks = topo.far.command("microsocks");
    socks.args([
        "-i",
        PROXY,
        "-p",
        &FAR_PORT.to_string(),
        "-u",
        user,
        "-P",
        password,
    ]);
    let _socks = Process::spawn(
        "microsocks",
        socks,
        Some(&logs.join("routed-microsocks-readme.log")),
    )?;
    crate::topology::wait_listening(&topo.far, FAR_PORT, 1, "microsocks")?;
    let mut forward = topo.client.command("socat");
    forward.args([
        format!("TCP-LISTEN:{port},bind={host},reuseaddr,fork"),
        format!("TCP:{PROXY}:{FAR_PORT}"),
    ]);
    let _forward = Process::spawn("socat", forward, Some(&logs.join("routed-socat.log")))?;
    crate::topology::wait_listening(&topo.client, port.parse()?, 1, "socat")?;
    let before = topo.routing()?;
    let stats = logs.join("stats-routed-readme-routes.json");
    let mut routed = topo.start_prism(
        prism,
        args,
        &stats,
        &logs.join("prism-routed-readme-routes.log"),
    )?;
    let web4 = SocketAddr::new(WEB_V4.parse::<IpAddr>()?, ECHO);
    let web6 = SocketAddr::new(WEB_V6.parse::<IpAddr>()?, ECHO);
    let exchanged =
        echo(&topo.client, web4, 100_000).and_then(|()| echo(&topo.client, web6, 100_000));
    let stopped = routed.stop_cleanly(Signal::SIGTERM);
    exchanged.with_context(|| routed.log())?;
    stopped?;
    through_the_proxy(&stats, 2)?;
    topo.routing_is(&before, "after prism stopped")?;
    Ok(" (IPv4 and IPv6 echoes)".to_owned())
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
    let args = topo.readme.default_route_and(&["--upstream", &upstream]);
    let mut refused =
        topo.start_prism(prism, &args, &stats, &logs.join("prism-routed-auth.log"))?;
    let target = SocketAddr::new(WEB_V4.parse::<IpAddr>()?, ECHO);
    every_echo_fails(topo, target, "an echo worked with the wrong password")?;
    refused.stop_cleanly(Signal::SIGTERM)?;
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

/// The README's `--route` recipe with the proxy behind the router and its subnet routed too,
/// without `--default-route`: each connection to the proxy would re-enter the TUN. Prism
/// refuses them instead of recursing.
fn loop_refused(topo: &Routed, prism: &Path, logs: &Path) -> Result<String> {
    let stats = logs.join("stats-routed-loop.json");
    let proxy = format!("socks5://{PROXY}:{PROXY_PORT}");
    let args: Vec<String> = topo
        .readme
        .routes
        .iter()
        .map(String::as_str)
        .chain(["--route", "192.168.1.0/24", "--upstream", &proxy])
        .map(str::to_owned)
        .collect();
    let mut looping =
        topo.start_prism(prism, &args, &stats, &logs.join("prism-routed-loop.log"))?;
    let target = SocketAddr::new(WEB_V4.parse::<IpAddr>()?, ECHO);
    every_echo_fails(topo, target, "an echo worked through a looping setup")?;
    looping.stop_cleanly(Signal::SIGTERM)?;
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
    let loops = counter(&counters, "upstream_loops")?;
    ensure!(
        loops == opened && opened >= 1,
        "{loops} loops counted for {opened} connections: {counters}"
    );
    Ok(format!(" ({opened} connections, each refused and counted)"))
}

/// One scrape of `--metrics`: each sample's value by name.
fn metrics(topo: &Routed) -> Result<(String, impl Fn(&str) -> Option<u64>)> {
    let text = topo
        .client
        .exec(&["curl", "-sf", &format!("http://{METRICS}/metrics")])
        .context("the metrics endpoint did not answer")?;
    let lines = text.clone();
    let value = move |name: &str| -> Option<u64> {
        lines
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    };
    Ok((text, value))
}

/// Prometheus's view while Prism runs: with 5 connections held open, the open-connection gauge
/// comes to 5 (what ended before drains away); a 1 MiB echo then grows the bytes by as much.
fn scrape(topo: &Routed) -> Result<()> {
    const HELD: usize = 5;
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let client = topo.client.name().to_owned();
    let target = SocketAddr::new(WEB_V4.parse::<IpAddr>()?, ECHO);
    let holder = std::thread::spawn(move || {
        in_netns(&client, async move || {
            let mut streams = Vec::new();
            for _ in 0..HELD {
                let mut stream = TcpStream::connect(target).await?;
                stream.write_all(b"x").await?;
                stream.read_exact(&mut [0u8; 1]).await?;
                streams.push(stream);
            }
            let _ = held_tx.send(());
            // Blocks this test thread's runtime, which has nothing else to run.
            let _ = release_rx.recv_timeout(Duration::from_secs(60));
            drop(streams);
            Ok(())
        })
    });
    let checked = (|| -> Result<()> {
        held_rx
            .recv_timeout(Duration::from_secs(20))
            .context("the held connections did not open")?;
        let mut seen = None;
        let settled = wait_for("the open gauge to settle", Duration::from_secs(30), || {
            seen = metrics(topo)
                .ok()
                .and_then(|(_, value)| value("prism_open"));
            seen == Some(HELD as u64)
        });
        settled.with_context(|| format!("prism_open is {seen:?} with {HELD} connections held"))?;
        let (text, value) = metrics(topo)?;
        ensure!(
            text.contains("# TYPE prism_open gauge"),
            "prism_open is not a gauge:\n{text}"
        );
        // Each held connection has its relay task.
        ensure!(
            value("prism_tasks").is_some_and(|t| t >= HELD as u64)
                && text.contains("# TYPE prism_tasks gauge"),
            "prism_tasks is not a gauge of at least {HELD}:\n{text}"
        );
        let before = value("prism_bytes_from_clients_total")
            .with_context(|| format!("the bytes are not in the metrics:\n{text}"))?;
        echo(&topo.client, target, 1 << 20)?;
        let (text, value) = metrics(topo)?;
        ensure!(
            value("prism_bytes_from_clients_total").is_some_and(|b| b >= before + (1 << 20)),
            "the bytes did not grow by the 1 MiB echoed (from {before}):\n{text}"
        );
        Ok(())
    })();
    let _ = release_tx.send(());
    let held = holder
        .join()
        .map_err(|_| anyhow::anyhow!("the holding thread panicked"))?;
    checked.and(held)
}

/// Prism runs here without RUST_LOG: what a user sees by default.
fn proxy_down(topo: &Routed, prism: &Path, logs: &Path) -> Result<String> {
    let stats = logs.join("stats-routed-down.json");
    let nobody = format!("socks5://{PROXY}:1099");
    let args = topo.readme.default_route_and(&["--upstream", &nobody]);
    let mut down = topo.start_prism(prism, &args, &stats, &logs.join("prism-routed-down.log"))?;
    let target = SocketAddr::new(WEB_V4.parse::<IpAddr>()?, ECHO);
    every_echo_fails(topo, target, "an echo worked through a proxy that is down")?;
    down.stop_cleanly(Signal::SIGTERM)?;
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
    let counters = std::fs::read_to_string(&stats).context("prism wrote no stats file")?;
    let failed = counter(&counters, "upstream_proxy_failed")?;
    ensure!(
        failed >= 3 && failed == counter(&counters, "upstream_connects")?,
        "the proxy's failures are not counted: {counters}"
    );
    Ok(String::new())
}

/// How `whole_machine` starts Prism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recipe {
    /// The README's `--default-route` command, and `--metrics` after it.
    Command,
    /// The README's configuration file, and `--upstream direct` after it (flags override the
    /// file).
    FileThenDirect,
    /// The README's `--default-route` command, and `--socks5-pipeline` after it: the greeting,
    /// the request and the client's first bytes reach the proxy behind the router in one go.
    Pipelined,
}

fn whole_machine(topo: &Routed, prism: &Path, logs: &Path, recipe: Recipe) -> Result<String> {
    let before = topo.routing()?;
    let (name, args) = match recipe {
        Recipe::Command => (
            "socks5",
            topo.readme.default_route_and(&["--metrics", METRICS]),
        ),
        Recipe::FileThenDirect => {
            let file = logs.join("routed-prism.toml");
            std::fs::write(&file, &topo.readme.toml)?;
            let file = file.display().to_string();
            let args = ["run", "--config", &file, "--upstream", "direct"];
            ("direct", args.map(str::to_owned).to_vec())
        }
        Recipe::Pipelined => (
            "socks5-pipelined",
            topo.readme.default_route_and(&["--socks5-pipeline"]),
        ),
    };
    let stats = logs.join(format!("stats-routed-{name}.json"));
    let mut prism_run = topo.start_prism(
        prism,
        &args,
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
    let live = if recipe == Recipe::Command {
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
    let scraped = if recipe == Recipe::Command {
        scrape(topo)
    } else {
        Ok(())
    };
    let stopped = prism_run.stop_cleanly(Signal::SIGTERM);
    exchanged.with_context(|| prism_run.log())?;
    fetched.with_context(|| prism_run.log())?;
    live?;
    scraped?;
    let resolved = resolved.with_context(|| format!("{WEB_NAME} did not resolve"))?;
    ensure!(
        resolved.contains(WEB_V4),
        "{WEB_NAME} resolved to something else: {resolved}"
    );
    stopped?;
    let counters = std::fs::read_to_string(&stats).context("prism wrote no stats file")?;
    let opened = counter(&counters, "connections_opened")?;
    // curl and 22 echoes; the scrape holds 5 more and echoes once.
    let expected = if recipe == Recipe::Command { 29 } else { 23 };
    ensure!(
        opened == expected,
        "{opened} connections for the client's {expected}: a loop? {counters}"
    );
    ensure!(
        counter(&counters, "relay_dns_queries")? >= 1,
        "no DNS query was carried: {counters}"
    );
    topo.routing_is(&before, "after prism stopped")?;
    ensure!(
        prism_run.log().contains("default route through the TUN"),
        "no line at start says what is routed: {}",
        prism_run.log()
    );
    // The engine built its connector pipelined (the connector's single write is unit-tested).
    ensure!(
        prism_run.log().contains("SOCKS5 pipelined") == (recipe == Recipe::Pipelined),
        "the log disagrees with --socks5-pipeline ({recipe:?}): {}",
        prism_run.log()
    );
    Ok(
        " (curl by name: 64 MiB intact; echoes of 4 MiB over IPv4, 1 MiB over IPv6, 20 short)"
            .to_owned(),
    )
}

/// The client's resolver is on the far side and inside the default route: a lookup of the
/// proxy's name for every connection would enter the TUN and come back as a connection through
/// the proxy, whose name it asks.
fn proxy_by_name(topo: &Routed, prism: &Path, logs: &Path) -> Result<String> {
    let before = topo.routing()?;
    let stats = logs.join("stats-routed-name.json");
    let by_name = format!("socks5://{PROXY_NAME}:{PROXY_PORT}");
    let args = topo.readme.default_route_and(&["--upstream", &by_name]);
    let mut named = topo.start_prism(prism, &args, &stats, &logs.join("prism-routed-name.log"))?;
    let target = SocketAddr::new(WEB_V4.parse::<IpAddr>()?, ECHO);
    let echoed = echo(&topo.client, target, 100_000).and_then(|()| echo(&topo.client, target, 100));
    let stopped = named.stop_cleanly(Signal::SIGTERM);
    echoed.with_context(|| named.log())?;
    stopped?;
    through_the_proxy(&stats, 2)?;
    // Resolved at start, through the resolver the machine had then, to the proxy's address.
    let log = named.log();
    ensure!(
        log.lines()
            .any(|l| l.contains("SOCKS5 proxy") && l.contains(&format!("{PROXY}:{PROXY_PORT}"))),
        "no line at start says where {PROXY_NAME} resolved:\n{log}"
    );
    topo.routing_is(&before, "after prism stopped")?;
    Ok(String::new())
}

/// Two runs may not both own the machine's default route: the second would sweep the first's
/// rules as a crashed run's, and once either stopped the machine's traffic would leave outside
/// the VPN.
fn second_run(topo: &Routed, prism: &Path, logs: &Path) -> Result<String> {
    let before = topo.routing()?;
    let stats = logs.join("stats-routed-first.json");
    let args = topo.readme.default_route_and(&[]);
    let mut first = topo.start_prism(prism, &args, &stats, &logs.join("prism-routed-first.log"))?;
    let checked = (|| {
        let serving = topo.routing()?;
        let mut command = topo.client.command(prism);
        command.args([
            "run",
            "--tun",
            "prism1",
            "--address",
            "10.97.0.1/24",
            "--default-route",
            "--upstream",
            &format!("socks5://{PROXY}:{PROXY_PORT}"),
        ]);
        let log = logs.join("prism-routed-second.log");
        let mut second = Process::spawn("the second prism", command, Some(&log))?;
        // A second run that is not refused serves until stopped: bounded, not waited for.
        let exited = wait_for("the second run to exit", Duration::from_secs(10), || {
            second.try_status().is_some()
        });
        let status = second.try_status();
        let _ = second.stop(Signal::SIGTERM, Duration::from_secs(10));
        let said = second.log();
        exited.with_context(|| format!("a second --default-route run was not refused:\n{said}"))?;
        ensure!(
            status.is_some_and(|s| !s.success())
                && said.contains("another prism run")
                && said.contains(&format!("pid {}", first.pid())),
            "a second --default-route run was not refused: {status:?}\n{said}"
        );
        ensure!(
            said.trim().lines().count() == 1,
            "the refusal is not one line:\n{said}"
        );
        // A run that only routes prefixes may start beside it, and must not sweep its rules.
        let beside_stats = logs.join("stats-routed-beside.json");
        let beside_args: Vec<String> = [
            "run",
            "--tun",
            "prism1",
            "--address",
            "10.97.0.1/24",
            "--route",
            "10.201.0.0/16",
            "--upstream",
            "direct",
        ]
        .map(str::to_owned)
        .to_vec();
        let mut beside = topo.start_prism(
            prism,
            &beside_args,
            &beside_stats,
            &logs.join("prism-routed-beside.log"),
        )?;
        beside.stop_cleanly(Signal::SIGTERM)?;
        topo.routing_is(&serving, "while the first run served")?;
        echo(
            &topo.client,
            SocketAddr::new(WEB_V4.parse::<IpAddr>()?, ECHO),
            100_000,
        )
        .context("the first run no longer carries the machine's traffic")
    })();
    let stopped = first.stop_cleanly(Signal::SIGTERM);
    checked.with_context(|| first.log())?;
    stopped?;
    ensure!(
        !first.log().contains("cannot remove"),
        "the first run's rules were taken away: {}",
        first.log()
    );
    topo.routing_is(&before, "after prism stopped")?;
    Ok(String::new())
}

fn after_a_kill(topo: &Routed, prism: &Path, logs: &Path) -> Result<String> {
    let before = topo.routing()?;
    let args = topo.readme.default_route_and(&[]);
    let stats = logs.join("stats-routed-killed.json");
    let mut killed =
        topo.start_prism(prism, &args, &stats, &logs.join("prism-routed-killed.log"))?;
    killed.stop(Signal::SIGKILL, Duration::from_secs(10))?;
    ensure!(
        topo.client.ip("rule")?.contains("proto 112"),
        "a killed prism left no rules: the test shows nothing"
    );
    let mut again = topo.start_prism(prism, &args, &stats, &logs.join("prism-routed-again.log"))?;
    let worked = echo(
        &topo.client,
        SocketAddr::new(WEB_V4.parse::<IpAddr>()?, ECHO),
        100_000,
    );
    let stopped = again.stop_cleanly(Signal::SIGTERM);
    worked.with_context(|| again.log())?;
    stopped?;
    ensure!(
        again.log().contains("earlier run of prism left behind"),
        "the restart did not say it removed the stale rules: {}",
        again.log()
    );
    topo.routing_is(&before, "after prism stopped")?;
    Ok(String::new())
}
