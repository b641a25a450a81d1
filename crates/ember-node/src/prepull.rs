//! Pre-pulls: the node's half of the pull plan
//! ([`ember_control::pullplan`]). A `pull_plan` line replaces the plan;
//! one task pulls its images in order, one at a time, through the same
//! registry client (and so the cluster cache) as runs, at low priority:
//!
//! * **Paused by runs.** Every download of a pre-pull passes a gate
//!   ([`ember_store::PullGate`]) after each chunk. While any run's pull is
//!   in flight ([`Prepull::run_pull`]) the gate holds: the pre-pull's
//!   connections stay open but nothing more is read, so the run's pull has
//!   the link to itself; it reads on when the last run pull is over.
//! * **Capped.** The same gate holds a pre-pull to
//!   [`PrepullConfig::bandwidth`](crate::PrepullConfig::bandwidth) bytes
//!   per second.
//! * **Taken over.** A run that needs the image being pre-pulled right now
//!   does not start a second pull of it, nor wait behind a paused one: it
//!   takes the pre-pull over ([`Prepull::take_over`]). From then on its
//!   gate neither pauses nor paces (it is the run's pull now, and it pauses
//!   the other pre-pulls as one), the layers already fetched are kept, and
//!   the run waits for its outcome; only if it fails does the run pull for
//!   itself. An image a run is pulling is not pre-pulled meanwhile.
//! * **Reported.** While an image is pre-pulled, the node's inventory
//!   lists it under `pulling`, so the scheduler counts it as arriving.
//! * **Trending first in the cache.** When a plan arrives and the node
//!   pulls through a cluster cache (`ember cache`), the node asks the cache
//!   to fetch the plan's first [`WARM_HEAD`] images now
//!   (`POST /ember/v1/warm`), at the cache's full speed: the node's own
//!   capped, one-at-a-time pre-pulls (and every other node's) then read
//!   them from the cache.
//! * **Kept.** With an image budget, the node's GC runs when a plan
//!   arrives, after each pre-pull and every few seconds, evicting in
//!   [`pullplan::eviction_order`]: never what the plan keeps, what a run
//!   executing here uses, what a container uses (the store checks) or what
//!   was used in the last [`GC_MIN_AGE`]; among the rest the least
//!   recently used first. Idle warm runners do not keep an image forever:
//!   when all that GC could still evict is kept only by idle runners that
//!   no pre-warm order asks for, they are retired and their image goes
//!   (least recently used first; a runner a run holds is never retired).
//!
//! What happens is also written to `<root>/prepull.log`, one JSON object a
//! line (`{"t_ms":…,"event":"paused","image":…}`), so what a node did with
//! its plan can be checked after the fact: `plan`, `started`, `paused`,
//! `resumed`, `taken_over` (by a run), `done`, `failed`,
//! `run_pull_started`, `run_pull_done`, `cache_warmed`,
//! `cache_warm_failed`, `evicted`, `over_budget` (what is
//! left cannot be evicted), `retired` (idle runners of an image, so that it
//! can be).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_api::wire::PlannedPull;
use ember_control::pullplan::{self, HeldImage};
use ember_oci::Reference;
use ember_registry::RegistryClient;
use ember_store::{
    ImageRecord, PullGate, PullOptions, PullProgress, PullReport, SilentProgress, Store, StoreError,
};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::agent::NodeAgent;
use crate::images::pinned_reference;

/// Images used this recently are not evicted: a run or pre-warm that has
/// just pulled its image has not created its container yet (kubelet keeps
/// a two-minute minimum age for the same reason).
pub(crate) const GC_MIN_AGE: Duration = Duration::from_secs(15);

/// How often the GC looks at the store when no plan or pre-pull prompts
/// it (the control plane sends a plan only when it changes).
const GC_INTERVAL: Duration = Duration::from_secs(5);

/// A pre-pull that failed is tried again after this, not at every plan.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// How many of a new plan's images the cluster cache is asked to fetch at
/// once: the head of the plan, the images most likely to be launched.
const WARM_HEAD: usize = 4;

