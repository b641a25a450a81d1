//! `ember snapshot push|pull` through a real `ember cache`: a start-up
//! captured on one store (machine A) is restored from another store that
//! never captured it (machine B), with real CRIU, runc, overlayfs and the
//! static agent; a checkpoint of another kernel is refused before its
//! download, a tampered artifact on the cache and a forged upload are
//! refused by digest.
//!
//! Needs root, runc, a working CRIU (scripts/install-criu.sh) and the
//! static agent (crates/ember-agent/build-static.sh); fails with a pointer
//! to them when one is missing, unless EMBER_TEST_SKIP_PRIVILEGED=1.

mod common;

use common::*;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// Parks after a start-up that leaves a file behind; a resumed run prints
/// its request and the file.
const STARTUP: &str = "sleep 1; echo warm > /warm; echo ready >&\"$EMBER_READY_FD\"; \
                       read -r req <&\"$EMBER_READY_FD\"; echo \"$req\"; cat /warm";
const TOKEN: &str = "snapshot-secret";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn prerequisites() -> Option<PathBuf> {
    let skip = std::env::var("EMBER_TEST_SKIP_PRIVILEGED").as_deref() == Ok("1");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let agent = Command::new(root.join("crates/ember-agent/build-static.sh"))
        .stderr(Stdio::inherit())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let criu_ok = Command::new("criu")
        .arg("check")
        .output()
        .is_ok_and(|o| o.status.success());
    match (criu_ok, agent) {
        (true, Some(a)) => Some(a),
        _ if skip => {
            eprintln!("skipping (EMBER_TEST_SKIP_PRIVILEGED=1): CRIU or the static agent missing");
            None
        }
        (criu, agent) => panic!(
            "this test needs root, runc, CRIU and the static agent (criu check ok: {criu}, \
             agent built: {}); install CRIU with scripts/install-criu.sh and build the agent \
             with crates/ember-agent/build-static.sh, or set EMBER_TEST_SKIP_PRIVILEGED=1",
            agent.is_some()
        ),
    }
}

fn e(root: &Path, agent: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(ember());
    c.arg("--root")
        .arg(root)
        .args(args)
        .env("EMBER_AGENT", agent);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("spawn ember")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `GET path` on the cache over plain HTTP/1.0, the body.
fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

fn metric(port: u16, name: &str) -> u64 {
    let text = http_get(port, "/metrics");
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

fn no_snapshot(root: &Path, agent: &Path) {
    let ls = ok(&e(root, agent, &[], &["snapshot", "ls", "--json"]), "ls");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ls).expect("json"),
        serde_json::json!([])
    );
    let blobs = root.join("snapshots/blobs");
    assert_eq!(
        std::fs::read_dir(&blobs).map(|r| r.count()).unwrap_or(0),
        0,
        "artifacts in {}",
        blobs.display()
    );
}

