//! Pull plans: which images each node should fetch before anyone launches
//! them, and which images its garbage collector must keep.
//!
//! [`plan`] is a pure function of the nodes' holdings, the images ranked by
//! [`Popularity`](crate::popularity::Popularity) and their layers, so the
//! control plane, the node and `ember sim` run the same code.
//!
//! How it chooses, image by image from the most launched down:
//!
//! 1. **Replicas by demand.** An image with a share `p` of recent launches
//!    wants `ceil(replication × nodes × p)` nodes (at least one, at most
//!    all): the head of the distribution lands everywhere, a tail image on
//!    one or two nodes. Unlike Kubernetes' ImageLocality, a rare image is
//!    worth holding *somewhere*, so the cluster as a whole holds far more
//!    than one node's disk.
//! 2. **Holders first, then rendezvous.** Nodes that already hold the image
//!    keep it (always, even beyond its replica count: it costs nothing and
//!    evicting it for something colder would break the rule below); the
//!    remaining replicas go to nodes in rendezvous-hash order of
//!    (image, node), so the tail spreads evenly and a plan is stable when a
//!    node joins or leaves.
//! 3. **Budget with shared layers.** A node takes an image only when the
//!    layers it lacks fit in what its budget has left after everything
//!    hotter it was given; layers shared with hotter images cost nothing.
//!    Because images are taken hottest first, a pull never needs to evict
//!    anything hotter than what it brings.
//!
//! A node's plan is the images given to it that it lacks, most launched
//! first — so a node that joins empty is warmed with the head first — and
//! the set it must keep, which the node's GC protects ([`eviction_order`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::{Millis, NodeId};

/// One layer of an image: its digest and compressed size (what a pull
/// moves and, roughly, what it costs on disk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// `sha256:…` of the layer blob.
    pub digest: String,
    /// Bytes.
    pub size: u64,
}

/// Image manifest digest → its layers.
pub type Catalogue = BTreeMap<String, Vec<Layer>>;

/// What one node holds, as the planner needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHoldings {
    /// Identity.
    pub id: NodeId,
    /// Bytes of images the node's store may hold (its disk budget for
    /// images, below the GC's high watermark).
    pub budget_bytes: u64,
    /// Complete images held, or being pulled now.
    pub images: BTreeSet<String>,
    /// Images a runner or a run uses now: never planned away.
    pub in_use: BTreeSet<String>,
}

/// Knobs of [`plan`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PlanConfig {
    /// Replicas per unit of launch share and node (see the module docs).
    /// 0.5 was chosen with `ember sim` on the generated ten-day trace at
    /// 100 nodes: higher values pre-pull head images onto nodes no run of
    /// them reaches (2.0 left a third of pre-pulled bytes unused).
    pub replication: f64,
    /// Images whose score is below this are not pre-pulled anywhere (a
    /// few launches that faded): fetching them would be bytes never used.
    pub min_score: f64,
    /// At most this many pulls per node in one plan; the rest wait for the
    /// next plan, which sees what actually arrived.
    pub max_pulls_per_node: usize,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            replication: 0.5,
            min_score: 2.0,
            max_pulls_per_node: 8,
        }
    }
}

/// One node's plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    /// Images to pull, most launched first.
    pub pulls: Vec<String>,
    /// Images the node must keep (given to it by the plan, or in use);
    /// its GC evicts anything else first.
    pub keep: BTreeSet<String>,
}

