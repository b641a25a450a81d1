//! `ember store verify [--repair]` on a real store filled from a real
//! registry: a file changed in a layer, a file deleted from a layer, a
//! truncated blob, and torn layers (record missing, record cut short) are
//! each reported; `--repair` removes them and the images that used them;
//! pulling again restores the images and the store verifies clean.

mod common;

use common::*;
use ember_testkit::fixtures;
use std::path::{Path, PathBuf};

fn verify(root: &Path, args: &[&str]) -> (i32, serde_json::Value) {
    let mut all = vec!["store", "verify", "--json"];
    all.extend_from_slice(args);
    let out = run_ember(root, &all);
    let code = out.status.code().expect("exit code");
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify output is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, json)
}

/// The layer diff_ids (hex) of the image `name` refers to, lowest first.
fn layers_of(root: &Path, name: &str) -> Vec<String> {
    let ix: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("index.json")).expect("index"))
            .expect("index json");
    let manifest = ix["refs"][name].as_str().expect("ref in index");
    ix["images"][manifest]["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            l["diff_id"]
                .as_str()
                .expect("diff_id")
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect()
}

/// The largest regular file under `dir` (deterministic: ties by path).
fn a_file(dir: &Path) -> PathBuf {
    let mut best: Option<(u64, PathBuf)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            let m = std::fs::symlink_metadata(&p).expect("lstat");
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file()
                && m.len() > 0
                && best
                    .as_ref()
                    .is_none_or(|(n, q)| m.len() > *n || (m.len() == *n && p < *q))
            {
                best = Some((m.len(), p));
            }
        }
    }
    best.expect("a non-empty file in the layer").1
}

fn kinds(report: &serde_json::Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = report["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().expect("kind").to_string(),
                p["object"].as_str().expect("object").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn verify_finds_tampering_and_torn_layers_and_repair_lets_a_pull_restore_them() {
    let registry = registry_with(&["busybox", "layers"]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    let r = |n: &str| format!("{}/ember/{n}:latest", registry.addr());
    for n in ["busybox", "layers"] {
        ember_ok(&root, &["pull", "-q", &r(n)]);
    }
    // The root is for root only: layers hold device nodes.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&root).expect("root").permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "store root mode {mode:o}");

    let (code, clean) = verify(&root, &[]);
    assert_eq!(code, 0, "fresh store: {clean}");
    assert_eq!(kinds(&clean), vec![], "{clean}");
    let layers = layers_of(&root, &r("layers"));
    assert_eq!(layers.len(), 4, "the layers fixture has four layers");
    assert_eq!(clean["layers_checked"], 4, "{clean}");
    let human = ember_ok(&root, &["store", "verify"]);
    assert!(human.contains("no problems"), "{human}");

    // 1. Change one byte of a file in the base layer (shared with busybox),
    //    keeping its size.
    let layer_dir = |hex: &str| root.join("layers").join(hex);
    let changed = a_file(&layer_dir(&layers[0]));
    let mut bytes = std::fs::read(&changed).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&changed, &bytes).expect("tamper");
    // 2. Delete a file from the second layer.
    let deleted = a_file(&layer_dir(&layers[1]));
    std::fs::remove_file(&deleted).expect("delete");
    // 3. A torn commit: the third layer's record is missing ...
    std::fs::remove_file(root.join("trees").join(&layers[2])).expect("remove record");
    // ... and the fourth's is cut short.
    let rec = root.join("trees").join(&layers[3]);
    let len = std::fs::metadata(&rec).expect("record").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&rec)
        .expect("open record")
        .set_len(len / 2)
        .expect("truncate record");
    // 4. Truncate a blob: busybox's config.
    let ix: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("index.json")).expect("index"))
            .expect("json");
    let bb_manifest = ix["refs"][r("busybox")].as_str().expect("busybox ref");
    let config = ix["images"][bb_manifest]["config"]
        .as_str()
        .expect("config")
        .to_string();
    let blob = root
        .join("blobs/sha256")
        .join(config.trim_start_matches("sha256:"));
    let blen = std::fs::metadata(&blob).expect("blob").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&blob)
        .expect("open blob")
        .set_len(blen - 10)
        .expect("truncate blob");

    let (code, found) = verify(&root, &[]);
    assert_eq!(code, 1, "problems left must exit 1: {found}");
    let sha = |h: &str| format!("sha256:{h}");
    let mut want = vec![
        ("blob-corrupt".to_string(), config.clone()),
        ("layer-modified".to_string(), sha(&layers[0])),
        ("layer-modified".to_string(), sha(&layers[1])),
        ("record-missing".to_string(), sha(&layers[2])),
        ("record-torn".to_string(), sha(&layers[3])),
    ];
    want.sort();
    assert_eq!(kinds(&found), want, "{found}");
    // The details name what changed.
    let detail_of = |hex: &str| -> String {
        found["problems"]
            .as_array()
            .expect("problems")
            .iter()
            .find(|p| p["object"] == sha(hex))
            .map(|p| p["detail"].to_string())
            .expect("problem for the layer")
    };
    let rel = |p: &Path, hex: &str| {
        p.strip_prefix(layer_dir(hex))
            .expect("inside the layer")
            .display()
            .to_string()
    };
    let d0 = detail_of(&layers[0]);
    assert!(
        d0.contains(&rel(&changed, &layers[0])) && d0.contains("content differs"),
        "{d0}"
    );
    let d1 = detail_of(&layers[1]);
    assert!(
        d1.contains(&format!("{}: missing", rel(&deleted, &layers[1]))),
        "{d1}"
    );
    // Nothing was removed without --repair.
    assert!(layer_dir(&layers[0]).is_dir());
    assert!(blob.exists());

    let (code, repaired) = verify(&root, &["--repair"]);
    assert_eq!(code, 0, "everything repaired: {repaired}");
    assert_eq!(kinds(&repaired), want, "{repaired}");
    assert!(
        repaired["problems"]
            .as_array()
            .expect("problems")
            .iter()
            .all(|p| p["repaired"] == true),
        "{repaired}"
    );
    let mut removed: Vec<String> = repaired["images_removed"]
        .as_array()
        .expect("images_removed")
        .iter()
        .map(|v| v.as_str().expect("name").to_string())
        .collect();
    removed.sort();
    assert_eq!(removed, vec![r("busybox"), r("layers")], "{repaired}");
    for l in &layers {
        assert!(!layer_dir(l).exists(), "layer {l} still there");
        assert!(
            !root.join("trees").join(l).exists(),
            "record {l} still there"
        );
    }
    assert!(!blob.exists(), "corrupt blob still there");
    let (code, after) = verify(&root, &[]);
    assert_eq!((code, kinds(&after)), (0, vec![]), "{after}");
    let images: serde_json::Value =
        serde_json::from_str(&ember_ok(&root, &["images", "--json"])).expect("json");
    assert_eq!(images.as_array().expect("array").len(), 0, "{images}");

    // The next pulls fetch everything again, and the store is clean.
    for n in ["busybox", "layers"] {
        ember_ok(&root, &["pull", "-q", &r(n)]);
    }
    let (code, again) = verify(&root, &[]);
    assert_eq!((code, kinds(&again)), (0, vec![]), "{again}");
    assert_eq!(again["layers_checked"], 4, "{again}");
    assert_eq!(
        std::fs::read(&changed).expect("restored file").len(),
        bytes.len()
    );
    assert_ne!(std::fs::read(&changed).expect("restored file"), bytes);
    assert!(deleted.exists(), "deleted file restored");
    let out = tmp.path().join("layers-rootfs");
    ember_ok(
        &root,
        &[
            "image",
            "unpack",
            &r("layers"),
            out.to_str().expect("utf-8"),
        ],
    );
    fixtures::verify_rootfs(&out, &fixtures::layers_expectations()).expect("restored image");
}

