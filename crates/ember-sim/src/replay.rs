//! Replays a trace through the real placement ([`place_with`]), pull-plan
//! ([`plan`]) and eviction ([`eviction_order`]) code of `ember-control`,
//! with a modelled network: each node pulls at [`SimConfig::node_bps`]
//! from the cluster cache, which fetches a layer it lacks from upstream at
//! [`SimConfig::upstream_bps`] once and keeps it. A run's modelled start
//! is its wait for a slot, plus its pull, plus [`SimConfig::runner_start_s`].
//!
//! Three policies on the same trace and disks:
//! * [`Policy::Ember`]: pull plans from decayed launch counts every
//!   [`SimConfig::plan_interval_s`], pre-pulls at a share of the link that
//!   yield to a run's own pull, GC by launch score that protects the plan,
//!   placement by bytes missing.
//! * [`Policy::Kubelet`]: no pre-pull, LRU GC from 85 % to 80 % of the
//!   disk, Kubernetes' spread-scaled image locality.
//! * [`Policy::FixedList`]: kube-fledged style: every node pre-pulls the
//!   top images of the last day that fit 80 % of its disk, refreshed every
//!   15 minutes; LRU GC that spares the list; Kubernetes' locality.
//!
//! Simplifications (stated so results are read right): pulls of one node
//! run one after another at full link speed; pre-pulls run one at a time
//! beside them at [`SimConfig::prepull_share`] of the link; the cache
//! never evicts; disks count compressed layer bytes.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};

use ember_control::popularity::Popularity;
use ember_control::pullplan::{
    Catalogue, HeldImage, Layer, NodeHoldings, PlanConfig, eviction_order, plan,
};
use ember_control::schedule::{ClusterView, Locality, NodeView, RunRequirements, place_with};
use serde::Serialize;

use crate::trace::Launch;

/// What is replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Ember's planner, GC and scheduler.
    Ember,
    /// No pre-pull, kubelet LRU GC, Kubernetes image locality.
    Kubelet,
    /// A fixed top-K list on every node (kube-fledged), Kubernetes locality.
    FixedList,
}

impl Policy {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Ember => "ember",
            Policy::Kubelet => "kubelet-lru",
            Policy::FixedList => "fixed-top-k",
        }
    }
}

/// The modelled cluster.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimConfig {
    /// Nodes.
    pub nodes: usize,
    /// Slots per node.
    pub slots: u32,
    /// Image bytes each node's disk holds.
    pub disk_bytes: u64,
    /// Node ← cache bandwidth, bytes/s.
    pub node_bps: f64,
    /// Cache ← upstream bandwidth, bytes/s.
    pub upstream_bps: f64,
    /// Runner start once the image is there, seconds.
    pub runner_start_s: f64,
    /// How often pull plans are made, seconds.
    pub plan_interval_s: f64,
    /// Share of a node's link a pre-pull may use.
    pub prepull_share: f64,
    /// Half-life of launch counts, seconds.
    pub half_life_s: f64,
}

/// What one policy achieved.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Policy name.
    pub policy: String,
    /// Launches replayed.
    pub launches: u64,
    /// Launches whose image was complete on the node they were placed on.
    pub found_on_node: u64,
    /// Bytes nodes fetched from the cache (runs and pre-pulls).
    pub node_pulled_bytes: u64,
    /// Of those, bytes the cache already held.
    pub cache_hit_bytes: u64,
    /// Bytes the cache fetched from upstream.
    pub upstream_bytes: u64,
    /// Bytes pre-pulled.
    pub prepulled_bytes: u64,
    /// Pre-pulled bytes of images no run used on that node before they
    /// were evicted or the trace ended.
    pub prepulled_unused_bytes: u64,
    /// Modelled start latency p50, seconds.
    pub start_p50_s: f64,
    /// Modelled start latency p99, seconds.
    pub start_p99_s: f64,
}

