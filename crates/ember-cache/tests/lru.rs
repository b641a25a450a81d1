//! LRU eviction under the byte budget, readers protected from eviction,
//! and surviving a restart.

// Helpers outside #[test] functions panic on surprises too.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::time::Duration;

const MB: usize = 1 << 20;

/// Five 1 MiB blobs through a 3.5 MiB budget (high 95 %, low 80 %): the
/// least recently used go first, a recently read one stays, and the total
/// never stays above the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evicts_least_recently_used_first() {
    let fake = Fake::start().await;
    let blobs: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            let b = blob(100 + i, MB);
            (fake.add_blob(b.clone(), Mode::Normal), b)
        })
        .collect();
    let budget = 3 * MB as u64 + MB as u64 / 2;
    let cache = start_cache(&[&fake.url()], budget).await;
    let url = |d: &str| format!("{}/v2/x/blobs/{d}", cache.url());
    for (i, (d, b)) in blobs.iter().enumerate().take(3) {
        assert_eq!(get(&url(d)).await.2.unwrap(), *b);
        cache
            .wait_metric("ember_cache_stored_blobs", i as u64 + 1)
            .await;
    }
    // Use blob 0 again: blob 1 is now the least recently used.
    assert_eq!(get(&url(&blobs[0].0)).await.2.unwrap(), blobs[0].1);
    // Blob 3 pushes the total to 4 MiB > 95 % of 3.5 MiB: evict down to
    // 80 % (2.8 MiB), i.e. blobs 1 and 2, oldest first.
    assert_eq!(get(&url(&blobs[3].0)).await.2.unwrap(), blobs[3].1);
    cache.wait_metric("ember_cache_evictions_total", 2).await;
    assert_eq!(cache.metric("ember_cache_evictions_total"), 2);
    assert_eq!(cache.metric("ember_cache_stored_blobs"), 2);
    assert!(cache.metric("ember_cache_stored_bytes") <= budget);
    let before: Vec<usize> = blobs.iter().map(|(d, _)| fake.requests("GET", d)).collect();
    // 0 and 3 are hits; 1 is fetched again.
    for i in [0, 3, 1] {
        assert_eq!(get(&url(&blobs[i].0)).await.2.unwrap(), blobs[i].1);
    }
    assert_eq!(fake.requests("GET", &blobs[0].0), before[0]);
    assert_eq!(fake.requests("GET", &blobs[3].0), before[3]);
    assert_eq!(fake.requests("GET", &blobs[1].0), before[1] + 1);
    cache.stop().await;
}

/// A blob being read is not evicted, even when it is the least recently
/// used: its reader gets every byte, and it stays on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blob_being_read_is_not_evicted() {
    let fake = Fake::start().await;
    // Larger than loopback socket buffers, so the response cannot have
    // been written out whole while the client is not reading.
    let a = blob(200, 32 * MB);
    let da = fake.add_blob(a.clone(), Mode::Normal);
    let others: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| {
            let b = blob(300 + i, 6 * MB);
            (fake.add_blob(b.clone(), Mode::Normal), b)
        })
        .collect();
    let cache = start_cache(&[&fake.url()], 40 * MB as u64).await;
    let url = |d: &str| format!("{}/v2/x/blobs/{d}", cache.url());
    assert_eq!(get(&url(&da)).await.2.unwrap(), a);
    cache.wait_metric("ember_cache_stored_blobs", 1).await;
    // Start reading A and stop after the first chunk.
    let mut slow = http().get(url(&da)).send().await.unwrap();
    let mut got = slow.chunk().await.unwrap().unwrap().to_vec();
    // Fill the cache past its budget several times over.
    for (d, b) in &others {
        assert_eq!(get(&url(d)).await.2.unwrap(), *b);
    }
    cache
        .wait_metric("ember_cache_upstream_fetches_total", 4)
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(cache.metric("ember_cache_evictions_total") >= 1);
    let dir = cache.dir.as_ref().unwrap().path().to_path_buf();
    let hex = da.strip_prefix("sha256:").unwrap();
    assert!(
        dir.join("blobs/sha256").join(hex).exists(),
        "pinned blob was evicted"
    );
    while let Some(c) = slow.chunk().await.unwrap() {
        got.extend_from_slice(&c);
    }
    assert_eq!(got, a);
    cache.stop().await;
}

/// After a restart the index is rebuilt from disk (hits without asking the
/// upstream), and orphaned partial files are removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn survives_restart() {
    let fake = Fake::start().await;
    let data = blob(400, MB);
    let d = fake.add_blob(data.clone(), Mode::Normal);
    let m = manifest(&(d.clone(), data.len()), &[]);
    let md = fake.add_manifest("v", m.clone(), "application/vnd.oci.image.manifest.v1+json");
    let cache = start_cache(&[&fake.url()], 1 << 30).await;
    assert_eq!(
        get(&format!("{}/v2/x/blobs/{d}", cache.url()))
            .await
            .2
            .unwrap(),
        data
    );
    assert_eq!(
        get(&format!("{}/v2/x/manifests/v", cache.url()))
            .await
            .2
            .unwrap(),
        m
    );
    cache.wait_metric("ember_cache_stored_blobs", 2).await;
    let dir = cache.stop().await;
    // A crash left a partial download and junk behind.
    std::fs::write(dir.path().join("partial/sha256-abc"), b"half").unwrap();
    std::fs::write(dir.path().join("blobs/sha256/not-a-digest"), b"x").unwrap();

    fake.set_down(true);
    let cfg = config(dir.path(), 1 << 30, &[&fake.url()]);
    let cache = start_cache_with(cfg, dir).await;
    assert_eq!(cache.metric("ember_cache_stored_blobs"), 2);
    let n = fake.log().len();
    let (s, _, b) = get(&format!("{}/v2/x/blobs/{d}", cache.url())).await;
    assert_eq!(s, 200);
    assert_eq!(b.unwrap(), data);
    let (s, h, b) = get(&format!("{}/v2/x/manifests/{md}", cache.url())).await;
    assert_eq!(s, 200);
    assert_eq!(
        h["content-type"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(b.unwrap(), m);
    // The tag survives too (stale, since the upstream is down).
    let (s, _, b) = get(&format!("{}/v2/x/manifests/v", cache.url())).await;
    assert_eq!(s, 200);
    assert_eq!(b.unwrap(), m);
    assert_eq!(
        fake.log()
            .iter()
            .skip(n)
            .filter(|(_, p, _, _)| p.contains("/blobs/"))
            .count(),
        0
    );
    let dir = cache.stop().await;
    assert!(!dir.path().join("partial/sha256-abc").exists());
    assert!(!dir.path().join("blobs/sha256/not-a-digest").exists());
}

/// Two servers cannot share one directory (they would delete each other's
/// partial files).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn directory_is_locked() {
    let fake = Fake::start().await;
    let cache = start_cache(&[&fake.url()], 1 << 30).await;
    let cfg = config(cache.dir.as_ref().unwrap().path(), 1 << 30, &[&fake.url()]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    assert!(ember_cache::spawn(cfg, listener).is_err());
    cache.stop().await;
}
