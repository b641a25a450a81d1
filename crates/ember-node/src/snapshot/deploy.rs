//! Runs of snapshot deployments on a node.
//!
//! A run of a snapshot deployment ([`Run::snapshot`]) restores from this
//! node's checkpoint of its deployment, image and start-up (the snapshot
//! named [`Run::snapshot_key`] in the node's store). When there is none
//! yet, the run starts its start-up fresh at once (then `Resume` with
//! `restored: false`), and a capture of the same start-up begins beside
//! it on a thread of its own, one per key at a time: a run never waits on
//! a checkpoint being taken. A restore that fails falls back to a fresh
//! start; the run's `Snapshot` report carries the reason into its
//! breakdown (`snapshot_note`).
//!
//! Checkpoints go with their deployment's image (the store's GC removes
//! snapshots whose image left the store) and are replaced when the
//! deployment's image or start-up changed: a run with a new key removes
//! the node's other checkpoints of its deployment.
//!
//! Snapshot runners live beside the pool, not in it (their own runc root
//! under `<root>/snapshot/`). A restored copy is destroyed after its run,
//! unless its start-up parked itself again (`ready` after the request,
//! docs/agent-protocol.md): then it joins the key's prepared copies, like
//! a recycled runner joins the pool, and serves a later run of the
//! deployment with its memory as the last run left it; the run reports
//! its runner idle, so the control plane hands it the deployment's next
//! queued run.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_api::wire::LogStream;
use ember_control::model::{NodeReport, Run, SNAPSHOT_KEY_PREFIX, snapshot_key_deployment};
use ember_runtime::{Criu, Runc};
use ember_store::{ImageRecord, SnapshotManifest, Store};

use super::{
    CaptureRequest, PreparedCopy, ResumeRequest, RunEvent, RunOutcome, RunTimings, SnapshotError,
    SnapshotHost, StartWith,
};
use crate::agent::NodeAgent;
use crate::execute::{RunHandle, SIGKILL};
use crate::relay::{Event, EventTx};
use crate::snapshot_cache::SnapshotCache;

/// How long a failed capture of a key keeps the node from trying again
/// (a node without a working CRIU would otherwise start a capture beside
/// every run).
const CAPTURE_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How long a capture's start-up may take to become ready.
const CAPTURE_READY_TIMEOUT: Duration = Duration::from_secs(600);

/// The node's snapshot state: where its snapshot runners live, and the
/// captures in flight.
pub(crate) struct NodeSnapshots {
    host: SnapshotHost,
    /// The cluster cache's snapshot routes (`ember node --cache`): a run
    /// with no local checkpoint fetches one there, a capture is pushed
    /// there.
    cache: Option<SnapshotCache>,
    /// Keys being captured now (one capture per key). Written by run tasks
    /// and capture threads.
    capturing: Mutex<HashSet<String>>,
    /// Key → when its last capture failed.
    failed: Mutex<HashMap<String, Instant>>,
    /// Prepared copies kept per key (`ember node --snapshot-spares`).
    spares_per_key: usize,
    /// Key → its prepared copies, ready for a run to resume.
    spares: Mutex<HashMap<String, Vec<PreparedCopy>>>,
    /// Keys with a preparing thread now (one per key).
    preparing: Mutex<HashSet<String>>,
    /// Runs restoring on demand now: preparing threads wait while any is,
    /// so spares never compete with a run that needs a restore now.
    on_demand: AtomicUsize,
    /// Set at node shutdown: preparing threads stop, spares are removed.
    closed: AtomicBool,
    /// Copies of finished runs being removed in the background.
    cleanups: super::Cleanups,
    /// Runs served from a copy prepared ahead (not one that served a run
    /// before: [`NodeSnapshots::reused`]).
    pub(crate) from_spare: AtomicU64,
    /// Runs that restored on demand.
    pub(crate) on_demand_total: AtomicU64,
    /// Runs served by a copy that had served a run before (its start-up
    /// parked itself again).
    pub(crate) reused: AtomicU64,
}

/// How long a stopping node waits for restored copies to be removed.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(20);

/// Prepared copies per snapshot key when `ember node --snapshot-spares` is
/// not given: one lone run in a row finds a copy ready, and a burst of a
/// few finds that many, while idle copies hold little (a parked copy is
/// its start-up's memory, tens of MB for an interpreter, and no CPU).
pub const DEFAULT_SPARES: usize = 2;

