//! CRIU checkpoints and restores on real runc, CRIU and overlayfs (root
//! required). Tests that need CRIU fail with a clear message when it is
//! missing or unusable (install it with scripts/install-criu.sh), unless
//! EMBER_TEST_SKIP_PRIVILEGED=1.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Fixture, assert_gone, unique_id};
use ember_runtime::checkpoint::{self, METADATA_FILE};
use ember_runtime::runc::ContainerStatus;
use ember_runtime::{
    CheckpointError, CheckpointOptions, ContainerStdio, Criu, ImageIdentity, Metadata, Prepared,
    RestoreTarget, RunSpec,
};

/// A shell that keeps its state in memory: a token drawn once at start and
/// a counter, both written to `/count` every 50 ms. A process restarted from
/// scratch would draw a new token and count from 1.
const COUNTER: &str = "tok=$(cat /proc/sys/kernel/random/uuid); i=0; \
    while :; do i=$((i+1)); echo \"$tok $i\" > /count; sleep 0.05; done";

/// The CRIU on `PATH`, probed; `None` (skip) only when the environment asks.
fn criu() -> Option<Criu> {
    let criu = Criu::default();
    match criu.probe() {
        Ok(info) => {
            eprintln!(
                "CRIU {} at {} (kernel-feature cache {})",
                info.version,
                info.binary.display(),
                if info.kdat_cached {
                    "present"
                } else {
                    "missing"
                }
            );
            Some(criu)
        }
        Err(e) if std::env::var("EMBER_TEST_SKIP_PRIVILEGED").as_deref() == Ok("1") => {
            eprintln!("skipping (EMBER_TEST_SKIP_PRIVILEGED=1): {e}");
            None
        }
        Err(e) => panic!(
            "this test needs a working CRIU: {e}\n\
             install it with `scripts/install-criu.sh` (as root), or set \
             EMBER_TEST_SKIP_PRIVILEGED=1 to skip"
        ),
    }
}

/// A restore target without rebinds.
fn target<'a>(
    id: &'a str,
    dir: &'a Path,
    layers: &'a [std::path::PathBuf],
    image: &'a ImageIdentity,
) -> RestoreTarget<'a, std::path::PathBuf> {
    RestoreTarget {
        id,
        dir,
        layers,
        image,
        rebind: &[],
    }
}

fn image() -> ImageIdentity {
    ImageIdentity {
        digest: "sha256:1111".into(),
        layers: vec!["sha256:base".into(), "sha256:top".into()],
    }
}

/// Prepares and starts `args` detached (create + start), stdio on /dev/null.
fn start(f: &Fixture, name: &str, args: &[&str]) -> Prepared {
    let id = unique_id(name);
    let p = f.prepare(&id, args, RunSpec::default());
    f.runc
        .create(&id, p.bundle(), ContainerStdio::null())
        .unwrap();
    f.runc.start(&id).unwrap();
    p
}

/// `(token, count)` from a counter's `/count`, if it has been written.
fn read_count(path: &Path) -> Option<(String, u64)> {
    let text = fs::read_to_string(path).ok()?;
    let (tok, n) = text.trim().split_once(' ')?;
    Some((tok.to_owned(), n.parse().ok()?))
}

