//! [`run_relay`]: the task that takes the packets the stack diverts (everything that is not
//! TCP, see `Stack::divert_other_protocols`) and applies [`route`](crate::route) to them: through
//! the relay, or, without one, an ICMP "administratively prohibited" back; link business and
//! junk are counted and dropped. What comes back through the relay goes to the device.
//!
//! TCP never passes here: the stack reads the device's link itself, so a TCP packet crosses one
//! channel on its way in and one on its way out.

use std::sync::Arc;

use bytes::Bytes;
use prism_device::{BATCH, Diverted, Framing, vnet};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, warn};

use crate::split::too_big;
use crate::{Counters, PacketTunnel, Route, dns_query, prohibited, route};

/// Runs until the stack stops diverting (it stopped) or the device is gone. `diverted` comes
/// from `Stack::divert_other_protocols`. `relay_mtu` is the largest packet the relay carries
/// whole; larger ones that may not be fragmented are answered with ICMP. On a link of
/// virtio-net frames ([`prism_device::vnet`]) the relay still gets plain packets, and what goes
/// to the device is framed.
///
/// `dns`, when given, takes every DNS query (UDP to port 53, see [`dns_query`]) instead of the
/// relay, as a plain packet: the engine answers it over TCP through the upstream.
pub async fn run_relay<T: PacketTunnel>(
    diverted: Diverted,
    relay: Option<Arc<T>>,
    relay_mtu: usize,
    dns: Option<mpsc::Sender<Bytes>>,
    counters: Arc<Counters>,
) {
    let Diverted {
        packets: mut others,
        to_device,
        framing,
    } = diverted;
    let offload = framing == Framing::Virtio;
    // What this task sends to the device (ICMP errors, relayed packets) is plain.
    let framed = move |packet: Bytes| framing.frame(packet);
    let outbound = {
        let to_device = to_device.clone();
        let relay = relay.clone();
        let counters = Arc::clone(&counters);
        async move {
            let (mut frames, mut plain, mut batch) = (Vec::new(), Vec::new(), Vec::new());
            while others.recv_many(&mut frames, BATCH).await > 0 {
                for frame in frames.drain(..) {
                    let skip = if offload { vnet::HEADER_LEN } else { 0 };
                    let Some(packet) = frame.get(skip..) else {
                        Counters::bump(&counters.drop_malformed);
                        continue;
                    };
                    match route(packet) {
                        Route::Relay => {}
                        Route::Local => {
                            Counters::bump(&counters.drop_link_local);
                            continue;
                        }
                        // The stack keeps TCP; anything else here is junk.
                        Route::Stack | Route::Malformed => {
                            Counters::bump(&counters.drop_malformed);
                            continue;
                        }
                    }
                    if let Some(dns) = dns.as_ref().filter(|_| dns_query(packet)) {
                        match dns.try_send(frame.slice(skip..)) {
                            Ok(()) => Counters::bump(&counters.dns_queries),
                            Err(_) => Counters::bump(&counters.drop_dns_busy),
                        }
                        continue;
                    }
                    if relay.is_none() {
                        if let Some(error) = prohibited(packet) {
                            Counters::bump(&counters.prohibited);
                            if to_device.send(framed(Bytes::from(error))).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    if offload {
                        // Partial checksums finished, super-packets (UDP_SEGMENT) segmented: the
                        // far end gets ordinary packets.
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
                            if let Some(error) = prism_trap::too_big(&packet, mtu) {
                                if to_device.send(framed(Bytes::from(error))).await.is_err() {
                                    return;
                                }
                            }
                        } else {
                            batch.push(packet);
                        }
                    }
                }
                if let Some(relay) = relay.as_ref().filter(|_| !batch.is_empty()) {
                    if let Err(error) = relay.send_many(&mut batch).await {
                        debug!(%error, "relay send failed; packets dropped");
                    }
                    batch.clear();
                }
            }
        }
    };
    // Its own task: the two directions run on two threads when the runtime has them. Ended
    // with this one, however this one ends (dropped, too).
    let mut returning = AbortOnDropHandle::new(tokio::spawn(async move {
        let Some(relay) = relay else {
            return std::future::pending().await;
        };
        let mut packets = Vec::new();
        loop {
            if let Err(error) = relay.recv_many_framed(&mut packets, framing).await {
                debug!(%error, "relay receive failed");
            }
            for packet in packets.drain(..) {
                if to_device.send(packet).await.is_err() {
                    return;
                }
            }
        }
    }));
    tokio::select! {
        () = outbound => {}
        ended = &mut returning => {
            if let Err(error) = ended {
                warn!("the relay's receiving task failed ({error}); relayed packets stop");
            }
        }
    }
}
