//! The pool: idle runners by key, leases, delayed pause, budgets.
//!
//! # Locking
//!
//! One mutex guards the bookkeeping (`State`): the idle list and the
//! counters. It is held only for list operations and for the single
//! `write(2)` that freezes an idle runner; never across creating a
//! container, an exec, a health check, a workspace reset or a destroy. So a
//! run that waits for a new runner of one key never holds up runs of other
//! keys (nor of its own key: two acquires of a key with no idle runner each
//! create one).
//!
//! # Threads
//!
//! * The caller's thread does acquire (thaw, health check, or create) and
//!   release (memory counters, workspace reset). All of it is blocking;
//!   an async caller runs it in `spawn_blocking`.
//! * One *reaper* thread freezes runners idle for `pause_after`, destroys
//!   runners idle for `idle_ttl`, and enforces the memory budget. It sleeps
//!   until the next deadline; a release wakes it only when the released
//!   runner's deadline comes before the one it sleeps towards, so the hot
//!   path of back-to-back runs does not pay for a wakeup.
//! * Destroying a runner (tens of milliseconds: kill, wait for runc,
//!   unmount, remove) happens on a short-lived thread, so neither a
//!   release nor the acquire that replaces a dead runner waits for it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use ember_agent_proto::{AgentClient, ClientError, ExecRequest, ExecResult, Started};
use ember_runtime::cgroup::{Cgroups, MemoryEvents};
use ember_runtime::{RecoverReport, Runc};
use ember_store::Store;

use crate::error::PoolError;
use crate::key::{RunnerKey, RunnerSpec};
use crate::runner::{ExecDefaults, RunnerError};
use crate::runtime::{Probe, RuncRuntime, RunnerContainer, RunnerRuntime};

/// Configuration of a [`Pool`]. [`PoolConfig::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The pool's directory; runners live in `<root>/runners/<id>`.
    pub root: PathBuf,
    /// runc, with the state directory the runners' containers use.
    pub runc: Runc,
    /// The statically linked `ember-agent` on the host, bind-mounted
    /// read-only into every runner.
    pub agent_binary: PathBuf,
    /// When set, every runner claims its image here (`users/<id>.json`) so
    /// the store's GC never removes the layers a runner has mounted.
    pub store: Option<Store>,
    /// Freeze a runner once it has been idle this long; `None` never
    /// freezes. Default 3 s: runs that follow each other closely never pay
    /// for a thaw, and a runner nobody uses soon stops costing CPU.
    pub pause_after: Option<Duration>,
    /// Destroy a runner once it has been idle this long. Default 10 min.
    pub idle_ttl: Duration,
    /// Most runners (idle and leased) to keep; when a new one would pass
    /// it, or after a release that passes it, least-recently-used idle
    /// runners are destroyed. Leased runners are never taken away, so a
    /// burst of concurrent runs may pass the budget while it lasts.
    /// Default 64.
    pub max_runners: usize,
    /// Memory budget over all runners (`memory.usage_in_bytes` of their
    /// cgroups); above it, least-recently-used idle runners are destroyed.
    /// Checked by the reaper every `budget_interval`. Default: none.
    pub max_memory_bytes: Option<u64>,
    /// How often the reaper checks the memory budget. Default 1 s.
    pub budget_interval: Duration,
    /// How long creating a runner may take until its agent answers.
    /// Default 30 s.
    pub create_timeout: Duration,
    /// How long a reused runner's agent has to answer the health check.
    /// Default 500 ms.
    pub health_timeout: Duration,
    /// Give every runner host directories at `/tmp`, `/var/tmp` and `/run`
    /// and a tmpfs at `/dev/shm`, emptied after every run like
    /// `/workspace` (see [`Pool::release`]). Default true.
    pub reset_scratch: bool,
    /// Never-used runners to keep ready per single-use key (a spec without
    /// a recycling key): after an acquire of such a key takes one (or
    /// creates a runner), a background thread creates spares up to this
    /// many, so the next run of the same image and shape starts on a fresh
    /// runner without waiting for its creation. Spares are idle runners:
    /// frozen, expired and evicted like the others. Default 1; 0 makes
    /// every single-use run create its runner.
    pub fresh_spares: usize,
    /// How long after a clean exit (code 0, no signal, timeout, cancel or
    /// connection error) a recycled runner is reused without a health
    /// check: that exit proved its agent answering and idle, and the pool
    /// only asks the kernel whether the agent's process still runs
    /// ([`RunnerContainer::alive`]). A runner idle for longer, frozen, or
    /// whose last exec ended otherwise (or that ran none) is pinged as
    /// before. Default 1 s (the reuse gap under a burst is well under a
    /// millisecond); zero pings every time.
    pub health_proof: Duration,
}

impl PoolConfig {
    /// A configuration with the default budgets and timings.
    pub fn new(
        root: impl Into<PathBuf>,
        runc: Runc,
        agent_binary: impl Into<PathBuf>,
    ) -> PoolConfig {
        PoolConfig {
            root: root.into(),
            runc,
            agent_binary: agent_binary.into(),
            store: None,
            pause_after: Some(Duration::from_secs(3)),
            idle_ttl: Duration::from_secs(600),
            max_runners: 64,
            max_memory_bytes: None,
            budget_interval: Duration::from_secs(1),
            create_timeout: Duration::from_secs(30),
            health_timeout: Duration::from_millis(500),
            reset_scratch: true,
            fresh_spares: 1,
            health_proof: Duration::from_secs(1),
        }
    }
}

/// How a run ended, as the caller judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The run succeeded: its runner may serve the next run.
    Succeeded,
    /// The run failed: its runner is discarded, since whatever made it
    /// fail may have left the runner in a bad state.
    Failed,
    /// The run asked not to be recycled.
    NoRecycle,
}

