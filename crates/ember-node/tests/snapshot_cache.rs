//! `snapshot_cache` against the real cache server: push, fetch into
//! another store, a checkpoint of another machine refused before its
//! download, a tampered or truncated artifact refused without leaving
//! anything in the store. (The restore itself, with CRIU, is tested by
//! `crates/ember/tests/snapshot_transfer_cli.rs`.)

#![allow(clippy::unwrap_used)]

use ember_node::snapshot_cache::{SnapshotCache, SnapshotCacheError};
use ember_oci::Digest;
use ember_runtime::Metadata;
use ember_runtime::checkpoint::{HostFacts, ImageIdentity, METADATA_FORMAT};
use ember_store::{SnapshotError, SnapshotManifest, StartUp, Store};
use std::path::Path;

const TOKEN: &str = "t0ken";

fn facts(kernel: &str) -> HostFacts {
    HostFacts {
        criu_version: "4.1.1".into(),
        kernel_release: kernel.into(),
        machine: "x86_64".into(),
        cpu_flags: vec!["sse2".into(), "avx2".into()],
    }
}

/// A snapshot in `store` made of a checkpoint-like directory, with the
/// metadata a capture on a machine with `host` would record.
fn snapshot(store: &Store, name: &str, host: HostFacts) -> SnapshotManifest {
    let dir = store.tmp_path("ckpt");
    std::fs::create_dir_all(dir.join("criu")).unwrap();
    // Not compressible to nothing, so the transfer is real work.
    let pages: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(dir.join("criu/pages-1.img"), &pages).unwrap();
    let (artifact, artifact_bytes, unpacked_bytes) = store.put_snapshot_dir(&dir).unwrap();
    let image = Digest::sha256_of(b"image");
    let layers = vec![Digest::sha256_of(b"layer")];
    let metadata = Metadata {
        format: METADATA_FORMAT,
        host,
        image: ImageIdentity {
            digest: image.to_string(),
            layers: layers.iter().map(ToString::to_string).collect(),
        },
        runtime: Default::default(),
        options: Default::default(),
        source_id: "src".into(),
        cgroups_path: "ember/src".into(),
        created_unix: 0,
    };
    let m = SnapshotManifest {
        name: name.into(),
        artifact,
        artifact_bytes,
        unpacked_bytes,
        image,
        image_name: "busybox".into(),
        layers,
        start: StartUp::default(),
        metadata: serde_json::to_value(metadata).unwrap(),
        capture_ms: 1,
        created_ms: 1,
    };
    store.put_snapshot(&m).unwrap();
    m
}

/// Nothing of a snapshot: no manifest, no artifact, nothing in `tmp/`.
fn assert_empty(store: &Store) {
    assert!(store.snapshots().unwrap().is_empty());
    let blobs = store.root().join("snapshots/blobs");
    let left = std::fs::read_dir(&blobs).map(|r| r.count()).unwrap_or(0);
    assert_eq!(left, 0, "artifacts left in {}", blobs.display());
    let tmp: Vec<_> = std::fs::read_dir(store.root().join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with("-lock"))
        .collect();
    assert!(tmp.is_empty(), "left in tmp/: {tmp:?}");
}

