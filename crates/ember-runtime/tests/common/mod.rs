//! Shared fixtures: hand-built layers, an image configuration, unique ids.
//!
//! These tests need root, overlayfs and runc, which this machine has; a
//! test that lacks them fails saying so ([`Fixture::privileged`]).

#![allow(dead_code, clippy::unwrap_used)]

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ember_runtime::{Container, Prepared, RunSpec, Runc};
use oci_spec::image::ImageConfiguration;

/// Busybox applets linked into the base layer's `/bin`.
const APPLETS: &[&str] = &[
    "sh", "true", "false", "echo", "cat", "ls", "sleep", "id", "touch", "pwd", "env", "test",
    "grep", "wc", "kill", "mkdir", "rm", "hostname", "awk",
];

/// A test's world: layers, a runc root and a base directory for containers,
/// all in one temporary directory.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub layers: Vec<PathBuf>,
    pub runc: Runc,
    pub base: PathBuf,
}

impl Fixture {
    /// Two layers: a busybox base and a layer with a whiteout and an opaque
    /// directory.
    pub fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let base_layer = tmp.path().join("layers/base");
        let top_layer = tmp.path().join("layers/top");
        build_base_layer(&base_layer);
        build_top_layer(&top_layer);
        let runc = Runc::new(tmp.path().join("runc"));
        let base = tmp.path().join("containers");
        fs::create_dir_all(&base).unwrap();
        Fixture {
            layers: vec![base_layer, top_layer],
            runc,
            base,
            tmp,
        }
    }

    /// [`Fixture::new`] for a test that needs root and runc: `None` (the
    /// test then returns) only when `EMBER_TEST_SKIP_PRIVILEGED=1` says to
    /// skip what is missing; without it, a missing one fails the test,
    /// saying what is missing (`ember_testkit::require`).
    pub fn privileged() -> Option<Fixture> {
        (ember_testkit::require::root() && ember_testkit::require::runc().is_some())
            .then(Fixture::new)
    }

    /// Prepares container `id` running `args` under `run`.
    pub fn prepare(&self, id: &str, args: &[&str], mut run: RunSpec) -> Prepared {
        run.args = Some(args.iter().map(|s| (*s).to_owned()).collect());
        Container::new(self.runc.clone(), id, self.base.join(id))
            .prepare(&self.layers, &image(), &run)
            .unwrap()
    }
}

/// A process-unique container id; the cgroup parent is shared, so ids must
/// not collide across test binaries running at once.
pub fn unique_id(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        name
    )
}

/// The image configuration of the test image.
pub fn image() -> ImageConfiguration {
    serde_json::from_str(
        r#"{
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/bin", "FOO=image", "BAR=keep"],
                "Cmd": ["/bin/sh"],
                "WorkingDir": "/"
            },
            "rootfs": {"type": "layers", "diff_ids": []}
        }"#,
    )
    .unwrap()
}

fn build_base_layer(dir: &Path) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    fs::write(
        dir.join("etc/group"),
        "root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
    )
    .unwrap();
    fs::create_dir_all(dir.join("data")).unwrap();
    fs::write(dir.join("data/gone.txt"), "deleted by the top layer\n").unwrap();
    fs::write(dir.join("data/kept.txt"), "base\n").unwrap();
    fs::write(dir.join("data/over.txt"), "base\n").unwrap();
    fs::create_dir_all(dir.join("opq")).unwrap();
    fs::write(dir.join("opq/old.txt"), "hidden by the opaque dir\n").unwrap();
    for d in ["tmp", "proc", "sys", "dev", "root"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
}

fn build_top_layer(dir: &Path) {
    fs::create_dir_all(dir.join("data")).unwrap();
    // An overlayfs whiteout: character device 0:0.
    nix::sys::stat::mknod(
        &dir.join("data/gone.txt"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        nix::sys::stat::makedev(0, 0),
    )
    .unwrap();
    fs::write(dir.join("data/over.txt"), "top\n").unwrap();
    fs::create_dir_all(dir.join("opq")).unwrap();
    set_opaque(&dir.join("opq"));
    fs::write(dir.join("opq/new.txt"), "top\n").unwrap();
}

fn set_opaque(dir: &Path) {
    let path = CString::new(dir.as_os_str().as_bytes()).unwrap();
    let name = c"trusted.overlay.opaque";
    // SAFETY: both strings are NUL-terminated and outlive the call; the
    // value is a 1-byte buffer whose length is passed alongside.
    let r = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
}

/// Mount points at or below `dir`.
pub fn mounts_at_or_under(dir: &Path) -> Vec<PathBuf> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    ember_runtime::mount::mounts()
        .unwrap()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(&dir))
        .collect()
}

/// Waits (generously) for `path` to exist.
pub fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts that nothing of container `id` in `dir` is left: no mounts, no
/// runc state, no directory, no cgroup.
pub fn assert_gone(runc: &Runc, id: &str, dir: &Path) {
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert_eq!(mounts_at_or_under(dir), Vec::<PathBuf>::new());
    assert!(!runc.root().join(id).exists(), "runc state of {id} left");
    assert!(
        runc.list().unwrap().iter().all(|c| c.id != id),
        "runc still lists {id}"
    );
    for ctrl in ["memory", "pids", "cpu", "freezer"] {
        let cg = Path::new("/sys/fs/cgroup")
            .join(ctrl)
            .join("ember")
            .join(id);
        assert!(!cg.exists(), "cgroup {} left", cg.display());
    }
}
