//! The seam between the pool's policy and the containers under it.
//!
//! The pool decides *which* runner serves a run, when one is frozen, thawed,
//! reset, recycled, evicted or destroyed; everything that touches the
//! operating system (overlay mounts, runc, cgroups, the agent's socket) is
//! behind the two traits here, as youki puts its system calls behind
//! `Syscall`:
//!
//! * [`RunnerRuntime`] makes runner containers: the real one,
//!   [`RuncRuntime`], prepares each on [`ember_runtime::Container`] (overlay,
//!   user, `config.json`), starts it with `runc run` and waits for its agent.
//! * [`RunnerContainer`] is one live runner: health check, freeze, thaw,
//!   exec, scratch reset, destroy.
//!
//! [`crate::fake::FakeRuntime`] implements both without root: it records
//! every call and lets a test script outcomes (a failed create, a dead
//! agent, memory use), so the pool's policy is tested on its own; the
//! real thing is tested end to end in `tests/`.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ember_agent_proto::{ClientError, ExecRequest, ExecResult, Started};
use ember_runtime::cgroup::{Cgroups, MemoryEvents};

use crate::error::PoolError;
use crate::key::RunnerSpec;
use crate::pool::PoolRecoverReport;
use crate::runner::{ExecDefaults, RunnerError};

pub use crate::runner::RuncRuntime;

/// Makes runner containers. Shared by every thread of a pool.
pub trait RunnerRuntime: Send + Sync + fmt::Debug + 'static {
    /// Prepares and starts runner `id` for `spec` and returns once its
    /// agent answers. On error, whatever was created is removed.
    fn create(&self, id: &str, spec: &RunnerSpec) -> Result<Box<dyn RunnerContainer>, RunnerError>;

    /// Removes what an earlier, dead process left behind (see
    /// [`crate::Pool::recover`]).
    fn recover(&self) -> Result<PoolRecoverReport, PoolError>;
}

/// One live runner container. Owned by the pool's idle list or by one
/// lease, so never used from two threads at once; [`RunnerContainer::probe`]
/// hands out what may be read without holding it.
pub trait RunnerContainer: Send + fmt::Debug {
    /// The container id.
    fn id(&self) -> &str;

    /// The image's environment, working directory and user for execs.
    fn defaults(&self) -> &ExecDefaults;

    /// Asks the agent, within `timeout`, whether it is alive and idle.
    fn health_check(&mut self, timeout: Duration) -> Result<(), RunnerError>;

    /// Whether the agent's process still runs, asked of the kernel
    /// without a round trip to the agent (a pidfd poll): what the pool
    /// asks instead of a health check of a runner whose last exec just
    /// ended cleanly, which proved the agent answering and idle then.
    /// `false` when it cannot tell (the pool then health-checks).
    fn alive(&self) -> bool {
        false
    }

    /// Freezes every task (returns before the freezer settles).
    fn freeze(&mut self) -> Result<(), RunnerError>;

    /// Lets every task run again.
    fn thaw(&mut self) -> Result<(), RunnerError>;

    /// Counters that the pool reads while another thread holds the runner.
    fn probe(&self) -> Arc<dyn Probe>;

    /// The memory-limit counters now.
    fn memory_events(&self) -> MemoryEvents;

    /// Runs `req` through the agent.
    fn exec(
        &mut self,
        req: &ExecRequest,
        on_started: &mut dyn FnMut(&Started),
        on_output: &mut dyn FnMut(bool, &[u8]),
    ) -> Result<ExecResult, ClientError>;

    /// Empties the scratch directories for the next run of a lease that
    /// began at `lease_started` (see [`crate::Pool::release`]).
    fn reset_scratch(&mut self, lease_started: SystemTime) -> io::Result<()>;

    /// The host directory mounted at `/workspace`.
    fn workspace(&self) -> PathBuf;

    /// The path to connect to the agent on (for [`crate::Canceller`]).
    fn socket(&self) -> PathBuf;

    /// The container's cgroups.
    fn cgroups(&self) -> &Cgroups;

    /// Kills the container and removes everything it had. Idempotent; the
    /// first error is returned after every step was tried.
    fn destroy(&mut self) -> Result<(), RunnerError>;
}

/// What the pool reads of a runner without holding it: the reaper waits
/// for a freeze to settle, and the memory budget sums usage, while the
/// runner itself sits in the locked idle list or in a lease.
pub trait Probe: Send + Sync + fmt::Debug {
    /// Memory in use (page cache included), if known.
    fn memory_usage(&self) -> Option<u64>;

    /// Waits up to `timeout` for a freeze to settle; `false` if it did not
    /// (or the runner was thawed meanwhile).
    fn wait_frozen(&self, timeout: Duration) -> io::Result<bool>;
}

impl Probe for Cgroups {
    fn memory_usage(&self) -> Option<u64> {
        Cgroups::memory_usage(self)
    }

    fn wait_frozen(&self, timeout: Duration) -> io::Result<bool> {
        Cgroups::wait_frozen(self, timeout)
    }
}