fn metric(cache: &ember_cache::RunningCache, name: &str) -> u64 {
    let text = cache.cache().metrics.render();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

async fn start_cache(dir: &Path) -> ember_cache::RunningCache {
    let mut cfg = ember_cache::CacheConfig::new(
        dir.to_path_buf(),
        1 << 30,
        // The registry side needs an upstream; never contacted here.
        vec![ember_cache::UpstreamSpec::parse("http://127.0.0.1:9").unwrap()],
    );
    cfg.snapshot_write_token = Some(TOKEN.into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    ember_cache::spawn(cfg, listener).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_travel_verified_and_only_to_machines_that_can_restore_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cache_dir = tmp.path().join("cache");
    let cache = start_cache(&cache_dir).await;
    let here = facts("6.1.0-test");
    let a = Store::open(tmp.path().join("a")).unwrap();
    let m = snapshot(&a, "app", here.clone());
    let client = SnapshotCache::new(&cache.url(), Some(TOKEN.into())).unwrap();

    // Without the token the cache takes nothing.
    let anonymous = SnapshotCache::new(&cache.url(), None).unwrap();
    match anonymous.push(&a, "app").await {
        Err(SnapshotCacheError::Refused { status: 403, .. }) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Push; a second push finds the artifact there.
    let p = client.push(&a, "app").await.unwrap();
    assert!(p.uploaded);
    assert_eq!(p.artifact, m.artifact);
    assert!(!client.push(&a, "app").await.unwrap().uploaded);

    // Fetch into another store: the same snapshot, unpacking to the same
    // checkpoint.
    let b = Store::open(tmp.path().join("b")).unwrap();
    let f = client.fetch(&b, "app", &here).await.unwrap();
    assert!(f.downloaded);
    assert_eq!(f.bytes, m.artifact_bytes);
    assert_eq!(b.snapshot("app").unwrap(), m);
    let (ua, _) = a.unpack_snapshot(&m).unwrap();
    let (ub, fresh) = b.unpack_snapshot(&m).unwrap();
    assert!(
        fresh,
        "B's copy is unpacked (and verified) from the fetched artifact"
    );
    assert_eq!(
        std::fs::read(ua.join("criu/pages-1.img")).unwrap(),
        std::fs::read(ub.join("criu/pages-1.img")).unwrap()
    );
    assert!(!client.fetch(&b, "app", &here).await.unwrap().downloaded);

    // Another kernel, a CPU without AVX2: refused with the reason, and
    // before a byte of the artifact was sent.
    let served = metric(&cache, "ember_cache_snapshot_served_bytes_total");
    let c = Store::open(tmp.path().join("c")).unwrap();
    match client.fetch(&c, "app", &facts("6.12.0-other")).await {
        Err(SnapshotCacheError::Incompatible {
            what,
            recorded,
            here,
            ..
        }) => {
            assert_eq!(what, "kernel release");
            assert_eq!(
                (recorded.as_str(), here.as_str()),
                ("6.1.0-test", "6.12.0-other")
            );
        }
        other => panic!("expected a kernel mismatch, got {other:?}"),
    }
    let mut no_avx2 = here.clone();
    no_avx2.cpu_flags.retain(|f| f != "avx2");
    let e = client.fetch(&c, "app", &no_avx2).await.unwrap_err();
    assert!(
        matches!(&e, SnapshotCacheError::Incompatible { what, recorded, .. } if what == "CPU features" && recorded == "avx2"),
        "{e}"
    );
    assert!(e.to_string().contains("not downloaded"), "{e}");
    assert_eq!(
        metric(&cache, "ember_cache_snapshot_served_bytes_total"),
        served
    );
    assert_empty(&c);

    // Unknown name.
    assert!(matches!(
        client.fetch(&c, "nope", &here).await,
        Err(SnapshotCacheError::NotFound(_))
    ));

    // One flipped byte in the cache's copy: the digest refuses it, and the
    // store is left without the snapshot.
    let on_cache = cache_dir.join("blobs/sha256").join(m.artifact.hex());
    let good = std::fs::read(&on_cache).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 3] ^= 0x20;
    std::fs::write(&on_cache, &bad).unwrap();
    let d = Store::open(tmp.path().join("d")).unwrap();
    match client.fetch(&d, "app", &here).await {
        Err(SnapshotCacheError::Store(SnapshotError::DigestMismatch { digest, .. })) => {
            assert_eq!(digest, m.artifact)
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert_empty(&d);

    // Truncated on the cache (shorter than the cache's index says): the
    // download breaks off and the store is left as it was.
    std::fs::write(&on_cache, &good[..good.len() / 2]).unwrap();
    let e = client.fetch(&d, "app", &here).await.unwrap_err();
    assert!(
        matches!(
            e,
            SnapshotCacheError::Transport { .. }
                | SnapshotCacheError::Store(SnapshotError::Malformed { .. })
        ),
        "{e:?}"
    );
    assert_empty(&d);

    // Put right again: the fetch works.
    std::fs::write(&on_cache, &good).unwrap();
    assert!(client.fetch(&d, "app", &here).await.unwrap().downloaded);
    cache.shutdown().await.unwrap();
}

/// A download cut mid-body (a mirror between the node and the cache
/// sends half the artifact, then closes) resumes with `Range` from where
/// it stopped; the whole artifact's digest is still what decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_off_download_resumes_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let cache_dir = tmp.path().join("cache");
    let cache = start_cache(&cache_dir).await;
    let here = facts("6.1.0-test");
    let a = Store::open(tmp.path().join("a")).unwrap();
    let m = snapshot(&a, "app", here.clone());
    let direct = SnapshotCache::new(&cache.url(), Some(TOKEN.into())).unwrap();
    direct.push(&a, "app").await.unwrap();
    assert!(m.artifact_bytes > 50_000, "{}", m.artifact_bytes);

    let origin = cache.url().trim_start_matches("http://").to_owned();
    let mirror = ember_testkit::proxy::CuttingMirror::start(&origin, 10_000).unwrap();
    let through = SnapshotCache::new(&mirror.url(), None).unwrap();
    let served = metric(&cache, "ember_cache_snapshot_served_bytes_total");
    let b = Store::open(tmp.path().join("b")).unwrap();
    let f = through.fetch(&b, "app", &here).await.unwrap();
    assert_eq!(mirror.cuts(), 1, "the first GET was cut");
    assert!(f.downloaded);
    assert_eq!(f.bytes, m.artifact_bytes);
    assert_eq!(b.snapshot("app").unwrap(), m);
    let (ub, fresh) = b.unpack_snapshot(&m).unwrap();
    assert!(fresh);
    let (ua, _) = a.unpack_snapshot(&m).unwrap();
    assert_eq!(
        std::fs::read(ua.join("criu/pages-1.img")).unwrap(),
        std::fs::read(ub.join("criu/pages-1.img")).unwrap()
    );
    // The cache sent the whole artifact, and the resumed part only once
    // more: at most the cut half over the artifact (what the mirror read
    // ahead of its cut is not resent).
    let sent = metric(&cache, "ember_cache_snapshot_served_bytes_total") - served;
    assert!(
        sent >= m.artifact_bytes && sent < m.artifact_bytes * 2,
        "{sent} bytes served for an artifact of {}",
        m.artifact_bytes
    );

    // The resumed bytes are checked with the rest: one flipped byte in the
    // cache's copy, in the half that comes after the cut, is refused by
    // the whole artifact's digest and leaves nothing.
    let on_cache = cache_dir.join("blobs/sha256").join(m.artifact.hex());
    let good = std::fs::read(&on_cache).unwrap();
    let mut bad = good.clone();
    bad[good.len() * 3 / 4] ^= 0x20;
    std::fs::write(&on_cache, &bad).unwrap();
    let c = Store::open(tmp.path().join("c")).unwrap();
    match through.fetch(&c, "app", &here).await {
        Err(SnapshotCacheError::Store(SnapshotError::DigestMismatch { digest, .. })) => {
            assert_eq!(digest, m.artifact)
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert_eq!(mirror.cuts(), 2);
    assert_empty(&c);
    cache.shutdown().await.unwrap();
}
