//! A recording fake of [`RunnerRuntime`], for testing the pool's policy
//! without root, runc or the agent (youki tests its container state
//! machine the same way, against a fake `Syscall`).
//!
//! Every call the pool makes is appended to one log ([`FakeRuntime::calls`]),
//! in the order the pool made it, so a test asserts which runner was
//! reused, frozen, thawed, evicted or destroyed, and when. Outcomes are
//! scripted per runner: a failing create, a dead agent, memory use, a run
//! that hit its memory limit, an exec's result.
//!
//! ```
//! use std::sync::Arc;
//! use ember_pool::fake::{Call, FakeRuntime};
//! use ember_pool::{Outcome, Pool, PoolConfig, Released};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tmp = tempfile::tempdir()?;
//! let fake = FakeRuntime::new();
//! let pool = Pool::with_runtime(FakeRuntime::config(tmp.path()), Arc::new(fake.clone()))?;
//! let spec = FakeRuntime::spec("busybox", Some("team-a"));
//! let lease = pool.acquire(&spec)?;
//! let id = lease.id().to_owned();
//! assert_eq!(pool.release(lease, Outcome::Succeeded), Released::Recycled);
//! let again = pool.acquire(&spec)?;
//! assert_eq!(again.id(), id);
//! assert!(fake.calls().contains(&Call::HealthCheck(id)));
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use ember_agent_proto::{ClientError, ExecRequest, ExecResult, Started};
use ember_oci::Digest;
use ember_runtime::Runc;
use ember_runtime::cgroup::{Cgroups, MemoryEvents};
use oci_spec::image::ImageConfiguration;

use crate::error::PoolError;
use crate::key::{RunnerImage, RunnerShape, RunnerSpec};
use crate::pool::{PoolConfig, PoolRecoverReport};
use crate::runner::{ExecDefaults, RunnerError};
use crate::runtime::{Probe, RunnerContainer, RunnerRuntime};

/// One call the pool made, with the runner id it concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// [`RunnerRuntime::create`] (also recorded when scripted to fail).
    Create {
        /// The new runner.
        id: String,
        /// The spec's recycling key (`None`: single-use).
        recycle: Option<String>,
    },
    /// [`RunnerContainer::health_check`].
    HealthCheck(String),
    /// [`RunnerContainer::alive`].
    Alive(String),
    /// [`RunnerContainer::freeze`].
    Freeze(String),
    /// [`RunnerContainer::thaw`].
    Thaw(String),
    /// [`RunnerContainer::exec`], with the command's first word.
    Exec(String, String),
    /// [`RunnerContainer::reset_scratch`].
    Reset(String),
    /// [`RunnerContainer::destroy`] (only the first of a runner is
    /// recorded).
    Destroy(String),
    /// [`RunnerRuntime::recover`].
    Recover,
}

impl Call {
    /// The runner the call concerned (`None` for [`Call::Recover`]).
    pub fn id(&self) -> Option<&str> {
        match self {
            Call::Create { id, .. }
            | Call::HealthCheck(id)
            | Call::Alive(id)
            | Call::Freeze(id)
            | Call::Thaw(id)
            | Call::Exec(id, _)
            | Call::Reset(id)
            | Call::Destroy(id) => Some(id),
            Call::Recover => None,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<Call>,
    /// Errors for the next creates, in order (`None`: succeed).
    create_failures: VecDeque<Option<String>>,
    unhealthy: HashSet<String>,
    memory: HashMap<String, u64>,
    mem_events: HashMap<String, MemoryEvents>,
    exec_results: HashMap<String, VecDeque<ExecResult>>,
    reset_failures: HashSet<String>,
    frozen: HashSet<String>,
    live: HashSet<String>,
    /// Destroys wait while this is set ([`FakeRuntime::hold_destroys`]).
    hold_destroys: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Notified on every call, for [`FakeRuntime::wait_for`].
    called: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the calls from the others.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, st: &mut State, call: Call) {
        st.calls.push(call);
        self.called.notify_all();
    }
}

/// The recording fake. Cheap to clone: clones share one log and script.
#[derive(Debug, Clone, Default)]
pub struct FakeRuntime {
    shared: Arc<Shared>,
}

impl FakeRuntime {
    /// A fake whose runners all start, stay healthy and use no memory.
    pub fn new() -> FakeRuntime {
        FakeRuntime::default()
    }

    /// A pool configuration for a fake pool in `root`: the defaults, but
    /// no spares (tests of spares turn them on) and no agent (the fake
    /// needs none).
    pub fn config(root: &Path) -> PoolConfig {
        let mut cfg = PoolConfig::new(
            root.join("pool"),
            Runc::new(root.join("runc")),
            "/nonexistent/agent",
        );
        cfg.fresh_spares = 0;
        cfg
    }

