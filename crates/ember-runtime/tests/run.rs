//! End-to-end runs on real runc and overlayfs (root required).

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use common::{Fixture, assert_gone, unique_id, wait_for};
use ember_runtime::{
    Container, ContainerError, ContainerStdio, RootFs, RunOptions, RunOutcome, RunSpec, RuncError,
    UserError,
};
use nix::sys::signal::Signal;

fn captured(p: &ember_runtime::Prepared) -> RunOutcome {
    p.run_with(RunOptions {
        stdio: ContainerStdio::captured(),
        ..RunOptions::default()
    })
    .unwrap()
}

fn stdout(o: &RunOutcome) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn output_is_captured_and_exit_code_returned() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    let id = unique_id("exit3");
    let p = f.prepare(
        &id,
        &["/bin/sh", "-c", "echo hi; echo oops >&2; exit 3"],
        RunSpec::default(),
    );
    let dir = p.bundle().to_path_buf();
    let out = captured(&p);
    assert_eq!(out.exit_code, 3);
    assert_eq!(stdout(&out), "hi\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    assert!(!out.timed_out);
    assert!(out.timings.run > Duration::ZERO && out.timings.mount > Duration::ZERO);
    p.cleanup().unwrap();
    assert_gone(&f.runc, &id, &dir);
    // Cleanup is idempotent, and dropping afterwards is harmless.
    p.cleanup().unwrap();
}

#[test]
fn overlay_applies_whiteouts_opaque_dirs_and_keeps_writes_in_upper() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    let id = unique_id("overlay");
    let script = "test -e /data/gone.txt && echo gone-visible; \
                  ls /opq; cat /data/over.txt /data/kept.txt; echo new > /written";
    let p = f.prepare(&id, &["/bin/sh", "-c", script], RunSpec::default());
    let out = captured(&p);
    assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout(&out), "new.txt\ntop\nbase\n");
    assert_eq!(
        fs::read_to_string(p.bundle().join("upper/written")).unwrap(),
        "new\n"
    );
    // The layers themselves are untouched.
    assert!(!f.layers[1].join("written").exists());
    assert!(f.layers[0].join("data/gone.txt").exists());
}

#[test]
fn runs_as_numeric_and_named_users() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    for (user, expect) in [
        ("1000", "1000 1000 50\n"),
        ("app", "1000 1000 50\n"),
        ("1000:7", "1000 7\n"),
    ] {
        let id = unique_id("user");
        let run = RunSpec {
            user: Some(user.into()),
            ..RunSpec::default()
        };
        let p = f.prepare(&id, &["/bin/sh", "-c", "echo $(id -u) $(id -G)"], run);
        let out = captured(&p);
        assert_eq!(stdout(&out), expect, "user {user}");
    }
    let id = unique_id("nouser");
    let err = Container::new(f.runc.clone(), &id, f.base.join(&id))
        .prepare(
            &f.layers,
            &common::image(),
            &RunSpec {
                user: Some("nobody-here".into()),
                ..RunSpec::default()
            },
        )
        .unwrap_err();
    assert!(matches!(
        err,
        ContainerError::User {
            source: UserError::UnknownUser { .. },
            ..
        }
    ));
    // A failed prepare leaves nothing behind.
    assert_gone(&f.runc, &id, &f.base.join(&id));
}

#[test]
fn env_and_workdir_are_applied() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    let id = unique_id("env");
    let run = RunSpec {
        env: vec![("FOO".into(), "run".into()), ("NEW".into(), "x y".into())],
        workdir: Some("/srv/app".into()),
        user: Some("app".into()),
        ..RunSpec::default()
    };
    let p = f.prepare(
        &id,
        &["/bin/sh", "-c", "echo $FOO $BAR $NEW $HOME; pwd"],
        run,
    );
    let out = captured(&p);
    assert_eq!(stdout(&out), "run keep x y /home/app\n/srv/app\n");
}

#[test]
fn resource_limits_reach_the_cgroup() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    let id = unique_id("limits");
    // Host and container talk through a bind-mounted directory: writing
    // into the overlay's upper directory from outside is not seen inside.
    let ctl = f.tmp.path().join("ctl");
    fs::create_dir_all(&ctl).unwrap();
    let run = RunSpec {
        memory_bytes: Some(64 << 20),
        cpus: Some(0.5),
        pids_limit: Some(100),
        mounts: vec![ember_runtime::BindMount {
            source: ctl.clone(),
            destination: "/ctl".into(),
            readonly: false,
        }],
        ..RunSpec::default()
    };
    // Read from inside (runc binds the container's own cgroups there) and,
    // while it runs, from outside.
    let script = "cat /sys/fs/cgroup/memory/memory.limit_in_bytes \
                  /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/pids/pids.max; \
                  touch /ctl/ready; while test ! -e /ctl/go; do sleep 0.05; done";
    let p = f.prepare(&id, &["/bin/sh", "-c", script], run);
    let out = std::thread::scope(|s| {
        let h = s.spawn(|| captured(&p));
        wait_for(&ctl.join("ready"));
        let outside = fs::read_to_string(format!(
            "/sys/fs/cgroup/memory/ember/{id}/memory.limit_in_bytes"
        ));
        fs::write(ctl.join("go"), "").unwrap();
        assert_eq!(outside.unwrap().trim(), (64u64 << 20).to_string());
        h.join().unwrap()
    });
    assert_eq!(stdout(&out), format!("{}\n50000\n100\n", 64u64 << 20));
}

