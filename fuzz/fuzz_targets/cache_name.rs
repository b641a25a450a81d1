//! The cache's request routing: `route::parse_path`, `validate_name`,
//! `validate_tag`, `parse_digest` (all public). No panic; whatever is
//! accepted is safe to use as a relative path: no empty, `.` or `..`
//! components, no leading `/`, at most 255 bytes; tags match
//! `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
#![no_main]
use ember_cache::route::{ManifestRef, Target, parse_path, validate_name, validate_tag};
use libfuzzer_sys::fuzz_target;

fn check_name(name: &str, input: &str) {
    assert!(!name.is_empty() && name.len() <= 255, "{input:?}: name {name:?}");
    for c in name.split('/') {
        assert!(
            !c.is_empty() && c != "." && c != ".." && !c.contains('\\') && !c.contains('\0'),
            "{input:?}: name {name:?} has component {c:?}"
        );
    }
}

fn check_tag(t: &str, input: &str) {
    let b = t.as_bytes();
    assert!(!b.is_empty() && b.len() <= 128, "{input:?}: tag {t:?}");
    assert!(b[0].is_ascii_alphanumeric() || b[0] == b'_', "{input:?}: tag {t:?}");
    assert!(
        b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-')),
        "{input:?}: tag {t:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if validate_name(s).is_ok() {
        check_name(s, s);
    }
    if validate_tag(s).is_ok() {
        check_tag(s, s);
    }
    // As a request path, with and without the /v2/ prefix supplied.
    for p in [s.to_string(), format!("/v2/{s}")] {
        match parse_path(&p) {
            Ok(Target::Base) => {}
            Ok(Target::Manifest { name, reference }) => {
                check_name(&name, &p);
                if let ManifestRef::Tag(t) = &reference {
                    check_tag(t, &p);
                }
            }
            Ok(Target::Blob { name, digest }) => {
                check_name(&name, &p);
                assert!(digest.hex().bytes().all(|b| b.is_ascii_hexdigit()));
            }
            Err(_) => {}
        }
    }
});
