//! `ember snapshot create` and `ember run --snapshot` end to end: a real
//! registry, overlayfs, runc, CRIU and the static exec agent.
//!
//! Needs root, runc, a working CRIU (scripts/install-criu.sh) and the
//! static agent (crates/ember-agent/build-static.sh); fails with a pointer
//! to them when one is missing, unless EMBER_TEST_SKIP_PRIVILEGED=1.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A start-up that takes seconds, then is parked until a run resumes it
/// with its request, which it prints; `/warm` shows its file changes came
/// back.
const STARTUP: &str = "sleep 3; echo warm > /warm; echo ready >&\"$EMBER_READY_FD\"; \
                       read -r req <&\"$EMBER_READY_FD\"; echo \"$req\"; cat /warm; \
                       case \"$req\" in *'\"wait\"'*) sleep 60;; esac";
const STARTUP_SECS: f64 = 3.0;

fn ember_env(root: &Path, agent: &Path, env: &[(&str, &str)], args: &[&str]) -> (Output, f64) {
    let t = Instant::now();
    let mut c = Command::new(ember());
    c.arg("--root")
        .arg(root)
        .args(args)
        .env("EMBER_AGENT", agent);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("spawn ember");
    (out, t.elapsed().as_secs_f64())
}

/// The request line a run printed, parsed.
fn request(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first = stdout.lines().next().unwrap_or_default();
    serde_json::from_str(first).unwrap_or_else(|e| {
        panic!(
            "no request line ({e}) in {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn timings(out: &Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no timings in {stderr}"));
    serde_json::from_str(line).expect("timings json")
}

fn assert_no_leftovers(root: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let root_s = root.to_string_lossy();
    assert!(
        !mounts.lines().any(|l| l.contains(&*root_s)),
        "mounts left under {root_s}"
    );
    for d in ["containers", "users"] {
        let p = root.join(d);
        if let Ok(rd) = std::fs::read_dir(&p) {
            let left: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
            assert!(left.is_empty(), "{} not empty: {left:?}", p.display());
        }
    }
}

#[test]
fn a_slow_start_up_is_captured_once_and_every_run_restores_its_own_copy() {
    let Some(agent) = snapshot_prerequisites() else {
        return;
    };
    let registry = registry_with(&["busybox"]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let e = |env: &[(&str, &str)], args: &[&str]| ember_env(&root, &agent, env, args);

    let (out, capture_secs) = e(
        &[],
        &[
            "snapshot", "create", "slow", &image, "--", "/bin/sh", "-c", STARTUP,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        capture_secs >= STARTUP_SECS,
        "the capture took {capture_secs} s"
    );
    eprintln!(
        "capture: {capture_secs:.2} s\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ls, _) = e(&[], &["snapshot", "ls", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("ls json");
    assert_eq!(list[0]["name"], "slow", "{list}");
    let artifact = list[0]["artifact"].as_str().expect("artifact").to_owned();
    let hex = artifact.strip_prefix("sha256:").expect("sha256");
    let blob = root.join("snapshots/blobs").join(hex);
    assert!(blob.is_file());

    // Two runs: each restored, each with its own request and seed.
    let mut seeds = Vec::new();
    for n in 0..2 {
        let arg = format!("run{n}");
        let (out, secs) = e(
            &[],
            &[
                "run",
                "--snapshot",
                "slow",
                "--timings=json",
                "--",
                "hello",
                &arg,
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let req = request(&out);
        assert_eq!(req["restored"], true, "{req}");
        assert_eq!(req["argv"], serde_json::json!(["hello", arg]), "{req}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).lines().nth(1),
            Some("warm")
        );
        let t = timings(&out);
        assert_eq!(t["restored"], true, "{t}");
        assert!(t["restore_ms"].is_number(), "{t}");
        eprintln!(
            "restored run {n}: {secs:.3} s wall (start-up alone {STARTUP_SECS} s); timings {t}"
        );
        seeds.push(req["seed"].as_str().expect("seed").to_owned());
    }
    assert_ne!(seeds[0], seeds[1]);
    assert_no_leftovers(&root);

    // A relative `--root` restores too (runc and CRIU run elsewhere, so
    // the paths they are handed must not depend on ember's directory).
    let out = Command::new(ember())
        .current_dir(tmp.path())
        .args([
            "--root",
            "store",
            "run",
            "--snapshot",
            "slow",
            "--no-fallback",
        ])
        .args(["--", "relative"])
        .env("EMBER_AGENT", &agent)
        .output()
        .expect("spawn ember");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(request(&out)["argv"], serde_json::json!(["relative"]));
    assert_no_leftovers(&root);

    // SIGTERM to ember reaches the restored process (which is in the
    // container's session, not ember's), and nothing is left behind.
    let mut child = Command::new(ember())
        .arg("--root")
        .arg(&root)
        .args(["run", "--snapshot", "slow", "--", "wait"])
        .env("EMBER_AGENT", &agent)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ember");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("read");
    assert!(line.contains("\"wait\""), "{line}");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "ember did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(128 + 15));
    assert_no_leftovers(&root);

    // CRIU that reports another version than the one that checkpointed:
    // the metadata does not match, the run falls back and says so.
    let fake = tmp.path().join("criu-other");
    std::fs::write(
        &fake,
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'Version: 0.0.1'; exit 0; fi\nexec criu \"$@\"\n",
    )
    .expect("write fake criu");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let fake_s = fake.to_string_lossy().into_owned();
    let (out, secs) = e(
        &[("EMBER_CRIU", &fake_s)],
        &["run", "--snapshot", "slow", "--", "fresh"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("does not match this machine"), "{stderr}");
    assert!(stderr.contains("CRIU version"), "{stderr}");
    assert!(stderr.contains("falling back to a fresh start"), "{stderr}");
    let req = request(&out);
    assert_eq!(req["restored"], false, "{req}");
    assert!(secs >= STARTUP_SECS, "a fresh start took only {secs} s");
    seeds.push(req["seed"].as_str().expect("seed").to_owned());

    // CRIU missing, without fallback: a clear failure.
    let (out, _) = e(
        &[("EMBER_CRIU", "/nonexistent/criu")],
        &["run", "--snapshot", "slow", "--no-fallback"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("CRIU is missing"), "{stderr}");

    // A tampered artifact: refused by digest, nothing restored.
    let mut bytes = std::fs::read(&blob).expect("read artifact");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&blob, &bytes).expect("tamper");
    let (out, _) = e(&[], &["run", "--snapshot", "slow", "--no-fallback"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("digest mismatch"), "{stderr}");
    assert!(out.stdout.is_empty(), "something ran: {:?}", out.stdout);
    assert!(!root.join("snapshots/unpacked").join(hex).exists());
    // With fallback, the run still happens, as a fresh start.
    let (out, _) = e(&[], &["run", "--snapshot", "slow", "--", "again"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("digest mismatch"), "{stderr}");
    assert_eq!(request(&out)["restored"], false);
    seeds.push(request(&out)["seed"].as_str().expect("seed").to_owned());
    let mut unique = seeds.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seeds.len(), "{seeds:?}");

    // `ember store verify` finds it too; rm frees the artifact.
    let (out, _) = e(&[], &["store", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(hex),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (out, _) = e(&[], &["snapshot", "rm", "slow"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!blob.exists());
    let (ls, _) = e(&[], &["snapshot", "ls", "--json"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&ls.stdout).expect("json"),
        serde_json::json!([])
    );
    assert_no_leftovers(&root);
}
