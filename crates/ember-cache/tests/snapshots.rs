//! `/ember/v1/snapshots`: artifacts verified while they upload, write
//! authorization, manifests only while their artifact is held, eviction
//! under the blob store's byte budget, and a restart.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use reqwest::StatusCode;

const MB: usize = 1 << 20;
const TOKEN: &str = "snap-secret";

async fn start(dir: tempfile::TempDir, budget: u64) -> TestCache {
    // The registry side needs an upstream; these tests never reach it.
    let mut cfg = config(dir.path(), budget, &["http://127.0.0.1:9"]);
    cfg.snapshot_write_token = Some(TOKEN.into());
    start_cache_with(cfg, dir).await
}

async fn put(url: &str, token: Option<&str>, body: Vec<u8>) -> (StatusCode, String) {
    let mut r = http().put(url).body(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.expect("send");
    (resp.status(), resp.text().await.unwrap_or_default())
}

fn manifest(artifact: &str, bytes: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "name": "ignored-by-the-cache",
        "artifact": artifact,
        "artifact_bytes": bytes,
        "image_name": "busybox",
        "metadata": {"format": 1},
    }))
    .unwrap()
}

async fn metrics_text(cache: &TestCache) -> String {
    http()
        .get(format!("{}/metrics", cache.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn gauge(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

fn partial_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("partial")).unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_are_verified_and_writes_need_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let cache = start(dir, 64 << 20).await;
    let base = format!("{}/ember/v1/snapshots", cache.url());
    let artifact = blob(1, 3 * MB);
    let d = sha256(&artifact);
    let blob_url = format!("{base}/blobs/{d}");

    // No token, a wrong token: refused before a byte is kept.
    for t in [None, Some("wrong")] {
        let (s, body) = put(&blob_url, t, artifact.clone()).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains("write token"), "{body}");
    }
    // Bytes that hash to something else than the URL says: refused, and
    // nothing is left of them.
    let other = sha256(b"other bytes");
    let (s, body) = put(
        &format!("{base}/blobs/{other}"),
        Some(TOKEN),
        artifact.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains("DIGEST_INVALID") && body.contains(&d),
        "{body}"
    );
    assert_eq!(partial_files(&root), 0);
    let head = http()
        .head(format!("{base}/blobs/{other}"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        cache.metric("ember_cache_snapshot_uploads_total{outcome=\"refused\"}"),
        3
    );

    // A manifest before its artifact is refused.
    let (s, body) = put(
        &format!("{base}/manifests/app"),
        Some(TOKEN),
        manifest(&d, artifact.len()),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("upload it before its manifest"), "{body}");

    // The right bytes: stored, served back whole.
    let (s, body) = put(&blob_url, Some(TOKEN), artifact.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let head = http().head(&blob_url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["content-length"].to_str().unwrap(),
        artifact.len().to_string()
    );
    let (s, _, got) = get(&blob_url).await;
    assert_eq!(s, 200);
    assert_eq!(got.unwrap(), artifact);
    assert_eq!(
        cache.metric("ember_cache_snapshot_hits_total{kind=\"artifact\"}"),
        1
    );
    assert_eq!(
        cache.metric("ember_cache_snapshot_served_bytes_total"),
        artifact.len() as u64
    );
    // The registry side does not hand it out: it is no image blob.
    let (s, _, _) = get(&format!("{}/v2/x/blobs/{d}", cache.url())).await;
    assert_ne!(s, 200);

    // Manifest: stored, read back as sent, listed.
    let m = manifest(&d, artifact.len());
    let (s, body) = put(&format!("{base}/manifests/app"), Some(TOKEN), m.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, _, got) = get(&format!("{base}/manifests/app")).await;
    assert_eq!(s, 200);
    assert_eq!(got.unwrap(), m);
    let (_, _, list) = get(&base).await;
    let list: serde_json::Value = serde_json::from_slice(&list.unwrap()).unwrap();
    assert_eq!(list["snapshots"][0]["key"], "app", "{list}");
    assert_eq!(list["snapshots"][0]["artifact"], d.as_str(), "{list}");
    let text = metrics_text(&cache).await;
    assert_eq!(
        gauge(&text, "ember_cache_snapshot_stored_bytes"),
        artifact.len() as u64
    );
    assert_eq!(gauge(&text, "ember_cache_snapshot_stored_artifacts"), 1);

    // Bad keys, deletes.
    let (s, _) = put(&format!("{base}/manifests/.hidden"), Some(TOKEN), m.clone()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let del = |t: Option<&'static str>| {
        let mut r = http().delete(format!("{base}/manifests/app"));
        if let Some(t) = t {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(del(None).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(
        del(Some(TOKEN)).await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    let (s, _, body) = get(&format!("{base}/manifests/app")).await;
    assert_eq!(s, 404);
    assert!(String::from_utf8_lossy(&body.unwrap()).contains("SNAPSHOT_UNKNOWN"));
    cache.stop().await;
}

/// Four 1 MiB artifacts through a 3.5 MiB budget: the two least recently
/// used go (reading a manifest counts as a use of its artifact), their
/// manifests with them; what is left survives a restart as snapshots.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn artifacts_are_evicted_under_the_byte_budget_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 3 * MB as u64 + MB as u64 / 2;
    let cache = start(dir, budget).await;
    let base = format!("{}/ember/v1/snapshots", cache.url());
    let arts: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            let b = blob(10 + i, MB);
            (sha256(&b), b)
        })
        .collect();
    let keys = ["a", "b", "c", "d"];
    for (i, (d, b)) in arts.iter().enumerate().take(3) {
        let (s, body) = put(&format!("{base}/blobs/{d}"), Some(TOKEN), b.clone()).await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        let (s, body) = put(
            &format!("{base}/manifests/{}", keys[i]),
            Some(TOKEN),
            manifest(d, MB),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
    }
    // `a` is used again: `b` and `c` are now the least recently used.
    assert_eq!(get(&format!("{base}/manifests/a")).await.0, 200);
    let (d3, b3) = &arts[3];
    assert_eq!(
        put(&format!("{base}/blobs/{d3}"), Some(TOKEN), b3.clone())
            .await
            .0,
        StatusCode::CREATED
    );
    assert_eq!(
        put(
            &format!("{base}/manifests/d"),
            Some(TOKEN),
            manifest(d3, MB)
        )
        .await
        .0,
        StatusCode::CREATED
    );
    assert_eq!(cache.metric("ember_cache_evictions_total"), 2);
    for (k, d, there) in [
        ("a", &arts[0].0, true),
        ("b", &arts[1].0, false),
        ("c", &arts[2].0, false),
    ] {
        assert_eq!(
            get(&format!("{base}/manifests/{k}")).await.0 == 200,
            there,
            "{k}"
        );
        assert_eq!(
            get(&format!("{base}/blobs/{d}")).await.0 == 200,
            there,
            "{k}"
        );
    }
    let (_, _, list) = get(&base).await;
    let list: serde_json::Value = serde_json::from_slice(&list.unwrap()).unwrap();
    let listed: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["a", "d"]);
    let text = metrics_text(&cache).await;
    assert_eq!(
        gauge(&text, "ember_cache_snapshot_stored_bytes"),
        2 * MB as u64
    );
    assert!(gauge(&text, "ember_cache_stored_bytes") <= budget);

    // A restart rebuilds the index from disk: still snapshots, still served.
    let dir = cache.stop().await;
    let cache = start(dir, budget).await;
    let base = format!("{}/ember/v1/snapshots", cache.url());
    let (s, _, got) = get(&format!("{base}/blobs/{}", arts[0].0)).await;
    assert_eq!(s, 200);
    assert_eq!(got.unwrap(), arts[0].1);
    assert_eq!(get(&format!("{base}/manifests/d")).await.0, 200);
    cache.stop().await;
}

/// Two caches that name each other as `--peer`s, both taking snapshot
/// writes.
async fn peered_pair() -> (TestCache, TestCache) {
    init();
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (ua, ub) = (
        format!("http://{}", la.local_addr().unwrap()),
        format!("http://{}", lb.local_addr().unwrap()),
    );
    let mut out = vec![];
    for (l, peer) in [(la, ub), (lb, ua)] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 64 << 20, &["http://127.0.0.1:9"]);
        cfg.snapshot_write_token = Some(TOKEN.into());
        cfg.peers = vec![peer];
        out.push(TestCache {
            server: ember_cache::spawn(cfg, l).unwrap(),
            dir: Some(dir),
        });
    }
    let b = out.pop().unwrap();
    let a = out.pop().unwrap();
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_missing_here_is_asked_from_the_peers() {
    let (a, b) = peered_pair().await;
    let artifact = blob(7, 2 * MB);
    let d = sha256(&artifact);
    let (base_a, base_b) = (
        format!("{}/ember/v1/snapshots", a.url()),
        format!("{}/ember/v1/snapshots", b.url()),
    );
    let (s, body) = put(
        &format!("{base_a}/blobs/{d}"),
        Some(TOKEN),
        artifact.clone(),
    )
    .await;
    assert!(s.is_success(), "{body}");
    let m = manifest(&d, artifact.len());
    let (s, body) = put(&format!("{base_a}/manifests/app"), Some(TOKEN), m.clone()).await;
    assert!(s.is_success(), "{body}");

    // B holds neither, and answers both from A.
    let (s, _, got) = get(&format!("{base_b}/manifests/app")).await;
    assert_eq!(s, 200);
    assert_eq!(got.unwrap(), m);
    let (s, h, got) = get(&format!("{base_b}/blobs/{d}")).await;
    assert_eq!(s, 200);
    assert_eq!(h["content-length"], artifact.len().to_string().as_str());
    assert_eq!(got.unwrap(), artifact);
    let head = http()
        .head(format!("{base_b}/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    // A range is passed on: a resumed download works through B too.
    let part = http()
        .get(format!("{base_b}/blobs/{d}"))
        .header("range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 1000-{}/{}", artifact.len() - 1, artifact.len()).as_str()
    );
    assert_eq!(part.bytes().await.unwrap(), artifact[1000..]);
    let text = metrics_text(&b).await;
    assert_eq!(gauge(&text, "ember_cache_snapshot_peer_hits_total"), 4);
    // Passed through, not stored on B.
    assert_eq!(
        gauge(&text, "ember_cache_snapshot_peer_hits_total"),
        gauge(&text, "ember_cache_snapshot_misses_total")
    );
    let listing: serde_json::Value =
        serde_json::from_slice(&get(&base_b).await.2.unwrap()).unwrap();
    assert_eq!(listing["snapshots"], serde_json::json!([]), "{listing}");

    // A peer's own request is answered from its store only: no bounce.
    let marked = http()
        .get(format!("{base_b}/manifests/app"))
        .header("x-ember-snapshot-peer", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(marked.status(), 404);
    // Neither has it: 404 from B after asking A.
    let (s, _, _) = get(&format!("{base_b}/manifests/nope")).await;
    assert_eq!(s, 404);
    let other = sha256(b"not stored anywhere");
    let (s, _, _) = get(&format!("{base_b}/blobs/{other}")).await;
    assert_eq!(s, 404);
}
