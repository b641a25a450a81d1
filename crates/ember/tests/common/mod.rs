//! Shared helpers for the CLI's end-to-end tests.
#![allow(dead_code)]

pub mod cluster;

use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `ember` binary under test.
pub fn ember() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ember"))
}

/// Runs `ember --root ROOT ARGS...` and returns its output.
pub fn run_ember(root: &Path, args: &[&str]) -> Output {
    Command::new(ember())
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("spawn ember")
}

/// Runs ember and panics with its stderr if it fails.
pub fn ember_ok(root: &Path, args: &[&str]) -> String {
    let out = run_ember(root, args);
    assert!(
        out.status.success(),
        "ember {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and panics with its stderr if it fails.
pub fn sh_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a tree comparison looks at for one path.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    /// sha256 of a file, target of a symlink.
    content: String,
}

/// Paths, types, modes, owners, contents, symlink targets, and hardlink
/// groups of a tree (mtimes are not compared).
pub fn snapshot(root: &Path) -> (BTreeMap<String, Entry>, Vec<Vec<String>>) {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("dir entry");
            let p = e.path();
            let rel = p
                .strip_prefix(root)
                .expect("prefix")
                .to_string_lossy()
                .into_owned();
            let m = std::fs::symlink_metadata(&p).expect("lstat");
            let ft = m.file_type();
            let (kind, content) = if ft.is_dir() {
                stack.push(p.clone());
                ("dir", String::new())
            } else if ft.is_symlink() {
                (
                    "symlink",
                    std::fs::read_link(&p)
                        .expect("readlink")
                        .to_string_lossy()
                        .into_owned(),
                )
            } else if ft.is_file() {
                if m.nlink() > 1 {
                    inodes.entry(m.ino()).or_default().push(rel.clone());
                }
                (
                    "file",
                    hex::encode(Sha256::digest(std::fs::read(&p).expect("read"))),
                )
            } else if ft.is_char_device() || ft.is_block_device() {
                let kind = if ft.is_char_device() { "char" } else { "block" };
                (
                    kind,
                    format!("{}:{}", libc::major(m.rdev()), libc::minor(m.rdev())),
                )
            } else {
                ("other", format!("{:o}", m.mode()))
            };
            out.insert(
                rel,
                Entry {
                    kind,
                    mode: if ft.is_symlink() {
                        0
                    } else {
                        m.permissions().mode() & 0o7777
                    },
                    uid: m.uid(),
                    gid: m.gid(),
                    content,
                },
            );
        }
    }
    let mut groups: Vec<Vec<String>> = inodes
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    groups.sort();
    (out, groups)
}

/// Asserts two trees are the same file by file; lists the differences.
pub fn assert_same_tree(ours: &Path, theirs: &Path, what: &str) {
    let (a, ga) = snapshot(ours);
    let (b, gb) = snapshot(theirs);
    let mut diffs = Vec::new();
    for k in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
        match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x == y => {}
            (x, y) => diffs.push(format!("{k}: ember {x:?} vs umoci {y:?}")),
        }
    }
    if ga != gb {
        diffs.push(format!("hardlink groups: ember {ga:?} vs umoci {gb:?}"));
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences, first ones:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(!a.is_empty(), "{what}: empty tree");
}

/// A real docker-registry on a free port with the named fixtures pushed as
/// `ember/<name>:latest`.
pub fn registry_with(names: &[&str]) -> ember_testkit::registry::Registry {
    let registry = ember_testkit::registry::Registry::start().expect("start registry");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    for n in names {
        let fx = ember_testkit::fixtures::build_cached(n).expect("build fixture");
        rt.block_on(ember_testkit::fixtures::push(
            &fx,
            &registry.url(),
            &format!("ember/{n}"),
            "latest",
        ))
        .expect("push fixture");
    }
    registry
}

/// The static exec agent, always (re)built by its script: cargo makes
/// that a no-op when it is current, and an agent left in `target/` by an
/// older checkout would lack what the tests of this one expect (the
/// readiness protocol, say). `None` if it cannot be built here.
pub fn static_agent() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(root.join("crates/ember-agent/build-static.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// What the snapshot tests need: root, runc, a CRIU that passes `criu
/// check` (scripts/install-criu.sh) and the static agent, whose path it
/// returns. Missing any of them fails the test with what to do, unless
/// `EMBER_TEST_SKIP_PRIVILEGED=1` says to skip (`None`).
#[allow(dead_code)]
pub fn snapshot_prerequisites() -> Option<PathBuf> {
    let skip = std::env::var("EMBER_TEST_SKIP_PRIVILEGED").as_deref() == Ok("1");
    let criu = Command::new("criu").arg("check").output();
    let agent = static_agent();
    let problem = match (&criu, &agent) {
        (Ok(o), Some(_)) if o.status.success() => None,
        (Ok(o), _) if !o.status.success() => Some(format!(
            "`criu check` failed: {}",
            String::from_utf8_lossy(&o.stderr)
        )),
        (Err(e), _) => Some(format!("cannot execute criu: {e}")),
        _ => Some("the static ember-agent could not be built".to_owned()),
    };
    match problem {
        None => agent,
        Some(p) if skip => {
            eprintln!("skipping (EMBER_TEST_SKIP_PRIVILEGED=1): {p}");
            None
        }
        Some(p) => panic!(
            "this test needs root, runc, CRIU and the static agent: {p}\n\
             install CRIU with scripts/install-criu.sh and build the agent with \
             crates/ember-agent/build-static.sh, or set EMBER_TEST_SKIP_PRIVILEGED=1"
        ),
    }
}

/// Waits (the test waiting, not the system) until `f` holds, failing the
/// test after `secs` seconds with `what`.
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The containers `runc --root RUNC_ROOT list` knows.
pub fn runc_list(runc_root: &Path) -> Vec<String> {
    let out = Command::new("runc")
        .arg("--root")
        .arg(runc_root)
        .args(["list", "-q"])
        .output()
        .expect("runc list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}
