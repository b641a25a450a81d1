//! Faults: upstreams that break off, corrupt, fail or go away; budgets
//! smaller than a blob; oversized manifests. A client must never get a
//! complete-looking wrong body, and nothing unverified may be cached.

// Helpers outside #[test] functions panic on surprises too.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::time::Duration;

/// The upstream connection breaks mid-blob: every client sees an error (a
/// short body, never a complete 200), nothing is cached, and the next
/// request resumes from the partial file with a Range request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_cut_mid_blob_aborts_clients_and_resumes_with_range() {
    let fake = Fake::start().await;
    let data = blob(1, 3 << 20);
    let cut = 1 << 20;
    let digest = fake.add_blob(data.clone(), Mode::CutAfterOnce(cut));
    let cache = start_cache(&[&fake.url()], 1 << 30).await;
    let url = format!("{}/v2/x/blobs/{digest}", cache.url());

    // Four clients join the download; the upstream breaks off once they
    // are all in.
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let mut tasks = vec![];
    for _ in 0..4 {
        let url = url.clone();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let resp = http().get(&url).send().await.unwrap();
            tx.send(()).await.unwrap();
            (resp.status(), resp.bytes().await)
        }));
    }
    for _ in 0..4 {
        rx.recv().await.unwrap();
    }
    fake.release.notify_one();
    for t in tasks {
        let (s, body) = t.await.unwrap();
        // The status line went out before the failure; the body must not
        // complete.
        assert_eq!(s, 200);
        assert!(body.is_err(), "a broken download reached a client whole");
    }
    assert_eq!(cache.metric("ember_cache_stored_blobs"), 0);
    assert_eq!(cache.metric("ember_cache_upstream_failures_total"), 1);

    let (s, _, body) = get(&url).await;
    assert_eq!(s, 200);
    assert_eq!(body.unwrap(), data);
    let log = fake.log();
    let gets: Vec<_> = log
        .iter()
        .filter(|(m, p, _, _)| m == "GET" && p.contains(&digest))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].2, None);
    let resumed_at: u64 = gets[1]
        .2
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .expect("second GET is a Range request");
    assert!(resumed_at > 0 && resumed_at <= cut as u64, "{resumed_at}");
    assert_eq!(cache.wait_metric("ember_cache_stored_blobs", 1).await, 1);
    // The resume fetched only the rest: upstream bytes total the blob plus
    // at most what the broken first try delivered.
    assert!(cache.metric("ember_cache_upstream_bytes_total") <= (data.len() + cut) as u64);
    cache.stop().await;
}

/// Corrupted bytes: the digest check fails, clients' bodies break off
/// before the end, nothing is cached, the next try downloads afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupted_upstream_bytes_are_never_served_whole_nor_cached() {
    let fake = Fake::start().await;
    let data = blob(2, 2 << 20);
    let digest = fake.add_blob(data.clone(), Mode::Corrupt);
    let cache = start_cache(&[&fake.url()], 1 << 30).await;
    let url = format!("{}/v2/x/blobs/{digest}", cache.url());
    for _ in 0..2 {
        let (s, _, body) = get(&url).await;
        assert!(
            s != 200 || body.is_err(),
            "corrupt content was served as a complete 200"
        );
    }
    assert_eq!(cache.metric("ember_cache_stored_blobs"), 0);
    let dir = cache.dir.as_ref().unwrap().path().to_path_buf();
    assert_eq!(std::fs::read_dir(dir.join("partial")).unwrap().count(), 0);
    // Fixed upstream: served and cached.
    fake.set_mode(&digest, Mode::Normal);
    let (s, _, body) = get(&url).await;
    assert_eq!(s, 200);
    assert_eq!(body.unwrap(), data);
    // Never resumed from corrupt bytes: no Range request was ever sent.
    assert!(fake.log().iter().all(|(_, _, r, _)| r.is_none()));
    cache.stop().await;
}

