//! `ember bench warm` end to end with the real agent and runc: the JSON
//! report has the figures the README quotes, and the bench leaves nothing
//! running. Small N: this checks the plumbing, not the speed.

mod common;

use common::*;

#[test]
fn bench_warm_reports_json() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let registry = registry_with(&["busybox"]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    let image = format!("{}/ember/busybox:latest", registry.addr());
    for extra in [&[][..], &["--paused"][..]] {
        let mut args = vec![
            "bench",
            "warm",
            "--image",
            &image,
            "--n",
            "50",
            "--runc-n",
            "5",
            "--podman-n",
            "0",
            "--json",
            "--agent",
        ];
        let agent_s = agent.to_string_lossy().into_owned();
        args.push(&agent_s);
        args.extend_from_slice(extra);
        let out = ember_ok(&root, &args);
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
        for k in ["actions_per_s", "p50_ms", "p99_ms", "dispatch_p50_ms"] {
            assert!(
                v[k].as_f64().is_some_and(|x| x > 0.0),
                "{k} missing or not positive in {v}"
            );
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&*root.to_string_lossy()),
        "bench left mounts under the store"
    );
}

/// The command after `--` is what every action runs, in the pool and in
/// the `runc exec` peer: a shell command that writes a marker succeeds and
/// is reported, and one that writes a marker to stderr and exits 3 fails
/// the bench with that marker and that status (so it was not `true` that
/// ran).
#[test]
fn bench_warm_runs_the_command_after_dashes() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let registry = registry_with(&["busybox"]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let agent_s = agent.to_string_lossy().into_owned();
    let base = [
        "bench",
        "warm",
        "--image",
        &image,
        "--n",
        "10",
        "--podman-n",
        "0",
        "--json",
        "--agent",
        &agent_s,
    ];

    // Writes a marker file and checks it is there: needs a shell, so
    // `true` alone could not stand in for it.
    let script = "echo bench-marker-ok >/tmp/marker && grep -q bench-marker-ok /tmp/marker";
    let mut args = base.to_vec();
    args.extend(["--runc-n", "3", "--", "sh", "-c", script]);
    let out = ember_ok(&root, &args);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["command"], serde_json::json!(["sh", "-c", script]), "{v}");
    assert_eq!(v["n"], 10, "{v}");
    assert_eq!(v["runc_exec"]["n"], 3, "the runc exec peer ran it too: {v}");

    // A marker on stderr and exit 3: the bench fails and says both.
    let mut args = base.to_vec();
    args.extend([
        "--runc-n",
        "0",
        "--",
        "sh",
        "-c",
        "echo bench-marker-7f3 >&2; exit 3",
    ]);
    let out = run_ember(&root, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a failing command must fail the bench"
    );
    assert!(
        stderr.contains("bench-marker-7f3") && stderr.contains("exit 3"),
        "the failure names the command's stderr and status: {stderr}"
    );

    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&*root.to_string_lossy()),
        "bench left mounts under the store"
    );
}