/// Waits (generously) until `/count` under `path` satisfies `ok`.
fn wait_count(path: &Path, ok: impl Fn(&str, u64) -> bool) -> (String, u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((tok, n)) = read_count(path)
            && ok(&tok, n)
        {
            return (tok, n);
        }
        assert!(
            Instant::now() < deadline,
            "{} never got there (now {:?})",
            path.display(),
            read_count(path)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_checkpoint_restores_twice_as_independent_containers_that_carry_on() {
    let Some(criu) = criu() else { return };
    let f = Fixture::new();
    let p = start(&f, "ckpt-src", &["/bin/sh", "-c", COUNTER]);
    let src_count = p.bundle().join("upper/count");
    wait_count(&src_count, |_, n| n >= 3);

    let dest = f.tmp.path().join("checkpoints/c1");
    let ckpt = checkpoint::checkpoint(
        &f.runc,
        &criu,
        p.id(),
        p.bundle(),
        &dest,
        &image(),
        CheckpointOptions::default(),
    )
    .unwrap();
    eprintln!(
        "checkpoint: runc checkpoint {:?}, total {:?}",
        ckpt.dump_time, ckpt.total_time
    );
    // Without leave_running the source is ended.
    let status = f.runc.state(p.id()).unwrap().status;
    assert_eq!(status, ContainerStatus::Stopped);
    // The saved filesystem changes are those of the dumped moment.
    let (tok, at) = read_count(&dest.join("upper/count")).unwrap();
    let meta = Metadata::read(&dest).unwrap();
    assert_eq!(meta.image, image());
    assert_eq!(meta.source_id, p.id());
    assert_eq!(meta.host.criu_version, criu.version().unwrap());
    assert!(!meta.host.cpu_flags.is_empty());
    p.cleanup().unwrap();

    let mut restored = Vec::new();
    for n in 0..2 {
        let id = unique_id(&format!("restored{n}"));
        let dir = f.base.join(&id);
        let r = checkpoint::restore(
            &f.runc,
            &criu,
            &dest,
            &target(&id, &dir, &f.layers, &image()),
        )
        .unwrap();
        eprintln!(
            "restore {n}: runc restore {:?}, total {:?}",
            r.restore_time, r.total_time
        );
        assert!(r.pid() > 0);
        assert_eq!(f.runc.state(&id).unwrap().status, ContainerStatus::Running);
        restored.push(r);
    }
    // Each carries on from the checkpoint: the same token (memory came
    // back), counting on from where it was, in its own upper directory.
    for r in &restored {
        let (t, n) = wait_count(&r.bundle().join("upper/count"), |_, n| n >= at + 5);
        assert_eq!(t, tok, "{} restarted instead of being restored", r.id());
        assert!(n > at);
    }
    // They share nothing writable: the checkpoint is untouched, and ending
    // one leaves the other counting.
    assert_eq!(
        read_count(&dest.join("upper/count")),
        Some((tok.clone(), at))
    );
    let mut first = restored.remove(0);
    let (first_id, first_dir) = (first.id().to_owned(), first.bundle().to_path_buf());
    first.cleanup().unwrap();
    assert_gone(&f.runc, &first_id, &first_dir);
    let second = &restored[0];
    let count = second.bundle().join("upper/count");
    // Waited for, not read once: the counter rewrites the file in place,
    // so a read can catch it empty.
    let (_, now) = wait_count(&count, |_, _| true);
    wait_count(&count, |t, n| t == tok && n >= now + 3);

    // The checkpoint restores again after all that.
    let id = unique_id("restored-again");
    let again = checkpoint::restore(
        &f.runc,
        &criu,
        &dest,
        &target(&id, &f.base.join(&id), &f.layers, &image()),
    )
    .unwrap();
    wait_count(&again.bundle().join("upper/count"), |t, n| {
        t == tok && n > at
    });
    let (second_id, second_dir) = (second.id().to_owned(), second.bundle().to_path_buf());
    drop(restored);
    assert_gone(&f.runc, &second_id, &second_dir);
}

#[test]
fn leave_running_keeps_the_source_counting() {
    let Some(criu) = criu() else { return };
    let f = Fixture::new();
    let p = start(&f, "ckpt-live", &["/bin/sh", "-c", COUNTER]);
    let count = p.bundle().join("upper/count");
    let (tok, _) = wait_count(&count, |_, n| n >= 2);
    let dest = f.tmp.path().join("live");
    let ckpt = checkpoint::checkpoint(
        &f.runc,
        &criu,
        p.id(),
        p.bundle(),
        &dest,
        &image(),
        CheckpointOptions {
            leave_running: true,
            ..CheckpointOptions::default()
        },
    )
    .unwrap();
    assert!(ckpt.metadata.options.leave_running);
    assert_eq!(
        f.runc.state(p.id()).unwrap().status,
        ContainerStatus::Running
    );
    let (_, at) = read_count(&dest.join("upper/count")).unwrap();
    wait_count(&count, |t, n| t == tok && n >= at + 3);
    // A second checkpoint into the same place is refused.
    let again = checkpoint::checkpoint(
        &f.runc,
        &criu,
        p.id(),
        p.bundle(),
        &dest,
        &image(),
        CheckpointOptions::default(),
    );
    assert!(
        matches!(again, Err(CheckpointError::Exists { .. })),
        "{again:?}"
    );
    assert_eq!(
        f.runc.state(p.id()).unwrap().status,
        ContainerStatus::Running
    );
}

/// Rewrites one field of a checkpoint's metadata.
fn tamper(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(METADATA_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn restores_that_do_not_match_are_refused_and_leave_nothing() {
    let Some(criu) = criu() else { return };
    let f = Fixture::new();
    let p = start(&f, "ckpt-tamper", &["/bin/sh", "-c", COUNTER]);
    wait_count(&p.bundle().join("upper/count"), |_, n| n >= 1);
    let dest = f.tmp.path().join("t");
    checkpoint::checkpoint(
        &f.runc,
        &criu,
        p.id(),
        p.bundle(),
        &dest,
        &image(),
        CheckpointOptions::default(),
    )
    .unwrap();
    p.cleanup().unwrap();

    let refused = |from: &Path, image: &ImageIdentity| -> CheckpointError {
        let id = unique_id("refused");
        let dir = f.base.join(&id);
        let err = checkpoint::restore(&f.runc, &criu, from, &target(&id, &dir, &f.layers, image))
            .expect_err("the restore should have been refused");
        assert!(!dir.exists(), "a refused restore left {}", dir.display());
        assert!(!f.runc.has_state(&id));
        err
    };
    let what = |e: CheckpointError| match e {
        CheckpointError::Mismatch { what, .. } => what,
        other => panic!("expected a mismatch, got {other}"),
    };

    // Another image.
    let other = ImageIdentity {
        digest: "sha256:2222".into(),
        ..image()
    };
    assert_eq!(what(refused(&dest, &other)), "image digest");

    // Taken on another kernel; the message says what and both values.
    let k = f.tmp.path().join("kernel");
    fs::create_dir(&k).unwrap();
    copy_dir(&dest, &k);
    tamper(&k, |v| {
        v["host"]["kernel_release"] = "0.0.0-elsewhere".into()
    });
    let e = refused(&k, &image());
    let msg = e.to_string();
    assert!(
        msg.contains("kernel release") && msg.contains("0.0.0-elsewhere"),
        "{msg}"
    );
    assert_eq!(what(e), "kernel release");

    // With CPU features this machine lacks.
    fs::copy(dest.join(METADATA_FILE), k.join(METADATA_FILE)).unwrap();
    tamper(&k, |v| {
        v["host"]["cpu_flags"]
            .as_array_mut()
            .unwrap()
            .push("avx_from_the_future".into());
    });
    assert_eq!(what(refused(&k, &image())), "CPU features");

    // Another CRIU.
    fs::copy(dest.join(METADATA_FILE), k.join(METADATA_FILE)).unwrap();
    tamper(&k, |v| v["host"]["criu_version"] = "3.17".into());
    assert_eq!(what(refused(&k, &image())), "CRIU version");

    // A runtime configuration edited after the checkpoint.
    fs::copy(dest.join(METADATA_FILE), k.join(METADATA_FILE)).unwrap();
    tamper(&k, |v| v["runtime"]["uid"] = 4242.into());
    assert_eq!(what(refused(&k, &image())), "runtime configuration shape");

    // A rebind of a mount the checkpoint does not have.
    let id = unique_id("rebind");
    let dir = f.base.join(&id);
    let bogus = [ember_runtime::BindMount {
        source: f.tmp.path().to_path_buf(),
        destination: "/not/mounted".into(),
        readonly: false,
    }];
    let e = checkpoint::restore(
        &f.runc,
        &criu,
        &dest,
        &RestoreTarget {
            rebind: &bogus,
            ..target(&id, &dir, &f.layers, &image())
        },
    )
    .unwrap_err();
    assert!(matches!(e, CheckpointError::Rebind { .. }), "{e}");
    assert!(!dir.exists());

    // No metadata at all, or garbage.
    fs::remove_file(k.join(METADATA_FILE)).unwrap();
    assert!(matches!(
        refused(&k, &image()),
        CheckpointError::Metadata { .. }
    ));
    fs::write(k.join(METADATA_FILE), "{not json").unwrap();
    assert!(matches!(
        refused(&k, &image()),
        CheckpointError::Metadata { .. }
    ));

    // The untouched checkpoint still restores.
    let id = unique_id("accepted");
    let dir = f.base.join(&id);
    let mut r = checkpoint::restore(
        &f.runc,
        &criu,
        &dest,
        &target(&id, &dir, &f.layers, &image()),
    )
    .unwrap();
    r.cleanup().unwrap();
    assert_gone(&f.runc, &id, &dir);
}

#[test]
fn a_broken_image_fails_the_restore_quoting_criu_and_leaves_nothing() {
    let Some(criu) = criu() else { return };
    let f = Fixture::new();
    let p = start(&f, "ckpt-broken", &["/bin/sh", "-c", COUNTER]);
    wait_count(&p.bundle().join("upper/count"), |_, n| n >= 1);
    let dest = f.tmp.path().join("b");
    checkpoint::checkpoint(
        &f.runc,
        &criu,
        p.id(),
        p.bundle(),
        &dest,
        &image(),
        CheckpointOptions::default(),
    )
    .unwrap();
    p.cleanup().unwrap();
    // The metadata matches, but CRIU's process tree is gone.
    fs::remove_file(dest.join("criu/pstree.img")).unwrap();
    let id = unique_id("broken");
    let dir = f.base.join(&id);
    let err = checkpoint::restore(
        &f.runc,
        &criu,
        &dest,
        &target(&id, &dir, &f.layers, &image()),
    )
    .expect_err("a restore without pstree.img cannot work");
    match &err {
        CheckpointError::Restore { log_tail, log, .. } => {
            // CRIU's own error line leads the quote.
            assert!(
                log_tail.starts_with('(') && log_tail.contains("Error ("),
                "{log_tail}"
            );
            assert!(log.ends_with("criu-work/restore.log"), "{}", log.display());
        }
        other => panic!("expected a restore error, got {other}"),
    }
    assert!(err.to_string().contains("restore.log"), "{err}");
    assert_gone(&f.runc, &id, &dir);
}

#[test]
fn missing_or_bogus_criu_is_reported_clearly_and_the_container_is_untouched() {
    let missing = Criu::new("/nonexistent/criu");
    let e = missing.probe().unwrap_err();
    assert!(matches!(e, CheckpointError::CriuMissing { .. }), "{e:?}");
    let msg = ember_error::chain(&e).to_string();
    assert!(
        msg.contains("CRIU is missing")
            && msg.contains("install-criu.sh")
            && msg.contains("No such file"),
        "{msg}"
    );
    // A binary that is not CRIU at all.
    let bogus = Criu::new("/bin/true");
    let e = bogus.probe().unwrap_err();
    assert!(matches!(e, CheckpointError::CriuUnusable { .. }), "{e:?}");

    // Checkpointing with it fails before the container is frozen.
    let f = Fixture::new();
    let p = start(&f, "nocriu", &["/bin/sh", "-c", COUNTER]);
    let dest = f.tmp.path().join("never");
    let e = checkpoint::checkpoint(
        &f.runc,
        &missing,
        p.id(),
        p.bundle(),
        &dest,
        &image(),
        CheckpointOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, CheckpointError::CriuMissing { .. }), "{e:?}");
    assert!(!dest.exists());
    assert_eq!(
        f.runc.state(p.id()).unwrap().status,
        ContainerStatus::Running
    );
    // And a restore with it fails before touching anything.
    let id = unique_id("nocriu-restore");
    let dir = f.base.join(&id);
    let e = checkpoint::restore(
        &f.runc,
        &missing,
        &dest,
        &target(&id, &dir, &f.layers, &image()),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            CheckpointError::Metadata { .. } | CheckpointError::CriuMissing { .. }
        ),
        "{e:?}"
    );
    assert!(!dir.exists());
}

fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .args(["-a", "--no-target-directory"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn four_restores_at_once_each_carry_on() {
    let Some(criu) = criu() else { return };
    let f = Fixture::new();
    let p = start(&f, "ckpt-many", &["/bin/sh", "-c", COUNTER]);
    wait_count(&p.bundle().join("upper/count"), |_, n| n >= 2);
    let dest = f.tmp.path().join("many");
    checkpoint::checkpoint(
        &f.runc,
        &criu,
        p.id(),
        p.bundle(),
        &dest,
        &image(),
        CheckpointOptions::default(),
    )
    .unwrap();
    p.cleanup().unwrap();
    let (tok, at) = read_count(&dest.join("upper/count")).unwrap();
    let restored: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|n| {
                let (f, criu, dest) = (&f, &criu, &dest);
                s.spawn(move || {
                    let id = unique_id(&format!("many{n}"));
                    let dir = f.base.join(&id);
                    checkpoint::restore(
                        &f.runc,
                        criu,
                        dest,
                        &target(&id, &dir, &f.layers, &image()),
                    )
                    .map_err(|e| e.to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let restored: Vec<_> = restored.into_iter().map(Result::unwrap).collect();
    for r in &restored {
        eprintln!("{}: runc restore {:?}", r.id(), r.restore_time);
        wait_count(&r.bundle().join("upper/count"), |t, n| {
            t == tok && n >= at + 3
        });
    }
}

/// A counter that also reports, every round, what a masked directory, /dev
/// and the network look like from inside. Both files are replaced by a
/// rename, so a checkpoint never catches one truncated.
const REPORTER: &str = "tok=$(cat /proc/sys/kernel/random/uuid); i=0; \
    while :; do i=$((i+1)); { echo \"fw-entries=$(ls -A /sys/firmware | wc -l)\"; \
    if touch /sys/firmware/x 2>/dev/null; then echo fw-writable; else echo fw-readonly; fi; \
    echo \"lo-flags=$(cat /sys/class/net/lo/flags)\"; echo \"ifaces=$(ls /sys/class/net)\"; \
    echo \"dev=$(ls -A /dev)\"; echo \"shm=$(ls -A /dev/shm | wc -l)\"; } > /report.tmp; \
    mv /report.tmp /report; echo \"$tok $i\" > /count.tmp; mv /count.tmp /count; sleep 0.05; done";

/// `/report` under a container's upper directory once `/count` is past `n`
/// (so the report is one written after that moment).
fn report_after(bundle: &Path, n: u64) -> String {
    let (_, at) = wait_count(&bundle.join("upper/count"), |_, c| c > n + 1);
    assert!(at > n);
    fs::read_to_string(bundle.join("upper/report")).unwrap()
}

fn line<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {report}"))
}

#[test]
fn a_snapshot_runner_restores_with_masks_dev_and_network_as_a_fresh_container() {
    let Some(criu) = criu() else { return };
    let f = Fixture::new();
    // The runner shape ember-node uses for snapshots: masked /sys
    // directories as read-only binds, a network namespace of its own.
    let holder = ember_runtime::netns::NetnsHolder::spawn().unwrap();
    let id = unique_id("snaprunner");
    let spec = RunSpec {
        mask_with_binds: true,
        netns_path: Some(holder.path()),
        ..RunSpec::default()
    };
    let p = f.prepare(&id, &["/bin/sh", "-c", REPORTER], spec);
    f.runc
        .create(&id, p.bundle(), ContainerStdio::null())
        .unwrap();
    f.runc.start(&id).unwrap();
    // A fresh container of the default shape to compare with.
    let fresh = start(&f, "fresh", &["/bin/sh", "-c", REPORTER]);
    let fresh_report = report_after(fresh.bundle(), 1);
    let runner_report = report_after(p.bundle(), 1);

    let dest = f.tmp.path().join("checkpoints/runner");
    checkpoint::checkpoint(
        &f.runc,
        &criu,
        p.id(),
        p.bundle(),
        &dest,
        &image(),
        CheckpointOptions::default(),
    )
    .unwrap();
    // The dump records no network lock (inventory field 11 = skip, 2).
    let inv = fs::read(dest.join("criu/inventory.img")).unwrap();
    assert!(inv.ends_with(&[0x58, 0x02]), "{inv:02x?}");
    let (tok, at) = read_count(&dest.join("upper/count")).unwrap();
    p.cleanup().unwrap();
    drop(holder);

    let mut reports = Vec::new();
    let mut copies = Vec::new();
    for n in 0..2 {
        let id = unique_id(&format!("snapcopy{n}"));
        let r = checkpoint::restore(
            &f.runc,
            &criu,
            &dest,
            &target(&id, &f.base.join(&id), &f.layers, &image()),
        )
        .unwrap();
        let (t, _) = wait_count(&r.bundle().join("upper/count"), |_, c| c > at);
        assert_eq!(t, tok, "restarted instead of restored");
        reports.push(report_after(r.bundle(), at));
        copies.push(r);
    }
    // Each copy has its own network namespace, not the other's.
    let ns = |pid: i32| fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(ns(copies[0].pid()), ns(copies[1].pid()));
    assert_ne!(
        ns(copies[0].pid()),
        fs::read_link("/proc/self/ns/net").unwrap()
    );
    for report in reports.iter().chain([&runner_report]) {
        // Masked: empty and read-only, as runc's tmpfs mask is.
        assert_eq!(line(report, "fw-entries="), "0", "{report}");
        assert!(report.contains("fw-readonly"), "{report}");
        // Only lo, and up (IFF_UP | IFF_LOOPBACK), as in a fresh container.
        assert_eq!(line(report, "ifaces="), line(&fresh_report, "ifaces="));
        assert_eq!(line(report, "ifaces="), "lo");
        assert_eq!(line(report, "lo-flags="), line(&fresh_report, "lo-flags="));
        // The same /dev as a fresh container's, and an empty /dev/shm.
        assert_eq!(
            line(report, "dev="),
            line(&fresh_report, "dev="),
            "{report}"
        );
        assert_eq!(line(report, "shm="), "0");
    }
    assert!(fresh_report.contains("fw-readonly"));
    // Each copy binds its own bundle's empty directory.
    for r in &copies {
        let mask = r.bundle().join(ember_runtime::spec::MASK_DIR);
        assert!(mask.is_dir());
        assert_eq!(fs::read_dir(&mask).unwrap().count(), 0);
    }
    let gone: Vec<_> = copies
        .iter()
        .map(|r| (r.id().to_owned(), r.bundle().to_path_buf()))
        .collect();
    drop(copies);
    for (id, dir) in gone {
        assert_gone(&f.runc, &id, &dir);
    }
    fresh.cleanup().unwrap();
}
