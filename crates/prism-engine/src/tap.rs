//! On an Ethernet source: the task between the device's frames and the stack's IP packets,
//! with a `prism_l2::Gateway` deciding what each frame is. The gateway itself is pure and lives
//! in prism-l2.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prism_device::{BATCH, Link};
use prism_l2::{Counters, Gateway, Ingress};
use tokio::task::JoinHandle;

/// The gateway's counters, as last published by the bridge.
pub(crate) type SharedCounters = Arc<Mutex<Counters>>;

/// Runs the bridge until either side closes. `frames` is the engine's end of the device's
/// link, `packets` the device's end of the stack's.
pub(crate) fn bridge(
    mut gateway: Gateway,
    frames: Link,
    packets: Link,
    counters: SharedCounters,
) -> JoinHandle<()> {
    let (mut frames_in, frames_out) = frames.split();
    let (mut packets_in, packets_out) = packets.split();
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        let mut outgoing = Vec::with_capacity(BATCH);
        // Once the stack is gone, frames from the device are no longer taken in, but what the
        // stack sent last is still wrapped and written.
        let mut stack_gone = false;
        loop {
            tokio::select! {
                n = frames_in.recv_many(&mut batch, BATCH), if !stack_gone => {
                    if n == 0 {
                        break;
                    }
                    for frame in batch.drain(..) {
                        match gateway.ingress(&frame) {
                            Ingress::Packet(packet) => {
                                if packets_out.send(packet).await.is_err() {
                                    stack_gone = true;
                                    break;
                                }
                            }
                            Ingress::Reply(reply) => {
                                if frames_out.send(Bytes::from(reply)).await.is_err() {
                                    return;
                                }
                            }
                            Ingress::Dropped(_) => {}
                        }
                    }
                    batch.clear();
                }
                n = packets_in.recv_many(&mut outgoing, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    for packet in outgoing.drain(..) {
                        if let Some(frame) = gateway.egress(&packet) {
                            if frames_out.send(Bytes::from(frame)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            if let Ok(mut shared) = counters.lock() {
                *shared = gateway.counters();
            }
        }
        if let Ok(mut shared) = counters.lock() {
            *shared = gateway.counters();
        }
    })
}