impl NodeSnapshots {
    /// Snapshot runners under `<root>/snapshot/`; leftovers of an earlier
    /// node process there are removed. CRIU is `criu` (`ember node
    /// --criu`), else `$EMBER_CRIU`, else `criu` on the `PATH`.
    pub(crate) fn new(
        root: &Path,
        store: Store,
        agent: PathBuf,
        criu: Option<PathBuf>,
        cache: Option<SnapshotCache>,
        spares_per_key: usize,
    ) -> NodeSnapshots {
        let base = root.join("snapshot");
        let host = SnapshotHost {
            store,
            runc: Runc::new(base.join("runc")),
            containers: base.join("containers"),
            criu: Criu::new(
                criu.map(Into::into)
                    .or_else(|| std::env::var_os("EMBER_CRIU"))
                    .unwrap_or_else(|| "criu".into()),
            ),
            agent,
        };
        if host.containers.is_dir() {
            match ember_runtime::recover(&host.containers, &host.runc) {
                Ok(r) if !r.is_clean() => {
                    tracing::info!(?r, "removed snapshot runners of an earlier node process")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %ember_error::chain(&e), "removing old snapshot runners")
                }
            }
        }
        NodeSnapshots {
            host,
            cache,
            capturing: Mutex::new(HashSet::new()),
            failed: Mutex::new(HashMap::new()),
            spares_per_key,
            spares: Mutex::new(HashMap::new()),
            preparing: Mutex::new(HashSet::new()),
            on_demand: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            cleanups: super::Cleanups::default(),
            from_spare: AtomicU64::new(0),
            on_demand_total: AtomicU64::new(0),
            reused: AtomicU64::new(0),
        }
    }

    /// Prepared copies held now, over all keys.
    pub(crate) fn spares_held(&self) -> usize {
        lock(&self.spares).values().map(Vec::len).sum()
    }

    /// Destroys the prepared copies of every key `drop` says yes to.
    fn drop_spares_where(&self, drop: impl Fn(&str) -> bool) {
        let gone: Vec<PreparedCopy> = {
            let mut spares = lock(&self.spares);
            let keys: Vec<String> = spares.keys().filter(|k| drop(k)).cloned().collect();
            keys.iter()
                .filter_map(|k| spares.remove(k))
                .flatten()
                .collect()
        };
        remove_copies(gone);
    }

    /// Node shutdown: no more spares are prepared, and those held are
    /// destroyed. Blocking.
    pub(crate) fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.drop_spares_where(|_| true);
        // A copy being prepared is removed by its thread once restored, and
        // a finished run's copy by its cleanup thread: both are waited for
        // (bounded), so a stopped node leaves no overlay mounted.
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while !lock(&self.preparing).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = self
            .cleanups
            .wait(deadline.saturating_duration_since(Instant::now()));
        let preparing = lock(&self.preparing).len();
        if left > 0 || preparing > 0 {
            tracing::warn!(
                removing = left,
                preparing,
                "stopping with restored copies not yet removed (the next start removes them)"
            );
        }
    }

    /// Takes a prepared copy of `manifest` (by its key), if one is ready.
    /// Copies of another version of the snapshot (its manifest changed or
    /// it left the store) are destroyed, not used.
    fn take_spare(&self, manifest: &SnapshotManifest) -> Option<PreparedCopy> {
        let (copy, stale) = {
            let mut spares = lock(&self.spares);
            let list = spares.get_mut(&manifest.name)?;
            let (fresh, stale): (Vec<_>, Vec<_>) = std::mem::take(list)
                .into_iter()
                .partition(|c| same_snapshot(&c.manifest, manifest));
            *list = fresh;
            (list.pop(), stale)
        };
        remove_copies(stale);
        copy
    }

    /// Whether `manifest` is still the store's snapshot of `key` (a copy of
    /// a replaced or deleted snapshot is never handed to a run).
    fn is_current(&self, key: &str, manifest: &SnapshotManifest) -> bool {
        self.host
            .store
            .snapshot(key)
            .ok()
            .is_some_and(|m| same_snapshot(&m, manifest))
    }

    /// Keeps a copy whose start-up parked itself again after a run among
    /// `key`'s prepared copies, so the next run resumes it (taken first:
    /// the list is used from its end). Up to `spares_per_key` copies (at
    /// least one) are held; a copy beyond that, of a snapshot no longer
    /// current, or at shutdown is removed in the background. Whether it
    /// was kept.
    fn keep_served(&self, key: &str, copy: PreparedCopy) -> bool {
        if self.is_current(key, &copy.manifest) && !self.closed.load(Ordering::SeqCst) {
            let mut spares = lock(&self.spares);
            let list = spares.entry(key.to_owned()).or_default();
            if list.len() < self.spares_per_key.max(1) {
                list.push(copy);
                return true;
            }
        }
        copy.remove_with(super::Cleanup::Background(&self.cleanups));
        false
    }

    /// Starts `key`'s preparing thread, unless it has one or spares are
    /// off: it restores copies of the key's snapshot (as the store holds
    /// it now) until `spares_per_key` are ready, one at a time, at a lower
    /// CPU priority, and only while no run restores on demand.
    fn prepare_in_background(self: &Arc<Self>, key: &str, record: &ImageRecord) {
        if self.spares_per_key == 0 || self.closed.load(Ordering::SeqCst) {
            return;
        }
        let Some(busy) = Busy::take(self, BusySet::Preparing, key) else {
            return;
        };
        let (me, record) = (self.clone(), record.clone());
        let spawned = std::thread::Builder::new()
            .name("snapshot-spares".into())
            .spawn(move || {
                super::lower_priority(SPARE_NICENESS);
                me.prepare_loop(&busy.key, &record);
            });
        // On failure the closure, and the key's claim with it, is dropped.
        if let Err(e) = spawned {
            tracing::warn!(error = %ember_error::chain(&e), "starting a preparing thread");
        }
    }

    /// The set `set` names.
    fn busy(&self, set: BusySet) -> &Mutex<HashSet<String>> {
        match set {
            BusySet::Capturing => &self.capturing,
            BusySet::Preparing => &self.preparing,
        }
    }

    fn prepare_loop(&self, key: &str, record: &ImageRecord) {
        loop {
            // Runs that need a restore now go first.
            while self.on_demand.load(Ordering::SeqCst) > 0 {
                if self.closed.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            let Some(manifest) = self
                .host
                .store
                .snapshot(key)
                .ok()
                .filter(|m| m.image == record.manifest)
            else {
                // The snapshot left the store: its copies go too.
                self.drop_spares_where(|k| k == key);
                return;
            };
            let held = {
                let spares = lock(&self.spares);
                spares
                    .get(key)
                    .map(|l| {
                        l.iter()
                            .filter(|c| same_snapshot(&c.manifest, &manifest))
                            .count()
                    })
                    .unwrap_or(0)
            };
            if held >= self.spares_per_key {
                return;
            }
            let claim = claim_image(
                &self.host,
                &format!("snapshot-spare-{key}"),
                record,
                "a spare",
            );
            let r = super::prepare_copy(&self.host, &manifest, record);
            drop(claim);
            let copy = match r {
                Ok(c) => c,
                Err(e) => {
                    // Runs restore on demand (and fall back) as without
                    // spares; this thread does not retry in a loop.
                    tracing::warn!(snapshot = %key, error = %e.why_not_restored(), "preparing a restored copy");
                    return;
                }
            };
            tracing::debug!(snapshot = %key, timings = ?copy.timings, "prepared a restored copy");
            // Replaced or closed meanwhile: not kept.
            let current = self.is_current(key, &copy.manifest);
            if !current || self.closed.load(Ordering::SeqCst) {
                copy.remove();
                continue;
            }
            let extra = {
                let mut spares = lock(&self.spares);
                let list = spares.entry(key.to_owned()).or_default();
                if list.len() < self.spares_per_key {
                    list.push(copy);
                    None
                } else {
                    Some(copy)
                }
            };
            if let Some(c) = extra {
                c.remove();
                return;
            }
        }
    }

    /// The checkpoints of snapshot deployments this node holds, for its
    /// inventory.
    pub(crate) fn held(&self) -> BTreeSet<String> {
        self.host
            .store
            .snapshots()
            .map(|list| {
                list.into_iter()
                    .map(|m| m.name)
                    .filter(|n| snapshot_key_deployment(n).is_some())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes the checkpoints named in `stale` (the control plane's
    /// heartbeat answer: their deployment was deleted or no longer takes
    /// snapshots), except one being captured now (its capture thread
    /// finishes it; the next heartbeat names it again). Returns how many
    /// went.
    pub(crate) fn drop_stale(&self, stale: &BTreeSet<String>) -> usize {
        let mut dropped = 0;
        for key in stale {
            if snapshot_key_deployment(key).is_none() {
                continue;
            }
            if lock(&self.capturing).contains(key) {
                continue;
            }
            match self.host.store.remove_snapshot(key) {
                Ok(r) => {
                    dropped += 1;
                    tracing::info!(
                        snapshot = %key,
                        bytes = r.bytes_freed,
                        "removed the checkpoint of a deleted deployment"
                    );
                }
                Err(ember_store::SnapshotError::Unknown(_)) => {}
                Err(e) => {
                    tracing::warn!(snapshot = %key, error = %ember_error::chain(&e), "removing the checkpoint of a deleted deployment")
                }
            }
        }
        // Prepared copies of a stale key never serve a run again, whether
        // or not its checkpoint could be removed yet.
        self.drop_spares_where(|k| stale.contains(k));
        dropped
    }

    /// Removes this node's other checkpoints of `key`'s deployment: its
    /// image or start-up changed, so no run will restore them again.
    fn forget_others(&self, key: &str) {
        let Some(deployment) = snapshot_key_deployment(key) else {
            return;
        };
        // Copies of the deployment's earlier image or start-up go first.
        self.drop_spares_where(|k| k != key && snapshot_key_deployment(k) == Some(deployment));
        let Ok(list) = self.host.store.snapshots() else {
            return;
        };
        let capturing = lock(&self.capturing);
        for m in list {
            if m.name != key
                && m.name.starts_with(SNAPSHOT_KEY_PREFIX)
                && snapshot_key_deployment(&m.name) == Some(deployment)
                && !capturing.contains(&m.name)
            {
                match self.host.store.remove_snapshot(&m.name) {
                    Ok(r) => tracing::info!(
                        snapshot = %m.name,
                        bytes = r.bytes_freed,
                        "removed the checkpoint of an earlier image or start-up"
                    ),
                    Err(e) => {
                        tracing::warn!(snapshot = %m.name, error = %ember_error::chain(&e), "removing a checkpoint")
                    }
                }
            }
        }
    }

    /// Starts capturing `run`'s start-up as `key` on a thread of its own,
    /// unless it is being captured or its last capture failed recently.
    fn capture_in_background(
        self: &Arc<Self>,
        agent: &Arc<NodeAgent>,
        key: &str,
        run: &Run,
        record: &ImageRecord,
    ) {
        if lock(&self.failed)
            .get(key)
            .is_some_and(|t| t.elapsed() < CAPTURE_RETRY_AFTER)
        {
            return;
        }
        let Some(busy) = Busy::take(self, BusySet::Capturing, key) else {
            return;
        };
        let (me, agent, key, record) =
            (self.clone(), agent.clone(), key.to_owned(), record.clone());
        let (argv, image_name) = (run.command.clone(), run.image.reference.clone());
        let env: Vec<(String, String)> = run.env.clone().into_iter().collect();
        let spawned = std::thread::Builder::new()
            .name("snapshot-capture".into())
            .spawn(move || {
                let t0 = Instant::now();
                // The image stays while its start-up is captured.
                let claim = claim_image(&me.host, &format!("snapshot-capture-{key}"), &record, "a capture");
                let r = super::capture(
                    &me.host,
                    &CaptureRequest {
                        name: &key,
                        image: &record,
                        image_name: &image_name,
                        argv: &argv,
                        env: &env,
                        ready_timeout: CAPTURE_READY_TIMEOUT,
                        t0,
                    },
                    &mut |_, _| {},
                );
                drop(claim);
                match r {
                    Ok(c) => {
                        tracing::info!(
                            snapshot = %key,
                            bytes = c.manifest.artifact_bytes,
                            capture_ms = c.manifest.capture_ms,
                            "captured a deployment's start-up"
                        );
                        // On this capture thread, so no run waits for it.
                        if let Some(cache) = &me.cache {
                            match block_on(cache.push(&me.host.store, &key)) {
                                Ok(p) => tracing::info!(snapshot = %key, uploaded = p.uploaded, bytes = p.bytes, "pushed a checkpoint to the cluster cache"),
                                Err(e) => tracing::warn!(snapshot = %key, error = %ember_error::chain(&e), "pushing a checkpoint to the cluster cache"),
                            }
                        }
                        // The new checkpoint counts against the store's
                        // byte budget: evict down to it now, not at the
                        // next GC interval.
                        agent.collect();
                        if matches!(
                            me.host.store.snapshot(&key),
                            Err(ember_store::SnapshotError::Unknown(_))
                        ) {
                            // Evicted at once: what the plan keeps leaves
                            // it no room. Capturing again beside every run
                            // would only cost CPU; wait as after a failure.
                            tracing::warn!(snapshot = %key, "the checkpoint does not fit the image budget beside the planned images; not capturing it again for a while");
                            lock(&me.failed)
                                .insert(key.clone(), Instant::now());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(snapshot = %key, error = %e.why_not_restored(), "capturing a deployment's start-up");
                        lock(&me.failed)
                            .insert(key.clone(), Instant::now());
                    }
                }
                drop(busy);
                // The checkpoint is placement locality now.
                agent.inventory_changed.notify_one();
                me.prepare_in_background(&key, &record);
            });
        // On failure the closure, and the key's claim with it, is dropped.
        if let Err(e) = spawned {
            tracing::warn!(error = %ember_error::chain(&e), "starting a capture thread");
        }
    }
}

/// Executes a run of a snapshot deployment (blocking): restore, or a
/// fresh start while a capture runs beside it. Returns the exit code and
/// whether the runner is idle again (a restored copy whose start-up parked
/// itself again, kept for the next run), or why the run could not run.
pub(crate) fn exec_snapshot(
    agent: &Arc<NodeAgent>,
    run: &Run,
    record: &ImageRecord,
    handle: &RunHandle,
    tx: &EventTx,
) -> Result<(i32, bool), String> {
    let (Some(key), Some(snap)) = (run.snapshot_key(), run.snapshot.as_ref()) else {
        return Err("not a run of a snapshot deployment".into());
    };
    let snapshots = &agent.snapshots;
    let host = &snapshots.host;
    snapshots.forget_others(&key);
    if handle.cancelled.load(Ordering::SeqCst) {
        return Err("cancelled before it started".into());
    }
    let claim = claim_image(
        host,
        &format!("snapshot-run-{}-{}", run.id, run.attempts),
        record,
        "a run",
    );
    let req = ResumeRequest {
        name: key.clone(),
        argv: snap.argv.clone(),
        env: snap.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        timeout: run.timeout_ms.map(Duration::from_millis),
    };
    let t0 = Instant::now();
    let mut on_event = |ev: RunEvent<'_>| match ev {
        RunEvent::Restored => {
            let _ = tx.send(Event::report(NodeReport::Snapshot {
                restored: true,
                note: None,
            }));
        }
        RunEvent::FreshStart(why) => {
            let _ = tx.send(Event::report(NodeReport::Snapshot {
                restored: false,
                note: Some(why.to_owned()),
            }));
        }
        RunEvent::Resuming { socket, exec_id } => {
            *lock(&handle.snapshot_exec) = Some((socket.to_path_buf(), exec_id));
            let _ = tx.send(Event::report(NodeReport::RunnerReady));
            let _ = tx.send(Event::report(NodeReport::Started));
            // A cancel that arrived before the exec could be signalled.
            if handle.cancelled.load(Ordering::SeqCst) {
                let _ = super::signal_exec(socket, exec_id, SIGKILL);
            }
        }
    };
    let mut on_output = |is_stderr: bool, data: &[u8]| {
        let stream = if is_stderr {
            LogStream::Stderr
        } else {
            LogStream::Stdout
        };
        let _ = tx.send(Event::Output(stream, data.to_vec()));
    };
    let mut manifest = host
        .store
        .snapshot(&key)
        .ok()
        .filter(|m| m.image == record.manifest);
    // Why the cluster cache did not supply a checkpoint, for the run's note.
    let mut cache_note = None;
    if manifest.is_none()
        && let Some(cache) = &snapshots.cache
    {
        match fetch_from_cache(cache, host, &key, record) {
            Ok(m) => manifest = Some(m),
            Err(why) => cache_note = Some(why),
        }
    }
    // A copy prepared ahead: the run only resumes it.
    let spare = manifest.as_ref().and_then(|m| snapshots.take_spare(m));
    let outcome: Result<RunOutcome, SnapshotError> = match (manifest, spare) {
        (Some(_), Some(copy)) => {
            let waited = copy.ready_at.elapsed();
            let note = if copy.served > 0 {
                snapshots.reused.fetch_add(1, Ordering::Relaxed);
                format!(
                    "{REUSED_NOTE} ({} runs before this one, idle {} ms)",
                    copy.served,
                    waited.as_millis()
                )
            } else {
                snapshots.from_spare.fetch_add(1, Ordering::Relaxed);
                format!(
                    "{SPARE_NOTE} (restored {} ms ahead, {} ms before this run)",
                    copy.timings
                        .restore
                        .map(|d| d.as_millis())
                        .unwrap_or_default()
                        + copy.timings.connect.as_millis(),
                    waited.as_millis()
                )
            };
            let _ = tx.send(Event::report(NodeReport::Snapshot {
                restored: true,
                note: Some(note),
            }));
            // Its restore happened before the run: the run's own restore
            // phase is 0, and the copy's restore is in the note.
            let t = RunTimings {
                restored: true,
                ..RunTimings::default()
            };
            // A replacement is restored beside the run.
            snapshots.prepare_in_background(&key, record);
            super::resume_copy(
                copy,
                &req,
                t0,
                t,
                super::Cleanup::Background(&snapshots.cleanups),
                &mut on_event,
                &mut on_output,
            )
        }
        (Some(m), None) => {
            snapshots.on_demand_total.fetch_add(1, Ordering::Relaxed);
            let demand = OnDemand::new(&snapshots.on_demand);
            let r = super::run_from_snapshot_with(
                host,
                &m,
                record,
                &req,
                t0,
                super::Cleanup::Background(&snapshots.cleanups),
                &mut |e| {
                    // A corrupt artifact is not used again: the next run
                    // captures a new one.
                    if matches!(
                        e,
                        SnapshotError::Artifact(
                            ember_store::SnapshotError::DigestMismatch { .. }
                                | ember_store::SnapshotError::Malformed { .. }
                        )
                    ) && let Err(e) = host.store.remove_snapshot(&key)
                    {
                        tracing::warn!(snapshot = %key, error = %ember_error::chain(&e), "removing a corrupt checkpoint");
                    }
                    true
                },
                &mut |ev| {
                    // Restored: preparing threads may go on while it runs.
                    if matches!(ev, RunEvent::Restored | RunEvent::FreshStart(_)) {
                        demand.done();
                    }
                    on_event(ev)
                },
                &mut on_output,
            );
            drop(demand);
            // Spares for the next runs, after this run used its restore.
            snapshots.prepare_in_background(&key, record);
            r
        }
        (None, _) => {
            let mut why = "no checkpoint of this deployment's start-up on the node yet: started \
                 fresh while one is captured for the next runs"
                .to_owned();
            if let Some(c) = &cache_note {
                why.push_str(&format!(" (cluster cache: {c})"));
            }
            on_event(RunEvent::FreshStart(&why));
            snapshots.capture_in_background(agent, &key, run, record);
            let env: Vec<(String, String)> = run.env.clone().into_iter().collect();
            super::fresh_start(
                host,
                record,
                &StartWith::Command {
                    argv: &run.command,
                    env: &env,
                },
                &req,
                t0,
                RunTimings::default(),
                &mut on_event,
                &mut on_output,
            )
        }
    };
    drop(claim);
    *lock(&handle.snapshot_exec) = None;
    let mut outcome = outcome.map_err(|e| format!("snapshot start: {}", e.why_not_restored()))?;
    tracing::debug!(run = %run.id, timings = ?outcome.timings, "snapshot run");
    if let Some(e) = &outcome.result.spawn_error {
        return Err(format!("starting the process: {e}"));
    }
    // A cancelled run's copy is not kept, even if it parked itself: the
    // cancel may have caught it half-way.
    let idle = match outcome.kept.take() {
        Some(copy) if !handle.cancelled.load(Ordering::SeqCst) => snapshots.keep_served(&key, copy),
        Some(copy) => {
            copy.remove_with(super::Cleanup::Background(&snapshots.cleanups));
            false
        }
        None => false,
    };
    Ok((super::exit_code(&outcome.result), idle))
}

/// Fetches checkpoint `key` from the cluster cache into the node's store,
/// if it was taken of `record`'s image on a machine a restore here can
/// match (checked before the download); the reason when not.
fn fetch_from_cache(
    cache: &SnapshotCache,
    host: &SnapshotHost,
    key: &str,
    record: &ImageRecord,
) -> Result<ember_store::SnapshotManifest, String> {
    let here = ember_runtime::checkpoint::HostFacts::here(&host.criu)
        .map_err(|e| format!("cannot restore here: {}", ember_error::chain(&e)))?;
    let t = Instant::now();
    let f = block_on(cache.fetch(&host.store, key, &here))
        .map_err(|e| ember_error::chain(&e).to_string())?;
    if f.manifest.image != record.manifest {
        return Err(format!(
            "its checkpoint is of image {}, not {}",
            f.manifest.image, record.manifest
        ));
    }
    tracing::info!(snapshot = %key, downloaded = f.downloaded, bytes = f.bytes, ms = t.elapsed().as_millis() as u64, "fetched a checkpoint from the cluster cache");
    Ok(f.manifest)
}

/// Runs a cache request from a blocking thread: on the node's runtime
/// when the thread belongs to it (a run's blocking task), else on a
/// runtime of its own (a capture thread).
fn block_on<T>(fut: impl std::future::Future<Output = T>) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h.block_on(fut),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds (only fails without OS resources)")
            .block_on(fut),
    }
}

/// The start of a run's `snapshot_note` when it was served from a copy
/// prepared ahead.
pub const SPARE_NOTE: &str = "from a prepared copy";

/// The start of a run's `snapshot_note` when it was served by a restored
/// copy that had served a run before and parked itself again.
pub const REUSED_NOTE: &str = "by a restored copy that parked itself again";

/// Whether two manifests name the same capture of a snapshot (a copy of
/// one may serve a run of the other).
fn same_snapshot(a: &SnapshotManifest, b: &SnapshotManifest) -> bool {
    a.name == b.name
        && a.artifact == b.artifact
        && a.image == b.image
        && a.created_ms == b.created_ms
}

/// Claims `record`'s image for `what` (GC leaves it until the claim is
/// dropped); a failure to claim is logged and the work goes on unclaimed.
fn claim_image(
    host: &SnapshotHost,
    id: &str,
    record: &ImageRecord,
    what: &str,
) -> Option<ember_store::ImageClaim> {
    host.store
        .claim_image(id, &record.manifest)
        .map_err(
            |e| tracing::warn!(error = %ember_error::chain(&e), "claiming the image for {what}"),
        )
        .ok()
}

/// Destroys prepared copies (each a `runc delete` and an unmount; only
/// when a key is replaced or dropped, so not on a run's usual path).
fn remove_copies(copies: Vec<PreparedCopy>) {
    for c in copies {
        c.remove();
    }
}

/// The niceness of a thread preparing spares: restored in idle time, but
/// ahead of removals ([`super::lower_priority`]).
const SPARE_NICENESS: i32 = 10;

/// A run restoring on demand, counted in `on_demand` until its restore
/// is done (or the guard dropped).
struct OnDemand<'a> {
    count: &'a AtomicUsize,
    done: std::cell::Cell<bool>,
}

impl<'a> OnDemand<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        OnDemand {
            count,
            done: std::cell::Cell::new(false),
        }
    }

    fn done(&self) {
        if !self.done.replace(true) {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for OnDemand<'_> {
    fn drop(&mut self) {
        self.done();
    }
}

/// `Mutex::lock` that goes on past poisoning: a thread that panicked
/// holding one of these maps or sets leaves entries, not broken
/// invariants, and the node keeps serving runs.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which busy set a [`Busy`] claim is in.
#[derive(Clone, Copy)]
enum BusySet {
    Capturing,
    Preparing,
}

/// A key in one of the node's busy sets (a capture or a preparing thread
/// of its own), given back when dropped: when the thread's work ends, or
/// with the thread's closure when the thread cannot start.
struct Busy {
    owner: Arc<NodeSnapshots>,
    set: BusySet,
    key: String,
}

impl Busy {
    /// Claims `key` in `set`; `None` if a thread already holds it.
    fn take(owner: &Arc<NodeSnapshots>, set: BusySet, key: &str) -> Option<Busy> {
        lock(owner.busy(set)).insert(key.to_owned()).then(|| Busy {
            owner: owner.clone(),
            set,
            key: key.to_owned(),
        })
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        lock(self.owner.busy(self.set)).remove(&self.key);
    }
}
