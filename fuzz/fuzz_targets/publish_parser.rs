//! basic.publish is decoded by hand on the hot path: fuzz it alone.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut p = vec![0u8, 60, 0, 40, 0, 0];
    p.extend_from_slice(data);
    let _ = warren::protocol::channel::fuzz_publish(&bytes::Bytes::from(p));
});
