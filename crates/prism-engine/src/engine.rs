//! [`Builder`] and [`Engine`]: the wiring of a source, the stack, the relay, the Ethernet
//! gateway and a connector, and the handle that reads their stats and shuts them down.
//!
//! Every task the engine starts has one owner, the supervisor task, which ends them all in
//! order when the engine stops: the stack first (FIN to every client, RST at the deadline),
//! then the connects and relays (their upstream sockets closed), the relay, and the device once
//! the stack's last packets are written.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prism_device::{Diverted, Link, Outside};
use prism_relay::ClientAuth;
use prism_relay::{PacketTunnel, UdpTunnel};
use prism_stack::{Config, Control, HandshakePolicy, Report, Stack};
use prism_tunnel::{Connector, Direct, Socks5, Socks5Url, serve};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::dns;
use crate::source::{Kind, Source};
use crate::stats::Stats;
use crate::tap;

/// Packets buffered each way between the device and the stack.
const LINK_QUEUE: usize = 4096;

/// How long a dropped [`Engine`] gives its connections to close before they are reset.
pub const DROP_GRACE: Duration = Duration::from_secs(1);

/// How long the device may take to write the stack's last packets once it stopped.
const DRAIN: Duration = Duration::from_secs(1);

/// How long [`Engine::stats`] waits for the stack's report.
const REPORT_WAIT: Duration = Duration::from_secs(1);

/// Why an engine could not start, or stopped on its own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The device could not be opened or set up.
    #[cfg(target_os = "linux")]
    #[error(transparent)]
    Tun(#[from] prism_device::tun::Error),
    /// The descriptor handed over could not be used.
    #[error("cannot use the device descriptor: {0}")]
    Fd(io::Error),
    /// An Ethernet source without gateway settings.
    #[error("an Ethernet (TAP) source needs gateway settings: Builder::gateway")]
    NoGateway,
    /// The relay server could not listen.
    #[error("cannot listen on {listen}: {source}")]
    Listen {
        /// The address asked for.
        listen: SocketAddr,
        /// What failed.
        source: io::Error,
    },
    /// The relay server could not be reached.
    #[error("cannot reach the relay {server}: {source}")]
    Relay {
        /// The relay server's address.
        server: SocketAddr,
        /// What failed.
        source: io::Error,
    },
    /// The SOCKS5 proxy's name did not resolve when the engine started.
    #[error("cannot resolve the SOCKS5 proxy {proxy}: {source}")]
    ProxyName {
        /// The proxy, as the URL names it.
        proxy: String,
        /// What failed.
        source: io::Error,
    },
    /// The device failed while the engine ran.
    #[error("the device failed: {0}")]
    Device(io::Error),
    /// The engine had stopped on its own; the failure [`Engine::failed`] reported before.
    #[error("{0}")]
    Failed(String),
    /// A task of the engine's ended unexpectedly (a bug: it panicked).
    #[error("the engine's {0} task failed")]
    Task(&'static str),
}

/// Where accepted connections go.
enum Upstream {
    Direct,
    Socks5(Socks5Url),
    Custom(Arc<dyn Connector>),
}

/// The non-TCP half.
enum Relay {
    /// Non-TCP is answered with ICMP administratively prohibited.
    None,
    /// Prism's own UDP relay, connected at start.
    Udp {
        server: SocketAddr,
        auth: ClientAuth,
    },
    /// The product's own packet tunnel.
    Custom(Box<dyn FnOnce(RelayParts) -> JoinHandle<()> + Send>),
}

/// What a product's relay task is started with.
struct RelayParts {
    diverted: Diverted,
    mtu: usize,
    dns: Option<mpsc::Sender<Bytes>>,
    counters: Arc<prism_relay::Counters>,
}

/// Sets an engine up; [`Builder::start`] runs it.
pub struct Builder {
    source: Source,
    addresses: Vec<(IpAddr, u8)>,
    mtu: u16,
    config: Config,
    handshake: Option<Arc<dyn HandshakePolicy>>,
    upstream: Upstream,
    socks5_pipeline: bool,
    outside: Outside,
    connect_timeout: Duration,
    relay: Relay,
    relay_path_mtu: u16,
    dns: Option<SocketAddr>,
    gateway: Option<prism_l2::Config>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("source", &self.source)
            .field("addresses", &self.addresses)
            .field("mtu", &self.mtu)
            .field("outside", &self.outside)
            .finish_non_exhaustive()
    }
}