#[test]
fn orphans_are_reported_and_repaired() {
    let registry = registry_with(&["busybox"]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    let r = format!("{}/ember/busybox:latest", registry.addr());
    ember_ok(&root, &["pull", "-q", &r]);
    // A container writing and deleting over the layers changes nothing in
    // them (overlayfs copies up), so the store still verifies clean.
    ember_ok(
        &root,
        &[
            "run",
            &r,
            "--",
            "sh",
            "-c",
            "echo x > /bin/new && rm /etc/passwd && touch /etc/group",
        ],
    );
    let (code, clean) = verify(&root, &[]);
    assert_eq!((code, kinds(&clean)), (0, vec![]), "after a run: {clean}");
    // What a crash between the renames and the index write leaves.
    let orphan = "ab".repeat(32);
    std::fs::create_dir(root.join("layers").join(&orphan)).expect("orphan layer");
    std::fs::write(root.join("layers").join(&orphan).join("f"), b"x").expect("file");
    let lone = "cd".repeat(32);
    std::fs::write(root.join("trees").join(&lone), b"ember-tree 1\nend 0\n").expect("record");
    let (code, found) = verify(&root, &[]);
    assert_eq!(code, 1, "{found}");
    assert_eq!(
        kinds(&found),
        vec![
            ("orphan-layer".to_string(), orphan.clone()),
            ("orphan-record".to_string(), lone.clone())
        ],
        "{found}"
    );
    let (code, repaired) = verify(&root, &["--repair"]);
    assert_eq!(code, 0, "{repaired}");
    assert_eq!(
        repaired["images_removed"].as_array().expect("array").len(),
        0
    );
    assert!(!root.join("layers").join(&orphan).exists());
    assert!(!root.join("trees").join(&lone).exists());
    let (code, after) = verify(&root, &[]);
    assert_eq!((code, kinds(&after)), (0, vec![]), "{after}");
    // The image was left alone and still runs from its layers.
    ember_ok(
        &root,
        &[
            "image",
            "unpack",
            &r,
            tmp.path().join("bb").to_str().expect("utf-8"),
        ],
    );
}

#[test]
fn help_documents_the_exit_codes() {
    let out = std::process::Command::new(ember())
        .args(["store", "verify", "--help"])
        .output()
        .expect("spawn");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in ["--repair", "--json", "Exit status", "0 if", "1 if", "125"] {
        assert!(help.contains(needle), "help lacks {needle:?}:\n{help}");
    }
}
