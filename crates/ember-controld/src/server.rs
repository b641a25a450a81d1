//! `ember control`: the HTTP/JSON API over a [`StateStore`], the
//! event-driven dispatcher and the lost-node reaper.
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
//! ([`crate::prewarm`]), so the first run of a deployment finds a warm
//! runner too.
//!
//! A work stream idle for [`ServerConfig::keepalive`] gets a
//! `{"type":"keepalive"}` line, so proxies and NATs keep it open and the
//! node can tell a quiet stream from a dead one.
//!
//! The store is blocking (SQLite); every call goes through
//! [`tokio::task::spawn_blocking`] so a slow commit never stalls the
//! runtime's workers.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};

use crate::credentials::{self, Credentials};
use bytes::Bytes;
use ember_control::model::{
    DeploymentSpec, LogChunk, NodeId, NodeReport, NodeSpec, Run, RunId, RunSpec, RunState,
};
use ember_control::schedule::{BatchScheduler, ClusterView, RunRequirements};
use ember_control::store::{ClaimRequest, RunFilter, Submitted};
use ember_control::{Appended, Clock, LogRetention, StateStore, StoreError, StoreEvent};
use serde::Serialize;
use tokio::sync::{Notify, broadcast, mpsc};

use crate::prewarm;
use ember_api::wire::{
    DEFAULT_PAGE, ErrorBody, EventResult, EventResults, LogRecord, LogStream, MAX_EVENT_BATCH,
    MAX_PAGE, NodeCredential, NodeEvents, RevokedCredentials, RunPage, RunReports, SubmitResponse,
    WorkMessage, parse_run_id,
};

/// How many queued runs one dispatcher round claims. Runs are placed and
/// pushed one at a time within a round, so this bounds the claim
/// transaction, not the latency of the first run.
const CLAIM_BATCH: usize = 64;
/// A claim's lease: a dispatcher that dies holding claims strands them for
/// at most this long.
const CLAIM_LEASE_MS: u64 = 30_000;
/// Log chunks read from the store at a time, at most...
const LOG_PAGE: usize = 256;
/// ...and about this many bytes of output (one chunk more at most): a log
/// read holds one page at a time, however long the log is.
const LOG_PAGE_BYTES: usize = 1 << 20;
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
}

impl ServerConfig {
    /// Defaults: no tokens, 15 s heartbeat timeout checked every second,
    /// a keepalive after 10 s of silence on a work stream; 64 KiB of
    /// environment and command per run, 1 MiB request bodies, 64 MiB of
    /// output per run, logs of finished runs kept 7 days and 8 GiB in
    /// all, pruned every minute; [`ember_http::Limits::new`] connections.
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
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The failure.
        source: std::io::Error,
    },
}

/// An API error: every handler's failure becomes one of these, and its one
/// [`IntoResponse`] impl is the only place error bodies are made.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or invalid (400).
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong bearer token (401).
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// A valid credential used for something it does not cover (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such resource (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// The request, or what it would store, is over a limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// The server failed (500); the detail is logged, not sent.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl ApiError {
    /// What a client is told: the code and, except for internal faults
    /// (logged here), the message.
    fn body(&self) -> ErrorBody {
        if let ApiError::Internal(detail) = self {
            tracing::error!(%detail, "request failed");
        }
        ErrorBody {
            error: self.status_and_code().1.to_owned(),
            message: self.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_and_code().0;
        let mut resp = json_response(status, &self.body());
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Invalid(_) => ApiError::BadRequest(e.to_string()),
            StoreError::DeploymentNotFound(_)
            | StoreError::RunNotFound(_)
            | StoreError::NodeNotFound(_) => ApiError::NotFound(e.to_string()),
            StoreError::DeploymentExists(_)
            | StoreError::IdempotencyMismatch { .. }
            | StoreError::Conflict { .. }
            | StoreError::Transition { .. }
            | StoreError::NotAssigned { .. }
            | StoreError::NotClaimed { .. } => ApiError::Conflict(e.to_string()),
            StoreError::Backend(_) => ApiError::Internal(e.to_string()),
        }
    }
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            Body::from(body),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("serialising the response: {e}"),
        )
            .into_response(),
    }
}

/// One node's open work stream.
struct WorkStream {
    /// Distinguishes a reconnect from the stream it replaced, so the old
    /// stream's teardown does not remove the new one.
    conn: u64,
    tx: mpsc::UnboundedSender<WorkMessage>,
    /// The hash of the node credential that opened it, if one did: the
    /// stream is closed when that credential is revoked.
    credential: Option<String>,
}

