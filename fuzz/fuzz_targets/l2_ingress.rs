//! The Ethernet gateway: a sequence of frames in (learning peers on the way), and packets out.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prism_l2::{Config, Gateway};

fuzz_target!(|input: (Vec<Vec<u8>>, Vec<u8>)| {
    let (frames, packet) = input;
    let mut gateway = Gateway::new(Config {
        proxy_arp: true,
        ..Config::default()
    });
    for frame in frames {
        let _ = gateway.ingress(&Bytes::from(frame));
    }
    let _ = gateway.egress(&packet);
    let counters = gateway.counters();
    let _ = counters.fields();
});
