//! Ember's warm pool: recycled runner containers, driven through the exec
//! agent inside each of them.
//!
//! Starting a container costs runc tens of milliseconds; exec'ing into a
//! running one with `runc exec` or `podman exec` costs about as much again.
//! A *runner* avoids both: a container whose PID 1 is `ember-agent`, kept
//! after a run and handed to the next run that is interchangeable with it.
//! Each run is one request over the agent's Unix socket, so dispatching to
//! a warm runner costs a fork and an exec inside the container.
//!
//! * [`RunnerKey`] says which runs are interchangeable: image manifest,
//!   runtime shape ([`RunnerShape`]: resources, mounts, user, network,
//!   read-only root) and a recycling key. A runner never serves a run of
//!   another key, and reuse is opt-in: a spec without a recycling key is
//!   single-use (a never-used runner, destroyed after the run).
//! * [`Pool::acquire`] lends a runner of the key ([`Lease`]): an idle one,
//!   thawed if it was frozen and health-checked through its agent (a dead
//!   one is destroyed and replaced without failing the run; one whose last
//!   exec ended cleanly a moment ago only has its agent's process checked,
//!   [`PoolConfig::health_proof`]), else a new one.
//! * [`Pool::prewarm`] creates an idle runner of a key before any run of
//!   it arrives, so the first run starts warm too.
//! * [`Lease::exec`] runs commands in it, streaming output.
//! * [`Pool::release`] returns it with emptied `/workspace`, `/tmp`,
//!   `/var/tmp`, `/run` and `/dev/shm` if it has a recycling key, the run
//!   succeeded and the runner looks healthy; single-use, failed,
//!   timed-out, memory-limited and `no_recycle` runs discard it. See
//!   [`Pool::release`] for exactly what is and is not reset.
//! * Single-use keys get a few never-used spares made in the background
//!   ([`PoolConfig::fresh_spares`]), so plain runs start without waiting
//!   for a container either.
//! * A reaper thread freezes runners idle for [`PoolConfig::pause_after`]
//!   (default 3 s) through the cgroup v1 freezer, destroys those idle for
//!   [`PoolConfig::idle_ttl`], and destroys least-recently-used idle runners
//!   when the pool is over its runner-count or memory budget.
//! * [`Pool::recover`] removes what a killed earlier process left behind.
//! * [`runtime`] is the seam under the policy: the pool asks a
//!   [`RunnerRuntime`](runtime::RunnerRuntime) to create runners and each
//!   [`RunnerContainer`](runtime::RunnerContainer) to health-check, freeze,
//!   thaw, reset and destroy itself. [`Pool::new`] uses the real one
//!   ([`RuncRuntime`](runtime::RuncRuntime), on `ember_runtime::Container`);
//!   [`Pool::with_runtime`] takes another, such as the recording
//!   [`fake::FakeRuntime`] the policy tests use without root.
//!
//! Everything is blocking and [`Pool`] is `Send + Sync`: an async node agent
//! shares it in an `Arc` and calls it from `spawn_blocking`. No lock is held
//! while a container is created or a command runs, so runs of different
//! keys never wait for each other.
//!
//! On disk (`root` is [`PoolConfig::root`]):
//!
//! ```text
//! <root>/runners/<id>/   one runner: lock, runner.json, config.json, rootfs
//!                        (overlay), run/agent.sock, workspace/, tmp/, var-tmp/,
//!                        runfs/, shm/ (tmpfs), agent.log
//! ```
//!
//! # Example
//!
//! ```no_run
//! use ember_pool::{Outcome, Pool, PoolConfig, RunnerImage, RunnerShape, RunnerSpec};
//! use ember_runtime::Runc;
//! use ember_store::Store;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Store::open("/var/lib/ember")?;
//! let record = store.resolve(&store.read_index()?, "busybox")?;
//! let image = RunnerImage::from_store(&store, &record)?;
//! // Runs that name the same recycling key share runners.
//! let spec = RunnerSpec::new(image, RunnerShape::default(), Some("ci-team-a".into()));
//!
//! let mut config = PoolConfig::new(
//!     "/var/lib/ember/pool",
//!     Runc::new("/var/lib/ember/runc"),
//!     "/usr/libexec/ember/ember-agent",
//! );
//! config.store = Some(store);
//! let pool = Pool::new(config)?;
//! pool.recover()?;
//!
//! let mut lease = pool.acquire(&spec)?;
//! let req = lease.command(["echo", "hello"]);
//! let result = lease.exec(&req, &mut |_stderr, bytes| print!("{}", String::from_utf8_lossy(bytes)))?;
//! pool.release(lease, Outcome::of(&result));
//! # Ok(())
//! # }
//! ```

// Tests may unwrap: a panic is the failure report there.
#![cfg_attr(test, allow(clippy::unwrap_used))]
#![warn(missing_docs)]

mod error;
pub mod fake;
pub mod key;
pub mod pool;
mod recover;
pub mod runner;
pub mod runtime;

pub use ember_agent_proto::{ExecRequest, ExecResult, Started};
pub use error::PoolError;
pub use key::{RunnerImage, RunnerKey, RunnerShape, RunnerSpec};
pub use pool::{
    Canceller, DiscardReason, IdleRunner, Lease, LeaseInfo, Outcome, Pool, PoolConfig,
    PoolRecoverReport, PoolStats, Released,
};
pub use runner::{AGENT_PATH, ExecDefaults, RunnerError, RunnerRecord, SOCKET_PATH, WORKSPACE};
