//! The distribution API as the cache serves it, against a real
//! `docker-registry` upstream: manifests by tag and digest, blobs, HEAD,
//! Range on hits and misses, errors, upstream selection, warm, metrics.

// Helpers outside #[test] functions panic on surprises too.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ember_testkit::fixtures::{self, BlobKind};
use ember_testkit::registry::Registry;

async fn upstream_with(fixture: &str, repo: &str) -> (Registry, fixtures::Fixture) {
    let reg = Registry::start().expect("registry");
    let f = fixtures::build_cached(fixture).expect("fixture");
    fixtures::push(&f, &reg.url(), repo, "latest")
        .await
        .expect("push");
    (reg, f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serves_manifests_and_blobs_through_the_cache() {
    let (reg, f) = upstream_with("busybox", "ember/busybox").await;
    let cache = start_cache(&[&reg.url()], 1 << 30).await;
    let base = format!("{}/v2/ember/busybox", cache.url());

    let (s, h, _) = get(&format!("{}/v2/", cache.url())).await;
    assert_eq!(s, 200);
    assert_eq!(h["docker-distribution-api-version"], "registry/2.0");

    // Manifest by tag, then by digest: same bytes, right headers.
    let (s, h, body) = get(&format!("{base}/manifests/latest")).await;
    assert_eq!(s, 200);
    let body = body.unwrap();
    assert_eq!(sha256(&body), f.root.digest);
    assert_eq!(h["docker-content-digest"], f.root.digest.as_str());
    assert_eq!(h["content-type"], f.root.media_type.as_str());
    assert_eq!(h["content-length"], body.len().to_string().as_str());
    let (s, _, by_digest) = get(&format!("{base}/manifests/{}", f.root.digest)).await;
    assert_eq!(s, 200);
    assert_eq!(by_digest.unwrap(), body);

    // HEAD manifest: headers, no body.
    let resp = http()
        .head(format!("{base}/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["docker-content-digest"],
        f.root.digest.as_str()
    );

    // Every blob, twice: the second time from disk.
    for b in f
        .blobs_of(BlobKind::Layer)
        .chain(f.blobs_of(BlobKind::Config))
    {
        for _ in 0..2 {
            let (s, h, body) = get(&format!("{base}/blobs/{}", b.digest)).await;
            assert_eq!(s, 200);
            assert_eq!(sha256(&body.unwrap()), b.digest);
            assert_eq!(h["docker-content-digest"], b.digest.as_str());
            assert_eq!(h["content-length"], b.size.to_string().as_str());
        }
        assert_eq!(
            reg.count_requests("GET", &format!("/blobs/{}", b.digest)),
            1,
            "one upstream GET per blob"
        );
    }
    // A request arriving between verification and commit joins the
    // finished download, so hits + misses is what is exact.
    assert_eq!(
        cache.metric("ember_cache_hits_total{kind=\"blob\"}")
            + cache.metric("ember_cache_misses_total{kind=\"blob\"}"),
        4
    );
    assert_eq!(cache.metric("ember_cache_upstream_fetches_total"), 2);
    assert!(cache.metric("ember_cache_stored_bytes") > 0);

    // HEAD blob of a cached blob: the size.
    let layer = f.blobs_of(BlobKind::Layer).next().unwrap();
    let resp = http()
        .head(format!("{base}/blobs/{}", layer.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-length"],
        layer.size.to_string().as_str()
    );

    // /metrics renders.
    let (s, _, m) = get(&format!("{}/metrics", cache.url())).await;
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&m.unwrap()).contains("ember_cache_upstream_bytes_total"));
    cache.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn range_requests_on_misses_and_hits() {
    let (reg, f) = upstream_with("layers", "ember/layers").await;
    let cache = start_cache(&[&reg.url()], 1 << 30).await;
    let layer = f.blobs_of(BlobKind::Layer).max_by_key(|b| b.size).unwrap();
    let full = std::fs::read(&layer.path).unwrap();
    let url = format!("{}/v2/ember/layers/blobs/{}", cache.url(), layer.digest);
    let n = full.len();
    assert!(n > 100);

    // Miss: the range comes out of the download in progress.
    let (s, h, body) = get_with(&url, &[("range", "bytes=10-49")]).await;
    assert_eq!(s, 206);
    assert_eq!(h["content-range"], format!("bytes 10-49/{n}").as_str());
    assert_eq!(&body.unwrap()[..], &full[10..50]);
    // Hit: suffix and open-ended ranges.
    let (s, _, body) = get_with(&url, &[("range", "bytes=-7")]).await;
    assert_eq!(s, 206);
    assert_eq!(&body.unwrap()[..], &full[n - 7..]);
    let (s, _, body) = get_with(&url, &[("range", &format!("bytes={}-", n - 3))]).await;
    assert_eq!(s, 206);
    assert_eq!(&body.unwrap()[..], &full[n - 3..]);
    // Past the end: 416 with the size.
    let (s, h, _) = get_with(&url, &[("range", &format!("bytes={n}-"))]).await;
    assert_eq!(s, 416);
    assert_eq!(h["content-range"], format!("bytes */{n}").as_str());
    // Several ranges: the whole blob, as RFC 9110 allows.
    let (s, _, body) = get_with(&url, &[("range", "bytes=0-1,5-6")]).await;
    assert_eq!(s, 200);
    assert_eq!(body.unwrap().len(), n);
    assert_eq!(reg.count_requests("GET", &layer.digest), 1);
    cache.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_are_oci_errors_with_the_right_status() {
    let (reg, _f) = upstream_with("busybox", "ember/busybox").await;
    let cache = start_cache(&[&reg.url()], 1 << 30).await;
    let c = cache.url();
    let zero = format!("sha256:{}", "0".repeat(64));
    let cases: Vec<(String, u16, &str)> = vec![
        (
            format!("{c}/v2/ember/busybox/manifests/nope"),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            format!("{c}/v2/ember/busybox/manifests/{zero}"),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            format!("{c}/v2/ember/busybox/blobs/{zero}"),
            404,
            "BLOB_UNKNOWN",
        ),
        (
            format!("{c}/v2/Ember/busybox/manifests/latest"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("{c}/v2/ember/busybox/blobs/sha256:abc"),
            400,
            "DIGEST_INVALID",
        ),
        (
            format!("{c}/v2/ember/busybox/manifests/bad..tag!"),
            400,
            "TAG_INVALID",
        ),
        (
            format!("{c}/v2/ember/busybox/manifests/latest?ns=elsewhere.io"),
            404,
            "NAME_UNKNOWN",
        ),
        (format!("{c}/v2/_catalog"), 404, "NOT_FOUND"),
    ];
    for (url, status, code) in cases {
        let (s, h, body) = get(&url).await;
        assert_eq!(s.as_u16(), status, "{url}");
        assert_eq!(h["content-type"], "application/json", "{url}");
        assert_eq!(oci_code(&body.unwrap()), code, "{url}");
    }
    // Paths an HTTP client library would normalise, sent raw.
    for (path, code) in [
        (format!("/v2/ember/../../etc/blobs/{zero}"), "NAME_INVALID"),
        (format!("/v2/ember/%2e%2e/x/blobs/{zero}"), "NAME_INVALID"),
        ("/v2/./x/manifests/latest".to_string(), "NAME_INVALID"),
        (
            "/v2/ember/busybox/blobs/sha256:../../../etc/passwd".to_string(),
            "DIGEST_INVALID",
        ),
        (
            "/v2/ember/busybox/blobs/sha256:..%2f..%2fetc%2fpasswd".to_string(),
            "DIGEST_INVALID",
        ),
        (
            "/v2/ember/busybox/manifests/../../../../etc/passwd".to_string(),
            "TAG_INVALID",
        ),
    ] {
        let (status, body) = raw_get(&cache.addr(), &path);
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(oci_code(body.as_bytes()), code, "{path}");
    }
    // Writes are refused.
    for (m, path) in [
        (reqwest::Method::POST, "/v2/ember/busybox/blobs/uploads/"),
        (reqwest::Method::PUT, "/v2/ember/busybox/manifests/latest"),
        (
            reqwest::Method::DELETE,
            &format!("/v2/ember/busybox/blobs/{zero}"),
        ),
        (reqwest::Method::PATCH, "/v2/ember/busybox/blobs/uploads/x"),
    ] {
        let resp = http()
            .request(m.clone(), format!("{c}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{m} {path}");
        assert_eq!(oci_code(&resp.bytes().await.unwrap()), "UNSUPPORTED");
    }
    // Nothing hostile reached the disk.
    let dir = cache.stop().await;
    for e in walk(dir.path()) {
        assert!(e.starts_with(dir.path()), "{}", e.display());
    }
    assert_eq!(reg.count_requests("GET", "etc"), 0);
}

/// GET over a bare TCP connection, so the path arrives exactly as written.
fn raw_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(p).unwrap().flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn selects_upstreams_by_ns_and_host_alias() {
    let (a, fa) = upstream_with("busybox", "ember/busybox").await;
    let (b, fb) = upstream_with("layers", "ember/layers").await;
    let b_host = b.addr();
    let cache = start_cache(
        &[
            &a.url(),
            &format!("{b_host}={}", b.url()),
            &format!("other.io={}", b.url()),
        ],
        1 << 30,
    )
    .await;
    let c = cache.url();
    // Default upstream.
    let (s, _, body) = get(&format!("{c}/v2/ember/busybox/manifests/latest")).await;
    assert_eq!(s, 200);
    assert_eq!(sha256(&body.unwrap()), fa.root.digest);
    // containerd's ?ns=: b has ember/layers, a does not.
    let (s, _, body) = get(&format!("{c}/v2/ember/layers/manifests/latest?ns={b_host}")).await;
    assert_eq!(s, 200);
    assert_eq!(sha256(&body.unwrap()), fb.root.digest);
    // The same through a host alias as the first path component.
    let (s, _, body) = get(&format!("{c}/v2/other.io/ember/layers/manifests/latest")).await;
    assert_eq!(s, 200);
    assert_eq!(sha256(&body.unwrap()), fb.root.digest);
    // Without selection the default upstream (a) is asked and says no.
    let (s, _, _) = get(&format!("{c}/v2/ember/layers/manifests/latest")).await;
    assert_eq!(s, 404);
    assert_eq!(
        a.count_requests("GET", "/v2/ember/layers/manifests/latest"),
        1
    );
    cache.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_fetches_an_image_ahead_of_time() {
    let (reg, f) = upstream_with("index", "ember/index").await;
    let cache = start_cache(&[&reg.url()], 1 << 30).await;
    let image = format!("{}/ember/index:latest", reg.addr());
    let resp = http()
        .post(format!("{}/ember/v1/warm", cache.url()))
        .body(serde_json::json!({"images": [image, "127.0.0.1:1/nope:x"]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let report: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    let first = &report["images"][0];
    assert_eq!(first["digest"], f.root.digest.as_str(), "{report}");
    assert!(first["blobs"].as_u64().unwrap() >= 2, "{report}");
    assert!(report["images"][1]["error"].is_string(), "{report}");
    let upstream_gets = reg.count_requests("GET", "/blobs/");
    assert!(upstream_gets >= 2);
    // Pulling the host platform's image now costs the upstream nothing more.
    let idx: serde_json::Value =
        serde_json::from_slice(&f.read_blob(&f.root.digest).unwrap()).unwrap();
    let host = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == "amd64")
        .unwrap();
    let mdig = host["digest"].as_str().unwrap();
    let (s, _, m) = get(&format!("{}/v2/ember/index/manifests/{mdig}", cache.url())).await;
    assert_eq!(s, 200);
    let m: serde_json::Value = serde_json::from_slice(&m.unwrap()).unwrap();
    for l in m["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        let (s, _, body) = get(&format!("{}/v2/ember/index/blobs/{d}", cache.url())).await;
        assert_eq!(s, 200);
        assert_eq!(sha256(&body.unwrap()), d);
    }
    assert_eq!(reg.count_requests("GET", "/blobs/"), upstream_gets);
    cache.stop().await;
}
