//! Layers whose blob digest is honest (the registry serves exactly the
//! bytes the manifest names) but whose compressed stream breaks after the
//! tar has ended, with a config that claims the diff_id of *another*
//! image's layer.
//!
//! Regression for issue 9: the drain after the tar's end-of-archive blocks
//! used to turn a decoder error into "diff_id unknown", which was accepted,
//! so the attacker's bytes were stored under the foreign diff_id and a
//! benign image with that diff_id, pulled later on the same node, unpacked
//! to them (layers are shared by diff_id and a known one is never fetched
//! again).
//!
//! What the decoders accept, as containerd and podman do (Go's
//! `compress/gzip` in multistream mode, zstd's frame decoder): several gzip
//! members or zstd frames one after another are one valid stream; anything
//! after the last member or frame, a bad trailer (CRC32, ISIZE) and a
//! stream cut short are errors. A tar without its end-of-archive blocks is
//! accepted (Go's `archive/tar` takes a clean EOF at an entry boundary as
//! the end too); one that ends inside an entry is not.

mod common;

use std::fs;
use std::sync::Arc;

use common::{RawLayer, RawTar, StoreDir, client, gzip, push_raw_image, zstd};
use ember_oci::{Digest, Reference};
use ember_registry::RegistryClient;
use ember_store::{PullOptions, PullReport, SilentProgress, StoreError, pull};
use ember_testkit::digest::sha256_digest;
use ember_testkit::fixtures::{OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD};
use ember_testkit::registry::Registry;

fn opts() -> PullOptions {
    PullOptions {
        durable: false,
        ..Default::default()
    }
}

async fn pull_ref(
    sd: &StoreDir,
    c: &Arc<RegistryClient>,
    r: &Reference,
) -> Result<PullReport, StoreError> {
    pull(&sd.store, c, r, &opts(), Arc::new(SilentProgress)).await
}

fn reference(registry: &Registry, repo_tag: &str) -> Reference {
    format!("{}/{repo_tag}", registry.addr())
        .parse()
        .expect("reference")
}

/// The benign image's layer: what every victim image really contains.
fn benign_tar() -> Vec<u8> {
    RawTar::new()
        .dir("etc/")
        .file("etc/os-release", b"ID=benign\n")
        .finish()
}

/// The attacker's layer: same path, other bytes.
fn evil_tar() -> Vec<u8> {
    RawTar::new()
        .dir("etc/")
        .file("etc/os-release", b"ID=attacker\n")
        .finish()
}

/// A gzip member whose CRC32 trailer is wrong (the last 8 bytes are CRC32
/// then ISIZE, little-endian).
fn gzip_bad_crc(tar: &[u8]) -> Vec<u8> {
    let mut gz = gzip(tar);
    let n = gz.len();
    gz[n - 8] ^= 0xff;
    gz
}

fn gzip_bad_isize(tar: &[u8]) -> Vec<u8> {
    let mut gz = gzip(tar);
    let n = gz.len();
    gz[n - 1] ^= 0x01;
    gz
}

fn with_suffix(mut blob: Vec<u8>, suffix: &[u8]) -> Vec<u8> {
    blob.extend_from_slice(suffix);
    blob
}

