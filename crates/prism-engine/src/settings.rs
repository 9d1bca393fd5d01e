//! [`Settings`]: the engine's configuration by name, with the keys of `prism run`'s flags (a
//! flag `--relay-path-mtu` is the key `relay_path_mtu`; a repeatable flag is an array). The
//! `prism` binary fills it from its flags; the C ABI parses it from JSON. One mapping onto the
//! [`Builder`] serves both.
//!
//! The value types here ([`UpstreamUrl`], [`RelayUrl`], [`PortHandshake`], [`GatewayMac`])
//! parse the flags' text, with the error messages the command line shows.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use prism_relay::{BadKey, ClientAuth, Keys, PrivateKey, Rotation};
use prism_stack::{Config, Handshake, HandshakePolicy, PortPolicy};
use prism_tunnel::Socks5Url;
use serde::Deserialize;
use serde_with::{DisplayFromStr, serde_as};

use crate::{Builder, Outside, Source};

/// Where accepted connections go: `direct` or `socks5://[user:pass@]HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamUrl {
    /// An OS socket to the original destination.
    Direct,
    /// Through a SOCKS5 proxy.
    Socks5(Socks5Url),
}

/// Text that names no upstream, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadValue(String);

impl FromStr for UpstreamUrl {
    type Err = BadValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "direct" {
            return Ok(UpstreamUrl::Direct);
        }
        if s.starts_with("socks5://") {
            return s
                .parse()
                .map(UpstreamUrl::Socks5)
                .map_err(|e: prism_tunnel::Socks5UrlError| BadValue(e.to_string()));
        }
        Err(BadValue(format!(
            "unknown upstream {s:?}; expected direct or socks5://[user:pass@]HOST:PORT"
        )))
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamUrl::Direct => f.write_str("direct"),
            UpstreamUrl::Socks5(url) => write!(f, "socks5 {}", url.proxy()),
        }
    }
}

/// The relay server, as `udp://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayUrl {
    /// Host name or address (without brackets).
    pub host: String,
    /// UDP port.
    pub port: u16,
}

impl FromStr for RelayUrl {
    type Err = BadValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadValue(format!("bad relay {s:?}; expected udp://HOST:PORT"));
        let rest = s.strip_prefix("udp://").ok_or_else(bad)?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port.parse().map_err(|_| bad())?;
        if host.is_empty() {
            return Err(bad());
        }
        Ok(RelayUrl {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "udp://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "udp://{}:{}", self.host, self.port)
        }
    }
}

/// A destination port with its own handshake, as `PORT=fast` or `PORT=consistent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortHandshake {
    /// The destination port.
    pub port: u16,
    /// Its handshake.
    pub handshake: Handshake,
}

impl FromStr for PortHandshake {
    type Err = BadValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            BadValue(format!(
                "bad handshake port {s:?}; expected PORT=fast or PORT=consistent"
            ))
        };
        let (port, mode) = s.split_once('=').ok_or_else(bad)?;
        Ok(PortHandshake {
            port: port.parse().map_err(|_| bad())?,
            handshake: mode.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for PortHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.port, self.handshake)
    }
}

/// The TAP gateway's MAC: six hex bytes, unicast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayMac(pub [u8; 6]);

impl FromStr for GatewayMac {
    type Err = BadValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            BadValue(format!(
                "bad MAC {s:?}; expected six hex bytes such as 02:50:52:49:53:4d"
            ))
        };
        let bytes: Vec<u8> = s
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        let mac: [u8; 6] = bytes.try_into().map_err(|_| bad())?;
        if mac[0] & 1 != 0 {
            return Err(BadValue(format!(
                "bad MAC {s:?}: a gateway MAC must be unicast"
            )));
        }
        Ok(GatewayMac(mac))
    }
}

