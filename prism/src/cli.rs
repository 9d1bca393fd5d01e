//! Command-line flags. The `run` contract (flag names and meaning) is relied on by tests and
//! users: extend it, never change it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use prism_engine::{
    GatewayMac, Handshake, PortHandshake, RelayPeer, RelayUrl, Resolver, Settings, UpstreamUrl,
};

/// Prism: send a machine's TCP through a proxy or tunnel, terminated in userspace.
#[derive(Debug, Parser)]
// A flag given twice takes the last value: a configuration file's flags come first.
#[command(version, about, args_override_self = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

impl Cli {
    /// `prism run`'s busy-polling window (0 for every other command): the runtime is built
    /// for it.
    pub(crate) fn busy_poll_us(&self) -> u64 {
        match &self.command {
            Command::Run(args) => args.busy_poll_us,
            _ => 0,
        }
    }
}

#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at start; boxing would only complicate the argument code"
)]
pub(crate) enum Command {
    /// Create a TUN device and serve every TCP connection routed into it.
    Run(RunArgs),
    /// The far end of the relay: write clients' non-TCP packets to a TUN, send replies back.
    RelayServer(RelayServerArgs),
    /// Write a new private key (base64) for the relay to standard output.
    Genkey,
    /// Read a private key from standard input and write its public key.
    Pubkey,
}

