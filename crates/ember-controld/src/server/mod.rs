//! `ember control`: the HTTP/JSON API over a [`StateStore`], the
//! event-driven dispatcher and the lost-node reaper.
//!
//! Where things are:
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`ServerConfig`], the shared state, [`serve`] and the router |
//! | `auth.rs` | bearer tokens and node credentials: one layer over the client routes, one over the node routes |
//! | `error.rs` | [`ApiError`]: the one place a failure becomes an HTTP status and `{error, message}` body |
//! | `routes/` | one file per resource: `runs`, `logs`, `deployments`, `nodes`, `work` (the node's work stream), `reports` (nodes' run events) |
//! | `submit.rs` | the submit batcher (group commit) |
//! | `dispatch.rs` | the dispatcher: claim, place, assign, push |
//! | `prewarm_loop.rs` | pushes the pre-warm planner's orders ([`ember_control::prewarm`]) |
//! | `prepull_loop.rs` | launch statistics, and each node's pull plan ([`ember_control::pullplan`]) |
//! | `reaper.rs` | the lost-node reaper and the log pruner |
//! | `ui.rs`, `ui/` | the `/ui` dashboard (static files) and `GET /v1/overview`, its one JSON view |
//! | `metrics.rs` | `GET /metrics`: Prometheus counters, start-time histograms by phase, queue and node gauges |
//!
//! Path of a run from submit to start, with no polling interval anywhere:
//!
//! ```text
//! POST /v1/runs ─► submit batcher (group commit) ─► wake.notify_one()
//! dispatcher (woken) ─► claim_runs ─► place (one run at a time) ─► assign_run
//!                    ─► push {"type":"assign"} on the node's open work stream
//! ```
//!
//! The dispatcher is also woken by node heartbeats (new capacity or warm
//! runners) and by run exits (a free slot). On an exit the freed warm
//! runner is first offered to a queued run with the same key, for all the
//! exits of one report batch at once ([`StateStore::claim_for_runners`]).
//!
//! Beside it, the pre-warmer (woken by deploys, node connects and
//! heartbeats) compares each deployment's `warm_runners` with the idle
//! runners nodes report and pushes `{"type":"prewarm"}` orders
//! ([`ember_control::prewarm`]), so the first run of a deployment finds a warm
//! runner too.
//!
//! A work stream idle for [`ServerConfig::keepalive`] gets a
//! `{"type":"keepalive"}` line, so proxies and NATs keep it open and the
//! node can tell a quiet stream from a dead one.
//!
//! The store is blocking (SQLite); every call goes through
//! [`tokio::task::spawn_blocking`] so a slow commit never stalls the
//! runtime's workers.

mod auth;
mod dispatch;
mod error;
mod metrics;
mod prepull_loop;
mod prewarm_loop;
mod reaper;
mod routes;
mod submit;
mod ui;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::Uri;
use axum::routing::{delete, get, post, put};
use ember_api::wire::WorkMessage;
use ember_control::model::{NodeId, RunId};
use ember_control::{Clock, LogRetention, StateStore, StoreError, StoreEvent};
use tokio::sync::{Notify, broadcast, mpsc};

use crate::credentials::Credentials;
pub use error::ApiError;
use submit::PendingSubmit;

/// How long a stopping server lets requests in flight finish before it
/// closes their connections (work streams would never finish).
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(1);