impl Report {
    /// `found_on_node / launches`.
    pub fn found_ratio(&self) -> f64 {
        ratio(self.found_on_node, self.launches)
    }
    /// `cache_hit_bytes / node_pulled_bytes`.
    pub fn cache_hit_ratio(&self) -> f64 {
        ratio(self.cache_hit_bytes, self.node_pulled_bytes)
    }
    /// `prepulled_unused_bytes / prepulled_bytes`.
    pub fn unused_ratio(&self) -> f64 {
        ratio(self.prepulled_unused_bytes, self.prepulled_bytes)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Unique bytes of every layer in the trace: the catalogue's size.
pub fn catalogue_bytes(trace: &[Launch]) -> u64 {
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for l in trace {
        for layer in &l.layers {
            seen.insert(&layer.digest, layer.size);
        }
    }
    seen.values().sum()
}

#[derive(Debug, Default)]
struct Held {
    last_used: f64,
    in_use: u32,
    /// Bytes a pre-pull brought that no run has used yet.
    unused_prepull: u64,
}

#[derive(Debug, Default)]
struct SimNode {
    images: BTreeMap<String, Held>,
    layers: HashMap<String, u32>,
    used: u64,
    /// When the link is free of run pulls.
    run_link_free: f64,
    /// The pre-pull in progress.
    prepulling: Option<Prepull>,
    queue: VecDeque<String>,
    keep: BTreeSet<String>,
}

/// A pre-pull in flight on a node.
#[derive(Debug)]
struct Prepull {
    image: String,
    /// What it fetches.
    fetched: Fetched,
    started: f64,
    done_at: f64,
}

/// What a fetch brings to a node: bytes the cache held, bytes it had to
/// get from upstream.
#[derive(Debug, Clone, Copy, Default)]
struct Fetched {
    hit_bytes: u64,
    miss_bytes: u64,
}

impl Fetched {
    fn bytes(&self) -> u64 {
        self.hit_bytes + self.miss_bytes
    }

    /// Seconds over a node link of `bps`, upstream at `upstream_bps`.
    fn secs(&self, bps: f64, upstream_bps: f64) -> f64 {
        self.hit_bytes as f64 / bps + self.miss_bytes as f64 / bps.min(upstream_bps)
    }
}

/// Time-ordered events; ties by sequence so the replay is reproducible.
#[derive(Debug, PartialEq)]
struct Event {
    at: f64,
    seq: u64,
    kind: Kind,
}

#[derive(Debug, PartialEq)]
enum Kind {
    Finish { node: usize, image: String },
    PrepullDone { node: usize },
    Plan,
}

impl Eq for Event {}
impl Ord for Event {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .at
            .total_cmp(&self.at)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    policy: Policy,
    nodes: Vec<SimNode>,
    view: ClusterView,
    cache: BTreeSet<String>,
    catalogue: Catalogue,
    popularity: Popularity,
    recent: VecDeque<(f64, String)>,
    events: BinaryHeap<Event>,
    seq: u64,
    waiting: VecDeque<(f64, &'a Launch)>,
    starts: Vec<f64>,
    report: Report,
}

fn size_of(layers: &[Layer]) -> u64 {
    layers.iter().map(|l| l.size).sum()
}

impl<'a> Sim<'a> {
    fn push(&mut self, at: f64, kind: Kind) {
        self.seq += 1;
        self.events.push(Event {
            at,
            seq: self.seq,
            kind,
        });
    }

    fn locality(&self) -> Locality {
        match self.policy {
            Policy::Ember => Locality::MissingBytes,
            Policy::Kubelet | Policy::FixedList => Locality::Spread,
        }
    }

    /// What bringing `layers` to node `n` fetches, with the cache's
    /// bookkeeping.
    fn fetch(&mut self, n: usize, layers: &[Layer]) -> Fetched {
        let mut f = Fetched::default();
        let mut seen = BTreeSet::new();
        for l in layers {
            if self.nodes[n].layers.contains_key(&l.digest) || !seen.insert(l.digest.clone()) {
                continue;
            }
            self.report.node_pulled_bytes += l.size;
            if self.cache.contains(&l.digest) {
                self.report.cache_hit_bytes += l.size;
                f.hit_bytes += l.size;
            } else {
                self.cache.insert(l.digest.clone());
                self.report.upstream_bytes += l.size;
                f.miss_bytes += l.size;
            }
        }
        f
    }

    fn add_image(&mut self, n: usize, image: &str, layers: &[Layer], now: f64, prepulled: u64) {
        let node = &mut self.nodes[n];
        if node.images.contains_key(image) {
            return;
        }
        for l in layers {
            let c = node.layers.entry(l.digest.clone()).or_default();
            if *c == 0 {
                node.used += l.size;
            }
            *c += 1;
        }
        node.images.insert(
            image.to_owned(),
            Held {
                last_used: now,
                in_use: 0,
                unused_prepull: prepulled,
            },
        );
        self.view.nodes[n]
            .images
            .insert(image.to_owned(), size_of(layers));
    }

    fn evict(&mut self, n: usize, image: &str) {
        let Some(held) = self.nodes[n].images.remove(image) else {
            return;
        };
        self.report.prepulled_unused_bytes += held.unused_prepull;
        if let Some(layers) = self.catalogue.get(image) {
            let node = &mut self.nodes[n];
            for l in layers {
                if let Some(c) = node.layers.get_mut(&l.digest) {
                    *c -= 1;
                    if *c == 0 {
                        node.layers.remove(&l.digest);
                        node.used -= l.size;
                    }
                }
            }
        }
        self.view.nodes[n].images.remove(image);
    }

    /// GC: from the high watermark down to the low one, in the policy's
    /// order, never what is in use.
    fn gc(&mut self, n: usize, now: f64) {
        let (high, low) = (0.85, 0.80);
        let disk = self.cfg.disk_bytes as f64;
        if (self.nodes[n].used as f64) <= high * disk {
            return;
        }
        let held: Vec<HeldImage> = self.nodes[n]
            .images
            .iter()
            .map(|(d, h)| HeldImage {
                digest: d.clone(),
                last_used: (h.last_used * 1000.0) as u64,
                in_use: h.in_use > 0,
            })
            .collect();
        let now_ms = (now * 1000.0) as u64;
        let order = match self.policy {
            Policy::Ember => eviction_order(&held, &self.nodes[n].keep, |d| {
                self.popularity.score(d, now_ms)
            }),
            Policy::Kubelet => eviction_order(&held, &BTreeSet::new(), |_| 0.0),
            Policy::FixedList => eviction_order(&held, &self.nodes[n].keep, |_| 0.0),
        };
        for image in order {
            if (self.nodes[n].used as f64) <= low * disk {
                break;
            }
            self.evict(n, &image);
        }
    }

    fn launch(&mut self, now: f64, launch: &'a Launch) -> bool {
        let req = RunRequirements {
            image_digest: launch.image.clone(),
            image_bytes: Some(size_of(&launch.layers)),
            warm_key: None,
            node_selector: BTreeMap::new(),
            snapshot_key: None,
        };
        let Some(p) = place_with(&self.view, &req, self.locality()) else {
            return false;
        };
        let n: usize = p.node[1..].parse().expect("sim node ids are n<index>");
        self.view.nodes[n].active += 1;
        let found = self.nodes[n].images.contains_key(&launch.image);
        let mut ready = now;
        if found {
            self.report.found_on_node += 1;
        } else {
            self.nodes[n].queue.retain(|i| *i != launch.image);
            let secs = match self.nodes[n].prepulling.take() {
                // An in-flight pre-pull of this image becomes the run's
                // pull: what it brought so far stays, the run fetches the
                // rest at full link speed, and only what the pre-pull
                // brought counts as pre-pulled (and used).
                Some(p) if p.image == launch.image => {
                    let span = (p.done_at - p.started).max(1e-9);
                    let left = ((p.done_at - now) / span).clamp(0.0, 1.0);
                    let left_bytes = (p.fetched.bytes() as f64 * left) as u64;
                    self.report.prepulled_bytes -= left_bytes;
                    left * p.fetched.secs(self.cfg.node_bps, self.cfg.upstream_bps)
                }
                other => {
                    self.nodes[n].prepulling = other;
                    self.fetch(n, &launch.layers)
                        .secs(self.cfg.node_bps, self.cfg.upstream_bps)
                }
            };
            let start = self.nodes[n].run_link_free.max(now);
            ready = start + secs;
            self.nodes[n].run_link_free = ready;
            self.add_image(n, &launch.image, &launch.layers, now, 0);
        }
        if let Some(h) = self.nodes[n].images.get_mut(&launch.image) {
            h.in_use += 1;
            h.last_used = now;
            h.unused_prepull = 0;
        }
        // After marking it in use, so GC cannot take the run's own image.
        self.gc(n, now);
        let started = ready + self.cfg.runner_start_s;
        self.starts.push(started - now);
        self.push(
            started + launch.duration_s,
            Kind::Finish {
                node: n,
                image: launch.image.clone(),
            },
        );
        true
    }

    fn arrive(&mut self, now: f64, launch: &'a Launch) {
        self.report.launches += 1;
        self.catalogue
            .entry(launch.image.clone())
            .or_insert_with(|| launch.layers.clone());
        self.popularity.record(&launch.image, (now * 1000.0) as u64);
        self.recent.push_back((now, launch.image.clone()));
        if !self.waiting.is_empty() || !self.launch(now, launch) {
            self.waiting.push_back((now, launch));
        }
    }

    fn finish(&mut self, now: f64, n: usize, image: &str) {
        self.view.nodes[n].active -= 1;
        if let Some(h) = self.nodes[n].images.get_mut(image) {
            h.in_use = h.in_use.saturating_sub(1);
            h.last_used = now;
        }
        while let Some(&(queued_at, launch)) = self.waiting.front() {
            if !self.launch(now, launch) {
                break;
            }
            // The wait for a slot is part of this run's start.
            if let Some(last) = self.starts.last_mut() {
                *last += now - queued_at;
            }
            self.waiting.pop_front();
        }
    }

    fn next_prepull(&mut self, n: usize, now: f64) {
        if self.nodes[n].prepulling.is_some() {
            return;
        }
        while let Some(image) = self.nodes[n].queue.pop_front() {
            if self.nodes[n].images.contains_key(&image) {
                continue;
            }
            let Some(layers) = self.catalogue.get(&image).cloned() else {
                continue;
            };
            let fetched = self.fetch(n, &layers);
            let secs = fetched.secs(
                self.cfg.node_bps * self.cfg.prepull_share,
                self.cfg.upstream_bps,
            );
            self.report.prepulled_bytes += fetched.bytes();
            self.nodes[n].prepulling = Some(Prepull {
                image,
                fetched,
                started: now,
                done_at: now + secs,
            });
            self.push(now + secs, Kind::PrepullDone { node: n });
            return;
        }
    }

    fn prepull_done(&mut self, now: f64, n: usize) {
        let Some(p) = self.nodes[n].prepulling.take() else {
            return;
        };
        if p.done_at > now + 1e-9 {
            // A stale event: this pull was taken over or replaced.
            self.nodes[n].prepulling = Some(p);
            return;
        }
        if let Some(layers) = self.catalogue.get(&p.image).cloned() {
            self.add_image(n, &p.image, &layers, now, p.fetched.bytes());
            self.gc(n, now);
        }
        self.next_prepull(n, now);
    }

    fn make_plans(&mut self, now: f64) {
        let now_ms = (now * 1000.0) as u64;
        let budget = (self.cfg.disk_bytes as f64 * 0.80) as u64;
        match self.policy {
            Policy::Kubelet => {}
            Policy::Ember => {
                self.popularity.prune(now_ms);
                let ranked = self.popularity.ranked(now_ms);
                let holdings: Vec<NodeHoldings> = self
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| NodeHoldings {
                        id: format!("n{i}"),
                        budget_bytes: budget,
                        images: n
                            .images
                            .keys()
                            .cloned()
                            .chain(n.prepulling.iter().map(|p| p.image.clone()))
                            .collect(),
                        in_use: n
                            .images
                            .iter()
                            .filter(|(_, h)| h.in_use > 0)
                            .map(|(d, _)| d.clone())
                            .collect(),
                    })
                    .collect();
                let plans = plan(&holdings, &ranked, &self.catalogue, &PlanConfig::default());
                for (i, node) in self.nodes.iter_mut().enumerate() {
                    if let Some(p) = plans.get(&format!("n{i}")) {
                        node.keep = p.keep.clone();
                        node.queue = p.pulls.iter().cloned().collect();
                    }
                }
            }
            Policy::FixedList => {
                while self
                    .recent
                    .front()
                    .is_some_and(|(t, _)| *t < now - 86_400.0)
                {
                    self.recent.pop_front();
                }
                let mut counts: HashMap<&str, u64> = HashMap::new();
                for (_, img) in &self.recent {
                    *counts.entry(img.as_str()).or_default() += 1;
                }
                let mut ranked: Vec<(&str, u64)> = counts.into_iter().collect();
                ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
                let mut list = Vec::new();
                let mut layers = BTreeSet::new();
                let mut used = 0;
                for (img, _) in ranked {
                    let Some(ls) = self.catalogue.get(img) else {
                        continue;
                    };
                    let cost: u64 = ls
                        .iter()
                        .filter(|l| !layers.contains(&l.digest))
                        .map(|l| l.size)
                        .sum();
                    if used + cost > budget {
                        continue;
                    }
                    used += cost;
                    layers.extend(ls.iter().map(|l| l.digest.clone()));
                    list.push(img.to_owned());
                }
                for node in &mut self.nodes {
                    node.keep = list.iter().cloned().collect();
                    node.queue = list
                        .iter()
                        .filter(|i| !node.images.contains_key(*i))
                        .cloned()
                        .collect();
                }
            }
        }
        for n in 0..self.nodes.len() {
            self.next_prepull(n, now);
        }
    }
}

/// Replays `trace` (sorted by time, as [`crate::trace::read`] returns it)
/// under `policy`.
pub fn replay(trace: &[Launch], cfg: &SimConfig, policy: Policy) -> Report {
    let mut sim = Sim {
        cfg,
        policy,
        nodes: (0..cfg.nodes).map(|_| SimNode::default()).collect(),
        view: ClusterView {
            nodes: (0..cfg.nodes)
                .map(|i| NodeView {
                    id: format!("n{i}"),
                    slots: cfg.slots,
                    active: 0,
                    labels: BTreeMap::new(),
                    images: BTreeMap::new(),
                    idle_runners: BTreeMap::new(),
                    snapshots: Default::default(),
                })
                .collect(),
        },
        cache: BTreeSet::new(),
        catalogue: Catalogue::new(),
        popularity: Popularity::new((cfg.half_life_s * 1000.0) as u64),
        recent: VecDeque::new(),
        events: BinaryHeap::new(),
        seq: 0,
        waiting: VecDeque::new(),
        starts: Vec::with_capacity(trace.len()),
        report: Report {
            policy: policy.name().to_owned(),
            ..Report::default()
        },
    };
    let interval = match policy {
        Policy::FixedList => 900.0,
        _ => cfg.plan_interval_s.max(1.0),
    };
    if policy != Policy::Kubelet {
        sim.push(interval, Kind::Plan);
    }
    let end = trace.last().map_or(0.0, |l| l.t);
    let mut launches = trace.iter().peekable();
    loop {
        let next_event = sim.events.peek().map(|e| e.at);
        let next_launch = launches.peek().map(|l| l.t);
        match (next_event, next_launch) {
            (None, None) => break,
            (Some(e), Some(l)) if l <= e => {
                let launch = launches.next().expect("peeked");
                sim.arrive(l, launch);
            }
            (None, Some(l)) => {
                let launch = launches.next().expect("peeked");
                sim.arrive(l, launch);
            }
            (Some(_), _) => {
                let ev = sim.events.pop().expect("peeked");
                match ev.kind {
                    Kind::Finish { node, image } => sim.finish(ev.at, node, &image),
                    Kind::PrepullDone { node } => sim.prepull_done(ev.at, node),
                    Kind::Plan => {
                        sim.make_plans(ev.at);
                        if ev.at + interval <= end {
                            sim.push(ev.at + interval, Kind::Plan);
                        }
                    }
                }
            }
        }
    }
    // Whatever pre-pulled bytes no run used by the end count as unused.
    for node in &sim.nodes {
        for h in node.images.values() {
            sim.report.prepulled_unused_bytes += h.unused_prepull;
        }
    }
    let mut s = std::mem::take(&mut sim.starts);
    s.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if s.is_empty() {
            0.0
        } else {
            s[((s.len() - 1) as f64 * p).round() as usize]
        }
    };
    sim.report.start_p50_s = pct(0.50);
    sim.report.start_p99_s = pct(0.99);
    sim.report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{GenConfig, generate};

    fn cfg(nodes: usize, disk: u64) -> SimConfig {
        SimConfig {
            nodes,
            slots: 8,
            disk_bytes: disk,
            node_bps: 125e6,
            upstream_bps: 50e6,
            runner_start_s: 0.3,
            plan_interval_s: 300.0,
            prepull_share: 0.5,
            half_life_s: 6.0 * 3600.0,
        }
    }

    #[test]
    fn every_launch_is_replayed_and_accounted() {
        let trace = generate(&GenConfig {
            days: 1.0,
            launches_per_day: 3000.0,
            ..GenConfig::default()
        });
        let disk = (catalogue_bytes(&trace) as f64 * 0.3) as u64;
        for policy in [Policy::Ember, Policy::Kubelet, Policy::FixedList] {
            let r = replay(&trace, &cfg(10, disk), policy);
            assert_eq!(r.launches, trace.len() as u64, "{policy:?}");
            assert!(r.found_on_node <= r.launches);
            assert!(r.cache_hit_bytes <= r.node_pulled_bytes);
            assert!(r.prepulled_unused_bytes <= r.prepulled_bytes, "{r:?}");
            assert!(
                r.start_p50_s >= 0.3 && r.start_p99_s >= r.start_p50_s,
                "{r:?}"
            );
            if policy == Policy::Kubelet {
                assert_eq!(r.prepulled_bytes, 0);
            }
        }
    }

    #[test]
    fn planning_finds_more_images_on_node_than_no_pre_pull() {
        let trace = generate(&GenConfig {
            days: 2.0,
            launches_per_day: 6000.0,
            ..GenConfig::default()
        });
        let disk = (catalogue_bytes(&trace) as f64 * 0.3) as u64;
        let ember = replay(&trace, &cfg(20, disk), Policy::Ember);
        let kubelet = replay(&trace, &cfg(20, disk), Policy::Kubelet);
        assert!(
            ember.found_ratio() > kubelet.found_ratio(),
            "ember {:.3} kubelet {:.3}",
            ember.found_ratio(),
            kubelet.found_ratio()
        );
    }
}
