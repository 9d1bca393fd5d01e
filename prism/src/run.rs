//! `prism run`: flags onto a `prism_engine::Builder`, routes, serve until a signal, tear down.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use prism_engine::{
    Engine, GatewayConfig, HandshakePolicy, Mac, Outside, PortPolicy, Source, StackConfig,
};
use tracing::info;

use crate::cli::{RunArgs, UpstreamArg};
use crate::routes::Routes;

/// How long open connections get to close after SIGINT or SIGTERM before they are reset.
const STOP_GRACE: Duration = Duration::from_secs(1);

pub(crate) async fn run(args: RunArgs) -> Result<()> {
    let stop = crate::stats::stop_signal()?;
    let mut engine = builder(&args).await?.start().await?;
    let device = engine
        .device()
        .cloned()
        .context("the engine opened no device")?;
    let mut routes = Routes::new()?;
    let served = serve_until_signal(&args, &mut engine, &device, &mut routes, stop).await;
    // Routes first, while the device still exists; closing the TUN would take them with it.
    routes.remove_all().await;
    let stopped = engine.shutdown(STOP_GRACE).await;
    if let Ok(stats) = &stopped {
        if let Some(path) = &args.stats_file {
            crate::stats::write(path, &stats.to_json());
        }
    }
    served?;
    stopped.map(|_| ()).map_err(|error| {
        anyhow::Error::new(error).context(format!("device {} failed", device.name))
    })
}

async fn serve_until_signal(
    args: &RunArgs,
    engine: &mut Engine,
    device: &prism_engine::Device,
    routes: &mut Routes,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<()> {
    for &net in &args.routes {
        let via = next_hop(args, net)?;
        routes.add(net, device.index, &device.name, via).await?;
    }
    let upstream = match &args.upstream {
        UpstreamArg::Direct => "direct".to_owned(),
        UpstreamArg::Socks5(url) => format!("socks5 {}", url.proxy()),
    };
    info!(
        tun = %device.name,
        %upstream,
        handshake = %args.handshake,
        routes = ?args.routes,
        "serving"
    );
    tokio::select! {
        signal = stop => info!(signal, "stopping"),
        // The error itself comes back from `shutdown`.
        _ = engine.failed() => {}
    }
    Ok(())
}

/// Every flag, onto the engine's builder.
async fn builder(args: &RunArgs) -> Result<prism_engine::Builder> {
    let mut source = if args.tap {
        Source::tap(&args.tun)
    } else {
        Source::tun(&args.tun)
    };
    source = source.queue_len(args.tun_queue);
    if args.no_offload {
        source = source.without_offload();
    }

    let mut config = StackConfig::default();
    config.max_half_open = args.max_half_open;
    config.max_pending = args.max_pending;
    config.tcp_rx_buffer = args.tcp_buffer_kib as usize * 1024;
    config.tcp_tx_buffer = config.tcp_rx_buffer;

    let outside = Outside {
        bind_interface: args.bind_interface.clone(),
        fwmark: args.fwmark,
        ..Outside::default()
    };
    let mut builder = Engine::builder(source)
        .mtu(args.mtu)
        .stack(config)
        .handshake(handshake_policy(args))
        .connect_timeout(Duration::from_secs(args.connect_timeout))
        .outside(outside)
        .relay_path_mtu(args.relay_path_mtu);
    for net in &args.addresses {
        builder = builder.address(net.addr(), net.prefix_len());
    }
    builder = match &args.upstream {
        UpstreamArg::Direct => builder.direct(),
        UpstreamArg::Socks5(url) => builder.socks5(url.clone()),
    };
    if let Some((host, port)) = &args.relay {
        let keys = crate::relay::keys(args.relay_key.as_deref(), args.relay_key_file.as_deref())?;
        let server = tokio::net::lookup_host((host.as_str(), *port))
            .await
            .with_context(|| format!("cannot resolve the relay {host}:{port}"))?
            .next()
            .with_context(|| format!("the relay {host} has no address"))?;
        builder = builder.udp_relay(server, keys);
    }
    if args.tap {
        builder = builder.gateway(gateway(args));
    }
    Ok(builder)
}

fn gateway(args: &RunArgs) -> GatewayConfig {
    let mut config = GatewayConfig {
        mac: Mac(args.gateway_mac.unwrap_or(prism_engine::DEFAULT_MAC.0)),
        ..GatewayConfig::default()
    };
    for gateway in &args.gateways {
        match gateway {
            IpAddr::V4(a) => config.ipv4.push(*a),
            IpAddr::V6(a) => config.ipv6.push(*a),
        }
    }
    config.proxy_arp = args.proxy_arp;
    config
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