#[test]
fn network_none_has_only_loopback() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    let id = unique_id("net");
    let p = f.prepare(&id, &["/bin/cat", "/proc/net/dev"], RunSpec::default());
    let out = captured(&p);
    let ifaces: Vec<String> = stdout(&out)
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_owned()))
        .collect();
    assert_eq!(ifaces, ["lo"]);
}

#[test]
fn kill_by_signal_is_128_plus_n_and_catchable_signals_are_forwarded() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    // SIGKILL goes through `runc kill`.
    let id = unique_id("kill");
    let p = f.prepare(
        &id,
        &["/bin/sh", "-c", "touch /ready; exec sleep 1000"],
        RunSpec::default(),
    );
    let ready = p.bundle().join("upper/ready");
    let handle = p.handle();
    let out = std::thread::scope(|s| {
        let h = s.spawn(|| captured(&p));
        wait_for(&ready);
        handle.signal(Signal::SIGKILL).unwrap();
        h.join().unwrap()
    });
    assert_eq!(out.exit_code, 137);

    // SIGTERM goes to runc, which forwards it to the container.
    let id = unique_id("term");
    let script = "trap 'exit 42' TERM; touch /ready; while :; do sleep 0.05; done";
    let p = f.prepare(&id, &["/bin/sh", "-c", script], RunSpec::default());
    let ready = p.bundle().join("upper/ready");
    let handle = p.handle();
    let out = std::thread::scope(|s| {
        let h = s.spawn(|| captured(&p));
        wait_for(&ready);
        handle.signal(Signal::SIGTERM).unwrap();
        // The caller's grace period before cleanup would SIGKILL.
        assert!(handle.wait_stopped(Duration::from_secs(60)));
        h.join().unwrap()
    });
    assert_eq!(out.exit_code, 42);
}

#[test]
fn timeout_kills_the_container() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    let id = unique_id("timeout");
    let p = f.prepare(&id, &["/bin/sleep", "1000"], RunSpec::default());
    let dir = p.bundle().to_path_buf();
    let out = p
        .run_with(RunOptions {
            stdio: ContainerStdio::null(),
            timeout: Some(Duration::from_millis(300)),
            ..RunOptions::default()
        })
        .unwrap();
    assert!(out.timed_out);
    assert_eq!(out.exit_code, 137);
    drop(p);
    assert_gone(&f.runc, &id, &dir);
}

#[test]
fn cleanup_during_a_run_kills_and_removes_everything() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    let id = unique_id("midrun");
    let p = f.prepare(
        &id,
        &["/bin/sh", "-c", "touch /ready; exec sleep 1000"],
        RunSpec {
            memory_bytes: Some(32 << 20),
            ..RunSpec::default()
        },
    );
    let dir = p.bundle().to_path_buf();
    let handle = p.handle();
    let out = std::thread::scope(|s| {
        let h = s.spawn(|| captured(&p));
        wait_for(&dir.join("upper/ready"));
        // What the caller's SIGINT/SIGTERM thread does.
        handle.cleanup().unwrap();
        h.join().unwrap()
    });
    assert_eq!(out.exit_code, 137);
    assert_gone(&f.runc, &id, &dir);
    assert!(matches!(p.run(), Err(ContainerError::CleanedUp { .. })));
}

#[test]
fn runc_failures_are_errors_naming_the_container() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    let id = unique_id("noexec");
    let p = f.prepare(&id, &["/no/such/binary"], RunSpec::default());
    let err = p
        .run_with(RunOptions {
            stdio: ContainerStdio::captured(),
            ..RunOptions::default()
        })
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, ContainerError::Runc(RuncError::Failed { .. })),
        "{err:?}"
    );
    assert!(
        msg.contains(&id) && msg.contains("/no/such/binary"),
        "{msg}"
    );
    assert_eq!(err.docker_exit_code(), 127);
    let dir = p.bundle().to_path_buf();
    drop(p);
    assert_gone(&f.runc, &id, &dir);
}

