//! Placement: which node a run should start on.
//!
//! [`place`] is a pure function of a [`ClusterView`] and one run's
//! [`RunRequirements`], so it is tested with properties over random views
//! and costs O(nodes) per run. Preference order:
//!
//! 1. a node with an idle warm runner for the run's key (a warm start skips
//!    the image and the runner: 100 ms instead of seconds);
//! 2. for a run of a snapshot deployment, a node that holds its checkpoint
//!    ([`Run::snapshot_key`]; elsewhere the run starts fresh, seconds of
//!    start-up), the least loaded of them;
//! 3. otherwise the best combined score of *image locality* and *load* (the
//!    fraction of free slots). Locality is scored by the bytes of the image
//!    a node is *missing* ([`Locality::MissingBytes`], the default): what a
//!    start there would have to pull, counting an image that is arriving
//!    (a pull in flight) as held. Every [`MISSING_UNIT_BYTES`] missing cost
//!    [`LOCALITY_WEIGHT`] times an idle node's load score, so load only
//!    chooses between nodes that would pull about as much, and a node that
//!    would pull gigabytes is last. A rare
//!    image on one node is worth going to while that node has a slot: the
//!    pull plans (`pullplan`) put popular images on many nodes, so that
//!    does not pile a burst onto one node. [`Locality::Spread`] is the
//!    Kubernetes ImageLocality rule (the fraction held, scaled by the
//!    fraction of nodes holding the image), kept for `ember sim`'s
//!    baseline;
//! 4. ties go to the lower node id, so results are reproducible.
//!
//! Only nodes with a free slot and every label of the run's selector are
//! candidates.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::{Millis, Node, NodeId, Run};

/// How much more a node holding the whole image counts than an idle node.
pub const LOCALITY_WEIGHT: f64 = 2.0;

/// Missing bytes that cost [`Locality::MissingBytes`] one
/// [`LOCALITY_WEIGHT`]: about a second of pulling through a cluster cache
/// on a 1 Gbit/s link.
pub const MISSING_UNIT_BYTES: u64 = 128 << 20;

/// How image locality is scored (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Locality {
    /// By the bytes a node lacks (Ember's rule).
    #[default]
    MissingBytes,
    /// By the fraction held times the fraction of nodes holding it
    /// (Kubernetes' ImageLocality).
    Spread,
}

/// One node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Identity.
    pub id: NodeId,
    /// Runs it executes at once.
    pub slots: u32,
    /// Runs active on it now (scheduled, starting or running).
    pub active: u32,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Image digest → bytes present.
    pub images: BTreeMap<String, u64>,
    /// Warm key → idle runners.
    pub idle_runners: BTreeMap<String, u32>,
    /// Checkpoints of snapshot deployments it holds ([`Run::snapshot_key`]).
    #[serde(default)]
    pub snapshots: BTreeSet<String>,
}

impl NodeView {
    /// Slots not taken.
    pub fn free(&self) -> u32 {
        self.slots.saturating_sub(self.active)
    }

    /// Whether the node's labels satisfy `selector` ([`crate::selector`]).
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        crate::selector::matches(selector, &self.labels)
    }

    fn idle_for(&self, key: &str) -> u32 {
        self.idle_runners.get(key).copied().unwrap_or(0)
    }

    fn bytes_of(&self, digest: &str) -> u64 {
        self.images.get(digest).copied().unwrap_or(0)
    }

    fn load_score(&self) -> f64 {
        if self.slots == 0 {
            0.0
        } else {
            f64::from(self.free()) / f64::from(self.slots)
        }
    }
}

/// The cluster at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// Nodes that may receive runs, in any order.
    pub nodes: Vec<NodeView>,
}

impl ClusterView {
    /// Builds the view from stored nodes and the currently active runs,
    /// leaving out nodes whose heartbeat is older than `stale_after_ms`
    /// (they are about to have their runs marked lost).
    pub fn build(nodes: &[Node], active_runs: &[Run], now: Millis, stale_after_ms: Millis) -> Self {
        let mut active: BTreeMap<&str, u32> = BTreeMap::new();
        for run in active_runs.iter().filter(|r| r.state.is_active()) {
            if let Some(n) = &run.node {
                *active.entry(n.as_str()).or_default() += 1;
            }
        }
        let nodes = nodes
            .iter()
            .filter(|n| now.saturating_sub(n.last_heartbeat) <= stale_after_ms)
            .map(|n| NodeView {
                id: n.spec.id.clone(),
                slots: n.spec.slots,
                active: active.get(n.spec.id.as_str()).copied().unwrap_or(0),
                labels: n.spec.labels.clone(),
                images: held_or_arriving(&n.spec.inventory),
                idle_runners: n.spec.inventory.idle_runners.clone(),
                snapshots: n.spec.inventory.snapshots.clone(),
            })
            .collect();
        ClusterView { nodes }
    }
}

