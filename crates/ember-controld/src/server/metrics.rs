//! `GET /metrics`: the control plane in the Prometheus text format.
//!
//! Two kinds of figure:
//!
//! * **Events, counted where they happen** (this replica's own, as
//!   Prometheus expects of a counter; sum over replicas in the query):
//!   runs submitted, runs whose process started, runs finished by outcome,
//!   and each started run's start time by phase as a histogram. The
//!   phases are [`ember_control::phase`]'s, the same ones `ember runs
//!   --stats` and `ember bench burst` print.
//! * **State, read from the store at scrape time** (the same on every
//!   replica): queued runs per deployment, nodes by state, and each
//!   node's slots, idle runners, images and free disk as last reported.
//!
//! The endpoint sits behind the client token like the rest of the client
//! API (it names deployments and nodes); a Prometheus scrape job sends it
//! with `authorization: {credentials_file: ...}` (a bearer token).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use ember_api::wire::RunReports;
use ember_control::model::{NodeReport, Run, RunState};
use ember_control::phase::{self, Phase};
use ember_control::store::RunFilter;
use ember_http::prom::{CONTENT_TYPE, Histogram, START_BUCKETS, Text};

use super::{ApiError, Shared};

/// The phases measured: consecutive, then the whole start.
const PHASES: [Phase; phase::PHASES.len()] = phase::PHASES;

/// Outcomes of a finished run, as the `outcome` label spells them.
const OUTCOMES: [RunState; 4] = [
    RunState::Succeeded,
    RunState::Failed,
    RunState::Cancelled,
    RunState::Lost,
];

/// This replica's event counters; one per server, on the shared state.
#[derive(Debug)]
pub(super) struct ControlMetrics {
    submitted: AtomicU64,
    started: AtomicU64,
    /// Indexed like [`OUTCOMES`].
    finished: [AtomicU64; 4],
    /// Indexed like [`PHASES`].
    phases: Vec<Histogram>,
    /// The HTTP server's connection counters, once it serves.
    pub(super) http: OnceLock<Arc<ember_http::Stats>>,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        ControlMetrics {
            submitted: AtomicU64::new(0),
            started: AtomicU64::new(0),
            finished: Default::default(),
            phases: PHASES
                .iter()
                .map(|_| Histogram::new(START_BUCKETS))
                .collect(),
            http: OnceLock::new(),
        }
    }
}

/// What a batch of reports says, kept before the batch goes to the
/// store: per entry, whether it reported the process start and whether it
/// reported an end.
pub(super) type ReportKinds = Vec<(bool, bool)>;