#[test]
fn overlay_handles_one_zero_and_many_layers() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    // One layer: overlayfs is fine with a single lower beside an upper.
    let dir = f.tmp.path().join("one");
    let mut r = RootFs::mount(&dir, &f.layers[..1]).unwrap();
    assert!(r.path().join("data/gone.txt").exists());
    // This kernel (≥ 5.10) takes `volatile`: no sync of the upper at unmount.
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.contains(&*r.path().to_string_lossy()))
        .unwrap();
    assert!(line.contains("volatile"), "{line}");
    r.unmount().unwrap();
    r.unmount().unwrap();
    assert!(common::mounts_at_or_under(&dir).is_empty());

    // No layers at all.
    let dir = f.tmp.path().join("none");
    let r = RootFs::mount(&dir, &[] as &[PathBuf]).unwrap();
    assert_eq!(fs::read_dir(r.path()).unwrap().count(), 0);
    drop(r);
    assert!(common::mounts_at_or_under(&dir).is_empty());

    // Far more layers than absolute paths fit in one page of options.
    let many = f.tmp.path().join("a-rather-long-directory-name-for-layers");
    let mut layers = Vec::new();
    for i in 0..200 {
        let l = many.join(format!("sha256-{i:064}"));
        fs::create_dir_all(&l).unwrap();
        fs::write(l.join(format!("f{i}")), "").unwrap();
        fs::write(l.join("shared"), i.to_string()).unwrap();
        layers.push(l);
    }
    let total: usize = layers.iter().map(|l| l.as_os_str().len() + 1).sum();
    assert!(total > 4096);
    let dir = f.tmp.path().join("many");
    let mut r = RootFs::mount(&dir, &layers).unwrap();
    assert_eq!(r.layer_count(), 200);
    assert!(r.path().join("f0").exists() && r.path().join("f199").exists());
    // The last layer in manifest order is the top one.
    assert_eq!(fs::read_to_string(r.path().join("shared")).unwrap(), "199");
    r.unmount().unwrap();
    assert!(common::mounts_at_or_under(&dir).is_empty());
}

#[test]
fn hostname_and_readonly_rootfs() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    let id = unique_id("ro");
    let run = RunSpec {
        hostname: Some("box".into()),
        readonly_rootfs: true,
        ..RunSpec::default()
    };
    let p = f.prepare(
        &id,
        &[
            "/bin/sh",
            "-c",
            "hostname; touch /x 2>/dev/null || echo readonly",
        ],
        run,
    );
    assert_eq!(stdout(&captured(&p)), "box\nreadonly\n");
}

#[test]
fn bind_mounts_are_applied() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    let host = f.tmp.path().join("host-share");
    fs::create_dir_all(&host).unwrap();
    fs::write(host.join("in.txt"), "from host\n").unwrap();
    let id = unique_id("bind");
    let run = RunSpec {
        mounts: vec![ember_runtime::BindMount {
            source: host.clone(),
            destination: "/mnt/share".into(),
            readonly: true,
        }],
        ..RunSpec::default()
    };
    let p = f.prepare(
        &id,
        &[
            "/bin/sh",
            "-c",
            "cat /mnt/share/in.txt; touch /mnt/share/y 2>/dev/null || echo ro",
        ],
        run,
    );
    assert_eq!(stdout(&captured(&p)), "from host\nro\n");
    assert!(!host.join("y").exists());
}

/// The warm pool's use: an init process that runs exactly as given, as
/// root in `/`, while the run's user is still resolved for its execs; started
/// with `spawn`, which returns at once, and cleaned up after it exits.
#[test]
fn an_init_process_runs_as_given_and_spawn_returns_at_once() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    let id = unique_id("init");
    // An Entrypoint the init must not get in front of it, and a working
    // directory it must not start in.
    let image: oci_spec::image::ImageConfiguration = serde_json::from_str(
        r#"{
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/bin"],
                "Entrypoint": ["/bin/false"],
                "Cmd": ["/bin/sh"],
                "WorkingDir": "/bin"
            },
            "rootfs": {"type": "layers", "diff_ids": []}
        }"#,
    )
    .unwrap();
    let run = RunSpec {
        user: Some("app".into()),
        ..RunSpec::default()
    };
    let dir = f.base.join(&id);
    let p = Container::new(f.runc.clone(), &id, &dir)
        .init_process(vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo $(id -u) $(pwd); sleep 2".into(),
        ])
        .prepare(&f.layers, &image, &run)
        .unwrap();
    assert_eq!((p.user().uid, p.user().gid), (1000, 1000));
    assert_eq!(p.cgroups_path(), format!("/ember/{id}"));
    let process = p.spawn(ContainerStdio::captured()).unwrap();
    // spawn did not wait for it: it shows up in its cgroups while it runs
    // (runc creates them a moment after the spawn).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !p.cgroups().procs().is_ok_and(|procs| !procs.is_empty()) {
        assert!(
            std::time::Instant::now() < deadline,
            "no processes in {}",
            p.cgroups_path()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let exit = process.wait().unwrap();
    assert_eq!(exit.exit_code, 0);
    assert_eq!(String::from_utf8_lossy(&exit.stdout), "0 /\n");
    p.cleanup().unwrap();
    assert_gone(&f.runc, &id, &dir);
}
