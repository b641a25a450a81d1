//! `kill -9` of an `ember pull` in the middle of extracting a layer: the
//! store must not show the half-written layer or the image, the next
//! `Store::open` must throw the abandoned work away, and a new pull must
//! produce the complete file.
//!
//! Runs the `ember` binary, which belongs to another crate: it is looked
//! for next to this test's own binary (`target/debug/ember`), and the test
//! fails saying so when it has not been built (CI builds the workspace
//! first), unless `EMBER_TEST_SKIP_PRIVILEGED=1` says to skip.

mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{fixture_layers, names, tmp_work};
use ember_store::{Index, Store};
use ember_testkit::fixtures::{self, BIG_FILE_LEN, Fixture};
use ember_testkit::registry::Registry;
use sha2::{Digest as _, Sha256};

/// `target/debug/ember`, built by the workspace's CI before the tests.
fn ember_bin() -> Option<PathBuf> {
    let beside_tests = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("ember")));
    let from_manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/ember");
    beside_tests
        .into_iter()
        .chain([from_manifest])
        .find(|p| p.is_file())
}

/// sha256 of `data/big.bin` as the fixture's layer tar holds it.
fn expected_big_sha256(big: &Fixture) -> String {
    let (layers, _) = fixture_layers(big);
    let blob = big.blob(&layers[1]).expect("big layer blob");
    let gz = fs::File::open(&blob.path).expect("open layer");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(gz)));
    for entry in archive.entries().expect("tar") {
        let mut entry = entry.expect("entry");
        if entry.path().expect("path").as_ref() == Path::new("data/big.bin") {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = entry.read(&mut buf).expect("read entry");
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            return hex::encode(h.finalize());
        }
    }
    panic!("data/big.bin not in the big layer");
}

/// A `tmp/*-layer` directory that already holds part of `data/big.bin`.
fn partial_big_layer(root: &Path) -> Option<(PathBuf, u64)> {
    let tmp = root.join("tmp");
    for name in names(&tmp) {
        if !name.ends_with("-layer") {
            continue;
        }
        let f = tmp.join(&name).join("data/big.bin");
        if let Ok(m) = fs::metadata(&f)
            && m.len() > 0
        {
            return Some((tmp.join(name), m.len()));
        }
    }
    None
}

