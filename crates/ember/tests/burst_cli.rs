//! Bursts through the whole cluster with the real binaries: `ember up`
//! (control plane, cache and one node with real runc and the static agent,
//! in front of a real registry), driven by `ember bench burst`, with the
//! runs' records read back through `ember runs --json` to check what the
//! bench reports.

mod common;

use common::cluster::{Proc, runners, start};
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Starts `ember up` and waits for its first stderr line (printed once
/// everything listens); the rest of its stderr is copied to ours.
fn start_up(root: &Path, args: &[&str]) -> Proc {
    let mut all = vec!["up"];
    all.extend_from_slice(args);
    let (up, first) = start(root, &all);
    assert!(first.contains("control plane http://"), "{first}");
    up
}

fn num(v: &serde_json::Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing or not a number in {v}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// 500 runs submitted at once: all succeed, and the first starts about as
/// soon as a lone run on the idle cluster does. Both are measured warm: the
/// baseline runs right after a warm-up run of the same deployment, and the
/// burst finds that runner idle. Then `ember bench burst` with its raw
/// pool measurement, on 100 runs.
#[test]
fn burst_of_500_starts_like_a_single_run() {
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
    let mut up = start_up(
        tmp.path(),
        &[
            "--nodes",
            "1",
            "--slots",
            "4",
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
    let env = std::fs::read_to_string(data.join("env")).expect("DATA/env");
    let var = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .unwrap_or_else(|| panic!("{name} missing in {env}"))
            .to_owned()
    };
    let (url, token) = (var("EMBER_CONTROL"), var("EMBER_TOKEN"));
    // The bench's own store and raw pool, apart from the node's.
    let bench_root = tmp.path().join("bench-root");
    let ember_client = |args: &[&str]| {
        let out = Command::new(ember())
            .arg("--root")
            .arg(&bench_root)
            .args(args)
            .env("EMBER_CONTROL", &url)
            .env("EMBER_TOKEN", &token)
            .env("EMBER_AGENT", &agent)
            .output()
            .expect("run ember");
        assert!(
            out.status.success(),
            "ember {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let out = ember_client(args);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ember_client(&["nodes", "--json"]).contains("\"node-0\"") {
        assert!(Instant::now() < deadline, "the node never registered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let bench = |runs: &str, extra: &[&str]| {
        let mut args = vec![
            "bench", "burst", "--image", &image, "--json", "--runs", runs,
        ];
        args.extend_from_slice(extra);
        json(&args)
    };

    // A lone run on the idle cluster, cold (pull through the cache, a new
    // runner) for the record, then warm five times: each right after one
    // warm-up run of the same deployment, so its runner is idle and
    // unfrozen.
    let cold = bench("1", &["--warmup", "0", "--no-raw"]);
    let single: Vec<f64> = (0..5)
        .map(|_| {
            num(
                &bench("1", &["--warmup", "1", "--no-raw"]),
                "first_start_ms",
            )
        })
        .collect();
    let baseline = median(single.clone());
    // The bound scales with the slowest lone run: when the machine stalls
    // (an fsync behind a build's writeback took 350 ms in one CI run), it
    // stalls the burst too, and the test is about the burst's runs not
    // delaying the first one, not about this machine's disk.
    let slowest = single.iter().copied().fold(baseline, f64::max);
    let before: serde_json::Value = json(&["runs", "--json", "--all"]);
    let max_before = before
        .as_array()
        .expect("runs array")
        .iter()
        .filter_map(|r| r["id"].as_i64())
        .max()
        .expect("the baseline's runs");

    // 500 at once, with no warm-up of their own: the cluster is as the
    // baseline left it, one warm runner idle.
    let t = Instant::now();
    let burst = bench("500", &["--warmup", "0", "--no-raw"]);
    let burst_wall = t.elapsed();
    let first = num(&burst, "first_start_ms");
    let bound = 3.0 * slowest + 300.0;
    eprintln!(
        "single run (submit → process started): cold {} ms, warm {single:?} ms, median {baseline} ms, slowest {slowest} ms; \
         burst of 500: first start {first} ms (bound {bound} ms), p50 {} ms, p99 {} ms, \
         {:.0} runs/s, {:.1} s in all",
        cold["first_start_ms"],
        burst["p50_ms"],
        burst["p99_ms"],
        num(&burst, "runs_per_s"),
        burst_wall.as_secs_f64()
    );

    // What the control plane recorded, read independently of the bench.
    let all: serde_json::Value = json(&["runs", "--json", "--all"]);
    let mine: Vec<&serde_json::Value> = all
        .as_array()
        .expect("runs array")
        .iter()
        .filter(|r| r["id"].as_i64().is_some_and(|id| id > max_before))
        .collect();
    assert_eq!(mine.len(), 500, "the burst's runs");
    for r in &mine {
        assert_eq!(r["state"], "succeeded", "{r}");
        assert_eq!(r["exit_code"], 0, "{r}");
    }
    let field = |r: &serde_json::Value, path: &[&str]| {
        path.iter()
            .fold(r, |v, k| &v[k])
            .as_u64()
            .unwrap_or_else(|| panic!("{path:?} missing in {r}"))
    };
    let first_submit = mine
        .iter()
        .map(|r| field(r, &["submitted_at"]))
        .min()
        .expect("runs");
    let first_started = mine
        .iter()
        .map(|r| field(r, &["times", "process_started"]))
        .min()
        .expect("runs");
    assert_eq!(
        (first_started - first_submit) as f64,
        first,
        "the bench's first start is the records'"
    );
    assert_eq!(num(&burst, "succeeded"), 500.0);
    assert_eq!(num(&burst, "failed"), 0.0);
    // Where the first start's time went, for the message.
    let earliest = mine
        .iter()
        .min_by_key(|r| field(r, &["times", "process_started"]))
        .expect("runs");
    let phases: Vec<String> = earliest["times"]
        .as_object()
        .expect("times")
        .iter()
        .filter_map(|(k, v)| Some(format!("{k} +{}", v.as_u64()?.checked_sub(first_submit)?)))
        .collect();
    assert!(
        first <= bound,
        "the first of 500 started after {first} ms; a lone warm run after {baseline} ms, \
         {slowest} ms at the slowest (bound 3 × that + 300 ms = {bound} ms). The first to start was {} (submitted +{} ms): \
         {}; all 500 submitted in {} ms",
        earliest["id"],
        field(earliest, &["submitted_at"]) - first_submit,
        phases.join(", "),
        burst["submit_ms"]
    );

    // The bench with its raw pool measurement, on 100 runs (4 warm-up runs,
    // one per slot; 4 raw threads, one per slot).
    let r = bench("100", &[]);
    eprintln!("ember bench burst --runs 100: {r}");
    assert_eq!(num(&r, "requested"), 100.0);
    assert_eq!(num(&r, "succeeded"), 100.0);
    assert_eq!(num(&r, "failed"), 0.0);
    assert_eq!(num(&r, "submit_errors"), 0.0);
    assert_eq!(num(&r, "warmup"), 4.0);
    assert_eq!(num(&r, "raw_concurrency"), 4.0);
    assert_eq!(num(&r, "raw_n"), 100.0);
    let (rps, raw) = (num(&r, "runs_per_s"), num(&r, "raw_runs_per_s"));
    let (p50, p99, max) = (num(&r, "p50_ms"), num(&r, "p99_ms"), num(&r, "max_ms"));
    let first = num(&r, "first_start_ms");
    assert!(rps > 0.0 && raw > 0.0, "{r}");
    assert!(p50 <= p99 && p99 <= max, "{r}");
    // The earliest start can be no later than the first run's own start.
    assert!(first <= max, "{r}");
    // Every run started after the first submit and ended by the last final.
    assert!(num(&r, "span_ms") >= max, "{r}");
    let overhead = num(&r, "overhead");
    assert!(
        (overhead - (1.0 - rps / raw)).abs() < 1e-9 && overhead < 1.0,
        "{r}"
    );

    // The command after `--` is what the runs (and the raw pool) run: each
    // run prints a marker, which its log holds; its deployment is not the
    // default one, which runs `true`.
    let marker = "burst-marker-5d1";
    let script = format!("echo {marker}");
    let c = bench(
        "3",
        &[
            "--warmup",
            "0",
            "--raw-runs",
            "5",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    assert_eq!(num(&c, "succeeded"), 3.0, "{c}");
    assert_eq!(num(&c, "raw_n"), 5.0, "{c}");
    assert_eq!(c["command"], serde_json::json!(["sh", "-c", script]), "{c}");
    assert_ne!(c["deployment"], r["deployment"], "{c}");
    let all: serde_json::Value = json(&["runs", "--json", "--all"]);
    let custom: Vec<&serde_json::Value> = all
        .as_array()
        .expect("runs array")
        .iter()
        .filter(|run| run["deployment"] == c["deployment"])
        .collect();
    assert_eq!(custom.len(), 3, "the custom burst's runs");
    for run in custom {
        assert_eq!(run["command"], c["command"], "{run}");
        let id = run["id"].to_string();
        let log = ember_client(&["logs", id.trim_matches('"')]);
        assert!(log.contains(marker), "run {id} printed {log:?}");
    }

    up.stop();
    assert_eq!(runners(&data.join("node-0")), 0, "node runners left behind");
    assert_eq!(
        runners(&bench_root.join("bench")),
        0,
        "raw pool runners left behind"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&*tmp.path().to_string_lossy()),
        "mounts left under {}",
        tmp.path().display()
    );
}