/// A stable 64-bit hash of (image, node) for rendezvous ordering: FNV-1a
/// over both strings, finished with splitmix64 so nearby inputs spread.
fn rendezvous(image: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in image.bytes().chain([0u8]).chain(node.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A node while the plan is built.
struct Filling<'a> {
    node: &'a NodeHoldings,
    layers: BTreeSet<&'a str>,
    used: u64,
    keep: BTreeSet<String>,
    pulls: Vec<String>,
}

impl<'a> Filling<'a> {
    fn missing(&self, layers: &[Layer]) -> u64 {
        let mut seen = BTreeSet::new();
        layers
            .iter()
            .filter(|l| !self.layers.contains(l.digest.as_str()) && seen.insert(l.digest.as_str()))
            .map(|l| l.size)
            .sum()
    }

    fn take(&mut self, image: &str, layers: &'a [Layer]) {
        for l in layers {
            if self.layers.insert(l.digest.as_str()) {
                self.used += l.size;
            }
        }
        self.keep.insert(image.to_owned());
    }
}

/// Plans every node at once (see the module docs). `ranked` is images with
/// their launch scores, most launched first
/// ([`Popularity::ranked`](crate::popularity::Popularity::ranked)); images
/// missing from `catalogue` are skipped, since their size is unknown.
pub fn plan(
    nodes: &[NodeHoldings],
    ranked: &[(String, f64)],
    catalogue: &Catalogue,
    cfg: &PlanConfig,
) -> BTreeMap<NodeId, NodePlan> {
    let mut fill: Vec<Filling<'_>> = nodes
        .iter()
        .map(|n| Filling {
            node: n,
            layers: BTreeSet::new(),
            used: 0,
            keep: BTreeSet::new(),
            pulls: Vec::new(),
        })
        .collect();
    // What runs use is kept first, whatever its score.
    for f in &mut fill {
        for image in &f.node.in_use {
            if let Some(layers) = catalogue.get(image) {
                f.take(image, layers);
            } else {
                f.keep.insert(image.clone());
            }
        }
    }

    let known: Vec<(&str, f64, &[Layer])> = ranked
        .iter()
        .filter_map(|(img, s)| catalogue.get(img).map(|l| (img.as_str(), *s, l.as_slice())))
        .collect();
    let total: f64 = known.iter().map(|(_, s, _)| s.max(0.0)).sum();
    let n = fill.len();

    for (image, score, layers) in known {
        let mut placed = fill.iter().filter(|f| f.keep.contains(image)).count();
        // Holders keep what they have if it fits after everything hotter.
        for f in fill.iter_mut() {
            if f.node.images.contains(image) && !f.keep.contains(image) {
                let cost = f.missing(layers);
                if f.used + cost <= f.node.budget_bytes {
                    f.take(image, layers);
                    placed += 1;
                }
            }
        }
        if score < cfg.min_score || total <= 0.0 || n == 0 {
            continue;
        }
        let want = ((cfg.replication * n as f64 * score / total).ceil() as usize).clamp(1, n);
        if placed >= want {
            continue;
        }
        let mut order: Vec<usize> = (0..n).filter(|&i| !fill[i].keep.contains(image)).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(rendezvous(image, &fill[i].node.id)));
        for i in order {
            if placed >= want {
                break;
            }
            let f = &mut fill[i];
            let cost = f.missing(layers);
            if f.used + cost > f.node.budget_bytes {
                continue;
            }
            f.take(image, layers);
            if !f.node.images.contains(image) && f.pulls.len() < cfg.max_pulls_per_node {
                f.pulls.push(image.to_owned());
            }
            placed += 1;
        }
    }

    fill.into_iter()
        .map(|f| {
            (
                f.node.id.clone(),
                NodePlan {
                    pulls: f.pulls,
                    keep: f.keep,
                },
            )
        })
        .collect()
}

/// An image a node holds, as its garbage collector sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldImage {
    /// Manifest digest.
    pub digest: String,
    /// When a run last used it.
    pub last_used: Millis,
    /// A runner or run uses it now.
    pub in_use: bool,
}

