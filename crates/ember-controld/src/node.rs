//! `ember node`: registers with the control plane, keeps one work stream
//! open, and executes each assigned run through the warm pool.
//!
//! Per run:
//!
//! ```text
//! Assign ─► report Accepted ─► pull (skipped if the image is present) ─► ImageReady
//!        ─► pool.acquire(key) ─► RunnerReady ─► exec ─► Started ─► output → logs endpoint
//!        ─► release (runner back to idle) ─► heartbeat (inventory) ─► Exited { code }
//! ```
//!
//! The heartbeat goes out before the exit report so that when the control
//! plane hears of the exit it already knows the runner is idle and can hand
//! it the next run with the same key.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ember_control::model::{Inventory, NodeReport, NodeSpec, Run, RunId};
use ember_oci::{Digest, Reference};
use ember_pool::{Canceller, Outcome, Pool, PoolConfig, RunnerImage, RunnerShape, RunnerSpec};
use ember_registry::{RegistryClient, RegistryOptions};
use ember_runtime::Runc;
use ember_store::{ImageRecord, PullOptions, SilentProgress, Store};
use tokio::sync::{Notify, Semaphore, mpsc};

use crate::api::{LogStream, WorkMessage};
use crate::client::{ClientError, ControlClient};

/// Settings of a node agent.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The control plane's URL.
    pub control: String,
    /// The node bearer token.
    pub token: Option<String>,
    /// This node's id.
    pub id: String,
    /// Runs executed at once.
    pub slots: u32,
    /// The node store (images) and the pool's and runc's state under it.
    pub root: PathBuf,
    /// A registry mirror (`ember cache`) to pull through.
    pub cache: Option<String>,
    /// The static `ember-agent` binary.
    pub agent: PathBuf,
    /// Labels for node selectors.
    pub labels: BTreeMap<String, String>,
    /// Interval of the liveness heartbeat (inventory changes are sent at
    /// once regardless).
    pub heartbeat: Duration,
}

