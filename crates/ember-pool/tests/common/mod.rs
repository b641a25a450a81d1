//! Shared support for the pool's integration tests: the static agent, the
//! busybox fixture image in a store, pools in temporary directories and
//! leak checks.
//!
//! These tests need root, overlayfs, the cgroup v1 freezer and runc, which
//! this machine has, and the static agent binary, which is built once with
//! `crates/ember-agent/build-static.sh` when missing. Without it, every
//! test fails and says why: a test that passes without checking anything
//! hides a broken build (CI builds the agent first, in scripts/test.sh).

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ember_pool::{
    Lease, Outcome, Pool, PoolConfig, Released, RunnerImage, RunnerShape, RunnerSpec,
};
use ember_runtime::Runc;
use ember_store::Store;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The static agent, built if missing; panics, saying why, when it cannot
/// be had.
pub fn agent() -> PathBuf {
    static AGENT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = AGENT.get_or_init(|| {
        if let Ok(p) = std::env::var("EMBER_AGENT") {
            let p = PathBuf::from(p);
            return if p.exists() {
                Ok(p)
            } else {
                Err(format!("EMBER_AGENT={} does not exist", p.display()))
            };
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"));
        let path = target.join("x86_64-unknown-linux-gnu/release/ember-agent");
        if path.exists() {
            return Ok(path);
        }
        eprintln!("building the static agent with build-static.sh (once)");
        let script = workspace_root().join("crates/ember-agent/build-static.sh");
        match Command::new(&script).output() {
            Ok(out) if out.status.success() => {
                let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if p.exists() {
                    Ok(p)
                } else {
                    Err(format!(
                        "build-static.sh printed {}, which does not exist",
                        p.display()
                    ))
                }
            }
            Ok(out) => Err(format!(
                "building the static agent failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )),
            Err(e) => Err(format!("cannot run {}: {e}", script.display())),
        }
    });
    match found {
        Ok(p) => p.clone(),
        Err(why) => panic!(
            "the pool tests need the static ember-agent \
             (crates/ember-agent/build-static.sh, or EMBER_AGENT=PATH): {why}"
        ),
    }
}

/// The static agent, or a failed test saying why it is missing.
#[macro_export]
macro_rules! require_agent {
    () => {
        common::agent()
    };
}

/// A store (shared by the tests of this package, kept between runs) that
/// holds the busybox fixture, pulled from a throwaway registry the first
/// time.
pub fn store() -> &'static (Store, RunnerImage) {
    static STORE: OnceLock<(Store, RunnerImage)> = OnceLock::new();
    STORE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ember-pool-store");
        let store = Store::open(&root).unwrap();
        const NAME: &str = "ember-pool-test/busybox:latest";
        let found = store
            .read_index()
            .ok()
            .and_then(|ix| store.resolve(&ix, NAME).ok())
            .filter(|r| store.missing_layers(r).is_empty());
        let record = match found {
            Some(r) => r,
            None => {
                let rt = tokio::runtime::Runtime::new().unwrap();
                let registry = ember_testkit::registry::Registry::start().unwrap();
                let fx = ember_testkit::fixtures::build_cached("busybox").unwrap();
                rt.block_on(ember_testkit::fixtures::push(
                    &fx,
                    &registry.url(),
                    "ember/busybox",
                    "latest",
                ))
                .unwrap();
                let client =
                    Arc::new(ember_registry::RegistryClient::new(Default::default()).unwrap());
                let reference: ember_oci::Reference =
                    format!("{}/ember/busybox:latest", registry.addr())
                        .parse()
                        .unwrap();
                let report = rt
                    .block_on(ember_store::pull(
                        &store,
                        &client,
                        &reference,
                        &ember_store::PullOptions::default(),
                        Arc::new(ember_store::SilentProgress),
                    ))
                    .unwrap();
                // A fixed local name, so later runs find it without the
                // registry (whose port changes).
                let digest = report.image.manifest.clone();
                store
                    .update_index(|ix| {
                        ix.refs.insert(
                            NAME.parse::<ember_oci::Reference>().unwrap().to_string(),
                            digest.clone(),
                        );
                        Ok(())
                    })
                    .unwrap();
                report.image
            }
        };
        let image = RunnerImage::from_store(&store, &record).unwrap();
        (store, image)
    })
}

/// The busybox image.
pub fn image() -> RunnerImage {
    store().1.clone()
}