/// 500s: the client gets 503 UNAVAILABLE (so it can fall back to the
/// origin); a later request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_500s_become_503_then_recover() {
    let fake = Fake::start().await;
    let data = blob(3, 100_000);
    // The cache retries once, so two 500s make one request fail.
    let digest = fake.add_blob(data.clone(), Mode::Fail500(2));
    let cache = start_cache(&[&fake.url()], 1 << 30).await;
    let url = format!("{}/v2/x/blobs/{digest}", cache.url());
    let (s, _, body) = get(&url).await;
    assert_eq!(s, 503);
    assert_eq!(oci_code(&body.unwrap()), "UNAVAILABLE");
    let (s, _, body) = get(&url).await;
    assert_eq!(s, 200);
    assert_eq!(body.unwrap(), data);
    cache.stop().await;
}

/// A blob bigger than the whole budget is streamed to its readers and not
/// kept; the budget is never exceeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blob_larger_than_the_budget_is_streamed_not_kept() {
    let fake = Fake::start().await;
    let data = blob(4, 4 << 20);
    let digest = fake.add_blob(data.clone(), Mode::Normal);
    let cache = start_cache(&[&fake.url()], 1 << 20).await;
    let url = format!("{}/v2/x/blobs/{digest}", cache.url());
    let mut tasks = vec![];
    for _ in 0..3 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move { get(&url).await }));
    }
    for t in tasks {
        let (s, _, body) = t.await.unwrap();
        assert_eq!(s, 200);
        assert_eq!(body.unwrap(), data);
    }
    assert_eq!(cache.metric("ember_cache_stored_bytes"), 0);
    // Not kept: the next request goes upstream again.
    let before = fake.requests("GET", &digest);
    let (_, _, body) = get(&url).await;
    assert_eq!(body.unwrap(), data);
    assert_eq!(fake.requests("GET", &digest), before + 1);
    let dir = cache.stop().await;
    assert_eq!(
        std::fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("partial"))
            .unwrap()
            .count(),
        0
    );
}

/// A manifest over 4 MiB is refused, not buffered or cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifest_over_4_mib_is_refused() {
    let fake = Fake::start().await;
    let mut big = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","annotations":{"x":""#.to_vec();
    big.extend(std::iter::repeat_n(b'a', (4 << 20) + 10));
    big.extend_from_slice(br#""}}"#);
    let d = fake.add_manifest("huge", big, "application/vnd.oci.image.manifest.v1+json");
    let cache = start_cache(&[&fake.url()], 1 << 30).await;
    for r in ["huge", d.as_str()] {
        let (s, _, body) = get(&format!("{}/v2/x/manifests/{r}", cache.url())).await;
        assert_eq!(s, 502, "{r}");
        assert_eq!(oci_code(&body.unwrap()), "MANIFEST_INVALID");
    }
    assert_eq!(cache.metric("ember_cache_stored_blobs"), 0);
    cache.stop().await;
}

/// A tag whose upstream manifest does not match Docker-Content-Digest, and a
/// manifest by digest whose bytes do not match, are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifest_digest_mismatch_is_refused() {
    let fake = Fake::start().await;
    let good = manifest(&(sha256(b"{}"), 2), &[]);
    let d = fake.add_manifest("t", good, "application/vnd.oci.image.manifest.v1+json");
    // Replace the content under the digest key with other bytes.
    let other = manifest(&(sha256(b"{ }"), 3), &[]);
    fake.state.lock().unwrap().manifests.insert(
        d.clone(),
        (
            other.into(),
            "application/vnd.oci.image.manifest.v1+json".into(),
        ),
    );
    let cache = start_cache(&[&fake.url()], 1 << 30).await;
    let (s, _, body) = get(&format!("{}/v2/x/manifests/{d}", cache.url())).await;
    assert_eq!(s, 502);
    assert_eq!(oci_code(&body.unwrap()), "DIGEST_INVALID");
    cache.stop().await;
}

