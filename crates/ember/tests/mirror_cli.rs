//! `ember pull --mirror` when the mirror breaks off mid-blob: the mirror
//! answers 200 with the blob's full Content-Length and closes after half
//! the body (what a cache that crashes or runs out of disk mid-blob looks
//! like). The pull must take the rest of that blob from the origin, as it
//! already takes everything from the origin when the mirror is down, and
//! the image must run.

mod common;

use common::*;
use ember_testkit::proxy::CuttingMirror;

#[test]
fn mirror_cut_mid_blob_falls_back_to_the_origin() {
    let origin = registry_with(&["busybox"]);
    let mirror = CuttingMirror::start(&origin.addr(), 4096).expect("cutting mirror");
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("node");
    let image = format!("{}/ember/busybox:latest", origin.addr());
    ember_ok(&root, &["pull", "-q", "--mirror", &mirror.url(), &image]);
    assert!(mirror.cuts() >= 1, "the mirror cut nothing");
    assert_eq!(ember_ok(&root, &["run", &image]), "hello from ember\n");
    // The rest of the cut blob came from the origin as a Range request.
    assert!(
        origin
            .requests()
            .iter()
            .any(|r| r.method == "GET" && r.path.contains("/blobs/") && r.status == 206),
        "no ranged GET reached the origin:\n{}",
        origin.access_log()
    );
}
