//! `ember node`: registers with the control plane, keeps one work stream
//! open, and executes each assigned run through the warm pool.
//!
//! Per run:
//!
//! ```text
//! Assign ─► [Accepted ─► pull, only if the image is not here] ─► ImageReady
//!        ─► pool.acquire(key) ─► RunnerReady ─► exec ─► Started ─► output → logs endpoint
//!        ─► release (runner back to idle) ─► Exited { code, runner_idle }
//! ```
//!
//! Each run's reports and output go out in order from one loop per run.
//! Reports of all runs go through the node's one reporter, which posts
//! whatever is queued as one request (`POST /v1/nodes/{id}/events`) while
//! its previous request is in flight: at low load a report goes out at
//! once; under a burst the reports of many runs share one request and one
//! store transaction. The exit report says whether the runner is idle
//! again, which is what lets the control plane hand it the next queued run
//! with the same key at once; the heartbeat with the new inventory follows
//! off the run's path.
//!
//! A `prewarm` order (keep N idle runners of a deployment's key) pulls the
//! image if needed and creates the missing runners idle in the pool
//! ([`Pool::prewarm`]); the next heartbeat reports them.
//!
//! The work stream is watched for silence: the server announces its
//! keepalive interval in the first line, and three intervals without a
//! byte mean the connection is dead (a NAT or proxy dropped it without a
//! reset). The node then reconnects with exponential backoff and the new
//! stream's first line reconciles the runs, as after any reconnect: runs
//! the control plane has active here that this process does not know (an
//! earlier process had them) are reported lost, and runs this process
//! executes that are no longer its own (lost and retried while it was cut
//! off) are stopped. Reports carry the attempt they are about, so a stale
//! attempt's are refused.
//!
//! One node agent runs per root (`<root>/node.lock`), and each starts a
//! watchdog process ([`watch_node`]) that destroys the runners if the
//! agent dies without shutting down.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ember_control::model::{Inventory, NodeReport, NodeSpec, PinnedImage, Resources, Run, RunId};
use ember_oci::{Digest, Reference};
use ember_pool::{
    Canceller, Outcome, Pool, PoolConfig, Released, RunnerImage, RunnerShape, RunnerSpec,
};
use ember_registry::{RegistryClient, RegistryOptions};
use ember_runtime::Runc;
use ember_store::{ImageRecord, PullOptions, SilentProgress, Store};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

use ember_api::client::{ClientError, ControlClient};
use ember_api::wire::{LogStream, RunReports, WorkMessage};

/// Settings of a node agent.
#[derive(Debug, Clone)]
pub struct NodeAgentConfig {
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
    /// How to start this node's watchdog ([`watch_node`] in a process of
    /// its own), which destroys the runners if this process dies without
    /// shutting down; `None`: no watchdog (runners of a killed node then
    /// stay until the next node process starts on the root).
    pub watchdog: Option<WatchdogCommand>,
}

/// The command line that runs [`watch_node`] for a node's root (the
/// `ember` binary knows its own subcommand for it). It is started with
/// its standard input the read end of a pipe whose write end only the
/// node process holds.
#[derive(Debug, Clone)]
pub struct WatchdogCommand {
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<std::ffi::OsString>,
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
    /// The node's root could not be locked, or the watchdog started.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// Another node agent is running on this root.
    #[error("another node agent holds {}", .0.display())]
    RootInUse(PathBuf),
}

/// `<root>/node.lock`: `flock`ed by the node agent for its whole life (and
/// briefly by a watchdog cleaning up after a dead one), so one root has
/// one node agent at a time and a watchdog can tell whether a new agent
/// has taken over.
const NODE_LOCK: &str = "node.lock";

/// How long a starting node waits for the root's lock: a dead
/// predecessor's watchdog holds it while it destroys the old runners.
const ROOT_LOCK_WAIT: Duration = Duration::from_secs(60);

/// Tries to take `<root>/node.lock` without waiting; `Ok(None)` if another
/// process holds it. The descriptor is close-on-exec (std's default), so
/// runc and the containers never hold it after this process dies.
fn try_lock_root(root: &Path) -> Result<Option<std::fs::File>, NodeError> {
    std::fs::create_dir_all(root).map_err(|source| NodeError::Io {
        what: "creating",
        path: root.to_path_buf(),
        source,
    })?;
    let path = root.join(NODE_LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| NodeError::Io {
            what: "opening",
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(source)) => Err(NodeError::Io {
            what: "locking",
            path,
            source,
        }),
    }
}