impl ControlMetrics {
    /// `n` new runs were stored (idempotent repeats are not counted).
    pub(super) fn submitted(&self, n: usize) {
        self.submitted.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A run reached a final state through this replica.
    pub(super) fn finished(&self, state: RunState) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == state) {
            self.finished[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A run's process started: counts it and records its phases.
    fn started(&self, run: &Run) {
        self.started.fetch_add(1, Ordering::Relaxed);
        for (p, h) in PHASES.iter().zip(&self.phases) {
            if let Some(ms) = (p.of)(&run.times) {
                h.observe(ms as f64 / 1e3);
            }
        }
    }

    /// What each entry of `batch` reports, for [`ControlMetrics::reported`].
    pub(super) fn kinds(batch: &[RunReports]) -> ReportKinds {
        batch
            .iter()
            .map(|b| {
                let started = b.reports.iter().any(|r| matches!(r, NodeReport::Started));
                let ended = b.reports.iter().any(|r| {
                    matches!(
                        r,
                        NodeReport::Exited { .. }
                            | NodeReport::Failed { .. }
                            | NodeReport::Lost { .. }
                    )
                });
                (started, ended)
            })
            .collect()
    }

    /// Counts the starts and ends a batch of reports made (its entries'
    /// `kinds`, and the runs after the store applied it).
    pub(super) fn reported<E>(&self, kinds: &ReportKinds, out: &[Result<Run, E>]) {
        for ((started, ended), r) in kinds.iter().zip(out) {
            let Ok(run) = r else { continue };
            if *started && run.times.process_started.is_some() {
                self.started(run);
            }
            if *ended && run.state.is_final() {
                self.finished(run.state);
            }
        }
    }

    fn render_events(&self, t: &mut Text) {
        t.single(
            "ember_control_runs_submitted_total",
            "counter",
            "Runs stored by this replica's submits (idempotent repeats not counted).",
            self.submitted.load(Ordering::Relaxed) as f64,
        );
        t.single(
            "ember_control_runs_started_total",
            "counter",
            "Runs whose process started, as reported through this replica.",
            self.started.load(Ordering::Relaxed) as f64,
        );
        t.family(
            "ember_control_runs_finished_total",
            "counter",
            "Runs that reached a final state through this replica, by outcome.",
        );
        for (o, c) in OUTCOMES.iter().zip(&self.finished) {
            t.sample(
                "ember_control_runs_finished_total",
                &[("outcome", o.as_str())],
                c.load(Ordering::Relaxed) as f64,
            );
        }
        t.family(
            "ember_control_run_start_seconds",
            "histogram",
            "Start time of runs by phase: queue (submit to claimed), placement (claimed to \
             assigned), image, runner, process, and total (submit to process started).",
        );
        for (p, h) in PHASES.iter().zip(&self.phases) {
            h.render(t, "ember_control_run_start_seconds", &[("phase", p.name)]);
        }
        if let Some(h) = self.http.get() {
            ember_http::prom::connections(t, "ember_control", h);
        }
    }
}

/// How a per-node gauge is read from the node's last report.
type NodeGauge = fn(&ember_control::model::Node) -> f64;

/// `GET /metrics`.
pub(super) async fn metrics(State(s): State<Shared>) -> Result<Response, ApiError> {
    let filter = RunFilter {
        states: vec![RunState::Queued],
        ..RunFilter::default()
    };
    let (queued, nodes) = s
        .db(move |st| Ok((st.list_runs(&filter)?, st.list_nodes()?)))
        .await?;
    let mut t = Text::new();
    s.metrics.render_events(&mut t);

    let mut depth: BTreeMap<String, u64> = BTreeMap::new();
    for r in &queued {
        *depth
            .entry(r.deployment.clone().unwrap_or_default())
            .or_default() += 1;
    }
    t.family(
        "ember_control_queue_depth",
        "gauge",
        "Queued runs per deployment (\"\" for runs of no deployment).",
    );
    if depth.is_empty() {
        t.sample("ember_control_queue_depth", &[("deployment", "")], 0.0);
    }
    for (d, n) in &depth {
        t.sample("ember_control_queue_depth", &[("deployment", d)], *n as f64);
    }

    // A node is ready with a fresh heartbeat and its work stream open,
    // disconnected with a fresh heartbeat but no stream here (it may be
    // connected to another replica), lost once its heartbeat is stale.
    let now = s.clock.now();
    let timeout = u64::try_from(s.config.heartbeat_timeout.as_millis()).unwrap_or(u64::MAX);
    let connected = s.connected_nodes();
    let mut by_state: BTreeMap<&str, u64> = [("ready", 0), ("disconnected", 0), ("lost", 0)].into();
    for n in &nodes {
        let state = if now.saturating_sub(n.last_heartbeat) > timeout {
            "lost"
        } else if connected.contains(&n.spec.id) {
            "ready"
        } else {
            "disconnected"
        };
        *by_state.entry(state).or_default() += 1;
    }
    t.family("ember_control_nodes", "gauge", "Registered nodes by state.");
    for (st, n) in &by_state {
        t.sample("ember_control_nodes", &[("state", st)], *n as f64);
    }
    let per_node: [(&str, &str, NodeGauge); 4] = [
        (
            "ember_control_node_slots",
            "Runs the node executes at once.",
            |n| n.spec.slots as f64,
        ),
        (
            "ember_control_node_idle_runners",
            "Idle (warm) runners the node last reported.",
            |n| n.spec.inventory.idle_runners.values().sum::<u32>() as f64,
        ),
        (
            "ember_control_node_images",
            "Images the node last reported holding.",
            |n| n.spec.inventory.images.len() as f64,
        ),
        (
            "ember_control_node_free_disk_bytes",
            "Free bytes on the node's store disk, as last reported.",
            |n| n.spec.inventory.free_disk_bytes as f64,
        ),
    ];
    for (name, help, f) in per_node {
        t.family(name, "gauge", help);
        for n in &nodes {
            t.sample(name, &[("node", &n.spec.id)], f(n));
        }
    }
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        t.finish(),
    )
        .into_response())
}
