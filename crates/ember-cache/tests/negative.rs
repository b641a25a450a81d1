//! Negative caching: a storm of requests for an unknown digest or tag costs
//! one upstream request (the real registry's access log counts them), not
//! one per wave of clients.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ember_testkit::registry::Registry;
use std::time::Duration;

async fn storm(url: &str, waves: usize, per_wave: usize) {
    for _ in 0..waves {
        let mut tasks = Vec::new();
        for _ in 0..per_wave {
            let url = url.to_string();
            tasks.push(tokio::spawn(async move {
                let (status, _, _) = get(&url).await;
                status.as_u16()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 404);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 400 GETs (eight waves of 50) of an unknown blob and 400 of an unknown
/// tag: the registry sees one GET of each; after the remembered answer
/// expires, the next request asks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_digests_and_tags_go_upstream_once() {
    let reg = Registry::start().expect("registry");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1 << 30, &[&reg.url()]);
    cfg.negative_ttl = Duration::from_secs(60);
    let cache = start_cache_with(cfg, dir).await;
    let digest = sha256(b"nothing has this digest");
    let blob_url = format!("{}/v2/ember/none/blobs/{digest}", cache.url());
    storm(&blob_url, 8, 50).await;
    let tag_url = format!("{}/v2/ember/none/manifests/nope", cache.url());
    storm(&tag_url, 8, 50).await;
    // HEADs share the remembered answer too.
    let resp = http().head(&blob_url).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let blob_path = format!("/blobs/{digest}");
    reg.wait_for_requests("GET", &blob_path, 2, Duration::from_secs(2));
    assert_eq!(
        reg.count_requests("GET", &blob_path) + reg.count_requests("HEAD", &blob_path),
        1,
        "{}",
        reg.access_log()
    );
    assert_eq!(
        reg.count_requests("GET", "/manifests/nope"),
        1,
        "{}",
        reg.access_log()
    );
    assert!(cache.metric("ember_cache_negative_hits_total") >= 700);
    cache.stop().await;

    // Zero: not remembered; concurrent requests still share one GET.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1 << 30, &[&reg.url()]);
    cfg.negative_ttl = Duration::ZERO;
    let cache = start_cache_with(cfg, dir).await;
    let other = sha256(b"nor this one");
    let url = format!("{}/v2/ember/none/blobs/{other}", cache.url());
    storm(&url, 2, 1).await;
    let path = format!("/blobs/{other}");
    assert_eq!(
        reg.wait_for_requests("GET", &path, 2, Duration::from_secs(10)),
        2
    );
    cache.stop().await;
}
