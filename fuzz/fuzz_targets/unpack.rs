//! `ember_store::unpack::unpack` on arbitrary bytes as a tar, in Overlay
//! mode and twice in Flatten mode; see `common/unpack_harness.rs` for the
//! invariants. Raw bytes rarely get past tar header checksums; the
//! `unpack_gen` target builds valid tars from the input instead.
#![no_main]
#[path = "../common/unpack_harness.rs"]
mod harness;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| harness::run(data));
