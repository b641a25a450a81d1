//! Long-running `ember control` / `ember node` processes for cluster tests.

use super::ember;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The client token cluster tests give `ember control`.
pub const CLIENT_TOKEN: &str = "client-secret";
/// The node token cluster tests give `ember control` and `ember node`.
pub const NODE_TOKEN: &str = "node-secret";

/// A child process killed (SIGTERM, then SIGKILL) when dropped, so a
/// failing assertion leaves nothing running.
pub struct Proc(pub Child);

impl Proc {
    /// SIGTERM, then SIGKILL after a minute.
    pub fn stop(&mut self) {
        // Never signal a pid already reaped: it may belong to someone else.
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a long-running ember command and returns it with the first line
/// of its stderr (which names the address for `ember control`); the rest
/// of stderr is copied to ours.
pub fn start(root: &Path, args: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(ember());
    cmd.arg("--root").arg(root).args(args);
    start_logged(cmd, "")
}

/// Spawns `cmd` (an ember command, perhaps behind a wrapper that execs it)
/// and returns it with the first line of its stderr; the rest of stderr is
/// copied to ours, each line after `tag`.
pub fn start_logged(mut cmd: Command, tag: &str) -> (Proc, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    let mut first = String::new();
    err.read_line(&mut first).expect("first stderr line");
    let tag = tag.to_owned();
    std::thread::spawn(move || {
        let mut rest = String::new();
        while err.read_line(&mut rest).is_ok_and(|n| n > 0) {
            eprint!("{tag}{rest}");
            rest.clear();
        }
    });
    (Proc(child), first)
}

/// `ember control --listen 127.0.0.1:0 --db DB` with the test tokens and
/// extra `args`; returns it with its URL.
pub fn start_control(root: &Path, db: &str, args: &[&str]) -> (Proc, String) {
    let mut all = vec![
        "control",
        "--listen",
        "127.0.0.1:0",
        "--db",
        db,
        "--client-token",
        CLIENT_TOKEN,
        "--node-token",
        NODE_TOKEN,
    ];
    all.extend_from_slice(args);
    let (proc, line) = start(root, &all);
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_owned();
    (proc, url)
}

/// `ember node` with id `id` and `slots` slots against `control`, plus
/// `extra` arguments; returns once the control plane lists it.
pub fn start_node(
    root: &Path,
    control: &str,
    id: &str,
    slots: u32,
    agent: &Path,
    extra: &[&str],
) -> Proc {
    let slots = slots.to_string();
    let agent = agent.to_string_lossy().into_owned();
    let mut args = vec![
        "node",
        "--control",
        control,
        "--token",
        NODE_TOKEN,
        "--id",
        id,
        "--slots",
        &slots,
        "--agent",
        &agent,
    ];
    args.extend_from_slice(extra);
    let (node, _) = start(root, &args);
    // This is the test waiting, not the system.
    let deadline = Instant::now() + Duration::from_secs(30);
    let quoted = format!("\"{id}\"");
    while !client_ok(control, &["nodes", "--json"]).contains(&quoted) {
        assert!(Instant::now() < deadline, "node {id} never registered");
        std::thread::sleep(Duration::from_millis(100));
    }
    node
}

/// A client command against `url` with the test client token.
pub fn client(url: &str, args: &[&str]) -> Output {
    Command::new(ember())
        .args(args)
        .env("EMBER_CONTROL", url)
        .env("EMBER_TOKEN", CLIENT_TOKEN)
        .output()
        .expect("run ember")
}

/// [`client`], asserting success; returns stdout.
pub fn client_ok(url: &str, args: &[&str]) -> String {
    let out = client(url, args);
    assert!(
        out.status.success(),
        "ember {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// All runs as JSON (`ember runs --json --all`).
pub fn runs_json(url: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&client_ok(url, &["runs", "--json", "--all"])).expect("runs JSON");
    v.as_array().expect("an array of runs").clone()
}

/// The run with id `id` (`run-N` or `N`), from `ember runs --json`.
pub fn run_json(url: &str, id: &str) -> serde_json::Value {
    let n: i64 = id
        .trim()
        .trim_start_matches("run-")
        .parse()
        .expect("a run id");
    runs_json(url)
        .into_iter()
        .find(|r| r["id"] == n)
        .unwrap_or_else(|| panic!("{id} not listed"))
}

/// How many runners a node's pool holds (idle or busy).
pub fn runners(node_root: &Path) -> usize {
    std::fs::read_dir(node_root.join("pool/runners"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One `ember submit --wait` of the snapshot deployment `slow`, whose
/// start-up prints its request line and then `random <value>`: the request
/// line (parsed), the random value, and the run as the control plane
/// stores it.
#[allow(dead_code)]
pub fn run_once(url: &str, args: &[&str]) -> (serde_json::Value, String, serde_json::Value) {
    let mut all = vec!["submit", "--wait", "--json", "--deployment", "slow", "--"];
    all.extend_from_slice(args);
    let out = client(url, &all);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stdout}\n{stderr}", out.status);
    let mut lines = stdout.lines();
    let submitted: serde_json::Value =
        serde_json::from_str(lines.next().unwrap_or_default()).expect("the run as JSON");
    let req: serde_json::Value = serde_json::from_str(lines.next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no request line ({e}) in {stdout:?}; stderr: {stderr}"));
    let random = lines
        .next()
        .and_then(|l| l.strip_prefix("random "))
        .unwrap_or_else(|| panic!("no random line in {stdout:?}"))
        .to_owned();
    let id = submitted["id"].as_i64().expect("run id").to_string();
    (req, random, run_json(url, &id))
}

/// A snapshot start-up for busybox: ready after `sleep` seconds, then
/// parked until a run resumes it with its request; after the resume it
/// prints the request and 8 bytes read from /dev/urandom (so two restored
/// copies can be told apart).
pub fn parked_startup(sleep: u32) -> String {
    format!(
        "sleep {sleep}; echo ready >&\"$EMBER_READY_FD\"; \
         read -r req <&\"$EMBER_READY_FD\"; echo \"$req\"; \
         echo \"random $(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \\n')\""
    )
}

/// `ember deploy --snapshot NAME IMAGE -- /bin/sh -c STARTUP`.
pub fn deploy_snapshot(url: &str, name: &str, image: &str, startup: &str) -> String {
    client_ok(
        url,
        &[
            "deploy",
            "--snapshot",
            name,
            image,
            "--",
            "/bin/sh",
            "-c",
            startup,
        ],
    )
}

/// What a snapshot-deployment test starts from: busybox in a real
/// registry and `ember control` on SQLite, under one temporary directory.
/// Fields drop in order: the control plane stops before the registry and
/// the directory go.
pub struct Bed {
    /// `ember control`.
    pub control: Proc,
    /// Its URL.
    pub url: String,
    /// `ADDR/ember/busybox:latest` in the registry.
    pub image: String,
    /// The registry.
    pub registry: ember_testkit::registry::Registry,
    /// Room for node roots; the control plane's is `control/`.
    pub tmp: tempfile::TempDir,
}

/// Starts a [`Bed`].
pub fn busybox_bed() -> Bed {
    let registry = super::registry_with(&["busybox"]);
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = tmp.path().join("control.db");
    let (control, url) = start_control(&tmp.path().join("control"), &db.to_string_lossy(), &[]);
    Bed {
        control,
        url,
        image,
        registry,
        tmp,
    }
}
