//! [`run_split`]: the task that applies [`route`](crate::route) to every packet from the
//! device: TCP to the stack, the rest to the relay (or, without one, an ICMP "administratively
//! prohibited" back), and merges what the stack and the relay send back to the device. Packets
//! pass through as the same `Bytes`.

use std::sync::Arc;

use bytes::Bytes;
use prism_device::{BATCH, Link, vnet};
use tracing::debug;

use crate::split::too_big;
use crate::{Counters, PacketTunnel, Route, prohibited, route};

/// Runs until the device or the stack goes away. `device` is the far end of the device
/// adapter's link, `stack` the far end of the stack's. `relay_mtu` is the largest packet the
/// relay carries whole; larger ones that may not be fragmented are answered with ICMP.
/// `offload`: the device reads and writes virtio-net frames ([`prism_device::vnet`]); the
/// stack gets them as they are, the relay plain packets.
pub async fn run_split<T: PacketTunnel>(
    device: Link,
    stack: Link,
    relay: Option<Arc<T>>,
    relay_mtu: usize,
    offload: bool,
    counters: Arc<Counters>,
) {
    let (mut from_device, to_device) = device.split();
    let (mut from_stack, to_stack) = stack.split();
    // What the split itself sends to the device (ICMP errors, relayed packets) is plain.
    let framed = move |packet: Bytes| {
        if offload {
            vnet::frame(&packet)
        } else {
            packet
        }
    };
    let inbound = {
        let to_device = to_device.clone();
        let relay = relay.clone();
        let counters = Arc::clone(&counters);
        async move {
            let mut batch = Vec::with_capacity(BATCH);
            let mut plain = Vec::new();
            while from_device.recv_many(&mut batch, BATCH).await > 0 {
                for frame in batch.drain(..) {
                    let skip = if offload { vnet::HEADER_LEN } else { 0 };
                    let Some(packet) = frame.get(skip..) else {
                        Counters::bump(&counters.drop_malformed);
                        continue;
                    };
                    match route(packet) {
                        Route::Stack => {
                            Counters::bump(&counters.to_stack);
                            if to_stack.send(frame).await.is_err() {
                                return;
                            }
                        }
                        Route::Relay => {
                            let Some(relay) = &relay else {
                                if let Some(error) = prohibited(packet) {
                                    Counters::bump(&counters.prohibited);
                                    if to_device.send(framed(Bytes::from(error))).await.is_err() {
                                        return;
                                    }
                                }
                                continue;
                            };
                            if offload {
                                // Partial checksums finished, super-packets (UDP_SEGMENT)
                                // segmented: the far end gets ordinary packets.
                                if vnet::to_plain(&frame, &mut plain).is_err() {
                                    Counters::bump(&counters.drop_malformed);
                                    continue;
                                }
                            } else {
                                plain.push(frame);
                            }
                            for packet in plain.drain(..) {
                                if let Some(mtu) = too_big(&packet, relay_mtu) {
                                    Counters::bump(&counters.too_big);
                                    let error = prism_trap::too_big(&packet, mtu);
                                    if let Some(error) = error {
                                        if to_device.send(framed(Bytes::from(error))).await.is_err()
                                        {
                                            return;
                                        }
                                    }
                                } else if let Err(error) = relay.send(packet).await {
                                    debug!(%error, "relay send failed; packet dropped");
                                }
                            }
                        }
                        Route::Local => Counters::bump(&counters.drop_link_local),
                        Route::Malformed => Counters::bump(&counters.drop_malformed),
                    }
                }
            }
        }
    };
    let outbound = {
        let to_device = to_device.clone();
        async move {
            while let Some(packet) = from_stack.recv().await {
                if to_device.send(packet).await.is_err() {
                    return;
                }
            }
        }
    };
    let returning = async move {
        let Some(relay) = relay else {
            return std::future::pending().await;
        };
        loop {
            match relay.recv().await {
                Ok(packet) => {
                    if to_device.send(framed(packet)).await.is_err() {
                        return;
                    }
                }
                Err(error) => debug!(%error, "relay receive failed"),
            }
        }
    };
    tokio::select! {
        () = inbound => {}
        () = outbound => {}
        () = returning => {}
    }
}
