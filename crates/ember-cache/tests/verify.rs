//! Nothing the cache could not verify becomes a hit: a document that does
//! not hash to the digest it is stored under, a download whose verified
//! length is not the file's, a tag whose `Docker-Content-Digest` cannot be
//! checked, or one in another algorithm that does not match. The node's
//! registry client (the same code) refuses the same manifests.

// Test code: a panic is the right answer to any surprise.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ember_cache::metrics::Metrics;
use ember_cache::storage::{Meta, Store};
use ember_oci::{Digest, Reference};
use ember_registry::{RegistryClient, RegistryError};
use sha2::Digest as _;
use std::sync::Arc;

fn sha512(b: &[u8]) -> String {
    format!("sha512:{}", hex::encode(sha2::Sha512::digest(b)))
}

fn blob_files(dir: &std::path::Path) -> usize {
    ["sha256", "sha512"]
        .iter()
        .map(|a| {
            std::fs::read_dir(dir.join("blobs").join(a))
                .unwrap()
                .count()
        })
        .sum()
}

#[test]
fn store_refuses_what_was_not_verified() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 30, 1 << 29, Arc::new(Metrics::default())).unwrap();
    // A document under a digest it does not hash to.
    let d: Digest = sha256(b"the real bytes").parse().unwrap();
    let err = store
        .put_bytes(&d, b"other bytes", Meta::default())
        .unwrap_err();
    assert!(
        matches!(err, ember_cache::CacheError::DigestMismatch { .. }),
        "{err}"
    );
    assert!(!store.contains(&d));
    // A download whose file holds more than the bytes that were hashed.
    let partial = store.partial_path(&d);
    std::fs::write(&partial, b"the real bytes and a tail").unwrap();
    let err = store
        .commit(
            &d,
            &partial,
            b"the real bytes".len() as u64,
            Meta::default(),
        )
        .unwrap_err();
    assert!(
        matches!(err, ember_cache::CacheError::DigestMismatch { .. }),
        "{err}"
    );
    assert!(!store.contains(&d));
    assert_eq!(blob_files(dir.path()), 0);
    // The right bytes go in.
    store
        .put_bytes(&d, b"the real bytes", Meta::default())
        .unwrap();
    assert!(store.contains(&d));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_digests_are_checked_in_their_algorithm_or_refused() {
    let fake = Fake::start().await;
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let m = manifest(&(sha256(b"1"), 1), &[]);
    fake.add_manifest("v", m.clone(), mt);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1 << 30, &[&fake.url()]);
    let cache = start_cache_with(cfg, dir).await;
    let url = format!("{}/v2/x/manifests/v", cache.url());
    let node = RegistryClient::new(Default::default()).unwrap();
    let r: Reference = format!("{}/x:v", fake.host()).parse().unwrap();

    // A digest header that cannot be checked: refused, not skipped.
    for bad in ["md5:0123456789abcdef", "sha256:not-hex", "garbage"] {
        fake.state.lock().unwrap().digest_header = Some(bad.into());
        let (s, _, body) = get(&url).await;
        assert_eq!(s, 502, "{bad}");
        assert_eq!(oci_code(&body.unwrap()), "MANIFEST_INVALID", "{bad}");
        let err = node.manifest(&r, "v").await.unwrap_err();
        assert!(
            matches!(err, RegistryError::Invalid { .. })
                && err.to_string().contains("Docker-Content-Digest"),
            "{bad}: {err}"
        );
    }

    // sha512 that does not match: refused by both (the node's client used
    // to check only sha256 headers and let this through).
    fake.state.lock().unwrap().digest_header = Some(sha512(b"something else"));
    let (s, _, body) = get(&url).await;
    assert_eq!(s, 502);
    assert_eq!(oci_code(&body.unwrap()), "DIGEST_INVALID");
    let err = node.manifest(&r, "v").await.unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    assert_eq!(cache.metric("ember_cache_stored_blobs"), 0);

    // sha512 that matches: stored and served under it.
    let good = sha512(&m);
    fake.state.lock().unwrap().digest_header = Some(good.clone());
    let (s, h, body) = get(&url).await;
    assert_eq!(s, 200);
    assert_eq!(body.unwrap(), m);
    assert_eq!(h["docker-content-digest"], good.as_str());
    assert_eq!(cache.metric("ember_cache_stored_blobs"), 1);
    let fetched = node.manifest(&r, "v").await.unwrap();
    assert_eq!(fetched.digest.to_string(), good);
    cache.stop().await;
}