impl Outcome {
    /// [`Outcome::Succeeded`] for an exec that exited 0 without timeout or
    /// cancellation, else [`Outcome::Failed`].
    pub fn of(result: &ExecResult) -> Outcome {
        if result.success() && !result.timed_out && !result.cancelled && result.signal.is_none() {
            Outcome::Succeeded
        } else {
            Outcome::Failed
        }
    }
}

/// Why a runner was not returned to the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscardReason {
    /// The caller reported [`Outcome::Failed`].
    Failed,
    /// The caller reported [`Outcome::NoRecycle`].
    NoRecycle,
    /// The runner's spec has no recycling key: it serves one run only.
    SingleUse,
    /// An exec timed out (its process tree was killed).
    TimedOut,
    /// An exec was cancelled.
    Cancelled,
    /// The runner hit its memory limit during the lease (`memory.failcnt`
    /// or the OOM killer's count went up).
    MemoryLimit {
        /// Increase of `memory.failcnt`.
        failcnt: u64,
        /// Processes the OOM killer killed.
        oom_kill: u64,
    },
    /// The connection to the agent failed during the lease.
    AgentLost,
    /// The workspace could not be emptied.
    ResetFailed(String),
    /// The pool has been shut down.
    ShutDown,
    /// The lease was dropped without [`Pool::release`].
    Abandoned,
}

/// What [`Pool::release`] did with the runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// Back in the pool, workspace emptied.
    Recycled,
    /// Destroyed (in the background).
    Discarded(DiscardReason),
}

/// How a lease's runner was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseInfo {
    /// An idle runner was reused (else one was created).
    pub reused: bool,
    /// The reused runner was frozen and had to be thawed.
    pub was_frozen: bool,
    /// Idle runners found dead or unhealthy and replaced on the way.
    pub replaced: u32,
    /// Time spent in [`Pool::acquire`].
    pub acquire: Duration,
}

/// Counters and gauges of a pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Idle runners now.
    pub idle: usize,
    /// Of those, frozen.
    pub frozen: usize,
    /// Leased runners now.
    pub leased: usize,
    /// Runners being created now.
    pub creating: usize,
    /// Runners being destroyed now.
    pub destroying: usize,
    /// Runners created.
    pub created: u64,
    /// Acquires served by an idle runner.
    pub reused: u64,
    /// Idle runners that failed their health check.
    pub unhealthy: u64,
    /// Reuses without a health check: the runner's last exec had just
    /// ended cleanly ([`PoolConfig::health_proof`]).
    pub proven: u64,
    /// Releases that returned the runner to the pool.
    pub recycled: u64,
    /// Runners created idle by [`Pool::prewarm`].
    pub prewarmed: u64,
    /// Never-used spares created for single-use keys
    /// ([`PoolConfig::fresh_spares`]).
    pub spares: u64,
    /// Releases that discarded the runner.
    pub discarded: u64,
    /// Idle runners destroyed for the count budget.
    pub evicted_count: u64,
    /// Idle runners destroyed for the memory budget.
    pub evicted_memory: u64,
    /// Idle runners destroyed after `idle_ttl`.
    pub expired: u64,
    /// Freezes.
    pub freezes: u64,
    /// Thaws.
    pub thaws: u64,
}

/// An idle runner as [`Pool::idle_runners`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleRunner {
    /// Container id.
    pub id: String,
    /// Its key.
    pub key: RunnerKey,
    /// Frozen by the pool.
    pub frozen: bool,
    /// Idle for this long.
    pub idle_for: Duration,
    /// Runs it has served.
    pub runs: u64,
    /// Time since it was created.
    pub age: Duration,
}

/// What [`Pool::recover`] found and removed.
#[derive(Debug, Default)]
pub struct PoolRecoverReport {
    /// Runner ids whose leftovers were removed.
    pub runners: Vec<String>,
    /// Frozen leftovers thawed so that they could be killed.
    pub thawed: Vec<String>,
    /// The runtime's account: runc containers deleted, mounts, cgroups and
    /// directories removed, errors.
    pub runtime: RecoverReport,
}

/// A runner as the pool keeps it: its container and the pool's own
/// bookkeeping about it (what policy decides on).
#[derive(Debug)]
struct Runner {
    id: String,
    key: RunnerKey,
    created_at: Instant,
    /// Runs completed on it.
    runs: u64,
    /// Frozen by the pool (the freezer may still be FREEZING).
    frozen: bool,
    /// Serves one run only (its spec has no recycling key).
    single_use: bool,
    /// Memory-limit counters when it was created: a run that moved them
    /// hit the limit (a runner that did is never reused, so they only
    /// ever move once).
    mem_baseline: MemoryEvents,
    /// When the current lease began (for the scratch reset's ctime check).
    lease_started: SystemTime,
    /// When it was released after a lease whose last exec ended cleanly
    /// (see [`PoolConfig::health_proof`]); `None` otherwise.
    proven_at: Option<Instant>,
    container: Box<dyn RunnerContainer>,
}

impl Runner {
    fn new(container: Box<dyn RunnerContainer>, spec: &RunnerSpec) -> Runner {
        Runner {
            id: container.id().to_owned(),
            key: spec.key().clone(),
            created_at: Instant::now(),
            runs: 0,
            frozen: false,
            single_use: !spec.recyclable(),
            mem_baseline: container.memory_events(),
            lease_started: SystemTime::now(),
            proven_at: None,
            container,
        }
    }

    fn freeze(&mut self) -> Result<(), RunnerError> {
        self.container.freeze()?;
        self.frozen = true;
        Ok(())
    }

    fn thaw(&mut self) -> Result<(), RunnerError> {
        self.container.thaw()?;
        self.frozen = false;
        Ok(())
    }

    fn health_check(&mut self, timeout: Duration) -> Result<(), RunnerError> {
        self.container.health_check(timeout)
    }

    fn destroy(&mut self) -> Result<(), RunnerError> {
        self.container.destroy()
    }
}

