//! Single-flight and fan-out: many clients, one upstream download, and
//! bytes reaching clients while the download is still running.

// Helpers outside #[test] functions panic on surprises too.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ember_testkit::fixtures::{self, BlobKind};
use ember_testkit::registry::Registry;
use std::time::Duration;

/// 32 clients at once on one uncached 53 MB blob: the real registry's
/// access log shows exactly one GET of it, and all 32 get correct bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_clients_one_upstream_get() {
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
    assert!(layer.size > 50_000_000);
    let cache = start_cache(&[&reg.url()], 4 << 30).await;
    let url = format!("{}/v2/ember/big/blobs/{}", cache.url(), layer.digest);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(32));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let url = url.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let (s, _, body) = get(&url).await;
            (s, sha256(&body.expect("complete body")))
        }));
    }
    for t in tasks {
        let (s, d) = t.await.unwrap();
        assert_eq!(s, 200);
        assert_eq!(d, layer.digest);
    }
    // The log line appears when the upstream's response is complete.
    let path = format!("/blobs/{}", layer.digest);
    reg.wait_for_requests("GET", &path, 1, Duration::from_secs(10));
    assert_eq!(reg.count_requests("GET", &path), 1, "{}", reg.access_log());
    assert_eq!(cache.metric("ember_cache_upstream_fetches_total"), 1);
    assert_eq!(
        cache.metric("ember_cache_hits_total{kind=\"blob\"}")
            + cache.metric("ember_cache_misses_total{kind=\"blob\"}"),
        32
    );
    cache.stop().await;
}

/// Clients receive bytes from the file being written: with the upstream
/// paused halfway, every client already has the first half, and none has
/// the whole blob. Then the rest arrives and all bodies verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_stream_from_the_download_in_progress() {
    let fake = Fake::start().await;
    let data = blob(7, 8 << 20);
    let half = 4 << 20;
    let digest = fake.add_blob(data.clone(), Mode::GateAfter(half));
    let cache = start_cache(&[&fake.url()], 1 << 30).await;
    let url = format!("{}/v2/x/blobs/{digest}", cache.url());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<usize>(64);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut resp = http().get(&url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.content_length(), Some(8 << 20));
            let mut got = Vec::new();
            let mut reported = false;
            while let Some(c) = resp.chunk().await.unwrap() {
                got.extend_from_slice(&c);
                if !reported && got.len() >= half {
                    reported = true;
                    tx.send(got.len()).await.unwrap();
                }
            }
            got
        }));
    }
    drop(tx);
    // Every client reaches the halfway mark while the upstream is paused.
    for _ in 0..4 {
        let n = rx.recv().await.expect("a client reached half");
        assert!(
            n < data.len(),
            "a client got everything before the upstream sent it"
        );
    }
    assert_eq!(fake.requests("GET", &digest), 1);
    fake.release.notify_one();
    for t in tasks {
        assert_eq!(t.await.unwrap(), data);
    }
    assert_eq!(fake.requests("GET", &digest), 1);
    cache.stop().await;
}

/// Concurrent requests for one uncached manifest tag cause one upstream GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_manifest_requests_fetch_once() {
    let fake = Fake::start().await;
    let cfg = fake.add_blob(b"{}".to_vec(), Mode::Normal);
    let m = manifest(&(cfg, 2), &[]);
    let md = fake.add_manifest(
        "v1",
        m.clone(),
        "application/vnd.oci.image.manifest.v1+json",
    );
    let cache = start_cache(&[&fake.url()], 1 << 30).await;
    let url = format!("{}/v2/x/manifests/v1", cache.url());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move { get(&url).await }));
    }
    for t in tasks {
        let (s, h, body) = t.await.unwrap();
        assert_eq!(s, 200);
        assert_eq!(h["docker-content-digest"], md.as_str());
        assert_eq!(body.unwrap(), m);
    }
    assert_eq!(fake.requests("GET", "/manifests/v1"), 1);
    cache.stop().await;
}
