//! `Digest` parsing: no panic; round trip; `hex()` is lowercase hex of the
//! algorithm's length.
#![no_main]
use ember_oci::Digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(d) = s.parse::<Digest>() else { return };
    let printed = d.to_string();
    assert_eq!(printed, s, "Display differs from the accepted input");
    let again: Digest = printed.parse().expect("printed digest parses");
    assert_eq!(again, d);
    let hex = d.hex();
    assert!(hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "hex {hex:?}");
    let want = match d.algorithm() {
        "sha256" => 64,
        "sha512" => 128,
        other => panic!("algorithm {other:?}"),
    };
    assert_eq!(hex.len(), want);
});