/// How long the cache may take over fetching them.
const WARM_TIMEOUT: Duration = Duration::from_secs(600);

/// The plan in force.
#[derive(Debug, Default)]
struct Plan {
    pulls: Vec<PlannedPull>,
    keep: BTreeSet<String>,
    /// Bumped by every new plan, so the pulling task notices a change.
    generation: u64,
}

/// How a pre-pull ended, for a run that took it over: the image, or why
/// not (`None` while it is in flight).
type Outcome = Option<Result<ImageRecord, String>>;

/// A pre-pull in flight, which a run of the same image can take over.
struct InFlight {
    /// Bytes the plan says it brings, for the inventory.
    bytes: u64,
    /// Set once by [`Prepull::take_over`]: the gate lets everything
    /// through from then on.
    promoted: AtomicBool,
    /// Wakes a gate holding or pacing this pull when it is taken over.
    promote: Notify,
    /// Its outcome. Dropped without one if the pre-pull task is aborted
    /// (shutdown): the run then pulls for itself.
    done: watch::Sender<Outcome>,
}

/// The node's pre-pull state, shared by the work stream (which sets plans),
/// run pulls (which pause pre-pulls), the heartbeat (which reports what is
/// arriving) and the pre-pull task.
pub(crate) struct Prepull {
    plan: Mutex<Plan>,
    /// A new plan arrived.
    planned: Notify,
    /// Run pulls in flight.
    run_pulls: AtomicUsize,
    /// The last run pull ended.
    runs_done: Notify,
    /// A run pull started.
    run_started: Notify,
    /// Image digest → the pre-pull of it in flight now.
    pulling: Mutex<BTreeMap<String, Arc<InFlight>>>,
    /// Image digest → runs pulling it now (so it is not pre-pulled too).
    run_images: Mutex<BTreeMap<String, usize>>,
    /// Image digest → runs executing here with it (never evicted).
    busy: Mutex<BTreeMap<String, usize>>,
    /// Images whose pre-pull failed, and when.
    failed: Mutex<BTreeMap<String, Instant>>,
    /// The bytes the last GC left over budget, so the journal says so
    /// once, not at every plan.
    over_budget: Mutex<Option<u64>>,
    bandwidth: Option<u64>,
    journal: PathBuf,
}

impl Prepull {
    /// Empty state for a node whose root is `root`.
    pub(crate) fn new(root: &std::path::Path, bandwidth: Option<u64>) -> Self {
        Prepull {
            plan: Mutex::new(Plan::default()),
            planned: Notify::new(),
            run_pulls: AtomicUsize::new(0),
            runs_done: Notify::new(),
            run_started: Notify::new(),
            pulling: Mutex::new(BTreeMap::new()),
            run_images: Mutex::new(BTreeMap::new()),
            busy: Mutex::new(BTreeMap::new()),
            failed: Mutex::new(BTreeMap::new()),
            over_budget: Mutex::new(None),
            bandwidth,
            journal: root.join("prepull.log"),
        }
    }

