//! `prism relay-server`: the far end of the relay. (The client end is the engine's; see
//! `prism_engine::Builder::udp_relay`.)

use std::sync::Arc;

use anyhow::{Context, Result};
use prism_device::tun::{Layer, Tun, TunConfig};
use prism_relay::{Counters, Server};
use tracing::info;

use crate::cli::RelayServerArgs;

/// `prism relay-server`: a TUN for the clients' packets and the UDP server, until a signal.
pub(crate) async fn serve(args: RelayServerArgs) -> Result<()> {
    let stop = crate::stats::stop_signal()?;
    let keys = prism_engine::relay_keys(args.key.key.as_deref(), args.key.key_file.as_deref())?;
    let tun = Tun::open(&TunConfig {
        name: args.tun.clone(),
        mtu: args.mtu,
        addresses: args
            .addresses
            .iter()
            .map(|n| (n.addr(), n.prefix_len()))
            .collect(),
        layer: Layer::Ip,
        queue_len: prism_device::tun::DEFAULT_QUEUE,
        // The server relays whole packets between clients and its TUN; plain is what both
        // speak.
        offload: false,
    })?;
    let counters = Arc::new(Counters::default());
    let server = Server::bind(args.listen, keys, Arc::clone(&counters))
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let (server_end, pump) = tun.spawn(4096);
    let relay = tokio::spawn(server.run(server_end));
    info!(listen = %args.listen, tun = %args.tun, "relay server");
    tokio::select! {
        signal = stop => info!(signal, "stopping"),
        ended = pump => anyhow::bail!("TUN {} stopped: {ended:?}", args.tun),
    }
    relay.abort();
    if let Some(path) = &args.stats_file {
        let fields: serde_json::Map<String, serde_json::Value> = counters
            .snapshot()
            .fields()
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value.into()))
            .collect();
        crate::stats::write(path, &serde_json::Value::Object(fields).to_string());
    }
    Ok(())
}