/// Errors that stop the node agent.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The store could not be opened.
    #[error("opening the store: {0}")]
    Store(#[from] ember_store::StoreError),
    /// The pool could not be started.
    #[error("starting the warm pool: {0}")]
    Pool(#[from] ember_pool::PoolError),
    /// The registry client could not be built.
    #[error("registry client: {0}")]
    Registry(#[from] ember_registry::RegistryError),
    /// The control plane refused us.
    #[error(transparent)]
    Control(#[from] ClientError),
}

/// Cancellation state of one run on this node.
#[derive(Default)]
struct RunHandle {
    cancelled: AtomicBool,
    /// The exec to signal, once started.
    exec: Mutex<Option<(Canceller, u64)>>,
}

impl RunHandle {
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let exec = self.exec.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some((c, id)) = exec
            && let Err(e) = c.cancel(id, SIGKILL)
        {
            tracing::warn!(error = %e, "cancelling an exec");
        }
    }
}

/// SIGKILL (the same number on every Linux architecture), without a libc
/// dependency for one constant.
const SIGKILL: i32 = 9;

/// How many times a run event is sent while the control plane is
/// unreachable (one second apart), so a control-plane restart loses none.
const REPORT_ATTEMPTS: u32 = 60;

struct Agent {
    cfg: NodeConfig,
    client: ControlClient,
    store: Store,
    registry: Arc<RegistryClient>,
    pool: Arc<Pool>,
    /// Images pulled by this process, by the digest the control plane
    /// pinned (which may be an index's), so repeat runs skip the registry.
    images: Mutex<HashMap<String, ImageRecord>>,
    /// Pool runner key → the control plane's warm key, so idle runners can
    /// be reported in the control plane's terms.
    keys: Mutex<HashMap<String, String>>,
    runs: Mutex<HashMap<RunId, Arc<RunHandle>>>,
    slots: Arc<Semaphore>,
    inventory_changed: Notify,
}

/// Runs the node agent until `shutdown` completes; then destroys its
/// runners.
pub async fn run_node(
    cfg: NodeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let store = Store::open(&cfg.root)?;
    let mut pool_cfg = PoolConfig::new(
        cfg.root.join("pool"),
        Runc::new(cfg.root.join("runc")),
        &cfg.agent,
    );
    pool_cfg.store = Some(store.clone());
    pool_cfg.max_runners = (cfg.slots as usize * 2).max(4);
    let pool = Arc::new(Pool::new(pool_cfg)?);
    let recovered = pool.recover()?;
    if !recovered.runners.is_empty() {
        tracing::info!(
            n = recovered.runners.len(),
            "removed runners of an earlier node process"
        );
    }
    let registry = Arc::new(RegistryClient::new(RegistryOptions {
        mirrors: cfg.cache.iter().cloned().collect(),
        ..Default::default()
    })?);
    let client = ControlClient::new(&cfg.control, cfg.token.clone())?;
    let agent = Arc::new(Agent {
        slots: Arc::new(Semaphore::new(cfg.slots.max(1) as usize)),
        cfg,
        client,
        store,
        registry,
        pool: pool.clone(),
        images: Mutex::new(HashMap::new()),
        keys: Mutex::new(HashMap::new()),
        runs: Mutex::new(HashMap::new()),
        inventory_changed: Notify::new(),
    });
    // Fail fast on a wrong URL or token, rather than retrying forever.
    agent.heartbeat().await?;

    let hb = tokio::spawn(heartbeat_loop(agent.clone()));
    let work = tokio::spawn(work_loop(agent.clone()));
    shutdown.await;
    hb.abort();
    work.abort();
    // Runs in flight are cancelled: their runners are destroyed on release.
    let handles: Vec<_> = agent
        .runs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    let _ = tokio::task::spawn_blocking(move || {
        for h in handles {
            h.cancel();
        }
        pool.shutdown();
    })
    .await;
    Ok(())
}

impl Agent {
    fn inventory(&self) -> Inventory {
        let mut inv = Inventory::default();
        if let Ok(ix) = self.store.read_index() {
            for rec in ix.images.values() {
                let bytes = ix.bytes_of([rec]);
                inv.images.insert(rec.manifest.to_string(), bytes);
                if let Some(index) = &rec.index {
                    inv.images.insert(index.to_string(), bytes);
                }
            }
        }
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        for idle in self.pool.idle_runners() {
            if let Some(k) = keys.get(idle.key.as_str()) {
                *inv.idle_runners.entry(k.clone()).or_default() += 1;
            }
        }
        inv
    }

    async fn heartbeat(self: &Arc<Self>) -> Result<(), ClientError> {
        let me = self.clone();
        let inventory = tokio::task::spawn_blocking(move || me.inventory())
            .await
            .unwrap_or_default();
        let spec = NodeSpec {
            id: self.cfg.id.clone(),
            slots: self.cfg.slots,
            labels: self.cfg.labels.clone(),
            inventory,
        };
        self.client.put_node(&spec).await.map(|_| ())
    }

    async fn report(&self, run: RunId, r: NodeReport) {
        // A control plane that is restarting must still hear how the run
        // went, or it would stay active forever: retry while it is
        // unreachable. An answer (e.g. 409: cancelled or reassigned
        // meanwhile) is final.
        for attempt in 0..REPORT_ATTEMPTS {
            match self.client.report(&self.cfg.id, run, &r).await {
                Ok(_) => return,
                Err(e @ ClientError::Http { .. }) if attempt + 1 < REPORT_ATTEMPTS => {
                    tracing::warn!(run = %run, error = %e, "report failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    tracing::debug!(run = %run, error = %e, "report refused");
                    return;
                }
            }
        }
    }
}

async fn heartbeat_loop(agent: Arc<Agent>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(agent.cfg.heartbeat) => {}
            () = agent.inventory_changed.notified() => {}
        }
        if let Err(e) = agent.heartbeat().await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}

/// Keeps the work stream open, reconnecting when it drops.
async fn work_loop(agent: Arc<Agent>) {
    loop {
        if let Err(e) = work_once(&agent).await {
            tracing::warn!(error = %e, "work stream ended");
        }
        // Back off before reconnecting; this delay is only ever paid after
        // a lost connection, never on the path of a run.
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Err(e) = agent.heartbeat().await {
            tracing::warn!(error = %e, "re-registering failed");
        }
    }
}

async fn work_once(agent: &Arc<Agent>) -> Result<(), ClientError> {
    let mut resp = agent.client.work(&agent.cfg.id).await?;
    tracing::info!(node = %agent.cfg.id, "connected to the control plane");
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = resp.chunk().await.map_err(|e| ClientError::Http {
            url: agent.client.base().to_owned(),
            detail: e.to_string(),
        })?;
        let Some(chunk) = chunk else { return Ok(()) };
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            match serde_json::from_slice::<WorkMessage>(&line) {
                Ok(msg) => handle(agent, msg),
                Err(e) => tracing::warn!(error = %e, "bad work message"),
            }
        }
    }
}