impl Builder {
    pub(crate) fn new(source: Source) -> Builder {
        Builder {
            source,
            addresses: Vec::new(),
            mtu: 1500,
            config: Config::default(),
            handshake: None,
            upstream: Upstream::Direct,
            socks5_pipeline: false,
            outside: Outside::default(),
            connect_timeout: Duration::from_secs(10),
            relay: Relay::None,
            relay_path_mtu: 1500,
            dns: None,
            gateway: None,
        }
    }

    /// An address of the device (the client's side of it), with its prefix length; repeat for
    /// more. A device opened by name gets them assigned; the relay claims them for its session.
    /// The stack names itself by the next address in each prefix.
    pub fn address(mut self, address: IpAddr, prefix: u8) -> Builder {
        self.addresses.push((address, prefix));
        self
    }

    /// The device's IP MTU (1500 unless set).
    pub fn mtu(mut self, mtu: u16) -> Builder {
        self.mtu = mtu;
        self
    }

    /// The stack's settings (buffers, caps, timeouts). Its `mtu` and `addresses` are the
    /// engine's, its `pending_timeout` is the connect timeout plus 5 s, and its `handshake` is
    /// [`Builder::handshake`]'s if that was called, whatever they say here.
    pub fn stack(mut self, config: Config) -> Builder {
        self.config = config;
        self
    }

    /// How SYNs are answered, per connection: a [`prism_stack::Handshake`] for all, or a
    /// policy such as [`prism_stack::PortPolicy`].
    pub fn handshake(mut self, policy: Arc<dyn HandshakePolicy>) -> Builder {
        self.handshake = Some(policy);
        self
    }

    /// Connections go straight to their destination with an OS socket (the default).
    pub fn direct(mut self) -> Builder {
        self.upstream = Upstream::Direct;
        self
    }

    /// Connections go through a SOCKS5 proxy. A name in the URL is resolved once, in
    /// [`Builder::start`], within the connect timeout, and every connection reaches the proxy
    /// at those addresses: resolved per connection, the lookup could be routed into the device
    /// the engine serves. A name that does not resolve fails the start.
    pub fn socks5(mut self, url: Socks5Url) -> Builder {
        self.upstream = Upstream::Socks5(url);
        self
    }

    /// Pipelines the SOCKS5 exchange ([`Socks5::pipelined`]): one round trip to the proxy
    /// instead of two, none for a fast handshake. The proxy must keep the bytes that follow
    /// the request (dante does). Off by default.
    pub fn socks5_pipeline(mut self, on: bool) -> Builder {
        self.socks5_pipeline = on;
        self
    }

    /// Connections go through the product's own connector. It opens its own sockets, so
    /// [`Builder::outside`] does not apply to them: it must keep them out of the device itself.
    pub fn connector(mut self, connector: Arc<dyn Connector>) -> Builder {
        self.upstream = Upstream::Custom(connector);
        self
    }

    /// How the sockets the engine opens (direct, to the SOCKS5 proxy, to the relay server)
    /// avoid the device: a binding, a mark, and the product's `protect` hook, called with each
    /// before it connects.
    pub fn outside(mut self, outside: Outside) -> Builder {
        self.outside = outside;
        self
    }

    /// How long an upstream connect (including a SOCKS5 exchange) may take (10 s unless set).
    pub fn connect_timeout(mut self, timeout: Duration) -> Builder {
        self.connect_timeout = timeout;
        self
    }

    /// Every non-TCP packet goes through Prism's UDP relay to `prism relay-server` at `server`,
    /// with a pre-shared key ([`crate::RelayKeys`]) or the client's own identity
    /// ([`ClientAuth::Identity`]).
    pub fn udp_relay(mut self, server: SocketAddr, auth: impl Into<ClientAuth>) -> Builder {
        self.relay = Relay::Udp {
            server,
            auth: auth.into(),
        };
        self
    }

    /// Every non-TCP packet goes through the product's own packet tunnel.
    pub fn relay<T: PacketTunnel>(mut self, tunnel: Arc<T>) -> Builder {
        self.relay = Relay::Custom(Box::new(move |parts: RelayParts| {
            tokio::spawn(prism_relay::run_relay(
                parts.diverted,
                Some(tunnel),
                parts.mtu,
                parts.dns,
                parts.counters,
            ))
        }));
        self
    }

