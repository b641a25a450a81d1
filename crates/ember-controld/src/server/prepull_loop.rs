//! The pre-puller: launch statistics per image (and deployment) from the
//! runs the store records, and every [`ServerConfig::prepull_interval`]
//! (or at once when a node connects) a [`pullplan::plan`] over the
//! connected nodes, pushed to each as a `{"type":"pull_plan"}` line.
//!
//! A plan is pushed only when it differs from the last one pushed on the
//! node's stream; a new stream gets the node's plan at once, unless it is
//! empty (a node with nothing planned hears nothing).
//!
//! The statistics are rebuilt from every stored run when the loop starts,
//! so a restarted control plane does not forget what was launched, and
//! then fed each round with the runs submitted since (newest first, down
//! to the last run already counted), each counted at its submit time.
//!
//! The catalogue (image → layers) comes from what nodes report: each
//! holder lists an image's layers with their bytes in its inventory, so a
//! layer shared by several images is counted once, as on the node's disk.
//! An image no node holds has no known size and is not planned until some
//! run has pulled it somewhere.
//!
//! [`ServerConfig::prepull_interval`]: super::ServerConfig::prepull_interval

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ember_api::wire::{PlannedPull, WorkMessage};
use ember_control::model::{Node, NodeId, PinnedImage, Run, RunId, RunState};
use ember_control::popularity::Popularity;
use ember_control::pullplan::{self, Catalogue, Layer, NodeHoldings, NodePlan, PlanConfig};
use ember_control::store::RunFilter;
use ember_control::{StateStore, StoreError};

use super::Shared;

/// Runs read per page while catching up with new submits.
const PAGE: usize = 500;

/// Launch statistics and what the planner needs to name images.
#[derive(Debug)]
pub(super) struct LaunchStats {
    /// Decayed launches per image manifest digest.
    pub(super) images: Popularity,
    /// Decayed launches per deployment name.
    pub(super) deployments: Popularity,
    /// The reference each image was last launched by, for the node's pull.
    references: BTreeMap<String, PinnedImage>,
    /// The newest run counted.
    last: Option<RunId>,
}

impl LaunchStats {
    /// Empty statistics with the given half-life.
    pub(super) fn new(half_life_ms: u64) -> Self {
        LaunchStats {
            images: Popularity::new(half_life_ms),
            deployments: Popularity::new(half_life_ms),
            references: BTreeMap::new(),
            last: None,
        }
    }

    /// Counts one launch.
    fn record(&mut self, run: &Run) {
        self.images.record(&run.image.digest, run.submitted_at);
        if let Some(d) = &run.deployment {
            self.deployments.record(d, run.submitted_at);
        }
        self.references
            .entry(run.image.digest.clone())
            .or_insert_with(|| run.image.clone());
    }

    /// Counts the runs submitted since the last call (all stored runs, the
    /// first time), oldest first.
    pub(super) fn catch_up(&mut self, st: &dyn StateStore) -> Result<usize, StoreError> {
        let mut new: Vec<Run> = Vec::new();
        let mut before = None;
        'pages: loop {
            let page = st.list_runs(&RunFilter {
                limit: Some(PAGE),
                before,
                ..RunFilter::default()
            })?;
            let full = page.len() == PAGE;
            for run in page {
                if self.last.is_some_and(|l| run.id <= l) {
                    break 'pages;
                }
                before = Some(run.id);
                new.push(run);
            }
            if !full {
                break;
            }
        }
        let n = new.len();
        for run in new.iter().rev() {
            self.record(run);
        }
        if let Some(newest) = new.first() {
            self.last = Some(newest.id);
        }
        Ok(n)
    }
}

/// What a node's inventory says, as the planner needs it; `in_use` are the
/// images of runs active on it.
fn holdings(node: &Node, in_use: BTreeSet<String>) -> NodeHoldings {
    let inv = &node.spec.inventory;
    let held: u64 = inv.images.values().sum();
    NodeHoldings {
        id: node.spec.id.clone(),
        budget_bytes: inv
            .image_budget_bytes
            .unwrap_or_else(|| held.saturating_add(inv.free_disk_bytes)),
        images: inv
            .images
            .keys()
            .chain(inv.pulling.keys())
            .cloned()
            .collect(),
        in_use,
    }
}