struct AppState {
    store: Arc<dyn StateStore>,
    clock: Arc<dyn Clock>,
    config: ServerConfig,
    /// This replica's claim owner name.
    owner: String,
    /// Wakes the dispatcher. `Notify` keeps one permit, so a wake-up sent
    /// while the dispatcher is busy is not lost.
    wake: Notify,
    /// Wakes the pre-warmer (one permit, like `wake`).
    prewarm: Notify,
    streams: Mutex<HashMap<NodeId, WorkStream>>,
    next_conn: AtomicU64,
    /// Per-node credentials, as of the last reload.
    credentials: Credentials,
    /// A run id each time a run's log grows or the run changes state, for
    /// log followers.
    log_events: broadcast::Sender<RunId>,
    /// Submits waiting for the submit batcher.
    submits: mpsc::UnboundedSender<PendingSubmit>,
}

/// A submit handed to [`submit_loop`], with where its answer goes.
type PendingSubmit = (
    RunSpec,
    tokio::sync::oneshot::Sender<Result<Submitted, StoreError>>,
);

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

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Constant-time comparison: the token is a secret.
fn same_secret(got: &str, want: &str) -> bool {
    got.len() == want.len()
        && got
            .bytes()
            .zip(want.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn check_token(headers: &HeaderMap, want: &Option<String>) -> Result<(), ApiError> {
    let Some(want) = want else { return Ok(()) };
    if bearer(headers).is_some_and(|g| same_secret(g, want)) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

fn client_auth(s: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    check_token(headers, &s.config.client_token)
}

/// Checks a request on `node`'s endpoints: the shared node token (any
/// node), else a credential issued to `node` (one issued to another node
/// is 403), else nothing only when neither is configured. Returns the hash
/// of the credential used, if one was.
async fn node_auth(
    s: &Shared,
    headers: &HeaderMap,
    node: &str,
) -> Result<Option<String>, ApiError> {
    let got = bearer(headers);
    if let (Some(want), Some(got)) = (&s.config.node_token, got)
        && same_secret(got, want)
    {
        return Ok(None);
    }
    if let Some(got) = got {
        let h = credentials::hash(got);
        let mut owner = s.credentials.owner(&h);
        // Issued through another replica since the last reload, perhaps.
        if owner.is_none() && s.credentials.may_reload() {
            reload_credentials(s).await?;
            owner = s.credentials.owner(&h);
        }
        match owner {
            Some(o) if o == node => return Ok(Some(h)),
            Some(o) => {
                tracing::warn!(credential_of = %o, path_node = %node, "a node credential used for another node");
                return Err(ApiError::Forbidden(format!(
                    "this credential is not node {node:?}'s"
                )));
            }
            None => {}
        }
    }
    if s.config.node_token.is_none() && !s.config.require_node_credentials {
        return Ok(None);
    }
    Err(ApiError::Unauthorized)
}

/// Reloads the credential table from the store and closes the work
/// streams whose credential is gone (revoked, through any replica).
async fn reload_credentials(s: &Shared) -> Result<(), ApiError> {
    let rows = s.db(|st| st.node_credentials()).await?;
    s.credentials.replace(rows);
    let revoked: Vec<NodeId> = {
        let streams = s.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams
            .iter()
            .filter(|(_, w)| {
                w.credential
                    .as_ref()
                    .is_some_and(|h| s.credentials.owner(h).is_none())
            })
            .map(|(n, _)| n.clone())
            .collect()
    };
    if !revoked.is_empty() {
        let mut streams = s.streams.lock().unwrap_or_else(|e| e.into_inner());
        for n in revoked {
            // Dropping the sender ends the stream.
            if streams.remove(&n).is_some() {
                tracing::warn!(node = %n, "closed a work stream: its credential was revoked");
            }
        }
    }
    Ok(())
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::BadRequest(format!("missing JSON body ({what})")));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid {what} JSON: {e}")))
}

fn run_id(s: &str) -> Result<RunId, ApiError> {
    parse_run_id(s).ok_or_else(|| ApiError::BadRequest(format!("invalid run id {s:?}")))
}

/// The query's `key=value` pairs, percent-decoded (and `+` read as a
/// space), as `application/x-www-form-urlencoded` says: `?deployment=x%20y`
/// names the deployment `x y`.
fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// Bytes of a run's or deployment's environment and command line: what
/// [`ServerConfig::max_env_bytes`] limits.
fn env_bytes<'a>(
    env: &std::collections::BTreeMap<String, String>,
    command: impl IntoIterator<Item = &'a String>,
) -> usize {
    env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + command.into_iter().map(String::len).sum::<usize>()
}

fn check_env_size(s: &Shared, what: &str, bytes: usize) -> Result<(), ApiError> {
    let max = s.config.max_env_bytes;
    if bytes > max {
        return Err(ApiError::TooLarge(format!(
            "the {what}'s environment and command line are {bytes} bytes; at most {max} are accepted"
        )));
    }
    Ok(())
}

/// Answers every error that did not come from a handler (a body over the
/// limit, a wrong method, a panic caught by the framework) with the
/// documented `{error, message}` object instead of the framework's plain
/// text, so clients parse one error shape.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "conflict",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!("request body too large ({text})"),
        _ if text.is_empty() => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_owned(),
        _ => text,
    };
    let mut out = json_response(
        status,
        &ErrorBody {
            error: code.to_owned(),
            message,
        },
    );
    // Keep what the framework said beyond the body (`Allow` on a 405).
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
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
        streams: Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(1),
        credentials: Credentials::default(),
        log_events,
        submits,
    });
    let dispatcher = tokio::spawn(dispatch_loop(state.clone()));
    let submitter = tokio::spawn(submit_loop(state.clone(), submits_rx));
    let reaper = tokio::spawn(reap_loop(state.clone()));
    let prewarmer = tokio::spawn(prewarm_loop(state.clone()));
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
        tracing::warn!(error = %e, "not watching the database for other replicas' runs");
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
    let app = router(state);
    http.serve(listener, app, shutdown).await;
    dispatcher.abort();
    submitter.abort();
    reaper.abort();
    prewarmer.abort();
    Ok(())
}