    /// A spec for a made-up image named `image` (its manifest digest is the
    /// SHA-256 of the name), with the default shape.
    pub fn spec(image: &str, recycle: Option<&str>) -> RunnerSpec {
        FakeRuntime::spec_with(image, RunnerShape::default(), recycle)
    }

    /// Like [`FakeRuntime::spec`], with `shape`.
    pub fn spec_with(image: &str, shape: RunnerShape, recycle: Option<&str>) -> RunnerSpec {
        let manifest = Digest::sha256_of(image.as_bytes());
        let image = RunnerImage {
            manifest,
            config: ImageConfiguration::default(),
            layers: Vec::new(),
        };
        RunnerSpec::new(image, shape, recycle.map(str::to_owned))
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().calls.clone()
    }

    /// The calls that concerned runner `id`, in order.
    pub fn calls_of(&self, id: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.id() == Some(id))
            .collect()
    }

    /// Ids of the runners destroyed so far, in order.
    pub fn destroyed(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Destroy(id) => Some(id),
                _ => None,
            })
            .collect()
    }

    /// Ids of the runners frozen so far, in the order they were frozen.
    pub fn frozen_order(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Freeze(id) => Some(id),
                _ => None,
            })
            .collect()
    }

    /// Whether runner `id` is frozen now.
    pub fn is_frozen(&self, id: &str) -> bool {
        self.shared.lock().frozen.contains(id)
    }

    /// Runners created and not yet destroyed.
    pub fn live(&self) -> usize {
        self.shared.lock().live.len()
    }

    /// Waits up to `timeout` until `done` holds for the calls (checked on
    /// every call and every 10 ms); `true` if it does. For what the pool does on its own threads (the reaper's
    /// freezes and expiries, destroys in the background, spares).
    pub fn wait_for(&self, timeout: Duration, mut done: impl FnMut(&[Call]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if done(&st.calls) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .shared
                .called
                // Woken by every call; also polls, for conditions on the
                // pool's own counters that change after the last call.
                .wait_timeout(st, left.min(Duration::from_millis(10)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The next create fails with `reason` (after the ones already
    /// scripted).
    pub fn fail_next_create(&self, reason: &str) {
        self.shared
            .lock()
            .create_failures
            .push_back(Some(reason.to_owned()));
    }

    /// Runner `id`'s agent stops answering: its health checks fail.
    pub fn kill_agent(&self, id: &str) {
        self.shared.lock().unhealthy.insert(id.to_owned());
    }

    /// Runner `id` uses `bytes` of memory from now on.
    pub fn set_memory_usage(&self, id: &str, bytes: u64) {
        self.shared.lock().memory.insert(id.to_owned(), bytes);
    }

    /// Runner `id` hits its memory limit once (`memory.failcnt` goes up).
    pub fn hit_memory_limit(&self, id: &str) {
        let mut st = self.shared.lock();
        st.mem_events.entry(id.to_owned()).or_default().failcnt += 1;
    }

    /// The next exec on runner `id` returns `result` (else exit 0).
    pub fn script_exec(&self, id: &str, result: ExecResult) {
        self.shared
            .lock()
            .exec_results
            .entry(id.to_owned())
            .or_default()
            .push_back(result);
    }

    /// Destroys block (after recording their call) until
    /// [`FakeRuntime::release_destroys`]: a destroy that takes long, as a
    /// real one does while runc and the kernel clean up.
    pub fn hold_destroys(&self) {
        self.shared.lock().hold_destroys = true;
    }

    /// Lets held destroys finish.
    pub fn release_destroys(&self) {
        self.shared.lock().hold_destroys = false;
        self.shared.called.notify_all();
    }

    /// Emptying runner `id`'s scratch directories fails from now on.
    pub fn fail_reset(&self, id: &str) {
        self.shared.lock().reset_failures.insert(id.to_owned());
    }
}

impl RunnerRuntime for FakeRuntime {
    fn create(&self, id: &str, spec: &RunnerSpec) -> Result<Box<dyn RunnerContainer>, RunnerError> {
        let mut st = self.shared.lock();
        self.shared.record(
            &mut st,
            Call::Create {
                id: id.to_owned(),
                recycle: spec.recycle_key().map(str::to_owned),
            },
        );
        if let Some(Some(reason)) = st.create_failures.pop_front() {
            return Err(RunnerError::EarlyExit {
                id: id.to_owned(),
                how: reason,
                log: "(fake)".into(),
            });
        }
        st.live.insert(id.to_owned());
        Ok(Box::new(FakeRunner {
            id: id.to_owned(),
            defaults: ExecDefaults {
                env: Vec::new(),
                cwd: "/".into(),
                uid: None,
                gid: None,
            },
            cgroups: Cgroups::for_path(&format!("/ember-fake/{id}")),
            shared: Arc::clone(&self.shared),
            destroyed: false,
        }))
    }

    fn recover(&self) -> Result<PoolRecoverReport, PoolError> {
        let mut st = self.shared.lock();
        self.shared.record(&mut st, Call::Recover);
        Ok(PoolRecoverReport::default())
    }
}

#[derive(Debug)]
struct FakeRunner {
    id: String,
    defaults: ExecDefaults,
    /// Paths only, never touched: [`RunnerContainer::cgroups`] must lend one.
    cgroups: Cgroups,
    shared: Arc<Shared>,
    destroyed: bool,
}

impl FakeRunner {
    fn record(&self, call: Call) -> MutexGuard<'_, State> {
        let mut st = self.shared.lock();
        self.shared.record(&mut st, call);
        st
    }
}

impl RunnerContainer for FakeRunner {
    fn id(&self) -> &str {
        &self.id
    }

    fn defaults(&self) -> &ExecDefaults {
        &self.defaults
    }

    fn health_check(&mut self, _timeout: Duration) -> Result<(), RunnerError> {
        let st = self.record(Call::HealthCheck(self.id.clone()));
        if st.unhealthy.contains(&self.id) {
            return Err(RunnerError::Agent {
                id: self.id.clone(),
                source: ClientError::Broken,
            });
        }
        Ok(())
    }

    fn alive(&self) -> bool {
        let st = self.record(Call::Alive(self.id.clone()));
        !st.unhealthy.contains(&self.id)
    }

    fn freeze(&mut self) -> Result<(), RunnerError> {
        let mut st = self.record(Call::Freeze(self.id.clone()));
        st.frozen.insert(self.id.clone());
        Ok(())
    }

    fn thaw(&mut self) -> Result<(), RunnerError> {
        let mut st = self.record(Call::Thaw(self.id.clone()));
        st.frozen.remove(&self.id);
        Ok(())
    }

    fn probe(&self) -> Arc<dyn Probe> {
        Arc::new(FakeProbe {
            id: self.id.clone(),
            shared: Arc::clone(&self.shared),
        })
    }

    fn memory_events(&self) -> MemoryEvents {
        self.shared
            .lock()
            .mem_events
            .get(&self.id)
            .copied()
            .unwrap_or_default()
    }

    fn exec(
        &mut self,
        req: &ExecRequest,
        on_started: &mut dyn FnMut(&Started),
        _on_output: &mut dyn FnMut(bool, &[u8]),
    ) -> Result<ExecResult, ClientError> {
        let argv0 = req.argv.first().cloned().unwrap_or_default();
        let mut st = self.record(Call::Exec(self.id.clone(), argv0));
        if st.unhealthy.contains(&self.id) {
            return Err(ClientError::Broken);
        }
        let scripted = st
            .exec_results
            .get_mut(&self.id)
            .and_then(VecDeque::pop_front);
        drop(st);
        on_started(&Started { exec_id: 1, pid: 2 });
        Ok(scripted.unwrap_or(ExecResult {
            exit_code: Some(0),
            ..ExecResult::default()
        }))
    }

    fn reset_scratch(&mut self, _lease_started: SystemTime) -> io::Result<()> {
        let st = self.record(Call::Reset(self.id.clone()));
        if st.reset_failures.contains(&self.id) {
            return Err(io::Error::other("scripted reset failure"));
        }
        Ok(())
    }

    fn workspace(&self) -> PathBuf {
        PathBuf::from("/nonexistent/workspace").join(&self.id)
    }

    fn socket(&self) -> PathBuf {
        PathBuf::from("/nonexistent/agent.sock")
    }

    fn cgroups(&self) -> &Cgroups {
        &self.cgroups
    }

    fn destroy(&mut self) -> Result<(), RunnerError> {
        if !self.destroyed {
            {
                let mut st = self.record(Call::Destroy(self.id.clone()));
                while st.hold_destroys {
                    st = self
                        .shared
                        .called
                        .wait(st)
                        .unwrap_or_else(|p| p.into_inner());
                }
                st.live.remove(&self.id);
                st.frozen.remove(&self.id);
                // Gone with its cgroup.
                st.memory.remove(&self.id);
            }
            self.destroyed = true;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct FakeProbe {
    id: String,
    shared: Arc<Shared>,
}

impl Probe for FakeProbe {
    fn memory_usage(&self) -> Option<u64> {
        self.shared.lock().memory.get(&self.id).copied()
    }

    fn wait_frozen(&self, _timeout: Duration) -> io::Result<bool> {
        Ok(self.shared.lock().frozen.contains(&self.id))
    }
}
