//! Turborepo artifacts are streamed into and out of the chunk store: a
//! large artifact round-trips without the process holding it in memory, a
//! broken-off upload stores nothing, and a corrupt chunk cuts the download
//! short instead of serving wrong bytes. Alone in its binary, because it
//! reads the process's peak memory.

mod common;

use common::*;
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};

/// Size of the large artifact.
const LEN: usize = 160 << 20;
/// Pieces the upload is sent in.
const PIECE: usize = 1 << 20;

/// Deterministic incompressible piece `i` of an artifact.
fn piece(seed: u64, i: usize) -> bytes::Bytes {
    bytes::Bytes::from(blob(seed.wrapping_mul(1_000_003) + i as u64, PIECE))
}

/// Peak resident memory of this process, bytes.
fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("status");
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb << 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_artifact_streams_through_in_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), 1 << 30, &[]);
    cfg.dircache.turbo_tokens = vec!["t".into()];
    cfg.dircache.scope_bytes = 4 << 30;
    let cache = start_cache_with(cfg, dir).await;
    let http = reqwest::Client::new();
    let url = |h: &str| format!("{}/v8/artifacts/{h}?teamId=team", cache.url());

    // The expected digest, computed piece by piece (never all at once).
    let mut want = Sha256::new();
    for i in 0..LEN / PIECE {
        want.update(piece(7, i));
    }
    let want = hex::encode(want.finalize());
    let before = peak_rss();

    let body =
        futures_util::stream::iter(0..LEN / PIECE).map(|i| Ok::<_, std::io::Error>(piece(7, i)));
    let r = http
        .put(url("big"))
        .bearer_auth("t")
        .header("x-artifact-tag", "tag-1")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 202, "{:?}", r.text().await);

    let r = http
        .get(url("big"))
        .bearer_auth("t")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(r.content_length(), Some(LEN as u64));
    assert_eq!(
        r.headers().get("x-artifact-tag").map(|v| v.as_bytes()),
        Some(&b"tag-1"[..])
    );
    let mut got = Sha256::new();
    let mut n = 0usize;
    let mut s = r.bytes_stream();
    while let Some(b) = s.next().await {
        let b = b.expect("body");
        n += b.len();
        got.update(&b);
    }
    assert_eq!(n, LEN);
    assert_eq!(hex::encode(got.finalize()), want);
    let grew = peak_rss().saturating_sub(before);
    // Held whole, the artifact alone would add 160 MiB (twice: upload and
    // download); streamed, a few chunks and frames are in flight.
    assert!(
        grew < 64 << 20,
        "peak memory grew by {} MiB for a {} MiB artifact",
        grew >> 20,
        LEN >> 20
    );

    // An upload broken off halfway stores nothing.
    let body = futures_util::stream::iter(0..8).map(|i| {
        if i < 4 {
            Ok(piece(9, i))
        } else {
            Err(std::io::Error::other("client gave up"))
        }
    });
    let r = http
        .put(url("cut"))
        .bearer_auth("t")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await;
    assert!(
        r.as_ref().map_or(true, |r| !r.status().is_success()),
        "a broken-off upload was accepted: {r:?}"
    );
    // The server notices the cut asynchronously; give it a moment.
    let mut status = 0;
    for _ in 0..100 {
        status = http
            .get(url("cut"))
            .bearer_auth("t")
            .send()
            .await
            .expect("get")
            .status()
            .as_u16();
        if status == 404 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, 404, "a broken-off upload was stored");

    // A corrupt chunk in the middle: the body ends early, before its bytes.
    let store = cache.server.dircache();
    let (m, _) = store
        .blob_manifest("turbo/team", "big")
        .expect("read")
        .expect("stored");
    let mid = &m.chunks[m.chunks.len() / 2].digest;
    let f = cache
        .dir
        .as_ref()
        .expect("dir")
        .path()
        .join("dircache/chunks")
        .join(&mid[..2])
        .join(mid);
    let mut bytes = std::fs::read(&f).expect("chunk");
    let k = bytes.len() / 2;
    bytes[k] ^= 0x55;
    std::fs::write(&f, bytes).expect("write");
    let r = http
        .get(url("big"))
        .bearer_auth("t")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    let mut n = 0usize;
    let mut failed = false;
    let mut s = r.bytes_stream();
    while let Some(b) = s.next().await {
        match b {
            Ok(b) => n += b.len(),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(
        failed || n < LEN,
        "a corrupt artifact was served whole ({n} bytes)"
    );
    let before_bad: u64 = m.chunks[..m.chunks.len() / 2]
        .iter()
        .map(|c| u64::from(c.size))
        .sum();
    assert!(
        n as u64 <= before_bad,
        "bytes past the corrupt chunk were served ({n} > {before_bad})"
    );
}
