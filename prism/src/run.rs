//! `prism run`: set up, serve until a signal, tear down.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use prism_device::Link;
use prism_device::tun::{Layer, Tun, TunConfig};
use prism_stack::{Config, HandshakePolicy, PortPolicy, Stack};
use prism_tunnel::{Direct, Socks5, serve};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::cli::{RunArgs, UpstreamArg};
use crate::routes::Routes;

/// Packets buffered each way between the TUN and the stack.
const LINK_QUEUE: usize = 4096;

pub(crate) async fn run(args: RunArgs) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;

    let tun = Tun::open(&TunConfig {
        name: args.tun.clone(),
        mtu: args.mtu,
        addresses: args
            .addresses
            .iter()
            .map(|n| (n.addr(), n.prefix_len()))
            .collect(),
        layer: if args.tap { Layer::Ethernet } else { Layer::Ip },
        queue_len: args.tun_queue,
    })?;
    let mut routes = Routes::new()?;
    let served = serve_until_signal(&args, tun, &mut routes, async {
        tokio::select! {
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
        }
    })
    .await;
    routes.remove_all().await;
    served
}

async fn serve_until_signal(
    args: &RunArgs,
    tun: Tun,
    routes: &mut Routes,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<()> {
    let (name, index) = (tun.name().to_owned(), tun.index());
    for &net in &args.routes {
        let via = next_hop(args, net)?;
        routes.add(net, index, &name, via).await?;
    }

    let mut config = Config::default();
    config.mtu = usize::from(args.mtu);
    config.max_half_open = args.max_half_open;
    config.handshake = handshake_policy(args);
    config.max_pending = args.max_pending;
    let connect_timeout = Duration::from_secs(args.connect_timeout);
    // The connectors give up first and answer precisely; this only catches an answer lost.
    config.pending_timeout = connect_timeout + Duration::from_secs(5);
    config.tcp_rx_buffer = args.tcp_buffer_kib as usize * 1024;
    config.tcp_tx_buffer = config.tcp_rx_buffer;
    config.addresses = args
        .addresses
        .iter()
        .map(|n| (stack_address(n.addr()), n.prefix_len()))
        .collect();
    let (stack_end, stack_far) = Link::pair(LINK_QUEUE);
    let (stack, requests) = Stack::new(config, stack_end);
    let counters = stack.counters();
    let l2_counters = crate::tap::SharedCounters::default();
    // The split sits between the device (the TUN, or the TAP's gateway) and the stack.
    let (split_device, device_end) = Link::pair(LINK_QUEUE);
    let (pump, bridge) = if args.tap {
        // TAP: device frames <-> gateway <-> IP packets.
        let (tap_end, frames_end) = Link::pair(LINK_QUEUE);
        let gateway = prism_l2::Gateway::new(prism_l2::Config {
            mac: prism_l2::Mac(args.gateway_mac.unwrap_or(prism_l2::DEFAULT_MAC.0)),
            ipv4: args
                .gateways
                .iter()
                .filter_map(|g| match g {
                    IpAddr::V4(a) => Some(*a),
                    IpAddr::V6(_) => None,
                })
                .collect(),
            ipv6: args
                .gateways
                .iter()
                .filter_map(|g| match g {
                    IpAddr::V6(a) => Some(*a),
                    IpAddr::V4(_) => None,
                })
                .collect(),
            proxy_arp: args.proxy_arp,
        });
        let bridge = crate::tap::bridge(gateway, frames_end, device_end, Arc::clone(&l2_counters));
        (tun.spawn(tap_end), Some(bridge))
    } else {
        (tun.spawn(device_end), None)
    };
    let relay_counters = Arc::new(prism_relay::Counters::default());
    let relay = match &args.relay {
        Some((host, port)) => Some(open_relay(args, host, *port, &relay_counters).await?),
        None => None,
    };
    let keepalive = relay.as_ref().map(|r| r.keep_alive());
    let relay_mtu = relay_mtu(args);
    let split = tokio::spawn(prism_relay::run_split(
        split_device,
        stack_far,
        relay,
        relay_mtu,
        Arc::clone(&relay_counters),
    ));
    let stack = tokio::spawn(stack.run());

    let mut direct = Direct::new().timeout(connect_timeout);
    if let Some(interface) = &args.bind_interface {
        direct = direct.bind_interface(interface);
    }
    if let Some(mark) = args.fwmark {
        direct = direct.fwmark(mark);
    }
    let upstream_name = match &args.upstream {
        UpstreamArg::Direct => "direct".to_owned(),
        UpstreamArg::Socks5(url) => format!("socks5 {}", url.proxy()),
    };
    let server = match &args.upstream {
        UpstreamArg::Direct => tokio::spawn(serve(requests, Arc::new(direct))),
        UpstreamArg::Socks5(url) => {
            tokio::spawn(serve(requests, Arc::new(Socks5::new(url.clone(), direct))))
        }
    };
    info!(
        tun = %name,
        upstream = %upstream_name,
        handshake = %args.handshake,
        routes = ?args.routes,
        "serving"
    );

    let outcome = tokio::select! {
        signal = stop => {
            info!(signal, "stopping");
            Ok(())
        }
        ended = pump => match ended {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(anyhow::Error::new(error).context(format!("TUN {name} failed"))),
            Err(error) => Err(anyhow::Error::new(error).context("TUN task failed")),
        },
    };
    // Routes first, while the device still exists; closing the TUN would take them with it.
    routes.remove_all().await;
    stack.abort();
    server.abort();
    if let Some(bridge) = bridge {
        bridge.abort();
    }
    split.abort();
    if let Some(keepalive) = keepalive {
        keepalive.abort();
    }
    let snapshot = counters.snapshot();
    let mut fields = snapshot.fields();
    fields.extend(
        relay_counters
            .fields()
            .into_iter()
            .map(|(k, v)| (relay_name(k), v)),
    );
    if args.tap {
        let l2 = l2_counters.lock().map(|c| *c).unwrap_or_default();
        info!(?l2, "gateway");
        fields.extend(l2.fields().into_iter().map(|(k, v)| (l2_name(k), v)));
    }
    info!(counters = %snapshot, "stopped");
    if let Some(path) = &args.stats_file {
        if let Err(error) = std::fs::write(path, stats_json(&fields)) {
            warn!(path = %path.display(), %error, "cannot write the stats file");
        }
    }
    outcome
}

fn handshake_policy(args: &RunArgs) -> Arc<dyn HandshakePolicy> {
    if args.handshake_ports.is_empty() {
        Arc::new(args.handshake)
    } else {
        Arc::new(PortPolicy {
            default: args.handshake,
            ports: args.handshake_ports.iter().copied().collect(),
        })
    }
}

/// The stack names itself by the first address after the TUN's own in each prefix; with AnyIP
/// it answers for every address anyway.
fn stack_address(tun_address: IpAddr) -> IpAddr {
    match tun_address {
        IpAddr::V4(a) => IpAddr::V4(u32::from(a).wrapping_add(1).into()),
        IpAddr::V6(a) => IpAddr::V6(u128::from(a).wrapping_add(1).into()),
    }
}

/// The counters as one flat JSON object (names are plain identifiers, values integers).
fn stats_json(fields: &[(&'static str, u64)]) -> String {
    let fields: Vec<String> = fields
        .iter()
        .map(|(name, value)| format!("\"{name}\": {value}"))
        .collect();
    format!("{{{}}}\n", fields.join(", "))
}

/// The gateway's counter names in the stats file: `l2_` and the name.
fn l2_name(name: &'static str) -> &'static str {
    match name {
        "frames_in" => "l2_frames_in",
        "packets_in" => "l2_packets_in",
        "arp_replies" => "l2_arp_replies",
        "neighbor_adverts" => "l2_neighbor_adverts",
        "drop_malformed" => "l2_drop_malformed",
        "drop_vlan" => "l2_drop_vlan",
        "drop_ethertype" => "l2_drop_ethertype",
        "drop_not_for_us" => "l2_drop_not_for_us",
        "drop_link_local" => "l2_drop_link_local",
        "drop_arp" => "l2_drop_arp",
        "drop_ndp" => "l2_drop_ndp",
        "egress_no_peer" => "l2_egress_no_peer",
        "frames_out" => "l2_frames_out",
        _ => "l2_other",
    }
}

/// Connects the relay client, with the same routing bypass as the direct upstream.
async fn open_relay(
    args: &RunArgs,
    host: &str,
    port: u16,
    counters: &Arc<prism_relay::Counters>,
) -> Result<Arc<prism_relay::UdpTunnel>> {
    let keys = crate::relay::keys(args.relay_key.as_deref(), args.relay_key_file.as_deref())?;
    let server = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve the relay {host}:{port}"))?
        .next()
        .with_context(|| format!("the relay {host} has no address"))?;
    let options = prism_relay::SocketOptions {
        bind_interface: args.bind_interface.clone(),
        fwmark: args.fwmark,
    };
    let addresses = args.addresses.iter().map(|n| n.addr()).collect();
    prism_relay::UdpTunnel::connect(server, keys, addresses, &options, Arc::clone(counters))
        .await
        .with_context(|| format!("cannot reach the relay {server}"))
}

/// The largest packet the relay carries whole: the path MTU towards the relay server, less the
/// outer IP and UDP headers and the relay's own header and tag.
fn relay_mtu(args: &RunArgs) -> usize {
    let outer = match &args.relay {
        Some((host, _)) if host.parse::<std::net::Ipv6Addr>().is_ok() => 40 + 8,
        _ => 20 + 8,
    };
    usize::from(args.relay_path_mtu).saturating_sub(outer + prism_relay::frame::OVERHEAD)
}

/// The relay's counter names in the stats file: `relay_` and the name.
fn relay_name(name: &'static str) -> &'static str {
    match name {
        "sent" => "relay_sent",
        "received" => "relay_received",
        "to_stack" => "relay_to_stack",
        "prohibited" => "relay_prohibited",
        "drop_malformed" => "relay_drop_malformed",
        "drop_link_local" => "relay_drop_link_local",
        "too_big" => "relay_too_big",
        "drop_truncated" => "relay_drop_truncated",
        "drop_version" => "relay_drop_version",
        "drop_auth" => "relay_drop_auth",
        "drop_replay" => "relay_drop_replay",
        "drop_session" => "relay_drop_session",
        "drop_spoofed" => "relay_drop_spoofed",
        "drop_address_taken" => "relay_drop_address_taken",
        "drop_no_session" => "relay_drop_no_session",
        "hellos" => "relay_hellos",
        _ => "relay_other",
    }
}

/// In TAP mode a route goes via the gateway of its family; a TUN needs no next hop.
fn next_hop(args: &RunArgs, net: ipnet::IpNet) -> Result<Option<IpAddr>> {
    if !args.tap {
        return Ok(None);
    }
    let gateway = args
        .gateways
        .iter()
        .find(|g| g.is_ipv4() == net.addr().is_ipv4())
        .copied();
    match gateway {
        Some(g) => Ok(Some(g)),
        None => anyhow::bail!("route {net} needs a --gateway of its address family in TAP mode"),
    }
}