/// Image → its layers as a node holding it reports them; an image only
/// reported without layers (an older node, or one being pulled) is one
/// layer of the largest size any node reports for it.
fn catalogue(nodes: &[Node]) -> Catalogue {
    let mut cat = Catalogue::new();
    let mut sizes: BTreeMap<&str, u64> = BTreeMap::new();
    for n in nodes {
        let inv = &n.spec.inventory;
        for (d, layers) in &inv.image_layers {
            cat.entry(d.clone()).or_insert_with(|| {
                layers
                    .iter()
                    .map(|l| Layer {
                        digest: l.diff_id.clone(),
                        size: l.bytes,
                    })
                    .collect()
            });
        }
        for (d, b) in inv.images.iter().chain(&inv.pulling) {
            let s = sizes.entry(d.as_str()).or_default();
            *s = (*s).max(*b);
        }
    }
    for (d, size) in sizes {
        cat.entry(d.to_owned()).or_insert_with(|| {
            vec![Layer {
                digest: d.to_owned(),
                size,
            }]
        });
    }
    cat
}

/// Plans every node in `nodes`; `active` are the runs scheduled, starting
/// or running.
pub(super) fn plan_nodes(
    stats: &LaunchStats,
    nodes: &[Node],
    active: &[Run],
    now: u64,
    cfg: &PlanConfig,
) -> BTreeMap<NodeId, NodePlan> {
    let mut in_use: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for r in active {
        if let Some(n) = &r.node {
            in_use
                .entry(n.as_str())
                .or_default()
                .insert(r.image.digest.clone());
        }
    }
    let holdings: Vec<NodeHoldings> = nodes
        .iter()
        .map(|n| holdings(n, in_use.remove(n.spec.id.as_str()).unwrap_or_default()))
        .collect();
    let ranked = stats.images.ranked(now);
    let mut plans = pullplan::plan(&holdings, &ranked, &catalogue(nodes), cfg);
    // An image a run uses that the node does not hold yet is the run's
    // to pull, and the node's GC protects what its runs use by itself:
    // the plan need not name it (so a node with nothing held and nothing
    // planned is sent nothing).
    for h in &holdings {
        if let Some(p) = plans.get_mut(&h.id) {
            p.keep
                .retain(|d| !h.in_use.contains(d) || h.images.contains(d));
        }
    }
    plans
}

/// The `pull_plan` line for one node's plan.
pub(super) fn message(stats: &LaunchStats, plan: &NodePlan, cat: &Catalogue) -> WorkMessage {
    WorkMessage::PullPlan {
        pulls: plan
            .pulls
            .iter()
            .filter_map(|d| {
                stats.references.get(d).map(|image| PlannedPull {
                    image: image.clone(),
                    bytes: cat.get(d).map_or(0, |l| l.iter().map(|l| l.size).sum()),
                })
            })
            .collect(),
        keep: plan.keep.iter().cloned().collect(),
    }
}

/// The plan last pushed on each node's stream: a plan goes out only when
/// it differs from it, and a new stream (a node that joined or
/// reconnected) gets its plan at once unless it is empty.
#[derive(Default)]
struct Sent(HashMap<NodeId, (u64, WorkMessage)>);

impl Sent {
    /// Whether `msg` is news for `node`'s current stream; remembers it.
    fn changed(&mut self, s: &Shared, node: &NodeId, msg: &WorkMessage) -> bool {
        let conn = {
            let streams = s.streams.lock().unwrap_or_else(|e| e.into_inner());
            match streams.get(node) {
                Some(w) => w.conn,
                None => return false,
            }
        };
        let empty = matches!(msg, WorkMessage::PullPlan { pulls, keep } if pulls.is_empty() && keep.is_empty());
        let news = match self.0.get(node) {
            Some((c, last)) if *c == conn => last != msg,
            _ => !empty,
        };
        if news || self.0.get(node).is_none_or(|(c, _)| *c != conn) {
            self.0.insert(node.clone(), (conn, msg.clone()));
        }
        news
    }
}

