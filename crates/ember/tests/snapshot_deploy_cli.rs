//! Snapshot deployments through the control plane, end to end: `ember
//! control` + `ember node` as processes, a real registry, overlayfs, runc,
//! CRIU and the static exec agent. The first run of `ember deploy
//! --snapshot` starts fresh while the node captures its start-up; later
//! runs are restored copies, each with its own seed and entropy.
//!
//! Needs root, runc, a working CRIU (scripts/install-criu.sh) and the
//! static agent (crates/ember-agent/build-static.sh); fails with a pointer
//! to them when one is missing, unless EMBER_TEST_SKIP_PRIVILEGED=1.

mod common;

use common::cluster::*;
use common::*;
use std::time::{Duration, Instant};

/// A control plane over a busybox registry and one node `n1` (2 slots,
/// root `<bed>/node`) that prepares no copies ahead, or `None` when the
/// snapshot prerequisites are missing and the run skips them explicitly.
fn spareless_node() -> Option<(Bed, std::path::PathBuf, Proc)> {
    let agent = snapshot_prerequisites()?;
    let bed = busybox_bed();
    let node_root = bed.tmp.path().join("node");
    let node = start_node(
        &node_root,
        &bed.url,
        "n1",
        2,
        &agent,
        &["--snapshot-spares", "0"],
    );
    Some((bed, node_root, node))
}

#[test]
fn a_snapshot_deployment_starts_fresh_once_then_restores_independent_copies() {
    // No prepared copies: every run restores on demand, as before spares
    // (snapshot_spares_cli.rs tests them).
    let Some((bed, node_root, _node)) = spareless_node() else {
        return;
    };
    let (url, image) = (bed.url.as_str(), bed.image.as_str());

    deploy_snapshot(url, "slow", image, &parked_startup(1));

    // The first run: no checkpoint on the node yet, so a fresh start
    // (which does not wait for the capture beside it).
    let (req, _, first) = run_once(url, &["first"]);
    assert_eq!(req["restored"], false, "{req}");
    assert_eq!(req["argv"], serde_json::json!(["first"]), "{req}");
    assert_eq!(first["state"], "succeeded", "{first}");
    assert!(first["times"]["snapshot_restored"].is_null(), "{first}");
    let note = first["times"]["snapshot_note"].as_str().unwrap_or_default();
    assert!(note.contains("no checkpoint"), "{first}");

    // The node reports the checkpoint once it is captured. This is the
    // test waiting, not a run.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let nodes = client_ok(url, &["nodes", "--json"]);
        if nodes.contains("\"d.slow.") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node never reported a checkpoint: {nodes}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Later runs restore, each its own copy: own request, seed and
    // entropy.
    let mut seeds = Vec::new();
    let mut randoms = Vec::new();
    for n in 0..2 {
        let arg = format!("run{n}");
        let (req, random, run) = run_once(url, &["hello", &arg]);
        assert_eq!(req["restored"], true, "{req} {run}");
        assert_eq!(req["argv"], serde_json::json!(["hello", arg]), "{req}");
        assert_eq!(run["state"], "succeeded", "{run}");
        let t = &run["times"];
        assert!(t["snapshot_restored"].is_number(), "{run}");
        assert!(t["snapshot_note"].is_null(), "{run}");
        assert!(
            t["image_ready"].as_u64() <= t["snapshot_restored"].as_u64()
                && t["snapshot_restored"].as_u64() <= t["runner_ready"].as_u64(),
            "{run}"
        );
        eprintln!("restored run {n}: times {t}");
        seeds.push(req["seed"].as_str().expect("seed").to_owned());
        randoms.push(random);
    }
    assert_ne!(seeds[0], seeds[1]);
    assert_ne!(randoms[0], randoms[1]);

    // The breakdown shows the restore phase for the restored runs.
    let stats: serde_json::Value =
        serde_json::from_str(&client_ok(url, &["runs", "--stats", "--json"])).expect("stats");
    assert_eq!(stats["restore"]["n"], 2, "{stats}");
    let timings = client_ok(url, &["runs", "--timings"]);
    assert!(timings.contains("restore"), "{timings}");

    // A corrupt checkpoint is refused by its digest, and the run starts
    // fresh instead of failing, saying why.
    let blobs: Vec<_> = std::fs::read_dir(node_root.join("snapshots/blobs"))
        .expect("the node's artifacts")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    let mut bytes = std::fs::read(&blobs[0]).expect("read artifact");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blobs[0], &bytes).expect("write artifact");
    let (req, _, run) = run_once(url, &["after-corruption"]);
    assert_eq!(req["restored"], false, "{req}");
    assert_eq!(run["state"], "succeeded", "{run}");
    let note = run["times"]["snapshot_note"].as_str().unwrap_or_default();
    assert!(note.contains("digest"), "{run}");

    // Each restored copy is gone after its run.
    let left: Vec<_> = std::fs::read_dir(node_root.join("snapshot/containers"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "snapshot runners left: {left:?}");
}