/// A spec for busybox with `shape` and `recycle`.
pub fn spec_with(shape: RunnerShape, recycle: Option<&str>) -> RunnerSpec {
    RunnerSpec::new(image(), shape, recycle.map(str::to_owned))
}

/// The default busybox spec, split by `recycle`.
pub fn spec(recycle: Option<&str>) -> RunnerSpec {
    spec_with(RunnerShape::default(), recycle)
}

/// A pool in a temporary directory, with its own runc root.
pub struct TestPool {
    pub pool: Pool,
    pub tmp: tempfile::TempDir,
    pub runc: Runc,
}

impl TestPool {
    pub fn new(agent: &Path, tweak: impl FnOnce(&mut PoolConfig)) -> TestPool {
        let tmp = tempfile::tempdir().unwrap();
        let runc = Runc::new(tmp.path().join("runc"));
        let mut cfg = PoolConfig::new(tmp.path().join("pool"), runc.clone(), agent);
        cfg.store = Some(store().0.clone());
        cfg.create_timeout = Duration::from_secs(20);
        // Spares would make the runner counts of most tests depend on
        // timing; the tests of spares turn them on.
        cfg.fresh_spares = 0;
        tweak(&mut cfg);
        let pool = Pool::new(cfg).unwrap();
        TestPool { pool, tmp, runc }
    }

    pub fn root(&self) -> PathBuf {
        self.tmp.path().join("pool")
    }

    /// Shuts the pool down and checks nothing is left of `ids`.
    pub fn shutdown_and_check(self, ids: &[String]) {
        let TestPool { pool, tmp, runc } = self;
        pool.shutdown();
        let runners = pool.runners_dir().to_path_buf();
        drop(pool);
        assert_no_leaks(&runners, &runc, ids);
        drop(tmp);
    }
}

/// Runs `argv` (through `sh -c` when it is one string with a space) on a
/// lease and returns the result and the combined output.
pub fn exec(lease: &mut Lease, argv: &[&str]) -> (ember_pool::ExecResult, String) {
    let req = lease.command(argv.iter().copied());
    let mut out = Vec::new();
    let r = lease
        .exec(&req, &mut |_, b| out.extend_from_slice(b))
        .unwrap();
    (r, String::from_utf8_lossy(&out).into_owned())
}

/// Acquire, run `sh -c script`, release by outcome; returns the runner id,
/// the output and what release did.
pub fn run_sh(pool: &Pool, spec: &RunnerSpec, script: &str) -> (String, String, Released) {
    let mut lease = pool.acquire(spec).unwrap();
    let id = lease.id().to_owned();
    let (r, out) = exec(&mut lease, &["/bin/sh", "-c", script]);
    let released = pool.release(lease, Outcome::of(&r));
    (id, out, released)
}

/// Mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    ember_runtime::mount::mounts()
        .unwrap()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Cgroup directories of container `id` that still exist, in any v1
/// hierarchy.
pub fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let d = entry.path().join("ember").join(id);
        if d.exists() {
            out.push(d);
        }
    }
    out
}

/// Checks that nothing of runners `ids` is left: directories, mounts, runc
/// state, cgroups, store claims.
pub fn assert_no_leaks(runners_dir: &Path, runc: &Runc, ids: &[String]) {
    let left: Vec<_> = std::fs::read_dir(runners_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "runner directories left: {left:?}");
    let m = mounts_under(runners_dir);
    assert!(m.is_empty(), "mounts left: {m:?}");
    let listed = runc.list().unwrap();
    assert!(listed.is_empty(), "runc containers left: {listed:?}");
    for id in ids {
        let c = cgroup_dirs(id);
        assert!(c.is_empty(), "cgroups of {id} left: {c:?}");
        let claim = store().0.root().join("users").join(format!("{id}.json"));
        assert!(!claim.exists(), "store claim of {id} left");
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The freezer state of container `id`, read from the real path.
pub fn freezer_state(id: &str) -> String {
    std::fs::read_to_string(format!("/sys/fs/cgroup/freezer/ember/{id}/freezer.state"))
        .unwrap()
        .trim()
        .to_owned()
}

/// `cpuacct.usage` of container `id`, read from the real path.
pub fn cpu_usage(id: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/fs/cgroup/cpuacct/ember/{id}/cpuacct.usage"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}
