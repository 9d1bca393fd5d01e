//! `xtask tun-forward`: the bare TUN-to-TUN forwarder the bench measures as the ceiling for
//! anything that reads and writes a TUN on this machine: a few lines of tun-rs copying packets
//! between a TUN in the client namespace and one moved into the server namespace, with or
//! without offload (virtio-net headers: GSO super-packets pass through whole).

use std::net::Ipv4Addr;
use std::sync::Arc;

use anyhow::{Context, Result};
use tun_rs::{AsyncDevice, DeviceBuilder, VIRTIO_NET_HDR_LEN};

use crate::netns::run as sh;
use crate::topology::TARGET_NET_V4;

/// The forwarder's devices.
pub(crate) const CLIENT_TUN: &str = "pfwda";
pub(crate) const SERVER_TUN: &str = "pfwdb";

pub(crate) fn run(client_ns: &str, server_ns: &str, offload: bool) -> Result<()> {
    crate::netns::enter(client_ns)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let open = |name: &str, address: Option<Ipv4Addr>| {
            let mut builder = DeviceBuilder::new()
                .name(name)
                .mtu(1500)
                .offload(offload)
                .tx_queue_len(4096);
            if let Some(a) = address {
                builder = builder.ipv4(a, 24, None);
            }
            builder
                .build_async()
                .with_context(|| format!("cannot open TUN {name}"))
        };
        let a = Arc::new(open(CLIENT_TUN, Some(Ipv4Addr::new(10, 99, 0, 1)))?);
        sh("ip", &["route", "add", TARGET_NET_V4, "dev", CLIENT_TUN])?;
        let b = Arc::new(open(SERVER_TUN, None)?);
        eprintln!(
            "forwarder: offload {offload}; tcp_gso {} / {}, udp_gso {} / {}",
            a.tcp_gso(),
            b.tcp_gso(),
            a.udp_gso(),
            b.udp_gso()
        );
        // The descriptor keeps working after the device moves to the other namespace.
        sh("ip", &["link", "set", SERVER_TUN, "netns", server_ns])?;
        let ns = |args: &str| {
            let mut all = vec!["-n", server_ns];
            all.extend(args.split_whitespace());
            sh("ip", &all)
        };
        ns(&format!("addr add 10.99.0.254/24 dev {SERVER_TUN}"))?;
        ns(&format!("link set {SERVER_TUN} up"))?;
        // With offload both devices speak virtio-net headers, so a GSO super-packet read from
        // one (header included) can be written to the other unchanged: no splitting and no
        // coalescing, the fastest a forwarder can be.
        let copy = |from: Arc<AsyncDevice>, to: Arc<AsyncDevice>| async move {
            let mut buf = vec![0u8; VIRTIO_NET_HDR_LEN + 65536];
            loop {
                let n = from.recv(&mut buf).await?;
                to.send(&buf[..n]).await?;
            }
        };
        let (ab, ba) = (copy(Arc::clone(&a), Arc::clone(&b)), copy(b, a));
        let ended: std::io::Result<()> = tokio::select! {
            r = ab => r,
            r = ba => r,
        };
        Ok(ended?)
    })
}
