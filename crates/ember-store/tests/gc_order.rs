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