    /// Appends one event to `<root>/prepull.log` (best effort: the journal
    /// is for looking back, and a full disk must not stop pulls).
    fn note(&self, event: &str, image: &str) {
        let line = serde_json::json!({
            "t_ms": ember_store::now_ms(),
            "event": event,
            "image": image,
        });
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.journal)
            .and_then(|mut f| writeln!(f, "{line}"));
    }

    /// Replaces the plan.
    pub(crate) fn set_plan(&self, pulls: Vec<PlannedPull>, keep: Vec<String>) {
        {
            let mut p = self.plan.lock().unwrap_or_else(|e| e.into_inner());
            p.pulls = pulls;
            p.keep = keep.into_iter().collect();
            p.generation += 1;
            self.note(
                "plan",
                &format!("{} pulls, {} kept", p.pulls.len(), p.keep.len()),
            );
        }
        self.planned.notify_one();
    }

    /// What is being pre-pulled now, for the inventory.
    pub(crate) fn pulling(&self) -> BTreeMap<String, u64> {
        self.pulling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(d, f)| (d.clone(), f.bytes))
            .collect()
    }

    /// Takes over the pre-pull of `image` if one is in flight: lifts its
    /// pause and cap and returns where its outcome will appear. `None`
    /// when `image` is not being pre-pulled (then it either never was or
    /// is already recorded where the caller looks next: a pre-pull records
    /// its image before it leaves the in-flight map).
    pub(crate) fn take_over(&self, image: &str) -> Option<watch::Receiver<Outcome>> {
        let pulling = self.pulling.lock().unwrap_or_else(|e| e.into_inner());
        let flight = pulling.get(image)?;
        if !flight.promoted.swap(true, Ordering::SeqCst) {
            self.note("taken_over", image);
            tracing::info!(image, "a run takes over the pre-pull of its image");
        }
        flight.promote.notify_waiters();
        Some(flight.done.subscribe())
    }

    /// Marks a run's pull of `image` as in flight until the guard drops:
    /// pre-pulls hold still meanwhile.
    pub(crate) fn run_pull(self: &Arc<Self>, image: &str) -> RunPull {
        *self
            .run_images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(image.to_owned())
            .or_default() += 1;
        self.run_pulls.fetch_add(1, Ordering::SeqCst);
        self.note("run_pull_started", image);
        self.run_started.notify_waiters();
        RunPull {
            p: self.clone(),
            image: image.to_owned(),
        }
    }

    /// Marks `image` as used by a run executing here until the guard
    /// drops: GC leaves it alone.
    pub(crate) fn busy(self: &Arc<Self>, image: &str) -> Busy {
        *self
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(image.to_owned())
            .or_default() += 1;
        Busy {
            p: self.clone(),
            image: image.to_owned(),
        }
    }
}

/// A run's pull in flight ([`Prepuller::run_pull`]): pre-pulls hold
/// still until it drops.
pub struct RunPull {
    p: Arc<Prepull>,
    image: String,
}

impl Drop for RunPull {
    fn drop(&mut self) {
        self.p.note("run_pull_done", &self.image);
        {
            let mut images = self.p.run_images.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = images.get_mut(&self.image) {
                *n -= 1;
                if *n == 0 {
                    images.remove(&self.image);
                }
            }
        }
        if self.p.run_pulls.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.p.runs_done.notify_waiters();
        }
    }
}

/// An image a run executing here uses ([`Prepull::busy`]).
pub(crate) struct Busy {
    p: Arc<Prepull>,
    image: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut busy = self.p.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = busy.get_mut(&self.image) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.image);
            }
        }
    }
}

/// The gate of one pre-pull: pauses while runs pull, paces to the cap,
/// until a run takes it over.
struct Gate {
    p: Arc<Prepull>,
    flight: Arc<InFlight>,
    image: String,
    /// Bytes admitted since `since`, for the cap.
    pace: Mutex<(Instant, u64)>,
}

impl Gate {
    /// Holds the download while a run pulls, then paces it to the cap; a
    /// run pull starting during the pacing pause holds it at once. Once a
    /// run has taken the pre-pull over, neither: it returns at once, and
    /// a take-over during a pause or pacing ends it.
    async fn wait(&self, bytes: u64) {
        let promoted = self.flight.promote.notified();
        if self.flight.promoted.load(Ordering::SeqCst) {
            return;
        }
        tokio::select! {
            () = self.held(bytes) => {}
            () = promoted => {}
        }
    }

    /// [`Gate::wait`] before any take-over.
    async fn held(&self, bytes: u64) {
        let due = self.p.bandwidth.map(|bw| {
            let mut pace = self.pace.lock().unwrap_or_else(|e| e.into_inner());
            pace.1 += bytes;
            pace.0 + Duration::from_secs_f64(pace.1 as f64 / bw as f64)
        });
        loop {
            let started = self.p.run_started.notified();
            self.hold().await;
            let Some(due) = due else { return };
            tokio::select! {
                () = tokio::time::sleep_until(due) => return,
                () = started => {}
            }
        }
    }

