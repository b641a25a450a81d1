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