fn router(state: Shared) -> Router {
    let body_limit = axum::extract::DefaultBodyLimit::max(state.config.max_request_bytes);
    Router::new()
        .route(
            "/v1/runs",
            post(submit_run).layer(body_limit).get(list_runs),
        )
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/runs/{id}/cancel", post(cancel_run))
        .route("/v1/runs/{id}/logs", get(get_logs))
        .route(
            "/v1/deployments",
            post(create_deployment)
                .layer(body_limit)
                .get(list_deployments),
        )
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}", put(put_node))
        .route(
            "/v1/nodes/{id}/credentials",
            post(issue_credential).delete(revoke_credentials),
        )
        .route("/v1/nodes/{id}/work", get(work_stream))
        .route("/v1/nodes/{id}/events", post(node_events))
        .route("/v1/nodes/{id}/runs/{run}/events", post(node_event))
        .route("/v1/nodes/{id}/runs/{run}/logs", post(node_logs))
        .fallback(|uri: Uri| async move {
            ApiError::NotFound(format!("no such endpoint: {}", uri.path()))
        })
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

// ---- client endpoints ------------------------------------------------------

async fn submit_run(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    client_auth(&s, &headers)?;
    let mut spec: RunSpec = parse_json(&body, "run")?;
    check_env_size(&s, "run", env_bytes(&spec.env, &spec.command))?;
    if let Some(key) = headers.get("idempotency-key") {
        let key = key
            .to_str()
            .map_err(|_| ApiError::BadRequest("Idempotency-Key must be ASCII".into()))?;
        if key.is_empty() {
            return Err(ApiError::BadRequest("Idempotency-Key is empty".into()));
        }
        // Printable ASCII, as the document's pattern says (to_str lets a
        // tab through).
        if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(ApiError::BadRequest(
                "Idempotency-Key must be printable ASCII".into(),
            ));
        }
        if key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(ApiError::BadRequest(format!(
                "Idempotency-Key is {} bytes; at most {MAX_IDEMPOTENCY_KEY}",
                key.len()
            )));
        }
        match &spec.idempotency_key {
            // Two different keys for one request: a conflict, like a key
            // reused for another spec.
            Some(k) if k != key => {
                return Err(ApiError::Conflict(format!(
                    "Idempotency-Key header {key:?} differs from the body's {k:?}"
                )));
            }
            _ => spec.idempotency_key = Some(key.to_owned()),
        }
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    s.submits
        .send((spec, tx))
        .map_err(|_| ApiError::Internal("the submit batcher stopped".into()))?;
    let submitted = rx
        .await
        .map_err(|_| ApiError::Internal("the submit batcher dropped a submit".into()))??;
    let status = if submitted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_response(
        status,
        &SubmitResponse {
            run: submitted.run,
            created: submitted.created,
        },
    ))
}

/// `GET /v1/runs`: one page of runs, newest first, at most `limit`
/// ([`DEFAULT_PAGE`], at most [`MAX_PAGE`]), with the cursor of the next
/// page when there may be one.
async fn list_runs(
    State(s): State<Shared>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    client_auth(&s, &headers)?;
    let mut filter = RunFilter {
        limit: Some(DEFAULT_PAGE),
        ..RunFilter::default()
    };
    for (k, v) in query_pairs(&uri) {
        match k.as_str() {
            "state" => {
                for st in v.split(',') {
                    filter.states.push(RunState::parse(st).ok_or_else(|| {
                        ApiError::BadRequest(format!("unknown run state {st:?}"))
                    })?);
                }
            }
            "deployment" => filter.deployment = Some(v),
            "node" => filter.node = Some(v),
            "limit" => {
                let n: usize = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "limit must be a number from 1 to {MAX_PAGE}, not {v:?}"
                        ))
                    })?;
                filter.limit = Some(n);
            }
            "cursor" => {
                filter.before = Some(parse_run_id(&v).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "invalid cursor {v:?} (pass next_cursor of the previous page)"
                    ))
                })?);
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}"
                )));
            }
        }
    }
    let limit = filter.limit.unwrap_or(DEFAULT_PAGE);
    let runs = s.db(move |st| st.list_runs(&filter)).await?;
    // A full page may have more behind it; the cursor is the last run's id
    // (the next page holds older runs), opaque to clients.
    let next_cursor = (runs.len() == limit)
        .then(|| runs.last().map(|r| r.id.0.to_string()))
        .flatten();
    Ok(json_response(
        StatusCode::OK,
        &RunPage { runs, next_cursor },
    ))
}

