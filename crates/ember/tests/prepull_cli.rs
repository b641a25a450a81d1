//! Pre-pulls on the real system: `ember control` with two `ember node`s
//! and a real docker-registry. Which node a run lands on is steered only
//! by which nodes are up (there is no node selector on `ember submit`).
//!
//! 1. After launches of busybox on node A, node B, joining, is sent its
//!    pull plan at once and holds busybox before the next launch lands
//!    there; that launch pulls nothing.
//! 2. While B pre-pulls `big` (capped to 1 MiB/s), a run of `layers` on B
//!    pulls at once: B's journal shows the pre-pull paused after the run's
//!    pull started and resumed only after it ended. Then a run of `big`
//!    itself arrives while big is still being pre-pulled: it takes that
//!    pre-pull over (B's journal says `taken_over`) and succeeds, and the
//!    registry served each of big's layers to B at most once (the 110 MiB
//!    one exactly once): no second download.
//! 3. B's image budget fits busybox, big and layers (which an idle spare
//!    runner uses), not `devices` too, pulled into B's store by hand after
//!    them: its GC evicts devices (never launched, so unplanned; used most
//!    recently) and keeps busybox (planned; used longest ago), which
//!    least-recently-used eviction would have taken first.
//! 4. A run of devices on B brings it back (and leaves an idle spare
//!    runner of it): over budget again, with nothing left to evict that
//!    no runner uses, B's GC retires the idle spare runner of layers (no
//!    pre-warm asks for it, and it is the least recently used) and evicts
//!    layers, keeping busybox and big.

mod common;

use common::cluster::*;
use common::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// The events of a node's `<root>/prepull.log`, as (event, image) pairs
/// in the order they were written.
fn journal(node_root: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(node_root.join("prepull.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            (
                v["event"].as_str().unwrap_or("").to_owned(),
                v["image"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// Manifest digests of the complete images in a store's index.
fn held(root: &Path) -> BTreeSet<String> {
    let Ok(b) = std::fs::read(root.join("index.json")) else {
        return BTreeSet::new();
    };
    let ix: serde_json::Value = serde_json::from_slice(&b).expect("index JSON");
    ix["images"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Bytes the layers of `images` take in the store at `root`, each layer
/// once (as the store and the planner count them).
fn union_bytes(root: &Path, images: &[&str]) -> u64 {
    let ix: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("index.json")).expect("index"))
            .expect("index JSON");
    let mut seen = BTreeSet::new();
    let mut total = 0;
    for img in images {
        for l in ix["images"][*img]["layers"].as_array().expect("layers") {
            let d = l["diff_id"].as_str().expect("diff_id").to_owned();
            if seen.insert(d.clone()) {
                total += ix["layers"][&d]["bytes"].as_u64().expect("bytes");
            }
        }
    }
    total
}

/// The layer digests and sizes of image `manifest` in the store at `root`.
fn layer_blobs(root: &Path, manifest: &str) -> Vec<(String, u64)> {
    let ix: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("index.json")).expect("index"))
            .expect("index JSON");
    ix["images"][manifest]["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().expect("digest").to_owned(),
                l["size"].as_u64().expect("size"),
            )
        })
        .collect()
}