/// A node's images with those being pulled now counted at their full
/// size: the scheduler treats "image arriving on this node" as held.
fn held_or_arriving(inv: &crate::model::Inventory) -> BTreeMap<String, u64> {
    let mut images = inv.images.clone();
    for (digest, bytes) in &inv.pulling {
        let e = images.entry(digest.clone()).or_default();
        *e = (*e).max(*bytes);
    }
    images
}

/// What placement needs to know about a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequirements {
    /// The image's manifest digest.
    pub image_digest: String,
    /// The image's total layer bytes, if known; otherwise the most any
    /// candidate holds stands in for it.
    pub image_bytes: Option<u64>,
    /// The warm-runner key ([`Run::warm_key`]).
    pub warm_key: Option<String>,
    /// Labels a node must have.
    pub node_selector: BTreeMap<String, String>,
    /// The checkpoint a snapshot run restores from ([`Run::snapshot_key`]).
    #[serde(default)]
    pub snapshot_key: Option<String>,
}

impl From<&Run> for RunRequirements {
    fn from(run: &Run) -> Self {
        RunRequirements {
            image_digest: run.image.digest.clone(),
            image_bytes: None,
            // A plain run has no warm runner to prefer: its runner must be fresh.
            warm_key: run.recyclable().then(|| run.warm_key()),
            node_selector: run.node_selector.clone(),
            snapshot_key: run.snapshot_key(),
        }
    }
}

/// Why a node was chosen (reported in `ember runs --stats` later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementReason {
    /// It has an idle runner with the run's key.
    WarmRunner,
    /// It holds the checkpoint the run restores from.
    Snapshot,
    /// It holds some of the image.
    ImageLocality,
    /// It holds none of the image; chosen by load.
    LeastLoaded,
}

/// Where a run goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The node.
    pub node: NodeId,
    /// Why.
    pub reason: PlacementReason,
}

/// Chooses a node for `run`, or `None` when no candidate has a free slot.
/// See the module docs for the preference order.
pub fn place(view: &ClusterView, run: &RunRequirements) -> Option<Placement> {
    place_with(view, run, Locality::default())
}

/// [`place`] with the locality rule chosen.
pub fn place_with(
    view: &ClusterView,
    run: &RunRequirements,
    locality: Locality,
) -> Option<Placement> {
    let matching: Vec<&NodeView> = view
        .nodes
        .iter()
        .filter(|n| n.matches(&run.node_selector))
        .collect();
    let candidates: Vec<&NodeView> = matching.iter().copied().filter(|n| n.free() > 0).collect();

    if let Some(key) = &run.warm_key {
        // Among warm nodes the least loaded, so warm runs spread too.
        let warm = candidates
            .iter()
            .filter(|n| n.idle_for(key) > 0)
            .max_by(|a, b| {
                a.load_score()
                    .total_cmp(&b.load_score())
                    .then_with(|| b.id.cmp(&a.id))
            });
        if let Some(n) = warm {
            return Some(Placement {
                node: n.id.clone(),
                reason: PlacementReason::WarmRunner,
            });
        }
    }

    if let Some(key) = &run.snapshot_key {
        let holder = candidates
            .iter()
            .filter(|n| n.snapshots.contains(key))
            .max_by(|a, b| {
                a.load_score()
                    .total_cmp(&b.load_score())
                    .then_with(|| b.id.cmp(&a.id))
            });
        if let Some(n) = holder {
            return Some(Placement {
                node: n.id.clone(),
                reason: PlacementReason::Snapshot,
            });
        }
    }

    // The spread factor counts matching nodes, full or not, so it does not
    // jump as nodes fill up during a burst.
    let holders = matching
        .iter()
        .filter(|n| n.bytes_of(&run.image_digest) > 0)
        .count();
    let spread = if matching.is_empty() {
        0.0
    } else {
        holders as f64 / matching.len() as f64
    };
    let total = run.image_bytes.unwrap_or_else(|| {
        candidates
            .iter()
            .map(|n| n.bytes_of(&run.image_digest))
            .max()
            .unwrap_or(0)
    });
    let score = |n: &NodeView| {
        let held = n.bytes_of(&run.image_digest).min(total);
        let locality = match locality {
            Locality::Spread if total == 0 => 0.0,
            Locality::Spread => held as f64 / total as f64 * spread,
            Locality::MissingBytes => -((total - held) as f64) / MISSING_UNIT_BYTES as f64,
        };
        LOCALITY_WEIGHT * locality + n.load_score()
    };
    let best = candidates
        .iter()
        .max_by(|a, b| score(a).total_cmp(&score(b)).then_with(|| b.id.cmp(&a.id)))?;
    let reason = if best.bytes_of(&run.image_digest) > 0 {
        PlacementReason::ImageLocality
    } else {
        PlacementReason::LeastLoaded
    };
    Some(Placement {
        node: best.id.clone(),
        reason,
    })
}

