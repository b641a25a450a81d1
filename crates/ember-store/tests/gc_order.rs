//! The store's caller-ordered GC and gated pulls, against a real registry:
//! `gc_in_order` evicts only what the caller's order names, in that
//! order, and keeps what it leaves out even when that is the least
//! recently used; a pull gate sees every byte of the layers it downloads
//! and holds the pull while it does not return.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{StoreDir, client};
use ember_oci::Reference;
use ember_store::{PullGate, PullOptions, SilentProgress, pull, pull_gated};
use ember_testkit::fixtures;
use ember_testkit::registry::Registry;

async fn registry_with(names: &[&str]) -> Registry {
    let registry = Registry::start().expect("registry starts");
    for n in names {
        let fx = fixtures::build_cached(n).expect("fixture");
        fixtures::push(&fx, &registry.url(), &format!("ember/{n}"), "latest")
            .await
            .expect("push");
    }
    registry
}

fn reference(registry: &Registry, name: &str) -> Reference {
    format!("{}/ember/{name}:latest", registry.addr())
        .parse()
        .expect("reference")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_in_order_evicts_only_what_the_order_names() {
    let registry = registry_with(&["busybox", "devices"]).await;
    let sd = StoreDir::new();
    let c = client(vec![]);
    let opts = PullOptions::default();
    let old = pull(
        &sd.store,
        &c,
        &reference(&registry, "busybox"),
        &opts,
        Arc::new(SilentProgress),
    )
    .await
    .expect("pull busybox");
    let new = pull(
        &sd.store,
        &c,
        &reference(&registry, "devices"),
        &opts,
        Arc::new(SilentProgress),
    )
    .await
    .expect("pull devices");
    let ix = sd.store.read_index().expect("index");
    let total = ix.bytes_of(ix.images.values());
    assert!(total > ix.bytes_of([&old.image]), "devices adds no bytes");

    // An order that names nothing: over the watermark, nothing goes.
    let r = sd.store.gc_in_order(0, 0, |_| Vec::new()).expect("gc");
    assert!(r.removed_images.is_empty(), "{r:?}");
    assert_eq!(sd.store.read_index().expect("index").images.len(), 2);

    // Plain LRU would take busybox (used first); an order that names only
    // devices keeps busybox, and evicts devices though it is newer.
    let mut offered = Vec::new();
    let r = sd
        .store
        .gc_in_order(total - 1, total - 1, |held| {
            offered = held.iter().map(|h| h.manifest.clone()).collect();
            assert!(held.iter().all(|h| !h.in_use));
            vec![new.image.manifest.clone()]
        })
        .expect("gc");
    assert_eq!(offered.len(), 2);
    assert_eq!(r.removed_images.len(), 1, "{r:?}");
    let ix = sd.store.read_index().expect("index");
    assert!(ix.images.contains_key(&old.image.manifest));
    assert!(!ix.images.contains_key(&new.image.manifest));
    // Its own layers went; the shared base stayed with busybox.
    assert!(sd.store.missing_layers(&old.image).is_empty());
}

/// Counts bytes, and holds every download until `open` is set.
struct Counting {
    bytes: AtomicU64,
    open: tokio::sync::watch::Receiver<bool>,
}

impl PullGate for Counting {
    fn admit(&self, bytes: u64) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.bytes.fetch_add(bytes, Ordering::SeqCst);
        let mut open = self.open.clone();
        Box::pin(async move {
            let _ = open.wait_for(|o| *o).await;
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_sees_every_byte_and_holds_the_pull() {
    let registry = registry_with(&["busybox"]).await;
    let sd = StoreDir::new();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let gate = Arc::new(Counting {
        bytes: AtomicU64::new(0),
        open: rx,
    });
    let (store, c, r, g) = (
        sd.store.clone(),
        client(vec![]),
        reference(&registry, "busybox"),
        gate.clone(),
    );
    let task = tokio::spawn(async move {
        pull_gated(
            &store,
            &c,
            &r,
            &PullOptions::default(),
            Arc::new(SilentProgress),
            Some(g),
        )
        .await
    });
    // Held: the first chunk arrived, and the pull does not finish while
    // the gate is shut (the test waiting, not the system).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while gate.bytes.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no byte reached the gate"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!task.is_finished(), "the pull went on past a shut gate");
    assert!(sd.store.read_index().expect("index").images.is_empty());
    tx.send(true).expect("open the gate");
    let report = task.await.expect("task").expect("pull");
    assert_eq!(gate.bytes.load(Ordering::SeqCst), report.bytes_downloaded);
}

/// A checkpoint-like directory of `n` incompressible bytes (so artifacts
/// of different seeds are different and none compresses away).
fn checkpoint_dir(store: &ember_store::Store, seed: u64, n: usize) -> std::path::PathBuf {
    let dir = store.tmp_path("ckpt");
    std::fs::create_dir_all(dir.join("criu")).expect("mkdir");
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let bytes: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(dir.join("criu/pages-1.img"), bytes).expect("write");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_count_against_the_budget_and_go_least_recently_restored_first() {
    let registry = registry_with(&["busybox"]).await;
    let sd = StoreDir::new();
    let store = &sd.store;
    let image = pull(
        store,
        &client(vec![]),
        &reference(&registry, "busybox"),
        &PullOptions::default(),
        Arc::new(SilentProgress),
    )
    .await
    .expect("pull busybox")
    .image;
    let ix = store.read_index().expect("index");
    let image_bytes = ix.bytes_of(ix.images.values());

    // Three snapshots of the image, restored in the order a, b, c.
    let mut manifests = Vec::new();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let dir = checkpoint_dir(store, i as u64 + 1, 300_000);
        let (artifact, artifact_bytes, unpacked_bytes) = store.put_snapshot_dir(&dir).expect("put");
        let m = ember_store::SnapshotManifest {
            name: name.into(),
            artifact,
            artifact_bytes,
            unpacked_bytes,
            image: image.manifest.clone(),
            image_name: "busybox".into(),
            layers: image.layers.iter().map(|l| l.diff_id.clone()).collect(),
            start: Default::default(),
            metadata: serde_json::json!({}),
            capture_ms: 0,
            created_ms: ember_store::now_ms(),
        };
        store.put_snapshot(&m).expect("manifest");
        manifests.push(m);
    }
    for m in &manifests {
        std::thread::sleep(std::time::Duration::from_millis(5));
        drop(store.claim_snapshot(m).expect("claim"));
    }
    // Each counts its artifact and its unpacked copy.
    let per_snapshot = manifests[0].artifact_bytes + manifests[0].unpacked_bytes;
    assert!(manifests[0].unpacked_bytes >= 300_000);
    let r = store.gc(u64::MAX, u64::MAX).expect("gc");
    assert_eq!(r.bytes_before, image_bytes + 3 * per_snapshot, "{r:?}");
    assert_eq!(r.snapshot_bytes_after, 3 * per_snapshot);

    // One snapshot over the budget: the least recently restored goes, with
    // its blob and unpacked copy; the image (used by later restores) stays.
    let high = image_bytes + 2 * per_snapshot;
    let r = store.gc(high, high).expect("gc");
    assert_eq!(r.snapshots.evicted_snapshots, ["a"], "{r:?}");
    assert!(r.removed_images.is_empty(), "{r:?}");
    assert_eq!(r.bytes_after, high);
    assert!(!store.artifact_path(&manifests[0].artifact).exists());
    assert!(!store.unpacked_path(&manifests[0].artifact).exists());
    let names: Vec<String> = store
        .snapshots()
        .expect("ls")
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["b", "c"]);

    // b is being restored: a budget of the image alone evicts c, keeps b
    // and (for b) the image.
    let hold = store.claim_snapshot(&manifests[1]).expect("claim");
    let r = store.gc(image_bytes, image_bytes).expect("gc");
    assert_eq!(r.snapshots.evicted_snapshots, ["c"], "{r:?}");
    assert_eq!(r.snapshots.kept_in_use, 1, "{r:?}");
    assert!(r.removed_images.is_empty(), "{r:?}");
    assert_eq!(r.bytes_after, image_bytes + per_snapshot);
    assert!(store.artifact_path(&manifests[1].artifact).exists());
    assert!(store.unpacked_path(&manifests[1].artifact).is_dir());

    // Released, b goes too; the image then fits and stays.
    drop(hold);
    let r = store.gc(image_bytes, image_bytes).expect("gc");
    assert_eq!(r.snapshots.evicted_snapshots, ["b"], "{r:?}");
    assert!(r.removed_images.is_empty(), "{r:?}");
    assert!(store.snapshots().expect("ls").is_empty());
    assert_eq!(r.bytes_after, image_bytes);

    // A snapshot never restored counts from its creation; with no budget
    // at all it goes before its image (which is as recent as it), then
    // the image.
    let dir = checkpoint_dir(store, 9, 300_000);
    let (artifact, artifact_bytes, unpacked_bytes) = store.put_snapshot_dir(&dir).expect("put");
    let mut m = manifests[0].clone();
    m.name = "d".into();
    (m.artifact, m.artifact_bytes, m.unpacked_bytes) = (artifact, artifact_bytes, unpacked_bytes);
    m.created_ms = ember_store::now_ms();
    store.put_snapshot(&m).expect("manifest");
    let r = store.gc(0, 0).expect("gc");
    assert_eq!(r.snapshots.evicted_snapshots, ["d"], "{r:?}");
    assert_eq!(r.removed_images.len(), 1, "{r:?}");
    assert_eq!(r.bytes_after, 0);
}
