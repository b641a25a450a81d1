//! `ember pull --mirror` through the `ember cache` binary, both as users run
//! them: the first node's pull fetches each blob from the origin once, the
//! second node's pull is served entirely from the cache.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_nodes_pull_through_the_cache_binary() {
    let origin = registry_with(&["layers"]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let cache_url = format!("http://127.0.0.1:{port}");
    let _cache = Killed(
        Command::new(ember())
            .args([
                "cache",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--max-bytes",
                "1G",
            ])
            .arg("--dir")
            .arg(tmp.path().join("cache"))
            .args(["--upstream", &origin.url()])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn ember cache"),
    );
    let mut up = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(up, "ember cache did not listen");

    let image = format!("{}/ember/layers:latest", origin.addr());
    for node in ["node-a", "node-b"] {
        let root = tmp.path().join(node);
        ember_ok(&root, &["pull", "-q", "--mirror", &cache_url, &image]);
        let out = ember_ok(&root, &["run", &image, "--", "cat", "/zstd/marker.txt"]);
        assert!(!out.is_empty());
    }
    // Every blob crossed from the origin once, for both nodes together.
    let blob_gets: Vec<_> = origin
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/sha256:"))
        .collect();
    let mut paths: Vec<_> = blob_gets.iter().map(|r| r.path.clone()).collect();
    paths.sort();
    let total = paths.len();
    paths.dedup();
    assert_eq!(
        total,
        paths.len(),
        "a blob was fetched from the origin twice: {paths:?}"
    );
    assert!(
        total >= 4,
        "expected config and layer fetches, got {paths:?}"
    );

    let metrics = reqwest_blocking_get(&format!("{cache_url}/metrics"));
    assert!(metrics.contains("hits"), "{metrics}");
}

/// A tiny HTTP GET without pulling a blocking HTTP client into the tests.
fn reqwest_blocking_get(url: &str) -> String {
    sh_ok(Command::new("curl").args(["-fsS", url]))
}
