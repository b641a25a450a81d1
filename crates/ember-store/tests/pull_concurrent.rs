//! Two pulls of the same multi-layer image into one store at once: both
//! download and unpack every layer, one commits each layer first and the
//! other must accept that and drop its copy. Afterwards every layer exists
//! once, the index names the image and accounts for each layer, and no
//! temporary data is left.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{StoreDir, client, fixture_layers, names};
use ember_oci::{Digest, Reference};
use ember_store::{PullOptions, SilentProgress, pull};
use ember_testkit::fixtures;
use ember_testkit::registry::Registry;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pulls_of_one_image_at_once_both_succeed() {
    let registry = Registry::start().expect("registry starts");
    let multi = fixtures::build_cached("multi").expect("multi fixture");
    fixtures::push(&multi, &registry.url(), "ember/multi", "latest")
        .await
        .expect("push multi");
    let (_, diff_ids) = fixture_layers(&multi);
    let r: Reference = format!("{}/ember/multi:latest", registry.addr())
        .parse()
        .expect("reference");

    let sd = StoreDir::new();
    let opts = PullOptions::default();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        // Separate clients, as two `ember pull` processes would have.
        let (store, c, r, opts) = (sd.store.clone(), client(vec![]), r.clone(), opts.clone());
        tasks.push(tokio::spawn(async move {
            pull(&store, &c, &r, &opts, Arc::new(SilentProgress)).await
        }));
    }
    let mut manifests = Vec::new();
    for t in tasks {
        let report = t.await.expect("task").expect("concurrent pull");
        assert_eq!(
            report.layers_fetched + report.layers_present,
            diff_ids.iter().collect::<BTreeSet<_>>().len()
        );
        eprintln!(
            "concurrent pull: {} layers fetched, {} present",
            report.layers_fetched, report.layers_present
        );
        manifests.push(report.image.manifest.clone());
    }
    assert_eq!(manifests[0], manifests[1]);

    // Every layer once, nothing else.
    let want: BTreeSet<String> = diff_ids
        .iter()
        .map(|d| d.strip_prefix("sha256:").expect("sha256").to_string())
        .collect();
    let have: BTreeSet<String> = names(&sd.root().join("layers")).into_iter().collect();
    assert_eq!(have, want);
    assert_eq!(sd.tmp_entries(), Vec::<String>::new(), "tmp/ is not empty");

    // The index names the image and accounts for each layer as it is on
    // disk.
    let ix = sd.store.read_index().expect("index");
    assert_eq!(ix.refs.get(&r.to_string()), Some(&manifests[0]));
    assert_eq!(ix.images.len(), 1);
    let img = &ix.images[&manifests[0]];
    assert_eq!(
        img.layers
            .iter()
            .map(|l| l.diff_id.to_string())
            .collect::<Vec<_>>(),
        diff_ids
    );
    assert_eq!(ix.layers.len(), want.len());
    for d in &diff_ids {
        let d: Digest = d.parse().expect("diff_id");
        let rec = &ix.layers[&d];
        let (bytes, _) =
            ember_store::unpack::tree_size(&sd.store.layer_dir(&d)).expect("measure layer");
        assert_eq!(rec.bytes, bytes, "layer {d}");
    }
    for b in [&img.manifest, &img.config] {
        sd.store.read_blob(b).expect("blob present and verified");
    }

    // A third pull finds everything in place.
    let c = client(vec![]);
    let again = pull(&sd.store, &c, &r, &opts, Arc::new(SilentProgress))
        .await
        .expect("third pull");
    assert_eq!(again.layers_fetched, 0);
    assert_eq!(sd.tmp_entries(), Vec::<String>::new());
}
