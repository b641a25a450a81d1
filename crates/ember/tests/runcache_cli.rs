//! Run-level directory caches (`ember submit --cache`) through the real
//! parts: `ember cache` (its `/dircache/v1`), `ember control`, and `ember
//! node`s on two store roots, running busybox in real runners.
//!
//! The nodes have one slot each: a run's caches are saved before its node
//! takes its next run (the slot is held until the save ends), so a run
//! submitted after another one ended on the same node sees whatever that
//! one saved, and nothing it did not.

mod common;

use common::cluster::*;
use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ember cache` on a free port; returns it and its URL once it listens.
fn start_cache(dir: &Path) -> (Killed, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let cache = Killed(
        Command::new(ember())
            .args(["cache", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--max-bytes", "1G"])
            .arg("--dir")
            .arg(dir)
            // Required by the registry side; never contacted here.
            .args(["--upstream", "http://127.0.0.1:9"])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn ember cache"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "ember cache did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    (cache, format!("http://127.0.0.1:{port}"))
}

/// `ember submit --wait` of `image` with `caches` (`--cache` values)
/// running `sh -c script`; returns exit code, stdout, stderr.
fn submit(url: &str, image: &str, caches: &[&str], script: &str) -> (Option<i32>, String, String) {
    // Attempts to spare: a run placed on a node the test just stopped is
    // lost, then retried on the live one.
    let mut args = vec!["submit", "--wait", "--attempts", "3"];
    for c in caches {
        args.extend(["--cache", c]);
    }
    args.extend([image, "--", "sh", "-c", script]);
    let out = client(url, &args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The newest run, as JSON.
fn last_run(url: &str) -> serde_json::Value {
    runs_json(url)
        .into_iter()
        .max_by_key(|r| r["id"].as_i64())
        .expect("a run")
}

fn notes(run: &serde_json::Value) -> String {
    run["cache_notes"].to_string()
}

/// The keys of `scope`'s entries in the cache.
fn entries(cache: &str, scope: &str) -> String {
    let out = run_ember(
        Path::new("/"),
        &[
            "dircache", "ls", "--cache", cache, "--scope", scope, "--json",
        ],
    );
    assert!(
        out.status.success(),
        "dircache ls: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn runs_restore_and_save_their_declared_caches_across_nodes() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let registry = registry_with(&["busybox"]);
    let repo = format!("{}/ember/busybox", registry.addr());
    let image = format!("{repo}:latest");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_cache, cache) = start_cache(&tmp.path().join("cache"));
    let db = tmp.path().join("control.db").to_string_lossy().into_owned();
    // A stopped node is known lost within seconds (nodes heartbeat every
    // second).
    let (_control, url) = start_control(tmp.path(), &db, &["--heartbeat-timeout", "4"]);
    let mut n1 = start_node(
        &tmp.path().join("n1"),
        &url,
        "n1",
        1,
        &agent,
        &["--dircache", &cache, "--heartbeat", "1"],
    );

    // The key hashes a file of the image, named relative to the working
    // directory (`/`).
    let tool = r#"/root/.cache/tool=tool-{{ hash "etc/hostname" }}"#;

    // First run: nothing to restore; it writes the cache and succeeds.
    let (code, _, err) = submit(
        &url,
        &image,
        &[tool],
        "test ! -e /root/.cache/tool/data && mkdir -p /root/.cache/tool/sub && \
         echo v1 > /root/.cache/tool/data && ln -s data /root/.cache/tool/link",
    );
    assert_eq!(code, Some(0), "first run: {err}");
    let first = last_run(&url);
    assert!(notes(&first).contains("no entry"), "{first}");
    assert!(first["times"]["caches_restored"].is_u64(), "{first}");
    // Saved after the exit was reported: the test waits for the entry.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !entries(&cache, &repo).contains("tool-") {
        assert!(
            Instant::now() < deadline,
            "the first run's cache was never saved"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let listed = entries(&cache, &repo);
    assert_eq!(listed.matches("tool-").count(), 1, "{listed}");

    // Second run, on another node with another store root: it finds
    // what its predecessor wrote, symlink included.
    n1.stop();
    // Let the control plane see n1 gone (a run placed there anyway is
    // retried: see `submit`).
    std::thread::sleep(Duration::from_secs(5));
    let mut n2 = start_node(
        &tmp.path().join("n2"),
        &url,
        "n2",
        1,
        &agent,
        &["--dircache", &cache, "--heartbeat", "1"],
    );
    let (code, out, err) = submit(
        &url,
        &image,
        &[tool],
        "cat /root/.cache/tool/data /root/.cache/tool/link; test -d /root/.cache/tool/sub",
    );
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "v1\nv1\n"),
        "second run: {err}"
    );
    let second = last_run(&url);
    assert_eq!(second["node"], "n2");
    assert!(notes(&second).contains("exact key"), "{second}");

    // Restore keys: another key, falling back to the prefix.
    let (code, out, err) = submit(
        &url,
        &image,
        &["/root/.cache/tool=other-key,restore=nope-,restore=tool-"],
        "cat /root/.cache/tool/data",
    );
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "v1\n"),
        "fallback run: {err}"
    );
    assert!(notes(&last_run(&url)).contains("fallback"));

    // A failed run saves nothing: the next run with its key finds nothing.
    let (code, _, _) = submit(
        &url,
        &image,
        &["/root/.cache/f=fail-key"],
        "mkdir -p /root/.cache/f && echo x > /root/.cache/f/x; exit 1",
    );
    assert_eq!(code, Some(1));
    // Read-only: restores, never saves.
    let (code, _, err) = submit(
        &url,
        &image,
        &["/root/.cache/ro=ro-key,read-only"],
        "mkdir -p /root/.cache/ro && echo x > /root/.cache/ro/x",
    );
    assert_eq!(code, Some(0), "read-only run: {err}");
    let (code, _, err) = submit(
        &url,
        &image,
        &["/root/.cache/f=fail-key", "/root/.cache/ro=ro-key"],
        "test ! -e /root/.cache/f/x && test ! -e /root/.cache/ro/x",
    );
    assert_eq!(
        code,
        Some(0),
        "the failed and the read-only run saved: {err}"
    );
    let listed = entries(&cache, &repo);
    assert!(
        !listed.contains("fail-key") && !listed.contains("ro-key"),
        "{listed}"
    );

    // A file a key hashes that is not in the image fails the run before
    // its process starts, saying which.
    let (code, _, err) = submit(
        &url,
        &image,
        &[r#"/root/.cache/x=x-{{ hash "requirements.txt" }}"#],
        "echo should not run",
    );
    assert_ne!(code, Some(0));
    assert!(
        err.contains("requirements.txt") && err.contains("no such file"),
        "{err}"
    );

    // Bad declarations are refused at submit (400) with the reason.
    for (bad, why) in [
        ("relative/dir=k", "must be absolute"),
        ("/a/../etc=k", "`..`"),
        (r#"/c=k-{{ hash "f""#, "unclosed"),
        ("/c=k-{{ sha \"f\" }}", "unknown function"),
        ("/run/ember=k", "Ember"),
    ] {
        let (code, _, err) = submit(&url, &image, &[bad], "true");
        assert_ne!(code, Some(0), "{bad} was accepted");
        assert!(err.contains("400") && err.contains(why), "{bad}: {err}");
    }

    // The breakdown has the phase.
    let stats: serde_json::Value =
        serde_json::from_str(&client_ok(&url, &["runs", "--stats", "--json"])).expect("stats");
    assert!(
        stats["cache_restore"]["n"].as_u64().is_some_and(|n| n >= 5),
        "{stats}"
    );

    // A node without a dircache URL skips the cache with a note; the run
    // succeeds.
    n2.stop();
    std::thread::sleep(Duration::from_secs(5));
    let _n3 = start_node(
        &tmp.path().join("n3"),
        &url,
        "n3",
        1,
        &agent,
        &["--heartbeat", "1"],
    );
    let (code, _, err) = submit(&url, &image, &[tool], "test ! -e /root/.cache/tool/data");
    assert_eq!(code, Some(0), "run on a node without a cache: {err}");
    assert!(notes(&last_run(&url)).contains("skipped"));
}
