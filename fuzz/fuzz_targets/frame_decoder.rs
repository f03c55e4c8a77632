//! Arbitrary bytes through the frame cutter, method parser and content
//! header parser: must never panic, whatever a client sends.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = warren::protocol::frame::fuzz_decode(data, 131_072);
    let _ = warren::protocol::frame::fuzz_decode(data, 4096);
});
