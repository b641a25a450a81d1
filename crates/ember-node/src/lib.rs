//! The node agent (`ember node`): registers with the control plane, keeps one work stream
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
//! ([`ember_pool::Pool::prewarm`]); the next heartbeat reports them.
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
//!
//! Where the node talks to the control plane, by file (all of it through
//! [`ember_api`]'s client and wire types):
//!
//! * `register`: `PUT /v1/nodes/{id}`: registration, heartbeats and the
//!   inventory they carry.
//! * `stream`: `GET /v1/nodes/{id}/work`: the work stream, its keepalive
//!   watch and reconnects, and what each message does.
//! * `report`: `POST /v1/nodes/{id}/events`: the node's one reporter,
//!   batching the reports of all runs.
//! * `logs`: `POST /v1/nodes/{id}/runs/{run}/logs`: a run's output.
//!
//! And what it does on its own:
//!
//! * `execute`: one assigned run, from image to exit, through the pool.
//! * `caches`: a run's declared directory caches, restored into its
//!   runner before the process starts and saved after it exits 0.
//! * `prewarm`: idle runners a `prewarm` order asks for.
//! * `prepull`: the images a `pull_plan` names, pulled one at a time at
//!   low priority (paused while a run pulls), and the GC that keeps them.
//! * [`images`]: resolve-or-pull, shared with `ember run`.
//! * [`snapshot_cache`]: snapshots pushed to and fetched from the cluster
//!   cache (compatibility checked before the download), shared with
//!   `ember snapshot push|pull`.
//! * `agent`: the agent's state and its start and shutdown.
//! * `metrics`: the node's own `/metrics` listener (off unless
//!   [`NodeAgentConfig::metrics_listen`] is set).
//! * `root`, `watchdog`: one agent per root, and the process that cleans
//!   up after an agent that died.

mod agent;
mod caches;
mod config;
mod execute;
pub mod images;
mod logs;
mod metrics;
mod prepull;
mod prewarm;
mod register;
mod relay;
mod report;
mod root;
pub mod snapshot;
pub mod snapshot_cache;
mod stream;
mod watchdog;

pub use agent::run_node;
pub use config::{NodeAgentConfig, NodeError, PrepullConfig, WatchdogCommand};
pub use prepull::{Prepuller, RunPull};
pub use watchdog::{WatchReport, watch_node};

/// Restored copies per snapshot key a node keeps prepared when not told
/// (see [`NodeAgentConfig::snapshot_spares`]).
pub const DEFAULT_SNAPSHOT_SPARES: usize = snapshot::deploy::DEFAULT_SPARES;
