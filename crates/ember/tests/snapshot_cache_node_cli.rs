//! Snapshot deployments across nodes through the cluster cache: `ember
//! control`, `ember cache` and two `ember node --cache` processes, a real
//! registry, overlayfs, runc, CRIU and the static exec agent. The first
//! node captures the deployment's start-up and pushes the checkpoint to
//! the cache; the second node's first run fetches it and is restored
//! without capturing.
//!
//! Needs root, runc, a working CRIU (scripts/install-criu.sh) and the
//! static agent (crates/ember-agent/build-static.sh); fails with a pointer
//! to them when one is missing, unless EMBER_TEST_SKIP_PRIVILEGED=1.

mod common;

use common::cluster::*;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "snapshot-secret";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `ember node --cache URL` with the cache's snapshot write token.
fn start_cached_node(
    root: &std::path::Path,
    control: &str,
    id: &str,
    agent: &std::path::Path,
    cache: &str,
) -> Proc {
    let mut cmd = Command::new(ember());
    cmd.arg("--root")
        .arg(root)
        .args([
            "node",
            "--control",
            control,
            "--token",
            NODE_TOKEN,
            "--id",
            id,
            "--slots",
            "2",
            "--agent",
        ])
        .arg(agent)
        .args(["--cache", cache])
        .env("EMBER_SNAPSHOT_TOKEN", TOKEN);
    let (node, _) = start_logged(cmd, "");
    // This is the test waiting, not the system.
    let deadline = Instant::now() + Duration::from_secs(30);
    let quoted = format!("\"{id}\"");
    while !client_ok(control, &["nodes", "--json"]).contains(&quoted) {
        assert!(Instant::now() < deadline, "node {id} never registered");
        std::thread::sleep(Duration::from_millis(100));
    }
    node
}

#[test]
fn a_second_node_restores_the_first_nodes_checkpoint_through_the_cache() {
    let Some(agent) = snapshot_prerequisites() else {
        return;
    };
    let registry = registry_with(&["busybox"]);
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cache_url = format!("http://127.0.0.1:{port}");
    let mut cache_cmd = Command::new(ember());
    cache_cmd
        .args([
            "cache",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--max-bytes",
            "1G",
        ])
        .arg("--dir")
        .arg(tmp.path().join("cache"))
        .args(["--upstream", &format!("http://{}", registry.addr())])
        .env("EMBER_SNAPSHOT_WRITE_TOKEN", TOKEN);
    let _cache = Proc(
        cache_cmd
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn ember cache"),
    );
    assert!(
        (0..400).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }),
        "ember cache did not listen"
    );
    let db = tmp.path().join("control.db");
    let (_control, url) = start_control(&tmp.path().join("control"), &db.to_string_lossy(), &[]);
    let n1 = start_cached_node(&tmp.path().join("n1"), &url, "n1", &agent, &cache_url);
    deploy_snapshot(&url, "slow", &image, &parked_startup(1));

    let (req, _, first) = run_once(&url, &["first"]);
    assert_eq!(req["restored"], false, "{req}");
    assert_eq!(first["state"], "succeeded", "{first}");

    // The capture is pushed after n1 reports it; wait until the cache
    // serves its manifest. This is the test waiting, not a run.
    let deadline = Instant::now() + Duration::from_secs(300);
    let key = loop {
        let nodes = client_ok(&url, &["nodes", "--json"]);
        if let Some(i) = nodes.find("\"d.slow.") {
            let rest = &nodes[i + 1..];
            break rest[..rest.find('"').expect("end of key")].to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "n1 never reported a checkpoint: {nodes}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let probe = tmp.path().join("probe");
    loop {
        let out = Command::new(ember())
            .arg("--root")
            .arg(&probe)
            .args(["snapshot", "pull", &key, "--cache", &cache_url])
            .output()
            .expect("ember snapshot pull");
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cache never had {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // n1 goes; n2 never ran the deployment, and restores its first run.
    drop(n1);
    let _n2 = start_cached_node(&tmp.path().join("n2"), &url, "n2", &agent, &cache_url);
    let deadline = Instant::now() + Duration::from_secs(120);
    let (req, random, run) = loop {
        let (req, random, run) = run_once(&url, &["second"]);
        if run["node"] == "n2" || run["node_id"] == "n2" || Instant::now() > deadline {
            break (req, random, run);
        }
    };
    assert_eq!(req["restored"], true, "{req} {run}");
    assert_eq!(req["argv"], serde_json::json!(["second"]), "{req}");
    assert_eq!(run["state"], "succeeded", "{run}");
    assert!(run["times"]["snapshot_restored"].is_u64(), "{run}");
    assert!(!random.is_empty());
    // n2 did not capture: its only checkpoint is the fetched one.
    let blobs: Vec<_> = std::fs::read_dir(tmp.path().join("n2/snapshots/blobs"))
        .expect("n2's artifacts")
        .flatten()
        .collect();
    assert_eq!(blobs.len(), 1, "{blobs:?}");
}