/// The order in which a node's GC may evict images: never what is in use
/// or protected by the node's plan; among the rest the least launched
/// (decayed score from `score`) first, then the least recently used, so an
/// image nobody launches through the control plane falls back to LRU.
pub fn eviction_order(
    held: &[HeldImage],
    protected: &BTreeSet<String>,
    score: impl Fn(&str) -> f64,
) -> Vec<String> {
    let mut v: Vec<(&HeldImage, f64)> = held
        .iter()
        .filter(|h| !h.in_use && !protected.contains(&h.digest))
        .map(|h| (h, score(&h.digest)))
        .collect();
    v.sort_by(|a, b| {
        a.1.total_cmp(&b.1)
            .then_with(|| a.0.last_used.cmp(&b.0.last_used))
            .then_with(|| a.0.digest.cmp(&b.0.digest))
    });
    v.into_iter().map(|(h, _)| h.digest.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(d: &str, size: u64) -> Layer {
        Layer {
            digest: d.into(),
            size,
        }
    }

    fn node(id: &str, budget: u64) -> NodeHoldings {
        NodeHoldings {
            id: id.into(),
            budget_bytes: budget,
            ..NodeHoldings::default()
        }
    }

    /// `count` images of `size` bytes with no shared layers, scores
    /// falling like a Zipf distribution.
    fn zipf(count: usize, size: u64) -> (Catalogue, Vec<(String, f64)>) {
        let mut cat = Catalogue::new();
        let mut ranked = Vec::new();
        for i in 0..count {
            let img = format!("img{i:03}");
            cat.insert(img.clone(), vec![layer(&format!("l{i:03}"), size)]);
            ranked.push((img, 100.0 / (i + 1) as f64));
        }
        (cat, ranked)
    }

    #[test]
    fn the_head_goes_everywhere_and_the_tail_spreads() {
        let (cat, ranked) = zipf(60, 10);
        let nodes: Vec<NodeHoldings> = (0..10).map(|i| node(&format!("n{i}"), 100)).collect();
        let cfg = PlanConfig {
            replication: 2.0,
            min_score: 0.5,
            ..PlanConfig::default()
        };
        let plans = plan(&nodes, &ranked, &cat, &cfg);
        // The most launched image (share ~21 %) wants 5 replicas of 10.
        let holders = |img: &str| plans.values().filter(|p| p.keep.contains(img)).count();
        assert!(holders("img000") >= 4, "{}", holders("img000"));
        // The cluster holds more distinct images than one node's disk (10).
        let distinct: BTreeSet<&String> = plans.values().flat_map(|p| p.keep.iter()).collect();
        assert!(distinct.len() > 20, "{}", distinct.len());
        // Nobody is over budget, and pulls come most launched first.
        for p in plans.values() {
            assert!(p.keep.len() <= 10);
            let ranks: Vec<usize> = p
                .pulls
                .iter()
                .map(|i| i[3..].parse().expect("rank"))
                .collect();
            assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{ranks:?}");
        }
    }

    #[test]
    fn shared_layers_are_counted_once() {
        let mut cat = Catalogue::new();
        cat.insert("a".into(), vec![layer("base", 80), layer("a1", 10)]);
        cat.insert("b".into(), vec![layer("base", 80), layer("b1", 10)]);
        let ranked = vec![("a".to_string(), 10.0), ("b".to_string(), 10.0)];
        let cfg = PlanConfig {
            replication: 10.0,
            ..PlanConfig::default()
        };
        let plans = plan(&[node("n", 100)], &ranked, &cat, &cfg);
        assert_eq!(plans["n"].pulls, ["a", "b"]);
    }

    #[test]
    fn a_pull_never_displaces_a_hotter_held_image() {
        let (cat, ranked) = zipf(3, 50);
        let mut n = node("n", 100);
        n.images.insert("img000".into());
        n.images.insert("img001".into());
        let plans = plan(&[n], &ranked, &cat, &PlanConfig::default());
        assert!(plans["n"].pulls.is_empty());
        assert!(plans["n"].keep.contains("img000") && plans["n"].keep.contains("img001"));
    }

    #[test]
    fn in_use_images_are_kept_whatever_their_score() {
        let (cat, ranked) = zipf(3, 50);
        let mut n = node("n", 100);
        n.images.insert("img002".into());
        n.in_use.insert("img002".into());
        let plans = plan(&[n], &ranked, &cat, &PlanConfig::default());
        assert!(plans["n"].keep.contains("img002"));
        assert_eq!(plans["n"].pulls, ["img000"]);
    }

    #[test]
    fn faded_images_are_not_pre_pulled_and_unknown_ones_skipped() {
        let mut cat = Catalogue::new();
        cat.insert("hot".into(), vec![layer("h", 1)]);
        cat.insert("faded".into(), vec![layer("f", 1)]);
        let ranked = vec![
            ("hot".to_string(), 5.0),
            ("ghost".to_string(), 4.0),
            ("faded".to_string(), 0.1),
        ];
        let plans = plan(&[node("n", 100)], &ranked, &cat, &PlanConfig::default());
        assert_eq!(plans["n"].pulls, ["hot"]);
    }

    #[test]
    fn a_joining_node_changes_few_other_assignments() {
        let (cat, ranked) = zipf(200, 10);
        let cfg = PlanConfig {
            max_pulls_per_node: usize::MAX,
            ..PlanConfig::default()
        };
        let before: Vec<NodeHoldings> = (0..20).map(|i| node(&format!("n{i:02}"), 100)).collect();
        let mut after = before.clone();
        after.push(node("n20", 100));
        let a = plan(&before, &ranked, &cat, &cfg);
        let b = plan(&after, &ranked, &cat, &cfg);
        let moved: usize = before
            .iter()
            .map(|n| a[&n.id].keep.symmetric_difference(&b[&n.id].keep).count())
            .sum();
        let total: usize = a.values().map(|p| p.keep.len()).sum();
        // Rendezvous hashing: far from a reshuffle of every node.
        assert!(moved * 3 < total, "moved {moved} of {total}");
        // The new node is warmed with the head first: its pulls start
        // among the most launched images and go down the ranking.
        let ranks: Vec<usize> = b["n20"]
            .pulls
            .iter()
            .map(|i| i[3..].parse().expect("rank"))
            .collect();
        assert!(ranks.first().is_some_and(|&r| r < 3), "{ranks:?}");
        assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{ranks:?}");
    }

    #[test]
    fn eviction_spares_protected_and_in_use_then_coldest_then_lru() {
        let held = vec![
            HeldImage {
                digest: "busy".into(),
                last_used: 0,
                in_use: true,
            },
            HeldImage {
                digest: "planned".into(),
                last_used: 0,
                in_use: false,
            },
            HeldImage {
                digest: "warm".into(),
                last_used: 1,
                in_use: false,
            },
            HeldImage {
                digest: "cold-old".into(),
                last_used: 1,
                in_use: false,
            },
            HeldImage {
                digest: "cold-new".into(),
                last_used: 9,
                in_use: false,
            },
        ];
        let protected: BTreeSet<String> = ["planned".to_string()].into();
        let order = eviction_order(&held, &protected, |d| if d == "warm" { 3.0 } else { 0.0 });
        assert_eq!(order, ["cold-old", "cold-new", "warm"]);
    }
}
