//! `ember images`, `rmi` and `gc`: names, LRU eviction under a budget, and
//! images in use by a running container are never removed.

mod common;

use common::*;
use std::process::{Command, Stdio};

#[test]
fn lru_gc_respects_budget_and_running_containers() {
    let registry = registry_with(&["busybox", "layers", "index"]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    let r = |n: &str| format!("{}/ember/{n}:latest", registry.addr());
    for n in ["busybox", "layers", "index"] {
        ember_ok(&root, &["pull", "-q", &r(n)]);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let images: serde_json::Value =
        serde_json::from_str(&ember_ok(&root, &["images", "--json"])).expect("json");
    assert_eq!(images.as_array().expect("array").len(), 3);

    // Keep `busybox` (the least recently used) busy with a container.
    let mut busy = Command::new(ember())
        .arg("--root")
        .arg(&root)
        .args(["run", &r("busybox"), "--", "sh", "-c", "echo up; sleep 30"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut buf = [0u8; 3];
    std::io::Read::read_exact(busy.stdout.as_mut().expect("stdout"), &mut buf).expect("started");
    // `ember run` touched busybox, so it is now the most recent; make
    // `layers` the oldest by running nothing else and use a budget of 1
    // byte: everything not in use must go.
    let report: serde_json::Value = serde_json::from_str(&ember_ok(
        &root,
        &["gc", "--max-bytes", "1", "--low", "0", "--json"],
    ))
    .expect("json");
    assert_eq!(report["kept_in_use"], 1, "{report}");
    assert_eq!(
        report["removed_images"].as_array().expect("array").len(),
        2,
        "{report}"
    );
    let images: serde_json::Value =
        serde_json::from_str(&ember_ok(&root, &["images", "--json"])).expect("json");
    let images = images.as_array().expect("array");
    assert_eq!(images.len(), 1);
    assert!(
        images[0]["names"][0]
            .as_str()
            .expect("name")
            .contains("busybox")
    );
    assert_eq!(images[0]["in_use"], true);
    // rmi of an image in use is refused.
    let out = run_ember(&root, &["rmi", &r("busybox")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    let _ = busy.kill();
    let _ = busy.wait();
    // The killed `ember run` left its container running (runc and the
    // container outlive a SIGKILLed parent) and its claim behind; `ember gc`
    // recovers the leftovers, and a dead claim no longer protects the image.
    ember_ok(&root, &["gc"]);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&*root.to_string_lossy()),
        "gc left mounts under the store"
    );
    let left = std::fs::read_dir(root.join("runc"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "gc left runc state");
    ember_ok(&root, &["rmi", &r("busybox")]);
    let images: serde_json::Value =
        serde_json::from_str(&ember_ok(&root, &["images", "--json"])).expect("json");
    assert!(images.as_array().expect("array").is_empty());
    let layers = std::fs::read_dir(root.join("layers"))
        .expect("layers")
        .count();
    assert_eq!(layers, 0, "layers left after removing every image");
}

#[test]
fn rmi_keeps_shared_layers_and_gc_honours_watermarks() {
    let registry = registry_with(&["busybox", "layers"]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    let r = |n: &str| format!("{}/ember/{n}:latest", registry.addr());
    ember_ok(&root, &["pull", "-q", &r("busybox")]);
    ember_ok(&root, &["pull", "-q", &r("layers")]);
    // `layers` shares busybox's base layer: 4 layer dirs in all, not 5.
    assert_eq!(
        std::fs::read_dir(root.join("layers")).expect("dir").count(),
        4
    );
    ember_ok(&root, &["rmi", &r("layers")]);
    assert_eq!(
        std::fs::read_dir(root.join("layers")).expect("dir").count(),
        1
    );
    // busybox still runs from the shared layer.
    assert_eq!(
        ember_ok(&root, &["run", &r("busybox")]),
        "hello from ember\n"
    );
    // Under the budget nothing is evicted.
    let report: serde_json::Value =
        serde_json::from_str(&ember_ok(&root, &["gc", "--max-bytes", "1G", "--json"]))
            .expect("json");
    assert!(
        report["removed_images"]
            .as_array()
            .expect("array")
            .is_empty()
    );
    let out = run_ember(&root, &["gc", "--max-bytes", "1M", "--low", "2M"]);
    assert!(!out.status.success(), "low above high must be refused");
}