/// Where the pre-shared relay key comes from: a flag, a file, or the environment.
#[derive(Debug, Args)]
pub(crate) struct KeyArgs {
    /// The pre-shared key (16 bytes or more; prefer the file or the environment variable,
    /// which other users cannot read from the process list).
    #[arg(
        long = "key",
        value_name = "KEY",
        env = "PRISM_RELAY_KEY",
        hide_env_values = true
    )]
    pub(crate) key: Option<String>,
    /// A file holding the pre-shared key (surrounding whitespace is ignored).
    #[arg(long = "key-file", value_name = "FILE", conflicts_with = "key")]
    pub(crate) key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct RelayServerArgs {
    /// UDP address to listen on, such as 0.0.0.0:5555 or [::]:5555.
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) listen: std::net::SocketAddr,
    /// Name of the TUN device to create.
    #[arg(long, value_name = "NAME")]
    pub(crate) tun: String,
    /// Address of the TUN device (repeatable); its prefix must cover the clients' addresses.
    #[arg(long = "address", value_name = "CIDR", required = true, value_parser = parse_cidr)]
    pub(crate) addresses: Vec<IpNet>,
    /// MTU of the TUN device.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(1280..))]
    pub(crate) mtu: u16,
    /// Packets the kernel may queue on the TUN for the server (Linux's default, 500, drops
    /// bursts).
    #[arg(long, default_value_t = prism_engine::DEFAULT_QUEUE, value_name = "PACKETS")]
    pub(crate) tun_queue: u32,
    #[command(flatten)]
    pub(crate) key: KeyArgs,
    /// A file holding the server's private key (`prism genkey`): clients then have their own
    /// keys, allowed with --peer, instead of a pre-shared key.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["key", "key_file"])]
    pub(crate) private_key_file: Option<PathBuf>,
    /// A client allowed to connect, as KEY,CIDR[,CIDR...]: its public key (`prism pubkey`) and
    /// the addresses it may use (repeatable).
    #[arg(long = "peer", value_name = "KEY,CIDR...", requires = "private_key_file", value_parser = parse::<RelayPeer>)]
    pub(crate) peers: Vec<RelayPeer>,
    /// Write the final counters as JSON to this file when stopping.
    #[arg(long, value_name = "FILE")]
    pub(crate) stats_file: Option<PathBuf>,
    /// Serve the counters in Prometheus's text format at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) metrics: Option<std::net::SocketAddr>,
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse()
        .map_err(|_| format!("bad CIDR {s:?}; expected ADDRESS/PREFIX such as 10.0.0.1/24"))
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Name of the TUN (or, with --tap, TAP) device to create.
    #[arg(long, value_name = "NAME")]
    pub(crate) tun: String,
    /// Read flags from a TOML file whose keys are these flags' long names (`default_route =
    /// true`, `address = ["10.0.0.1/24"]`); flags on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Create a TAP device (Ethernet) instead of a TUN: Prism is a gateway on that segment,
    /// answering ARP and neighbor solicitations; routes go via --gateway.
    #[arg(long, requires = "gateways")]
    pub(crate) tap: bool,
    /// With --tap: the virtual gateway's address, IPv4 and/or IPv6 (repeatable).
    #[arg(long = "gateway", value_name = "IP", requires = "tap")]
    pub(crate) gateways: Vec<std::net::IpAddr>,
    /// With --tap: the virtual gateway's MAC (default 02:50:52:49:53:4d).
    #[arg(long, value_name = "MAC", requires = "tap", value_parser = parse::<GatewayMac>)]
    pub(crate) gateway_mac: Option<GatewayMac>,
    /// With --tap: answer ARP and neighbor solicitations for every on-link address.
    #[arg(long, requires = "tap")]
    pub(crate) proxy_arp: bool,
    /// Address of the TUN device, IPv4 or IPv6 (repeatable).
    #[arg(long = "address", value_name = "CIDR", required = true, value_parser = parse_cidr)]
    pub(crate) addresses: Vec<IpNet>,
    /// Route this prefix through the TUN (repeatable). `0.0.0.0/0` and `::/0` are the default
    /// route of that family, as --default-route sets it up.
    #[arg(long = "route", value_name = "CIDR", value_parser = parse_cidr)]
    pub(crate) routes: Vec<IpNet>,
    /// Send all of the machine's traffic (IPv4 and IPv6) through the TUN, as wg-quick does:
    /// Prism's own sockets carry its firewall mark (--fwmark, 0x7072 unless set) and policy
    /// rules keep marked traffic out of the TUN. Everything is removed on exit, and what a
    /// killed run left is removed at the next start.
    #[arg(long)]
    pub(crate) default_route: bool,
    /// With a default route: send this prefix around the TUN, by the main table (repeatable).
    #[arg(long = "exclude", value_name = "CIDR", value_parser = parse_cidr)]
    pub(crate) excludes: Vec<IpNet>,
    /// Where connections go: `direct` or `socks5://[user:pass@]HOST:PORT`.
    #[arg(long, value_name = "UPSTREAM", value_parser = parse::<UpstreamUrl>)]
    pub(crate) upstream: UpstreamUrl,
    /// MTU of the TUN device.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(1280..))]
    pub(crate) mtu: u16,
    /// Send upstream sockets out of this interface (SO_BINDTODEVICE), so they bypass the TUN.
    #[arg(long, value_name = "IF")]
    pub(crate) bind_interface: Option<String>,
    /// Mark upstream sockets (SO_MARK), for a policy-routing rule that bypasses the TUN.
    #[arg(long, value_name = "N", value_parser = parse_u32)]
    pub(crate) fwmark: Option<u32>,
    /// With a socks5:// upstream: send the greeting, the credentials and the CONNECT request
    /// in one write, and for a fast handshake the client's first bytes right after them, so a
    /// new connection waits one round trip to the proxy instead of three. The proxy must keep
    /// the bytes that follow the request (dante does).
    #[arg(long)]
    pub(crate) socks5_pipeline: bool,
    /// How SYNs are answered: `fast` (SYN-ACK at once) or `consistent` (SYN-ACK only once the
    /// upstream connected; RST or ICMP unreachable when it failed).
    #[arg(long, default_value_t = Handshake::Fast, value_name = "MODE")]
    pub(crate) handshake: Handshake,
    /// A destination port with its own handshake, as PORT=fast or PORT=consistent
    /// (repeatable), for example `--handshake-port 22=consistent`.
    #[arg(long = "handshake-port", value_name = "PORT=MODE", value_parser = parse::<PortHandshake>)]
    pub(crate) handshake_ports: Vec<PortHandshake>,
    /// Seconds an upstream connect (including the SOCKS5 exchange; pipelined with the fast
    /// handshake, its replies) may take.
    #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=300))]
    pub(crate) connect_timeout: u64,
    /// Most consistent handshakes waiting for their upstream; SYNs beyond it are answered
    /// with SYN cookies and the fast handshake.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub(crate) max_pending: usize,
    /// Most connections whose handshake has not completed; SYNs beyond it are answered with
    /// SYN cookies, so a SYN flood does not lock real clients out.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub(crate) max_half_open: usize,
    /// Receive and send buffer of each TCP connection, in KiB, once grown: both start at 1 KiB
    /// and grow to this the first time a burst does not fit.
    #[arg(long, default_value_t = 256, value_name = "KIB", value_parser = clap::value_parser!(u32).range(4..=65536))]
    pub(crate) tcp_buffer_kib: u32,
    /// Busy polling: for this many microseconds after each burst of traffic, one thread keeps
    /// polling for I/O instead of sleeping, so a request/response exchange does not wait for
    /// the kernel to wake Prism (50 covers a local round trip). It takes that thread's core
    /// while traffic flows; idle, Prism sleeps. 0 (the default): never.
    #[arg(long, default_value_t = 0, value_name = "MICROS", value_parser = clap::value_parser!(u64).range(0..=prism_engine::MAX_BUSY_POLL_US))]
    pub(crate) busy_poll_us: u64,
    /// Packets the kernel may queue on the TUN for Prism (Linux's default, 500, overflows when
    /// hundreds of connections open at once).
    #[arg(long, default_value_t = prism_engine::DEFAULT_QUEUE, value_name = "PACKETS")]
    pub(crate) tun_queue: u32,
    /// Do not ask the TUN for offload. With offload (the default on a TUN; never on a TAP) the
    /// kernel and Prism exchange TCP segments of up to 64 KB and leave checksums partial.
    #[arg(long)]
    pub(crate) no_offload: bool,
    /// Write the counters, the connection counts and the open connections as JSON to this
    /// file every 5 s while running, and once more when stopping.
    #[arg(long, value_name = "FILE")]
    pub(crate) stats_file: Option<PathBuf>,
    /// Serve the counters and gauges (open, pending and half-open connections, bytes each
    /// way, relay packets, drops by reason) in Prometheus's text format at
    /// http://ADDR/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) metrics: Option<std::net::SocketAddr>,
    /// Send every non-TCP packet through the relay server at udp://HOST:PORT. Without it,
    /// non-TCP packets are answered with ICMP administratively prohibited.
    #[arg(long, value_name = "URL", value_parser = parse::<RelayUrl>)]
    pub(crate) relay: Option<RelayUrl>,
    /// The relay's pre-shared key (or --relay-key-file, or PRISM_RELAY_KEY).
    #[arg(
        long,
        value_name = "KEY",
        env = "PRISM_RELAY_KEY",
        hide_env_values = true,
        requires = "relay"
    )]
    pub(crate) relay_key: Option<String>,
    /// The path MTU towards the relay server; packets that would not fit once wrapped are
    /// answered with ICMP fragmentation needed / packet too big.
    #[arg(long, default_value_t = 1500, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(1280..))]
    pub(crate) relay_path_mtu: u16,
    /// Carry DNS queries over TCP through the upstream to this resolver (IP, or IP:PORT),
    /// instead of the one each client asked. Without --relay, DNS is carried over TCP to the
    /// resolver each client asked anyway; with it, DNS crosses the relay unless this is given.
    #[arg(long, value_name = "ADDR", value_parser = parse::<Resolver>)]
    pub(crate) dns: Option<Resolver>,
    /// A file holding the relay's pre-shared key.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "relay_key",
        requires = "relay"
    )]
    pub(crate) relay_key_file: Option<PathBuf>,
    /// A file holding this client's private key for the relay (`prism genkey`), instead of a
    /// pre-shared key; the server allows its public key with --peer.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["relay_key", "relay_key_file"],
        requires_all = ["relay", "relay_server_key"]
    )]
    pub(crate) relay_private_key_file: Option<PathBuf>,
    /// The relay server's public key, with --relay-private-key-file.
    #[arg(long, value_name = "KEY", requires = "relay_private_key_file")]
    pub(crate) relay_server_key: Option<String>,
}