async fn get_run(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    client_auth(&s, &headers)?;
    let id = run_id(&id)?;
    let run = s
        .db(move |st| st.get_run(id))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("{id} not found")))?;
    Ok(json_response(StatusCode::OK, &run))
}

async fn cancel_run(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    client_auth(&s, &headers)?;
    let id = run_id(&id)?;
    // The run may move between the read and the compare-and-set (a node
    // report); retry a few times against the fresh state.
    for _ in 0..5 {
        let run = s
            .db(move |st| st.get_run(id))
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("{id} not found")))?;
        if run.state.is_final() {
            return Err(ApiError::Conflict(format!(
                "{id} is already {}; nothing to cancel",
                run.state
            )));
        }
        let from = run.state;
        match s
            .db(move |st| st.transition_run(id, from, RunState::Cancelled))
            .await
        {
            Ok(run) => {
                if let Some(node) = &run.node
                    && from.is_active()
                {
                    s.push(
                        node,
                        WorkMessage::Cancel {
                            run: id,
                            attempt: None,
                        },
                    );
                }
                let _ = s.log_events.send(id);
                // The cancelled run's slot is free.
                s.wake.notify_one();
                return Ok(json_response(StatusCode::OK, &run));
            }
            Err(ApiError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::Conflict(format!(
        "{id} kept changing state; try again"
    )))
}