    /// The path MTU towards the relay server (1500 unless set): larger packets that may not
    /// be fragmented are answered with ICMP fragmentation needed / packet too big.
    pub fn relay_path_mtu(mut self, mtu: u16) -> Builder {
        self.relay_path_mtu = mtu;
        self
    }

    /// Where DNS queries go. Without a relay, every UDP query to port 53 is carried over TCP
    /// (RFC 7766) through the connector to the resolver the client asked, and the answer comes
    /// back as UDP; with `resolver` set, to that resolver instead. With a relay, DNS crosses
    /// the relay unless `resolver` is set.
    pub fn dns(mut self, resolver: SocketAddr) -> Builder {
        self.dns = Some(resolver);
        self
    }

    /// On an Ethernet source: the virtual gateway's MAC and addresses.
    pub fn gateway(mut self, gateway: prism_l2::Config) -> Builder {
        self.gateway = Some(gateway);
        self
    }

    /// Resolves the SOCKS5 proxy's name, opens the device, connects the relay, and starts every
    /// task. Must be called within a tokio runtime with I/O and time enabled.
    pub async fn start(self) -> Result<Engine, Error> {
        // The proxy's name is resolved once, now, before this engine opens its device (see
        // `Socks5::reached_at`); `prism run` adds its routes after this.
        let proxy_addresses = match &self.upstream {
            Upstream::Socks5(url) => {
                let addresses = tokio::time::timeout(self.connect_timeout, url.addresses())
                    .await
                    .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
                    .map_err(|source| Error::ProxyName {
                        proxy: url.proxy(),
                        source,
                    })?;
                info!(proxy = %url.proxy(), ?addresses, "SOCKS5 proxy");
                addresses
            }
            _ => Vec::new(),
        };
        let ethernet = self.source.is_ethernet();
        let gateway = match (ethernet, self.gateway) {
            (true, None) => return Err(Error::NoGateway),
            (true, Some(config)) => Some(prism_l2::Gateway::new(config)),
            (false, _) => None,
        };
        let refused = Arc::new(AtomicU64::new(0));
        let (device_link, pump, device) = match self.source.0 {
            #[cfg(target_os = "linux")]
            Kind::Named {
                name,
                ethernet,
                queue_len,
                offload,
            } => {
                use prism_device::tun::{Layer, Tun, TunConfig};
                let tun = Tun::open(&TunConfig {
                    name,
                    mtu: self.mtu,
                    addresses: self.addresses.clone(),
                    layer: if ethernet { Layer::Ethernet } else { Layer::Ip },
                    queue_len,
                    offload,
                })?;
                let device = Device {
                    name: tun.name().to_owned(),
                    index: tun.index(),
                };
                let refused_writes = tun.refused_writes();
                let udp_offload = tun.udp_offload();
                let (link, pump) = tun.spawn(LINK_QUEUE);
                info!(device = %device.name, framing = ?link.framing(), udp_offload, "device open");
                (link, Some((pump, refused_writes)), Some(device))
            }
            #[cfg(unix)]
            Kind::Fd { fd, kind } => {
                let device = prism_device::FdDevice::new(fd, kind, self.mtu).map_err(Error::Fd)?;
                let refused_writes = device.refused_writes();
                let (link, pump) = device.spawn(LINK_QUEUE);
                (link, Some((pump, refused_writes)), None)
            }
            Kind::Queues { link, .. } => (link, None, None),
        };
        let (pump, refused) = match pump {
            Some((pump, counted)) => (Some(pump), counted),
            None => (None, refused),
        };

        // On Ethernet, the gateway sits between the device's frames and the stack's packets.
        let gateway_counters = tap::SharedCounters::default();
        let (stack_link, bridge) = match gateway {
            Some(gateway) => {
                let (stack_end, packets_end) = Link::pair(LINK_QUEUE);
                let bridge = tap::bridge(
                    gateway,
                    device_link,
                    packets_end,
                    Arc::clone(&gateway_counters),
                );
                (stack_end, Some(bridge))
            }
            None => (device_link, None),
        };

        let mut config = self.config;
        if let Some(policy) = self.handshake {
            config.handshake = policy;
        }
        config.mtu = usize::from(self.mtu);
        config.addresses = self
            .addresses
            .iter()
            .map(|&(address, prefix)| (stack_address(address), prefix))
            .collect();
        // The connectors give up first and answer precisely; this only catches an answer lost.
        config.pending_timeout = self.connect_timeout + Duration::from_secs(5);
        let (mut stack, requests) = Stack::new(config, stack_link);
        let control = stack.control();
        let stack_counters = stack.counters();
        let diverted = stack.divert_other_protocols(LINK_QUEUE);

        // Prism's own sockets must not leave from the device's addresses: that is a loop.
        let mut outside = self.outside;
        outside
            .device_addresses
            .extend(self.addresses.iter().map(|&(address, _)| address));
        let direct = Direct::new()
            .timeout(self.connect_timeout)
            .outside(outside.clone());
        let connector: Arc<dyn Connector> = match self.upstream {
            Upstream::Direct => Arc::new(direct),
            Upstream::Socks5(url) => {
                if self.socks5_pipeline {
                    info!(
                        proxy = %url.proxy(),
                        "SOCKS5 pipelined: greeting, request and first bytes leave in one write"
                    );
                }
                Arc::new(
                    Socks5::new(url, direct)
                        .pipelined(self.socks5_pipeline)
                        .reached_at(proxy_addresses),
                )
            }
            Upstream::Custom(connector) => connector,
        };

        // DNS over TCP through the connector: always without a relay, with one only when a
        // resolver is named.
        let forward_dns = matches!(self.relay, Relay::None) || self.dns.is_some();
        let (dns, dns_task) = if forward_dns {
            let (queries_tx, queries) = mpsc::channel(dns::IN_FLIGHT);
            let task = tokio::spawn(dns::run(
                queries,
                Arc::clone(&connector),
                self.dns,
                diverted.to_device.clone(),
                diverted.framing,
            ));
            (Some(queries_tx), Some(task))
        } else {
            (None, None)
        };

        let relay_counters = Arc::new(prism_relay::Counters::default());
        let (relay_task, keepalive) = match self.relay {
            Relay::None => {
                let relay = prism_relay::run_relay::<UdpTunnel>(
                    diverted,
                    None,
                    0,
                    dns,
                    Arc::clone(&relay_counters),
                );
                (tokio::spawn(relay), None)
            }
            Relay::Udp { server, auth } => {
                let mtu = relay_mtu(server, self.relay_path_mtu);
                let addresses = self.addresses.iter().map(|&(a, _)| a).collect();
                let tunnel = UdpTunnel::connect(
                    server,
                    auth,
                    addresses,
                    &outside,
                    Arc::clone(&relay_counters),
                )
                .await
                .map_err(|source| Error::Relay { server, source })?;
                let keepalive = tunnel.keep_alive();
                let relay = prism_relay::run_relay(
                    diverted,
                    Some(tunnel),
                    mtu,
                    dns,
                    Arc::clone(&relay_counters),
                );
                (tokio::spawn(relay), Some(keepalive))
            }
            Relay::Custom(start) => (
                start(RelayParts {
                    diverted,
                    mtu: usize::from(self.relay_path_mtu),
                    dns,
                    counters: Arc::clone(&relay_counters),
                }),
                None,
            ),
        };

        let upstream_counters = Arc::new(prism_tunnel::Counters::default());
        let server = tokio::spawn(serve(requests, connector, Arc::clone(&upstream_counters)));
        let stack = tokio::spawn(stack.run());

        let parts = Arc::new(Parts {
            stack: stack_counters,
            relay: relay_counters,
            upstream: upstream_counters,
            gateway: ethernet.then_some(gateway_counters),
            refused,
            last: Mutex::new(None),
            failure: Mutex::new(None),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let (failed_tx, failed_rx) = oneshot::channel();
        let tasks = Tasks {
            stack,
            server,
            relay: relay_task,
            dns: dns_task,
            keepalive,
            bridge,
            pump,
        };
        let supervisor = tokio::spawn(supervise(
            tasks,
            control.clone(),
            Arc::clone(&parts),
            stop_rx,
            failed_tx,
        ));
        Ok(Engine {
            control,
            parts,
            stop: Some(stop_tx),
            failed: Some(failed_rx),
            supervisor: Some(supervisor),
            device,
        })
    }
}

/// A device the engine opened by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Interface name.
    pub name: String,
    /// Interface index, for routes.
    pub index: u32,
}

/// What the engine's handle and its supervisor share.
#[derive(Debug)]
struct Parts {
    stack: Arc<prism_stack::Counters>,
    relay: Arc<prism_relay::Counters>,
    upstream: Arc<prism_tunnel::Counters>,
    gateway: Option<tap::SharedCounters>,
    refused: Arc<AtomicU64>,
    /// The stack's last report, once it stopped.
    last: Mutex<Option<Report>>,
    /// Why the engine stopped on its own, if it did.
    failure: Mutex<Option<String>>,
}

impl Parts {
    /// The stack's last report, or, while it cannot answer, its counters alone.
    fn fallback(&self) -> Report {
        if let Some(last) = self.last.lock().ok().and_then(|last| last.clone()) {
            return last;
        }
        let mut report = Report::default();
        report.counters = self.stack.snapshot();
        report
    }