fn handle(agent: &Arc<Agent>, msg: WorkMessage) {
    match msg {
        WorkMessage::Assign { run } => {
            let handle = Arc::new(RunHandle::default());
            {
                let mut runs = agent.runs.lock().unwrap_or_else(|e| e.into_inner());
                if runs.contains_key(&run.id) {
                    // Sent again after a reconnect; already ours.
                    return;
                }
                runs.insert(run.id, handle.clone());
            }
            let agent = agent.clone();
            tokio::spawn(async move {
                let id = run.id;
                let permit = agent.slots.clone().acquire_owned().await;
                execute(&agent, *run, handle).await;
                drop(permit);
                agent
                    .runs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            });
        }
        WorkMessage::Active { runs } => {
            let lost: Vec<RunId> = {
                let mine = agent.runs.lock().unwrap_or_else(|e| e.into_inner());
                runs.into_iter().filter(|r| !mine.contains_key(r)).collect()
            };
            for id in lost {
                let agent = agent.clone();
                tokio::spawn(async move {
                    tracing::warn!(run = %id, "the control plane has a run this node does not know; failing it");
                    let error = "the node restarted while the run was active".to_owned();
                    agent.report(id, NodeReport::Failed { error }).await;
                });
            }
        }
        WorkMessage::Cancel { run } => {
            let h = agent
                .runs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&run)
                .cloned();
            if let Some(h) = h {
                tokio::task::spawn_blocking(move || h.cancel());
            }
        }
    }
}

/// What the blocking executor tells the async side, in order.
enum Event {
    RunnerReady,
    Started,
    Output(LogStream, Vec<u8>),
}

async fn execute(agent: &Arc<Agent>, run: Run, handle: Arc<RunHandle>) {
    let id = run.id;
    agent.report(id, NodeReport::Accepted).await;
    let record = match ensure_image(agent, &run).await {
        Ok(r) => r,
        Err(error) => {
            agent.report(id, NodeReport::Failed { error }).await;
            return;
        }
    };
    agent.report(id, NodeReport::ImageReady).await;
    agent.inventory_changed.notify_one();

    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let exec = {
        let agent = agent.clone();
        let run = run.clone();
        tokio::task::spawn_blocking(move || exec_blocking(&agent, &run, &record, &handle, &tx))
    };
    // Events are posted in order, so every byte of output is stored before
    // the exit is reported (log followers stop at the final state).
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::RunnerReady => agent.report(id, NodeReport::RunnerReady).await,
            Event::Started => agent.report(id, NodeReport::Started).await,
            Event::Output(stream, data) => {
                if let Err(e) = agent
                    .client
                    .append_log(&agent.cfg.id, id, stream, Bytes::from(data))
                    .await
                {
                    tracing::debug!(run = %id, error = %e, "log append refused");
                }
            }
        }
    }
    let result = match exec.await {
        Ok(r) => r,
        Err(e) => Err(format!("executor failed: {e}")),
    };
    // The runner is idle again (if it was recycled): say so first.
    if let Err(e) = agent.heartbeat().await {
        tracing::warn!(error = %e, "heartbeat failed");
    }
    let report = match result {
        Ok(code) => NodeReport::Exited { code },
        Err(error) => NodeReport::Failed { error },
    };
    agent.report(id, report).await;
}