    /// Returns once no run pull is in flight.
    async fn hold(&self) {
        if self.p.run_pulls.load(Ordering::SeqCst) > 0 {
            self.p.note("paused", &self.image);
            tracing::info!(image = %self.image, "pre-pull paused: a run is pulling");
            loop {
                let done = self.p.runs_done.notified();
                if self.p.run_pulls.load(Ordering::SeqCst) == 0 {
                    break;
                }
                done.await;
            }
            self.p.note("resumed", &self.image);
            tracing::info!(image = %self.image, "pre-pull resumed");
            // The pause is not credit for a burst afterwards.
            *self.pace.lock().unwrap_or_else(|e| e.into_inner()) = (Instant::now(), 0);
        }
    }
}

impl PullGate for Gate {
    fn admit(&self, bytes: u64) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.wait(bytes))
    }
}

impl NodeAgent {
    /// The stored image the control plane's `digest` names (a manifest
    /// digest, or the index it was pulled through), if it is complete.
    fn held(&self, digest: &str) -> bool {
        let Ok(ix) = self.store.read_index() else {
            return false;
        };
        ix.images.values().any(|r| {
            (r.manifest.to_string() == digest
                || r.index.as_ref().is_some_and(|i| i.to_string() == digest))
                && crate::images::is_complete(&self.store, r)
        })
    }

    /// Evicts down to the image budget what the plan does not keep (see
    /// the module docs); a no-op without a budget. When what is left over
    /// the budget is kept only by idle runners nobody asks for, they are
    /// retired and the GC runs again ([`NodeAgent::retire_for_gc`]).
    pub(crate) fn collect(&self) {
        while let Some((protected, recent)) = self.collect_once()
            && self.retire_for_gc(&protected, recent)
        {}
    }