/// Where a pool's runners live: `<root>/runners`, created, canonical.
fn runners_dir(config: &PoolConfig) -> Result<PathBuf, PoolError> {
    let runners_dir = config.root.join("runners");
    std::fs::create_dir_all(&runners_dir).map_err(|source| PoolError::Dir {
        path: runners_dir.clone(),
        source,
    })?;
    std::fs::canonicalize(&runners_dir).map_err(|source| PoolError::Dir {
        path: runners_dir.clone(),
        source,
    })
}

struct Idle {
    runner: Runner,
    since: Instant,
    /// Freezing failed once; not retried until the runner is reused.
    no_freeze: bool,
}

#[derive(Default)]
struct State {
    /// Idle runners, least recently used first.
    idle: Vec<Idle>,
    leased: usize,
    creating: usize,
    destroying: usize,
    /// Counters of every live runner (idle or leased), for the memory
    /// budget.
    live: std::collections::HashMap<String, Arc<dyn Probe>>,
    /// Spares being created, by single-use key.
    spares_creating: std::collections::HashMap<RunnerKey, usize>,
    shut_down: bool,
    /// When the reaper will wake up next (`None`: not until notified).
    reaper_wake_at: Option<Instant>,
    next_budget_check: Option<Instant>,
    stats: PoolStats,
}

struct Inner {
    /// Makes the runners' containers (runc, or a test's fake).
    runtime: Arc<dyn RunnerRuntime>,
    runners_dir: PathBuf,
    pause_after: Option<Duration>,
    idle_ttl: Duration,
    max_runners: usize,
    max_memory_bytes: Option<u64>,
    budget_interval: Duration,
    health_timeout: Duration,
    health_proof: Duration,
    fresh_spares: usize,
    state: Mutex<State>,
    /// Wakes the reaper (new deadlines, shutdown) and shutdown (destroys
    /// finished).
    changed: Condvar,
    seq: AtomicU64,
}

/// A pool of warm runners. `Send + Sync`: share it in an `Arc`; its methods
/// block (see the [module docs](self)), so call them from
/// `spawn_blocking` in async code.
///
/// Dropping the pool shuts it down ([`Pool::shutdown`]).
pub struct Pool {
    inner: Arc<Inner>,
    reaper: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("root", &self.inner.runners_dir)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// A runner lent to one run. Give it back with [`Pool::release`]; a lease
/// dropped without that discards its runner.
pub struct Lease {
    runner: Option<Runner>,
    inner: Arc<Inner>,
    info: LeaseInfo,
    /// Forced discard reasons observed during the lease.
    broken: bool,
    timed_out: bool,
    cancelled: bool,
    /// The lease's last exec exited 0 (no signal, timeout, cancel or
    /// spawn error): the agent answered it and runs nothing.
    clean_exit: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id())
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The bookkeeping stays consistent across a panic elsewhere (every
        // critical section is a few list operations), so keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // The pid keeps concurrent pools apart (they share the cgroup
        // parent); the time keeps a restarted process with the same pid
        // from reusing an id whose leftovers are not yet recovered.
        format!("ep{}-{n}-{nanos:08x}", std::process::id())
    }

    /// Destroys `runners` on a background thread.
    fn destroy_later(self: &Arc<Self>, runners: Vec<Runner>) {
        if runners.is_empty() {
            return;
        }
        {
            let mut st = self.lock();
            st.destroying += runners.len();
            // Out of the memory budget's sum now, not once destroyed: a
            // check that ran before the destroy finished counted them
            // again and evicted further idle runners for memory that was
            // already on its way out.
            for r in &runners {
                st.live.remove(&r.id);
            }
        }
        let inner = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("ember-pool-destroy".into())
            .spawn(move || inner.destroy_now(runners));
        if let Err(e) = spawned {
            // The closure (and the runners in it) was dropped, which
            // destroyed them on this thread; only the count is left.
            tracing::warn!(error = %ember_error::chain(&e), "no thread for destroying runners");
        }
    }

    fn destroy_now(&self, runners: Vec<Runner>) {
        for mut r in runners {
            if let Err(e) = r.destroy() {
                tracing::warn!(id = %r.id, error = %ember_error::chain(&e), "destroying runner");
            }
            let mut st = self.lock();
            st.live.remove(&r.id);
            st.destroying -= 1;
            self.changed.notify_all();
        }
    }

    /// Removes least-recently-used idle runners while the count budget is
    /// exceeded (counting `extra` runners about to be created).
    fn over_count(&self, st: &mut State, extra: usize) -> Vec<Runner> {
        let mut out = Vec::new();
        while st.idle.len() + st.leased + st.creating + extra > self.max_runners
            && !st.idle.is_empty()
        {
            out.push(st.idle.remove(0).runner);
            st.stats.evicted_count += 1;
        }
        out
    }

    /// Wakes the reaper if a runner idle from now on needs it (freeze,
    /// expiry, memory check) before the time it sleeps towards.
    fn nudge_reaper(&self, st: &State) {
        let now = Instant::now();
        let mut due = now + self.idle_ttl;
        if let Some(pa) = self.pause_after {
            due = due.min(now + pa);
        }
        if self.max_memory_bytes.is_some() {
            due = due.min(st.next_budget_check.unwrap_or(now));
        }
        if st.reaper_wake_at.is_none_or(|w| w > due) {
            self.changed.notify_all();
        }
    }