/// The image of `run` in the store, pulled (through the cache if any) when
/// it is not there.
async fn ensure_image(agent: &Arc<Agent>, run: &Run) -> Result<ImageRecord, String> {
    let known = agent
        .images
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&run.image.digest)
        .cloned();
    if let Some(rec) = known
        && agent.store.missing_layers(&rec).is_empty()
    {
        return Ok(rec);
    }
    let reference: Reference = run
        .image
        .reference
        .parse()
        .map_err(|e| format!("image reference {:?}: {e}", run.image.reference))?;
    let digest: Digest = run
        .image
        .digest
        .parse()
        .map_err(|e| format!("image digest {:?}: {e}", run.image.digest))?;
    let r = reference.with_digest(digest);
    let report = ember_store::pull(
        &agent.store,
        &agent.registry,
        &r,
        &PullOptions::default(),
        Arc::new(SilentProgress),
    )
    .await
    .map_err(|e| format!("pulling {r}: {e}"))?;
    agent
        .images
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(run.image.digest.clone(), report.image.clone());
    Ok(report.image)
}

/// Acquires a runner, runs the process and releases the runner; returns
/// the exit code (128+N for signal N) or why the run could not run.
fn exec_blocking(
    agent: &Agent,
    run: &Run,
    record: &ImageRecord,
    handle: &RunHandle,
    tx: &mpsc::UnboundedSender<Event>,
) -> Result<i32, String> {
    let image = RunnerImage::from_store(&agent.store, record)
        .map_err(|e| format!("reading the image config: {e}"))?;
    let argv = ember_runtime::spec::process_args(&image.config, Some(&run.command))
        .map_err(|e| format!("command: {e}"))?;
    let spec = RunnerSpec::new(image, shape_of(run), run.recycle_key.clone());
    let mut lease = agent
        .pool
        .acquire(&spec)
        .map_err(|e| format!("starting a runner: {e}"))?;
    agent
        .keys
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(lease.key().as_str().to_owned(), run.warm_key());
    let _ = tx.send(Event::RunnerReady);
    if handle.cancelled.load(Ordering::SeqCst) {
        agent.pool.release(lease, Outcome::Succeeded);
        return Err("cancelled before it started".into());
    }
    let mut req = lease.command(argv);
    for (k, v) in &run.env {
        req.env.retain(|e| !e.starts_with(&format!("{k}=")));
        req.env.push(format!("{k}={v}"));
    }
    req.timeout_ms = run.timeout_ms;
    let canceller = lease.canceller();
    let result = lease.exec_with(
        &req,
        &mut |started| {
            *handle.exec.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((canceller.clone(), started.exec_id));
            let _ = tx.send(Event::Started);
            // A cancel that arrived between the check above and now.
            if handle.cancelled.load(Ordering::SeqCst) {
                let _ = canceller.cancel(started.exec_id, SIGKILL);
            }
        },
        &mut |is_stderr, data| {
            let stream = if is_stderr {
                LogStream::Stderr
            } else {
                LogStream::Stdout
            };
            let _ = tx.send(Event::Output(stream, data.to_vec()));
        },
    );
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            agent.pool.release(lease, Outcome::Failed);
            return Err(format!("exec: {e}"));
        }
    };
    // A non-zero exit is the program's answer, not a sign the runner is
    // damaged (the pool still health-checks it): keep it warm. Signals,
    // timeouts and cancels may leave it in any state: discard it.
    let outcome = if result.spawn_error.is_none()
        && !result.timed_out
        && !result.cancelled
        && result.signal.is_none()
    {
        Outcome::Succeeded
    } else {
        Outcome::Failed
    };
    agent.pool.release(lease, outcome);
    if let Some(e) = result.spawn_error {
        return Err(format!("starting the process: {e}"));
    }
    Ok(match (result.exit_code, result.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 255,
    })
}

/// The runner shape for a run's resources.
fn shape_of(run: &Run) -> RunnerShape {
    let mut shape = RunnerShape::default();
    if run.resources.memory_bytes > 0 {
        shape.memory_bytes = i64::try_from(run.resources.memory_bytes).ok();
    }
    if run.resources.cpu_millis > 0 {
        shape.cpus = Some(f64::from(run.resources.cpu_millis) / 1000.0);
    }
    shape
}
