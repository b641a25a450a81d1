//! The node agent's state, and how it starts and shuts down.
//!
//! [`run_node`] builds one [`NodeAgent`] and starts four long-lived tasks
//! on it: the reporter (`report`), the heartbeat (`register`), the work
//! stream (`stream`) and the pre-puller (`prepull`). The work stream spawns a task per assigned run
//! (`execute`) and per pre-warm order (`prewarm`). Shutdown: when the
//! caller's `shutdown` future completes, the three tasks are aborted, every
//! run still executing is cancelled (its runner is destroyed on release),
//! and the pool destroys the rest.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ember_api::client::ControlClient;
use ember_control::model::RunId;
use ember_oci::Digest;
use ember_pool::{Pool, RunnerImage};
use ember_registry::{RegistryClient, RegistryOptions};
use ember_store::{ImageRecord, Store};
use tokio::sync::{Notify, Semaphore, mpsc};
use tracing::Instrument;

use crate::execute::RunHandle;
use crate::report::{ReportJob, report_loop};
use crate::root::{lock_root, pool_config};
use crate::watchdog::spawn_watchdog;
use crate::{NodeAgentConfig, NodeError};

/// One node agent: shared (behind an `Arc`) by all of its tasks. Fields
/// set at start are read-only; the maps behind mutexes are written by the
/// tasks named on each and read by the heartbeat.
pub(crate) struct NodeAgent {
    /// Settings, as given.
    pub(crate) cfg: NodeAgentConfig,
    /// The control plane: every request the node makes goes through it.
    pub(crate) client: ControlClient,
    /// The node's image store.
    pub(crate) store: Store,
    /// Pulls images (through the cache if one is configured).
    pub(crate) registry: Arc<RegistryClient>,
    /// The warm pool; shut down by [`run_node`] on the way out.
    pub(crate) pool: Arc<Pool>,
    /// Images pulled by this process, by the digest the control plane
    /// pinned (which may be an index's), so repeat runs skip the registry.
    /// Written by run and pre-warm tasks after a pull.
    pub(crate) images: Mutex<HashMap<String, ImageRecord>>,
    /// Images as the pool runs them, by manifest digest: content-addressed,
    /// so never stale, and a warm run need not read and parse the image
    /// config again. Written by run tasks.
    pub(crate) runner_images: Mutex<HashMap<Digest, RunnerImage>>,
    /// Pool runner key → the control plane's warm key, so idle runners can
    /// be reported in the control plane's terms. Written by run and
    /// pre-warm tasks, read by the heartbeat.
    pub(crate) keys: Mutex<HashMap<String, String>>,
    /// Runs executing here. Entries are added by the work stream on an
    /// assignment and removed by the run's task when it is over.
    pub(crate) runs: Mutex<HashMap<RunId, Arc<RunHandle>>>,
    /// Warm key → runners being created for a pre-warm order, so a
    /// repeated order does not create them twice.
    pub(crate) prewarming: Mutex<HashMap<String, u32>>,
    /// Warm key → when a pre-warm order last named it (the image GC does
    /// not retire idle runners of a key still asked for).
    pub(crate) prewarm_asked: Mutex<HashMap<String, Instant>>,
    /// Warm key → when a pre-warm of it last failed.
    pub(crate) prewarm_failed: Mutex<HashMap<String, Instant>>,
    /// Runs executed at once (`cfg.slots`).
    pub(crate) slots: Arc<Semaphore>,
    /// Wakes the heartbeat early: images or idle runners changed.
    pub(crate) inventory_changed: Notify,
    /// Queue of the node's reporter ([`report_loop`]).
    pub(crate) reporter: mpsc::UnboundedSender<ReportJob>,
    /// Set by the reporter while it has a request out.
    pub(crate) reporting: AtomicBool,
    /// The pull plan and pre-pulls (`prepull`).
    pub(crate) prepull: Arc<crate::prepull::Prepull>,
    /// Counters for `/metrics` ([`crate::metrics`]).
    pub(crate) metrics: crate::metrics::NodeMetrics,
    /// The directory cache runs' declared caches go to (`cfg.dircache`).
    pub(crate) dircache: Option<ember_dircache::CacheClient>,
    /// Checkpoints of snapshot deployments and their captures
    /// ([`crate::snapshot::deploy`]).
    pub(crate) snapshots: Arc<crate::snapshot::deploy::NodeSnapshots>,
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
    let dircache = cfg
        .dircache
        .as_deref()
        .map(|url| ember_dircache::CacheClient::new(url, cfg.dircache_token.clone()))
        .transpose()?;
    let (reporter, reports) = mpsc::unbounded_channel();
    let (cfg_root, cfg_bandwidth) = (cfg.root.clone(), cfg.prepull.bandwidth);
    // Checkpoints travel through the same cluster cache as the images.
    let snapshot_cache = cfg.cache.as_deref().and_then(|url| {
        // Pushes need the cache's snapshot write token (as `ember snapshot
        // push` takes it); else the directory cache's token.
        let token = std::env::var("EMBER_SNAPSHOT_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| cfg.dircache_token.clone());
        crate::snapshot_cache::SnapshotCache::new(url, token)
            .map_err(|e| tracing::warn!(error = %ember_error::chain(&e), "snapshot cache client"))
            .ok()
    });
    let snapshots = Arc::new(crate::snapshot::deploy::NodeSnapshots::new(
        &cfg.root,
        store.clone(),
        cfg.agent.clone(),
        cfg.criu.clone(),
        snapshot_cache,
        cfg.snapshot_spares,
    ));
    let agent = Arc::new(NodeAgent {
        snapshots,
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
        prewarm_asked: Mutex::new(HashMap::new()),
        inventory_changed: Notify::new(),
        reporting: AtomicBool::new(false),
        prepull: Arc::new(crate::prepull::Prepull::new(&cfg_root, cfg_bandwidth)),
        metrics: Default::default(),
        dircache,
    });
    let metrics_listener = match agent.cfg.metrics_listen {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    // Fail fast on a wrong URL or token, rather than retrying forever.
    agent.heartbeat().await?;
    let metrics = metrics_listener.map(|l| tokio::spawn(crate::metrics::serve(agent.clone(), l)));

    // Every log line of the agent's tasks carries the node id (the run
    // tasks the work stream spawns are `run{run}` spans inside this one).
    let span = tracing::info_span!("node", node = %agent.cfg.id);
    let reporter = tokio::spawn(report_loop(agent.clone(), reports).instrument(span.clone()));
    let hb = tokio::spawn(crate::register::heartbeat_loop(agent.clone()).instrument(span.clone()));
    let prepulls =
        tokio::spawn(crate::prepull::prepull_loop(agent.clone()).instrument(span.clone()));
    let work = tokio::spawn(crate::stream::work_loop(agent.clone()).instrument(span));
    shutdown.await;
    hb.abort();
    work.abort();
    prepulls.abort();
    reporter.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    // Runs in flight are cancelled: their runners are destroyed on release.
    let handles: Vec<_> = agent
        .runs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    let snapshots = agent.snapshots.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for h in handles {
            h.cancel();
        }
        snapshots.shutdown();
        pool.shutdown();
    })
    .await;
    Ok(())
}
