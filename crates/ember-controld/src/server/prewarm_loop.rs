//! The pre-warmer: woken through [`AppState::prewarm`](super::AppState),
//! it plans warm runners over the connected nodes and pushes the orders
//! on their work streams.

use ember_api::wire::WorkMessage;
use ember_control::model::RunState;
use ember_control::prewarm::{self, Order};
use ember_control::schedule::ClusterView;
use ember_control::store::RunFilter;

use super::Shared;

/// The work-stream message that carries `order` to its node.
fn message(order: &Order) -> WorkMessage {
    WorkMessage::Prewarm {
        deployment: order.deployment.clone(),
        key: order.key.clone(),
        image: order.image.clone(),
        resources: order.resources.clone(),
        recycle_key: order.recycle_key.clone(),
        readonly_rootfs: order.readonly_rootfs,
        count: order.count,
    }
}

/// Brings deployments up to their warm runners whenever woken: pushes the
/// [`prewarm::plan`] orders on the nodes' streams. Orders are targets, so
/// a wake-up that repeats one (the node has not reported the runners yet)
/// creates nothing twice.
pub(super) async fn prewarm_loop(s: Shared) {
    loop {
        s.prewarm.notified().await;
        let connected = s.connected_nodes();
        if connected.is_empty() {
            continue;
        }
        let stale = u64::try_from(s.config.heartbeat_timeout.as_millis()).unwrap_or(u64::MAX);
        let now = s.clock.now();
        let planned = s
            .db(move |st| {
                let deployments: Vec<_> = st
                    .list_deployments()?
                    .into_iter()
                    .filter(|d| d.spec.warm_runners > 0)
                    .collect();
                if deployments.is_empty() {
                    return Ok(Vec::new());
                }
                let nodes: Vec<_> = st
                    .list_nodes()?
                    .into_iter()
                    .filter(|n| connected.contains(&n.spec.id))
                    .collect();
                let active = st.list_runs(&RunFilter {
                    states: vec![RunState::Scheduled, RunState::Starting, RunState::Running],
                    ..RunFilter::default()
                })?;
                let view = ClusterView::build(&nodes, &active, now, stale);
                Ok(prewarm::plan(&view, &deployments))
            })
            .await;
        match planned {
            Ok(orders) => {
                for o in orders {
                    tracing::debug!(node = %o.node, deployment = %o.deployment, count = o.count, "pre-warm");
                    s.push(&o.node, message(&o));
                }
            }
            Err(e) => {
                tracing::warn!(error = %ember_error::chain(&e), "planning warm runners failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_control::model::{Deployment, DeploymentSpec, PinnedImage, Resources};
    use ember_control::schedule::NodeView;

    /// A planned order goes out as the `prewarm` message with its count
    /// and key.
    #[test]
    fn an_order_becomes_its_prewarm_message() {
        let d = Deployment {
            spec: DeploymentSpec {
                caches: Vec::new(),
                name: "web".into(),
                image: PinnedImage::new("app", format!("sha256:{}", "a".repeat(64))).expect("pin"),
                command: vec![],
                env: Default::default(),
                resources: Resources::default(),
                recycle_key: None,
                readonly_rootfs: false,
                warm_runners: 1,
                node_selector: Default::default(),
                snapshot: false,
            },
            created_at: 1,
        };
        let view = ClusterView {
            nodes: vec![NodeView {
                id: "n1".into(),
                slots: 4,
                active: 0,
                labels: Default::default(),
                images: Default::default(),
                idle_runners: Default::default(),
                snapshots: Default::default(),
            }],
        };
        let orders = prewarm::plan(&view, std::slice::from_ref(&d));
        assert_eq!(orders.len(), 1);
        assert!(matches!(
            message(&orders[0]),
            WorkMessage::Prewarm { count: 1, .. }
        ));
        let WorkMessage::Prewarm {
            key, deployment, ..
        } = message(&orders[0])
        else {
            unreachable!("checked above")
        };
        assert_eq!((key, deployment.as_str()), (prewarm::warm_key(&d), "web"));
    }
}
