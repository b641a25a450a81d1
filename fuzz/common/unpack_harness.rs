//! Shared by the `unpack` and `unpack_gen` targets: runs
//! `ember_store::unpack::unpack` on a tar in a fresh directory and checks
//! that nothing outside it was touched.
//!
//! Layout per input (under /dev/shm when it exists):
//!
//! ```text
//! <base>/<parent>/dest        unpack target (Overlay), then Flatten twice
//! <base>/<parent>/outside/f   a sentinel file the tar may try to reach
//! ```
//!
//! Afterwards `<parent>` must contain exactly `dest` and `outside`,
//! `outside` exactly `f`, and the sentinel and `outside` keep their content,
//! mode, owner and mtime; `<base>` must contain only `<parent>`.

use ember_store::unpack::{Mode, UnpackError, unpack};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Largest file unpack may write: GNU sparse entries expand holes to zeros,
/// so a tiny tar can ask for gigabytes. RLIMIT_FSIZE turns that into EFBIG.
pub const FSIZE_LIMIT: u64 = 16 << 20;

fn base() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        // SAFETY: plain libc calls with valid arguments.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit { rlim_cur: FSIZE_LIMIT, rlim_max: FSIZE_LIMIT };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
        }
        let root = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let b = root.join(format!("ember-fuzz-unpack-{}", std::process::id()));
        let _ = fs::remove_dir_all(&b);
        fs::create_dir_all(&b).expect("create base dir");
        b
    })
}

fn stat_sig(p: &Path) -> (u32, u32, u32, i64, i64, u64) {
    let m = fs::symlink_metadata(p).expect("stat sentinel");
    (m.mode(), m.uid(), m.gid(), m.mtime(), m.mtime_nsec(), m.len())
}

fn names(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Where the sentinel lives for the current input (the generator aims
/// absolute symlinks at it).
#[allow(dead_code)]
pub fn outside_path_hint() -> PathBuf {
    base().join("cur").join("outside")
}

/// Whether an unpack error is the RLIMIT_FSIZE cap (file too large).
fn is_efbig(e: &UnpackError) -> bool {
    let mut s: &dyn std::error::Error = e;
    loop {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(libc::EFBIG)
        {
            return true;
        }
        // unpack's copy_entry re-wraps write errors as strings ("write: ...").
        if s.to_string().contains(&format!("(os error {})", libc::EFBIG)) {
            return true;
        }
        match s.source() {
            Some(n) => s = n,
            None => return false,
        }
    }
}

pub fn run(tar: &[u8]) {
    let base = base();
    let parent = base.join("cur");
    let _ = fs::remove_dir_all(&parent);
    fs::create_dir(&parent).expect("mkdir parent");
    let dest = parent.join("dest");
    let outside = parent.join("outside");
    fs::create_dir(&dest).expect("mkdir dest");
    fs::create_dir(&outside).expect("mkdir outside");
    let sentinel = outside.join("f");
    fs::write(&sentinel, b"sentinel").expect("write sentinel");
    fs::set_permissions(&sentinel, fs::Permissions::from_mode(0o644)).unwrap();
    let before = (stat_sig(&sentinel), stat_sig(&outside), stat_sig(&parent));

    let allow_amplification = std::env::var_os("EMBER_FUZZ_ALLOW_SPARSE").is_some();
    let check = |r: Result<ember_store::unpack::UnpackStats, UnpackError>, what: &str| {
        match r {
            Ok(stats) => {
                if !allow_amplification {
                    assert!(
                        stats.bytes <= tar.len() as u64,
                        "{what}: wrote {} bytes of file contents from a {}-byte tar (sparse expansion)",
                        stats.bytes,
                        tar.len()
                    );
                }
            }
            Err(e) => {
                if is_efbig(&e) && !allow_amplification {
                    panic!(
                        "{what}: a {}-byte tar made unpack write a file over {FSIZE_LIMIT} bytes: {e}",
                        tar.len()
                    );
                }
            }
        }
    };
    check(unpack(tar, &dest, Mode::Overlay), "overlay");
    // Flatten onto what Overlay left (a lower layer), then again onto itself.
    check(unpack(tar, &dest, Mode::Flatten), "flatten#1");
    check(unpack(tar, &dest, Mode::Flatten), "flatten#2");

    assert_eq!(names(base), vec!["cur".to_string()], "something created next to the parent dir");
    assert_eq!(
        names(&parent),
        vec!["dest".to_string(), "outside".to_string()],
        "something created outside dest"
    );
    assert_eq!(names(&outside), vec!["f".to_string()], "something created in outside/");
    assert_eq!(fs::read(&sentinel).expect("read sentinel"), b"sentinel", "sentinel rewritten");
    let after = (stat_sig(&sentinel), stat_sig(&outside), stat_sig(&parent));
    assert_eq!(before.0, after.0, "sentinel file metadata changed");
    assert_eq!(before.1, after.1, "outside/ metadata changed");
    // The parent's mtime changes only if an entry was added or removed in
    // it, which the name check already covers; compare mode/owner only.
    assert_eq!(
        (before.2.0, before.2.1, before.2.2),
        (after.2.0, after.2.1, after.2.2),
        "parent dir mode/owner changed"
    );
    // Root can delete anything left behind (0000 dirs, fifos, whiteouts).
    fs::remove_dir_all(&parent).expect("clean up");
}
