//! Resolve-or-pull (`ember_node::images`, shared by `ember run` and the
//! node) against a real registry: a complete local image is used without
//! a request to the registry (and without setting up a pull at all); a
//! missing or incomplete one is pulled.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ember_node::images::{ImageError, Pull, ReadyImage, find_local, resolve_or_pull};
use ember_registry::{RegistryClient, RegistryOptions};
use ember_store::{PullOptions, SilentProgress, Store};
use ember_testkit::{fixtures, registry::Registry};

/// A pull of `reference` from the test registry, counting set-ups.
fn pull_of(
    reference: &str,
    setups: &AtomicUsize,
) -> impl FnOnce() -> Result<Pull, std::convert::Infallible> {
    let reference = reference.parse().expect("reference");
    move || {
        setups.fetch_add(1, Ordering::SeqCst);
        Ok(Pull {
            reference,
            registry: Arc::new(RegistryClient::new(RegistryOptions::default()).expect("client")),
            options: PullOptions::default(),
            progress: Arc::new(SilentProgress),
        })
    }
}

#[tokio::test]
async fn a_complete_local_image_is_not_pulled_and_an_incomplete_one_is() {
    let registry = Registry::start().expect("registry");
    let fixture = fixtures::build_cached("busybox").expect("fixture");
    fixtures::push(&fixture, &registry.url(), "ember/busybox", "latest")
        .await
        .expect("push");
    let name = format!("{}/ember/busybox:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(tmp.path()).expect("store");
    let setups = AtomicUsize::new(0);

    // Not here: pulled.
    assert!(find_local(&store, &name).expect("index").is_none());
    let ready = resolve_or_pull(&store, None, pull_of(&name, &setups))
        .await
        .expect("pull");
    let ReadyImage::Pulled(report) = ready else {
        panic!("an image not in the store was not pulled: {ready:?}");
    };
    assert!(report.layers_fetched > 0, "{report:?}");
    assert_eq!(setups.load(Ordering::SeqCst), 1);

    // Here and complete: taken as it is, no pull set up, no request made.
    let requests = registry.requests().len();
    let local = find_local(&store, &name).expect("index");
    assert_eq!(
        local.as_ref().map(|r| &r.manifest),
        Some(&report.image.manifest)
    );
    let ready = resolve_or_pull(&store, local, pull_of(&name, &setups))
        .await
        .expect("local");
    assert!(
        matches!(&ready, ReadyImage::Local(r) if r.manifest == report.image.manifest),
        "{ready:?}"
    );
    assert_eq!(setups.load(Ordering::SeqCst), 1);
    assert_eq!(registry.requests().len(), requests);

    // Its index entry survives but a layer is gone (a collected or
    // discarded layer): not complete, so neither found nor used.
    let layer = store.layer_dir(&report.image.layers[0].diff_id);
    std::fs::remove_dir_all(&layer).expect("remove a layer");
    assert!(find_local(&store, &name).expect("index").is_none());
    let ready = resolve_or_pull(&store, Some(report.image.clone()), pull_of(&name, &setups))
        .await
        .expect("pull again");
    assert!(matches!(ready, ReadyImage::Pulled(_)), "{ready:?}");
    assert_eq!(setups.load(Ordering::SeqCst), 2);
    assert!(layer.is_dir(), "the missing layer was not pulled again");
    assert!(registry.requests().len() > requests);
}

#[tokio::test]
async fn a_failed_pull_names_the_reference_and_keeps_the_cause() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(tmp.path()).expect("store");
    let setups = AtomicUsize::new(0);
    // Nothing listens on port 1.
    let err = resolve_or_pull(&store, None, pull_of("127.0.0.1:1/nothing:latest", &setups))
        .await
        .expect_err("nothing to pull from");
    let ImageError::Pull { reference, source } = &err else {
        panic!("not a pull error: {err:?}");
    };
    assert_eq!(reference.to_string(), "127.0.0.1:1/nothing:latest");
    assert!(
        err.to_string().starts_with("pulling 127.0.0.1:1/nothing"),
        "{err}"
    );
    assert!(
        std::error::Error::source(&err).is_some_and(|s| s.to_string() == source.to_string()),
        "{err:?}"
    );
}