/// Places runs one at a time against a view it keeps up to date (a slot
/// taken, a warm runner used), so consecutive placements don't overcommit.
#[derive(Debug, Clone)]
pub struct BatchScheduler {
    view: ClusterView,
    locality: Locality,
}

impl BatchScheduler {
    /// Starts from `view`.
    pub fn new(view: ClusterView) -> Self {
        BatchScheduler::with_locality(view, Locality::default())
    }

    /// Starts from `view`, scoring locality by `locality`.
    pub fn with_locality(view: ClusterView, locality: Locality) -> Self {
        BatchScheduler { view, locality }
    }

    /// Places one run and records it in the view.
    pub fn place_next(&mut self, run: &RunRequirements) -> Option<Placement> {
        let placement = place_with(&self.view, run, self.locality)?;
        if let Some(node) = self.view.nodes.iter_mut().find(|n| n.id == placement.node) {
            node.active += 1;
            if placement.reason == PlacementReason::WarmRunner
                && let Some(key) = &run.warm_key
                && let Some(idle) = node.idle_runners.get_mut(key)
            {
                *idle = idle.saturating_sub(1);
            }
        }
        Some(placement)
    }

    /// The view with the placements so far.
    pub fn view(&self) -> &ClusterView {
        &self.view
    }
}