    fn stats(&self, report: Report) -> Stats {
        let gateway = self
            .gateway
            .as_ref()
            .map(|g| g.lock().map(|c| *c).unwrap_or_default());
        Stats::new(
            report,
            self.relay.snapshot(),
            self.upstream.snapshot(),
            gateway,
            self.refused.load(Ordering::Relaxed),
        )
    }
}

/// Every task the engine started.
#[derive(Debug)]
struct Tasks {
    stack: JoinHandle<Report>,
    server: JoinHandle<()>,
    relay: JoinHandle<()>,
    dns: Option<JoinHandle<()>>,
    keepalive: Option<JoinHandle<()>>,
    bridge: Option<JoinHandle<()>>,
    pump: Option<JoinHandle<io::Result<()>>>,
}

/// Reads a running engine's stats: [`Engine::observer`].
#[derive(Debug, Clone)]
pub struct Observer {
    control: Control,
    parts: Arc<Parts>,
}

impl Observer {
    /// As [`Engine::stats`].
    pub async fn stats(&self) -> Stats {
        let report = match tokio::time::timeout(REPORT_WAIT, self.control.report()).await {
            Ok(Some(report)) => report,
            _ => self.parts.fallback(),
        };
        self.parts.stats(report)
    }
}

/// A running engine. [`Engine::shutdown`] stops it and returns the final stats; dropping it
/// stops it too, with [`DROP_GRACE`] for connections to close.
#[derive(Debug)]
pub struct Engine {
    control: Control,
    parts: Arc<Parts>,
    stop: Option<oneshot::Sender<Duration>>,
    failed: Option<oneshot::Receiver<Error>>,
    supervisor: Option<JoinHandle<Stats>>,
    device: Option<Device>,
}

impl Engine {
    /// An engine on `source`, to be set up and started.
    pub fn builder(source: Source) -> Builder {
        Builder::new(source)
    }

