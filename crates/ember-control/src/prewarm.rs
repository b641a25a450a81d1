//! Pre-warming: which nodes should keep idle runners of which deployment
//! ready before any run of it arrives.
//!
//! [`plan`] is a pure function of a [`ClusterView`] (nodes, their free
//! slots, images and idle runners by warm key) and the deployments, like
//! [`crate::schedule::place`]. The control server runs it when a
//! deployment is created and when a node connects or heartbeats, and
//! pushes each [`Order`] as a `prewarm` message on the node's work stream
//! (the wire form is the server's business, not this crate's). An order is
//! a target ("keep `count` idle runners of this key"), not a delta, so
//! repeating it until the node's inventory shows the runners never creates
//! too many.
//!
//! For each deployment wanting `warm_runners` idle runners, the shortfall
//! (wanted minus idle runners of its key on nodes matching its selector) is
//! handed out one runner at a time to the candidate node with, in order:
//! the fewest runners of the key (spread), the image already present,
//! the most free slots, the lower id. A node keeps at most `slots` idle
//! runners over all keys, so pre-warming never pushes the node's pool past
//! its budget (which would evict runners and be re-ordered at the next
//! heartbeat, churning forever).

use std::collections::HashMap;

use crate::model::{Deployment, NodeId, PinnedImage, Resources};
use crate::schedule::{ClusterView, NodeView};

/// Keep `count` idle runners of one deployment's key on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// The node.
    pub node: NodeId,
    /// The deployment.
    pub deployment: String,
    /// Its warm key.
    pub key: String,
    /// Idle runners wanted on the node (at least what it has now plus one).
    pub count: u32,
    /// The deployment's image.
    pub image: PinnedImage,
    /// The deployment's resources.
    pub resources: Resources,
    /// The deployment's recycling key.
    pub recycle_key: Option<String>,
    /// The deployment's read-only root filesystem.
    pub readonly_rootfs: bool,
}

/// The warm key runs of `d` get ([`crate::model::Run::warm_key`]).
pub fn warm_key(d: &Deployment) -> String {
    d.spec.warm_key()
}

