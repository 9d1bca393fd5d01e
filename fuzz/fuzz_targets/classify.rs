//! Packet classification: any bytes, checksums verified or trusted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prism_trap::{Checksums, classify_with};

fuzz_target!(|data: &[u8]| {
    let verified = classify_with(data, Checksums::Verify);
    let trusted = classify_with(data, Checksums::Trusted);
    // Verifying checksums can only refuse more, never decide differently.
    if let Ok(packet) = verified {
        assert_eq!(trusted, Ok(packet));
    }
});