/// Settings of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Bearer token clients must send; `None` accepts any client.
    pub client_token: Option<String>,
    /// A bearer token any node may send (one secret for every node: for
    /// `ember up` and single-machine setups); `None`: no shared token.
    pub node_token: Option<String>,
    /// Node requests must carry a credential issued to that node
    /// (`POST /v1/nodes/{id}/credentials`) or the shared `node_token`.
    /// Without this and without `node_token` any node is accepted. Either
    /// way an issued credential only ever opens its own node's endpoints.
    pub require_node_credentials: bool,
    /// A node whose last heartbeat is older than this is lost, and so are
    /// its runs.
    pub heartbeat_timeout: Duration,
    /// How often the reaper looks for lost nodes.
    pub reap_interval: Duration,
    /// A work stream with nothing to send for this long gets a keepalive
    /// line; nodes treat three intervals of silence as a dead stream.
    pub keepalive: Duration,
    /// The most bytes one run (or deployment) may carry in its environment
    /// and command line together (every key, value and argument): a
    /// bigger submit is refused with 413 `too_large`. Every list page
    /// holds whole runs, so this is what bounds a page's size.
    pub max_env_bytes: usize,
    /// The largest request body of `POST /v1/runs` and
    /// `POST /v1/deployments`; a bigger one is answered 413 `too_large`
    /// before it is read whole.
    pub max_request_bytes: usize,
    /// The most output the control plane keeps of one run; what comes
    /// after is dropped and the log ends with a truncation notice.
    pub max_log_bytes: u64,
    /// Which finished runs' logs the pruner removes.
    pub log_retention: LogRetention,
    /// How often the pruner applies `log_retention`.
    pub prune_interval: Duration,
    /// Header and idle timeouts and the connection cap of the HTTP server
    /// ([`ember_http`]). Work streams and log follows have a request in
    /// flight, so the idle timeout never cuts them.
    pub http: ember_http::Limits,
    /// How often the pre-puller plans and pushes pull plans (also at once
    /// when a node connects); `None`: no pre-pulls.
    pub prepull_interval: Option<Duration>,
    /// The pull planner's knobs.
    pub prepull: ember_control::pullplan::PlanConfig,
    /// Half-life of the launch statistics.
    pub popularity_half_life_ms: u64,
    /// The cluster cache's URL (`ember cache`), whose `/metrics` the
    /// dashboard's overview reads for the hit ratio; `None`: no cache shown.
    pub cache_url: Option<String>,
}

