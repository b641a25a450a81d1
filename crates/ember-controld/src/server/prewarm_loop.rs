//! The pre-warmer: woken through [`AppState::prewarm`](super::AppState),
//! it plans warm runners over the connected nodes and pushes the orders
//! on their work streams.

use ember_control::model::RunState;
use ember_control::schedule::ClusterView;
use ember_control::store::RunFilter;

use super::Shared;
use crate::prewarm;

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
                    s.push(&o.node, o.message());
                }
            }
            Err(e) => tracing::warn!(error = %e, "planning warm runners failed"),
        }
    }
}