    /// Ends a lease: recycles the runner unless `reason` says otherwise.
    /// `recycled` is false for a runner that served no run (pre-warmed),
    /// which is not counted as a recycle.
    fn finish(
        self: &Arc<Self>,
        runner: Runner,
        reason: Option<DiscardReason>,
        recycled: bool,
    ) -> Released {
        let mut st = self.lock();
        st.leased -= 1;
        let reason = reason.or(st.shut_down.then_some(DiscardReason::ShutDown));
        match reason {
            Some(r) => {
                st.stats.discarded += 1;
                drop(st);
                tracing::debug!(id = %runner.id, reason = ?r, "discarding runner");
                self.destroy_later(vec![runner]);
                Released::Discarded(r)
            }
            None => {
                if recycled {
                    st.stats.recycled += 1;
                }
                st.idle.push(Idle {
                    runner,
                    since: Instant::now(),
                    no_freeze: false,
                });
                let evicted = self.over_count(&mut st, 0);
                self.nudge_reaper(&st);
                drop(st);
                self.destroy_later(evicted);
                Released::Recycled
            }
        }
    }

    /// Creates a runner for `spec` and lends it; the caller has counted
    /// it in `creating`.
    fn create(
        self: &Arc<Self>,
        spec: &RunnerSpec,
        t0: Instant,
        replaced: u32,
    ) -> Result<Lease, PoolError> {
        let id = self.next_id();
        let created = self.runtime.create(&id, spec).map(|c| Runner::new(c, spec));
        let mut st = self.lock();
        let mut runner = match created {
            Ok(r) => r,
            Err(e) => {
                st.creating -= 1;
                self.changed.notify_all();
                return Err(PoolError::Create(Box::new(e)));
            }
        };
        if st.shut_down {
            // Still counted as creating, so that shutdown waits for this
            // runner to be gone.
            drop(st);
            if let Err(e) = runner.destroy() {
                tracing::warn!(id = %runner.id, error = %ember_error::chain(&e), "destroying runner");
            }
            let mut st = self.lock();
            st.creating -= 1;
            self.changed.notify_all();
            return Err(PoolError::ShutDown);
        }
        st.creating -= 1;
        st.stats.created += 1;
        st.live.insert(runner.id.clone(), runner.container.probe());
        st.leased += 1;
        drop(st);
        tracing::debug!(id = %runner.id, key = runner.key.short(), ms = t0.elapsed().as_secs_f64() * 1e3, "created runner");
        Ok(Lease {
            runner: Some(runner),
            inner: Arc::clone(self),
            info: LeaseInfo {
                reused: false,
                was_frozen: false,
                replaced,
                acquire: t0.elapsed(),
            },
            broken: false,
            timed_out: false,
            cancelled: false,
            clean_exit: false,
        })
    }

    /// Creates a runner for `spec` straight into the idle list (counted in
    /// `creating` by the caller); returns its id.
    fn create_idle(self: &Arc<Self>, spec: &RunnerSpec) -> Result<String, PoolError> {
        let mut lease = self.create(spec, Instant::now(), 0)?;
        let Some(runner) = lease.runner.take() else {
            // `create` always hands out a lease holding its runner.
            return Err(PoolError::ShutDown);
        };
        let id = runner.id.clone();
        match self.finish(runner, None, false) {
            Released::Recycled => Ok(id),
            // Shut down meanwhile.
            Released::Discarded(_) => Err(PoolError::ShutDown),
        }
    }

