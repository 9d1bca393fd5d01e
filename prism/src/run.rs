//! `prism run`: flags onto a `prism_engine::Builder`, routes, serve until a signal, tear down.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use prism_engine::{Engine, Outside, Source};
use tracing::info;

use crate::cli::RunArgs;
use crate::policy::{Claim, Families, Policy};
use crate::routes::Routes;

/// Ends a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often the stats file is rewritten while Prism runs.
const STATS_EVERY: Duration = Duration::from_secs(5);

/// How long open connections get to close after SIGINT or SIGTERM before they are reset.
const STOP_GRACE: Duration = Duration::from_secs(1);

pub(crate) async fn run(args: RunArgs) -> Result<()> {
    let stop = crate::stats::stop_signal()?;
    let device_dir = std::path::Path::new("/sys/class/net").join(&args.tun);
    if device_dir.exists() {
        anyhow::bail!(
            "a network interface named {} exists already; choose another --tun, or remove it \
             (ip link del {})",
            args.tun,
            args.tun
        );
    }
    let families = Families {
        v4: args.default_route
            || args
                .routes
                .iter()
                .any(|n| n.prefix_len() == 0 && n.addr().is_ipv4()),
        v6: args.default_route
            || args
                .routes
                .iter()
                .any(|n| n.prefix_len() == 0 && n.addr().is_ipv6()),
    };
    if !args.excludes.is_empty() && !families.any() {
        anyhow::bail!(
            "--exclude bypasses the default route: add --default-route (or --route 0.0.0.0/0)"
        );
    }
    let mut routes = Routes::new()?;
    let mut policy = Policy::new(routes.handle());
    // Only a run that installs the rules claims them and sweeps what a killed run left: while
    // another run holds the claim, the rules are that run's, in use. (Leftovers whose TUN is
    // gone route nothing: their table is empty, and lookups fall through to main.)
    let _claim = if families.any() {
        let claim = Claim::take()?;
        let swept = policy.sweep().await?;
        if swept > 0 {
            info!(
                removed = swept,
                "removed policy rules and routes an earlier run of prism left behind"
            );
        }
        Some(claim)
    } else {
        None
    };
    let mark = args.fwmark.unwrap_or(crate::policy::TABLE);
    let mut engine = builder(&args, families.any().then_some(mark))
        .await?
        .start()
        .await?;
    let device = engine
        .device()
        .cloned()
        .context("the engine opened no device")?;
    let served = serve_until_signal(
        &args,
        &mut engine,
        &device,
        &mut routes,
        &mut policy,
        families,
        mark,
        stop,
    )
    .await;
    // Rules and routes first, while the device still exists; closing the TUN would take its
    // routes with it.
    policy.remove_all().await;
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

#[allow(
    clippy::too_many_arguments,
    reason = "the run's parts, each owned by `run` for its teardown"
)]
async fn serve_until_signal(
    args: &RunArgs,
    engine: &mut Engine,
    device: &prism_engine::Device,
    routes: &mut Routes,
    policy: &mut Policy,
    families: Families,
    mark: u32,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<()> {
    for &net in args.routes.iter().filter(|n| n.prefix_len() > 0) {
        let via = next_hop(args, net)?;
        routes.add(net, device.index, &device.name, via).await?;
    }
    if families.any() {
        let via = if args.tap {
            args.gateways.clone()
        } else {
            Vec::new()
        };
        policy
            .install(families, device.index, &via, mark, &args.excludes)
            .await?;
        crate::policy::describe(families, mark, &args.excludes);
    } else if args.routes.iter().any(|n| n.prefix_len() > 0) {
        let escape = match (&args.bind_interface, args.fwmark) {
            (Some(interface), _) => format!("bound to {interface}"),
            (None, Some(mark)) => format!("marked {mark:#x} (a rule of yours must route it)"),
            (None, None) => "routed by the main table".to_owned(),
        };
        info!(
            "Prism's own sockets are {escape}; an upstream inside the routed prefixes would \
             loop and is refused"
        );
    }
    info!(
        tun = %device.name,
        upstream = %args.upstream,
        handshake = %args.handshake,
        routes = ?args.routes,
        "serving"
    );
    let metrics = match args.metrics {
        Some(listen) => {
            let observer = engine.observer();
            let sampler: crate::metrics::Sampler = Arc::new(move || {
                let observer = observer.clone();
                Box::pin(async move {
                    let mut samples = crate::metrics::engine_samples(&observer.stats().await);
                    // Tasks alive in the process's runtime: what a leak of connections or
                    // relays would show first (the soak watches it).
                    let tasks = tokio::runtime::Handle::current()
                        .metrics()
                        .num_alive_tasks();
                    samples.push(("tasks".to_owned(), tasks as u64, true));
                    samples
                })
            });
            Some(crate::metrics::serve(listen, sampler).await?)
        }
        None => None,
    };
    let _metrics = metrics.map(AbortOnDrop);
    let mut refresh = tokio::time::interval(STATS_EVERY);
    refresh.tick().await;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            signal = &mut stop => {
                info!(signal, "stopping");
                break;
            }
            // The failure is reported once the engine is stopped.
            _ = engine.failed() => break,
            _ = refresh.tick(), if args.stats_file.is_some() => {
                if let Some(path) = &args.stats_file {
                    crate::stats::write(path, &engine.stats().await.to_json());
                }
            }
        }
    }
    Ok(())
}

/// Every flag, onto the engine's builder.
/// `mark`: the firewall mark every socket Prism opens carries, when the default route goes
/// through the TUN.
async fn builder(args: &RunArgs, mark: Option<u32>) -> Result<prism_engine::Builder> {
    let mut source = if args.tap {
        Source::tap(&args.tun)
    } else {
        Source::tun(&args.tun)
    };
    source = source.queue_len(args.tun_queue);
    if args.no_offload {
        source = source.without_offload();
    }
    let mut settings = args.settings();
    if mark.is_some() {
        settings.fwmark = mark;
    }
    Ok(settings.builder(source, Outside::default()).await?)
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