    /// One GC pass; when it leaves the store over budget, what it
    /// protected and the time after which an image counts as recent.
    fn collect_once(&self) -> Option<(BTreeSet<String>, u64)> {
        let high = self.cfg.prepull.image_budget?;
        // Down to the budget itself: the planner planned within it.
        let low = high;
        let mut protected = self
            .prepull
            .plan
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keep
            .clone();
        protected.extend(
            self.prepull
                .busy
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned(),
        );
        protected.extend(self.prepull.pulling().into_keys());
        let recent = ember_store::now_ms()
            .saturating_sub(u64::try_from(GC_MIN_AGE.as_millis()).unwrap_or(u64::MAX));
        let res = self.store.gc_in_order(high, low, |held| {
            // An image the plan names by its index digest is protected
            // under its manifest digest too.
            let mut protected = protected.clone();
            for c in held {
                if c.index
                    .as_ref()
                    .is_some_and(|i| protected.contains(&i.to_string()))
                {
                    protected.insert(c.manifest.to_string());
                }
            }
            let held: Vec<HeldImage> = held
                .iter()
                .map(|c| HeldImage {
                    digest: c.manifest.to_string(),
                    last_used: c.last_used_ms,
                    in_use: c.in_use || c.last_used_ms > recent,
                })
                .collect();
            pullplan::eviction_order(&held, &protected, |_| 0.0)
                .into_iter()
                .filter_map(|d| d.parse().ok())
                .collect()
        });
        if let Ok(r) = &res
            && !r.snapshots.evicted_snapshots.is_empty()
        {
            for s in &r.snapshots.evicted_snapshots {
                self.prepull.note("evicted_snapshot", s);
            }
            tracing::info!(evicted = ?r.snapshots.evicted_snapshots, bytes = r.bytes_after, "snapshots evicted for the image budget");
            // They are no longer placement locality.
            self.inventory_changed.notify_one();
        }
        match res {
            Ok(r) if r.bytes_after > high => {
                // Everything left is planned, in use or too recent: say
                // so once per plan, so a budget too small for the plan
                // can be seen.
                tracing::debug!(bytes = r.bytes_after, high, kept_in_use = r.kept_in_use, removed = ?r.removed_images, "over the image budget");
                let mut last = self
                    .prepull
                    .over_budget
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if *last != Some(r.bytes_after) {
                    *last = Some(r.bytes_after);
                    let detail = format!(
                        "{} bytes > {high}; the rest is planned, in use or recent",
                        r.bytes_after
                    );
                    self.prepull.note("over_budget", &detail);
                }
                for img in &r.removed_images {
                    self.prepull.note("evicted", img);
                }
                if !r.removed_images.is_empty() {
                    self.inventory_changed.notify_one();
                }
                return Some((protected, recent));
            }
            Ok(r) if !r.removed_images.is_empty() => {
                for img in &r.removed_images {
                    self.prepull.note("evicted", img);
                }
                tracing::info!(removed = ?r.removed_images, bytes = r.bytes_after, "images evicted");
                self.images
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|_, rec| crate::images::is_complete(&self.store, rec));
                self.inventory_changed.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %ember_error::chain(&e), "image GC failed"),
        }
        None
    }

    /// After a GC that left the store over budget: if every image it could
    /// still evict is kept only by idle runners that no pre-warm order has
    /// asked for lately, retires the runners of the least recently used
    /// one (so the next pass evicts it) and returns `true`. Never touches
    /// an image the plan keeps or a run executing here uses (`protected`),
    /// a leased runner, or an image used since `recent`; and retires
    /// nothing while an image without users is left (too recent to evict
    /// yet, it goes first once it is old enough).
    fn retire_for_gc(&self, protected: &BTreeSet<String>, recent: u64) -> bool {
        let Ok(ix) = self.store.read_index() else {
            return false;
        };
        let users = self.store.users();
        let idle: BTreeMap<String, String> = self
            .pool
            .idle_runners()
            .into_iter()
            .map(|r| (r.id, r.key.as_str().to_owned()))
            .collect();
        let wanted = {
            let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            let asked = self.prewarm_asked.lock().unwrap_or_else(|e| e.into_inner());
            move |pool_key: &str| {
                keys.get(pool_key)
                    .and_then(|k| asked.get(k))
                    .is_some_and(|t| t.elapsed() < crate::prewarm::PREWARM_ASKED_FOR)
            }
        };
        let mut candidates = Vec::new();
        for rec in ix.images.values() {
            let digest = rec.manifest.to_string();
            if protected.contains(&digest)
                || rec
                    .index
                    .as_ref()
                    .is_some_and(|i| protected.contains(&i.to_string()))
            {
                continue;
            }
            let ids: Vec<String> = users
                .iter()
                .filter(|(_, m)| m == &rec.manifest)
                .map(|(id, _)| id.clone())
                .collect();
            if ids.is_empty() {
                return false;
            }
            let last_used = self.store.last_used_ms(rec);
            if last_used <= recent
                && ids
                    .iter()
                    .all(|id| idle.get(id).is_some_and(|k| !wanted(k)))
            {
                candidates.push((last_used, digest, ids));
            }
        }
        let Some((_, digest, ids)) = candidates.into_iter().min() else {
            return false;
        };
        let retired = self.pool.retire_idle(&ids);
        tracing::info!(image = %digest, runners = ?retired, "retired idle runners so that GC can evict their image");
        self.prepull.note("retired", &digest);
        self.inventory_changed.notify_one();
        !retired.is_empty()
    }

    /// The next image of the plan to pre-pull, with the plan's generation.
    fn next_prepull(&self) -> (u64, Option<PlannedPull>) {
        let (generation, pulls) = {
            let p = self.prepull.plan.lock().unwrap_or_else(|e| e.into_inner());
            (p.generation, p.pulls.clone())
        };
        let failed = self
            .prepull
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let run_images = self
            .prepull
            .run_images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // An image a run is pulling now would be fetched twice; once the
        // run has it, it is held.
        let next = pulls.into_iter().find(|p| {
            failed
                .get(&p.image.digest)
                .is_none_or(|t| t.elapsed() >= RETRY_AFTER)
                && !run_images.contains_key(&p.image.digest)
                && !self.held(&p.image.digest)
        });
        (generation, next)
    }

    /// Pre-pulls one image through the gate.
    async fn prepull_one(self: &Arc<Self>, pull: &PlannedPull) {
        let digest = pull.image.digest.clone();
        let reference = match pinned_reference(&pull.image) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(image = %digest, error = %e, "not pre-pulling");
                self.prepull
                    .failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(digest, Instant::now());
                return;
            }
        };
        let res = self
            .prepull
            .pull_into(
                &self.store,
                &self.registry,
                &digest,
                &reference,
                pull.bytes,
                Arc::new(SilentProgress),
                || self.inventory_changed.notify_one(),
                |image| {
                    self.images
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(digest.clone(), image.clone());
                },
            )
            .await;
        match res {
            Ok(report) => {
                tracing::info!(image = %pull.image.reference, bytes = report.bytes_downloaded, "pre-pulled");
            }
            Err(e) => {
                tracing::warn!(image = %pull.image.reference, error = %ember_error::chain(&e), "pre-pull failed");
                self.prepull
                    .failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(digest, Instant::now());
            }
        }
        self.inventory_changed.notify_one();
    }
}