impl ServerConfig {
    /// Defaults: no tokens, 15 s heartbeat timeout checked every second,
    /// a keepalive after 10 s of silence on a work stream; 64 KiB of
    /// environment and command per run, 1 MiB request bodies, 64 MiB of
    /// output per run, logs of finished runs kept 7 days and 8 GiB in
    /// all, pruned every minute; [`ember_http::Limits::new`] connections;
    /// pull plans every minute.
    pub fn new() -> Self {
        ServerConfig {
            client_token: None,
            node_token: None,
            require_node_credentials: false,
            heartbeat_timeout: Duration::from_secs(15),
            reap_interval: Duration::from_secs(1),
            keepalive: Duration::from_secs(10),
            max_env_bytes: 64 << 10,
            max_request_bytes: 1 << 20,
            max_log_bytes: 64 << 20,
            log_retention: LogRetention {
                max_age_ms: Some(7 * 24 * 3600 * 1000),
                max_total_bytes: Some(8 << 30),
            },
            prune_interval: Duration::from_secs(60),
            http: ember_http::Limits::new(),
            prepull_interval: Some(Duration::from_secs(60)),
            prepull: ember_control::pullplan::PlanConfig::default(),
            popularity_half_life_ms: ember_control::popularity::DEFAULT_HALF_LIFE_MS,
            cache_url: None,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Filesystem or socket failure.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The failure.
        source: std::io::Error,
    },
}

/// One node's open work stream: an entry of [`AppState::streams`].
///
/// Made by the work-stream handler ([`routes::work`]) when a node
/// connects; the sending half is used by every task that pushes work to
/// the node (dispatcher, pre-warmer, reaper, cancel and report handlers),
/// the receiving half is owned by the stream's response body. The entry
/// is removed when that body is dropped (the node went away), when a
/// reconnect replaces it, or when its credential is revoked; dropping
/// `tx` ends the stream.
struct WorkStream {
    /// Distinguishes a reconnect from the stream it replaced, so the old
    /// stream's teardown does not remove the new one.
    conn: u64,
    tx: mpsc::UnboundedSender<WorkMessage>,
    /// The hash of the node credential that opened it, if one did: the
    /// stream is closed when that credential is revoked.
    credential: Option<String>,
}

/// The state every handler and background task shares, behind one `Arc`
/// ([`Shared`]); made once by [`serve`].
///
/// Who owns what: nothing here is owned by one task. Fields are either
/// set once at start (`store`, `clock`, `config`, `owner`) or are
/// synchronised handles that each name their writer and reader below.
///
/// Shutdown: [`serve`] holds the background tasks' handles. When its
/// `shutdown` future completes, the HTTP server stops accepting, gives
/// requests in flight [`SHUTDOWN_DRAIN`] and closes every connection
/// (dropping work-stream and log-follow bodies, which removes their
/// entries from `streams`); then `serve` aborts the background tasks.
/// Their `Arc`s go with them, and the last one drops the state. The
/// store's change listener holds only a `Weak`, so it never keeps the
/// state alive.
struct AppState {
    /// The state store: every read and write of runs, nodes, deployments,
    /// logs and credentials (blocking; see [`AppState::db`]).
    store: Arc<dyn StateStore>,
    clock: Arc<dyn Clock>,
    config: ServerConfig,
    /// This replica's claim owner name (the dispatcher claims as it).
    owner: String,
    /// Wakes the dispatcher ([`dispatch`]); notified by submits, node
    /// heartbeats and connects, exits, cancels, lost runs and other
    /// replicas' submits. `Notify` keeps one permit, so a wake-up sent
    /// while the dispatcher is busy is not lost.
    wake: Notify,
    /// Wakes the pre-warmer ([`prewarm_loop`]; one permit, like `wake`);
    /// notified by deploys, node heartbeats and connects.
    prewarm: Notify,
    /// Wakes the pre-puller ([`prepull_loop`]) early; notified when a node
    /// opens its work stream, so a node that joins gets its plan at once.
    prepull: Notify,
    /// Each connected node's work stream. Written by the work-stream
    /// handler (insert, and remove on drop) and by credential reloads
    /// (remove on revocation); read by every task that pushes work. The
    /// lock is held only to look up or change an entry, never across an
    /// await.
    streams: Mutex<HashMap<NodeId, WorkStream>>,
    /// The next [`WorkStream::conn`].
    next_conn: AtomicU64,
    /// Per-node credentials, as of the last reload ([`auth`]: reloaded by
    /// its loop every second and on an unknown token; added to by issuing).
    credentials: Credentials,
    /// A run id each time a run's log grows or the run changes state, for
    /// log followers (each `GET .../logs?follow` subscribes). Sent by the
    /// handlers and tasks that change runs, and by the store listener for
    /// other replicas' appends.
    log_events: broadcast::Sender<RunId>,
    /// Submits waiting for the submit batcher ([`submit`]), which owns the
    /// receiving half; `POST /v1/runs` sends.
    submits: mpsc::UnboundedSender<PendingSubmit>,
    /// This replica's event counters for `/metrics` ([`metrics`]); updated
    /// where the events happen (submit batcher, reports, cancel).
    metrics: metrics::ControlMetrics,
}

/// How handlers and tasks hold the state.
type Shared = Arc<AppState>;

impl AppState {
    /// Runs a store call on the blocking pool.
    async fn db<T, F>(self: &Arc<Self>, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn StateStore) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
            .map_err(ApiError::from)
    }

    fn push(&self, node: &str, msg: WorkMessage) -> bool {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.get(node).is_some_and(|s| s.tx.send(msg).is_ok())
    }

    fn connected_nodes(&self) -> Vec<NodeId> {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.keys().cloned().collect()
    }
}

