//! `WWW-Authenticate` parsing: no panic, and a Bearer challenge always has a
//! realm key in the input.
#![no_main]
use ember_registry::{Challenge, parse_challenge};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Some(Challenge::Bearer { .. }) = parse_challenge(s) {
        assert!(s.to_ascii_lowercase().contains("realm"), "{s:?}");
    }
});