/// Takes `<root>/node.lock`, waiting up to [`ROOT_LOCK_WAIT`] for a
/// watchdog that is still cleaning up after a dead predecessor.
async fn lock_root(root: &Path) -> Result<std::fs::File, NodeError> {
    let deadline = Instant::now() + ROOT_LOCK_WAIT;
    loop {
        if let Some(f) = try_lock_root(root)? {
            return Ok(f);
        }
        if Instant::now() >= deadline {
            return Err(NodeError::RootInUse(root.join(NODE_LOCK)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long a watchdog waits for a dead agent's root lock to be free.
const WATCHDOG_LOCK_WAIT: Duration = Duration::from_secs(2);

/// The pool's configuration for a node root; the same for the node and
/// for its watchdog, so both see the same runners.
fn pool_config(root: &Path, agent: &Path, store: Store, slots: u32) -> PoolConfig {
    let mut pool_cfg = PoolConfig::new(root.join("pool"), Runc::new(root.join("runc")), agent);
    pool_cfg.store = Some(store);
    pool_cfg.max_runners = (slots as usize * 2).max(4);
    pool_cfg
}

/// Starts `cmd` with its stdin the read end of a new pipe; returns the
/// write end, which the node keeps (close-on-exec) until it returns.
fn spawn_watchdog(cmd: &WatchdogCommand) -> Result<std::io::PipeWriter, NodeError> {
    use std::os::unix::process::CommandExt;
    let err = |what| {
        let path = cmd.program.clone();
        move |source| NodeError::Io { what, path, source }
    };
    let (reader, writer) = std::io::pipe().map_err(err("making a pipe for"))?;
    let mut child = std::process::Command::new(&cmd.program)
        .args(&cmd.args)
        .stdin(reader)
        .stdout(std::process::Stdio::null())
        // Its own process group: a Ctrl-C meant for the node (which then
        // cleans up itself) or a signal to the node's group leaves it be.
        .process_group(0)
        .spawn()
        .map_err(err("starting the watchdog"))?;
    // Reaped when it ends (after this process's runners are gone).
    std::thread::spawn(move || child.wait());
    Ok(writer)
}

/// What [`watch_node`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchReport {
    /// A new node agent had the root already: it cleans up itself.
    pub taken_over: bool,
    /// Runners of the dead node destroyed.
    pub runners: Vec<String>,
}

/// The watchdog of a node agent: blocks until `stdin` reaches its end (the
/// node process has exited, however it exited: the kernel closes its end
/// of the pipe even after `kill -9`), then, unless a new node agent holds
/// the root already, destroys every runner the dead one left (thawing
/// frozen ones first: a frozen task ignores even SIGKILL) and removes its
/// store's temporary work, under the root's lock so a node starting
/// meanwhile waits for it. After a clean shutdown there is nothing left to
/// destroy. Runs in a process of its own (`ember node` starts it), never
/// inside the node.
///
/// There is no grace period: nothing adopts a dead node's runners (a
/// restarted node destroys them at start too), so a run whose node agent
/// died is over, and its container is stopped as soon as that is known;
/// the control plane retries the run.
pub fn watch_node(
    root: &Path,
    agent: &Path,
    mut stdin: impl std::io::Read,
) -> Result<WatchReport, NodeError> {
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A broken pipe is an ended one.
            Err(_) => break,
        }
    }
    // The dying agent closes its descriptors one by one: the pipe may end
    // a moment before its lock is let go. Still held after a while, the
    // lock is a new agent's, which recovers the leftovers itself.
    let deadline = Instant::now() + WATCHDOG_LOCK_WAIT;
    let lock = loop {
        if let Some(lock) = try_lock_root(root)? {
            break lock;
        }
        if Instant::now() >= deadline {
            return Ok(WatchReport {
                taken_over: true,
                runners: Vec::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let store = Store::open(root)?;
    let pool = Pool::new(pool_config(root, agent, store, 1))?;
    let recovered = pool.recover();
    pool.shutdown();
    drop(lock);
    Ok(WatchReport {
        taken_over: false,
        runners: recovered?.runners,
    })
}

/// Cancellation state of one run on this node.
#[derive(Default)]
struct RunHandle {
    /// The attempt being executed (the assignment's `attempts`).
    attempt: u32,
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

/// How long a new work stream may stay silent before its first line (which
/// the server sends at once) tells the keepalive interval.
const FIRST_LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// Silence on the work stream longer than this many keepalive intervals
/// means the connection is dead.
const KEEPALIVE_MISSES: u32 = 3;

/// Reconnect backoff: the first retry after a second (as quick as a
/// control-plane restart needs), doubling up to half a minute.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A pre-warm that failed (bad image, no space) is not tried again for
/// this key until this has passed, though the control plane repeats the
/// order at every heartbeat.
const PREWARM_RETRY: Duration = Duration::from_secs(30);

pub(crate) struct NodeAgent {
    cfg: NodeAgentConfig,
    client: ControlClient,
    store: Store,
    registry: Arc<RegistryClient>,
    pool: Arc<Pool>,
    /// Images pulled by this process, by the digest the control plane
    /// pinned (which may be an index's), so repeat runs skip the registry.
    images: Mutex<HashMap<String, ImageRecord>>,
    /// Images as the pool runs them, by manifest digest: content-addressed,
    /// so never stale, and a warm run need not read and parse the image
    /// config again.
    runner_images: Mutex<HashMap<Digest, RunnerImage>>,
    /// Pool runner key → the control plane's warm key, so idle runners can
    /// be reported in the control plane's terms.
    keys: Mutex<HashMap<String, String>>,
    runs: Mutex<HashMap<RunId, Arc<RunHandle>>>,
    /// Warm key → runners being created for a pre-warm order, so a
    /// repeated order does not create them twice.
    prewarming: Mutex<HashMap<String, u32>>,
    /// Warm key → when a pre-warm of it last failed.
    prewarm_failed: Mutex<HashMap<String, Instant>>,
    slots: Arc<Semaphore>,
    inventory_changed: Notify,
    /// Queue of the node's reporter ([`report_loop`]).
    reporter: mpsc::UnboundedSender<ReportJob>,
}

/// Runs the node agent until `shutdown` completes; then destroys its
/// runners.
pub async fn run_node(
    cfg: NodeAgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    // One agent per root, and never beside a watchdog still cleaning up
    // after a dead predecessor: held until this function returns.
    let _root_lock = lock_root(&cfg.root).await?;
    // Its end of the pipe closes when this process ends, however it ends.
    let _watchdog = cfg.watchdog.as_ref().map(spawn_watchdog).transpose()?;
    let store = Store::open(&cfg.root)?;
    let pool_cfg = pool_config(&cfg.root, &cfg.agent, store.clone(), cfg.slots);
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
    let (reporter, reports) = mpsc::unbounded_channel();
    let agent = Arc::new(NodeAgent {
        reporter,
        slots: Arc::new(Semaphore::new(cfg.slots.max(1) as usize)),
        cfg,
        client,
        store,
        registry,
        pool: pool.clone(),
        images: Mutex::new(HashMap::new()),
        runner_images: Mutex::new(HashMap::new()),
        keys: Mutex::new(HashMap::new()),
        runs: Mutex::new(HashMap::new()),
        prewarming: Mutex::new(HashMap::new()),
        prewarm_failed: Mutex::new(HashMap::new()),
        inventory_changed: Notify::new(),
    });
    // Fail fast on a wrong URL or token, rather than retrying forever.
    agent.heartbeat().await?;

    let reporter = tokio::spawn(report_loop(agent.clone(), reports));
    let hb = tokio::spawn(heartbeat_loop(agent.clone()));
    let work = tokio::spawn(work_loop(agent.clone()));
    shutdown.await;
    hb.abort();
    work.abort();
    reporter.abort();
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

impl NodeAgent {
    fn inventory(&self) -> Inventory {
        let mut inv = Inventory {
            free_disk_bytes: self.store.free_bytes().unwrap_or(0),
            ..Inventory::default()
        };
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

    /// `record` as the pool runs it, read from the store the first time.
    fn runner_image(&self, record: &ImageRecord) -> Result<RunnerImage, String> {
        if let Some(image) = self
            .runner_images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&record.manifest)
        {
            return Ok(image.clone());
        }
        let image = RunnerImage::from_store(&self.store, record)
            .map_err(|e| format!("reading the image config: {e}"))?;
        self.runner_images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(record.manifest.clone(), image.clone());
        Ok(image)
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

    /// Reports on `run`; `attempt` (the assignment's `attempts`) fences
    /// the report against a later attempt of the same run.
    async fn report(&self, run: RunId, attempt: Option<u32>, r: NodeReport) {
        self.report_all(run, attempt, vec![(r, Instant::now())])
            .await;
    }

    /// Hands `reports` (in order) to the reporter and waits until they are
    /// through (applied, refused, or given up on), so what the caller sends
    /// next reaches the control plane after them.
    async fn report_all(
        &self,
        run: RunId,
        attempt: Option<u32>,
        reports: Vec<(NodeReport, Instant)>,
    ) {
        tracing::debug!(run = %run, ?reports, "reporting");
        let (done, through) = oneshot::channel();
        let (reports, at): (Vec<_>, Vec<_>) = reports.into_iter().unzip();
        let job = ReportJob {
            reports: RunReports {
                attempt,
                ..RunReports::new(run, reports)
            },
            at,
            done,
        };
        if self.reporter.send(job).is_ok() {
            let _ = through.await;
        }
    }

    /// Posts one batch of reports, retrying while the control plane is
    /// unreachable: a control plane that is restarting must still hear how
    /// the runs went, or they would stay active forever. An answer (say a
    /// run cancelled or reassigned meanwhile) is final.
    async fn post_reports(&self, batch: &[RunReports]) {
        for attempt in 0..REPORT_ATTEMPTS {
            match self.client.report_batch(&self.cfg.id, batch).await {
                Ok(answer) => {
                    for r in answer.results {
                        if let Some(e) = r.error {
                            tracing::debug!(run = %r.run, error = %e.message, "report refused");
                        }
                    }
                    return;
                }
                Err(e @ ClientError::Http { .. }) if attempt + 1 < REPORT_ATTEMPTS => {
                    tracing::warn!(runs = batch.len(), error = %e, "report failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    tracing::warn!(runs = batch.len(), error = %e, "reports refused");
                    return;
                }
            }
        }
    }
}

/// One run's reports queued for the reporter, and whom to tell when they
/// are through.
struct ReportJob {
    reports: RunReports,
    /// When each report happened, for its age at sending.
    at: Vec<Instant>,
    done: oneshot::Sender<()>,
}

impl ReportJob {
    /// The reports, dated relative to now.
    fn dated(self) -> (RunReports, oneshot::Sender<()>) {
        let mut reports = self.reports;
        let ages: Vec<u64> = self
            .at
            .iter()
            .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX))
            .collect();
        if ages.iter().any(|&a| a > 0) {
            reports.ages_ms = ages;
        }
        (reports, self.done)
    }
}

/// Most runs' reports in one request.
const REPORT_BATCH: usize = 256;

/// The node's one reporter: posts whatever reports are queued as one
/// request, one request at a time. At low load that is a request per
/// report, sent at once; under a burst, the reports of every run that
/// moved while a request was in flight share the next one (and its
/// transaction in the store), which is what keeps the control plane's
/// work per run small.
async fn report_loop(agent: Arc<NodeAgent>, mut rx: mpsc::UnboundedReceiver<ReportJob>) {
    let (mut batch, mut waiters) = (Vec::new(), Vec::new());
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(job) = next {
            let (reports, done) = job.dated();
            batch.push(reports);
            waiters.push(done);
            next = if batch.len() < REPORT_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        agent.post_reports(&batch).await;
        batch.clear();
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

/// Inventory changes are sent at most this often: under a burst every run
/// changes the idle-runner count, and nothing on a run's path waits for
/// the heartbeat (the exit report carries what the warm hand-off needs).
const INVENTORY_MIN_GAP: Duration = Duration::from_millis(100);

async fn heartbeat_loop(agent: Arc<NodeAgent>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(agent.cfg.heartbeat) => {}
            () = agent.inventory_changed.notified() => {}
        }
        let sent = tokio::time::Instant::now();
        if let Err(e) = agent.heartbeat().await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
        tokio::time::sleep_until(sent + INVENTORY_MIN_GAP).await;
    }
}

/// Keeps the work stream open, reconnecting when it drops or goes silent.
async fn work_loop(agent: Arc<NodeAgent>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut connected = false;
        if let Err(e) = work_once(&agent, &mut connected).await {
            tracing::warn!(error = %e, "work stream ended");
        }
        // A stream that delivered its first line was a working connection:
        // the next failure starts the backoff over.
        if connected {
            backoff = BACKOFF_MIN;
        }
        // Back off before reconnecting; this delay is only ever paid after
        // a lost connection, never on the path of a run. The jitter keeps
        // a fleet of nodes from reconnecting in lockstep.
        tokio::time::sleep(backoff + jitter(backoff / 5)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        if let Err(e) = agent.heartbeat().await {
            tracing::warn!(error = %e, "re-registering failed");
        }
    }
}

/// Up to `max`, from the clock's low bits (no randomness crate for this).
fn jitter(max: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let max_ms = u32::try_from(max.as_millis()).unwrap_or(u32::MAX).max(1);
    Duration::from_millis(u64::from(nanos % max_ms))
}

/// Reads one work stream until it ends, fails or stays silent past three
/// keepalive intervals; sets `connected` once its first line arrived.
async fn work_once(agent: &Arc<NodeAgent>, connected: &mut bool) -> Result<(), ClientError> {
    let mut resp = agent.client.work(&agent.cfg.id).await?;
    tracing::info!(node = %agent.cfg.id, "connected to the control plane");
    let mut buf: Vec<u8> = Vec::new();
    // Until the first line says otherwise (a server without keepalives
    // says nothing), no silence limit applies after it.
    let mut silence = Some(FIRST_LINE_TIMEOUT);
    loop {
        let next = resp.chunk();
        let chunk = match silence {
            Some(limit) => match tokio::time::timeout(limit, next).await {
                Ok(c) => c,
                Err(_) => {
                    return Err(ClientError::Http {
                        url: agent.client.base().to_owned(),
                        detail: format!(
                            "work stream silent for {} ms; reconnecting",
                            limit.as_millis()
                        ),
                    });
                }
            },
            None => next.await,
        };
        let chunk = chunk.map_err(|e| ClientError::Http {
            url: agent.client.base().to_owned(),
            detail: e.to_string(),
        })?;
        let Some(chunk) = chunk else { return Ok(()) };
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            match serde_json::from_slice::<WorkMessage>(&line) {
                Ok(msg) => {
                    if let WorkMessage::Active { keepalive_ms, .. } = &msg {
                        *connected = true;
                        silence = keepalive_ms.map(|ms| {
                            Duration::from_millis(ms.max(1)).saturating_mul(KEEPALIVE_MISSES)
                        });
                    }
                    handle(agent, msg);
                }
                Err(e) => tracing::warn!(error = %e, "bad work message"),
            }
        }
    }
}

fn handle(agent: &Arc<NodeAgent>, msg: WorkMessage) {
    match msg {
        WorkMessage::Assign { run } => {
            let handle = Arc::new(RunHandle {
                attempt: run.attempts,
                ..RunHandle::default()
            });
            {
                let mut runs = agent.runs.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(old) = runs.get(&run.id) {
                    if old.attempt == run.attempts {
                        // Sent again after a reconnect; already ours.
                        return;
                    }
                    // An earlier attempt, which the control plane gave up
                    // on (lost while this node was cut off) and retried
                    // here: stop it (its reports are refused by now) and
                    // run the new one.
                    tracing::warn!(run = %run.id, old = old.attempt, new = run.attempts, "a new attempt of a run still executing here; stopping the old one");
                    let old = old.clone();
                    tokio::task::spawn_blocking(move || old.cancel());
                }
                runs.insert(run.id, handle.clone());
            }
            let agent = agent.clone();
            tracing::debug!(run = %run.id, "assigned");
            tokio::spawn(async move {
                let id = run.id;
                let permit = agent.slots.clone().acquire_owned().await;
                tracing::debug!(run = %id, "slot taken");
                execute(&agent, *run, handle.clone()).await;
                drop(permit);
                let mut runs = agent.runs.lock().unwrap_or_else(|e| e.into_inner());
                // Not a newer attempt's entry.
                if runs.get(&id).is_some_and(|h| Arc::ptr_eq(h, &handle)) {
                    runs.remove(&id);
                }
            });
        }
        WorkMessage::Active {
            runs, scheduled, ..
        } => {
            let (lost, stale): (Vec<RunId>, Vec<(RunId, Arc<RunHandle>)>) = {
                let mine = agent.runs.lock().unwrap_or_else(|e| e.into_inner());
                // Everything here came before this stream: what the control
                // plane no longer gives this node (lost while it was cut
                // off, and retried elsewhere) must stop, not run on beside
                // the retry.
                let stale = match &scheduled {
                    Some(scheduled) => mine
                        .iter()
                        .filter(|(id, _)| !runs.contains(id) && !scheduled.contains(id))
                        .map(|(id, h)| (*id, h.clone()))
                        .collect(),
                    None => Vec::new(),
                };
                let lost = runs.into_iter().filter(|r| !mine.contains_key(r)).collect();
                (lost, stale)
            };
            for (id, h) in stale {
                tracing::warn!(run = %id, "the control plane no longer gives this node the run; stopping it");
                tokio::task::spawn_blocking(move || h.cancel());
            }
            for id in lost {
                let agent = agent.clone();
                tokio::spawn(async move {
                    // Its process went with an earlier node process (whose
                    // runners this one destroyed at start): the run is lost,
                    // not failed, and the control plane retries it at once
                    // while attempts remain.
                    tracing::warn!(run = %id, "the control plane has a run this node does not know; reporting it lost");
                    let error = "the node restarted while the run was active".to_owned();
                    agent.report(id, None, NodeReport::Lost { error }).await;
                });
            }
        }
        WorkMessage::Cancel { run, attempt } => {
            let h = agent
                .runs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&run)
                .filter(|h| attempt.is_none_or(|a| a == h.attempt))
                .cloned();
            if let Some(h) = h {
                tokio::task::spawn_blocking(move || h.cancel());
            }
        }
        WorkMessage::Keepalive => {}
        WorkMessage::Prewarm {
            deployment,
            key,
            image,
            resources,
            recycle_key,
            readonly_rootfs,
            count,
        } => {
            let agent = agent.clone();
            tokio::spawn(async move {
                let order = PrewarmOrder {
                    key,
                    image,
                    shape: shape_of(&resources, readonly_rootfs),
                    // The scope the deployment's runs recycle in, so that
                    // they find these runners.
                    scope: ember_control::model::recycle_scope(
                        Some(&deployment),
                        recycle_key.as_deref(),
                    ),
                    count,
                };
                match prewarm(&agent, &order).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(%deployment, n, "pre-warmed runners");
                        agent.inventory_changed.notify_one();
                    }
                    Err(error) => {
                        tracing::warn!(%deployment, %error, "pre-warming failed");
                        agent
                            .prewarm_failed
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(order.key, Instant::now());
                    }
                }
            });
        }
    }
}

/// A `prewarm` message's order.
struct PrewarmOrder {
    key: String,
    image: PinnedImage,
    shape: RunnerShape,
    /// The recycling scope: the pool's recycling key.
    scope: Option<String>,
    count: u32,
}

/// Creates the idle runners `order` is missing (counting those idle and
/// those being created for its key); returns how many it created.
async fn prewarm(agent: &Arc<NodeAgent>, order: &PrewarmOrder) -> Result<u32, String> {
    let failed_at = agent
        .prewarm_failed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&order.key)
        .copied();
    if failed_at.is_some_and(|t| t.elapsed() < PREWARM_RETRY) {
        return Ok(0);
    }
    let record = ensure_image(agent, &order.image).await?;
    let agent = agent.clone();
    let key = order.key.clone();
    let (shape, scope, count) = (order.shape.clone(), order.scope.clone(), order.count);
    tokio::task::spawn_blocking(move || {
        let image = RunnerImage::from_store(&agent.store, &record)
            .map_err(|e| format!("reading the image config: {e}"))?;
        let spec = RunnerSpec::new(image, shape, scope);
        let pool_key = spec.key().as_str().to_owned();
        agent
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pool_key.clone(), key.clone());
        // Decided under the lock, so two copies of the order arriving
        // together create the missing runners once.
        let missing = {
            let mut creating = agent.prewarming.lock().unwrap_or_else(|e| e.into_inner());
            let idle = agent
                .pool
                .idle_runners()
                .iter()
                .filter(|r| r.key.as_str() == pool_key)
                .count();
            let have = u32::try_from(idle)
                .unwrap_or(u32::MAX)
                .saturating_add(creating.get(&key).copied().unwrap_or(0));
            let missing = count.saturating_sub(have);
            if missing > 0 {
                *creating.entry(key.clone()).or_default() += missing;
            }
            missing
        };
        let mut created = 0;
        let mut result = Ok(());
        for _ in 0..missing {
            // Once one fails, the rest would too: give up their share.
            if result.is_ok() {
                match agent.pool.prewarm(&spec) {
                    Ok(id) => {
                        tracing::debug!(%id, key = %key, "pre-warmed runner");
                        created += 1;
                    }
                    // The node is stopping: not a failure of the order.
                    Err(ember_pool::PoolError::ShutDown) => result = Err(None),
                    Err(e) => result = Err(Some(format!("creating a runner: {e}"))),
                }
            }
            // Only now that the runner is idle (and so counted there) does
            // it stop counting as being created.
            let mut creating = agent.prewarming.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = creating.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    creating.remove(&key);
                }
            }
        }
        match result {
            Ok(()) | Err(None) => Ok(created),
            Err(Some(e)) => Err(e),
        }
    })
    .await
    .map_err(|e| format!("pre-warm task failed: {e}"))?
}