/// Places a sequence of queued runs, lazily.
///
/// This is the answer to the reconciler problem (brief, point 4): the
/// placement of run *i* is yielded as soon as it is computed, from the view
/// and runs *0..i* only, before run *i + 1* is even read. A dispatcher that
/// sends each placement to its node as it comes out starts the first of
/// 1,000 queued runs after one O(nodes) step, not after all 1,000 have been
/// processed; no run waits on the processing of a later one.
pub fn schedule_batch<'a, I>(
    view: ClusterView,
    runs: I,
) -> impl Iterator<Item = Option<Placement>> + use<'a, I>
where
    I: IntoIterator<Item = &'a RunRequirements>,
{
    let mut scheduler = BatchScheduler::new(view);
    runs.into_iter().map(move |run| scheduler.place_next(run))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: a tiny seeded generator, so property runs are reproducible
    /// without a proptest dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    const CASES: u64 = 2_000;
    const DIGESTS: [&str; 3] = ["sha256:a", "sha256:b", "sha256:c"];
    const KEYS: [&str; 2] = ["k0", "k1"];

    fn random_view(rng: &mut Rng) -> ClusterView {
        let n = 1 + rng.below(8);
        let nodes = (0..n)
            .map(|i| {
                let slots = rng.below(5) as u32;
                let active = rng.below(u64::from(slots) + 1) as u32;
                let mut labels = BTreeMap::new();
                if rng.chance(50) {
                    labels.insert("zone".into(), if rng.chance(50) { "a" } else { "b" }.into());
                }
                let mut images = BTreeMap::new();
                for d in DIGESTS {
                    if rng.chance(50) {
                        images.insert(d.to_owned(), 1 + rng.below(100));
                    }
                }
                let mut idle_runners = BTreeMap::new();
                for k in KEYS {
                    if rng.chance(30) {
                        idle_runners.insert(k.to_owned(), rng.below(3) as u32);
                    }
                }
                NodeView {
                    id: format!("n{i}"),
                    slots,
                    active,
                    labels,
                    images,
                    idle_runners,
                    snapshots: BTreeSet::new(),
                }
            })
            .collect();
        ClusterView { nodes }
    }

    fn random_run(rng: &mut Rng, with_selector: bool) -> RunRequirements {
        let mut node_selector = BTreeMap::new();
        if with_selector && rng.chance(40) {
            node_selector.insert("zone".into(), if rng.chance(50) { "a" } else { "b" }.into());
        }
        RunRequirements {
            image_digest: DIGESTS[rng.below(3) as usize].to_owned(),
            image_bytes: if rng.chance(50) { Some(100) } else { None },
            warm_key: if rng.chance(70) {
                Some(KEYS[rng.below(2) as usize].to_owned())
            } else {
                None
            },
            node_selector,
            snapshot_key: None,
        }
    }

    fn node<'v>(view: &'v ClusterView, id: &str) -> &'v NodeView {
        view.nodes
            .iter()
            .find(|n| n.id == id)
            .expect("placement names a node of the view")
    }

    #[test]
    fn never_places_on_a_full_or_mismatched_node() {
        let mut rng = Rng(1);
        for _ in 0..CASES {
            let view = random_view(&mut rng);
            let run = random_run(&mut rng, true);
            if let Some(p) = place(&view, &run) {
                let n = node(&view, &p.node);
                assert!(n.free() > 0, "{p:?} on full node in {view:?}");
                assert!(n.matches(&run.node_selector), "{p:?} ignores selector");
            }
        }
    }

    #[test]
    fn always_places_when_a_matching_node_has_a_free_slot() {
        let mut rng = Rng(2);
        for _ in 0..CASES {
            let view = random_view(&mut rng);
            let run = random_run(&mut rng, true);
            let possible = view
                .nodes
                .iter()
                .any(|n| n.free() > 0 && n.matches(&run.node_selector));
            assert_eq!(place(&view, &run).is_some(), possible, "{view:?} {run:?}");
        }
    }

    #[test]
    fn prefers_an_idle_warm_runner_on_a_node_with_a_free_slot() {
        let mut rng = Rng(3);
        let mut checked = 0;
        for _ in 0..CASES {
            let view = random_view(&mut rng);
            let run = random_run(&mut rng, true);
            let Some(key) = &run.warm_key else { continue };
            let warm_exists = view
                .nodes
                .iter()
                .any(|n| n.free() > 0 && n.matches(&run.node_selector) && n.idle_for(key) > 0);
            let p = place(&view, &run);
            if warm_exists {
                checked += 1;
                let p = p.expect("a warm node has a free slot");
                assert_eq!(p.reason, PlacementReason::WarmRunner);
                assert!(node(&view, &p.node).idle_for(key) > 0);
            } else if let Some(p) = p {
                assert_ne!(p.reason, PlacementReason::WarmRunner);
            }
        }
        assert!(
            checked > 100,
            "the generator must exercise warm runners ({checked})"
        );
    }

    #[test]
    fn prefers_more_image_bytes_when_load_is_equal() {
        let mut rng = Rng(4);
        for _ in 0..CASES {
            let mut view = random_view(&mut rng);
            // Equal load everywhere, no warm runners, no labels in the way.
            let slots = 1 + rng.below(4) as u32;
            let active = rng.below(u64::from(slots)) as u32;
            for n in &mut view.nodes {
                n.slots = slots;
                n.active = active;
                n.idle_runners.clear();
            }
            let run = RunRequirements {
                warm_key: None,
                node_selector: BTreeMap::new(),
                ..random_run(&mut rng, false)
            };
            let p = place(&view, &run).expect("every node has a free slot");
            let most = view
                .nodes
                .iter()
                .map(|n| n.bytes_of(&run.image_digest))
                .max()
                .unwrap_or(0);
            assert_eq!(
                node(&view, &p.node).bytes_of(&run.image_digest),
                most,
                "{view:?}"
            );
        }
    }

    #[test]
    fn spreads_a_popular_image_across_the_nodes_that_hold_it() {
        let mut rng = Rng(5);
        for _ in 0..200 {
            let holders = 2 + rng.below(5) as usize;
            let slots = 2 + rng.below(6) as u32;
            let mut nodes: Vec<NodeView> = (0..holders)
                .map(|i| NodeView {
                    id: format!("h{i}"),
                    slots,
                    active: 0,
                    labels: BTreeMap::new(),
                    images: [("sha256:pop".to_owned(), 500)].into(),
                    idle_runners: BTreeMap::new(),
                    snapshots: BTreeSet::new(),
                })
                .collect();
            // Some nodes without the image: they may take runs once the
            // holders are busy, but never before every holder has one.
            for i in 0..rng.below(3) {
                nodes.push(NodeView {
                    id: format!("x{i}"),
                    slots,
                    active: 0,
                    labels: BTreeMap::new(),
                    images: BTreeMap::new(),
                    idle_runners: BTreeMap::new(),
                    snapshots: BTreeSet::new(),
                });
            }
            let run = RunRequirements {
                image_digest: "sha256:pop".into(),
                image_bytes: Some(500),
                warm_key: None,
                node_selector: BTreeMap::new(),
                snapshot_key: None,
            };
            let runs = vec![run; holders * slots as usize / 2];
            let mut per_node: BTreeMap<String, u32> = BTreeMap::new();
            for p in schedule_batch(ClusterView { nodes }, &runs) {
                *per_node
                    .entry(p.expect("capacity suffices").node)
                    .or_default() += 1;
            }
            let holder_counts: Vec<u32> = (0..holders)
                .map(|i| per_node.get(&format!("h{i}")).copied().unwrap_or(0))
                .collect();
            let (min, max) = (
                holder_counts.iter().min().copied().unwrap_or(0),
                holder_counts.iter().max().copied().unwrap_or(0),
            );
            assert!(min >= 1 && max - min <= 1, "uneven spread {per_node:?}");
        }
    }

    #[test]
    fn spread_rule_prefers_one_holder_among_many_but_does_not_pile_on() {
        // Ten idle nodes, one holds the image: the first runs go there, but
        // with spread 1/10 it stops being preferred once it is busier.
        let nodes: Vec<NodeView> = (0..10)
            .map(|i| NodeView {
                id: format!("n{i}"),
                slots: 10,
                active: 0,
                labels: BTreeMap::new(),
                images: if i == 7 {
                    [("sha256:x".to_owned(), 100)].into()
                } else {
                    BTreeMap::new()
                },
                idle_runners: BTreeMap::new(),
                snapshots: BTreeSet::new(),
            })
            .collect();
        let run = RunRequirements {
            image_digest: "sha256:x".into(),
            ..RunRequirements::default()
        };
        let mut scheduler = BatchScheduler::with_locality(ClusterView { nodes }, Locality::Spread);
        let placed: Vec<String> = (0..10)
            .map(|_| scheduler.place_next(&run).expect("room").node)
            .collect();
        assert_eq!(placed[0], "n7");
        let on_holder = placed.iter().filter(|n| *n == "n7").count();
        assert!((2..10).contains(&on_holder), "{placed:?}");
    }

    #[test]
    fn prefers_a_node_holding_the_runs_checkpoint() {
        // n1 holds the image and is idle; n2 holds the checkpoint and is
        // busier: the checkpoint wins (a restore instead of seconds of
        // start-up), as long as n2 has a slot.
        let mut n1 = bare("n1", 4, &[("sha256:x", 100)]);
        n1.active = 0;
        let mut n2 = bare("n2", 4, &[("sha256:x", 100)]);
        n2.active = 2;
        n2.snapshots.insert("d.app.00000000000000aa".into());
        let run = RunRequirements {
            image_digest: "sha256:x".into(),
            snapshot_key: Some("d.app.00000000000000aa".into()),
            ..RunRequirements::default()
        };
        let view = ClusterView {
            nodes: vec![n1.clone(), n2.clone()],
        };
        let p = place(&view, &run).expect("room");
        assert_eq!(
            (p.node.as_str(), p.reason),
            ("n2", PlacementReason::Snapshot)
        );
        // Another checkpoint (a new start-up): no preference, n1 by load.
        let other = RunRequirements {
            snapshot_key: Some("d.app.00000000000000bb".into()),
            ..run.clone()
        };
        assert_eq!(place(&view, &other).expect("room").node, "n1");
        // The holder full: the run goes elsewhere and starts fresh.
        n2.active = 4;
        let view = ClusterView {
            nodes: vec![n1, n2],
        };
        assert_eq!(place(&view, &run).expect("room").node, "n1");
    }

    fn bare(id: &str, slots: u32, images: &[(&str, u64)]) -> NodeView {
        NodeView {
            id: id.into(),
            slots,
            active: 0,
            labels: BTreeMap::new(),
            images: images.iter().map(|(d, b)| (d.to_string(), *b)).collect(),
            idle_runners: BTreeMap::new(),
            snapshots: BTreeSet::new(),
        }
    }

    #[test]
    fn missing_bytes_rule_uses_a_rare_holder_until_it_is_full() {
        // One node of ten holds a 1 GiB image: starting anywhere else means
        // pulling 1 GiB, so every run goes to the holder while it has room.
        let gib = 1u64 << 30;
        let nodes: Vec<NodeView> = (0..10)
            .map(|i| {
                if i == 7 {
                    bare(&format!("n{i}"), 4, &[("sha256:x", gib)])
                } else {
                    bare(&format!("n{i}"), 4, &[])
                }
            })
            .collect();
        let run = RunRequirements {
            image_digest: "sha256:x".into(),
            image_bytes: Some(gib),
            ..RunRequirements::default()
        };
        let runs = vec![run; 6];
        let placed: Vec<String> = schedule_batch(ClusterView { nodes }, &runs)
            .map(|p| p.expect("room").node)
            .collect();
        assert_eq!(&placed[..4], ["n7", "n7", "n7", "n7"], "{placed:?}");
        assert!(placed[4..].iter().all(|n| n != "n7"), "{placed:?}");
    }

    #[test]
    fn missing_bytes_rule_weighs_bytes_not_fractions() {
        // Both nodes hold half of their image; a busy node missing 4 MiB
        // beats an idle one missing 4 GiB, but not one missing 4 MiB.
        let small = RunRequirements {
            image_digest: "sha256:s".into(),
            image_bytes: Some(8 << 20),
            ..RunRequirements::default()
        };
        let big = RunRequirements {
            image_digest: "sha256:b".into(),
            image_bytes: Some(8 << 30),
            ..RunRequirements::default()
        };
        let mut busy = bare("busy", 4, &[("sha256:s", 4 << 20), ("sha256:b", 4 << 30)]);
        busy.active = 3;
        let idle = bare("idle", 4, &[]);
        let view = ClusterView {
            nodes: vec![busy, idle],
        };
        assert_eq!(place(&view, &big).expect("room").node, "busy");
        assert_eq!(place(&view, &small).expect("room").node, "idle");
    }

    #[test]
    fn an_image_being_pulled_counts_as_arriving() {
        use crate::model::{Inventory, Node, NodeSpec};
        let node = |id: &str, pulling: bool| Node {
            spec: NodeSpec {
                id: id.into(),
                slots: 2,
                labels: BTreeMap::new(),
                inventory: Inventory {
                    pulling: if pulling {
                        [("sha256:x".to_owned(), 1u64 << 30)].into()
                    } else {
                        BTreeMap::new()
                    },
                    ..Inventory::default()
                },
            },
            last_heartbeat: 0,
        };
        let view = ClusterView::build(&[node("a", false), node("b", true)], &[], 0, u64::MAX);
        let run = RunRequirements {
            image_digest: "sha256:x".into(),
            image_bytes: Some(1 << 30),
            ..RunRequirements::default()
        };
        assert_eq!(place(&view, &run).expect("room").node, "b");
    }

    #[test]
    fn batch_placement_of_a_run_does_not_depend_on_later_runs() {
        let mut rng = Rng(6);
        for _ in 0..500 {
            let view = random_view(&mut rng);
            let runs: Vec<RunRequirements> = (0..1 + rng.below(20))
                .map(|_| random_run(&mut rng, true))
                .collect();
            let all: Vec<_> = schedule_batch(view.clone(), &runs).collect();
            // Every prefix gives the same placements as the whole batch: run
            // i's placement never looks at runs after it.
            for i in 0..runs.len() {
                let prefix: Vec<_> = schedule_batch(view.clone(), &runs[..=i]).collect();
                assert_eq!(prefix[..], all[..=i]);
            }
            assert_eq!(all[0], place(&view, &runs[0]));
        }
    }

    #[test]
    fn batch_yields_the_first_placement_before_reading_the_second_run() {
        let view = ClusterView {
            nodes: vec![NodeView {
                id: "n".into(),
                slots: 1_000,
                active: 0,
                labels: BTreeMap::new(),
                images: BTreeMap::new(),
                idle_runners: BTreeMap::new(),
                snapshots: BTreeSet::new(),
            }],
        };
        let run = RunRequirements::default();
        let runs = vec![run; 1_000];
        let read = std::cell::Cell::new(0usize);
        let counted = runs.iter().inspect(|_| read.set(read.get() + 1));
        let mut placements = schedule_batch(view, counted);
        assert!(placements.next().is_some());
        assert_eq!(read.get(), 1, "the first placement waited for other runs");
    }

    #[test]
    fn view_counts_active_runs_and_leaves_out_stale_nodes() {
        use crate::model::{Inventory, NodeSpec, PinnedImage, RunId, RunState, StartTimes};
        let node = |id: &str, last_heartbeat| Node {
            spec: NodeSpec {
                id: id.into(),
                slots: 4,
                labels: BTreeMap::new(),
                inventory: Inventory {
                    idle_runners: [("k".to_owned(), 2)].into(),
                    ..Inventory::default()
                },
            },
            last_heartbeat,
        };
        let run = |id, state, node: &str| Run {
            cache_notes: Vec::new(),
            caches: Vec::new(),
            id: RunId(id),
            deployment: None,
            image: PinnedImage {
                reference: "app".into(),
                digest: "sha256:x".into(),
            },
            command: vec![],
            env: BTreeMap::new(),
            resources: Default::default(),
            recycle_key: Some("k".into()),
            readonly_rootfs: false,
            node_selector: BTreeMap::new(),
            timeout_ms: None,
            idempotency_key: None,
            attempts: 1,
            max_attempts: 1,
            state,
            node: Some(node.into()),
            exit_code: None,
            error: None,
            submitted_at: 0,
            times: StartTimes::default(),
            snapshot: None,
        };
        let nodes = [node("fresh", 1_000), node("stale", 100)];
        let runs = [
            run(1, RunState::Running, "fresh"),
            run(2, RunState::Starting, "fresh"),
            run(3, RunState::Succeeded, "fresh"),
            run(4, RunState::Running, "stale"),
        ];
        let view = ClusterView::build(&nodes, &runs, 1_500, 600);
        assert_eq!(view.nodes.len(), 1);
        assert_eq!(
            (view.nodes[0].id.as_str(), view.nodes[0].active),
            ("fresh", 2)
        );
        assert_eq!(view.nodes[0].idle_runners.get("k"), Some(&2));
        // A run's own warm key is what the inventory is matched against.
        let req = RunRequirements::from(&runs[0]);
        assert_eq!(req.warm_key.as_deref(), Some(runs[0].warm_key().as_str()));
        // A plain run (no deployment, no recycling key) prefers no warm
        // runner: it must get one nobody used.
        let mut plain = runs[0].clone();
        plain.recycle_key = None;
        assert_eq!(RunRequirements::from(&plain).warm_key, None);
    }

    #[test]
    fn batch_uses_each_warm_runner_once_and_never_overfills() {
        let view = ClusterView {
            nodes: vec![
                NodeView {
                    id: "a".into(),
                    slots: 3,
                    active: 0,
                    labels: BTreeMap::new(),
                    images: BTreeMap::new(),
                    idle_runners: [("k".to_owned(), 1)].into(),
                    snapshots: BTreeSet::new(),
                },
                NodeView {
                    id: "b".into(),
                    slots: 1,
                    active: 0,
                    labels: BTreeMap::new(),
                    images: BTreeMap::new(),
                    idle_runners: BTreeMap::new(),
                    snapshots: BTreeSet::new(),
                },
            ],
        };
        let run = RunRequirements {
            warm_key: Some("k".into()),
            ..RunRequirements::default()
        };
        let runs = vec![run; 5];
        let got: Vec<_> = schedule_batch(view, &runs).collect();
        assert_eq!(
            got[0].as_ref().map(|p| p.reason),
            Some(PlacementReason::WarmRunner)
        );
        assert!(
            got[1..]
                .iter()
                .flatten()
                .all(|p| p.reason != PlacementReason::WarmRunner)
        );
        assert_eq!(got.iter().flatten().count(), 4, "4 slots in all: {got:?}");
        assert!(got[4].is_none());
    }
}
