//! Shared support for the pool's integration tests: the static agent, the
//! busybox fixture image in a store, pools in temporary directories and
//! leak checks.
//!
//! These tests need root, overlayfs, the cgroup v1 freezer and runc, which
//! this machine has, and the static agent binary, which is built once with
//! `crates/ember-agent/build-static.sh` when missing. Without one of them,
//! every test fails and says why (`ember_testkit::require`): a test that
//! passes without checking anything hides a broken build (CI builds the
//! agent first, in scripts/test.sh). `EMBER_TEST_SKIP_PRIVILEGED=1` skips
//! them instead, for an unprivileged checkout; CI never sets it.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
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

/// The static agent, for a test that also has root and runc; `None` (the
/// test then returns) only when `EMBER_TEST_SKIP_PRIVILEGED=1` says to skip
/// what is missing. Without that, a missing piece fails the test, saying
/// what is missing (see `ember_testkit::require`).
pub fn privileged_agent() -> Option<PathBuf> {
    let agent = ember_testkit::require::agent_binary()?;
    (ember_testkit::require::root() && ember_testkit::require::runc().is_some()).then_some(agent)
}

/// The static agent, with root and runc; returns from the calling test
/// when the environment says to skip privileged tests, and fails it,
/// saying why, when one of them is missing otherwise.
#[macro_export]
macro_rules! require_agent {
    () => {
        match common::privileged_agent() {
            Some(agent) => agent,
            None => return,
        }
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
