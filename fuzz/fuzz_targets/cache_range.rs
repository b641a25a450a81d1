//! The cache's `Range` parser (`route::parse_range`, public) and
//! `RangeSpec::resolve`: no panic; a resolved range is non-empty and inside
//! the blob. Input: 8 bytes of blob size (LE), then the header as UTF-8.
#![no_main]
use ember_cache::route::{RangeSpec, parse_range};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let mut size = u64::from_le_bytes(data[..8].try_into().unwrap());
    // Favour small sizes so that ranges overlap blobs often.
    if size & 1 == 0 {
        size = (size >> 1) % 4096;
    }
    let Ok(h) = std::str::from_utf8(&data[8..]) else { return };
    let Some(spec) = parse_range(h) else { return };
    if let RangeSpec::FromTo(a, Some(b)) = spec {
        assert!(a <= b, "{h:?} -> {spec:?}");
    }
    if let Ok(r) = spec.resolve(size) {
        assert!(r.start < r.end, "{h:?} size {size} -> empty/inverted {r:?}");
        assert!(r.end <= size, "{h:?} size {size} -> past the end {r:?}");
    }
});
