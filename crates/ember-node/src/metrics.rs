//! The node's own `/metrics` (Prometheus text format 0.0.4), on a
//! listener of its own ([`NodeAgentConfig::metrics_listen`](crate::NodeAgentConfig::metrics_listen),
//! off by default): the node has no HTTP server otherwise (it is the
//! control plane's client), and a scrape must not go through the control
//! plane to see a node the control plane cannot reach.
//!
//! There is no token on it: it says how busy the node is, nothing about
//! what runs there, and it is meant for a loopback or private address
//! (`--metrics-listen 127.0.0.1:9464`).
//!
//! Gauges are read at scrape time (the pool's counts, the store's bytes
//! and free space); the counters are kept here, updated where the event
//! happens (a lease taken, a pull started and ended).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use ember_http::prom::{CONTENT_TYPE, Text};

use crate::NodeError;
use crate::agent::NodeAgent;

/// The node's event counters, on [`NodeAgent::metrics`].
#[derive(Debug, Default)]
pub(crate) struct NodeMetrics {
    /// Image pulls running now.
    pulls_in_flight: AtomicI64,
    /// Image pulls started.
    pulls: AtomicU64,
    /// Runs whose runner was an idle (warm) one.
    warm_hits: AtomicU64,
    /// Runs whose runner had to be created.
    warm_misses: AtomicU64,
}

/// Counts a pull while it runs; made by [`NodeMetrics::pull`], the pull
/// is over when it is dropped (whatever the outcome).
pub(crate) struct PullGuard<'a>(&'a NodeMetrics);

impl Drop for PullGuard<'_> {
    fn drop(&mut self) {
        self.0.pulls_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl NodeMetrics {
    /// A pull starts.
    pub(crate) fn pull(&self) -> PullGuard<'_> {
        self.pulls.fetch_add(1, Ordering::Relaxed);
        self.pulls_in_flight.fetch_add(1, Ordering::Relaxed);
        PullGuard(self)
    }

    /// A run got its runner: an idle one (`reused`) or a new one.
    pub(crate) fn lease(&self, reused: bool) {
        let c = if reused {
            &self.warm_hits
        } else {
            &self.warm_misses
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The exposition of `agent` now. Blocking (reads the store's index).
fn render(agent: &NodeAgent) -> String {
    let m = &agent.metrics;
    let pool = agent.pool.stats();
    let store_bytes = agent
        .store
        .read_index()
        .map(|ix| ix.bytes_of(ix.images.values()))
        .unwrap_or(0);
    let node = agent.cfg.id.as_str();
    let l = [("node", node)];
    let mut t = Text::new();
    let gauge = |t: &mut Text, name: &str, help: &str, v: f64| {
        t.family(name, "gauge", help);
        t.sample(name, &l, v);
    };
    gauge(
        &mut t,
        "ember_node_slots",
        "Runs the node executes at once.",
        agent.cfg.slots as f64,
    );
    let runs = agent.runs.lock().unwrap_or_else(|e| e.into_inner()).len();
    gauge(
        &mut t,
        "ember_node_runs_active",
        "Runs executing on the node now (from assignment to exit).",
        runs as f64,
    );
    t.family(
        "ember_node_runners",
        "gauge",
        "The warm pool's runners by state: busy (leased to a run), idle (warm, not frozen), \
         frozen (idle and frozen), creating.",
    );
    for (state, n) in [
        ("busy", pool.leased),
        ("idle", pool.idle.saturating_sub(pool.frozen)),
        ("frozen", pool.frozen),
        ("creating", pool.creating),
    ] {
        t.sample(
            "ember_node_runners",
            &[("node", node), ("state", state)],
            n as f64,
        );
    }
    gauge(
        &mut t,
        "ember_node_pulls_in_flight",
        "Image pulls running now.",
        m.pulls_in_flight.load(Ordering::Relaxed).max(0) as f64,
    );
    let counter = |t: &mut Text, name: &str, help: &str, v: u64| {
        t.family(name, "counter", help);
        t.sample(name, &l, v as f64);
    };
    counter(
        &mut t,
        "ember_node_pulls_total",
        "Image pulls started.",
        m.pulls.load(Ordering::Relaxed),
    );
    counter(
        &mut t,
        "ember_node_warm_pool_hits_total",
        "Runs that got an idle (warm) runner.",
        m.warm_hits.load(Ordering::Relaxed),
    );
    counter(
        &mut t,
        "ember_node_warm_pool_misses_total",
        "Runs whose runner had to be created.",
        m.warm_misses.load(Ordering::Relaxed),
    );
    counter(
        &mut t,
        "ember_node_runners_prewarmed_total",
        "Runners created idle for pre-warm orders.",
        pool.prewarmed,
    );
    gauge(
        &mut t,
        "ember_node_snapshot_spares",
        "Restored copies of snapshot deployments ready for a run (agent connected, \
         start-up parked before Resume): prepared ahead, or kept after a run.",
        agent.snapshots.spares_held() as f64,
    );
    t.family(
        "ember_node_snapshot_runs_total",
        "counter",
        "Runs of snapshot deployments with a checkpoint here, by how their copy was \
         restored: from a prepared copy (spare), on demand, or by a copy that served a \
         run before and parked itself again (reused).",
    );
    for (how, n) in [
        ("spare", &agent.snapshots.from_spare),
        ("on_demand", &agent.snapshots.on_demand_total),
        ("reused", &agent.snapshots.reused),
    ] {
        t.sample(
            "ember_node_snapshot_runs_total",
            &[("node", node), ("restore", how)],
            n.load(Ordering::Relaxed) as f64,
        );
    }
    gauge(
        &mut t,
        "ember_node_store_bytes",
        "Bytes of the images' layers in the node's store.",
        store_bytes as f64,
    );
    gauge(
        &mut t,
        "ember_node_store_free_bytes",
        "Free bytes on the store's disk.",
        agent.store.free_bytes().unwrap_or(0) as f64,
    );
    t.finish()
}

/// Binds `addr` (at start, so a taken port fails the node at once).
pub(crate) async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, NodeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Io {
            what: "binding the metrics listener",
            path: addr.to_string().into(),
            source,
        })
}

/// Serves `GET /metrics` on `listener` until aborted.
pub(crate) async fn serve(agent: Arc<NodeAgent>, listener: tokio::net::TcpListener) {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(agent);
    ember_http::Server::new(ember_http::Limits::new())
        .serve(listener, app, std::future::pending())
        .await;
}

async fn scrape(State(agent): State<Arc<NodeAgent>>) -> impl IntoResponse {
    let body = tokio::task::spawn_blocking(move || render(&agent))
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body)
}
