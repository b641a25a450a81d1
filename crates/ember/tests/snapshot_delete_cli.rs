//! Checkpoints go with their deployment, end to end: `ember control` and
//! two `ember node` processes, a real registry, overlayfs, runc, CRIU and
//! the static exec agent. Both nodes capture the deployment's start-up;
//! the deployment is deleted while one node is stopped. The running node
//! removes its checkpoint at its next heartbeat; the stopped one removes
//! its own when it comes back. A re-deploy of the name without
//! `--snapshot` is no snapshot deployment, so it keeps no checkpoint
//! alive either.
//!
//! Needs root, runc, a working CRIU (scripts/install-criu.sh) and the
//! static agent (crates/ember-agent/build-static.sh); fails with a pointer
//! to them when one is missing, unless EMBER_TEST_SKIP_PRIVILEGED=1.

mod common;

use common::cluster::*;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// The snapshot manifests in a node's store.
fn manifests(node_root: &Path) -> Vec<String> {
    std::fs::read_dir(node_root.join("snapshots/manifests"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Files (artifacts, unpacked copies) under a node's `snapshots/` other
/// than manifests.
fn snapshot_files(node_root: &Path) -> usize {
    ["snapshots/blobs", "snapshots/unpacked"]
        .iter()
        .map(|d| {
            std::fs::read_dir(node_root.join(d))
                .map(|d| d.count())
                .unwrap_or(0)
        })
        .sum()
}

/// Whether node `id` reports a checkpoint of deployment `slow`.
fn reports_checkpoint(url: &str, id: &str) -> bool {
    let nodes: serde_json::Value =
        serde_json::from_str(&client_ok(url, &["nodes", "--json"])).expect("nodes JSON");
    nodes.as_array().into_iter().flatten().any(|n| {
        n["id"] == id
            && n["inventory"]["snapshots"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|k| k.as_str().is_some_and(|k| k.starts_with("d.slow.")))
            })
    })
}

#[test]
fn deleting_a_deployment_removes_its_checkpoints_on_every_node() {
    let Some(agent) = snapshot_prerequisites() else {
        return;
    };
    let bed = busybox_bed();
    let (tmp, url, image) = (bed.tmp.path(), bed.url.as_str(), bed.image.as_str());
    let (r1, r2) = (tmp.join("n1"), tmp.join("n2"));
    // One slot each: two runs at once land one on each node.
    let mut n1 = start_node(&r1, url, "n1", 1, &agent, &["--heartbeat", "1"]);
    let _n2 = start_node(&r2, url, "n2", 1, &agent, &["--heartbeat", "1"]);
    let startup = parked_startup(1);
    let deploy = |snapshot: bool| {
        let mut args = vec!["deploy"];
        if snapshot {
            args.push("--snapshot");
        }
        args.extend(["slow", image, "--", "/bin/sh", "-c", &startup]);
        client_ok(url, &args);
    };
    deploy(true);

    // Runs until both nodes hold a checkpoint (each captures its own the
    // first time it runs the deployment).
    let deadline = Instant::now() + Duration::from_secs(300);
    while !(reports_checkpoint(url, "n1") && reports_checkpoint(url, "n2")) {
        assert!(
            Instant::now() < deadline,
            "both nodes never held a checkpoint: {}",
            client_ok(url, &["nodes", "--json"])
        );
        let u = url.to_string();
        let other = std::thread::spawn(move || run_once(&u, &["b"]));
        let (_, _, run) = run_once(url, &["a"]);
        assert_eq!(run["state"], "succeeded", "{run}");
        let (_, _, run) = other.join().expect("second run");
        assert_eq!(run["state"], "succeeded", "{run}");
    }
    assert_eq!(manifests(&r1).len(), 1, "{:?}", manifests(&r1));
    assert_eq!(manifests(&r2).len(), 1, "{:?}", manifests(&r2));

    // n1 is away while the deployment is deleted and the name re-deployed
    // without snapshots.
    n1.stop();
    let out = client_ok(url, &["deploy", "--delete", "slow"]);
    assert!(out.contains("deleted slow"), "{out}");
    deploy(false);

    // n2 drops its checkpoint (manifest, artifact and unpacked copy) at its
    // next heartbeat and stops reporting it.
    wait_for("n2 to remove its checkpoint", 30, || {
        manifests(&r2).is_empty() && snapshot_files(&r2) == 0
    });
    wait_for("n2 to stop reporting it", 30, || {
        !reports_checkpoint(url, "n2")
    });
    // n1's is still on its disk while it is away.
    assert_eq!(manifests(&r1).len(), 1);

    // Back, n1 is told at its first heartbeat and converges.
    let _n1 = start_node(&r1, url, "n1", 1, &agent, &["--heartbeat", "1"]);
    wait_for("n1 to remove its checkpoint", 30, || {
        manifests(&r1).is_empty() && snapshot_files(&r1) == 0
    });
    wait_for("n1 to stop reporting it", 30, || {
        !reports_checkpoint(url, "n1")
    });

    // A second delete finds nothing.
    client_ok(url, &["deploy", "--delete", "slow"]);
    let out = client(url, &["deploy", "--delete", "slow"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("slow"), "{err}");
}

/// `ember node --criu` and `ember deploy --delete` are in their `--help`
/// (with `EMBER_CRIU` as the fallback named).
#[test]
fn help_shows_the_node_criu_setting_and_the_delete() {
    for (args, needles) in [
        (["node", "--help"], &["--criu <PATH>", "EMBER_CRIU"][..]),
        (["deploy", "--help"], &["--delete", "checkpoints"][..]),
    ] {
        let out = std::process::Command::new(ember())
            .args(args)
            .output()
            .expect("spawn");
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        for n in needles {
            assert!(help.contains(n), "{args:?} lacks {n:?}:\n{help}");
        }
    }
}