/// A flag's value through its type's own parser, which says what was expected.
fn parse<T: std::str::FromStr>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e: T::Err| e.to_string())
}

impl RunArgs {
    /// The engine's settings these flags make (the device, routes and stats file stay the
    /// binary's).
    pub(crate) fn settings(&self) -> Settings {
        let mut settings = Settings::new(self.upstream.clone());
        settings.address = self.addresses.clone();
        settings.mtu = self.mtu;
        settings.bind_interface = self.bind_interface.clone();
        settings.fwmark = self.fwmark;
        settings.handshake = self.handshake;
        settings.socks5_pipeline = self.socks5_pipeline;
        settings.handshake_port = self.handshake_ports.clone();
        settings.connect_timeout = self.connect_timeout;
        settings.max_pending = self.max_pending;
        settings.max_half_open = self.max_half_open;
        settings.tcp_buffer_kib = self.tcp_buffer_kib;
        settings.busy_poll_us = self.busy_poll_us;
        settings.relay = self.relay.clone();
        settings.relay_key = self.relay_key.clone();
        settings.relay_key_file = self.relay_key_file.clone();
        settings.relay_private_key_file = self.relay_private_key_file.clone();
        settings.relay_server_key = self.relay_server_key.clone();
        settings.relay_path_mtu = self.relay_path_mtu;
        settings.tap = self.tap;
        settings.gateway = self.gateways.clone();
        settings.gateway_mac = self.gateway_mac;
        settings.proxy_arp = self.proxy_arp;
        settings.dns = self.dns;
        settings
    }
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("bad number {s:?}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn run_args(cli: Cli) -> RunArgs {
        match cli.command {
            Command::Run(args) => args,
            other => panic!("not `run`: {other:?}"),
        }
    }