/// Polls until `cond` holds (the test waiting, not the system).
fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not after {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Submits `image` (its default command) and waits for the run to
/// succeed; returns it.
fn launch(url: &str, image: &str) -> serde_json::Value {
    let sub: serde_json::Value =
        serde_json::from_str(&client_ok(url, &["submit", "--json", image, "--", "true"]))
            .expect("submit JSON");
    let id = sub["id"]
        .as_u64()
        .or_else(|| sub["run"]["id"].as_u64())
        .expect("run id")
        .to_string();
    let mut run = serde_json::Value::Null;
    wait_for(&format!("run {id} final"), Duration::from_secs(180), || {
        run = run_json(url, &id);
        matches!(
            run["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled" | "lost")
        )
    });
    assert_eq!(run["state"], "succeeded", "{run}");
    run
}

#[test]
fn nodes_pre_pull_what_is_launched_yield_to_runs_and_keep_planned_images() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let registry = registry_with(&["busybox", "big", "layers", "devices"]);
    let r = |n: &str| format!("{}/ember/{n}:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");

    // B's budget: busybox, big and layers, and half of what devices adds.
    // Measured on a scratch store, since layer bytes are what the store
    // counts.
    let scratch = tmp.path().join("scratch");
    for n in ["busybox", "big", "layers", "devices"] {
        ember_ok(&scratch, &["pull", "-q", &r(n)]);
    }
    let digest_in = |n: &str| -> String {
        let images: serde_json::Value =
            serde_json::from_str(&ember_ok(&scratch, &["images", "--json"])).expect("json");
        images
            .as_array()
            .expect("images")
            .iter()
            .find(|i| {
                i["names"].as_array().is_some_and(|ns| {
                    let tail = format!("/ember/{n}:latest");
                    ns.iter()
                        .any(|x| x.as_str().is_some_and(|x| x.ends_with(&tail)))
                })
            })
            .and_then(|i| i["manifest"].as_str())
            .unwrap_or_else(|| panic!("{n} not in the scratch store"))
            .to_owned()
    };
    let (bb, big, layers) = (digest_in("busybox"), digest_in("big"), digest_in("layers"));
    let devices = digest_in("devices");
    let planned = union_bytes(&scratch, &[&bb, &big, &layers]);
    let all = union_bytes(&scratch, &[&bb, &big, &layers, &devices]);
    assert!(all > planned + 1, "devices adds nothing to the others");
    let budget = (planned + (all - planned) / 2).to_string();

    let (_control, url) = start_control(
        &tmp.path().join("control"),
        &tmp.path().join("control.db").to_string_lossy(),
        &[
            "--prepull-interval",
            "1s",
            "--prepull-replication",
            "2",
            "--prepull-min-score",
            "1.5",
        ],
    );
    let (a_root, b_root) = (tmp.path().join("a"), tmp.path().join("b"));
    let b_args = [
        "--prepull-bandwidth",
        "1M",
        "--image-budget",
        budget.as_str(),
    ];

    // 1. Two launches on A (the only node), then B joins.
    let mut a = start_node(&a_root, &url, "a", 2, &agent, &[]);
    for _ in 0..2 {
        let run = launch(&url, &r("busybox"));
        assert_eq!(run["node"], "a");
        assert_eq!(run["image"]["digest"], bb.as_str());
    }
    let mut b = start_node(&b_root, &url, "b", 2, &agent, &b_args);
    // The journal's `done` follows the store's commit.
    wait_for("B pre-pulls busybox", Duration::from_secs(120), || {
        journal(&b_root).contains(&("done".into(), bb.clone()))
    });
    assert!(held(&b_root).contains(&bb));
    // The next launch lands on B (A is gone) and pulls nothing.
    a.stop();
    let run = launch(&url, &r("busybox"));
    assert_eq!(run["node"], "b");
    let j = journal(&b_root);
    assert!(
        !j.contains(&("run_pull_started".into(), bb.clone())),
        "the run on B pulled busybox: {j:?}"
    );

    // 2. Two launches of big on A (B is down), then B rejoins and
    // pre-pulls big at 1 MiB/s; a run of layers on B meanwhile.
    b.stop();
    let mut a = start_node(&a_root, &url, "a", 2, &agent, &[]);
    for _ in 0..2 {
        assert_eq!(launch(&url, &r("big"))["node"], "a");
    }
    let big_blobs = layer_blobs(&scratch, &big);
    let (largest, _) = big_blobs
        .iter()
        .max_by_key(|(_, size)| *size)
        .expect("big has layers")
        .clone();
    let _b = start_node(&b_root, &url, "b", 2, &agent, &b_args);
    wait_for("B starts pre-pulling big", Duration::from_secs(120), || {
        journal(&b_root).contains(&("started".into(), big.clone()))
    });
    // What the registry served of big before B's pre-pull (the scratch
    // store's and A's pulls; B's requests are logged when they complete).
    let served = |d: &str| registry.count_requests("GET", &format!("/blobs/{d}"));
    let before: Vec<usize> = big_blobs.iter().map(|(d, _)| served(d)).collect();
    a.stop();
    let run = launch(&url, &r("layers"));
    assert_eq!(run["node"], "b");
    // A run of big now: at 1 MiB/s the pre-pull of its 110 MiB layer has
    // most of the way to go, so the run takes it over.
    let run = launch(&url, &r("big"));
    assert_eq!(run["node"], "b");
    assert_eq!(run["image"]["digest"], big.as_str());
    // The journal's `done` follows the store's commit.
    wait_for(
        "B finishes pre-pulling big",
        Duration::from_secs(600),
        || journal(&b_root).contains(&("done".into(), big.clone())),
    );
    assert!(held(&b_root).contains(&big));
    let j = journal(&b_root);
    let at = |ev: &str, img: &str| {
        j.iter()
            .position(|(e, i)| e == ev && i == img)
            .unwrap_or_else(|| panic!("no {ev} of {img} in {j:?}"))
    };
    let (started, done) = (
        at("run_pull_started", &layers),
        at("run_pull_done", &layers),
    );
    // The pre-pull of big was paused after the run's pull started, stayed
    // paused until it ended, and finished only after it.
    let paused = j[started..done]
        .iter()
        .any(|(e, i)| e == "paused" && i == &big);
    assert!(paused, "big was not paused during the run's pull: {j:?}");
    assert!(
        !j[started..done]
            .iter()
            .any(|(e, i)| e == "resumed" && i == &big),
        "big resumed while the run pulled: {j:?}"
    );
    assert!(at("done", &big) > done, "{j:?}");
    // The run of big took the pre-pull over, which then finished.
    assert!(at("taken_over", &big) < at("done", &big), "{j:?}");
    assert!(
        !j.contains(&("run_pull_started".into(), big.clone()))
            || at("run_pull_started", &big) > at("taken_over", &big),
        "the run of big started a pull of its own: {j:?}"
    );
    // No second download: B fetched big's large layer once, and no layer
    // of big more than once.
    let i = big_blobs
        .iter()
        .position(|(d, _)| *d == largest)
        .expect("largest");
    assert_eq!(
        registry.wait_for_requests(
            "GET",
            &format!("/blobs/{largest}"),
            before[i] + 1,
            Duration::from_secs(30)
        ),
        before[i] + 1,
        "B did not fetch big's large layer exactly once"
    );
    for ((d, _), b) in big_blobs.iter().zip(&before) {
        assert!(served(d) <= b + 1, "{d} served to B more than once");
    }

    // 3. Another image arrives in B's store, not through a launch: over
    // budget now, B's GC evicts it, keeps busybox and big.
    ember_ok(&b_root, &["pull", "-q", &r("devices")]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while held(&b_root).contains(&devices) {
        assert!(
            Instant::now() < deadline,
            "B's GC did not evict devices: {:?}",
            &journal(&b_root)[..]
                .iter()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let h = held(&b_root);
    assert!(h.contains(&bb) && h.contains(&big), "{h:?}");
    assert!(journal(&b_root).iter().any(|(e, _)| e == "evicted"));

    // 4. Only idle runners keep what is over the budget now.
    let run = launch(&url, &r("devices"));
    assert_eq!(run["node"], "b");
    wait_for(
        "B's GC retires the idle runner of layers and evicts it",
        Duration::from_secs(120),
        || !held(&b_root).contains(&layers),
    );
    let j = journal(&b_root);
    assert!(
        j.contains(&("retired".into(), layers.clone())),
        "layers went without its runner being retired: {j:?}"
    );
    let h = held(&b_root);
    assert!(h.contains(&bb) && h.contains(&big), "{h:?}");
}

/// `ember cache` on a free port in front of `upstream`; killed on drop.
struct Cache(std::process::Child, String);

impl Drop for Cache {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_cache(dir: &Path, upstream: &str) -> Cache {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let child = std::process::Command::new(ember())
        .args(["cache", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--max-bytes", "1G", "--upstream", upstream])
        .arg("--dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn ember cache");
    let cache = Cache(child, format!("http://127.0.0.1:{port}"));
    wait_for("ember cache listens", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    cache
}

/// The cluster cache is asked to fetch the head of a node's plan when the
/// plan arrives: node B, pulling through `ember cache` and pre-pulling at
/// 4 KiB/s (one image at a time, so it starts only one of the two planned
/// images), journals `cache_warmed` for both, and the origin has served
/// the layers of the image B has not even started to the cache.
#[test]
fn the_cache_fetches_the_head_of_a_plan_ahead_of_the_node() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let registry = registry_with(&["busybox", "big", "layers"]);
    let r = |n: &str| format!("{}/ember/{n}:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = start_cache(&tmp.path().join("cache"), &registry.url());
    let (_control, url) = start_control(
        &tmp.path().join("control"),
        &tmp.path().join("control.db").to_string_lossy(),
        &[
            "--prepull-interval",
            "1s",
            "--prepull-replication",
            "2",
            "--prepull-min-score",
            "1.5",
        ],
    );
    let (a_root, b_root) = (tmp.path().join("a"), tmp.path().join("b"));
    let _a = start_node(&a_root, &url, "a", 2, &agent, &[]);
    let mut digests = Vec::new();
    for n in ["big", "layers"] {
        for _ in 0..2 {
            let run = launch(&url, &r(n));
            assert_eq!(run["node"], "a");
            digests.push(run["image"]["digest"].as_str().expect("digest").to_owned());
        }
    }
    let (big, layers) = (digests[0].clone(), digests[2].clone());
    // For each image, the layers only it has, with what the origin has
    // served of each so far (to A).
    let served = |d: &str| registry.count_requests("GET", &format!("/blobs/{d}"));
    let own = |img: &str, other: &str| -> Vec<(String, usize)> {
        let theirs = layer_blobs(&a_root, other);
        layer_blobs(&a_root, img)
            .into_iter()
            .filter(|(d, _)| !theirs.iter().any(|(t, _)| t == d))
            .map(|(d, _)| {
                let n = served(&d);
                (d, n)
            })
            .collect()
    };
    let own_of = [
        (big.clone(), own(&big, &layers)),
        (layers.clone(), own(&layers, &big)),
    ];
    // A stays up: the planner knows an image's size from the nodes that
    // hold it.
    assert!(own_of.iter().all(|(_, o)| !o.is_empty()));

    let _b = start_node(
        &b_root,
        &url,
        "b",
        2,
        &agent,
        &["--cache", &cache.1, "--prepull-bandwidth", "4k"],
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let j = journal(&b_root);
        if j.contains(&("cache_warmed".into(), big.clone()))
            && j.contains(&("cache_warmed".into(), layers.clone()))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B's cache did not warm both planned images ({big}, {layers}): {j:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let j = journal(&b_root);
    // B pre-pulls one image at a time, slowly: one of the two is not even
    // started, and neither is done.
    let started: Vec<&String> = [&big, &layers]
        .into_iter()
        .filter(|d| j.contains(&("started".into(), (*d).clone())))
        .collect();
    assert!(started.len() <= 1, "{j:?}");
    assert!(
        !j.iter().any(|(e, _)| e == "done"),
        "a pre-pull finished at 4 KiB/s: {j:?}"
    );
    // Only the warm request can have brought the own layers of the image
    // B has not started into the cache.
    let (img, own) = own_of
        .iter()
        .find(|(d, _)| !started.contains(&d))
        .expect("an image B has not started");
    for (d, b) in own {
        assert_eq!(
            registry.wait_for_requests(
                "GET",
                &format!("/blobs/{d}"),
                b + 1,
                Duration::from_secs(30)
            ),
            b + 1,
            "the origin did not serve {d} (of {img}) to the cache once"
        );
    }
}
