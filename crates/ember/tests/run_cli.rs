//! `ember run` end to end: real registry, real overlayfs, real runc.

mod common;

use common::*;
use ember_testkit::registry::Registry;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn setup(names: &[&str]) -> (Registry, tempfile::TempDir) {
    (registry_with(names), tempfile::tempdir().expect("tempdir"))
}

/// Nothing of a container may outlive it: no mounts under the store, no
/// runc state, no container directory, no claim on the image.
fn assert_no_leftovers(root: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let root_s = root.to_string_lossy();
    assert!(
        !mounts.lines().any(|l| l.contains(&*root_s)),
        "mounts left under {root_s}"
    );
    for d in ["containers", "runc", "users"] {
        let p = root.join(d);
        if let Ok(rd) = std::fs::read_dir(&p) {
            let left: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
            assert!(left.is_empty(), "{} not empty: {left:?}", p.display());
        }
    }
}

#[test]
fn runs_pulls_and_propagates_exit_codes() {
    let (registry, tmp) = setup(&["busybox", "layers"]);
    let root = tmp.path().join("store");
    let image = format!("{}/ember/busybox:latest", registry.addr());

    // Cold: pulls, then runs the image's default command.
    let out = run_ember(&root, &["run", "--rm", "--timings=json", &image]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from ember\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let json_line = stderr.lines().last().expect("timings line");
    let t: serde_json::Value = serde_json::from_str(json_line).expect("timings json");
    assert_eq!(t["pulled"], true);
    for k in [
        "resolve_ms",
        "pull_ms",
        "unpack_ms",
        "mount_ms",
        "create_ms",
        "first_output_ms",
        "total_ms",
    ] {
        assert!(t[k].is_number(), "{k} missing in {json_line}");
    }

    // Hot: no pull; exit code, env, workdir and user carried through.
    let out = run_ember(
        &root,
        &[
            "run",
            "--timings=json",
            "-e",
            "GREETING=hi there",
            "-w",
            "/tmp",
            "-u",
            "app",
            &image,
            "--",
            "sh",
            "-c",
            "echo \"$GREETING\"; pwd; id -u; exit 7",
        ],
    );
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi there\n/tmp\n1000\n"
    );
    let t: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .expect("line"),
    )
    .expect("json");
    assert_eq!(t["pulled"], false);

    // The container sees the layered filesystem: whiteouts hide, opaque
    // directories replace, and there is no network but loopback.
    let out = ember_ok(
        &root,
        &[
            "run",
            &format!("{}/ember/layers:latest", registry.addr()),
            "--",
            "sh",
            "-c",
            "ls /data/opaque; test -e /data/removed.txt && echo LEAK; cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '",
        ],
    );
    assert!(!out.contains("LEAK"), "{out}");
    assert!(out.lines().any(|l| l == "lo"), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("eth")), "{out}");

    // A memory limit reaches the container's cgroup.
    let out = ember_ok(
        &root,
        &[
            "run",
            "--memory",
            "64M",
            &image,
            "--",
            "sh",
            "-c",
            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
        ],
    );
    assert_eq!(out.trim(), (64u64 << 20).to_string());
    assert_no_leftovers(&root);
}

#[test]
fn bad_input_is_refused_clearly() {
    let (registry, tmp) = setup(&["busybox"]);
    let root = tmp.path().join("store");
    let image = format!("{}/ember/busybox:latest", registry.addr());
    for (args, expect) in [
        (
            vec!["run", "--memory", "lots", image.as_str()],
            "invalid size",
        ),
        (vec!["run", "-e", "NOEQUALS", image.as_str()], "KEY=VALUE"),
        (vec!["run", "--cpus", "0", image.as_str()], "--cpus"),
        (vec!["run", "-w", "relative", image.as_str()], "absolute"),
        (vec!["run", "Not/A/Valid:Ref:"], "invalid reference"),
    ] {
        let out = run_ember(&root, &args);
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    let missing = format!("{}/ember/nope:latest", registry.addr());
    let out = run_ember(&root, &["run", &missing]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not found") && err.contains("ember/nope"),
        "{err}"
    );
    // A command that does not exist in the image fails like a runtime does.
    let out = run_ember(&root, &["run", &image, "--", "/no/such/binary"]);
    assert_ne!(out.status.code(), Some(0));
    assert_no_leftovers(&root);
}

#[test]
fn timeout_and_ctrl_c_clean_up() {
    let (registry, tmp) = setup(&["busybox"]);
    let root = tmp.path().join("store");
    let image = format!("{}/ember/busybox:latest", registry.addr());
    ember_ok(&root, &["pull", "-q", &image]);

    let out = run_ember(
        &root,
        &["run", "--timeout", "1", &image, "--", "sleep", "60"],
    );
    assert_eq!(out.status.code(), Some(137));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timeout"));
    assert_no_leftovers(&root);

    // SIGINT to ember (as Ctrl-C would send) is forwarded; a shell as PID
    // 1 ignores it, so after the stop timeout the container is killed and
    // everything is cleaned up.
    let mut child = Command::new(ember())
        .arg("--root")
        .arg(&root)
        .args([
            "run",
            "--stop-timeout",
            "1",
            &image,
            "--",
            "sh",
            "-c",
            "echo started; sleep 60",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 8];
    std::io::Read::read_exact(&mut stdout, &mut first).expect("container started");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "ember did not exit after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    assert_no_leftovers(&root);
}
