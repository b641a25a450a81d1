//! The cluster end to end with the real binaries: `ember control` and one
//! `ember node` (real runc, the static agent, a real registry), driven by
//! `ember submit`, `ember runs`, `ember nodes` and `ember logs`.

mod common;

use common::cluster::*;
use common::*;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// One raw HTTP/1.1 request; returns the status and the body.
fn http(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[test]
fn submit_wait_warm_reuse_idempotency_and_errors() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let registry = registry_with(&["busybox"]);
    let image = format!("{}/ember/busybox:latest", registry.addr());

    let tmp = tempfile::tempdir().expect("tempdir");
    let db = tmp.path().join("control.db");
    let node_root = tmp.path().join("node");
    let db_s = db.to_string_lossy().into_owned();
    let (mut control, line) = start(
        tmp.path(),
        &[
            "control",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db_s,
            "--client-token",
            "client-secret",
            "--node-token",
            "node-secret",
        ],
    );
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_owned();
    let addr = url.trim_start_matches("http://").to_owned();

    let agent_s = agent.to_string_lossy().into_owned();
    let (mut node, _) = start(
        &node_root,
        &[
            "node",
            "--control",
            &url,
            "--token",
            "node-secret",
            "--id",
            "n1",
            "--slots",
            "2",
            "--agent",
            &agent_s,
        ],
    );
    // Wait for registration (this is the test waiting, not the system).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = client_ok(&url, &["nodes", "--json"]);
        if out.contains("\"n1\"") {
            break;
        }
        assert!(Instant::now() < deadline, "the node never registered");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A cold run: its output comes back and its exit code is ours.
    let out = client(
        &url,
        &[
            "submit",
            "--wait",
            &image,
            "--",
            "sh",
            "-c",
            "echo hi; exit 3",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");

    // The same image again: a plain run shares no runner (see
    // runners_are_shared_only_by_runs_that_ask_for_it).
    let out = client(
        &url,
        &[
            "submit",
            "--wait",
            "--idempotency-key",
            "k1",
            &image,
            "--",
            "sh",
            "-c",
            "echo again >&2",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("again"));

    let runs: serde_json::Value =
        serde_json::from_str(&client_ok(&url, &["runs", "--json"])).expect("runs JSON");
    let runs = runs.as_array().expect("array");
    assert_eq!(runs.len(), 2);
    for r in runs {
        for phase in [
            "queued",
            "scheduled",
            "image_ready",
            "runner_ready",
            "process_started",
        ] {
            assert!(r["times"][phase].is_u64(), "{phase} missing in {r}");
        }
        assert_eq!(r["node"], "n1");
    }
    assert_eq!(runs[1]["exit_code"], 3);
    assert_eq!(runs[1]["state"], "failed");
    assert_eq!(runs[0]["state"], "succeeded");
    // The inventory follows the exit report in the node's next heartbeat
    // (the warm hand-off does not wait for it); wait for that. Plain runs
    // leave no warm runner (the node's never-used spare is not one).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes: serde_json::Value =
            serde_json::from_str(&client_ok(&url, &["nodes", "--json"])).expect("nodes JSON");
        let idle: u64 = nodes[0]["inventory"]["idle_runners"]
            .as_object()
            .expect("idle_runners")
            .values()
            .filter_map(|v| v.as_u64())
            .sum();
        assert_eq!(idle, 0, "a plain run left a warm runner: {nodes}");
        let free = nodes[0]["inventory"]["free_disk_bytes"]
            .as_u64()
            .unwrap_or(0);
        if free > 0 {
            // Free disk is the store filesystem's, as `statvfs` sees it.
            let st = nix::sys::statvfs::statvfs(&node_root).expect("statvfs");
            let now = st.blocks_available() * st.fragment_size();
            assert!(
                free > 0 && free.abs_diff(now) < 1 << 30,
                "free_disk_bytes {free}, statvfs says {now}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no inventory: {nodes}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Duplicate submit with the same idempotency key: the same run.
    let dup = client_ok(
        &url,
        &[
            "submit",
            "--json",
            "--idempotency-key",
            "k1",
            &image,
            "--",
            "sh",
            "-c",
            "echo again >&2",
        ],
    );
    let dup: serde_json::Value = serde_json::from_str(dup.trim()).expect("run JSON");
    assert_eq!(dup["id"], runs[0]["id"]);

    // Logs of a finished run; stats.
    assert_eq!(client_ok(&url, &["logs", "run-1"]), "hi\n");
    let stats = client_ok(&url, &["runs", "--stats"]);
    assert!(stats.contains("runner"), "{stats}");

    // Malformed and unauthorised requests; nothing half-written.
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/runs",
        Some("client-secret"),
        "{\"image\": 5",
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"error\":\"bad_request\""), "{body}");
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/runs",
        Some("client-secret"),
        r#"{"image":{"reference":"x","digest":"sha256:nope"}}"#,
    );
    assert_eq!(status, 400, "{body}");
    let (status, _) = http(&addr, "GET", "/v1/runs", None, "");
    assert_eq!(status, 401);
    let (status, _) = http(&addr, "GET", "/v1/runs", Some("node-secret"), "");
    assert_eq!(status, 401, "the node token is not a client token");
    let (status, _) = http(
        &addr,
        "POST",
        "/v1/nodes/n1/runs/1/events",
        Some("node-secret"),
        r#"{"event":"started"}"#,
    );
    assert_eq!(status, 409, "a report for a finished run is refused");
    let runs: serde_json::Value =
        serde_json::from_str(&client_ok(&url, &["runs", "--json"])).expect("runs JSON");
    assert_eq!(runs.as_array().map(Vec::len), Some(2));

    // A deployment pins the image; its runs use its command.
    client_ok(&url, &["deploy", "hello", &image, "--", "echo", "deployed"]);
    let out = client(&url, &["submit", "--wait", "--deployment", "hello"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "deployed\n");
    let list = client_ok(&url, &["deploy", "--list"]);
    assert!(list.contains("\"hello\""), "{list}");

    // A control-plane restart on the same database and address: nothing is
    // forgotten, and the node reconnects on its own.
    control.stop();
    let (restarted, _) = start(
        tmp.path(),
        &[
            "control",
            "--listen",
            &addr,
            "--db",
            &db_s,
            "--client-token",
            "client-secret",
            "--node-token",
            "node-secret",
        ],
    );
    control = restarted;
    let out = client(&url, &["submit", "--wait", &image, "--", "echo", "back"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "back\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(client_ok(&url, &["logs", "run-1"]), "hi\n");

    // A small burst: every run finishes, on at most `--slots` runners.
    let mut ids = Vec::new();
    for i in 0..20 {
        let out = client_ok(
            &url,
            &["submit", &image, "--", "sh", "-c", &format!("echo {i}")],
        );
        ids.push(out.trim().to_owned());
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let runs: serde_json::Value =
            serde_json::from_str(&client_ok(&url, &["runs", "--json"])).expect("runs JSON");
        let runs = runs.as_array().expect("array");
        let burst: Vec<_> = runs
            .iter()
            .filter(|r| ids.contains(&format!("run-{}", r["id"])))
            .collect();
        assert_eq!(burst.len(), 20);
        if burst.iter().all(|r| r["state"] == "succeeded") {
            break;
        }
        assert!(
            burst.iter().all(|r| r["state"] != "failed"),
            "a burst run failed: {burst:?}"
        );
        assert!(Instant::now() < deadline, "the burst did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    // What is left once the burst's runners are destroyed: the node's
    // never-used spare of the image and the deployment's idle runner.
    let deadline = Instant::now() + Duration::from_secs(60);
    while runners(&node_root) > 2 {
        assert!(Instant::now() < deadline, "single-use runners left behind");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(client_ok(&url, &["logs", &ids[7]]), "7\n");

    // Cancel of a running run kills its process; the node carries on.
    let id = client_ok(&url, &["submit", &image, "--", "sleep", "600"])
        .trim()
        .to_owned();
    let state = |id: &str| -> String {
        let v: serde_json::Value =
            serde_json::from_str(&client_ok(&url, &["runs", "--json"])).expect("runs JSON");
        v.as_array()
            .expect("array")
            .iter()
            .find(|r| format!("run-{}", r["id"]) == id)
            .map(|r| r["state"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while state(&id) != "running" {
        assert!(Instant::now() < deadline, "never running");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(client_ok(&url, &["cancel", &id]).contains("cancelled"));
    assert_eq!(state(&id), "cancelled");
    assert!(
        !client(&url, &["cancel", &id]).status.success(),
        "cancel twice"
    );
    let sleeping = || {
        std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .any(|c| c == b"sleep\x00600\x00")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while sleeping() {
        assert!(
            Instant::now() < deadline,
            "the cancelled process still runs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = client(&url, &["submit", "--wait", &image, "--", "echo", "after"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "after\n");

    // Stop everything we started; the node destroys its runners.
    node.stop();
    control.stop();
    assert_eq!(runners(&node_root), 0, "runners left behind");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&*tmp.path().to_string_lossy()),
        "mounts left under {}",
        tmp.path().display()
    );
}

/// `ember up`: control plane, cache in front of the registry and a node in
/// one process; the env file it writes is all a client needs.
#[test]
fn up_runs_through_its_cache() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let registry = registry_with(&["busybox"]);
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("up");
    let data_s = data.to_string_lossy().into_owned();
    let agent_s = agent.to_string_lossy().into_owned();
    let upstream = registry.url();
    let (mut up, line) = start(
        tmp.path(),
        &[
            "up",
            "--nodes",
            "1",
            "--data",
            &data_s,
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--agent",
            &agent_s,
        ],
    );
    assert!(line.contains("cache http://"), "{line}");
    let env = std::fs::read_to_string(data.join("env")).expect("DATA/env");
    let var = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .unwrap_or_else(|| panic!("{name} missing in {env}"))
            .to_owned()
    };
    let (url, token) = (var("EMBER_CONTROL"), var("EMBER_TOKEN"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(ember())
            .args(["nodes", "--json", "--control", &url, "--token", &token])
            .output()
            .expect("ember nodes");
        if String::from_utf8_lossy(&out.stdout).contains("\"node-0\"") {
            break;
        }
        assert!(Instant::now() < deadline, "the node never registered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = Command::new(ember())
        .args([
            "submit",
            "--wait",
            &image,
            "--",
            "echo",
            "through the cache",
        ])
        .env("EMBER_CONTROL", &url)
        .env("EMBER_TOKEN", &token)
        .output()
        .expect("ember submit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through the cache\n");
    let cached = std::fs::read_dir(data.join("cache/blobs/sha256"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(cached > 0, "the node did not pull through the cache");
    // The wrong token is refused.
    let out = Command::new(ember())
        .args(["runs", "--control", &url, "--token", "wrong"])
        .output()
        .expect("ember runs");
    assert!(!out.status.success());

    up.stop();
    assert_eq!(runners(&data.join("node-0")), 0, "runners left behind");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains(&*tmp.path().to_string_lossy()));
}

/// `ember control` and one `ember node` (2 slots) on `tmp`; returns them
/// and the control plane's URL once the node has registered.
fn cluster(tmp: &Path, agent: &Path) -> (Proc, Proc, String) {
    let db = tmp.join("control.db").to_string_lossy().into_owned();
    let (control, line) = start(
        tmp,
        &[
            "control",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db,
            "--client-token",
            "client-secret",
            "--node-token",
            "node-secret",
        ],
    );
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_owned();
    let agent_s = agent.to_string_lossy().into_owned();
    let (node, _) = start(
        &tmp.join("node"),
        &[
            "node",
            "--control",
            &url,
            "--token",
            "node-secret",
            "--id",
            "n1",
            "--slots",
            "2",
            "--agent",
            &agent_s,
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client_ok(&url, &["nodes", "--json"]).contains("\"n1\"") {
        assert!(Instant::now() < deadline, "the node never registered");
        std::thread::sleep(Duration::from_millis(100));
    }
    (control, node, url)
}

fn runner_ids(node_root: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(node_root.join("pool/runners"))
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// Output that is not text (invalid UTF-8, NULs, a character split between
/// two writes) comes back byte for byte through `submit --wait` and
/// `ember logs`, stdout and stderr apart.
#[test]
fn binary_output_survives_byte_for_byte() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let registry = registry_with(&["busybox"]);
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut control, mut node, url) = cluster(tmp.path(), &agent);

    // The euro sign (e2 82 ac) is written in two parts with a pause
    // between, so its bytes travel in different records.
    let script = r"printf '\377\000\376'; printf '\300\000' >&2; printf '\342\202'; sleep 0.2; printf '\254'";
    let out = client(
        &url,
        &["submit", "--wait", &image, "--", "sh", "-c", script],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want_out: &[u8] = b"\xff\x00\xfe\xe2\x82\xac";
    let want_err: &[u8] = b"\xc0\x00";
    assert_eq!(out.stdout, want_out);
    assert!(
        out.stderr.windows(want_err.len()).any(|w| w == want_err),
        "{:?}",
        out.stderr
    );

    let logs = client(&url, &["logs", "run-1"]);
    assert!(logs.status.success());
    assert_eq!(logs.stdout, want_out, "stdout of ember logs");
    assert_eq!(logs.stderr, want_err, "stderr of ember logs");

    node.stop();
    control.stop();
}

/// A deployment with `--warm 1` gets an idle runner on the node before any
/// run exists, and its first run starts on that runner.
#[test]
fn deployments_get_prewarmed_runners() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let registry = registry_with(&["busybox"]);
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");
    let node_root = tmp.path().join("node");
    let (mut control, mut node, url) = cluster(tmp.path(), &agent);

    // The run prints its container's hostname, which is its runner's id.
    client_ok(
        &url,
        &["deploy", "--warm", "1", "warm", &image, "--", "hostname"],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let nodes: serde_json::Value =
            serde_json::from_str(&client_ok(&url, &["nodes", "--json"])).expect("nodes JSON");
        let idle: u64 = nodes[0]["inventory"]["idle_runners"]
            .as_object()
            .map(|o| o.values().filter_map(|v| v.as_u64()).sum())
            .unwrap_or(0);
        if idle >= 1 {
            assert_eq!(idle, 1, "one warm runner wanted: {nodes}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no warm runner appeared: {nodes}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let runs = client_ok(&url, &["runs", "--json"]);
    assert_eq!(runs.trim(), "[]", "the runner was made before any run");
    let warm = runner_ids(&node_root);
    assert_eq!(warm.len(), 1, "{warm:?}");

    let out = client(&url, &["submit", "--wait", "--deployment", "warm"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", warm[0]),
        "the first run did not start on the pre-warmed runner"
    );
    let runs: serde_json::Value =
        serde_json::from_str(&client_ok(&url, &["runs", "--json"])).expect("runs JSON");
    let run = &runs[0];
    assert_eq!(run["state"], "succeeded");
    for phase in ["image_ready", "runner_ready", "process_started"] {
        assert!(run["times"][phase].is_u64(), "{phase} missing in {run}");
    }

    node.stop();
    control.stop();
    assert_eq!(runners(&node_root), 0, "runners left behind");
}

/// An exec the runner's agent refuses (here: a NUL byte in an environment
/// value, which no process can be given) fails the run with the agent's
/// reason in its error, not only "exec in runner ...".
#[test]
fn a_refused_exec_says_why() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let registry = registry_with(&["busybox"]);
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut control, mut node, url) = cluster(tmp.path(), &agent);
    // A good run first, for the pinned image (and a warm runner).
    let first: serde_json::Value = serde_json::from_str(&client_ok(
        &url,
        &["submit", "--json", &image, "--", "true"],
    ))
    .expect("run JSON");
    let pinned: ember_control::model::PinnedImage =
        serde_json::from_value(first["image"].clone()).expect("image");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let c =
        ember_api::client::ControlClient::new(&url, Some("client-secret".into())).expect("client");
    let spec = ember_control::model::RunSpec {
        image: Some(pinned),
        command: vec!["true".into()],
        env: [("BAD".to_owned(), "a\0b".to_owned())].into(),
        ..Default::default()
    };
    let id = rt.block_on(c.submit(&spec, None)).expect("submit").run.id;
    let deadline = Instant::now() + Duration::from_secs(60);
    let run = loop {
        let run = rt.block_on(c.run(id)).expect("run");
        if run.state.is_final() {
            break run;
        }
        assert!(Instant::now() < deadline, "the run never ended: {run:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(run.state, ember_control::model::RunState::Failed);
    let error = run.error.unwrap_or_default();
    assert!(
        error.contains("exec in runner") && error.contains("NUL"),
        "the cause is carried: {error:?}"
    );
    node.stop();
    control.stop();
}

/// Reuse is opt-in: plain runs of an image never share a runner (nor its
/// files), a deployment's runs do, and so do runs that name one recycling
/// key; a read-only root filesystem keeps `/etc` from being written at all.
#[test]
fn runners_are_shared_only_by_runs_that_ask_for_it() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let registry = registry_with(&["busybox"]);
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");
    let node_root = tmp.path().join("node");
    let (mut control, mut node, url) = cluster(tmp.path(), &agent);

    // Prints what an earlier run left in /etc and /root (none of them
    // prints anything else there), leaves its own mark, and prints its
    // runner (the hostname is the runner's id).
    let script = |mark: &str| {
        format!(
            "cat /etc/marker /root/marker 2>/dev/null; echo {mark} > /etc/marker; \
             echo {mark} > /root/marker; hostname"
        )
    };
    let submit = |args: &[&str]| -> (String, String) {
        let mut all = vec!["submit", "--wait"];
        all.extend_from_slice(args);
        let out = client(&url, &all);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines: Vec<&str> = text.lines().collect();
        let host = lines.pop().unwrap_or_default().to_owned();
        (lines.join("\n"), host)
    };

    // Two plain runs of one image: two runners, nothing seen.
    let s1 = script("plain-1");
    let (seen, h1) = submit(&[&image, "--", "sh", "-c", &s1]);
    assert_eq!(seen, "");
    let s2 = script("plain-2");
    let (seen, h2) = submit(&[&image, "--", "sh", "-c", &s2]);
    assert_eq!(seen, "", "a plain run saw another's files");
    assert_ne!(h1, h2, "two plain runs shared a runner");

    // Two runs of one deployment (no recycling key): one runner, and what
    // the documentation says persists (/etc, /root) persists.
    let sd = script("web");
    client_ok(&url, &["deploy", "web", &image, "--", "sh", "-c", &sd]);
    let (seen, d1) = submit(&["--deployment", "web"]);
    assert_eq!(seen, "");
    let (seen, d2) = submit(&["--deployment", "web"]);
    assert_eq!((seen.as_str(), d2.as_str()), ("web\nweb", d1.as_str()));
    // Neither a plain run nor another deployment gets that runner.
    let s3 = script("plain-3");
    let (seen, h3) = submit(&[&image, "--", "sh", "-c", &s3]);
    assert_eq!(seen, "");
    assert_ne!(h3, d1);
    let sa = script("api");
    client_ok(&url, &["deploy", "api", &image, "--", "sh", "-c", &sa]);
    let (seen, a1) = submit(&["--deployment", "api"]);
    assert_eq!(seen, "");
    assert_ne!(a1, d1);

    // Plain runs that name one recycling key share.
    let sk1 = script("k1");
    let (_, k1) = submit(&["--recycle-key", "team-a", &image, "--", "sh", "-c", &sk1]);
    let sk2 = script("k2");
    let (seen, k2) = submit(&["--recycle-key", "team-a", &image, "--", "sh", "-c", &sk2]);
    assert_eq!((seen.as_str(), k2.as_str()), ("k1\nk1", k1.as_str()));

    // Read-only root: /etc cannot be written, the scratch directories can.
    let ro = "(echo x > /etc/marker) 2>/dev/null || echo etc-read-only; \
              touch /tmp/t /var/tmp/t /run/t /dev/shm/t /workspace/t && echo scratch-ok; hostname";
    let (seen, _) = submit(&["--read-only", &image, "--", "sh", "-c", ro]);
    assert_eq!(seen, "etc-read-only\nscratch-ok");
    client_ok(
        &url,
        &["deploy", "--read-only", "ro", &image, "--", "sh", "-c", ro],
    );
    let (seen, _) = submit(&["--deployment", "ro"]);
    assert_eq!(seen, "etc-read-only\nscratch-ok");
    let runs: serde_json::Value =
        serde_json::from_str(&client_ok(&url, &["runs", "--json"])).expect("runs JSON");
    assert!(
        runs.as_array()
            .expect("array")
            .iter()
            .any(|r| r["deployment"] == "ro" && r["readonly_rootfs"] == true),
        "{runs}"
    );

    node.stop();
    control.stop();
    assert_eq!(runners(&node_root), 0, "runners left behind");
}