    /// Starts creating never-used spares of single-use `spec` until
    /// `fresh_spares` of them are idle or being created.
    fn replenish(self: &Arc<Self>, spec: &RunnerSpec) {
        if self.fresh_spares == 0 {
            return;
        }
        let missing = {
            let mut st = self.lock();
            if st.shut_down {
                return;
            }
            let idle = st
                .idle
                .iter()
                .filter(|i| i.runner.key == *spec.key())
                .count();
            let creating = st.spares_creating.get(spec.key()).copied().unwrap_or(0);
            let missing = self.fresh_spares.saturating_sub(idle + creating);
            if missing == 0 {
                return;
            }
            *st.spares_creating.entry(spec.key().clone()).or_default() += missing;
            missing
        };
        let inner = Arc::clone(self);
        let key = spec.key().clone();
        let spec = spec.clone();
        let spawned = std::thread::Builder::new()
            .name("ember-pool-spare".into())
            .spawn(move || {
                for _ in 0..missing {
                    let made = {
                        let mut st = inner.lock();
                        if st.shut_down {
                            None
                        } else {
                            st.creating += 1;
                            let evicted = inner.over_count(&mut st, 0);
                            drop(st);
                            inner.destroy_later(evicted);
                            Some(inner.create_idle(&spec))
                        }
                    };
                    let mut st = inner.lock();
                    match made {
                        Some(Ok(_)) => st.stats.spares += 1,
                        Some(Err(PoolError::ShutDown)) | None => {}
                        Some(Err(e)) => tracing::warn!(key = spec.key().short(), error = %ember_error::chain(&e), "creating a spare runner"),
                    }
                    if let Some(n) = st.spares_creating.get_mut(spec.key()) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            st.spares_creating.remove(spec.key());
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %ember_error::chain(&e), "no thread for creating spare runners");
            let mut st = self.lock();
            st.spares_creating.remove(&key);
        }
    }

    fn reaper(self: Arc<Self>) {
        let mut st = self.lock();
        loop {
            if st.shut_down {
                return;
            }
            let now = Instant::now();
            // Freeze what has idled long enough: one write each, under the
            // lock so no acquire can take a runner halfway.
            let mut to_verify: Vec<(String, Arc<dyn Probe>)> = Vec::new();
            if let Some(pa) = self.pause_after {
                let mut froze = 0;
                for idle in st.idle.iter_mut() {
                    if !idle.runner.frozen && !idle.no_freeze && idle.since + pa <= now {
                        match idle.runner.freeze() {
                            Ok(()) => {
                                froze += 1;
                                to_verify
                                    .push((idle.runner.id.clone(), idle.runner.container.probe()));
                            }
                            Err(e) => {
                                // Don't retry every tick: it stays unfrozen
                                // until reused or expired.
                                tracing::warn!(error = %ember_error::chain(&e), "freezing idle runner");
                                idle.no_freeze = true;
                            }
                        }
                    }
                }
                st.stats.freezes += froze;
            }
            // Destroy what has idled too long.
            let ttl = self.idle_ttl;
            let mut doomed: Vec<Runner> = Vec::new();
            let mut i = 0;
            while i < st.idle.len() {
                if st.idle[i].since + ttl <= now {
                    doomed.push(st.idle.remove(i).runner);
                    st.stats.expired += 1;
                } else {
                    i += 1;
                }
            }
            // The memory budget, when due.
            let budget_due =
                self.max_memory_bytes.is_some() && st.next_budget_check.is_none_or(|t| t <= now);
            drop(st);

            for (id, cg) in to_verify {
                match cg.wait_frozen(Duration::from_secs(1)) {
                    Ok(true) => {}
                    // Thawed by an acquire meanwhile, or still FREEZING: a
                    // later thaw puts it right either way.
                    Ok(false) => tracing::debug!(id, "runner not FROZEN after freezing"),
                    Err(e) => {
                        tracing::debug!(id, error = %ember_error::chain(&e), "reading freezer state")
                    }
                }
            }
            self.destroy_later(doomed);
            if budget_due {
                self.enforce_memory();
            }

            st = self.lock();
            if budget_due {
                st.next_budget_check = Some(Instant::now() + self.budget_interval);
            }
            // A shutdown that came while the lock was released notified
            // nobody: check before sleeping, or the join would wait forever.
            if st.shut_down {
                return;
            }
            let wake = self.next_deadline(&st);
            st.reaper_wake_at = wake;
            st = match wake {
                Some(w) => {
                    let d = w.saturating_duration_since(Instant::now());
                    self.changed
                        .wait_timeout(st, d)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }

    fn next_deadline(&self, st: &State) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| {
            next = Some(next.map_or(t, |n| n.min(t)));
        };
        for idle in &st.idle {
            if let Some(pa) = self.pause_after
                && !idle.runner.frozen
                && !idle.no_freeze
            {
                consider(idle.since + pa);
            }
            consider(idle.since + self.idle_ttl);
        }
        if self.max_memory_bytes.is_some()
            && (!st.idle.is_empty() || st.leased > 0)
            && let Some(t) = st.next_budget_check
        {
            consider(t);
        }
        next
    }

    /// Destroys least-recently-used idle runners while all runners
    /// together use more memory than the budget.
    fn enforce_memory(self: &Arc<Self>) -> usize {
        let Some(budget) = self.max_memory_bytes else {
            return 0;
        };
        let groups: Vec<(String, Arc<dyn Probe>)> = {
            let st = self.lock();
            st.live
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        // Read outside the lock: one file per runner.
        let usage: std::collections::HashMap<String, u64> = groups
            .into_iter()
            .map(|(id, cg)| {
                let u = cg.memory_usage().unwrap_or(0);
                (id, u)
            })
            .collect();
        let mut total: u64 = usage.values().sum();
        if total <= budget {
            return 0;
        }
        let mut st = self.lock();
        let mut doomed = Vec::new();
        while total > budget && !st.idle.is_empty() {
            let r = st.idle.remove(0).runner;
            total = total.saturating_sub(usage.get(&r.id).copied().unwrap_or(0));
            st.stats.evicted_memory += 1;
            doomed.push(r);
        }
        drop(st);
        let n = doomed.len();
        if n > 0 {
            tracing::info!(evicted = n, total, budget, "over the memory budget");
        }
        self.destroy_later(doomed);
        n
    }
}

impl Pool {
    /// Starts a pool: checks the agent binary, creates `<root>/runners`
    /// and starts the reaper thread. Call [`Pool::recover`] next, before
    /// the first acquire, when an earlier process may have left runners.
    pub fn new(config: PoolConfig) -> Result<Pool, PoolError> {
        let runners_dir = runners_dir(&config)?;
        let runtime = RuncRuntime::new(&config, runners_dir.clone())?;
        Pool::start(config, runners_dir, Arc::new(runtime))
    }

    /// A pool whose runners `runtime` makes: [`Pool::new`] with
    /// [`RuncRuntime`], or a test's [`crate::fake::FakeRuntime`]. The
    /// configuration's `runc`, `agent_binary`, `store`, `create_timeout`
    /// and `reset_scratch` are the runtime's business, and unused here.
    pub fn with_runtime(
        config: PoolConfig,
        runtime: Arc<dyn RunnerRuntime>,
    ) -> Result<Pool, PoolError> {
        let runners_dir = runners_dir(&config)?;
        Pool::start(config, runners_dir, runtime)
    }

    fn start(
        config: PoolConfig,
        runners_dir: PathBuf,
        runtime: Arc<dyn RunnerRuntime>,
    ) -> Result<Pool, PoolError> {
        if config.max_runners == 0 {
            return Err(PoolError::Config("max_runners must be at least 1".into()));
        }
        let inner = Arc::new(Inner {
            runtime,
            runners_dir,
            pause_after: config.pause_after,
            idle_ttl: config.idle_ttl,
            max_runners: config.max_runners,
            max_memory_bytes: config.max_memory_bytes,
            budget_interval: config.budget_interval,
            health_timeout: config.health_timeout,
            health_proof: config.health_proof,
            fresh_spares: config.fresh_spares,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            seq: AtomicU64::new(0),
        });
        let reaper_inner = Arc::clone(&inner);
        let reaper = std::thread::Builder::new()
            .name("ember-pool-reaper".into())
            .spawn(move || reaper_inner.reaper())
            .map_err(|source| PoolError::Dir {
                path: inner.runners_dir.clone(),
                source,
            })?;
        Ok(Pool {
            inner,
            reaper: Mutex::new(Some(reaper)),
        })
    }

    /// Where runner directories live.
    pub fn runners_dir(&self) -> &Path {
        &self.inner.runners_dir
    }

    /// Lends a runner with `spec`'s key: the most recently used idle one
    /// (thawed if frozen, health-checked through its agent, or only its
    /// agent's process checked right after a clean exit
    /// ([`PoolConfig::health_proof`]); a dead or unhealthy one is destroyed
    /// and the next tried), else a new one.
    /// For a single-use spec (no recycling key) the idle one can only be a
    /// never-used spare, and the pool then starts making the next spare
    /// ([`PoolConfig::fresh_spares`]).
    ///
    /// Never waits for other acquires: runs of other keys, and concurrent
    /// runs of the same key, proceed in parallel.
    pub fn acquire(&self, spec: &RunnerSpec) -> Result<Lease, PoolError> {
        let lease = self.acquire_runner(spec)?;
        if !spec.recyclable() {
            self.inner.replenish(spec);
        }
        Ok(lease)
    }

    fn acquire_runner(&self, spec: &RunnerSpec) -> Result<Lease, PoolError> {
        let t0 = Instant::now();
        let inner = &self.inner;
        let mut replaced = 0;
        loop {
            let taken = {
                let mut st = inner.lock();
                if st.shut_down {
                    return Err(PoolError::ShutDown);
                }
                // A single-use runner is never put back after a run, so
                // every idle one is unused; `runs == 0` says so again.
                let fits = |i: &Idle| {
                    i.runner.key == *spec.key() && (spec.recyclable() || i.runner.runs == 0)
                };
                match st.idle.iter().rposition(fits) {
                    Some(pos) => {
                        let idle = st.idle.remove(pos);
                        st.leased += 1;
                        st.stats.reused += 1;
                        if idle.runner.frozen {
                            st.stats.thaws += 1;
                        }
                        Some(idle.runner)
                    }
                    None => {
                        st.creating += 1;
                        let evicted = inner.over_count(&mut st, 0);
                        drop(st);
                        inner.destroy_later(evicted);
                        None
                    }
                }
            };
            let Some(mut runner) = taken else {
                return self.inner.create(spec, t0, replaced);
            };
            runner.lease_started = std::time::SystemTime::now();
            let was_frozen = runner.frozen;
            // A runner whose last exec ended cleanly a moment ago was
            // answering and idle then: a kernel check that its agent still
            // runs stands in for the ping (a round trip to the agent and
            // four socket options). Anything else is pinged.
            let proven = !was_frozen
                && runner
                    .proven_at
                    .take()
                    .is_some_and(|t| t.elapsed() < inner.health_proof)
                && runner.container.alive();
            let healthy = if proven {
                inner.lock().stats.proven += 1;
                Ok(())
            } else {
                (if was_frozen { runner.thaw() } else { Ok(()) })
                    .and_then(|()| runner.health_check(inner.health_timeout))
            };
            match healthy {
                Ok(_) => {
                    return Ok(Lease {
                        runner: Some(runner),
                        inner: Arc::clone(inner),
                        info: LeaseInfo {
                            reused: true,
                            was_frozen,
                            replaced,
                            acquire: t0.elapsed(),
                        },
                        broken: false,
                        timed_out: false,
                        cancelled: false,
                        clean_exit: false,
                    });
                }
                Err(e) => {
                    tracing::info!(id = %runner.id, error = %ember_error::chain(&e), "idle runner unhealthy; replacing it");
                    replaced += 1;
                    {
                        let mut st = inner.lock();
                        st.leased -= 1;
                        st.stats.unhealthy += 1;
                    }
                    inner.destroy_later(vec![runner]);
                }
            }
        }
    }

    /// Creates a new runner idle in the pool, without serving a run: a
    /// control plane keeps runners of a key ready before the first run of
    /// it arrives ("pre-warming"). Returns the runner's id. The next
    /// [`Pool::acquire`] of the key reuses it like any idle runner, so it
    /// is subject to the same freezing, expiry and budgets.
    ///
    /// Counts against [`PoolConfig::max_runners`] like an acquire:
    /// least-recently-used idle runners are evicted to make room.
    pub fn prewarm(&self, spec: &RunnerSpec) -> Result<String, PoolError> {
        {
            let mut st = self.inner.lock();
            if st.shut_down {
                return Err(PoolError::ShutDown);
            }
            st.creating += 1;
            let evicted = self.inner.over_count(&mut st, 0);
            drop(st);
            self.inner.destroy_later(evicted);
        }
        let id = self.inner.create_idle(spec)?;
        self.inner.lock().stats.prewarmed += 1;
        Ok(id)
    }

    /// Ends a lease. The runner goes back to the pool, with emptied
    /// scratch directories, when its spec has a recycling key, the run
    /// succeeded and nothing during the lease suggests the runner is
    /// damaged; otherwise it is destroyed (a single-use runner always is).
    ///
    /// What a recycled runner keeps, and the next run of the same key sees:
    /// writes to its root filesystem outside the reset directories (`/etc`,
    /// `/root`, `/home`, `/usr`, `/var` but `/var/tmp`, ...: the overlay's
    /// upper directory is not reset; a read-only root filesystem has
    /// none), System V IPC objects and POSIX message queues in its IPC
    /// namespace, its hostname, and the agent itself. What it does not
    /// keep: processes (the agent kills an exec's whole tree when its main
    /// process ends, and the pool checks that nothing runs before reuse),
    /// environment and working directory (per exec), and the contents,
    /// owner and mode of `/workspace`, `/tmp`, `/var/tmp`, `/run` (but
    /// the agent's `/run/ember`) and `/dev/shm` (with
    /// [`PoolConfig::reset_scratch`], the default).
    pub fn release(&self, mut lease: Lease, outcome: Outcome) -> Released {
        let Some(runner) = lease.runner.take() else {
            return Released::Discarded(DiscardReason::Abandoned);
        };
        let mut runner = runner;
        let reason = self.verdict(&lease, &runner, outcome);
        let reason = match reason {
            Some(r) => Some(r),
            None => match runner.container.reset_scratch(runner.lease_started) {
                Ok(()) => None,
                Err(e) => Some(DiscardReason::ResetFailed(
                    ember_error::chain(&e).to_string(),
                )),
            },
        };
        if reason.is_none() {
            runner.runs += 1;
        }
        runner.proven_at = (reason.is_none() && lease.clean_exit).then(Instant::now);
        self.inner.finish(runner, reason, true)
    }

    fn verdict(&self, lease: &Lease, runner: &Runner, outcome: Outcome) -> Option<DiscardReason> {
        match outcome {
            Outcome::Failed => return Some(DiscardReason::Failed),
            Outcome::NoRecycle => return Some(DiscardReason::NoRecycle),
            Outcome::Succeeded => {}
        }
        if runner.single_use {
            return Some(DiscardReason::SingleUse);
        }
        if lease.broken {
            return Some(DiscardReason::AgentLost);
        }
        if lease.timed_out {
            return Some(DiscardReason::TimedOut);
        }
        if lease.cancelled {
            return Some(DiscardReason::Cancelled);
        }
        let now = runner.container.memory_events();
        let base = runner.mem_baseline;
        if now.failcnt > base.failcnt || now.oom_kill > base.oom_kill {
            return Some(DiscardReason::MemoryLimit {
                failcnt: now.failcnt.saturating_sub(base.failcnt),
                oom_kill: now.oom_kill.saturating_sub(base.oom_kill),
            });
        }
        None
    }

    /// Freezes every idle runner now, whatever `pause_after` says, and
    /// waits until each reads `FROZEN` (those the reaper froze a moment ago
    /// included); returns how many idle runners are frozen.
    pub fn freeze_idle(&self) -> usize {
        let frozen: Vec<Arc<dyn Probe>> = {
            let mut st = self.inner.lock();
            let mut froze = 0;
            for idle in st.idle.iter_mut().filter(|i| !i.runner.frozen) {
                match idle.runner.freeze() {
                    Ok(()) => froze += 1,
                    Err(e) => {
                        tracing::warn!(error = %ember_error::chain(&e), "freezing idle runner")
                    }
                }
            }
            st.stats.freezes += froze;
            st.idle
                .iter()
                .filter(|i| i.runner.frozen)
                .map(|i| i.runner.container.probe())
                .collect()
        };
        frozen
            .iter()
            .filter(|cg| cg.wait_frozen(Duration::from_secs(5)).unwrap_or(false))
            .count()
    }

    /// Runs the memory budget check now; returns how many idle runners it
    /// destroyed.
    pub fn enforce_memory_budget(&self) -> usize {
        self.inner.enforce_memory()
    }

    /// Counters and gauges.
    pub fn stats(&self) -> PoolStats {
        let st = self.inner.lock();
        let mut s = st.stats;
        s.idle = st.idle.len();
        s.frozen = st.idle.iter().filter(|i| i.runner.frozen).count();
        s.leased = st.leased;
        s.creating = st.creating;
        s.destroying = st.destroying;
        s
    }

    /// The idle runners, least recently used first.
    pub fn idle_runners(&self) -> Vec<IdleRunner> {
        let st = self.inner.lock();
        let now = Instant::now();
        st.idle
            .iter()
            .map(|i| IdleRunner {
                id: i.runner.id.clone(),
                key: i.runner.key.clone(),
                frozen: i.runner.frozen,
                idle_for: now.saturating_duration_since(i.since),
                runs: i.runner.runs,
                age: now.saturating_duration_since(i.runner.created_at),
            })
            .collect()
    }

    /// Destroys the idle runners among `ids` now and returns their ids,
    /// once they are gone; leased runners (and ids not idle) are left
    /// alone. For a node's image GC: an image whose only users are idle
    /// runners nobody asks for can be evicted once they are retired.
    pub fn retire_idle(&self, ids: &[String]) -> Vec<String> {
        let runners: Vec<Runner> = {
            let mut st = self.inner.lock();
            let (retired, kept): (Vec<Idle>, Vec<Idle>) = std::mem::take(&mut st.idle)
                .into_iter()
                .partition(|i| ids.contains(&i.runner.id));
            st.idle = kept;
            st.destroying += retired.len();
            retired.into_iter().map(|i| i.runner).collect()
        };
        let retired = runners.iter().map(|r| r.id.clone()).collect();
        self.inner.destroy_now(runners);
        retired
    }

    /// Waits until no runner is being destroyed (or `timeout` passes);
    /// `true` if none is.
    pub fn wait_destroyed(&self, timeout: Duration) -> bool {
        let st = self.inner.lock();
        let (st, _) = self
            .inner
            .changed
            .wait_timeout_while(st, timeout, |s| s.destroying > 0)
            .unwrap_or_else(|p| p.into_inner());
        st.destroying == 0
    }

    /// Removes what an earlier process left in this pool's directory
    /// (crash, `kill -9`): containers (thawed first if frozen, then killed
    /// and deleted in runc), cgroups, overlay mounts, directories and store
    /// claims. Runners of live processes, this one included, are left
    /// alone: each holds an `flock` on its directory's lock file, and the
    /// kernel drops it when the owner dies.
    pub fn recover(&self) -> Result<PoolRecoverReport, PoolError> {
        self.inner.runtime.recover()
    }

    /// Stops the pool: no more acquires, idle runners destroyed (this
    /// waits for them), leased runners destroyed when released. The
    /// reaper thread is joined. Idempotent.
    pub fn shutdown(&self) {
        let idle: Vec<Runner> = {
            let mut st = self.inner.lock();
            st.shut_down = true;
            self.inner.changed.notify_all();
            st.idle.drain(..).map(|i| i.runner).collect()
        };
        if let Some(h) = self.reaper.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
        // In parallel: each destroy mostly waits for runc.
        std::thread::scope(|s| {
            for mut r in idle {
                let inner = &self.inner;
                s.spawn(move || {
                    if let Err(e) = r.destroy() {
                        tracing::warn!(id = %r.id, error = %ember_error::chain(&e), "destroying runner");
                    }
                    inner.lock().live.remove(&r.id);
                });
            }
        });
        // Runners being created (spares, other threads' acquires) are
        // destroyed by their creator once it sees the shutdown.
        let st = self.inner.lock();
        let _ = self
            .inner
            .changed
            .wait_timeout_while(st, Duration::from_secs(60), |s| {
                s.destroying > 0 || s.creating > 0
            })
            .unwrap_or_else(|p| p.into_inner());
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Lease {
    fn runner(&self) -> &Runner {
        // Only release() and drop take the runner, and both consume the
        // lease.
        self.runner
            .as_ref()
            .unwrap_or_else(|| unreachable!("lease without runner"))
    }

    /// The runner's container id.
    pub fn id(&self) -> &str {
        self.runner.as_ref().map_or("", |r| r.id.as_str())
    }

    /// The runner's key.
    pub fn key(&self) -> &RunnerKey {
        &self.runner().key
    }

    /// How the runner was found.
    pub fn info(&self) -> LeaseInfo {
        self.info
    }

    /// Runs served by this runner before this lease.
    pub fn runs(&self) -> u64 {
        self.runner().runs
    }

    /// The image's environment, working directory and user for execs.
    pub fn defaults(&self) -> &ExecDefaults {
        self.runner().container.defaults()
    }

    /// An exec request for `argv` with the image's environment, working
    /// directory and user.
    pub fn command<S: Into<String>>(&self, argv: impl IntoIterator<Item = S>) -> ExecRequest {
        self.runner().container.defaults().request(argv)
    }

    /// The host directory mounted at `/workspace` in the runner.
    pub fn workspace(&self) -> PathBuf {
        self.runner().container.workspace()
    }

    /// The runner's cgroups.
    pub fn cgroups(&self) -> &Cgroups {
        self.runner().container.cgroups()
    }

    /// Runs `req` in the runner, streaming output to `on_output(is_stderr,
    /// bytes)`.
    pub fn exec(
        &mut self,
        req: &ExecRequest,
        on_output: &mut dyn FnMut(bool, &[u8]),
    ) -> Result<ExecResult, PoolError> {
        self.exec_with(req, &mut |_| {}, on_output)
    }

    /// Like [`Lease::exec`], also calling `on_started` when the process has
    /// started (its `execve` succeeded), with the exec id for
    /// [`Canceller::cancel`].
    pub fn exec_with(
        &mut self,
        req: &ExecRequest,
        on_started: &mut dyn FnMut(&Started),
        on_output: &mut dyn FnMut(bool, &[u8]),
    ) -> Result<ExecResult, PoolError> {
        let Some(runner) = self.runner.as_mut() else {
            return Err(PoolError::ShutDown);
        };
        let id = runner.id.clone();
        let result = runner.container.exec(req, on_started, on_output);
        match result {
            Ok(r) => {
                self.timed_out |= r.timed_out;
                self.cancelled |= r.cancelled;
                self.clean_exit = Outcome::of(&r) == Outcome::Succeeded && r.spawn_error.is_none();
                Ok(r)
            }
            Err(source) => {
                self.clean_exit = false;
                if source.is_connection_error() {
                    self.broken = true;
                }
                Err(PoolError::Exec { id, source })
            }
        }
    }

    /// A handle that cancels this lease's execs from another thread.
    pub fn canceller(&self) -> Canceller {
        Canceller {
            socket: self.runner().container.socket(),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(r) = self.runner.take() {
            self.inner.finish(r, Some(DiscardReason::Abandoned), true);
        }
    }
}

/// Cancels execs of a lease over a second connection to its agent.
#[derive(Debug, Clone)]
pub struct Canceller {
    socket: PathBuf,
}

impl Canceller {
    /// Sends `signal` to the process group of exec `exec_id`.
    pub fn cancel(&self, exec_id: u64, signal: i32) -> Result<(), ClientError> {
        let mut c = AgentClient::connect_timeout(&self.socket, Duration::from_secs(1))?;
        c.cancel(exec_id, signal)
    }
}

impl From<RunnerError> for PoolError {
    fn from(e: RunnerError) -> Self {
        PoolError::Create(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_and_lease_can_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Pool>();
        send::<Lease>();
    }

    /// Regression: a shutdown that arrived while the reaper was outside
    /// the lock (checking the memory budget) was missed, and the reaper
    /// then slept forever, so `shutdown` hung joining it.
    #[test]
    fn shutdown_never_waits_for_a_sleeping_reaper() {
        // The reaper is the pool's own; no runner starts, so the fake
        // runtime serves (no root, no agent).
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let root = dir.path().to_path_buf();
        std::thread::spawn(move || {
            for _ in 0..300 {
                let mut cfg = crate::fake::FakeRuntime::config(&root);
                cfg.max_memory_bytes = Some(1);
                cfg.budget_interval = Duration::ZERO;
                let fake = Arc::new(crate::fake::FakeRuntime::new());
                drop(Pool::with_runtime(cfg, fake).unwrap());
            }
            tx.send(()).unwrap();
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("Pool::drop hung");
    }

    #[test]
    fn outcome_of_results() {
        let ok = ExecResult {
            exit_code: Some(0),
            ..ExecResult::default()
        };
        assert_eq!(Outcome::of(&ok), Outcome::Succeeded);
        for bad in [
            ExecResult {
                exit_code: Some(1),
                ..ExecResult::default()
            },
            ExecResult {
                signal: Some(9),
                ..ExecResult::default()
            },
            ExecResult {
                timed_out: true,
                ..ok.clone()
            },
            ExecResult {
                spawn_error: Some("no such file".into()),
                exit_code: Some(127),
                ..ExecResult::default()
            },
        ] {
            assert_eq!(Outcome::of(&bad), Outcome::Failed, "{bad:?}");
        }
    }
}