impl Prepull {
    /// Pre-pulls `reference` (the plan's `digest`, `bytes` big) into
    /// `store` through a gate, listed in flight meanwhile (`listed` is
    /// called once it is) so a run can take it over. `record` is given
    /// the image before it leaves the in-flight map, so a run that finds
    /// no pre-pull to take over finds the image where `record` put it.
    #[allow(clippy::too_many_arguments)]
    async fn pull_into(
        self: &Arc<Self>,
        store: &Store,
        registry: &Arc<RegistryClient>,
        digest: &str,
        reference: &Reference,
        bytes: u64,
        progress: Arc<dyn PullProgress>,
        listed: impl FnOnce(),
        record: impl FnOnce(&ImageRecord),
    ) -> Result<PullReport, StoreError> {
        let flight = Arc::new(InFlight {
            bytes,
            promoted: AtomicBool::new(false),
            promote: Notify::new(),
            done: watch::Sender::new(None),
        });
        self.pulling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest.to_owned(), flight.clone());
        listed();
        self.note("started", digest);
        tracing::info!(image = %reference, "pre-pulling");
        let gate = Arc::new(Gate {
            p: self.clone(),
            flight: flight.clone(),
            image: digest.to_owned(),
            pace: Mutex::new((Instant::now(), 0)),
        });
        let res = ember_store::pull_gated(
            store,
            registry,
            reference,
            &PullOptions::default(),
            progress,
            Some(gate),
        )
        .await;
        let outcome = match &res {
            Ok(report) => {
                self.note("done", digest);
                record(&report.image);
                Ok(report.image.clone())
            }
            Err(e) => {
                self.note("failed", digest);
                Err(ember_api::client::error_chain(e))
            }
        };
        flight.done.send_replace(Some(outcome));
        self.pulling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
        res
    }
}

/// The node's pre-pull gate on its own, outside a node agent, for `ember
/// bench prepull` (which measures what pre-pulls in flight cost a run's
/// pull): the same code as the node's, so pre-pulls pause while a run
/// pulls ([`Prepuller::run_pull`]), are paced to the cap and can be taken
/// over.
pub struct Prepuller(Arc<Prepull>);

impl Prepuller {
    /// Pre-pulls paced to `bandwidth` bytes per second (`None`: no cap),
    /// journalled to `<dir>/prepull.log`.
    pub fn new(dir: &std::path::Path, bandwidth: Option<u64>) -> Self {
        Prepuller(Arc::new(Prepull::new(dir, bandwidth)))
    }

