//! `prism relay-server`: the far end of the relay. (The client end is the engine's; see
//! `prism_engine::Builder::udp_relay`.)

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use prism_engine::{RelayServer, RelayServerAuth};
use tracing::{info, warn};

use crate::cli::RelayServerArgs;

/// `prism relay-server`: a TUN for the clients' packets and the UDP server, until a signal.
pub(crate) async fn serve(args: RelayServerArgs) -> Result<()> {
    let stop = crate::stats::stop_signal()?;
    let auth = match &args.private_key_file {
        Some(file) => {
            if args.peers.is_empty() {
                anyhow::bail!(
                    "--private-key-file needs at least one --peer KEY,CIDR: no client could \
                     connect"
                );
            }
            let private = prism_engine::read_private_key(file)?;
            info!(public_key = %private.public_key(), peers = args.peers.len(), "relay identities");
            RelayServerAuth::Identities {
                private,
                peers: args.peers.clone(),
            }
        }
        None => {
            let keys =
                prism_engine::relay_keys(args.key.key.as_deref(), args.key.key_file.as_deref())?
                    .context(
                        "the relay server needs a key: --key-file FILE (or PRISM_RELAY_KEY) with \
                         the clients' pre-shared key, or --private-key-file FILE with a --peer \
                         per client",
                    )?;
            RelayServerAuth::PreShared(keys)
        }
    };
    let addresses: Vec<_> = args
        .addresses
        .iter()
        .map(|n| (n.addr(), n.prefix_len()))
        .collect();
    let mut server = RelayServer::start(
        args.listen,
        &args.tun,
        &addresses,
        args.mtu,
        args.tun_queue,
        auth,
    )
    .await?;
    info!(listen = %args.listen, tun = %args.tun, "relay server");
    warn_unless_forwarding(&addresses);
    let metrics = match args.metrics {
        Some(listen) => {
            let counters = server.counters();
            let tun_refused = server.tun_refused_writes();
            let sampler: crate::metrics::Sampler = Arc::new(move || {
                let mut samples: Vec<_> = counters
                    .snapshot()
                    .fields()
                    .into_iter()
                    .map(|(name, value)| (format!("relay_{name}"), value, false))
                    .collect();
                samples.push((
                    "tun_refused_writes".to_owned(),
                    tun_refused.load(std::sync::atomic::Ordering::Relaxed),
                    false,
                ));
                Box::pin(async move { samples })
            });
            Some(crate::metrics::serve(listen, sampler).await?)
        }
        None => None,
    };
    let failed = tokio::select! {
        signal = stop => {
            info!(signal, "stopping");
            None
        }
        error = server.failed() => Some(error),
    };
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    let tun_refused = server.tun_refused_writes();
    let counters = server.shutdown().await;
    let tun_refused = tun_refused.load(std::sync::atomic::Ordering::Relaxed);
    if let Some(path) = &args.stats_file {
        let mut fields: serde_json::Map<String, serde_json::Value> = counters
            .fields()
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value.into()))
            .collect();
        fields.insert("tun_refused_writes".to_owned(), tun_refused.into());
        crate::stats::write(path, &serde_json::Value::Object(fields).to_string());
    }
    match failed {
        Some(error) => Err(anyhow::Error::new(error).context(format!("TUN {} failed", args.tun))),
        None => Ok(()),
    }
}

/// Warns, for each family the server has addresses in, when this host does not forward it:
/// the clients' packets would reach the host's own addresses and go no further, silently.
/// Prism leaves forwarding and NAT to the host's administrator, as wg-quick does.
fn warn_unless_forwarding(addresses: &[(IpAddr, u8)]) {
    let ipv4 = (
        "/proc/sys/net/ipv4/ip_forward",
        "net.ipv4.ip_forward",
        addresses.iter().any(|(address, _)| address.is_ipv4()),
    );
    let ipv6 = (
        "/proc/sys/net/ipv6/conf/all/forwarding",
        "net.ipv6.conf.all.forwarding",
        addresses.iter().any(|(address, _)| address.is_ipv6()),
    );
    for (path, name, served) in [ipv4, ipv6] {
        if served && std::fs::read_to_string(path).is_ok_and(|value| value.trim() == "0") {
            warn!(
                "{name} is 0: the clients' packets reach this host and go no further; to relay \
                 them on, sysctl -w {name}=1 and NAT them out (see the README's relay server)"
            );
        }
    }
}
