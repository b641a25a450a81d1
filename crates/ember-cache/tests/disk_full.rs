//! A cache whose disk is smaller than its byte budget: `--dir` on a 20 MB
//! tmpfs with a 1 GiB budget. A blob that cannot fit even after eviction is
//! refused before the status line (never a 200 cut short), and blobs that
//! fit evict older ones to make room instead of failing.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ember_testkit::fixtures::{self, BlobKind};
use ember_testkit::registry::Registry;
use std::path::Path;
use std::process::Command;

/// A tmpfs of `size` mounted on a new temporary directory.
fn tmpfs(size: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs");
    dir
}

fn unmount(dir: tempfile::TempDir) {
    let _ = Command::new("umount").arg(dir.path()).status();
}

fn free_bytes(p: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(p).unwrap();
    st.blocks_available() * st.fragment_size()
}

/// A 53 MB layer on a 20 MB disk: 503 before any body byte (not a 200 with
/// the full Content-Length cut after 24 KB), nothing left on the disk;
/// the image's small blobs are still served complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_larger_than_the_disk_is_refused_before_the_status_line() {
    let reg = Registry::start().expect("registry");
    let f = fixtures::build_cached("big").expect("fixture");
    fixtures::push(&f, &reg.url(), "ember/big", "latest")
        .await
        .expect("push");
    let layer = f
        .blobs_of(BlobKind::Layer)
        .max_by_key(|b| b.size)
        .unwrap()
        .clone();
    assert!(layer.size > 40_000_000);
    let mnt = tmpfs("20m");
    let before = free_bytes(mnt.path());
    let cfg = config(mnt.path(), 1 << 30, &[&reg.url()]);
    let cache = start_cache_with(cfg, mnt).await;
    let url = format!("{}/v2/ember/big/blobs/{}", cache.url(), layer.digest);
    for _ in 0..2 {
        let (status, _, body) = get(&url).await;
        match status.as_u16() {
            503 => assert_eq!(oci_code(&body.unwrap()), "UNAVAILABLE"),
            200 => assert_eq!(sha256(&body.expect("a complete body")), layer.digest),
            s => panic!("unexpected status {s}"),
        }
        assert_eq!(status, 503, "the blob cannot fit");
    }
    // The small blobs (config, manifest) are served and kept.
    for b in f.blobs_of(BlobKind::Config) {
        let (status, _, body) =
            get(&format!("{}/v2/ember/big/blobs/{}", cache.url(), b.digest)).await;
        assert_eq!(status, 200);
        assert_eq!(sha256(&body.unwrap()), b.digest);
    }
    let dir = cache.stop().await;
    let after = free_bytes(dir.path());
    assert!(
        after + (2 << 20) >= before,
        "the disk was left full: {after} of {before} bytes free"
    );
    unmount(dir);
}

/// Six 6 MiB blobs through a 20 MB disk with a 1 GiB budget: each is
/// served complete and digest-correct, older ones are evicted to make room
/// (the budget alone would never evict), and the disk is not left full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_evicts_to_make_room() {
    let fake = Fake::start().await;
    let digests: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            let data = blob(100 + i, 6 << 20);
            (fake.add_blob(data.clone(), Mode::Normal), data)
        })
        .collect();
    let mnt = tmpfs("20m");
    let cfg = config(mnt.path(), 1 << 30, &[&fake.url()]);
    let cache = start_cache_with(cfg, mnt).await;
    for (d, data) in &digests {
        let (status, headers, body) = get(&format!("{}/v2/x/blobs/{d}", cache.url())).await;
        assert_eq!(status, 200);
        assert_eq!(
            headers["content-length"].to_str().unwrap(),
            data.len().to_string()
        );
        assert_eq!(sha256(&body.expect("complete body")), *d);
        // Committed (or evicted) once the client has its last byte.
        for _ in 0..500 {
            if cache.server.cache().flights.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    assert!(cache.metric("ember_cache_evictions_total") >= 3);
    assert!(cache.metric("ember_cache_stored_bytes") <= 20 << 20);
    // The newest blob is a hit: it was kept, not streamed and dropped.
    let (last, _) = digests.last().unwrap();
    let fetches = cache.metric("ember_cache_upstream_fetches_total");
    let (status, _, body) = get(&format!("{}/v2/x/blobs/{last}", cache.url())).await;
    assert_eq!(status, 200);
    assert_eq!(sha256(&body.unwrap()), *last);
    assert_eq!(cache.metric("ember_cache_upstream_fetches_total"), fetches);
    let dir = cache.stop().await;
    unmount(dir);
}
