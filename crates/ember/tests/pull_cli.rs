//! `ember pull` reference forms and platforms against a real registry.

mod common;

use common::*;

#[test]
fn digests_tags_platforms_and_docker_media_types() {
    let registry = registry_with(&["busybox", "index", "docker-list"]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    let a = registry.addr();

    // By tag, then by the digest that tag resolved to: the same image.
    let digest = ember_ok(&root, &["pull", "-q", &format!("{a}/ember/busybox:latest")]);
    let digest = digest.trim();
    assert!(digest.starts_with("sha256:"), "{digest}");
    let by_digest = format!("{a}/ember/busybox@{digest}");
    let again = ember_ok(&root, &["pull", "-q", &by_digest]);
    assert_eq!(again.trim(), digest);
    assert_eq!(ember_ok(&root, &["run", &by_digest]), "hello from ember\n");

    // An index: the host's platform by default, another with --platform.
    let index = format!("{a}/ember/index:latest");
    let out = ember_ok(&root, &["run", &index, "--", "cat", "/platform"]);
    assert_eq!(out.trim(), "linux/amd64");
    let arm = tmp.path().join("arm");
    ember_ok(&arm, &["pull", "-q", "--platform", "linux/arm64", &index]);
    let flat = tmp.path().join("arm-rootfs");
    ember_ok(
        &arm,
        &["image", "unpack", &index, flat.to_str().expect("utf-8")],
    );
    let platform = std::fs::read_to_string(flat.join("platform")).expect("platform file");
    assert_eq!(platform.trim(), "linux/arm64");
    let out = run_ember(&arm, &["pull", "--platform", "linux/s390x", &index]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("linux/s390x") && err.contains("linux/arm64"),
        "{err}"
    );

    // A Docker schema 2 manifest list.
    let out = ember_ok(
        &root,
        &[
            "run",
            &format!("{a}/ember/docker-list:latest"),
            "--",
            "true",
        ],
    );
    assert_eq!(out, "");

    // A digest that does not exist, and a malformed one.
    let missing = format!("{a}/ember/busybox@sha256:{}", "0".repeat(64));
    let out = run_ember(&root, &["pull", &missing]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    let out = run_ember(&root, &["pull", &format!("{a}/ember/busybox@sha256:xyz")]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid"));
}