/// Serves the API on `listener` until `shutdown` completes; then requests
/// in flight get a second to finish before every connection is closed.
/// Connections are bounded by [`ServerConfig::http`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<dyn StateStore>,
    clock: Arc<dyn Clock>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let (log_events, _) = broadcast::channel(1024);
    let (submits, submits_rx) = mpsc::unbounded_channel();
    let state = Arc::new(AppState {
        store,
        clock,
        owner: format!("control-{}-{}", std::process::id(), ember_store::now_ms()),
        config,
        wake: Notify::new(),
        prewarm: Notify::new(),
        prepull: Notify::new(),
        streams: Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(1),
        credentials: Credentials::default(),
        log_events,
        submits,
        metrics: metrics::ControlMetrics::default(),
    });
    // The background tasks; each holds an `Arc` of the state until it is
    // aborted below.
    let tasks = [
        tokio::spawn(dispatch::dispatch_loop(state.clone())),
        tokio::spawn(submit::submit_loop(state.clone(), submits_rx)),
        tokio::spawn(reaper::reap_lost_nodes(state.clone())),
        tokio::spawn(reaper::prune_loop(state.clone())),
        tokio::spawn(auth::credentials_loop(state.clone())),
        tokio::spawn(prewarm_loop::prewarm_loop(state.clone())),
        tokio::spawn(prepull_loop::prepull_loop(state.clone())),
    ];
    // Runs submitted and output appended through other replicas sharing the
    // database wake this dispatcher and these log followers too
    // (PostgreSQL LISTEN/NOTIFY; a no-op for SQLite). Weak:
    // the store's listener must not keep the server state alive.
    let weak = Arc::downgrade(&state);
    let st = state.clone();
    let watched = tokio::task::spawn_blocking(move || {
        st.store.watch(Box::new(move |event| {
            if let Some(s) = weak.upgrade() {
                match event {
                    StoreEvent::Queue => s.wake.notify_one(),
                    StoreEvent::Log(id) => {
                        let _ = s.log_events.send(id);
                    }
                }
            }
        }))
    })
    .await;
    if let Ok(Err(e)) | Err(e) = watched.map_err(|e| StoreError::Backend(Box::new(e))) {
        tracing::warn!(error = %ember_error::chain(&e), "not watching the database for other replicas' runs");
    }
    // Work left queued by an earlier run of the server is dispatched as
    // soon as nodes connect; this first wake covers runs already placeable.
    state.wake.notify_one();

    let http = ember_http::Server::new(state.config.http.clone())
        // Work streams never end by themselves: on a stop, requests in
        // flight get this long, then every connection is closed.
        .drain(Some(SHUTDOWN_DRAIN))
        .refusal(
            "application/json",
            r#"{"error":"unavailable","message":"the control plane is at its connection limit"}"#,
        );
    let _ = state.metrics.http.set(http.stats());
    let _ = state.metrics.http.set(http.stats());
    let app = router(state);
    http.serve(listener, app, shutdown).await;
    for task in tasks {
        task.abort();
    }
    Ok(())
}

/// The API's routes. Client routes sit behind [`auth::require_client`],
/// node routes (all under `/v1/nodes/{id}/`, the node in the path) behind
/// [`auth::require_node`]; handlers check no tokens themselves.
fn router(state: Shared) -> Router {
    use routes::{deployments, logs, nodes, reports, runs, work};
    let body_limit = axum::extract::DefaultBodyLimit::max(state.config.max_request_bytes);
    let client = Router::new()
        .route(
            "/v1/runs",
            post(runs::submit_run)
                .layer(body_limit)
                .get(runs::list_runs),
        )
        .route("/v1/runs/{id}", get(runs::get_run))
        .route("/v1/runs/{id}/cancel", post(runs::cancel_run))
        .route("/v1/runs/{id}/logs", get(logs::get_logs))
        .route(
            "/v1/deployments",
            post(deployments::create_deployment)
                .layer(body_limit)
                .get(deployments::list_deployments),
        )
        .route(
            "/v1/deployments/{name}",
            delete(deployments::delete_deployment),
        )
        .route("/v1/nodes", get(nodes::list_nodes))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/overview", get(ui::overview))
        .route(
            "/v1/nodes/{id}/credentials",
            post(nodes::issue_credential).delete(nodes::revoke_credentials),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_client,
        ));
    let node = Router::new()
        .route("/v1/nodes/{id}", put(nodes::put_node))
        .route("/v1/nodes/{id}/work", get(work::work_stream))
        .route("/v1/nodes/{id}/events", post(reports::node_events))
        .route(
            "/v1/nodes/{id}/runs/{run}/events",
            post(reports::node_event),
        )
        .route("/v1/nodes/{id}/runs/{run}/logs", post(logs::node_logs))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_node,
        ));
    // The dashboard's static files carry no data: no token (the page
    // sends it with every request for data).
    let ui = Router::new()
        .route("/ui", get(ui::index))
        .route("/ui/", get(ui::index))
        .route("/ui/app.js", get(ui::app))
        .route("/ui/style.css", get(ui::style));
    client
        .merge(node)
        .merge(ui)
        .fallback(|uri: Uri| async move {
            ApiError::NotFound(format!("no such endpoint: {}", uri.path()))
        })
        .layer(axum::middleware::map_response(error::json_errors))
        .with_state(state)
}