/// Tags: fresh within the TTL without asking the upstream; after it, a HEAD
/// revalidates; a changed tag is fetched; while the upstream is down the
/// last known manifest is served with a Warning header.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tags_ttl_revalidation_and_stale_serving() {
    let fake = Fake::start().await;
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let m1 = manifest(&(sha256(b"1"), 1), &[]);
    let d1 = fake.add_manifest("v", m1.clone(), mt);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1 << 30, &[&fake.url()]);
    cfg.tag_ttl = Duration::from_millis(300);
    let cache = start_cache_with(cfg, dir).await;
    let url = format!("{}/v2/x/manifests/v", cache.url());

    let (s, h, b) = get(&url).await;
    assert_eq!((s.as_u16(), b.unwrap()), (200, m1.clone().into()));
    assert_eq!(h["docker-content-digest"], d1.as_str());
    // Within the TTL: no upstream request at all.
    let n = fake.log().len();
    let (s, _, _) = get(&url).await;
    assert_eq!(s, 200);
    assert_eq!(fake.log().len(), n);

    // After the TTL: a HEAD, no GET (unchanged).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let gets = fake.requests("GET", "/manifests/v");
    let (s, h, _) = get(&url).await;
    assert_eq!(s, 200);
    assert!(h.get("warning").is_none());
    assert_eq!(fake.requests("HEAD", "/manifests/v"), 1);
    assert_eq!(fake.requests("GET", "/manifests/v"), gets);

    // The tag moves: after the TTL the new manifest is served.
    let m2 = manifest(&(sha256(b"2"), 1), &[]);
    let d2 = fake.add_manifest("v", m2.clone(), mt);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (s, h, b) = get(&url).await;
    assert_eq!(s, 200);
    assert_eq!(h["docker-content-digest"], d2.as_str());
    assert_eq!(b.unwrap(), m2);

    // Upstream down: stale, with a warning.
    fake.set_down(true);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (s, h, b) = get(&url).await;
    assert_eq!(s, 200);
    assert_eq!(b.unwrap(), m2);
    assert!(h["warning"].to_str().unwrap().starts_with("110"));
    assert_eq!(cache.metric("ember_cache_stale_served_total"), 1);
    // Content by digest needs no upstream at all.
    let (s, _, b) = get(&format!("{}/v2/x/manifests/{d1}", cache.url())).await;
    assert_eq!(s, 200);
    assert_eq!(b.unwrap(), m1);
    // An unknown tag while down: 503.
    let (s, _, _) = get(&format!("{}/v2/x/manifests/other", cache.url())).await;
    assert_eq!(s, 503);
    cache.stop().await;
}

/// The upstream process goes away entirely (connection refused): cached
/// content keeps being served, tags stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_gone_cached_content_still_served() {
    let fake = Fake::start().await;
    let data = blob(5, 300_000);
    let bd = fake.add_blob(data.clone(), Mode::Normal);
    let m = manifest(&(bd.clone(), data.len()), &[]);
    fake.add_manifest("v", m.clone(), "application/vnd.oci.image.manifest.v1+json");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1 << 30, &[&fake.url()]);
    cfg.tag_ttl = Duration::from_millis(1);
    let cache = start_cache_with(cfg, dir).await;
    let (s, _, _) = get(&format!("{}/v2/x/manifests/v", cache.url())).await;
    assert_eq!(s, 200);
    let (s, _, _) = get(&format!("{}/v2/x/blobs/{bd}", cache.url())).await;
    assert_eq!(s, 200);
    fake.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (s, h, b) = get(&format!("{}/v2/x/manifests/v", cache.url())).await;
    assert_eq!(s, 200);
    assert!(h.contains_key("warning"));
    assert_eq!(b.unwrap(), m);
    let (s, _, b) = get(&format!("{}/v2/x/blobs/{bd}", cache.url())).await;
    assert_eq!(s, 200);
    assert_eq!(b.unwrap(), data);
    cache.stop().await;
}