#[test]
fn kill_9_mid_pull_leaves_no_trace_and_the_next_pull_completes() {
    let Some(ember) = ember_testkit::require::built_binary(
        "target/debug/ember",
        ember_bin(),
        "cargo build -p ember",
    ) else {
        return;
    };
    let registry = Registry::start().expect("registry starts");
    let big = fixtures::build_cached("big").expect("big fixture");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(fixtures::push(&big, &registry.url(), "ember/big", "latest"))
        .expect("push big");
    let (_, diff_ids) = fixture_layers(&big);
    let big_hex = diff_ids[1]
        .strip_prefix("sha256:")
        .expect("sha256")
        .to_string();
    let reference = format!("{}/ember/big:latest", registry.addr());

    let parent = tempfile::tempdir().expect("tempdir");
    let root = parent.path().join("store");
    let logs = tempfile::tempdir().expect("tempdir");
    let run = |log: &str| {
        let mut cmd = Command::new(&ember);
        cmd.arg("--root")
            .arg(&root)
            .args(["pull", "--quiet", &reference])
            .env("EMBER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(logs.path().join(log)).expect("log file"));
        cmd
    };

    let mut child = run("first.log").spawn().expect("spawn ember pull");
    // Wait until the big layer is being written, then kill -9. The poll has
    // no deadline of its own that could fail a slow machine: it ends when
    // the condition holds or the pull exits (which fails the test with the
    // pull's log); the one-minute cap only stops a hung pull hanging CI.
    let cap = Instant::now() + Duration::from_secs(60);
    let (partial_dir, partial_len) = loop {
        if let Some(found) = partial_big_layer(&root) {
            break found;
        }
        if let Some(status) = child.try_wait().expect("poll child") {
            panic!(
                "ember pull ended ({status}) before the big layer was seen mid-extraction:\n{}",
                fs::read_to_string(logs.path().join("first.log")).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < cap,
            "ember pull made no progress in a minute"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    child.kill().expect("SIGKILL");
    // Reap it, so its pid is gone (a zombie still answers kill(pid, 0)).
    let status = child.wait().expect("wait");
    assert!(
        !status.success(),
        "the pull was meant to be killed, not finish"
    );
    eprintln!(
        "killed ember pull with {partial_len} of {BIG_FILE_LEN} bytes of data/big.bin written"
    );
    assert!(
        partial_len < BIG_FILE_LEN,
        "caught a finished file ({partial_len} bytes), not a partial one"
    );

    // The killed pull left its work in tmp/ and nothing anywhere else.
    assert!(
        partial_dir.exists(),
        "abandoned layer dir vanished before reopen"
    );
    assert!(!root.join("layers").join(&big_hex).exists());
    assert_eq!(
        names(&root.join("layers")),
        Vec::<String>::new(),
        "layers/ shows a layer"
    );
    assert_eq!(
        names(&root.join("blobs/sha256")),
        Vec::<String>::new(),
        "blobs/ got a manifest or config of an image that was never committed"
    );
    match fs::read(root.join("index.json")) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
        Ok(b) => {
            let ix: Index = serde_json::from_slice(&b).expect("index.json parses");
            assert!(ix.images.is_empty() && ix.refs.is_empty(), "{ix:?}");
        }
    }
    assert_eq!(names(parent.path()), vec!["store".to_string()]);

    // Opening the store removes the dead process's work (and its lock
    // file: only the new store's own is left).
    let store = Store::open(&root).expect("reopen");
    assert_eq!(tmp_work(&root), Vec::<String>::new(), "tmp/ not cleaned");
    assert_eq!(
        names(&root.join("tmp")).len(),
        1,
        "{:?}",
        names(&root.join("tmp"))
    );

    // A second pull completes, and the file is whole.
    let out = run("second.log").status().expect("second ember pull");
    assert!(
        out.success(),
        "second pull failed ({out}):\n{}",
        fs::read_to_string(logs.path().join("second.log")).unwrap_or_default()
    );
    let ix = store.read_index().expect("index");
    assert!(ix.refs.contains_key(&reference), "{:?}", ix.refs);
    let file = root.join("layers").join(&big_hex).join("data/big.bin");
    assert_eq!(fs::metadata(&file).expect("big.bin").len(), BIG_FILE_LEN);
    assert_eq!(common::file_sha256(&file), expected_big_sha256(&big));
    assert_eq!(tmp_work(&root), Vec::<String>::new());
}

/// `ember --root ROOT ARGS` as PID 1 of a new PID namespace (`unshare
/// --pid --fork --kill-child`): every process started so has the same
/// pid, as a node restarted in a fresh container would, and a `kill -9` of
/// the `unshare` kills it too.
fn in_new_pid_namespace(ember: &Path, root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child=SIGKILL"])
        .arg(ember)
        .arg("--root")
        .arg(root)
        .args(args)
        .env("EMBER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

/// Regression (issue 10): partial layers of a pull killed with `kill -9`
/// stayed in `tmp/` when the next process came at once, because the
/// cleanup judged them by their pid, and the pid still answered (a zombie
/// not yet reaped, or the new process itself with the same number). Now it
/// judges by the lock the dead process held: entries of a live pull are
/// kept while it runs, and once it is killed a process with the very same
/// pid (PID 1 of its own namespace, like the dead pull) removes them, with
/// the dead pull not yet reaped.
#[test]
fn kill_9_mid_pull_is_cleaned_by_a_process_with_the_same_pid() {
    let Some(ember) = ember_testkit::require::built_binary(
        "target/debug/ember",
        ember_bin(),
        "cargo build -p ember",
    ) else {
        return;
    };
    // A pid namespace needs root.
    if !ember_testkit::require::root() {
        return;
    }
    assert!(
        Command::new("unshare")
            .args(["--pid", "--fork", "true"])
            .status()
            .is_ok_and(|s| s.success()),
        "unshare --pid --fork true fails here, as root"
    );
    let registry = Registry::start().expect("registry starts");
    let big = fixtures::build_cached("big").expect("big fixture");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(fixtures::push(&big, &registry.url(), "ember/big", "latest"))
        .expect("push big");
    let reference = format!("{}/ember/big:latest", registry.addr());
    let parent = tempfile::tempdir().expect("tempdir");
    let root = parent.path().join("store");
    let log = parent.path().join("pull.log");

    let mut pull = in_new_pid_namespace(&ember, &root, &["pull", "--quiet", &reference])
        .stderr(fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn ember pull");
    let cap = Instant::now() + Duration::from_secs(60);
    let (partial_dir, _) = loop {
        if let Some(found) = partial_big_layer(&root) {
            break found;
        }
        if let Some(status) = pull.try_wait().expect("poll child") {
            panic!(
                "ember pull ended ({status}) before the big layer was seen mid-extraction:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < cap,
            "ember pull made no progress in a minute"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let owner = partial_dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('-').next())
        .expect("an owner-tagged name")
        .to_owned();
    assert!(
        owner.starts_with("1."),
        "the pull is PID 1 of its namespace: {owner}"
    );

    // While the pull lives, other opens (one with its pid, one with
    // another) leave its work alone.
    let images = |what: &str| {
        let out = in_new_pid_namespace(&ember, &root, &["images"])
            .stderr(Stdio::piped())
            .output()
            .expect("ember images");
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    images("open beside a live pull");
    drop(Store::open(&root).expect("open beside a live pull"));
    assert!(partial_dir.exists(), "a live pull's work was removed");
    assert!(
        pull.try_wait().expect("poll").is_none(),
        "the pull ended early"
    );

    // kill -9, and the next process comes at once with the same pid.
    pull.kill().expect("SIGKILL");
    let deadline = Instant::now() + Duration::from_secs(60);
    while partial_dir.exists() {
        images("open after the kill");
        assert!(
            Instant::now() < deadline,
            "{} stayed in tmp/ after its pull was killed",
            partial_dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = pull.wait();
    assert_eq!(
        tmp_work(&root),
        Vec::<String>::new(),
        "the killed pull's work is all gone"
    );
    let left: Vec<String> = names(&root.join("tmp"))
        .into_iter()
        .filter(|n| n.starts_with(&format!("{owner}-")))
        .collect();
    assert_eq!(
        left,
        Vec::<String>::new(),
        "the dead owner's lock file stayed"
    );

    // And the pull completes afterwards.
    let out = in_new_pid_namespace(&ember, &root, &["pull", "--quiet", &reference])
        .stderr(Stdio::piped())
        .output()
        .expect("second pull");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
