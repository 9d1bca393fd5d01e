//! `prism run`: set up, serve until a signal, tear down.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use prism_device::Link;
use prism_device::tun::{Tun, TunConfig};
use prism_stack::{Config, HandshakePolicy, PortPolicy, Snapshot, Stack};
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
        routes.add(net, index, &name).await?;
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
    let (stack_end, device_end) = Link::pair(LINK_QUEUE);
    let (stack, requests) = Stack::new(config, stack_end);
    let counters = stack.counters();
    let pump = tun.spawn(device_end);
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
    let snapshot = counters.snapshot();
    info!(counters = %snapshot, "stopped");
    if let Some(path) = &args.stats_file {
        if let Err(error) = std::fs::write(path, stats_json(&snapshot)) {
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
fn stats_json(snapshot: &Snapshot) -> String {
    let fields: Vec<String> = snapshot
        .fields()
        .into_iter()
        .map(|(name, value)| format!("\"{name}\": {value}"))
        .collect();
    format!("{{{}}}\n", fields.join(", "))
}
