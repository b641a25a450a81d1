//! `kill -9` of an `ember pull` in the middle of extracting a layer: the
//! store must not show the half-written layer or the image, the next
//! `Store::open` must throw the abandoned work away, and a new pull must
//! produce the complete file.
//!
//! Runs the `ember` binary, which belongs to another crate: it is looked
//! for next to this test's own binary (`target/debug/ember`), and the test
//! is skipped with a message when it has not been built.

mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{fixture_layers, names};
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
    let Some(ember) = ember_bin() else {
        eprintln!(
            "SKIPPED kill_9_mid_pull: target/debug/ember is not built (cargo build -p ember first)"
        );
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

    // Opening the store removes the dead process's work.
    let store = Store::open(&root).expect("reopen");
    assert_eq!(
        names(&root.join("tmp")),
        Vec::<String>::new(),
        "tmp/ not cleaned"
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
    assert_eq!(names(&root.join("tmp")), Vec::<String>::new());
}
