//! Recovery after the process holding a pool is killed with SIGKILL
//! mid-run: nothing of its runners may leak.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{cgroup_dirs, mounts_under, wait_until};
use ember_pool::Outcome;

const CHILD_ENV: &str = "EMBER_POOL_RECOVER_CHILD";

/// Not a test on its own: the body of the process the real test kills.
/// Without the environment variable it does nothing.
#[test]
fn recover_child_helper() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let agent = require_agent!();
    let dir = PathBuf::from(dir);
    let runc = ember_runtime::Runc::new(dir.join("runc"));
    let mut cfg = ember_pool::PoolConfig::new(dir.join("pool"), runc, &agent);
    cfg.store = Some(common::store().0.clone());
    let pool = ember_pool::Pool::new(cfg).unwrap();
    // One idle runner, frozen.
    let frozen = common::spec(Some("frozen"));
    let (_, _, _) = common::run_sh(&pool, &frozen, "true");
    assert_eq!(pool.freeze_idle(), 1);
    // One runner mid-run.
    let busy = common::spec(Some("busy"));
    let mut lease = pool.acquire(&busy).unwrap();
    let (_r, _) = common::exec(
        &mut lease,
        &["/bin/sh", "-c", "touch /workspace/started; exec sleep 1000"],
    );
    pool.release(lease, Outcome::Failed);
    unreachable!("the parent kills this process first");
}

fn runner_ids(runners: &Path) -> Vec<String> {
    std::fs::read_dir(runners)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn recover_removes_everything_a_killed_pool_left() {
    let agent = require_agent!();
    // Build the store before the child needs it, so the child starts fast.
    common::store();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().to_path_buf();
    // The child uses its own pool directory under the same temporary dir.
    let child_dir = base.join("child");
    std::fs::create_dir_all(&child_dir).unwrap();
    let runners = child_dir.join("pool/runners");

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["recover_child_helper", "--exact", "--nocapture"])
        .env(CHILD_ENV, &child_dir)
        .env("EMBER_AGENT", &agent)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let started = wait_until(Duration::from_secs(60), || {
        runner_ids(&runners)
            .iter()
            .any(|id| runners.join(id).join("workspace/started").exists())
    });
    assert!(started, "the child never started its run");
    child.kill().unwrap(); // SIGKILL: nothing of the child's cleanup runs
    child.wait().unwrap();

    // What was left: two runners, one frozen, one running.
    let ids = runner_ids(&runners);
    assert_eq!(ids.len(), 2, "{ids:?}");
    let child_runc = ember_runtime::Runc::new(child_dir.join("runc"));
    let listed = child_runc.list().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        listed.iter().any(|c| format!("{:?}", c.status) == "Paused"),
        "{listed:?}"
    );
    assert!(!mounts_under(&runners).is_empty());
    for id in &ids {
        assert!(!cgroup_dirs(id).is_empty());
        assert!(
            common::store()
                .0
                .root()
                .join("users")
                .join(format!("{id}.json"))
                .exists()
        );
    }

    // A new pool on the child's directories, in this process, with a live
    // runner of its own in the same directory and runc root.
    let mut cfg = ember_pool::PoolConfig::new(child_dir.join("pool"), child_runc.clone(), &agent);
    cfg.store = Some(common::store().0.clone());
    let pool = ember_pool::Pool::new(cfg).unwrap();
    let live = {
        let mut lease = pool.acquire(&common::spec(Some("live"))).unwrap();
        let id = lease.id().to_owned();
        let (r, _) = common::exec(&mut lease, &["true"]);
        pool.release(lease, Outcome::of(&r));
        id
    };

    let report = pool.recover().unwrap();
    assert!(report.runtime.errors.is_empty(), "{report:?}");
    let mut got = report.runners.clone();
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want, "{report:?}");
    assert_eq!(report.thawed.len(), 1, "{report:?}");
    assert_eq!(report.runtime.in_use.len(), 1, "{report:?}");
    // Nothing of the dead process's runners is left.
    assert_eq!(runner_ids(&runners), vec![live.clone()]);
    let listed = child_runc.list().unwrap();
    assert_eq!(
        listed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec![live.as_str()]
    );
    for id in &ids {
        assert!(cgroup_dirs(id).is_empty(), "cgroups of {id} left");
        assert!(
            mounts_under(&runners.join(id)).is_empty(),
            "mounts of {id} left"
        );
        let claim = common::store()
            .0
            .root()
            .join("users")
            .join(format!("{id}.json"));
        assert!(!claim.exists(), "store claim of {id} left");
    }
    // A second recovery finds nothing.
    let again = pool.recover().unwrap();
    assert!(
        again.runners.is_empty() && again.runtime.is_clean(),
        "{again:?}"
    );

    // The live runner is untouched and still works.
    let mut lease = pool.acquire(&common::spec(Some("live"))).unwrap();
    assert_eq!(lease.id(), live);
    let (r, _) = common::exec(&mut lease, &["true"]);
    assert!(r.success());
    pool.release(lease, Outcome::of(&r));
    pool.shutdown();
    drop(pool);
    let mut all = ids.clone();
    all.push(live);
    common::assert_no_leaks(&runners, &child_runc, &all);
    drop(tmp);
}
