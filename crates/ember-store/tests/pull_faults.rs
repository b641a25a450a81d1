//! Pulls from a real `docker-registry` whose stored blobs the test breaks
//! (flipped byte, truncation, deletion, an unreadable path that makes the
//! registry answer 500), and pulls of images that are wrong on purpose
//! (hostile tar entries with correct digests, forged diff_ids, unknown tags,
//! missing platforms). Every failure must give an error that names the
//! image and the blob, and leave the store exactly as it was: same blobs,
//! layers and index, nothing in `tmp/`, nothing beside the store. Once the
//! blob is repaired, the same pull must succeed.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{RawTar, StoreDir, client, fixture_layers, push_image, registry_blob_path, tmp_work};
use ember_oci::{Digest, Reference};
use ember_registry::{RegistryClient, RegistryError};
use ember_store::unpack::UnpackError;
use ember_store::{PullOptions, PullReport, SilentProgress, StoreError, pull};
use ember_testkit::fixtures::{self, BIG_FILE_LEN, Fixture};
use ember_testkit::registry::Registry;

/// A registry with the `busybox` and `big` fixtures pushed as
/// `ember/busybox:latest` and `ember/big:latest`.
struct Origin {
    registry: Registry,
    big: Fixture,
}

impl Origin {
    async fn start() -> Origin {
        let registry = Registry::start().expect("registry starts");
        let busybox = fixtures::build_cached("busybox").expect("busybox fixture");
        let big = fixtures::build_cached("big").expect("big fixture");
        fixtures::push(&busybox, &registry.url(), "ember/busybox", "latest")
            .await
            .expect("push busybox");
        fixtures::push(&big, &registry.url(), "ember/big", "latest")
            .await
            .expect("push big");
        Origin { registry, big }
    }

    fn reference(&self, repo_tag: &str) -> Reference {
        format!("{}/{repo_tag}", self.registry.addr())
            .parse()
            .expect("reference")
    }

    /// The big layer (the one not shared with busybox).
    fn big_layer(&self) -> (String, String) {
        let (layers, diff_ids) = fixture_layers(&self.big);
        (layers[1].clone(), diff_ids[1].clone())
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        registry_blob_path(&self.registry.storage_dir(), digest)
    }
}

fn opts() -> PullOptions {
    PullOptions {
        // Durability is not what these tests are about; syncfs on a shared
        // disk only slows them down.
        durable: false,
        ..Default::default()
    }
}

async fn pull_ref(
    sd: &StoreDir,
    client: &Arc<RegistryClient>,
    r: &Reference,
    opts: &PullOptions,
) -> Result<PullReport, StoreError> {
    pull(&sd.store, client, r, opts, Arc::new(SilentProgress)).await
}

/// A store that already holds busybox, so "unchanged" means something.
async fn store_with_busybox(origin: &Origin, c: &Arc<RegistryClient>) -> StoreDir {
    let sd = StoreDir::new();
    pull_ref(&sd, c, &origin.reference("ember/busybox:latest"), &opts())
        .await
        .expect("baseline pull of busybox");
    sd
}

/// Pulls `ember/big:latest` after the blob was repaired and checks the big
/// file arrived whole.
async fn pull_big_ok(origin: &Origin, sd: &StoreDir, c: &Arc<RegistryClient>) {
    let report = pull_ref(sd, c, &origin.reference("ember/big:latest"), &opts())
        .await
        .expect("pull after repairing the blob");
    assert_eq!(report.layers_fetched, 1);
    assert_eq!(report.layers_present, 1);
    let (_, diff_id) = origin.big_layer();
    let d: Digest = diff_id.parse().expect("diff_id");
    let big = sd.store.layer_dir(&d).join("data/big.bin");
    assert_eq!(fs::metadata(&big).expect("big.bin").len(), BIG_FILE_LEN);
    assert_eq!(sd.tmp_entries(), Vec::<String>::new());
    let ix = sd.store.read_index().expect("index");
    assert!(
        ix.refs
            .contains_key(&origin.reference("ember/big:latest").to_string())
    );
}

