//! [`RelayServer`]: the far end of Prism's relay, as one handle: a TUN for the clients'
//! packets (the server's kernel routes and NATs them onward) and the UDP server, with its
//! counters and a stop. What `prism relay-server` runs.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prism_device::tun::{Layer, Tun, TunConfig};
use prism_relay::{Counters, Server, ServerAuth, Snapshot};
use tokio::task::JoinHandle;
use tracing::info;

use crate::Error;

/// Packets buffered each way between the TUN and the server.
const LINK_QUEUE: usize = 4096;

/// A running relay server.
#[derive(Debug)]
pub struct RelayServer {
    counters: Arc<Counters>,
    tun_refused: Arc<AtomicU64>,
    server: JoinHandle<()>,
    pump: Option<JoinHandle<io::Result<()>>>,
}

impl RelayServer {
    /// Opens the TUN `tun` with `addresses` (their prefixes must cover the clients'
    /// addresses) and a kernel queue of `queue_len` packets, and listens for clients on
    /// `listen`.
    pub async fn start(
        listen: SocketAddr,
        tun: &str,
        addresses: &[(IpAddr, u8)],
        mtu: u16,
        queue_len: u32,
        auth: impl Into<ServerAuth>,
    ) -> Result<RelayServer, Error> {
        let device = Tun::open(&TunConfig {
            name: tun.to_owned(),
            mtu,
            addresses: addresses.to_vec(),
            layer: Layer::Ip,
            queue_len,
            // With offload the kernel hands over super-packets (split before sealing) and takes
            // runs of one flow's packets coalesced into one write: a fraction of the system
            // calls per packet, as wireguard-go does.
            offload: true,
        })?;
        let counters = Arc::new(Counters::default());
        let server = Server::bind(listen, auth, Arc::clone(&counters))
            .await
            .map_err(|source| Error::Listen { listen, source })?
            .with_prefixes(addresses.to_vec());
        let tun_refused = device.refused_writes();
        info!(
            tun = %tun,
            offload = device.framing() == prism_device::Framing::Virtio,
            udp_offload = device.udp_offload(),
            "relay server's TUN open"
        );
        let (link, pump) = device.spawn_coalescing(LINK_QUEUE);
        Ok(RelayServer {
            counters,
            tun_refused,
            server: tokio::spawn(server.run(link)),
            pump: Some(pump),
        })
    }

    /// The counters now.
    pub fn stats(&self) -> Snapshot {
        self.counters.snapshot()
    }

    /// The live counters, readable from another task (a metrics endpoint).
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// Packets the TUN refused to take (or handed over in a frame that could not be made
    /// plain), live and readable from another task; not among [`RelayServer::stats`], which
    /// are the relay's own counters.
    pub fn tun_refused_writes(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.tun_refused)
    }

    /// Resolves only if the TUN fails or closes.
    pub async fn failed(&mut self) -> Error {
        let Some(pump) = self.pump.as_mut() else {
            return std::future::pending().await;
        };
        let ended = pump.await;
        self.pump = None;
        match ended {
            Ok(Ok(())) => Error::Device(io::Error::other("the device closed")),
            Ok(Err(error)) => Error::Device(error),
            Err(_) => Error::Task("device"),
        }
    }

    /// Stops the server and closes the TUN; the final counters.
    pub async fn shutdown(mut self) -> Snapshot {
        self.server.abort();
        let _ = (&mut self.server).await;
        if let Some(pump) = self.pump.take() {
            pump.abort();
            let _ = pump.await;
        }
        self.counters.snapshot()
    }
}

impl Drop for RelayServer {
    fn drop(&mut self) {
        self.server.abort();
        if let Some(pump) = &self.pump {
            pump.abort();
        }
    }
}