async fn get_logs(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    client_auth(&s, &headers)?;
    let id = run_id(&id)?;
    let mut follow = false;
    for (k, v) in query_pairs(&uri) {
        match (k.as_str(), v.as_str()) {
            ("follow", "true" | "1" | "") => follow = true,
            ("follow", "false" | "0") => follow = false,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {k}={v}"
                )));
            }
        }
    }
    // Subscribe before the first read, so nothing appended in between is
    // missed.
    let rx = s.log_events.subscribe();
    if s.db(move |st| st.get_run(id)).await?.is_none() {
        return Err(ApiError::NotFound(format!("{id} not found")));
    }
    struct Follow {
        s: Shared,
        id: RunId,
        after: u64,
        rx: broadcast::Receiver<RunId>,
        done: bool,
        /// The run was seen final: what the next read finds is all
        /// there will be. A read without `follow` starts so: it ends at
        /// the first empty page.
        final_seen: bool,
    }
    // Both kinds of read stream the log a page at a time (at most
    // LOG_PAGE_BYTES held per reader), so a long log is never built in
    // memory whole.
    let st = Follow {
        s,
        id,
        after: 0,
        rx,
        done: false,
        final_seen: !follow,
    };
    let stream = futures_util::stream::unfold(st, |mut f| async move {
        loop {
            if f.done {
                return None;
            }
            let (id, after) = (f.id, f.after);
            match f
                .s
                .db(move |st| st.read_log(id, after, LOG_PAGE, LOG_PAGE_BYTES))
                .await
            {
                Ok(chunks) if !chunks.is_empty() => {
                    f.after = chunks.last().map_or(f.after, |c| c.seq);
                    let mut out = Vec::new();
                    return match records(&chunks, &mut out) {
                        Ok(()) => Some((Ok::<Bytes, std::io::Error>(Bytes::from(out)), f)),
                        Err(e) => Some((
                            Err(std::io::Error::other(e.to_string())),
                            Follow { done: true, ..f },
                        )),
                    };
                }
                Ok(_) if f.final_seen => return None,
                Ok(_) => {}
                Err(e) => {
                    return Some((
                        Err(std::io::Error::other(e.to_string())),
                        Follow { done: true, ..f },
                    ));
                }
            }
            let finished = match f.s.db(move |st| st.get_run(id)).await {
                Ok(Some(run)) => run.state.is_final(),
                _ => true,
            };
            if finished {
                // Nodes post all output before reporting the exit, so
                // reading on after seeing the final state (until a read
                // comes back empty) gets everything, including output
                // appended between the last read and that check.
                f.final_seen = true;
                continue;
            }
            loop {
                match f.rx.recv().await {
                    Ok(r) if r == f.id => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Appends `chunks` to `out` as NDJSON [`LogRecord`] lines.
fn records(chunks: &[LogChunk], out: &mut Vec<u8>) -> Result<(), ApiError> {
    for c in chunks {
        let record = LogRecord {
            stream: c.stream,
            data: c.data.clone(),
            marker: c.marker,
        };
        serde_json::to_writer(&mut *out, &record)
            .map_err(|e| ApiError::Internal(format!("serialising a log record: {e}")))?;
        out.push(b'\n');
    }
    Ok(())
}

async fn create_deployment(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    client_auth(&s, &headers)?;
    let spec: DeploymentSpec = parse_json(&body, "deployment")?;
    check_env_size(&s, "deployment", env_bytes(&spec.env, &spec.command))?;
    let d = s.db(move |st| st.create_deployment(&spec)).await?;
    if d.spec.warm_runners > 0 {
        s.prewarm.notify_one();
    }
    Ok(json_response(StatusCode::CREATED, &d))
}

async fn list_deployments(
    State(s): State<Shared>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    client_auth(&s, &headers)?;
    let ds = s.db(|st| st.list_deployments()).await?;
    Ok(json_response(StatusCode::OK, &ds))
}

async fn list_nodes(State(s): State<Shared>, headers: HeaderMap) -> Result<Response, ApiError> {
    client_auth(&s, &headers)?;
    let nodes = s.db(|st| st.list_nodes()).await?;
    Ok(json_response(StatusCode::OK, &nodes))
}

/// Issues a new credential for node `id` (which need not have registered
/// yet); the token is in the answer and nowhere else.
async fn issue_credential(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    client_auth(&s, &headers)?;
    let token =
        credentials::new_token().map_err(|e| ApiError::Internal(format!("making a token: {e}")))?;
    let h = credentials::hash(&token);
    let (node, hash) = (id.clone(), h.clone());
    s.db(move |st| st.add_node_credential(&node, &hash)).await?;
    s.credentials.insert(h, id.clone());
    tracing::info!(node = %id, "issued a node credential");
    Ok(json_response(
        StatusCode::CREATED,
        &NodeCredential { node: id, token },
    ))
}

/// Revokes every credential of node `id`; its work stream, if one of them
/// opened it, is closed here at once and on other replicas within a second.
async fn revoke_credentials(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    client_auth(&s, &headers)?;
    let node = id.clone();
    let revoked = s.db(move |st| st.revoke_node_credentials(&node)).await?;
    reload_credentials(&s).await?;
    tracing::info!(node = %id, revoked, "revoked node credentials");
    Ok(json_response(
        StatusCode::OK,
        &RevokedCredentials { node: id, revoked },
    ))
}

// ---- node endpoints --------------------------------------------------------

async fn put_node(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    node_auth(&s, &headers, &id).await?;
    let spec: NodeSpec = parse_json(&body, "node")?;
    // A well-formed body for another node: 409, as the document says (a
    // schema cannot tie the body to the path, so this is no 400).
    if spec.id != id {
        return Err(ApiError::Conflict(format!(
            "node id in the body ({:?}) differs from the path ({id:?})",
            spec.id
        )));
    }
    let node = s.db(move |st| st.upsert_node(&spec)).await?;
    // New capacity or new warm runners may make queued runs placeable.
    s.wake.notify_one();
    // A heartbeat is where warm runners used up (or expired) show.
    s.prewarm.notify_one();
    Ok(json_response(StatusCode::OK, &node))
}

async fn work_stream(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let credential = node_auth(&s, &headers, &id).await?;
    let node = id.clone();
    let known = s
        .db(move |st| Ok(st.list_nodes()?.into_iter().any(|n| n.spec.id == node)))
        .await?;
    if !known {
        return Err(ApiError::NotFound(format!(
            "node {id:?} is not registered (PUT /v1/nodes/{id} first)"
        )));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let conn = s.next_conn.fetch_add(1, Ordering::Relaxed);
    // A zero interval would send keepalives in a busy loop.
    let keepalive = s.config.keepalive.max(Duration::from_millis(10));
    // Runs assigned while the node was away (or before a control-plane
    // restart) are sent again; the node ignores runs it already has.
    let node = id.clone();
    let mine = s
        .db(move |st| {
            st.list_runs(&RunFilter {
                states: vec![RunState::Scheduled, RunState::Starting, RunState::Running],
                node: Some(node),
                ..RunFilter::default()
            })
        })
        .await?;
    let (pending, active): (Vec<Run>, Vec<Run>) = mine
        .into_iter()
        .rev()
        .partition(|r| r.state == RunState::Scheduled);
    let _ = tx.send(WorkMessage::Active {
        runs: active.iter().map(|r| r.id).collect(),
        keepalive_ms: Some(u64::try_from(keepalive.as_millis()).unwrap_or(u64::MAX)),
        scheduled: Some(pending.iter().map(|r| r.id).collect()),
    });
    for run in pending {
        let _ = tx.send(WorkMessage::Assign { run: Box::new(run) });
    }
    {
        let mut streams = s.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.insert(
            id.clone(),
            WorkStream {
                conn,
                tx,
                credential,
            },
        );
    }
    tracing::info!(node = %id, "work stream opened");
    s.wake.notify_one();
    s.prewarm.notify_one();

    /// Removes the stream from the table when the response body is dropped
    /// (the node disconnected).
    struct Guard {
        s: Shared,
        node: NodeId,
        conn: u64,
    }
    impl Drop for Guard {
        fn drop(&mut self) {
            let mut streams = self.s.streams.lock().unwrap_or_else(|e| e.into_inner());
            if streams.get(&self.node).is_some_and(|w| w.conn == self.conn) {
                streams.remove(&self.node);
                tracing::info!(node = %self.node, "work stream closed");
            }
        }
    }
    let guard = Guard { s, node: id, conn };
    let stream = futures_util::stream::unfold((rx, guard), move |(mut rx, guard)| async move {
        let msg = match tokio::time::timeout(keepalive, rx.recv()).await {
            Ok(Some(msg)) => msg,
            Ok(None) => return None,
            // Idle for a whole interval. A write to a peer that is gone
            // also fails here, which closes the stream on this side.
            Err(_) => WorkMessage::Keepalive,
        };
        let mut line = match serde_json::to_vec(&msg) {
            Ok(l) => l,
            Err(e) => return Some((Err(std::io::Error::other(e)), (rx, guard))),
        };
        line.push(b'\n');
        Some((Ok::<Bytes, std::io::Error>(Bytes::from(line)), (rx, guard)))
    });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn node_event(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path((node, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    node_auth(&s, &headers, &node).await?;
    let id = run_id(&id)?;
    let reports = match parse_json::<NodeEvents>(&body, "run event")? {
        NodeEvents::One(r) => vec![r],
        NodeEvents::Many(rs) => rs,
    };
    if reports.is_empty() {
        return Err(ApiError::BadRequest("an empty list of run events".into()));
    }
    // In order; a refused one ends the list (what came before it stands).
    let run = apply_reports(&s, &node, vec![RunReports::new(id, reports)])
        .await?
        .pop()
        .unwrap_or(Err(StoreError::RunNotFound(id)))?;
    Ok(json_response(StatusCode::OK, &run))
}

/// A node's reports on several runs in one request and one transaction:
/// what a node sends once reports pile up, so that a burst costs a request
/// per batch rather than per report.
async fn node_events(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(node): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    node_auth(&s, &headers, &node).await?;
    let batch = parse_json::<Vec<RunReports>>(&body, "run events")?;
    if batch.is_empty() {
        return Err(ApiError::BadRequest("an empty list of run events".into()));
    }
    if batch.len() > MAX_EVENT_BATCH {
        return Err(ApiError::BadRequest(format!(
            "{} runs' events in one request; at most {MAX_EVENT_BATCH}",
            batch.len()
        )));
    }
    // What the document requires of every entry (a run id of at least 1,
    // at least one report): a malformed entry refuses the request, as a
    // malformed batch does; the store would refuse only that entry,
    // inside a 200.
    for b in &batch {
        if b.run.0 < 1 {
            return Err(ApiError::BadRequest(format!(
                "run id {} in the batch: run ids start at 1",
                b.run.0
            )));
        }
        if b.reports.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "run {}'s entry has no reports (at least one is required)",
                b.run
            )));
        }
    }
    let ids: Vec<RunId> = batch.iter().map(|b| b.run).collect();
    let out = apply_reports(&s, &node, batch).await?;
    let results = ids
        .into_iter()
        .zip(out)
        .map(|(run, r)| match r {
            Ok(after) => EventResult {
                run,
                state: Some(after.state),
                error: None,
            },
            Err(e) => EventResult {
                run,
                state: None,
                error: Some(ApiError::from(e).body()),
            },
        })
        .collect();
    Ok(json_response(StatusCode::OK, &EventResults { results }))
}

/// Applies `node`'s reports in one transaction (one answer per entry of
/// `batch`), then hands every runner a finished run left idle the oldest
/// queued run with its key, in one more transaction and without a round
/// through placement, and pushes those runs to the node. The dispatcher
/// is woken for the slots no hand-off took; log followers hear of every
/// run that moved (they stop at a final state).
async fn apply_reports(
    s: &Shared,
    node: &str,
    batch: Vec<RunReports>,
) -> Result<Vec<Result<Run, StoreError>>, ApiError> {
    let n = node.to_owned();
    let (out, handed, mut freed) = s
        .db(move |st| {
            let out = st.report_batch(&n, &batch)?;
            let mut keys = Vec::new();
            let mut freed = 0usize;
            for (b, r) in batch.iter().zip(&out) {
                let Ok(run) = r else { continue };
                // A run its node lost went back to the queue (or stayed
                // lost): either way its slot is free, and the dispatcher
                // must hear of a queued run.
                if b.reports.iter().any(|r| matches!(r, NodeReport::Lost { .. })) {
                    tracing::warn!(node = %n, run = %run.id, state = %run.state, "run lost by its node");
                    freed += 1;
                    continue;
                }
                if !run.state.is_final() {
                    continue;
                }
                let idle = b.reports.iter().any(|r| {
                    matches!(
                        r,
                        NodeReport::Exited {
                            runner_idle: true,
                            ..
                        }
                    )
                });
                if idle {
                    keys.push(run.warm_key());
                } else {
                    freed += 1;
                }
            }
            let handed = if keys.is_empty() {
                Vec::new()
            } else {
                st.claim_for_runners(&n, &keys).unwrap_or_else(|e| {
                    tracing::warn!(node = %n, error = %e, "warm hand-off failed");
                    vec![None; keys.len()]
                })
            };
            Ok((out, handed, freed))
        })
        .await?;
    for next in handed {
        let Some(run) = next else {
            freed += 1;
            continue;
        };
        let id = run.id;
        if !s.push(node, WorkMessage::Assign { run: Box::new(run) }) {
            tracing::warn!(node, run = %id, "node disconnected before the warm hand-off");
        }
    }
    if freed > 0 {
        s.wake.notify_one();
    }
    for run in out.iter().flatten() {
        let _ = s.log_events.send(run.id);
    }
    Ok(out)
}

async fn node_logs(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path((node, id)): Path<(String, String)>,
    uri: Uri,
    body: Bytes,
) -> Result<Response, ApiError> {
    node_auth(&s, &headers, &node).await?;
    let id = run_id(&id)?;
    let mut stream = LogStream::Stdout;
    for (k, v) in query_pairs(&uri) {
        match (k.as_str(), v.as_str()) {
            ("stream", "stdout") => stream = LogStream::Stdout,
            ("stream", "stderr") => stream = LogStream::Stderr,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {k}={v} (expected stream=stdout|stderr)"
                )));
            }
        }
    }
    let body_was_empty = body.is_empty();
    // The bytes as they came (base64 only in the records clients read):
    // output need not be UTF-8, and a character may be split between two
    // appends. The store checks the run is this node's and active, so a
    // stale node learns it is stale even from an empty post.
    let max = s.config.max_log_bytes;
    let appended = s
        .db(move |st| st.append_log(&node, id, stream, &body, max))
        .await?;
    if !body_was_empty && appended != Appended::Dropped {
        let _ = s.log_events.send(id);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- background tasks ------------------------------------------------------

/// The longest `Idempotency-Key` accepted (it is stored with the run).
const MAX_IDEMPOTENCY_KEY: usize = 256;

/// The most submits committed in one transaction.
const SUBMIT_BATCH: usize = 256;

/// Group commit for submits: takes every submit waiting, stores them in
/// one transaction (one fsync), answers each, wakes the dispatcher, and
/// goes again. A lone submit is a batch of one; under a burst the batches
/// grow while the previous one commits, so the database sees a few
/// transactions instead of one per run, and the dispatcher's claims and
/// the nodes' reports are not queued behind hundreds of them.
async fn submit_loop(s: Shared, mut rx: mpsc::UnboundedReceiver<PendingSubmit>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < SUBMIT_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let (specs, answers): (Vec<RunSpec>, Vec<_>) = batch.into_iter().unzip();
        let store = s.store.clone();
        let results = tokio::task::spawn_blocking(move || store.submit_runs(&specs))
            .await
            .map_err(|e| StoreError::Backend(format!("submit task failed: {e}").into()))
            .and_then(|r| r);
        match results {
            Ok(results) => {
                if results.iter().any(|r| r.as_ref().is_ok_and(|x| x.created)) {
                    s.wake.notify_one();
                }
                for (tx, r) in answers.into_iter().zip(results) {
                    let _ = tx.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, runs = answers.len(), "storing submits failed");
                let msg = e.to_string();
                for tx in answers {
                    let _ = tx.send(Err(StoreError::Backend(msg.clone().into())));
                }
            }
        }
    }
}

async fn dispatch_loop(s: Shared) {
    loop {
        s.wake.notified().await;
        loop {
            let st = s.clone();
            let round = tokio::task::spawn_blocking(move || dispatch_round(&st)).await;
            match round {
                // More may be queued than one claim took: go again at once.
                Ok(Ok(DispatchRound {
                    took_limit: true,
                    assigned,
                    ..
                })) if assigned > 0 => {}
                Ok(Ok(_)) => break,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "dispatch failed");
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "dispatch task failed");
                    break;
                }
            }
        }
    }
}