impl fmt::Display for GatewayMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A DNS resolver for DNS over TCP, as `IP` (port 53) or `IP:PORT` (`[IPv6]:PORT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolver(pub SocketAddr);

impl FromStr for Resolver {
    type Err = BadValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Resolver(SocketAddr::new(ip, 53)));
        }
        s.parse().map(Resolver).map_err(|_| {
            BadValue(format!(
                "bad DNS resolver {s:?}; expected an address, with a port if not 53 \
                 (1.1.1.1, 10.0.0.53:5353, [2606:4700::1111]:53)"
            ))
        })
    }
}

impl fmt::Display for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why settings could not become a running configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The JSON text is not valid settings (a key unknown, a value of the wrong kind or
    /// unparsable).
    #[error("bad configuration: {0}")]
    Json(#[from] serde_json::Error),
    /// A value is out of range or contradicts another.
    #[error("bad configuration: {0}")]
    Invalid(String),
    /// The relay's key could not be read or is too short.
    #[error("{0}")]
    RelayKey(String),
    /// The relay server's name did not resolve.
    #[error("cannot resolve the relay {relay}: {reason}")]
    RelayUnresolved {
        /// The relay as given.
        relay: String,
        /// Why.
        reason: String,
    },
}

fn default_mtu() -> u16 {
    1500
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_max_pending() -> usize {
    1024
}
fn default_max_half_open() -> usize {
    4096
}
fn default_tcp_buffer_kib() -> u32 {
    256
}

/// The longest busy-polling window (`busy_poll_us`): a second. Beyond it, polling is a
/// spinning core.
pub const MAX_BUSY_POLL_US: u64 = 1_000_000;

/// A tokio runtime builder for an engine with these settings: multi-threaded, and with one
/// worker when busy polling is on, since a polling worker of a runtime with more keeps waking
/// the others (see `Config::busy_poll`).
pub fn runtime_builder(busy_poll_us: u64) -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if busy_poll_us > 0 {
        builder.worker_threads(1);
    }
    builder
}

/// The engine's settings by name. See the `prism run --help` flag of the same name for each.
#[serde_as]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Settings {
    /// The device's addresses (the client side), as CIDR.
    #[serde_as(as = "Vec<DisplayFromStr>")]
    pub address: Vec<IpNet>,
    /// Where connections go.
    #[serde_as(as = "DisplayFromStr")]
    pub upstream: UpstreamUrl,
    /// With a SOCKS5 upstream: pipeline its exchange (see `Socks5::pipelined`).
    #[serde(default)]
    pub socks5_pipeline: bool,
    /// The device's IP MTU.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// SO_BINDTODEVICE for every socket the engine opens.
    #[serde(default)]
    pub bind_interface: Option<String>,
    /// SO_MARK for every socket the engine opens.
    #[serde(default)]
    pub fwmark: Option<u32>,
    /// How SYNs are answered.
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default)]
    pub handshake: Handshake,
    /// Ports with their own handshake.
    #[serde_as(as = "Vec<DisplayFromStr>")]
    #[serde(default)]
    pub handshake_port: Vec<PortHandshake>,
    /// Seconds an upstream connect may take.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: u64,
    /// Most consistent handshakes waiting for their upstream.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// Most connections whose handshake has not completed.
    #[serde(default = "default_max_half_open")]
    pub max_half_open: usize,
    /// Each connection's buffers once grown, in KiB.
    #[serde(default = "default_tcp_buffer_kib")]
    pub tcp_buffer_kib: u32,
    /// Microseconds one runtime worker keeps polling for I/O after each round of the stack
    /// instead of sleeping (0, the default: never). Lower request/response latency for a core
    /// while traffic flows; an idle engine does not poll.
    #[serde(default)]
    pub busy_poll_us: u64,
    /// The relay server for every non-TCP packet.
    #[serde_as(as = "Option<DisplayFromStr>")]
    #[serde(default)]
    pub relay: Option<RelayUrl>,
    /// The relay's pre-shared key.
    #[serde(default)]
    pub relay_key: Option<String>,
    /// A file holding the relay's pre-shared key.
    #[serde(default)]
    pub relay_key_file: Option<PathBuf>,
    /// A file holding this client's private key for the relay (an identity, instead of a
    /// pre-shared key).
    #[serde(default)]
    pub relay_private_key_file: Option<PathBuf>,
    /// The relay server's public key, with `relay_private_key_file`.
    #[serde(default)]
    pub relay_server_key: Option<String>,
    /// The path MTU towards the relay server.
    #[serde(default = "default_mtu")]
    pub relay_path_mtu: u16,
    /// The device carries Ethernet frames (a TAP): Prism is a gateway on it.
    #[serde(default)]
    pub tap: bool,
    /// On a TAP: the gateway's addresses.
    #[serde(default)]
    pub gateway: Vec<IpAddr>,
    /// On a TAP: the gateway's MAC.
    #[serde_as(as = "Option<DisplayFromStr>")]
    #[serde(default)]
    pub gateway_mac: Option<GatewayMac>,
    /// On a TAP: answer ARP and neighbor solicitations for every on-link address.
    #[serde(default)]
    pub proxy_arp: bool,
    /// The resolver DNS queries are carried to over TCP, instead of the one each client asked
    /// (without a relay), or instead of crossing the relay.
    #[serde_as(as = "Option<DisplayFromStr>")]
    #[serde(default)]
    pub dns: Option<Resolver>,
    /// On a descriptor handed over: it was opened with `IFF_VNET_HDR` and offload, so its
    /// reads and writes carry virtio-net headers.
    #[serde(default)]
    pub vnet_hdr: bool,
}

impl Settings {
    /// Settings with the defaults of `prism run`, for `upstream`.
    pub fn new(upstream: UpstreamUrl) -> Settings {
        Settings {
            address: Vec::new(),
            upstream,
            socks5_pipeline: false,
            mtu: default_mtu(),
            bind_interface: None,
            fwmark: None,
            handshake: Handshake::default(),
            handshake_port: Vec::new(),
            connect_timeout: default_connect_timeout(),
            max_pending: default_max_pending(),
            max_half_open: default_max_half_open(),
            tcp_buffer_kib: default_tcp_buffer_kib(),
            busy_poll_us: 0,
            relay: None,
            relay_key: None,
            relay_key_file: None,
            relay_private_key_file: None,
            relay_server_key: None,
            relay_path_mtu: default_mtu(),
            tap: false,
            gateway: Vec::new(),
            gateway_mac: None,
            proxy_arp: false,
            dns: None,
            vnet_hdr: false,
        }
    }

    /// Parses settings from a JSON object, and checks them.
    pub fn from_json(text: &str) -> Result<Settings, SettingsError> {
        let settings: Settings = serde_json::from_str(text)?;
        settings.check()?;
        Ok(settings)
    }

    /// The ranges and dependencies `prism run` enforces on its flags.
    pub fn check(&self) -> Result<(), SettingsError> {
        let invalid = |what: String| Err(SettingsError::Invalid(what));
        if self.address.is_empty() {
            return invalid("at least one address is needed (address)".to_owned());
        }
        if self.mtu < 1280 || self.relay_path_mtu < 1280 {
            return invalid("mtu and relay_path_mtu must be at least 1280".to_owned());
        }
        if !(1..=300).contains(&self.connect_timeout) {
            return invalid("connect_timeout must be 1 to 300 seconds".to_owned());
        }
        if !(4..=65536).contains(&self.tcp_buffer_kib) {
            return invalid("tcp_buffer_kib must be 4 to 65536".to_owned());
        }
        if self.socks5_pipeline && !matches!(self.upstream, UpstreamUrl::Socks5(_)) {
            return invalid(
                "socks5_pipeline (--socks5-pipeline) needs a socks5:// upstream".to_owned(),
            );
        }
        if self.busy_poll_us > MAX_BUSY_POLL_US {
            return invalid(format!("busy_poll_us must be 0 to {MAX_BUSY_POLL_US}"));
        }
        if self.max_half_open == 0 || self.max_pending == 0 {
            return invalid("max_half_open and max_pending must be at least 1".to_owned());
        }
        if self.tap && self.vnet_hdr {
            return invalid("vnet_hdr is for a TUN descriptor, not a TAP".to_owned());
        }
        if self.tap && self.gateway.is_empty() {
            return invalid("tap needs a gateway address".to_owned());
        }
        if !self.tap && (!self.gateway.is_empty() || self.gateway_mac.is_some() || self.proxy_arp) {
            return invalid("gateway, gateway_mac and proxy_arp need tap".to_owned());
        }
        let shared = self.relay_key.is_some() || self.relay_key_file.is_some();
        let identity = self.relay_private_key_file.is_some() || self.relay_server_key.is_some();
        if self.relay.is_none() && (shared || identity) {
            return invalid("a relay key without a relay".to_owned());
        }
        if self.relay_key.is_some() && self.relay_key_file.is_some() {
            return invalid("relay_key and relay_key_file exclude each other".to_owned());
        }
        if shared && identity {
            return invalid(
                "a relay takes a pre-shared key (relay_key, relay_key_file) or an identity \
                 (relay_private_key_file with relay_server_key), not both"
                    .to_owned(),
            );
        }
        if identity && (self.relay_private_key_file.is_none() || self.relay_server_key.is_none()) {
            return invalid(
                "relay_private_key_file and relay_server_key go together (this client's key \
                 and the server's)"
                    .to_owned(),
            );
        }
        Ok(())
    }

    /// The handshake policy: one mode, or per-port exceptions to it.
    pub fn handshake_policy(&self) -> Arc<dyn HandshakePolicy> {
        if self.handshake_port.is_empty() {
            Arc::new(self.handshake)
        } else {
            Arc::new(PortPolicy {
                default: self.handshake,
                ports: self
                    .handshake_port
                    .iter()
                    .map(|p| (p.port, p.handshake))
                    .collect(),
            })
        }
    }

    /// On a descriptor handed over: a source of the kind these settings say (a utun on macOS
    /// and iOS).
    #[cfg(unix)]
    pub fn fd_source(&self, fd: std::os::fd::OwnedFd) -> Source {
        use prism_device::FdKind;
        // On Apple systems a TUN descriptor is a utun, with its address-family header.
        #[cfg(any(target_os = "macos", target_os = "ios"))]
        let plain = FdKind::Utun;
        #[cfg(not(any(target_os = "macos", target_os = "ios")))]
        let plain = FdKind::Ip;
        let kind = match (self.tap, self.vnet_hdr) {
            (true, _) => FdKind::Ethernet,
            (false, true) => FdKind::IpVirtio,
            (false, false) => plain,
        };
        Source::fd(fd, kind)
    }

    /// A builder on `source` with every setting applied: the relay's key is read and its
    /// name resolved here. `outside` carries anything the settings cannot (a protect hook);
    /// its binding and mark are the settings'.
    pub async fn builder(
        &self,
        source: Source,
        outside: Outside,
    ) -> Result<Builder, SettingsError> {
        self.check()?;
        let mut config = Config::default();
        config.max_half_open = self.max_half_open;
        config.max_pending = self.max_pending;
        config.tcp_rx_buffer = self.tcp_buffer_kib as usize * 1024;
        config.tcp_tx_buffer = config.tcp_rx_buffer;
        config.busy_poll =
            (self.busy_poll_us > 0).then(|| Duration::from_micros(self.busy_poll_us));
        let outside = Outside {
            bind_interface: self.bind_interface.clone(),
            fwmark: self.fwmark,
            ..outside
        };
        let mut builder = crate::Engine::builder(source)
            .mtu(self.mtu)
            .stack(config)
            .handshake(self.handshake_policy())
            .connect_timeout(Duration::from_secs(self.connect_timeout))
            .outside(outside)
            .relay_path_mtu(self.relay_path_mtu);
        for net in &self.address {
            builder = builder.address(net.addr(), net.prefix_len());
        }
        builder = match &self.upstream {
            UpstreamUrl::Direct => builder.direct(),
            UpstreamUrl::Socks5(url) => builder
                .socks5(url.clone())
                .socks5_pipeline(self.socks5_pipeline),
        };
        if let Some(resolver) = self.dns {
            builder = builder.dns(resolver.0);
        }
        if let Some(relay) = &self.relay {
            builder = builder.udp_relay(resolve(relay).await?, self.relay_auth()?);
        }
        if self.tap {
            let mut gateway = prism_l2::Config {
                mac: prism_l2::Mac(self.gateway_mac.map_or(prism_l2::DEFAULT_MAC.0, |m| m.0)),
                proxy_arp: self.proxy_arp,
                ..prism_l2::Config::default()
            };
            for address in &self.gateway {
                match address {
                    IpAddr::V4(a) => gateway.ipv4.push(*a),
                    IpAddr::V6(a) => gateway.ipv6.push(*a),
                }
            }
            builder = builder.gateway(gateway);
        }
        Ok(builder)
    }
}

impl Settings {
    /// How this client proves itself to the relay: its identity, or the pre-shared key.
    fn relay_auth(&self) -> Result<ClientAuth, SettingsError> {
        match (&self.relay_private_key_file, &self.relay_server_key) {
            (Some(file), Some(server)) => Ok(ClientAuth::Identity {
                private: read_private_key(file)?,
                server: server.parse().map_err(|e: BadKey| {
                    SettingsError::RelayKey(format!("relay_server_key: {e}"))
                })?,
                rotation: Rotation::default(),
            }),
            _ => relay_keys(self.relay_key.as_deref(), self.relay_key_file.as_deref())?
                .map(ClientAuth::from)
                .ok_or_else(|| {
                    SettingsError::RelayKey(
                        "a relay needs a key: relay_key_file or relay_key (--relay-key-file FILE \
                         or PRISM_RELAY_KEY on the command line)"
                            .to_owned(),
                    )
                }),
        }
    }
}

/// A private key from a file `prism genkey` wrote (surrounding whitespace ignored).
pub fn read_private_key(path: &Path) -> Result<PrivateKey, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        SettingsError::RelayKey(format!(
            "cannot read the private key from {}: {e}",
            path.display()
        ))
    })?;
    text.parse().map_err(|_| {
        SettingsError::RelayKey(format!(
            "{} does not hold a private key: expected 32 bytes in base64, as `prism genkey`              writes",
            path.display()
        ))
    })
}

async fn resolve(relay: &RelayUrl) -> Result<SocketAddr, SettingsError> {
    let unresolved = |reason: String| SettingsError::RelayUnresolved {
        relay: relay.to_string(),
        reason,
    };
    tokio::net::lookup_host((relay.host.as_str(), relay.port))
        .await
        .map_err(|e| unresolved(e.to_string()))?
        .next()
        .ok_or_else(|| unresolved("the name has no address".to_owned()))
}

/// The relay's pre-shared key from a value or a file (surrounding whitespace ignored); `None`
/// when neither is given, for the caller to say which of its own settings would give one.
pub fn relay_keys(key: Option<&str>, file: Option<&Path>) -> Result<Option<Keys>, SettingsError> {
    let material = match (key, file) {
        (_, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| {
                SettingsError::RelayKey(format!(
                    "cannot read the relay key from {}: {e}",
                    path.display()
                ))
            })?
            .trim()
            .to_owned(),
        (Some(key), None) => key.to_owned(),
        (None, None) => return Ok(None),
    };
    Keys::derive(material.as_bytes())
        .map(Some)
        .map_err(|e| SettingsError::RelayKey(e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn a_relay_without_a_key_names_the_clients_settings() {
        assert!(relay_keys(None, None).unwrap().is_none());
        let settings = Settings::from_json(
            r#"{"address": ["10.0.0.1/24"], "upstream": "direct", "relay": "udp://127.0.0.1:5555"}"#,
        )
        .unwrap();
        let error = settings.relay_auth().err().unwrap().to_string();
        assert!(
            error.contains("relay_key_file") && error.contains("--relay-key-file"),
            "{error}"
        );
    }

    #[test]
    fn json_uses_the_flags_names_and_defaults() {
        let settings = Settings::from_json(
            r#"{"address": ["10.0.0.1/24", "fd00::1/64"], "upstream": "socks5://127.0.0.1:1080",
                "handshake": "consistent", "handshake_port": ["22=fast"], "fwmark": 153,
                "relay": "udp://[fd00::9]:5555", "relay_key": "0123456789abcdef"}"#,
        )
        .unwrap();
        assert_eq!(settings.address.len(), 2);
        assert!(matches!(settings.upstream, UpstreamUrl::Socks5(_)));
        assert_eq!(settings.handshake, Handshake::Consistent);
        assert_eq!(settings.handshake_port[0].port, 22);
        assert_eq!(settings.mtu, 1500);
        assert_eq!(settings.connect_timeout, 10);
        assert_eq!(
            settings.relay,
            Some(RelayUrl {
                host: "fd00::9".to_owned(),
                port: 5555
            })
        );
    }

    #[test]
    fn an_identity_comes_from_a_key_file_and_the_servers_public_key() {
        let dir = std::env::temp_dir().join(format!("prism-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("client.key");
        let private = PrivateKey::generate().unwrap();
        std::fs::write(&file, format!("{}\n", private.to_base64())).unwrap();
        let server = PrivateKey::generate().unwrap().public_key().to_string();
        let mut settings = Settings::new(UpstreamUrl::Direct);
        settings.relay_private_key_file = Some(file.clone());
        settings.relay_server_key = Some(server);
        assert!(matches!(
            settings.relay_auth().unwrap(),
            ClientAuth::Identity { .. }
        ));
        settings.relay_server_key = Some("not a key".to_owned());
        let error = settings.relay_auth().unwrap_err().to_string();
        assert!(error.contains("relay_server_key"), "{error}");
        std::fs::write(&file, "garbage").unwrap();
        let error = read_private_key(&file).unwrap_err().to_string();
        assert!(error.contains("does not hold a private key"), "{error}");
        let error = read_private_key(&dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("cannot read"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wrong_keys_and_values_say_what_is_wrong() {
        let cases = [
            (
                r#"{"address": ["10.0.0.1/24"], "upstream": "direct", "mtuu": 1}"#,
                "mtuu",
            ),
            (
                r#"{"address": ["10.0.0.1"], "upstream": "direct"}"#,
                "address",
            ),
            (
                r#"{"address": ["10.0.0.1/24"], "upstream": "http://x:1"}"#,
                "expected direct or socks5://",
            ),
            (
                r#"{"address": ["10.0.0.1/24"], "upstream": "direct", "mtu": 100}"#,
                "1280",
            ),
            (
                r#"{"address": [], "upstream": "direct"}"#,
                "at least one address",
            ),
            (
                r#"{"address": ["10.0.0.1/24"], "upstream": "direct", "socks5_pipeline": true}"#,
                "needs a socks5:// upstream",
            ),
            (
                r#"{"address": ["10.0.0.1/24"], "upstream": "direct", "tap": true}"#,
                "gateway",
            ),
            (
                r#"{"address": ["10.0.0.1/24"], "upstream": "direct", "relay_key": "k"}"#,
                "without a relay",
            ),
            (
                r#"{"address": ["10.0.0.1/24"], "upstream": "direct", "relay": "tcp://h:1"}"#,
                "udp://HOST:PORT",
            ),
            (
                r#"{"address": ["10.0.0.1/24"], "upstream": "direct", "relay": "udp://h:1",
                    "relay_private_key_file": "/k"}"#,
                "go together",
            ),
            (
                r#"{"address": ["10.0.0.1/24"], "upstream": "direct", "relay": "udp://h:1",
                    "relay_private_key_file": "/k", "relay_server_key": "x", "relay_key_file": "/p"}"#,
                "not both",
            ),
        ];
        for (json, says) in cases {
            let error = Settings::from_json(json).unwrap_err().to_string();
            assert!(error.contains(says), "{json}: {error}");
        }
    }

    #[test]
    fn values_parse_as_the_command_line_does() {
        assert_eq!(
            "direct".parse::<UpstreamUrl>().unwrap(),
            UpstreamUrl::Direct
        );
        assert!("02:00:00:aa:bb:cc".parse::<GatewayMac>().is_ok());
        let error = "01:00:00:00:00:01".parse::<GatewayMac>().unwrap_err();
        assert!(error.to_string().contains("unicast"));
        for bad in ["udp://h", "udp://:5", "udp://h:x"] {
            assert!(bad.parse::<RelayUrl>().is_err(), "{bad}");
        }
        for bad in ["80", "80=slow", "x=fast"] {
            assert!(bad.parse::<PortHandshake>().is_err(), "{bad}");
        }
    }
}
