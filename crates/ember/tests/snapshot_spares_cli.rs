//! Prepared copies of a snapshot deployment (`ember node
//! --snapshot-spares`), end to end: `ember control` + `ember node` as
//! processes, a real registry, overlayfs, runc, CRIU and the static exec
//! agent. After the capture the node restores copies ahead of runs; a run
//! takes one and only resumes it (a fresh seed each), and node shutdown
//! destroys the copies it holds.
//!
//! Needs root, runc, a working CRIU (scripts/install-criu.sh) and the
//! static agent (crates/ember-agent/build-static.sh); fails with a pointer
//! to them when one is missing, unless EMBER_TEST_SKIP_PRIVILEGED=1.

mod common;

use common::cluster::*;
use common::*;
use std::io::{Read, Write};
use std::path::Path;

/// One sample of the node's `/metrics` (a plain HTTP/1.0 GET).
fn metric(addr: &str, name: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read /metrics");
    body.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

/// Restored copies runc knows under the node's snapshot runc root.
fn restored_containers(node_root: &Path) -> Vec<String> {
    runc_list(&node_root.join("snapshot/runc"))
        .into_iter()
        .filter(|c| c.contains("-restore-"))
        .collect()
}

#[test]
fn runs_are_served_from_prepared_copies_and_shutdown_destroys_them() {
    let Some(agent) = snapshot_prerequisites() else {
        return;
    };
    let bed = busybox_bed();
    let (tmp, url, image) = (bed.tmp.path(), bed.url.as_str(), bed.image.as_str());
    let node_root = tmp.join("node");
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("addr").to_string()
    };
    let mut node = start_node(
        &node_root,
        url,
        "n1",
        2,
        &agent,
        &["--snapshot-spares", "2", "--metrics-listen", &metrics_addr],
    );
    deploy_snapshot(url, "slow", image, &parked_startup(1));
    let (req, _, first) = run_once(url, &["first"]);
    assert_eq!(req["restored"], false, "{req} {first}");

    // After the capture, the node prepares 2 copies, and no more.
    wait_for("2 prepared copies", 300, || {
        metric(&metrics_addr, "ember_node_snapshot_spares") == 2.0
    });
    assert_eq!(restored_containers(&node_root).len(), 2);

    let mut seeds = Vec::new();
    let mut randoms = Vec::new();
    for n in 0..2 {
        let arg = format!("run{n}");
        let (req, random, run) = run_once(url, &[&arg]);
        assert_eq!(req["restored"], true, "{req} {run}");
        assert_eq!(req["argv"], serde_json::json!([arg]), "{req}");
        assert_eq!(run["state"], "succeeded", "{run}");
        let note = run["times"]["snapshot_note"].as_str().unwrap_or_default();
        assert!(note.starts_with("from a prepared copy"), "{run}");
        assert!(run["times"]["snapshot_restored"].is_number(), "{run}");
        eprintln!("run {n} from a spare: {}", run["times"]);
        seeds.push(req["seed"].as_str().expect("seed").to_owned());
        randoms.push(random);
    }
    assert_ne!(seeds[0], seeds[1]);
    assert_ne!(randoms[0], randoms[1]);
    let served = |how: &str| {
        metric(
            &metrics_addr,
            &format!("ember_node_snapshot_runs_total{{node=\"n1\",restore=\"{how}\"}}"),
        )
    };
    assert_eq!(served("spare"), 2.0);
    assert_eq!(served("on_demand"), 0.0);
    // Replacements are restored in the background, never more than 2.
    wait_for("replacement copies", 120, || {
        metric(&metrics_addr, "ember_node_snapshot_spares") == 2.0
    });
    assert_eq!(restored_containers(&node_root).len(), 2);

    // A cancel of a run served from a prepared copy kills it, as one
    // restored on demand: the node's run ends long before its 60 s.
    let sleepy = "echo ready >&\"$EMBER_READY_FD\"; read -r req <&\"$EMBER_READY_FD\"; \
                  echo started; case \"$req\" in *'\"long\"'*) sleep 60;; esac";
    client_ok(
        url,
        &[
            "deploy",
            "--snapshot",
            "sleepy",
            image,
            "--",
            "/bin/sh",
            "-c",
            sleepy,
        ],
    );
    client_ok(
        url,
        &["submit", "--wait", "--deployment", "sleepy", "--", "a"],
    );
    wait_for("the sleepy deployment's copies", 300, || {
        metric(&metrics_addr, "ember_node_snapshot_spares") == 4.0
    });
    let submitted = client_ok(
        url,
        &["submit", "--json", "--deployment", "sleepy", "--", "long"],
    );
    let id = serde_json::from_str::<serde_json::Value>(submitted.lines().next().unwrap_or(""))
        .expect("the run as JSON")["id"]
        .as_i64()
        .expect("run id")
        .to_string();
    wait_for("the sleepy run to start", 60, || {
        run_json(url, &id)["times"]["process_started"].is_number()
    });
    let run = run_json(url, &id);
    let note = run["times"]["snapshot_note"].as_str().unwrap_or_default();
    assert!(note.starts_with("from a prepared copy"), "{run}");
    client_ok(url, &["cancel", &id]);
    wait_for("the cancelled run to end on the node", 15, || {
        metric(&metrics_addr, "ember_node_runs_active") == 0.0
    });

    // Node shutdown destroys the prepared copies (the control plane has
    // no way to replace a deployment's start-up yet, so key replacement
    // is not driven from here). It is asked to stop right after a run:
    // that run's copy is still being removed in the background and its
    // replacement being restored, and the node waits for both.
    client_ok(
        url,
        &["submit", "--wait", "--deployment", "sleepy", "--", "a"],
    );
    node.stop();
    assert!(
        restored_containers(&node_root).is_empty(),
        "{:?}",
        restored_containers(&node_root)
    );
    let root = node_root.to_string_lossy().into_owned();
    let mounted: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(root.as_str()))
        .map(str::to_owned)
        .collect();
    assert!(
        mounted.is_empty(),
        "mounts left under the node's root: {mounted:?}"
    );
    let left: Vec<_> = std::fs::read_dir(node_root.join("snapshot/containers"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "snapshot runners left: {left:?}");
}