    /// Pre-pulls `reference` into `store` at low priority, as a node does.
    pub async fn prepull(
        &self,
        store: &Store,
        registry: &Arc<RegistryClient>,
        reference: &Reference,
        progress: Arc<dyn PullProgress>,
    ) -> Result<PullReport, StoreError> {
        let name = reference.to_string();
        self.0
            .pull_into(
                store,
                registry,
                &name,
                reference,
                0,
                progress,
                || {},
                |_| {},
            )
            .await
    }

    /// Marks a run's pull of `image` as in flight until the guard drops,
    /// as the node does around a run's own pull: pre-pulls hold still.
    pub fn run_pull(&self, image: &str) -> RunPull {
        self.0.run_pull(image)
    }
}

impl NodeAgent {
    /// Asks the cluster cache, if the node pulls through one, to fetch the
    /// head of the plan in force; journals what it answered, per image.
    async fn warm_cache(self: Arc<Self>) {
        let Some(cache) = self.cfg.cache.clone() else {
            return;
        };
        let head: Vec<(String, String)> = self
            .prepull
            .plan
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pulls
            .iter()
            .take(WARM_HEAD)
            .filter_map(|p| {
                let r = pinned_reference(&p.image).ok()?;
                Some((p.image.digest.clone(), r.to_string()))
            })
            .collect();
        if head.is_empty() {
            return;
        }
        let url = format!("{}/ember/v1/warm", cache.trim_end_matches('/'));
        let body = serde_json::json!({
            "images": head.iter().map(|(_, r)| r).collect::<Vec<_>>(),
        });
        let answer = async {
            let http = ember_http::client::builder(&[url.as_str()])
                .timeout(WARM_TIMEOUT)
                .build()
                .map_err(|e| e.to_string())?;
            let resp = http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| ember_api::client::error_chain(&e))?;
            let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
            serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| e.to_string())
        }
        .await;
        match answer {
            Ok(v) => {
                let results = v["images"].as_array().cloned().unwrap_or_default();
                for (digest, reference) in &head {
                    let r = results.iter().find(|r| r["image"] == reference.as_str());
                    match r {
                        Some(r) if r["error"].is_null() => {
                            self.prepull.note("cache_warmed", digest);
                        }
                        other => {
                            let why = other.map(|r| r["error"].to_string()).unwrap_or_default();
                            tracing::warn!(image = %reference, error = %why, "the cache did not warm it");
                            self.prepull.note("cache_warm_failed", digest);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(cache = %cache, error = %e, "asking the cache to warm the plan's head");
                for (digest, _) in &head {
                    self.prepull.note("cache_warm_failed", digest);
                }
            }
        }
    }
}

/// Carries out plans until aborted: on each new plan, GC, then the plan's
/// pulls in order, one at a time, GC after each.
pub(crate) async fn prepull_loop(agent: Arc<NodeAgent>) {
    let mut seen = 0;
    loop {
        let (generation, next) = {
            let a = agent.clone();
            tokio::task::spawn_blocking(move || a.next_prepull())
                .await
                .unwrap_or((0, None))
        };
        if generation != seen {
            seen = generation;
            // Beside the pulls, not before them: the cache's fetch of the
            // whole head can take long.
            tokio::spawn(agent.clone().warm_cache());
            let a = agent.clone();
            let _ = tokio::task::spawn_blocking(move || a.collect()).await;
        }
        match next {
            Some(pull) => {
                agent.prepull_one(&pull).await;
                let a = agent.clone();
                let _ = tokio::task::spawn_blocking(move || a.collect()).await;
            }
            // Nothing to do until the next plan; meanwhile the store may
            // grow (runs' pulls, `ember pull` by hand), so GC looks again
            // every GC_INTERVAL, and failed pre-pulls are retried.
            None => {
                tokio::select! {
                    () = agent.prepull.planned.notified() => {}
                    () = tokio::time::sleep(GC_INTERVAL) => {
                        let a = agent.clone();
                        let _ = tokio::task::spawn_blocking(move || a.collect()).await;
                    }
                }
            }
        }
    }
}