/// The orders that bring every deployment up to its warm runners; see the
/// module docs for how nodes are chosen. Deployments are served in name
/// order when nodes run out of room.
pub fn plan(view: &ClusterView, deployments: &[Deployment]) -> Vec<Order> {
    // Idle runners each node may still take (over all keys), updated as
    // runners are handed out.
    let mut room: HashMap<&str, u32> = view
        .nodes
        .iter()
        .map(|n| {
            let idle: u32 = n.idle_runners.values().sum();
            (n.id.as_str(), n.slots.saturating_sub(idle))
        })
        .collect();
    let mut deployments: Vec<&Deployment> = deployments
        .iter()
        .filter(|d| d.spec.warm_runners > 0)
        .collect();
    deployments.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    let mut orders = Vec::new();
    for d in deployments {
        let key = warm_key(d);
        let candidates: Vec<&NodeView> = view
            .nodes
            .iter()
            .filter(|n| n.matches(&d.spec.node_selector))
            .collect();
        let have: Vec<u32> = candidates
            .iter()
            .map(|n| n.idle_runners.get(&key).copied().unwrap_or(0))
            .collect();
        let mut target = have.clone();
        let total: u32 = have.iter().sum();
        for _ in total..d.spec.warm_runners {
            let best = candidates
                .iter()
                .enumerate()
                .filter(|(_, n)| room.get(n.id.as_str()).copied().unwrap_or(0) > 0)
                .min_by_key(|(i, n)| {
                    let has_image = n.images.get(&d.spec.image.digest).copied().unwrap_or(0) > 0;
                    (
                        target[*i],
                        !has_image,
                        std::cmp::Reverse(n.free()),
                        n.id.as_str(),
                    )
                })
                .map(|(i, _)| i);
            let Some(i) = best else { break };
            target[i] += 1;
            if let Some(r) = room.get_mut(candidates[i].id.as_str()) {
                *r -= 1;
            }
        }
        for (i, n) in candidates.iter().enumerate() {
            if target[i] > have[i] {
                orders.push(Order {
                    node: n.id.clone(),
                    deployment: d.spec.name.clone(),
                    key: key.clone(),
                    count: target[i],
                    image: d.spec.image.clone(),
                    resources: d.spec.resources.clone(),
                    recycle_key: d.spec.recycle_key.clone(),
                    readonly_rootfs: d.spec.readonly_rootfs,
                });
            }
        }
    }
    orders
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::DeploymentSpec;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn deployment(name: &str, image: char, warm: u32) -> Deployment {
        Deployment {
            spec: DeploymentSpec {
                caches: Vec::new(),
                name: name.into(),
                image: PinnedImage::new("app", digest(image)).expect("pin"),
                command: vec![],
                env: BTreeMap::new(),
                resources: Resources::default(),
                recycle_key: None,
                readonly_rootfs: false,
                warm_runners: warm,
                node_selector: BTreeMap::new(),
                snapshot: false,
            },
            created_at: 1,
        }
    }

    fn node(id: &str, slots: u32) -> NodeView {
        NodeView {
            id: id.into(),
            slots,
            active: 0,
            labels: BTreeMap::new(),
            images: BTreeMap::new(),
            idle_runners: BTreeMap::new(),
            snapshots: Default::default(),
        }
    }

    fn counts(orders: &[Order]) -> Vec<(&str, u32)> {
        orders.iter().map(|o| (o.node.as_str(), o.count)).collect()
    }

    #[test]
    fn prefers_the_node_with_the_image_then_spreads() {
        let d = deployment("web", 'a', 1);
        let mut n2 = node("n2", 4);
        n2.images.insert(digest('a'), 100);
        let view = ClusterView {
            nodes: vec![node("n1", 4), n2],
        };
        let orders = plan(&view, std::slice::from_ref(&d));
        assert_eq!(counts(&orders), vec![("n2", 1)]);
        assert_eq!(orders[0].key, warm_key(&d));

        let d3 = deployment("web", 'a', 3);
        assert_eq!(
            counts(&plan(&view, &[d3])),
            vec![("n1", 1), ("n2", 2)],
            "spread first, the image breaks the tie"
        );
    }

    #[test]
    fn nothing_when_enough_are_idle_and_targets_include_what_is_there() {
        let d = deployment("web", 'a', 2);
        let key = warm_key(&d);
        let mut n1 = node("n1", 4);
        n1.idle_runners.insert(key.clone(), 2);
        let view = ClusterView {
            nodes: vec![n1.clone(), node("n2", 4)],
        };
        assert!(plan(&view, std::slice::from_ref(&d)).is_empty());

        n1.idle_runners.insert(key, 1);
        let view = ClusterView {
            nodes: vec![n1, node("n2", 4)],
        };
        assert_eq!(counts(&plan(&view, &[d])), vec![("n2", 1)]);
    }

    #[test]
    fn respects_selectors_room_and_zero() {
        let mut d = deployment("gpu", 'a', 5);
        d.spec.node_selector.insert("gpu".into(), "yes".into());
        let mut g = node("g", 2);
        g.labels.insert("gpu".into(), "yes".into());
        // One slot's worth of room is taken by another key's idle runner.
        g.idle_runners.insert("other".into(), 1);
        let view = ClusterView {
            nodes: vec![node("plain", 8), g],
        };
        assert_eq!(
            counts(&plan(&view, &[d, deployment("cold", 'b', 0)])),
            vec![("g", 1)],
            "only the labelled node, only up to its slots"
        );
    }

    #[test]
    fn recycle_key_and_resources_are_part_of_the_key() {
        let a = deployment("a", 'a', 1);
        let mut b = a.clone();
        b.spec.recycle_key = Some("tenant".into());
        let mut c = a.clone();
        c.spec.resources.memory_bytes = 1 << 28;
        assert_ne!(warm_key(&a), warm_key(&b));
        assert_ne!(warm_key(&a), warm_key(&c));
    }
}
