//! `Reference` parsing: no panic; a parsed reference prints to a string that
//! parses back to an equal reference; registry and repository are non-empty
//! and have no empty, `.` or `..` components.
#![no_main]
use ember_oci::Reference;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(r) = s.parse::<Reference>() else { return };
    let printed = r.to_string();
    let again: Reference = printed
        .parse()
        .unwrap_or_else(|e| panic!("{s:?} parsed, but its Display {printed:?} does not: {e}"));
    assert_eq!(again, r, "round trip of {s:?} via {printed:?}");
    assert_eq!(again.to_string(), printed, "Display not stable for {s:?}");
    let (reg, repo) = (r.registry(), r.repository());
    assert!(!reg.is_empty(), "empty registry from {s:?}");
    assert!(!repo.is_empty(), "empty repository from {s:?}");
    for c in repo.split('/') {
        assert!(!c.is_empty() && c != "." && c != "..", "bad repository component {c:?} from {s:?}");
    }
    assert!(!reg.contains('/'), "registry {reg:?} has a '/' (from {s:?})");
    assert!(reg != "." && reg != ".." && !reg.contains(".."), "registry {reg:?} from {s:?}");
    assert!(r.name().len() <= 255, "name longer than 255 from {s:?}");
    // Exercise the remaining accessors.
    let _ = (r.api_host(), r.manifest_reference(), r.is_loopback_registry());
});
