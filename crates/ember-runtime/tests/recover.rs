//! Recovery after `kill -9` of the process that ran a container.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{Fixture, assert_gone, mounts_at_or_under, unique_id, wait_for};
use ember_runtime::{Container, RootFs, RunSpec, Runc, recover};

const CHILD_ENV: &str = "EMBER_RECOVER_CHILD";

/// Not a test on its own: the body of the process the real test kills.
/// Without the environment variable it does nothing.
#[test]
fn recover_child_helper() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let v: Vec<&str> = spec.split('\n').collect();
    let (runc_root, dir, id, layers) = (v[0], v[1], v[2], &v[3..]);
    let run = RunSpec {
        args: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            "touch /ready; exec sleep 1000".into(),
        ]),
        ..RunSpec::default()
    };
    let p = Container::new(Runc::new(runc_root), id, dir)
        .prepare(layers, &common::image(), &run)
        .unwrap();
    // Runs until the parent kills this process.
    let _ = p.run();
    unreachable!("the parent kills this process first");
}

#[test]
fn recover_removes_what_a_killed_ember_left_and_spares_live_containers() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    let id = unique_id("leftover");
    let dir = f.base.join(&id);
    let mut spec = vec![
        f.runc.root().display().to_string(),
        dir.display().to_string(),
        id.clone(),
    ];
    spec.extend(f.layers.iter().map(|l| l.display().to_string()));
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["recover_child_helper", "--exact", "--nocapture"])
        .env(CHILD_ENV, spec.join("\n"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&dir.join("upper/ready"));
    child.kill().unwrap(); // SIGKILL: no cleanup runs
    child.wait().unwrap();

    // The container outlived its owner.
    let listed = f.runc.list().unwrap();
    assert!(listed.iter().any(|c| c.id == id), "{listed:?}");
    assert!(!mounts_at_or_under(&dir).is_empty());

    // A container this process still owns must survive recovery.
    let live_id = unique_id("live");
    let live = Container::new(f.runc.clone(), &live_id, f.base.join(&live_id))
        .prepare(&f.layers, &common::image(), &RunSpec::default())
        .unwrap();

    // A leftover that runc never knew: mounted overlay, stray cgroup.
    let orphan_id = unique_id("orphan");
    let orphan_dir = f.base.join(&orphan_id);
    let orphan_cgroup = Path::new("/sys/fs/cgroup/pids/ember").join(&orphan_id);
    fs::create_dir_all(&orphan_cgroup).unwrap();
    std::mem::forget(RootFs::mount(&orphan_dir, &f.layers).unwrap());
    fs::write(
        orphan_dir.join("config.json"),
        format!(r#"{{"linux":{{"cgroupsPath":"/ember/{orphan_id}"}}}}"#),
    )
    .unwrap();

    let report = recover(&f.base, &f.runc).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.deleted, vec![id.clone()]);
    assert!(
        report.cgroups_removed.contains(&orphan_cgroup),
        "{report:?}"
    );
    let canon = |p: &Path| {
        fs::canonicalize(p.parent().unwrap())
            .unwrap()
            .join(p.file_name().unwrap())
    };
    let removed: Vec<PathBuf> = report.removed.clone();
    assert!(removed.contains(&canon(&dir)) && removed.contains(&canon(&orphan_dir)));
    assert_eq!(report.in_use, vec![canon(live.bundle())]);

    assert_gone(&f.runc, &id, &dir);
    assert!(!orphan_dir.exists() && !orphan_cgroup.exists());
    assert!(mounts_at_or_under(&orphan_dir).is_empty());
    assert!(!mounts_at_or_under(live.bundle()).is_empty());

    // Nothing left: a second pass finds nothing to do.
    let again = recover(&f.base, &f.runc).unwrap();
    assert!(again.is_clean(), "{again:?}");
    let live_dir = live.bundle().to_path_buf();
    drop(live);
    assert_gone(&f.runc, &live_id, &live_dir);
}