/// One run of deployment `name` (`ember submit --wait --json`): its
/// request line, what it printed after it, and its record.
fn run_of(url: &str, name: &str, args: &[&str]) -> (serde_json::Value, String, serde_json::Value) {
    let mut all = vec!["submit", "--wait", "--json", "--deployment", name, "--"];
    all.extend_from_slice(args);
    let out = client(url, &all);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = stdout.lines();
    let submitted: serde_json::Value = serde_json::from_str(lines.next().unwrap_or_default())
        .unwrap_or_else(|e| {
            panic!(
                "no run ({e}) in {stdout:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let req: serde_json::Value = serde_json::from_str(lines.next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no request line ({e}) in {stdout:?}"));
    let rest = lines.collect::<Vec<_>>().join("\n");
    let id = submitted["id"].as_i64().expect("run id").to_string();
    (req, rest, run_json(url, &id))
}

#[test]
fn a_restored_copy_that_parks_itself_again_serves_the_next_runs() {
    // No prepared copies: whatever serves a second run without a restore
    // is the copy the first one left.
    let Some((bed, node_root, _node)) = spareless_node() else {
        return;
    };
    let (url, image) = (bed.url.as_str(), bed.image.as_str());
    // A start-up that counts the requests it served in its own memory and
    // parks itself again after each (`ready CODE` gives the run's code).
    let serving = "n=0; sleep 1; echo ready >&\"$EMBER_READY_FD\"; \
        while read -r req <&\"$EMBER_READY_FD\"; do n=$((n+1)); echo \"$req\"; echo \"served $n\"; \
        case \"$req\" in *'\"fail\"'*) echo 'ready 3' >&\"$EMBER_READY_FD\";; \
        *) echo ready >&\"$EMBER_READY_FD\";; esac; done";
    deploy_snapshot(url, "serving", image, serving);

    // The first run starts fresh; its runner is not kept (not a restored
    // copy), and it ends when the start-up parks itself after it.
    let (req, out, first) = run_of(url, "serving", &["first"]);
    assert_eq!(req["restored"], false, "{req}");
    assert_eq!(out, "served 1", "{first}");
    assert_eq!(first["state"], "succeeded", "{first}");
    wait_for("the node to report the checkpoint", 300, || {
        client_ok(url, &["nodes", "--json"]).contains("\"d.serving.")
    });

    // Restored on demand from the checkpoint (taken before any request).
    let (req, out, run) = run_of(url, "serving", &["a"]);
    assert_eq!(
        (req["restored"].clone(), req["served"].clone()),
        (true.into(), 0.into()),
        "{req}"
    );
    assert_eq!(out, "served 1", "{run}");
    assert_eq!(run["state"], "succeeded", "{run}");
    assert!(run["times"]["snapshot_note"].is_null(), "{run}");

    // The same copy serves the next runs, its memory as the last run left
    // it; a run it ends with `ready 3` fails with code 3 and the copy
    // stays.
    for (n, arg, state) in [
        (1, "b", "succeeded"),
        (2, "fail", "failed"),
        (3, "c", "succeeded"),
    ] {
        let (req, out, run) = run_of(url, "serving", &[arg]);
        assert_eq!(req["served"], n, "{req}");
        assert_eq!(req["argv"], serde_json::json!([arg]), "{req}");
        assert_eq!(out, format!("served {}", n + 1), "{run}");
        assert_eq!(run["state"], state, "{run}");
        if state == "failed" {
            assert_eq!(run["exit_code"], 3, "{run}");
        }
        let note = run["times"]["snapshot_note"].as_str().unwrap_or_default();
        assert!(
            note.starts_with("by a restored copy that parked itself again"),
            "{run}"
        );
        assert!(note.contains(&format!("{n} runs before this one")), "{run}");
    }
    let copies: Vec<String> = runc_list(&node_root.join("snapshot/runc"))
        .into_iter()
        .filter(|c| c.contains("-restore-"))
        .collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
}
