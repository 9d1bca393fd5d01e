//! `xtask tun-forward`: the bare TUN-to-TUN forwarder the bench measures as the ceiling for
//! anything that reads and writes a TUN on this machine: a few lines of tun-rs copying packets
//! between a TUN in the client namespace and one moved into the server namespace, with or
//! without offload (virtio-net headers, GSO split on read, GRO coalescing on write).

use std::net::Ipv4Addr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::BytesMut;
use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::netns::run as sh;

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
        sh("ip", &["route", "add", "10.200.0.0/16", "dev", CLIENT_TUN])?;
        let b = Arc::new(open(SERVER_TUN, None)?);
        // The descriptor keeps working after the device moves to the other namespace.
        sh("ip", &["link", "set", SERVER_TUN, "netns", server_ns])?;
        let ns = |args: &str| {
            let mut all = vec!["-n", server_ns];
            all.extend(args.split_whitespace());
            sh("ip", &all)
        };
        ns(&format!("addr add 10.99.0.254/24 dev {SERVER_TUN}"))?;
        ns(&format!("link set {SERVER_TUN} up"))?;
        let copy = |from: Arc<AsyncDevice>, to: Arc<AsyncDevice>| async move {
            if offload {
                copy_offload(&from, &to).await
            } else {
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = from.recv(&mut buf).await?;
                    to.send(&buf[..n]).await?;
                }
            }
        };
        let (ab, ba) = (copy(Arc::clone(&a), Arc::clone(&b)), copy(b, a));
        tokio::select! {
            r = ab => r,
            r = ba => r,
        }
    })
}

async fn copy_offload(from: &AsyncDevice, to: &AsyncDevice) -> Result<()> {
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65535];
    let mut bufs = vec![vec![0u8; 1500]; IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let mut gro = GROTable::default();
    let mut out: Vec<BytesMut> = Vec::with_capacity(IDEAL_BATCH_SIZE);
    loop {
        let n = from
            .recv_multiple(&mut original, &mut bufs, &mut sizes, 0)
            .await?;
        out.clear();
        for (buf, &size) in bufs.iter().zip(&sizes).take(n) {
            // Room to grow: send_multiple coalesces segments into the first buffer of a flow.
            let mut packet = BytesMut::with_capacity(VIRTIO_NET_HDR_LEN + 65536);
            packet.resize(VIRTIO_NET_HDR_LEN, 0);
            packet.extend_from_slice(&buf[..size]);
            out.push(packet);
        }
        to.send_multiple(&mut gro, &mut out, VIRTIO_NET_HDR_LEN)
            .await?;
    }
}
