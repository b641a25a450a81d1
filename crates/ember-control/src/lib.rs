//! The core of `ember control`: the data model of deployments, runs and
//! nodes, the durable state store behind one trait, and the scheduler.
//!
//! * [`model`]: plain serde types and the run state machine
//!   ([`model::check_transition`]), shared by the API and the stores.
//! * [`store`]: the [`StateStore`] trait — the only way state is read or
//!   written — with compare-and-set transitions and atomic, fair claiming.
//! * [`sqlite`]: the embedded implementation (one file, WAL).
//! * [`postgres`]: PostgreSQL, for several replicas on one database
//!   (row locks, `FOR UPDATE SKIP LOCKED` claiming).
//! * `transitions`: where a run's state changes — the submit, report,
//!   hand-off and loss logic both stores run inside their transactions.
//! * `claim`: fair claiming, defined once for both stores.
//! * [`schedule`]: where a node is chosen: [`schedule::place`], a pure
//!   function from a cluster view and a run to a node, preferring warm
//!   runners, then image locality with a spread factor, then low load.
//! * [`selector`]: label-selector matching, used by placement, pre-warm
//!   planning and the warm hand-off.
//! * [`prewarm`]: [`prewarm::plan`], which nodes keep idle runners of
//!   which deployment, a pure function like [`schedule::place`].
//! * [`popularity`]: decayed launch counts per image (and deployment).
//! * [`phase`]: the phases of a run's start (queue, placement, image,
//!   runner, process), defined once for every report and metric.
//! * [`pullplan`]: which images each node pre-pulls and keeps, and the
//!   order its GC may evict the rest.
//! * `conformance` (feature `testing`): the suite every store must pass.
//!
//! The path of a run: the API calls [`StateStore::submit_run`]; a dispatch
//! loop [claims](StateStore::claim_runs) queued runs, builds a
//! [`ClusterView`](schedule::ClusterView) from
//! [`list_nodes`](StateStore::list_nodes) and the active runs,
//! [places](schedule::place) each run and [assigns](StateStore::assign_run)
//! it, then sends it to the node; the node's reports go through
//! [`StateStore::report`].
//!
//! ```
//! use std::sync::Arc;
//! use ember_control::model::{NodeSpec, PinnedImage, RunSpec, RunState};
//! use ember_control::schedule::{place, ClusterView, RunRequirements};
//! use ember_control::sqlite::SqliteStore;
//! use ember_control::store::{ClaimRequest, StateStore, RunFilter, SystemClock};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SqliteStore::open_in_memory(Arc::new(SystemClock))?;
//! store.upsert_node(&NodeSpec { id: "n1".into(), slots: 4, labels: Default::default(), inventory: Default::default() })?;
//! let image = PinnedImage::new("busybox", format!("sha256:{}", "ab".repeat(32)))?;
//! store.submit_run(&RunSpec { image: Some(image), ..RunSpec::default() })?;
//!
//! let claimed = store.claim_runs(&ClaimRequest { owner: "me".into(), limit: 16, lease_ms: 30_000 })?;
//! let active = store.list_runs(&RunFilter {
//!     states: vec![RunState::Scheduled, RunState::Starting, RunState::Running],
//!     ..RunFilter::default()
//! })?;
//! // A real loop passes its clock's now and the heartbeat timeout; this
//! // example keeps every node.
//! let view = ClusterView::build(&store.list_nodes()?, &active, 0, u64::MAX);
//! for run in &claimed {
//!     if let Some(p) = place(&view, &RunRequirements::from(run)) {
//!         store.assign_run("me", run.id, &p.node)?;
//!     }
//! }
//! # Ok(())
//! # }
//! ```

pub mod cachedecl;
mod claim;
pub mod model;
pub mod phase;
pub mod popularity;
pub mod postgres;
pub mod prewarm;
pub mod pullplan;
pub mod schedule;
pub mod selector;
pub mod sqlite;
pub mod store;
mod transitions;

#[cfg(feature = "testing")]
pub mod conformance;

pub use store::{
    Appended, Clock, LogRetention, Pruned, RunReports, StateStore, StoreError, StoreEvent,
};