/// Every interval, or when a node connects: counts new launches, plans,
/// and pushes each connected node its plan.
pub(super) async fn prepull_loop(s: Shared) {
    let Some(interval) = s.config.prepull_interval else {
        return;
    };
    let cfg = s.config.prepull;
    let mut stats = Some(LaunchStats::new(s.config.popularity_half_life_ms));
    let mut sent = Sent::default();
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = s.prepull.notified() => {}
            }
        }
        first = false;
        let connected = s.connected_nodes();
        let now = s.clock.now();
        let Some(mut st) = stats.take() else { return };
        let res = s
            .db(move |store| {
                let counted = st.catch_up(store);
                let r = counted.and_then(|n| {
                    let nodes: Vec<Node> = store
                        .list_nodes()?
                        .into_iter()
                        .filter(|n| connected.contains(&n.spec.id))
                        .collect();
                    let active = store.list_runs(&RunFilter {
                        states: vec![RunState::Scheduled, RunState::Starting, RunState::Running],
                        ..RunFilter::default()
                    })?;
                    let cat = catalogue(&nodes);
                    let plans = plan_nodes(&st, &nodes, &active, now, &cfg);
                    let msgs: Vec<(NodeId, WorkMessage)> = plans
                        .iter()
                        .map(|(id, p)| (id.clone(), message(&st, p, &cat)))
                        .collect();
                    Ok((n, msgs))
                });
                st.images.prune(now);
                st.deployments.prune(now);
                Ok((st, r))
            })
            .await;
        match res {
            Ok((st, Ok((counted, msgs)))) => {
                stats = Some(st);
                if counted > 0 {
                    tracing::debug!(counted, "launches counted");
                }
                for (node, msg) in msgs {
                    if !sent.changed(&s, &node, &msg) {
                        continue;
                    }
                    if let WorkMessage::PullPlan { pulls, keep } = &msg {
                        tracing::debug!(%node, pulls = pulls.len(), keep = keep.len(), "pull plan");
                    }
                    s.push(&node, msg);
                }
            }
            Ok((st, Err(e))) => {
                stats = Some(st);
                tracing::warn!(error = %ember_error::chain(&e), "planning pre-pulls failed");
            }
            Err(e) => {
                // The store task itself failed: start the statistics over
                // from the store next round rather than stop planning.
                tracing::warn!(error = %ember_error::chain(&e), "planning pre-pulls failed");
                stats = Some(LaunchStats::new(s.config.popularity_half_life_ms));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_control::model::{Inventory, NodeSpec};

    fn node(id: &str, images: &[(&str, u64)], budget: u64) -> Node {
        Node {
            spec: NodeSpec {
                id: id.into(),
                slots: 2,
                labels: Default::default(),
                inventory: Inventory {
                    images: images.iter().map(|(d, b)| (d.to_string(), *b)).collect(),
                    image_budget_bytes: Some(budget),
                    ..Inventory::default()
                },
            },
            last_heartbeat: 0,
        }
    }

    /// Launches on one node make the image a pull for the other, and a
    /// pull line carries its reference and size.
    #[test]
    fn launches_on_one_node_plan_a_pull_on_the_other() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let image = PinnedImage::new("app", &digest).expect("pin");
        let mut stats = LaunchStats::new(3_600_000);
        for i in 0..3 {
            stats.record(&Run {
                cache_notes: Vec::new(),
                caches: Vec::new(),
                id: RunId(i + 1),
                deployment: Some("web".into()),
                image: image.clone(),
                command: vec![],
                env: Default::default(),
                resources: Default::default(),
                recycle_key: None,
                readonly_rootfs: false,
                node_selector: Default::default(),
                timeout_ms: None,
                idempotency_key: None,
                attempts: 1,
                max_attempts: 1,
                state: RunState::Succeeded,
                node: Some("a".into()),
                exit_code: Some(0),
                error: None,
                submitted_at: 1000,
                times: Default::default(),
                snapshot: None,
            });
        }
        let nodes = [node("a", &[(&digest, 100)], 1000), node("b", &[], 1000)];
        let cfg = PlanConfig {
            replication: 2.0,
            ..PlanConfig::default()
        };
        assert!((stats.deployments.score("web", 1000) - 3.0).abs() < 1e-9);
        let plans = plan_nodes(&stats, &nodes, &[], 1000, &cfg);
        assert_eq!(plans["b"].pulls, std::slice::from_ref(&digest));
        assert!(plans["a"].pulls.is_empty() && plans["a"].keep.contains(&digest));
        let WorkMessage::PullPlan { pulls, keep } =
            message(&stats, &plans["b"], &catalogue(&nodes))
        else {
            unreachable!("message makes pull plans")
        };
        assert_eq!((pulls[0].image.clone(), pulls[0].bytes), (image, 100));
        assert_eq!(keep, [digest]);
    }
}