    /// The device the engine opened by name, if it did.
    pub fn device(&self) -> Option<&Device> {
        self.device.as_ref()
    }

    /// Every counter, the connection counts and the open connections, now. Once the engine
    /// has stopped, its final stats; if the stack cannot answer within a second (a product
    /// that stopped reading its queues), the counters alone.
    pub async fn stats(&self) -> Stats {
        self.observer().stats().await
    }

    /// A handle that reads the stats from another task (a metrics endpoint) while the engine
    /// runs; cheap to clone. It keeps nothing running.
    pub fn observer(&self) -> Observer {
        Observer {
            control: self.control.clone(),
            parts: Arc::clone(&self.parts),
        }
    }

    /// Resolves only if the engine stops on its own: the device failed or was closed. It
    /// stops everything it started, as [`Engine::shutdown`] does; call that afterwards for the
    /// final stats.
    pub async fn failed(&mut self) -> Error {
        if let Some(failed) = self.failed.as_mut() {
            let failure = failed.await;
            self.failed = None;
            if let Ok(error) = failure {
                return error;
            }
        }
        match self.failure() {
            Some(message) => Error::Failed(message),
            // The engine was stopped, not failed: nothing to report, ever.
            None => std::future::pending().await,
        }
    }

    /// Why the engine stopped on its own, if it did; does not wait.
    pub fn failure(&self) -> Option<String> {
        self.parts.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Stops the engine: new connections are refused; every open connection gets a FIN at once
    /// (a RST if the application had bytes queued that it never got to send) and a RST if it
    /// has not closed within `grace`; every `Stream` fails at once; every task the engine
    /// started ends and every socket it opened is closed. Returns the final stats, also after
    /// the engine failed on its own ([`Engine::failure`] says why).
    pub async fn shutdown(mut self, grace: Duration) -> Stats {
        if let Some(stop) = self.stop.take() {
            // The supervisor may have stopped already (the device failed): it has the result.
            let _ = stop.send(grace);
        }
        let supervisor = self.supervisor.take();
        match supervisor {
            Some(supervisor) => match supervisor.await {
                Ok(stats) => stats,
                Err(_) => self.parts.stats(self.parts.fallback()),
            },
            None => self.parts.stats(self.parts.fallback()),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The supervisor ends every task on its own from here; nobody waits for it.
            let _ = stop.send(DROP_GRACE);
        }
    }
}

/// Waits for a stop (or the device failing), then ends every task in order.
async fn supervise(
    mut tasks: Tasks,
    control: Control,
    parts: Arc<Parts>,
    stop: oneshot::Receiver<Duration>,
    failed: oneshot::Sender<Error>,
) -> Stats {
    let device_ended = async {
        match tasks.pump.as_mut() {
            Some(pump) => pump.await,
            None => std::future::pending().await,
        }
    };
    // The stack ends on its own only when its link closes: a product closed its queues, or
    // the bridge in front of a TAP stopped.
    let mut report = None;
    let (grace, failure) = tokio::select! {
        grace = stop => (grace.unwrap_or(DROP_GRACE), None),
        ended = device_ended => {
            tasks.pump = None;
            let error = match ended {
                Ok(Ok(())) => Error::Device(io::Error::other("the device closed")),
                Ok(Err(error)) => Error::Device(error),
                Err(_) => Error::Task("device"),
            };
            (Duration::ZERO, Some(error))
        }
        ended = &mut tasks.stack => {
            report = Some(ended.unwrap_or_default());
            (Duration::ZERO, Some(Error::Device(io::Error::other("the device's link closed"))))
        }
    };
    if let Some(error) = failure {
        warn!(%error, "engine stopping");
        if let Ok(mut stored) = parts.failure.lock() {
            *stored = Some(error.to_string());
        }
        let _ = failed.send(error);
    }
    debug!(?grace, "engine stopping");
    control.shutdown(grace);
    let report = match report {
        Some(report) => report,
        // The stack ends by the grace's end; only a device that stopped taking its packets
        // can hold it longer (its last flush waits on the device's queue).
        None => match tokio::time::timeout(grace.saturating_add(DRAIN), &mut tasks.stack).await {
            Ok(Ok(report)) => report,
            Ok(Err(_)) => {
                warn!("the stack task failed");
                parts.fallback()
            }
            Err(_) => {
                warn!(
                    "the device stopped taking packets; the stack is stopped without its last ones"
                );
                tasks.stack.abort();
                let _ = (&mut tasks.stack).await;
                parts.fallback()
            }
        },
    };
    if let Ok(mut last) = parts.last.lock() {
        *last = Some(report.clone());
    }
    // The stack closed its request queue: `serve` ends its connects and relays and returns.
    let _ = (&mut tasks.server).await;
    // The relay holds a sender into the device; once it is gone, the device's queue ends.
    tasks.relay.abort();
    let _ = (&mut tasks.relay).await;
    if let Some(dns) = tasks.dns.take() {
        // Its queries in flight end with it (their upstream connections closed).
        dns.abort();
        let _ = dns.await;
    }
    if let Some(keepalive) = tasks.keepalive.take() {
        keepalive.abort();
        let _ = keepalive.await;
    }
    // The bridge and the device write what the stack sent last, then end on their own.
    if let Some(bridge) = tasks.bridge.take() {
        finish(bridge).await;
    }
    if let Some(pump) = tasks.pump.take() {
        finish(pump).await;
    }
    let stats = parts.stats(report);
    info!(counters = %stats.stack, "engine stopped");
    stats
}

/// Waits a moment for a task that ends on its own, then aborts it.
async fn finish<T>(mut task: JoinHandle<T>) {
    if tokio::time::timeout(DRAIN, &mut task).await.is_err() {
        task.abort();
        let _ = task.await;
    }
}

/// The stack names itself by the first address after the device's own in each prefix; with
/// AnyIP it answers for every address anyway.
fn stack_address(device_address: IpAddr) -> IpAddr {
    match device_address {
        IpAddr::V4(a) => IpAddr::V4(u32::from(a).wrapping_add(1).into()),
        IpAddr::V6(a) => IpAddr::V6(u128::from(a).wrapping_add(1).into()),
    }
}

/// The largest packet the relay carries whole: the path MTU towards the relay server, less the
/// outer IP and UDP headers and the relay's own header and tag.
fn relay_mtu(server: SocketAddr, path_mtu: u16) -> usize {
    let outer = if server.is_ipv6() { 40 + 8 } else { 20 + 8 };
    usize::from(path_mtu).saturating_sub(outer + prism_relay::OVERHEAD)
}