struct DispatchRound {
    assigned: usize,
    /// The claim got as many runs as it asked for (there may be more).
    took_limit: bool,
}

/// One claim → place → assign → push round. Each run is pushed to its node
/// as soon as it is assigned, before the next one is placed.
fn dispatch_round(s: &AppState) -> Result<DispatchRound, StoreError> {
    let idle = DispatchRound {
        assigned: 0,
        took_limit: false,
    };
    let connected = s.connected_nodes();
    if connected.is_empty() {
        return Ok(idle);
    }
    let nodes: Vec<_> = s
        .store
        .list_nodes()?
        .into_iter()
        .filter(|n| connected.contains(&n.spec.id))
        .collect();
    let active = s.store.list_runs(&RunFilter {
        states: vec![RunState::Scheduled, RunState::Starting, RunState::Running],
        ..RunFilter::default()
    })?;
    let stale = u64::try_from(s.config.heartbeat_timeout.as_millis()).unwrap_or(u64::MAX);
    let view = ClusterView::build(&nodes, &active, s.clock.now(), stale);
    // Claim no more than could be placed now: in a burst every exit wakes
    // a round, and claiming a full batch only to release it again would
    // cost a write per queued run per freed slot.
    let free: usize = view.nodes.iter().map(|n| n.free() as usize).sum();
    if free == 0 {
        return Ok(idle);
    }
    let limit = free.min(CLAIM_BATCH);
    let claimed = s.store.claim_runs(&ClaimRequest {
        owner: s.owner.clone(),
        limit,
        lease_ms: CLAIM_LEASE_MS,
    })?;
    if claimed.is_empty() {
        return Ok(idle);
    }
    let mut scheduler = BatchScheduler::new(view);
    let mut unplaced = Vec::new();
    let mut assigned = 0;
    for run in &claimed {
        let Some(p) = scheduler.place_next(&RunRequirements::from(run)) else {
            unplaced.push(run.id);
            continue;
        };
        match s.store.assign_run(&s.owner, run.id, &p.node) {
            Ok(run) => {
                assigned += 1;
                let id = run.id;
                tracing::debug!(run = %id, node = %p.node, reason = ?p.reason, "assigned");
                if !s.push(&p.node, WorkMessage::Assign { run: Box::new(run) }) {
                    // It stays scheduled there; the node gets it when it
                    // reconnects, or it is lost with the node.
                    tracing::warn!(run = %id, node = %p.node, "node disconnected after assignment");
                }
            }
            // Cancelled meanwhile, or the claim lapsed: not ours any more.
            Err(StoreError::NotClaimed { .. } | StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    if !unplaced.is_empty() {
        s.store.release_claims(&s.owner, &unplaced)?;
    }
    Ok(DispatchRound {
        assigned,
        took_limit: claimed.len() == limit,
    })
}

/// Brings deployments up to their warm runners whenever woken: pushes the
/// [`prewarm::plan`] orders on the nodes' streams. Orders are targets, so
/// a wake-up that repeats one (the node has not reported the runners yet)
/// creates nothing twice.
async fn prewarm_loop(s: Shared) {
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

/// How often the credential table is reloaded, so revocations through
/// other replicas take effect here.
const CREDENTIALS_RELOAD: Duration = Duration::from_secs(1);

/// Reloads the credential table every [`CREDENTIALS_RELOAD`].
async fn credentials_loop(s: Shared) {
    let mut tick = tokio::time::interval(CREDENTIALS_RELOAD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = reload_credentials(&s).await {
            tracing::warn!(error = %e, "reloading node credentials failed");
        }
    }
}

/// Applies [`ServerConfig::log_retention`] every
/// [`ServerConfig::prune_interval`] (first right away). Several replicas
/// may prune at once; the store's transactions keep them apart.
async fn prune_loop(s: Shared) {
    let retention = s.config.log_retention;
    if retention == LogRetention::default() {
        return;
    }
    let mut tick = tokio::time::interval(s.config.prune_interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match s.db(move |st| st.prune_logs(&retention)).await {
            Ok(p) if p.runs > 0 => {
                tracing::info!(runs = p.runs, bytes = p.bytes, "pruned run logs");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning run logs failed"),
        }
    }
}

/// The lost-node reaper, the credential reloads and the log pruner (one
/// task, so the server stops all three by stopping it; each store call
/// runs on the blocking pool, so a long prune delays neither of the others).
async fn reap_loop(s: Shared) {
    tokio::join!(
        reap_lost_nodes(s.clone()),
        credentials_loop(s.clone()),
        prune_loop(s)
    );
}

async fn reap_lost_nodes(s: Shared) {
    // After a control-plane restart every node's last heartbeat is as old
    // as the downtime: give them one timeout to reconnect before their
    // runs are declared lost.
    tokio::time::sleep(s.config.heartbeat_timeout).await;
    let mut tick = tokio::time::interval(s.config.reap_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let stale = u64::try_from(s.config.heartbeat_timeout.as_millis()).unwrap_or(u64::MAX);
        let result = s
            .db(move |st| {
                let lost = st.mark_lost_runs(stale)?;
                let mut requeued = 0;
                for run in &lost {
                    if run.attempts < run.max_attempts.max(1)
                        && st
                            .transition_run(run.id, RunState::Lost, RunState::Queued)
                            .is_ok()
                    {
                        requeued += 1;
                    }
                }
                Ok((lost, requeued))
            })
            .await;
        match result {
            Ok((lost, requeued)) if !lost.is_empty() => {
                tracing::warn!(lost = lost.len(), requeued, "runs lost with their nodes");
                for r in &lost {
                    let _ = s.log_events.send(r.id);
                    // A node that is only cut off, its stream still open
                    // here, hears this once its link is back (or sees the
                    // run missing from its next stream's first line).
                    if let Some(node) = &r.node {
                        s.push(
                            node,
                            WorkMessage::Cancel {
                                run: r.id,
                                attempt: Some(r.attempts),
                            },
                        );
                    }
                }
                s.wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "reaping lost nodes failed"),
        }
    }
}
