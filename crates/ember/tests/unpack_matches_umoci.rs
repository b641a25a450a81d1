//! `ember image unpack` must produce exactly what `umoci unpack` produces
//! for the same image from the same registry: paths, types, contents,
//! modes, owners, symlink targets, device numbers and hardlink groups,
//! file by file.

mod common;

use common::*;
use ember_testkit::{fixtures, registry::Registry};
use std::process::Command;

fn tokio() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[test]
fn every_fixture_unpacks_like_umoci() {
    let registry = Registry::start().expect("start registry");
    let rt = tokio();
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    for name in [
        "busybox",
        "layers",
        "big",
        "multi",
        "index",
        "docker",
        "docker-list",
        // Device nodes, as layers have them (umoci creates them as root).
        "devices",
        // A real Debian image: debootstrap's root filesystem, eight
        // character devices in /dev.
        "debian",
    ] {
        let fx = fixtures::build_cached(name).expect("build fixture");
        let repo = format!("ember/{name}");
        rt.block_on(fixtures::push(&fx, &registry.url(), &repo, "latest"))
            .expect("push fixture");
        let reference = format!("{}/{repo}:latest", registry.addr());
        ember_ok(&root, &["pull", "-q", &reference]);

        let ours = tmp.path().join(format!("{name}-ember"));
        ember_ok(
            &root,
            &["image", "unpack", &reference, ours.to_str().expect("utf-8")],
        );

        // umoci 0.4 cannot read zstd layers, so skopeo converts the image to
        // an OCI layout with gzip layers (same diff_ids, same content).
        let layout = tmp.path().join(format!("{name}-oci"));
        sh_ok(Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-compress",
            "--dest-compress-format",
            "gzip",
            &format!("docker://{reference}"),
            &format!("oci:{}:latest", layout.display()),
        ]));
        let bundle = tmp.path().join(format!("{name}-umoci"));
        sh_ok(Command::new("umoci").args([
            "unpack",
            "--image",
            &format!("{}:latest", layout.display()),
            bundle.to_str().expect("utf-8"),
        ]));
        assert_same_tree(&ours, &bundle.join("rootfs"), name);
        // Keep disk use bounded: the big fixtures are hundreds of MB.
        let _ = std::fs::remove_dir_all(&ours);
        let _ = std::fs::remove_dir_all(&bundle);
        let _ = std::fs::remove_dir_all(&layout);
    }
}