    #[test]
    fn relay_flags_parse() {
        let base = [
            "run",
            "--tun",
            "t",
            "--address",
            "10.0.0.1/24",
            "--upstream",
            "direct",
        ];
        let with = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            parse(&args)
        };
        let args =
            run_args(with(&["--relay", "udp://[fd00::1]:5555", "--relay-key-file", "/k"]).unwrap());
        assert_eq!(
            args.relay,
            Some(RelayUrl {
                host: "fd00::1".to_owned(),
                port: 5555
            })
        );
        for bad in ["tcp://h:1", "udp://h", "udp://:5", "udp://h:x"] {
            let error = with(&["--relay", bad]).unwrap_err().to_string();
            assert!(error.contains("expected udp://HOST:PORT"), "{bad}: {error}");
        }
        assert!(
            with(&["--relay-key-file", "/k"]).is_err(),
            "a key without a relay"
        );

        let server = parse(&[
            "relay-server",
            "--listen",
            "0.0.0.0:5555",
            "--tun",
            "r0",
            "--address",
            "10.98.0.1/24",
            "--key-file",
            "/k",
        ])
        .unwrap();
        assert!(matches!(server.command, Command::RelayServer(_)));

        let key = prism_engine::PrivateKey::generate().unwrap().public_key();
        let identities = [
            "relay-server",
            "--listen",
            "0.0.0.0:5555",
            "--tun",
            "r0",
            "--address",
            "10.98.0.1/24",
            "--private-key-file",
            "/k",
        ];
        let peer = format!("{key},10.98.0.2/32,fd98::2/128");
        let server = parse(&[&identities[..], &["--peer", &peer]].concat()).unwrap();
        let Command::RelayServer(args) = server.command else {
            panic!("not relay-server");
        };
        assert_eq!(args.peers.len(), 1);
        assert_eq!(args.peers[0].allowed.len(), 2);
        let error = parse(&[&identities[..], &["--peer", "nokey,10.98.0.2/32"]].concat());
        assert!(error.unwrap_err().to_string().contains("not a key"));
        assert!(
            parse(&[&identities[..], &["--key-file", "/k"]].concat()).is_err(),
            "a pre-shared key and identities"
        );
        let key = key.to_string();
        let client = [
            "--relay",
            "udp://h:5",
            "--relay-private-key-file",
            "/c",
            "--relay-server-key",
            &key,
        ];
        let args = run_args(with(&client).unwrap());
        assert_eq!(args.relay_server_key.as_deref(), Some(&key[..]));
        assert!(with(&client[..4]).is_err(), "no server key");
        assert!(
            with(&[&client[..], &["--relay-key-file", "/k"]].concat()).is_err(),
            "both kinds of key"
        );
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("prism").chain(args.iter().copied()))
    }

    #[test]
    fn the_run_contract_parses() {
        let cli = parse(&[
            "run",
            "--tun",
            "prism0",
            "--address",
            "10.0.0.1/24",
            "--address",
            "fd00::1/64",
            "--route",
            "10.200.0.0/16",
            "--upstream",
            "socks5://u:p@127.0.0.1:1080",
            "--mtu",
            "9000",
            "--bind-interface",
            "eth0",
            "--fwmark",
            "0x99",
        ])
        .unwrap();
        let args = run_args(cli);
        assert_eq!(args.addresses.len(), 2);
        assert_eq!(args.handshake, Handshake::Fast);
        assert_eq!(args.fwmark, Some(0x99));
        assert!(matches!(args.upstream, UpstreamUrl::Socks5(_)));
    }

    #[test]
    fn tap_flags_parse_and_depend_on_each_other() {
        let base = [
            "run",
            "--tun",
            "tap0",
            "--address",
            "10.0.0.1/24",
            "--upstream",
            "direct",
        ];
        let with = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            parse(&args)
        };
        let cli = with(&[
            "--tap",
            "--gateway",
            "10.0.0.2",
            "--gateway",
            "fd00::2",
            "--gateway-mac",
            "02:00:00:aa:bb:cc",
            "--proxy-arp",
        ])
        .unwrap();
        let args = run_args(cli);
        assert!(args.tap && args.proxy_arp);
        assert_eq!(args.gateways.len(), 2);
        assert_eq!(
            args.gateway_mac,
            Some(GatewayMac([2, 0, 0, 0xaa, 0xbb, 0xcc]))
        );
        assert!(with(&["--tap"]).is_err(), "--tap needs a --gateway");
        assert!(
            with(&["--gateway", "10.0.0.2"]).is_err(),
            "--gateway needs --tap"
        );
        let error = with(&[
            "--tap",
            "--gateway",
            "10.0.0.2",
            "--gateway-mac",
            "01:00:00:00:00:01",
        ])
        .unwrap_err()
        .to_string();
        assert!(error.contains("unicast"), "{error}");
    }

    #[test]
    fn handshake_flags_parse() {
        let cli = parse(&[
            "run",
            "--tun",
            "t",
            "--address",
            "10.0.0.1/24",
            "--upstream",
            "direct",
            "--handshake",
            "consistent",
            "--handshake-port",
            "80=fast",
            "--handshake-port",
            "22=consistent",
        ])
        .unwrap();
        let args = run_args(cli);
        assert_eq!(args.handshake, Handshake::Consistent);
        let ports: Vec<(u16, Handshake)> = args
            .handshake_ports
            .iter()
            .map(|p| (p.port, p.handshake))
            .collect();
        assert_eq!(ports, [(80, Handshake::Fast), (22, Handshake::Consistent)]);
        for bad in ["slow", "80", "80=slow", "x=fast"] {
            let flag = if bad.contains('=') || bad == "80" {
                "--handshake-port"
            } else {
                "--handshake"
            };
            let error = parse(&[
                "run",
                "--tun",
                "t",
                "--address",
                "10.0.0.1/24",
                "--upstream",
                "direct",
                flag,
                bad,
            ])
            .unwrap_err()
            .to_string();
            assert!(
                error.contains("expected") || error.contains("unknown handshake"),
                "{bad}: {error}"
            );
        }
    }

    /// Every `prism` command the README shows parses (so a recipe cannot rot unnoticed), and
    /// so does its configuration file.
    #[test]
    fn the_readmes_commands_parse() {
        let readme = include_str!("../../README.md");
        let mut commands = Vec::new();
        let mut current = String::new();
        for line in readme.lines() {
            let line = line.trim();
            if current.is_empty() && !line.starts_with("sudo prism ") {
                continue;
            }
            current.push_str(line.trim_end_matches('\\'));
            current.push(' ');
            if !line.ends_with('\\') {
                commands.push(std::mem::take(&mut current));
            }
        }
        assert!(commands.len() >= 2, "{commands:?}");
        for command in &commands {
            let words: Vec<&str> = command.split_whitespace().skip(2).collect();
            parse(&words).unwrap_or_else(|e| panic!("README: {command}\n{e}"));
        }
        let toml = readme
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .unwrap();
        let mut words = vec!["run".to_owned()];
        words.extend(crate::config::flags(toml).unwrap());
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        parse(&words).unwrap();
    }

    #[test]
    fn wrong_flags_are_refused_with_a_reason() {
        let base = ["run", "--tun", "t", "--upstream", "direct"];
        let cases: [(&[&str], &str); 4] = [
            (&["--address", "10.0.0.1"], "bad CIDR"),
            (&["--address", "10.0.0.1/24", "--mtu", "100"], "1280"),
            (&["--address", "10.0.0.1/24", "--route", "nope"], "bad CIDR"),
            (&[], "--address"),
        ];
        for (extra, says) in cases {
            let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
            let error = parse(&args).unwrap_err().to_string();
            assert!(error.contains(says), "{extra:?}: {error}");
        }
        let error = parse(&[
            "run",
            "--tun",
            "t",
            "--address",
            "10.0.0.1/24",
            "--upstream",
            "http://x:1",
        ])
        .unwrap_err()
        .to_string();
        assert!(error.contains("expected direct or socks5://"), "{error}");
    }
}