#[test]
fn a_snapshot_captured_on_one_store_restores_on_another_through_the_cache() {
    let Some(agent) = prerequisites() else { return };
    let registry = registry_with(&["busybox"]);
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");
    let [a, b, c, d] = ["a", "b", "c", "d"].map(|n| tmp.path().join(n));
    let cache_dir = tmp.path().join("cache");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("http://127.0.0.1:{port}");
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
            .arg(&cache_dir)
            // Required by the registry side; never contacted here.
            .args(["--upstream", "http://127.0.0.1:9"])
            .env("EMBER_SNAPSHOT_WRITE_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn ember cache"),
    );
    assert!(
        (0..400).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }),
        "ember cache did not listen"
    );

    // Machine A captures.
    ok(
        &e(
            &a,
            &agent,
            &[],
            &[
                "snapshot", "create", "slow", &image, "--", "/bin/sh", "-c", STARTUP,
            ],
        ),
        "snapshot create",
    );

    // Push: without the token the cache refuses; with it, stored.
    let out = e(
        &a,
        &agent,
        &[],
        &["snapshot", "push", "slow", "--cache", &url],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("write token"),
        "{stderr}"
    );
    let tok = [("EMBER_SNAPSHOT_TOKEN", TOKEN)];
    let pushed = ok(
        &e(
            &a,
            &agent,
            &tok,
            &["snapshot", "push", "slow", "--cache", &url, "--json"],
        ),
        "push",
    );
    let pushed: serde_json::Value = serde_json::from_str(&pushed).expect("push json");
    assert_eq!(pushed["uploaded"], true, "{pushed}");
    let artifact = pushed["artifact"].as_str().expect("artifact").to_owned();
    let hex = artifact.strip_prefix("sha256:").expect("sha256").to_owned();

    // Machine B has the image but never ran the start-up: pull, restore.
    ok(&e(&b, &agent, &[], &["pull", &image]), "pull image");
    let pulled = ok(
        &e(
            &b,
            &agent,
            &[],
            &["snapshot", "pull", "slow", "--cache", &url, "--json"],
        ),
        "snapshot pull",
    );
    let pulled: serde_json::Value = serde_json::from_str(&pulled).expect("pull json");
    assert_eq!(pulled["downloaded"], true, "{pulled}");
    assert_eq!(pulled["image_present"], true, "{pulled}");
    eprintln!("pushed {pushed}\npulled {pulled}");
    let out = e(
        &b,
        &agent,
        &[],
        &[
            "run",
            "--snapshot",
            "slow",
            "--no-fallback",
            "--timings=json",
            "--",
            "hello",
            "b",
        ],
    );
    let stdout = ok(&out, "run --snapshot on B");
    let req: serde_json::Value =
        serde_json::from_str(stdout.lines().next().unwrap_or_default()).expect("request line");
    assert_eq!(req["restored"], true, "{req}");
    assert_eq!(req["argv"], serde_json::json!(["hello", "b"]), "{req}");
    assert_eq!(
        stdout.lines().nth(1),
        Some("warm"),
        "the file the start-up wrote"
    );
    eprintln!("B restored: {}", String::from_utf8_lossy(&out.stderr));

    // A checkpoint of another kernel (A's manifest with its metadata
    // changed, pushed under another name): refused on C with the reason,
    // before a byte of the artifact was sent.
    let mut m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(a.join("snapshots/manifests/slow.json")).expect("manifest"),
    )
    .expect("manifest json");
    m["name"] = "other-kernel".into();
    m["metadata"]["host"]["kernel_release"] = "0.0.1-elsewhere".into();
    std::fs::write(
        a.join("snapshots/manifests/other-kernel.json"),
        serde_json::to_vec(&m).expect("json"),
    )
    .expect("write manifest");
    let p = ok(
        &e(
            &a,
            &agent,
            &tok,
            &[
                "snapshot",
                "push",
                "other-kernel",
                "--cache",
                &url,
                "--json",
            ],
        ),
        "push other-kernel",
    );
    assert!(
        p.contains("\"uploaded\":false"),
        "the artifact was on the cache: {p}"
    );
    let served = metric(port, "ember_cache_snapshot_served_bytes_total");
    let out = e(
        &c,
        &agent,
        &[],
        &["snapshot", "pull", "other-kernel", "--cache", &url],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("kernel release") && stderr.contains("0.0.1-elsewhere"),
        "{stderr}"
    );
    assert!(stderr.contains("not downloaded"), "{stderr}");
    eprintln!("C refused: {stderr}");
    assert_eq!(
        metric(port, "ember_cache_snapshot_served_bytes_total"),
        served
    );
    no_snapshot(&c, &agent);

    // A forged upload (bytes under a digest they do not hash to): the
    // cache refuses it.
    let forged_hex = "ab".repeat(32);
    std::fs::copy(
        a.join("snapshots/blobs").join(&hex),
        a.join("snapshots/blobs").join(&forged_hex),
    )
    .expect("copy artifact");
    m["name"] = "forged".into();
    m["artifact"] = format!("sha256:{forged_hex}").into();
    std::fs::write(
        a.join("snapshots/manifests/forged.json"),
        serde_json::to_vec(&m).expect("json"),
    )
    .expect("write manifest");
    let out = e(
        &a,
        &agent,
        &tok,
        &["snapshot", "push", "forged", "--cache", &url],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("hash to sha256:{hex}")),
        "{stderr}"
    );
    assert!(!cache_dir.join("blobs/sha256").join(&forged_hex).exists());
    eprintln!("forged push refused: {stderr}");

    // One flipped byte in the cache's copy: D refuses it by digest and is
    // left without the snapshot.
    let on_cache = cache_dir.join("blobs/sha256").join(&hex);
    let mut bytes = std::fs::read(&on_cache).expect("read cached artifact");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&on_cache, &bytes).expect("tamper");
    let out = e(
        &d,
        &agent,
        &[],
        &["snapshot", "pull", "slow", "--cache", &url],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("digest mismatch"), "{stderr}");
    eprintln!("D refused: {stderr}");
    no_snapshot(&d, &agent);
}