/// What the blocking executor tells the async side, in order.
enum Event {
    /// A report, and when it happened.
    Report(NodeReport, Instant),
    Output(LogStream, Vec<u8>),
}

impl Event {
    fn report(r: NodeReport) -> Event {
        Event::Report(r, Instant::now())
    }

    /// Image ready, runner ready, process started: progress worth a
    /// request of its own only when the next report does not follow at
    /// once.
    fn is_milestone(&self) -> bool {
        matches!(
            self,
            Event::Report(
                NodeReport::ImageReady | NodeReport::RunnerReady | NodeReport::Started,
                _
            )
        )
    }
}

/// How long a run's progress reports wait for the next report to travel
/// with. On a warm start the process starts well within it, and a short
/// one exits within it too, so such a run costs the control plane one
/// report row update instead of two or three; a cold runner (hundreds of
/// ms) or a longer process still shows its progress this much later. The
/// reports keep their own times either way, and output is never held.
const MILESTONE_HOLD: Duration = Duration::from_millis(5);

async fn execute(agent: &Arc<NodeAgent>, run: Run, handle: Arc<RunHandle>) {
    let id = run.id;
    let at = Some(run.attempts);
    let cached = agent
        .images
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(&run.image.digest);
    // With the image at hand, `ImageReady` follows at once and implies
    // acceptance: one request per run fewer. A pull may take seconds, so
    // then the control plane hears first that the run was taken.
    if !cached {
        agent.report(id, at, NodeReport::Accepted).await;
    }
    let record = match ensure_image(agent, &run.image).await {
        Ok(r) => r,
        Err(error) => {
            agent.report(id, at, NodeReport::Failed { error }).await;
            return;
        }
    };
    if !cached {
        // New layers: the placement's image locality should know.
        agent.inventory_changed.notify_one();
    }

    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let _ = tx.send(Event::report(NodeReport::ImageReady));
    let exec = {
        let agent = agent.clone();
        let run = run.clone();
        tokio::task::spawn_blocking(move || {
            let last = match exec_blocking(&agent, &run, &record, &handle, &tx) {
                Ok((code, runner_idle)) => NodeReport::Exited { code, runner_idle },
                Err(error) => NodeReport::Failed { error },
            };
            let _ = tx.send(Event::report(last));
        })
    };
    // Events are posted in order, so every byte of output is stored before
    // the exit is reported (log followers stop at the final state). What
    // arrived while the last request was in flight goes out together.
    let mut pending = Vec::new();
    while let Some(ev) = rx.recv().await {
        pending.push(ev);
        while let Ok(ev) = rx.try_recv() {
            pending.push(ev);
        }
        if pending.iter().all(Event::is_milestone) {
            let until = tokio::time::Instant::now() + MILESTONE_HOLD;
            while let Ok(Some(ev)) = tokio::time::timeout_at(until, rx.recv()).await {
                let last = !ev.is_milestone();
                pending.push(ev);
                if last {
                    break;
                }
            }
        }
        let mut reports = Vec::new();
        for ev in pending.drain(..) {
            match ev {
                Event::Report(r, at) => reports.push((r, at)),
                Event::Output(stream, data) => {
                    if !reports.is_empty() {
                        agent.report_all(id, at, std::mem::take(&mut reports)).await;
                    }
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
        if !reports.is_empty() {
            agent.report_all(id, at, reports).await;
        }
    }
    if let Err(e) = exec.await {
        agent
            .report(
                id,
                at,
                NodeReport::Failed {
                    error: format!("executor failed: {e}"),
                },
            )
            .await;
    }
    // The runner's idle again (or gone): the next heartbeat says so.
    agent.inventory_changed.notify_one();
}

/// `image` in the store, pulled (through the cache if any) when it is not
/// there.
async fn ensure_image(agent: &Arc<NodeAgent>, image: &PinnedImage) -> Result<ImageRecord, String> {
    let known = agent
        .images
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&image.digest)
        .cloned();
    if let Some(rec) = known
        && agent.store.missing_layers(&rec).is_empty()
    {
        return Ok(rec);
    }
    let reference: Reference = image
        .reference
        .parse()
        .map_err(|e| format!("image reference {:?}: {e}", image.reference))?;
    let digest: Digest = image
        .digest
        .parse()
        .map_err(|e| format!("image digest {:?}: {e}", image.digest))?;
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
        .insert(image.digest.clone(), report.image.clone());
    Ok(report.image)
}

/// Acquires a runner, runs the process and releases the runner; returns
/// the exit code (128+N for signal N) and whether the runner is idle in
/// the pool again, or why the run could not run.
fn exec_blocking(
    agent: &NodeAgent,
    run: &Run,
    record: &ImageRecord,
    handle: &RunHandle,
    tx: &mpsc::UnboundedSender<Event>,
) -> Result<(i32, bool), String> {
    let image = agent.runner_image(record)?;
    let argv = ember_runtime::spec::process_args(&image.config, Some(&run.command))
        .map_err(|e| format!("command: {e}"))?;
    // Runners are shared only within the run's recycling scope (its
    // deployment or recycling key); a plain run's spec has none, so the
    // pool gives it a never-used runner and destroys it afterwards.
    let spec = RunnerSpec::new(
        image,
        shape_of(&run.resources, run.readonly_rootfs),
        run.recycle_scope(),
    );
    let mut lease = agent
        .pool
        .acquire(&spec)
        .map_err(|e| format!("starting a runner: {e}"))?;
    if spec.recyclable() {
        agent
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(lease.key().as_str().to_owned(), run.warm_key());
    }
    let _ = tx.send(Event::report(NodeReport::RunnerReady));
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
            let _ = tx.send(Event::report(NodeReport::Started));
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
            // The whole chain: "exec in runner ..." alone hides why the
            // agent refused (a bad environment entry, an argv it cannot
            // pass on).
            return Err(format!("exec: {}", ember_api::client::error_chain(&e)));
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
    // Recycled: back in the pool idle (not discarded for its outcome, a
    // failed reset or the pool's budget).
    let runner_idle = matches!(agent.pool.release(lease, outcome), Released::Recycled);
    if let Some(e) = result.spawn_error {
        return Err(format!("starting the process: {e}"));
    }
    let code = match (result.exit_code, result.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 255,
    };
    Ok((code, runner_idle))
}

/// The runner shape for a run's (or a deployment's) resources and root
/// filesystem.
fn shape_of(resources: &Resources, readonly_rootfs: bool) -> RunnerShape {
    let mut shape = RunnerShape {
        readonly_rootfs,
        ..RunnerShape::default()
    };
    if resources.memory_bytes > 0 {
        shape.memory_bytes = i64::try_from(resources.memory_bytes).ok();
    }
    if resources.cpu_millis > 0 {
        shape.cpus = Some(f64::from(resources.cpu_millis) / 1000.0);
    }
    shape
}
