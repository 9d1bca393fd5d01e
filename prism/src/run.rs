//! `prism run`: set up, serve until a signal, tear down.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use prism_device::Link;
use prism_device::tun::{Layer, Tun, TunConfig};
use prism_stack::{Config, HandshakePolicy, PortPolicy, Stack};
use prism_tunnel::{Direct, Socks5, serve};
use tracing::info;

use crate::cli::{RunArgs, UpstreamArg};
use crate::routes::Routes;

/// Packets buffered each way between the TUN and the stack.
const LINK_QUEUE: usize = 4096;

pub(crate) async fn run(args: RunArgs) -> Result<()> {
    let stop = crate::stats::stop_signal()?;
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
        offload: !args.no_offload,
    })?;
    let mut routes = Routes::new()?;
    let served = serve_until_signal(&args, tun, &mut routes, stop).await;
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
    let offload = tun.offload();
    let tun_refused = tun.refused_writes();
    info!(offload, "TUN open");
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
    config.offload = offload;
    config.addresses = args
        .addresses
        .iter()
        .map(|n| (stack_address(n.addr()), n.prefix_len()))
        .collect();
    // The stack reads the device's link itself (the TUN, or the TAP's gateway); what is not TCP
    // it diverts to the relay task, which sends to the device through the same link.
    let (stack_end, device_end) = Link::pair(LINK_QUEUE);
    let to_device = stack_end.sender();
    let (mut stack, requests) = Stack::new(config, stack_end);
    let others = stack.divert_other_protocols(LINK_QUEUE);
    let counters = stack.counters();
    let l2_counters = crate::tap::SharedCounters::default();
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
    let relay_task = tokio::spawn(prism_relay::run_relay(
        others,
        to_device,
        relay,
        relay_mtu,
        offload,
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
    relay_task.abort();
    if let Some(keepalive) = keepalive {
        keepalive.abort();
    }
    let snapshot = counters.snapshot();
    info!(counters = %snapshot, "stopped");
    if let Some(path) = &args.stats_file {
        let l2 = match args.tap {
            true => l2_counters.lock().map(|c| c.fields()).unwrap_or_default(),
            false => Vec::new(),
        };
        let fields = crate::stats::prefixed("", snapshot.fields())
            .chain(crate::stats::prefixed("relay_", relay_counters.fields()))
            .chain(crate::stats::prefixed("l2_", l2))
            .chain([(
                "tun_refused_writes".to_owned(),
                tun_refused.load(std::sync::atomic::Ordering::Relaxed),
            )]);
        crate::stats::write(path, fields);
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