/// Moves a registry blob aside (into `keep`) and returns where it went.
fn move_aside(path: &Path, keep: &Path) -> PathBuf {
    let saved = keep.join("saved-blob");
    fs::rename(path, &saved).expect("move blob aside");
    saved
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_in_a_layer_is_a_digest_mismatch() {
    let origin = Origin::start().await;
    let c = client(vec![]);
    let sd = store_with_busybox(&origin, &c).await;
    let before = sd.snapshot();
    let (layer, _) = origin.big_layer();
    let path = origin.blob_path(&layer);

    // Flip one byte in the middle of the 50 MB compressed layer: the
    // pipeline has inflated and extracted megabytes by the time the digest
    // can be checked.
    let len = fs::metadata(&path).expect("blob").len();
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open blob");
    let mut byte = [0u8; 1];
    f.seek(SeekFrom::Start(len / 2)).expect("seek");
    f.read_exact(&mut byte).expect("read");
    f.seek(SeekFrom::Start(len / 2)).expect("seek");
    f.write_all(&[byte[0] ^ 0x5a]).expect("flip");
    drop(f);

    let r = origin.reference("ember/big:latest");
    let err = pull_ref(&sd, &c, &r, &opts())
        .await
        .expect_err("corrupt layer");
    match &err {
        StoreError::DigestMismatch {
            reference, digest, ..
        } => {
            assert_eq!(reference, &r.to_string());
            assert_eq!(digest.to_string(), layer);
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    let msg = ember_error::chain(&err).to_string();
    assert!(
        msg.contains(&r.to_string()) && msg.contains(&layer),
        "{msg}"
    );
    sd.assert_untouched(&before);

    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open blob");
    f.seek(SeekFrom::Start(len / 2)).expect("seek");
    f.write_all(&byte).expect("restore");
    drop(f);
    pull_big_ok(&origin, &sd, &c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_layer_is_a_size_error() {
    let origin = Origin::start().await;
    let c = client(vec![]);
    let sd = store_with_busybox(&origin, &c).await;
    let before = sd.snapshot();
    let (layer, _) = origin.big_layer();
    let path = origin.blob_path(&layer);
    let keep = tempfile::tempdir().expect("tempdir");
    let saved = keep.path().join("full");
    fs::copy(&path, &saved).expect("save blob");
    let len = fs::metadata(&path).expect("blob").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open blob")
        .set_len(len / 2)
        .expect("truncate");

    let r = origin.reference("ember/big:latest");
    let err = pull_ref(&sd, &c, &r, &opts())
        .await
        .expect_err("truncated layer");
    match &err {
        StoreError::SizeMismatch {
            reference,
            digest,
            expected,
            actual,
        } => {
            assert_eq!(reference, &r.to_string());
            assert_eq!(digest.to_string(), layer);
            assert_eq!((*expected, *actual), (len, len / 2));
        }
        StoreError::Registry {
            source: RegistryError::Truncated { .. },
            ..
        } => {}
        other => panic!("expected a size mismatch or truncation, got {other:?}"),
    }
    let msg = ember_error::chain(&err).to_string();
    assert!(
        msg.contains(&r.to_string()) && msg.contains(&layer),
        "{msg}"
    );
    sd.assert_untouched(&before);

    fs::copy(&saved, &path).expect("restore blob");
    pull_big_ok(&origin, &sd, &c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_layer_is_not_found() {
    let origin = Origin::start().await;
    let c = client(vec![]);
    let sd = store_with_busybox(&origin, &c).await;
    let before = sd.snapshot();
    let (layer, _) = origin.big_layer();
    let path = origin.blob_path(&layer);
    let keep = tempfile::tempdir().expect("tempdir");
    let saved = move_aside(&path, keep.path());

    let r = origin.reference("ember/big:latest");
    let err = pull_ref(&sd, &c, &r, &opts())
        .await
        .expect_err("missing layer");
    assert!(
        matches!(
            &err,
            StoreError::Registry {
                source: RegistryError::NotFound { .. },
                ..
            }
        ),
        "expected not found, got {err:?}"
    );
    let msg = ember_error::chain(&err).to_string();
    assert!(
        msg.contains(&r.to_string()) && msg.contains(&layer),
        "{msg}"
    );
    assert!(msg.contains("not found"), "{msg}");
    sd.assert_untouched(&before);

    fs::rename(&saved, &path).expect("restore blob");
    pull_big_ok(&origin, &sd, &c).await;
}

/// A data file replaced by a directory makes distribution answer 404 (it
/// treats it as an unknown blob), so the 5xx case uses a symlink loop:
/// `stat` fails with ELOOP and the registry answers 500 UNKNOWN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_500_fails_after_retries() {
    let origin = Origin::start().await;
    let c = client(vec![]);
    let sd = store_with_busybox(&origin, &c).await;
    let before = sd.snapshot();
    let (layer, _) = origin.big_layer();
    let path = origin.blob_path(&layer);
    let keep = tempfile::tempdir().expect("tempdir");
    let saved = move_aside(&path, keep.path());

    // First the directory, to pin down what distribution does with it.
    fs::create_dir(&path).expect("dir in place of the blob");
    let r = origin.reference("ember/big:latest");
    let err = pull_ref(&sd, &c, &r, &opts()).await.expect_err("dir blob");
    assert!(
        matches!(
            &err,
            StoreError::Registry {
                source: RegistryError::NotFound { .. } | RegistryError::Status { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        ember_error::chain(&err).to_string().contains(&layer),
        "{err}"
    );
    sd.assert_untouched(&before);
    fs::remove_dir(&path).expect("remove dir");

    std::os::unix::fs::symlink("data", &path).expect("symlink loop");
    let blob_path = format!("/blobs/{layer}");
    let failed_before = origin
        .registry
        .requests()
        .iter()
        .filter(|q| q.path.contains(&blob_path) && q.status >= 500)
        .count();
    let opts = opts();
    let err = pull_ref(&sd, &c, &r, &opts).await.expect_err("500 blob");
    match &err {
        StoreError::Registry {
            reference,
            source: RegistryError::Status { status, .. },
        } => {
            assert_eq!(reference, &r.to_string());
            assert_eq!(*status, 500);
        }
        other => panic!("expected a registry status error, got {other:?}"),
    }
    let msg = ember_error::chain(&err).to_string();
    assert!(
        msg.contains(&r.to_string()) && msg.contains(&layer),
        "{msg}"
    );
    assert!(msg.contains("500"), "{msg}");
    // Retried: by the client (3 attempts per request) and by the pull (3
    // attempts per layer).
    let failed =
        origin
            .registry
            .wait_for_requests("GET", &blob_path, 2, std::time::Duration::from_secs(5));
    let failed_500 = origin
        .registry
        .requests()
        .iter()
        .filter(|q| q.path.contains(&blob_path) && q.status >= 500)
        .count()
        - failed_before;
    assert!(
        failed_500 >= 2,
        "expected retries, the registry saw {failed_500} failed GETs ({failed} in all)"
    );
    sd.assert_untouched(&before);

    fs::remove_file(&path).expect("remove symlink");
    fs::rename(&saved, &path).expect("restore blob");
    pull_big_ok(&origin, &sd, &c).await;
}

/// One layer failing must stop the others and leave `tmp/` empty when
/// `pull` returns, even for a layer that was mid-extraction.
///
/// Here the busybox layer (1 MB) fails its digest check while the 50 MB
/// layer of `big` is still streaming into its temporary directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_layer_leaves_no_partial_sibling_in_tmp() {
    let origin = Origin::start().await;
    let c = client(vec![]);
    let sd = StoreDir::new();
    let before = sd.snapshot();
    let (layers, _) = fixture_layers(&origin.big);
    let small = origin.blob_path(&layers[0]);
    let original = fs::read(&small).expect("busybox layer");
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x5a;
    fs::write(&small, &bad).expect("corrupt busybox layer");

    let r = origin.reference("ember/big:latest");
    let err = pull_ref(&sd, &c, &r, &opts())
        .await
        .expect_err("corrupt layer");
    assert!(
        matches!(&err, StoreError::DigestMismatch { digest, .. } if digest.to_string() == layers[0]),
        "{err:?}"
    );
    let leaked = sd.tmp_entries();
    // A detached extraction thread may still be writing; give it a moment
    // so the report shows what stays behind for good.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let stayed: Vec<(String, u64)> = sd
        .tmp_entries()
        .into_iter()
        .map(|n| {
            let bytes = ember_store::unpack::tree_size(&sd.root().join("tmp").join(&n))
                .map(|(b, _)| b)
                .unwrap_or(0);
            (n, bytes)
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "tmp/ holds {leaked:?} after the failed pull returned; a second later: {stayed:?} (name, bytes)"
    );
    sd.assert_untouched(&before);

    fs::write(&small, &original).expect("restore");
    pull_ref(&sd, &c, &r, &opts())
        .await
        .expect("pull after repair");
}

/// Builds `tar`, pushes it as a one-layer image and pulls it into a store
/// holding busybox; returns the error the pull must end in.
async fn pull_hostile(
    origin: &Origin,
    c: &Arc<RegistryClient>,
    repo: &str,
    tar: Vec<u8>,
) -> (StoreDir, String, StoreError) {
    let pushed = push_image(&origin.registry.url(), repo, "latest", &[tar], None)
        .await
        .expect("push hostile image");
    let sd = store_with_busybox(origin, c).await;
    let before = sd.snapshot();
    let r = origin.reference(&format!("{repo}:latest"));
    let err = pull_ref(&sd, c, &r, &opts())
        .await
        .expect_err("hostile layer must not be accepted");
    sd.assert_untouched(&before);
    // Where escapes relative to tmp/<layer>/ would have landed.
    for p in [
        sd.root().join("tmp/escape"),
        sd.root().join("escape"),
        sd.parent.path().join("escape"),
    ] {
        assert!(fs::symlink_metadata(&p).is_err(), "{} exists", p.display());
    }
    let layer = pushed.layers[0].clone();
    (sd, layer, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layer_with_correct_digests_is_refused() {
    let origin = Origin::start().await;
    let c = client(vec![]);

    let tar = RawTar::new()
        .file("ok", b"fine")
        .file("../escape", b"pwned")
        .finish();
    let (_sd, layer, err) = pull_hostile(&origin, &c, "ember/hostile-dotdot", tar).await;
    match &err {
        StoreError::Unpack {
            digest,
            source: UnpackError::Hostile { path, .. },
            ..
        } => {
            assert_eq!(digest.to_string(), layer);
            assert_eq!(path, "../escape");
        }
        other => panic!("expected a hostile-layer error, got {other:?}"),
    }
    let msg = ember_error::chain(&err).to_string();
    assert!(msg.contains("../escape") && msg.contains(&layer), "{msg}");
    assert!(msg.contains("ember/hostile-dotdot:latest"), "{msg}");

    // Through a symlink pointing up and out of the layer directory.
    let tar = RawTar::new()
        .symlink("up", "../..")
        .file("up/escape", b"pwned")
        .finish();
    let (_sd, layer, err) = pull_hostile(&origin, &c, "ember/hostile-link", tar).await;
    assert!(
        matches!(&err, StoreError::Unpack { digest, source: UnpackError::Hostile { .. }, .. } if digest.to_string() == layer),
        "{err:?}"
    );
    assert!(ember_error::chain(&err).to_string().contains("up"), "{err}");
}

/// End-to-end form of the deferred-chmod escape (see unpack_hostile.rs):
/// a correctly digested layer whose directory `x/` (mode 4777) is replaced
/// by a symlink `x -> <host file>` in the same tar makes the pull chmod
/// the host file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_cannot_chmod_a_host_file() {
    use std::os::unix::fs::PermissionsExt;
    let origin = Origin::start().await;
    let c = client(vec![]);
    let outside = tempfile::tempdir().expect("tempdir");
    let victim = outside.path().join("victim");
    fs::write(&victim, b"secret").expect("victim");
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut dir = common::Header::new("x/", common::DIRECTORY);
    dir.mode = 0o4777;
    let tar = RawTar::new()
        .entry(dir, b"")
        .symlink("x", victim.to_str().expect("utf-8 path"))
        .finish();
    push_image(
        &origin.registry.url(),
        "ember/chmod",
        "latest",
        &[tar],
        None,
    )
    .await
    .expect("push");
    let sd = StoreDir::new();
    let res = pull_ref(&sd, &c, &origin.reference("ember/chmod:latest"), &opts()).await;
    let mode = fs::metadata(&victim).expect("victim").permissions().mode() & 0o7777;
    assert_eq!(
        mode,
        0o600,
        "pulling the image ({:?}) changed a host file's mode to {mode:o}",
        res.map(|r| r.image.manifest)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_diff_id_is_refused() {
    let origin = Origin::start().await;
    let c = client(vec![]);
    let tar = RawTar::new().file("hello", b"hello\n").finish();
    let forged = ember_testkit::digest::sha256_digest(b"some other layer");
    let pushed = push_image(
        &origin.registry.url(),
        "ember/forged",
        "latest",
        &[tar],
        Some(vec![forged.clone()]),
    )
    .await
    .expect("push");
    let sd = store_with_busybox(&origin, &c).await;
    let before = sd.snapshot();
    let r = origin.reference("ember/forged:latest");
    let err = pull_ref(&sd, &c, &r, &opts())
        .await
        .expect_err("forged diff_id");
    match &err {
        StoreError::DiffIdMismatch {
            reference,
            digest,
            diff_id,
            actual,
        } => {
            assert_eq!(reference, &r.to_string());
            assert_eq!(digest.to_string(), pushed.layers[0]);
            assert_eq!(diff_id.to_string(), forged);
            assert_eq!(actual.to_string(), pushed.diff_ids[0]);
        }
        other => panic!("expected a diff_id mismatch, got {other:?}"),
    }
    let msg = ember_error::chain(&err).to_string();
    assert!(
        msg.contains(&forged) && msg.contains(&pushed.layers[0]),
        "{msg}"
    );
    sd.assert_untouched(&before);
    // The layer is not there under either digest.
    assert!(
        !sd.store
            .layer_dir(&forged.parse().expect("digest"))
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tag_is_not_found() {
    let origin = Origin::start().await;
    let c = client(vec![]);
    let sd = store_with_busybox(&origin, &c).await;
    let before = sd.snapshot();
    for name in ["ember/busybox:nope", "ember/nothing-here:latest"] {
        let r = origin.reference(name);
        let err = pull_ref(&sd, &c, &r, &opts()).await.expect_err("unknown");
        assert!(
            matches!(
                &err,
                StoreError::Registry {
                    source: RegistryError::NotFound { .. },
                    ..
                }
            ),
            "{name}: {err:?}"
        );
        let msg = ember_error::chain(&err).to_string();
        assert!(msg.contains(name) && msg.contains("not found"), "{msg}");
        sd.assert_untouched(&before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_without_the_platform_lists_what_it_has() {
    let origin = Origin::start().await;
    let index = fixtures::build_cached("index").expect("index fixture");
    fixtures::push(&index, &origin.registry.url(), "ember/index", "latest")
        .await
        .expect("push index");
    let c = client(vec![]);
    let sd = store_with_busybox(&origin, &c).await;
    let before = sd.snapshot();
    let r = origin.reference("ember/index:latest");
    let opts = PullOptions {
        platform: "linux/s390x".parse().expect("platform"),
        ..opts()
    };
    let err = pull_ref(&sd, &c, &r, &opts).await.expect_err("no s390x");
    match &err {
        StoreError::NoPlatform {
            reference,
            platform,
            available,
        } => {
            assert_eq!(reference, &r.to_string());
            assert_eq!(platform, "linux/s390x");
            for p in fixtures::index_platforms() {
                assert!(available.contains(&p.name()), "{available}");
            }
        }
        other => panic!("expected no-platform, got {other:?}"),
    }
    let msg = ember_error::chain(&err).to_string();
    assert!(
        msg.contains("linux/s390x") && msg.contains("linux/arm/v7") && msg.contains(&r.to_string()),
        "{msg}"
    );
    sd.assert_untouched(&before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_mirror_falls_back_to_the_origin() {
    let origin = Origin::start().await;
    // A port nothing listens on any more.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let c = client(vec![format!("http://127.0.0.1:{closed}")]);
    let sd = StoreDir::new();
    let r = origin.reference("ember/busybox:latest");
    let report = pull_ref(&sd, &c, &r, &opts())
        .await
        .expect("pull via origin");
    assert_eq!(report.layers_fetched, 1);
    let (layers, _) = fixture_layers(&fixtures::build_cached("busybox").expect("busybox"));
    assert!(
        origin
            .registry
            .count_requests("GET", &format!("/blobs/{}", layers[0]))
            >= 1
    );
    assert!(sd.tmp_entries().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_through_proxy_mirror_sends_ns() {
    let origin = Origin::start().await;
    let proxy = Registry::start_proxy(&origin.registry.url()).expect("proxy starts");
    let c = client(vec![proxy.url()]);
    let sd = StoreDir::new();
    let r = origin.reference("ember/busybox:latest");
    let report = pull_ref(&sd, &c, &r, &opts())
        .await
        .expect("pull via mirror");
    assert_eq!(report.layers_fetched, 1);
    let (layers, _) = fixture_layers(&fixtures::build_cached("busybox").expect("busybox"));
    let blob = format!("/v2/ember/busybox/blobs/{}", layers[0]);

    // The proxy served the manifest and the layer, each request carrying
    // the origin as `ns` (percent-encoded, as the access log records the
    // raw request target).
    let ns = format!("ns=127.0.0.1%3A{}", origin.registry.port());
    let served: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|q| q.path.starts_with("/v2/ember/busybox/"))
        .collect();
    assert!(!served.is_empty(), "proxy log: {}", proxy.access_log());
    for q in &served {
        assert!(q.path.contains(&ns), "request without {ns}: {q:?}");
    }
    assert!(
        served
            .iter()
            .any(|q| q.method == "GET" && q.path.starts_with(&blob) && q.status == 200),
        "proxy log: {}",
        proxy.access_log()
    );
    assert!(
        served
            .iter()
            .any(|q| q.path.contains("/manifests/latest") && q.status == 200),
        "proxy log: {}",
        proxy.access_log()
    );
    // Ember itself never went to the origin: every origin request came
    // from the proxy (distribution's user agent, not ember's).
    let origin_log = origin.registry.access_log();
    let ours: Vec<&str> = origin_log
        .lines()
        .filter(|l| l.contains("\"ember/") && l.contains("/v2/ember/busybox/"))
        .map(str::trim)
        .collect();
    assert!(ours.is_empty(), "ember fetched from the origin: {ours:?}");
    assert!(tmp_work(sd.root()).is_empty());
}
