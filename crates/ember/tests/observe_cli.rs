//! Seeing the fleet, end to end on `ember up` (real registry, runc and
//! cache): `--log-format json` writes one JSON object per line with run
//! and node ids, and the `/ui` dashboard shows runs, a start-latency
//! histogram and the nodes in headless Chromium, a new run appearing
//! without a reload (`ui/dashboard.test.mjs`, driven by playwright-core).

mod common;

use common::cluster::Proc;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `ember up` with one node, its stderr lines kept.
struct Up {
    proc: Proc,
    url: String,
    token: String,
    image: String,
    lines: Arc<Mutex<Vec<String>>>,
    _registry: ember_testkit::registry::Registry,
    _tmp: tempfile::TempDir,
}

impl Up {
    /// Starts it with `global` arguments before `up`; `None` where the
    /// static agent cannot be built.
    fn start(global: &[&str]) -> Option<Up> {
        let agent = static_agent()?;
        let registry = registry_with(&["busybox"]);
        let image = format!("{}/ember/busybox:latest", registry.addr());
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("up");
        let mut cmd = Command::new(ember());
        cmd.arg("--root")
            .arg(tmp.path())
            .args(global)
            .args([
                "up",
                "--nodes",
                "1",
                "--slots",
                "2",
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--data")
            .arg(&data)
            .arg("--upstream")
            .arg(registry.url())
            .arg("--agent")
            .arg(&agent);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ember up");
        let err = BufReader::new(child.stderr.take().expect("stderr"));
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let keep = lines.clone();
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                eprintln!("up: {l}");
                keep.lock().expect("lines").push(l);
            }
        });
        let proc = Proc(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let env_path = data.join("env");
        let env = loop {
            if let Ok(e) = std::fs::read_to_string(&env_path)
                && e.contains("EMBER_TOKEN=")
            {
                break e;
            }
            assert!(Instant::now() < deadline, "ember up never wrote DATA/env");
            std::thread::sleep(Duration::from_millis(100));
        };
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("{name} missing in {env}"))
                .to_owned()
        };
        let up = Up {
            proc,
            url: var("EMBER_CONTROL"),
            token: var("EMBER_TOKEN"),
            image,
            lines,
            _registry: registry,
            _tmp: tmp,
        };
        while !up.client(&["nodes", "--json"]).contains("\"node-0\"") {
            assert!(Instant::now() < deadline, "the node never registered");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(up)
    }

    /// A client command; returns stdout, asserting success.
    fn client(&self, args: &[&str]) -> String {
        let out = Command::new(ember())
            .args(args)
            .env("EMBER_CONTROL", &self.url)
            .env("EMBER_TOKEN", &self.token)
            .output()
            .expect("ember");
        assert!(
            out.status.success(),
            "ember {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Submits `command` and waits for it; returns the run id (`run-N`).
    fn run(&self, command: &[&str]) -> String {
        let mut args = vec!["submit", "--json", &self.image, "--"];
        args.extend_from_slice(command);
        let v: serde_json::Value = serde_json::from_str(&self.client(&args)).expect("submit JSON");
        let id = format!("run-{}", v["id"].as_i64().expect("run id"));
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = run_json_of(self, &id);
            if r["state"] == "succeeded" {
                return id;
            }
            assert!(
                Instant::now() < deadline && r["state"] != "failed",
                "{id}: {r}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn run_json_of(up: &Up, id: &str) -> serde_json::Value {
    let n: i64 = id.trim_start_matches("run-").parse().expect("a run id");
    let v: serde_json::Value =
        serde_json::from_str(&up.client(&["runs", "--json", "--all"])).expect("runs JSON");
    v.as_array()
        .expect("runs")
        .iter()
        .find(|r| r["id"] == n)
        .cloned()
        .unwrap_or_else(|| panic!("{id} not listed"))
}

#[test]
fn json_logs_are_one_object_per_line_with_run_and_node_ids() {
    let Some(mut up) = Up::start(&["--log", "info,ember_node=debug", "--log-format", "json"])
    else {
        eprintln!("skipped: no static agent");
        return;
    };
    let id = up.run(&["true"]);
    up.proc.stop();
    let lines = up.lines.lock().expect("lines").clone();
    // The start-up line is the one plain-text line (scripts read the
    // address from it); every log line around it is a JSON object.
    let banner = |l: &String| l.starts_with("ember up: control plane http://");
    assert_eq!(lines.iter().filter(|l| banner(l)).count(), 1, "{lines:?}");
    let mut with_run = 0;
    let mut with_node = 0;
    for l in lines.iter().filter(|l| !banner(l)) {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.is_object(), "{l}");
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
        let spans = v["spans"].as_array().cloned().unwrap_or_default();
        if v["run"] == id.as_str() || spans.iter().any(|s| s["run"] == id.as_str()) {
            with_run += 1;
        }
        if spans.iter().any(|s| s["node"] == "node-0") {
            with_node += 1;
        }
    }
    assert!(
        with_run > 0,
        "no log line names {id}:\n{}",
        lines.join("\n")
    );
    assert!(
        with_node > 0,
        "no log line names node-0:\n{}",
        lines.join("\n")
    );
}

/// Where scripts/install-playwright.sh put playwright-core.
fn playwright() -> PathBuf {
    std::env::var_os("EMBER_PLAYWRIGHT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/ember-playwright"))
}

#[test]
fn dashboard_shows_runs_histograms_and_nodes_live_in_chromium() {
    let pw = playwright();
    assert!(
        Path::new("/usr/bin/chromium").exists()
            && pw
                .join("node_modules/playwright-core/package.json")
                .exists(),
        "chromium or playwright-core ({}) is missing: run scripts/install-playwright.sh \
         (scripts/install-deps.sh does)",
        pw.display()
    );
    let Some(up) = Up::start(&[]) else {
        eprintln!("skipped: no static agent");
        return;
    };
    up.client(&["deploy", "web", &up.image, "--warm", "1", "--", "true"]);
    let logged = up.run(&["echo", "hello from the dashboard"]);
    let second = up.run(&["true"]);
    let pinned = run_json_of(&up, &logged)["image"].to_string();

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shots = root.join("target/ui-test");
    std::fs::create_dir_all(&shots).expect("target/ui-test");
    let shot = shots.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = Command::new("node")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ui/dashboard.test.mjs"))
        .env("EMBER_URL", &up.url)
        .env("EMBER_TOKEN", &up.token)
        .env("EMBER_IMAGE", &pinned)
        .env("EMBER_RUNS", format!("{logged},{second}"))
        .env("EMBER_LOG_RUN", &logged)
        .env("EMBER_LOG_TEXT", "hello from the dashboard")
        .env("EMBER_PLAYWRIGHT", &pw)
        .env("SCREENSHOT", &shot)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "the browser test failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("appeared without a reload"), "{stdout}");
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    eprintln!("screenshot: {}", shot.display());
}
