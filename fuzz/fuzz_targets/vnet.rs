//! The virtio-net unframing of an offloading TUN's frames: any bytes as a frame, and any
//! packet framed with a plain header comes back as it was.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prism_device::vnet;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let _ = vnet::to_plain(&Bytes::copy_from_slice(data), &mut out);
    out.clear();
    let framed = vnet::frame(data);
    if vnet::to_plain(&framed, &mut out).is_ok() {
        assert_eq!(out, [Bytes::copy_from_slice(data)]);
    }
});
