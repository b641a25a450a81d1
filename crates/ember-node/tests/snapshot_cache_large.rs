//! A large artifact through the cache streams both ways: the peak memory
//! of this process (cache server and client in one) grows by far less
//! than the artifact. Its own test binary, so no other test's memory
//! counts in the peak.

#![allow(clippy::unwrap_used)]

use ember_node::snapshot_cache::SnapshotCache;
use ember_oci::Digest;
use ember_runtime::Metadata;
use ember_runtime::checkpoint::{HostFacts, ImageIdentity, METADATA_FORMAT};
use ember_store::{SnapshotManifest, StartUp, Store};
use sha2::{Digest as _, Sha256};
use std::io::Write;
use std::time::Instant;

const ARTIFACT: u64 = 160 << 20;
/// Growth of the peak RSS allowed: a few chunks in flight on each side,
/// well below the artifact (22 MiB measured here; buffering it whole
/// would add its 160 MiB).
const ALLOWED_GROWTH: u64 = 80 << 20;

/// Peak resident set of this process, bytes (`VmHWM`).
fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_artifact_streams_through_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Store::open(tmp.path().join("a")).unwrap();
    // The artifact's bytes are opaque to the transfer: written straight
    // into A's blob directory in 1 MiB pieces, hashed on the way.
    std::fs::create_dir_all(a.root().join("snapshots/blobs")).unwrap();
    let staging = tmp.path().join("artifact");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&staging).unwrap());
    let mut h = Sha256::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut piece = vec![0u8; 1 << 20];
    for _ in 0..(ARTIFACT >> 20) {
        for c in piece.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        h.update(&piece);
        f.write_all(&piece).unwrap();
    }
    f.flush().unwrap();
    drop(f);
    let artifact: Digest = format!("sha256:{}", hex::encode(h.finalize()))
        .parse()
        .unwrap();
    std::fs::rename(&staging, a.artifact_path(&artifact)).unwrap();
    let host = HostFacts {
        criu_version: "4.1.1".into(),
        kernel_release: "6.1.0".into(),
        machine: "x86_64".into(),
        cpu_flags: vec![],
    };
    let image = Digest::sha256_of(b"image");
    let meta = Metadata {
        format: METADATA_FORMAT,
        host: host.clone(),
        image: ImageIdentity {
            digest: image.to_string(),
            layers: vec![],
        },
        runtime: Default::default(),
        options: Default::default(),
        source_id: "s".into(),
        cgroups_path: "c".into(),
        created_unix: 0,
    };
    let m = SnapshotManifest {
        name: "big".into(),
        artifact,
        artifact_bytes: ARTIFACT,
        unpacked_bytes: ARTIFACT,
        image,
        image_name: "img".into(),
        layers: vec![],
        start: StartUp::default(),
        metadata: serde_json::to_value(meta).unwrap(),
        capture_ms: 0,
        created_ms: 0,
    };
    a.put_snapshot(&m).unwrap();

    let mut cfg = ember_cache::CacheConfig::new(
        tmp.path().join("cache"),
        1 << 30,
        vec![ember_cache::UpstreamSpec::parse("http://127.0.0.1:9").unwrap()],
    );
    cfg.snapshot_write_token = Some("t".into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cache = ember_cache::spawn(cfg, listener).unwrap();
    let client = SnapshotCache::new(&cache.url(), Some("t".into())).unwrap();

    let before = peak_rss();
    let t = Instant::now();
    assert!(client.push(&a, "big").await.unwrap().uploaded);
    let push_s = t.elapsed().as_secs_f64();
    let b = Store::open(tmp.path().join("b")).unwrap();
    let t = Instant::now();
    let f = client.fetch(&b, "big", &host).await.unwrap();
    let fetch_s = t.elapsed().as_secs_f64();
    let growth = peak_rss().saturating_sub(before);
    assert_eq!(f.bytes, ARTIFACT);
    assert_eq!(
        std::fs::metadata(b.artifact_path(&m.artifact))
            .unwrap()
            .len(),
        ARTIFACT
    );
    eprintln!(
        "{} MiB: push {push_s:.2} s, fetch {fetch_s:.2} s (debug build), peak RSS grew {:.1} MiB",
        ARTIFACT >> 20,
        growth as f64 / (1 << 20) as f64
    );
    assert!(
        growth < ALLOWED_GROWTH,
        "peak RSS grew by {growth} bytes moving a {ARTIFACT}-byte artifact"
    );
    cache.shutdown().await.unwrap();
}
