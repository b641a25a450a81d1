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
//! * **Reported.** While an image is pre-pulled, the node's inventory
//!   lists it under `pulling`, so the scheduler counts it as arriving.
//! * **Kept.** With an image budget, the node's GC runs when a plan
//!   arrives, after each pre-pull and every few seconds, evicting in
//!   [`pullplan::eviction_order`]: never what the plan keeps, what a run
//!   executing here uses, what a container uses (the store checks) or what
//!   was used in the last [`GC_MIN_AGE`]; among the rest the least
//!   recently used first.
//!
//! What happens is also written to `<root>/prepull.log`, one JSON object a
//! line (`{"t_ms":…,"event":"paused","image":…}`), so what a node did with
//! its plan can be checked after the fact: `plan`, `started`, `paused`,
//! `resumed`, `done`, `failed`, `run_pull_started`, `run_pull_done`,
//! `evicted`, `over_budget` (what is left cannot be evicted).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_api::wire::PlannedPull;
use ember_control::pullplan::{self, HeldImage};
use ember_store::{PullGate, PullOptions, SilentProgress};
use tokio::sync::Notify;
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

/// The plan in force.
#[derive(Debug, Default)]
struct Plan {
    pulls: Vec<PlannedPull>,
    keep: BTreeSet<String>,
    /// Bumped by every new plan, so the pulling task notices a change.
    generation: u64,
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
    /// Image digest → bytes, for what is being pre-pulled now.
    pulling: Mutex<BTreeMap<String, u64>>,
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
            .clone()
    }

    /// Marks a run's pull of `image` as in flight until the guard drops:
    /// pre-pulls hold still meanwhile.
    pub(crate) fn run_pull(self: &Arc<Self>, image: &str) -> RunPull {
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

/// A run's pull in flight ([`Prepull::run_pull`]).
pub(crate) struct RunPull {
    p: Arc<Prepull>,
    image: String,
}

impl Drop for RunPull {
    fn drop(&mut self) {
        self.p.note("run_pull_done", &self.image);
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

/// The gate of one pre-pull: pauses while runs pull, paces to the cap.
struct Gate {
    p: Arc<Prepull>,
    image: String,
    /// Bytes admitted since `since`, for the cap.
    pace: Mutex<(Instant, u64)>,
}

impl Gate {
    /// Holds the download while a run pulls, then paces it to the cap; a
    /// run pull starting during the pacing pause holds it at once.
    async fn wait(&self, bytes: u64) {
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
    /// the module docs); a no-op without a budget.
    fn collect(&self) {
        let Some(high) = self.cfg.prepull.image_budget else {
            return;
        };
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
        let next = pulls.into_iter().find(|p| {
            failed
                .get(&p.image.digest)
                .is_none_or(|t| t.elapsed() >= RETRY_AFTER)
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
        self.prepull
            .pulling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest.clone(), pull.bytes);
        self.inventory_changed.notify_one();
        self.prepull.note("started", &digest);
        tracing::info!(image = %pull.image.reference, "pre-pulling");
        let gate = Arc::new(Gate {
            p: self.prepull.clone(),
            image: digest.clone(),
            pace: Mutex::new((Instant::now(), 0)),
        });
        let res = ember_store::pull_gated(
            &self.store,
            &self.registry,
            &reference,
            &PullOptions::default(),
            Arc::new(SilentProgress),
            Some(gate),
        )
        .await;
        self.prepull
            .pulling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&digest);
        match res {
            Ok(report) => {
                self.prepull.note("done", &digest);
                tracing::info!(image = %pull.image.reference, bytes = report.bytes_downloaded, "pre-pulled");
                self.images
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(digest, report.image);
            }
            Err(e) => {
                self.prepull.note("failed", &digest);
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
