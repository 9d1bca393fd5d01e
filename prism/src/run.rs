//! `prism run`: flags onto a `prism_engine::Builder`, routes, serve until a signal, tear down.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use prism_engine::{Engine, Outside, Source};
use tracing::info;

use crate::cli::RunArgs;
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
    let failure = engine.failure();
    let stats = engine.shutdown(STOP_GRACE).await;
    if let Some(path) = &args.stats_file {
        crate::stats::write(path, &stats.to_json());
    }
    served?;
    match failure {
        Some(failure) => anyhow::bail!("device {} failed: {failure}", device.name),
        None => Ok(()),
    }
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
    info!(
        tun = %device.name,
        upstream = %args.upstream,
        handshake = %args.handshake,
        routes = ?args.routes,
        "serving"
    );
    tokio::select! {
        signal = stop => info!(signal, "stopping"),
        // The failure is reported once the engine is stopped.
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
    Ok(args.settings().builder(source, Outside::default()).await?)
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