/// Pushes the attack as `repo` and the benign image as `ember/benign`, pulls
/// the attack into a store that already holds an unrelated image, and
/// checks that the pull fails naming the image and the blob, that the store
/// is exactly as before, and that the benign image then unpacks to its own
/// bytes. Returns the error's message.
async fn attack(
    registry: &Registry,
    c: &Arc<RegistryClient>,
    repo: &str,
    blob: Vec<u8>,
    media_type: &'static str,
) -> String {
    let benign = benign_tar();
    let benign_diff_id = sha256_digest(&benign);
    push_raw_image(
        &registry.url(),
        "ember/benign",
        "latest",
        &[RawLayer {
            blob: gzip(&benign),
            media_type: OCI_LAYER_GZIP,
        }],
        vec![benign_diff_id.clone()],
    )
    .await
    .expect("push benign image");
    // Something already in the store, so "unchanged" means something.
    let other = RawTar::new().file("other", b"other\n").finish();
    push_raw_image(
        &registry.url(),
        "ember/other",
        "latest",
        &[RawLayer {
            blob: gzip(&other),
            media_type: OCI_LAYER_GZIP,
        }],
        vec![sha256_digest(&other)],
    )
    .await
    .expect("push other image");
    let pushed = push_raw_image(
        &registry.url(),
        repo,
        "latest",
        &[RawLayer { blob, media_type }],
        vec![benign_diff_id.clone()],
    )
    .await
    .expect("push attack image");

    let sd = StoreDir::new();
    pull_ref(&sd, c, &reference(registry, "ember/other:latest"))
        .await
        .expect("baseline pull");
    let before = sd.snapshot();
    let r = reference(registry, &format!("{repo}:latest"));
    let err = pull_ref(&sd, c, &r)
        .await
        .expect_err("a layer whose diff_id was not verified must be refused");
    let msg = ember_error::chain(&err).to_string();
    assert!(msg.contains(&r.to_string()), "names the image: {msg}");
    assert!(msg.contains(&pushed.layers[0]), "names the blob: {msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    sd.assert_untouched(&before);
    let d: Digest = benign_diff_id.parse().expect("diff_id");
    assert!(
        !sd.store.layer_dir(&d).exists(),
        "nothing stored under the claimed diff_id"
    );
    assert!(
        !sd.store
            .read_index()
            .expect("index")
            .layers
            .contains_key(&d)
    );

    // The victim, pulled afterwards on the same node, gets its own bytes.
    let report = pull_ref(&sd, c, &reference(registry, "ember/benign:latest"))
        .await
        .expect("benign pull");
    assert_eq!(report.layers_fetched, 1, "the benign layer was fetched");
    let content = fs::read(sd.store.layer_dir(&d).join("etc/os-release")).expect("os-release");
    assert_eq!(content, b"ID=benign\n");
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_with_a_wrong_crc_is_refused() {
    let registry = Registry::start().expect("registry");
    let c = client(vec![]);
    let msg = attack(
        &registry,
        &c,
        "ember/bad-crc",
        gzip_bad_crc(&evil_tar()),
        OCI_LAYER_GZIP,
    )
    .await;
    assert!(msg.contains("gzip"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_with_a_wrong_length_trailer_is_refused() {
    let registry = Registry::start().expect("registry");
    let c = client(vec![]);
    attack(
        &registry,
        &c,
        "ember/bad-isize",
        gzip_bad_isize(&evil_tar()),
        OCI_LAYER_GZIP,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_gzip_member_is_refused() {
    let registry = Registry::start().expect("registry");
    let c = client(vec![]);
    let blob = with_suffix(gzip(&evil_tar()), b"this is not a gzip member");
    let msg = attack(&registry, &c, "ember/gz-garbage", blob, OCI_LAYER_GZIP).await;
    assert!(msg.contains("gzip"), "{msg}");
    // Zero padding after the member is not a member either (Go's reader
    // refuses it too).
    let blob = with_suffix(gzip(&evil_tar()), &[0u8; 512]);
    attack(&registry, &c, "ember/gz-zeros", blob, OCI_LAYER_GZIP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_zstd_frame_is_refused() {
    let registry = Registry::start().expect("registry");
    let c = client(vec![]);
    let blob = with_suffix(zstd(&evil_tar()), b"this is not a zstd frame");
    let msg = attack(&registry, &c, "ember/zst-garbage", blob, OCI_LAYER_ZSTD).await;
    assert!(msg.contains("zstd"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_stream_cut_short_is_refused() {
    let registry = Registry::start().expect("registry");
    let c = client(vec![]);
    // The deflate stream loses its last bytes and the trailer: the tar's
    // entries and end blocks may all be there, the stream is not whole.
    let gz = gzip(&evil_tar());
    let cut = gz[..gz.len() - 10].to_vec();
    attack(&registry, &c, "ember/gz-cut", cut, OCI_LAYER_GZIP).await;
    let zs = zstd(&evil_tar());
    let cut = zs[..zs.len() - 3].to_vec();
    attack(&registry, &c, "ember/zst-cut", cut, OCI_LAYER_ZSTD).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tar_that_ends_inside_an_entry_is_refused() {
    let registry = Registry::start().expect("registry");
    let c = client(vec![]);
    let big = vec![7u8; 100_000];
    let tar = RawTar::new().file("data.bin", &big).unterminated();
    // The stream ends 40,000 bytes into the file's data; the diff_id in the
    // config is the honest digest of those bytes, so only the tar's own
    // framing can tell.
    let cut = tar[..512 + 40_000].to_vec();
    for (repo, blob, mt) in [
        ("ember/tar-cut-gz", gzip(&cut), OCI_LAYER_GZIP),
        ("ember/tar-cut-plain", cut.clone(), OCI_LAYER_TAR),
    ] {
        push_raw_image(
            &registry.url(),
            repo,
            "latest",
            &[RawLayer {
                blob,
                media_type: mt,
            }],
            vec![sha256_digest(&cut)],
        )
        .await
        .expect("push");
        let sd = StoreDir::new();
        let before = sd.snapshot();
        let r = reference(&registry, &format!("{repo}:latest"));
        let err = pull_ref(&sd, &c, &r).await.expect_err("truncated tar");
        let msg = ember_error::chain(&err).to_string();
        assert!(msg.contains("data.bin"), "names the entry: {msg}");
        assert!(matches!(err, StoreError::Unpack { .. }), "{err:?}");
        sd.assert_untouched(&before);
    }
}

/// What is valid must stay valid: several gzip members, several zstd
/// frames, and a tar without end-of-archive blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_member_gzip_and_multi_frame_zstd_are_accepted() {
    let registry = Registry::start().expect("registry");
    let c = client(vec![]);
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let tar = RawTar::new()
        .file("a", b"first\n")
        .file("payload", &payload)
        .file("z", b"last\n")
        .finish();
    let split = 1000;
    let unterminated = RawTar::new()
        .file("only", b"no end blocks\n")
        .unterminated();
    let cases: Vec<(&str, Vec<u8>, &'static str, &[u8])> = vec![
        (
            "ember/multi-gz",
            [gzip(&tar[..split]), gzip(&tar[split..])].concat(),
            OCI_LAYER_GZIP,
            &tar,
        ),
        (
            "ember/multi-zst",
            [zstd(&tar[..split]), zstd(&tar[split..])].concat(),
            OCI_LAYER_ZSTD,
            &tar,
        ),
        (
            "ember/no-eoa",
            gzip(&unterminated),
            OCI_LAYER_GZIP,
            &unterminated,
        ),
    ];
    for (repo, blob, mt, tar) in cases {
        let diff_id = sha256_digest(tar);
        push_raw_image(
            &registry.url(),
            repo,
            "latest",
            &[RawLayer {
                blob,
                media_type: mt,
            }],
            vec![diff_id.clone()],
        )
        .await
        .expect("push");
        let sd = StoreDir::new();
        pull_ref(&sd, &c, &reference(&registry, &format!("{repo}:latest")))
            .await
            .unwrap_or_else(|e| panic!("{repo}: {e}"));
        let dir = sd.store.layer_dir(&diff_id.parse().expect("diff_id"));
        if repo == "ember/no-eoa" {
            assert_eq!(
                fs::read(dir.join("only")).expect("only"),
                b"no end blocks\n"
            );
        } else {
            assert_eq!(fs::read(dir.join("payload")).expect("payload"), payload);
            assert_eq!(fs::read(dir.join("z")).expect("z"), b"last\n");
        }
    }
}
