//! The state-store seam: everything the control plane persists goes through
//! [`StateStore`], so SQLite (embedded, the default) and PostgreSQL (several
//! replicas) are interchangeable and pass the same
//! conformance suite (`conformance`, feature `testing`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::model::{
    Deployment, DeploymentSpec, LogChunk, LogStream, Millis, ModelError, Node, NodeId, NodeReport,
    NodeSpec, Run, RunId, RunSpec, RunState, TransitionError,
};

/// The time source of a store. Injected so tests can move time by hand:
/// heartbeat expiry and claim leases are decided against it, never against
/// the wall clock directly.
pub trait Clock: Send + Sync {
    /// Now, in milliseconds since the Unix epoch.
    fn now(&self) -> Millis;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        // A clock before 1970 is a broken machine; 0 keeps the store usable.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to; shared by `Arc` between a test and
/// the stores under test.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: Millis) -> Arc<Self> {
        Arc::new(ManualClock(AtomicU64::new(start)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, ms: Millis) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

/// Errors of a [`StateStore`]. Everything but [`StoreError::Backend`] is the
/// client's or the caller's to handle; `Backend` is an internal fault whose
/// detail must not reach API clients.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The input is not valid.
    #[error(transparent)]
    Invalid(#[from] ModelError),
    /// A deployment with this name exists already.
    #[error("deployment {0:?} already exists")]
    DeploymentExists(String),
    /// No such deployment.
    #[error("deployment {0:?} not found")]
    DeploymentNotFound(String),
    /// No such run.
    #[error("{0} not found")]
    RunNotFound(RunId),
    /// No such node.
    #[error("node {0:?} not found")]
    NodeNotFound(NodeId),
    /// The same idempotency key was used with a different spec.
    #[error("idempotency key {key:?} was used for a different run ({existing})")]
    IdempotencyMismatch {
        /// The key.
        key: String,
        /// The run it belongs to.
        existing: RunId,
    },
    /// Compare-and-set failed: someone else (another replica, a node report,
    /// a user's cancel) moved the run first.
    #[error("{run} is {actual}, expected {expected}")]
    Conflict {
        /// The run.
        run: RunId,
        /// The state the caller expected.
        expected: RunState,
        /// The state it is in.
        actual: RunState,
    },
    /// The state machine refuses the change.
    #[error("{run}")]
    Transition {
        /// The run.
        run: RunId,
        /// The refused edge.
        source: TransitionError,
    },
    /// The run is not (or no longer) this node's: a late report from a node
    /// declared lost, or for a run cancelled or reassigned since.
    #[error("{run} is not assigned to node {node:?}")]
    NotAssigned {
        /// The run.
        run: RunId,
        /// The reporting node.
        node: NodeId,
    },
    /// The run is not claimed by this owner (its lease expired and another
    /// replica took it, or it was never claimed).
    #[error("{run} is not claimed by {owner:?}")]
    NotClaimed {
        /// The run.
        run: RunId,
        /// The would-be owner.
        owner: String,
    },
    /// The database failed.
    #[error("state store")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Which runs [`StateStore::list_runs`] returns, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFilter {
    /// Only runs in one of these states (empty: any).
    pub states: Vec<RunState>,
    /// Only runs of this deployment.
    pub deployment: Option<String>,
    /// Only runs whose current attempt is on this node.
    pub node: Option<NodeId>,
    /// At most this many (`None`: all).
    pub limit: Option<usize>,
    /// Only runs older than this one (ids below it): the cursor of the
    /// next page when paging newest first.
    pub before: Option<RunId>,
}

/// What [`StateStore::append_log`] did with the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// All of them are stored (or there were none).
    Stored,
    /// The run's log reached its limit with this append: what fitted is
    /// stored, then the truncation notice (a [`LogChunk::marker`] chunk).
    Truncated,
    /// The limit had been reached before: nothing was stored.
    Dropped,
}

/// Which logs [`StateStore::prune_logs`] removes. Only logs of runs in a
/// final state are pruned; a live run's log is never cut under a follower.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogRetention {
    /// Logs whose last append is older than this (`None`: no age limit).
    pub max_age_ms: Option<Millis>,
    /// Keep the logs of all runs together under this many bytes, pruning
    /// the least recently appended first (`None`: no budget).
    pub max_total_bytes: Option<u64>,
}

/// What [`StateStore::prune_logs`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Runs whose log was removed.
    pub runs: usize,
    /// Output bytes removed.
    pub bytes: u64,
}

/// The result of [`StateStore::submit_run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// The run.
    pub run: Run,
    /// `false` when the idempotency key returned an existing run.
    pub created: bool,
}

/// A claim on queued runs, held by one scheduler (one control-plane replica)
/// until it assigns them, releases them or the lease runs out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    /// Who claims: unique per replica (e.g. hostname + pid + start time).
    pub owner: String,
    /// At most this many runs.
    pub limit: usize,
    /// The claim lapses after this long, so a replica that dies holding
    /// claims does not strand them.
    pub lease_ms: Millis,
}

/// The control plane's durable state.
///
/// Lifecycle of a run through the store:
///
/// ```text
/// submit_run ─► queued ─ claim_runs (lease) ─► assign_run ─► scheduled
///                  ▲         └─ release_claims / lease expiry ─┘ (back to claimable)
///                  │
/// scheduled ─ report(Accepted) ─► starting ─ report(Started) ─► running ─ report(Exited) ─► succeeded/failed
/// any active ─ mark_lost_runs (stale heartbeat) ─► lost ─ transition_run(Lost→Queued) ─► queued (retry)
/// ```
///
/// Every method is atomic: on error nothing is written. Implementations must
/// be safe to use from several processes on one database at once (several
/// `ember control` replicas): state changes are compare-and-set, and claims
/// never hand one run to two claimers.
pub trait StateStore: Send + Sync {
    /// Stores a new deployment; [`StoreError::DeploymentExists`] if the name is taken.
    fn create_deployment(&self, spec: &DeploymentSpec) -> Result<Deployment, StoreError>;

    /// One deployment by name.
    fn get_deployment(&self, name: &str) -> Result<Option<Deployment>, StoreError>;

    /// All deployments, by name.
    fn list_deployments(&self) -> Result<Vec<Deployment>, StoreError>;

    /// Removes a deployment; [`StoreError::DeploymentNotFound`] if there is
    /// none of that name. Its runs stay (each carries what it runs); new
    /// submits naming it are refused. Nodes drop its checkpoints when they
    /// next heartbeat ([`crate::model::NodeAnswer::stale_snapshots`]).
    fn delete_deployment(&self, name: &str) -> Result<Deployment, StoreError>;

    /// Queues a run. With an idempotency key that was seen before, returns
    /// that run (`created == false`) if the spec is the same, and
    /// [`StoreError::IdempotencyMismatch`] if it is not. A batch of one
    /// [`StateStore::submit_runs`].
    fn submit_run(&self, spec: &RunSpec) -> Result<Submitted, StoreError> {
        only(self.submit_runs(std::slice::from_ref(spec))?)
    }

    /// Queues several runs in one transaction (one commit, one fsync): how
    /// the server absorbs a burst of concurrent submits. Each run gets the
    /// result [`StateStore::submit_run`] would give it; only a database
    /// failure fails them all (and then none is stored).
    fn submit_runs(
        &self,
        specs: &[RunSpec],
    ) -> Result<Vec<Result<Submitted, StoreError>>, StoreError>;

    /// One run.
    fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError>;

    /// Runs matching `filter`, newest first.
    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError>;

    /// Moves a run from `expected` to `to`: [`StoreError::Conflict`] if it is
    /// not in `expected` any more, [`StoreError::Transition`] if the edge is
    /// illegal. Returns the updated run. Used for cancels and retries
    /// (`Lost → Queued`); node progress goes through [`StateStore::report`]
    /// and scheduling through [`StateStore::assign_run`].
    fn transition_run(
        &self,
        id: RunId,
        expected: RunState,
        to: RunState,
    ) -> Result<Run, StoreError>;

    /// Claims up to `limit` queued, unclaimed (or lease-expired) runs, fairly:
    /// round-robin between queue groups (deployments; ad-hoc runs by image),
    /// least recently served group first, FIFO within a group. So a burst of
    /// one deployment delays another's first run by at most one round. The
    /// definition, shared by both stores, is in the crate's `claim` module.
    ///
    /// Atomic across processes: two claimers never get the same run. SQLite
    /// does it in one `BEGIN IMMEDIATE` transaction (one writer at a time);
    /// PostgreSQL takes each group's oldest runs with `FOR UPDATE SKIP
    /// LOCKED`, so replicas claim disjoint runs without waiting on each
    /// other. The claim is also a lease (`claimed_by`, `claim_expires` columns)
    /// rather than a row lock held open, so a replica may take its time
    /// placing runs without a transaction left open.
    fn claim_runs(&self, req: &ClaimRequest) -> Result<Vec<Run>, StoreError>;

    /// Gives up claims (runs the scheduler could not place now) so they can be
    /// claimed again at once. Runs not claimed by `owner` are skipped.
    fn release_claims(&self, owner: &str, ids: &[RunId]) -> Result<(), StoreError>;

    /// `queued → scheduled` on `node`, for a run `owner` has claimed; counts
    /// an attempt. [`StoreError::NotClaimed`] if the claim was lost.
    fn assign_run(&self, owner: &str, id: RunId, node: &str) -> Result<Run, StoreError>;

    /// Warm hand-off: a runner with `warm_key` just became idle on `node`;
    /// atomically takes the oldest queued, unclaimed run with that key whose
    /// node selector the node satisfies and schedules it there
    /// (`queued → scheduled`, an attempt counted), so it reuses the runner
    /// without a round through the claim/placement loop. `None` if there is
    /// no such run. Fairness: only runs that key can serve compete, and
    /// their group is recorded as served like a normal claim. A batch of
    /// one [`StateStore::claim_for_runners`].
    fn claim_for_runner(&self, node: &str, warm_key: &str) -> Result<Option<Run>, StoreError> {
        Ok(self
            .claim_for_runners(node, &[warm_key.to_owned()])?
            .pop()
            .flatten())
    }

    /// [`StateStore::claim_for_runner`] for several runners freed on `node`
    /// at once (one warm key each; a key may repeat), in one transaction:
    /// the runs handed off, one entry per key in order, `None` where
    /// nothing waits for that runner.
    fn claim_for_runners(
        &self,
        node: &str,
        warm_keys: &[String],
    ) -> Result<Vec<Option<Run>>, StoreError>;

    /// A node's progress on a run. [`StoreError::NotAssigned`] if the run is
    /// not active on that node, which is how late reports from a node that
    /// was declared lost are rejected. A batch of one
    /// [`StateStore::report_batch`].
    fn report(&self, node: &str, id: RunId, report: &NodeReport) -> Result<Run, StoreError> {
        only(self.report_batch(node, &[RunReports::new(id, vec![report.clone()])])?)
    }

    /// Reports of one node on several runs, in one transaction (one commit):
    /// how a node's reports during a burst cost one write instead of one
    /// per report. Each run's reports are applied in order, as
    /// [`StateStore::report`] would, and a refused one ends that run's list
    /// (what came before it stands); the runs are independent of each other.
    /// The answer has one entry per entry of `batch`, in order. Only a
    /// database failure fails the call (and then nothing is written).
    fn report_batch(
        &self,
        node: &str,
        batch: &[RunReports],
    ) -> Result<Vec<Result<Run, StoreError>>, StoreError>;

    /// Registers a node or records its heartbeat and inventory; the
    /// heartbeat time is the store's clock.
    fn upsert_node(&self, spec: &NodeSpec) -> Result<Node, StoreError>;

    /// All nodes, by id.
    fn list_nodes(&self) -> Result<Vec<Node>, StoreError>;

    /// Moves every active run on a node whose last heartbeat is older than
    /// `stale_after_ms` to `lost`, and returns them (for retry).
    fn mark_lost_runs(&self, stale_after_ms: Millis) -> Result<Vec<Run>, StoreError>;

    /// Appends output of run `id` from `node`: [`StoreError::NotAssigned`]
    /// if the run is not active on that node (a late post from a node
    /// declared lost). Appends of one run are ordered: a reader that saw a
    /// chunk never later finds an earlier one appear. Empty `data` is only
    /// checked, not stored.
    ///
    /// A run's log holds at most `max_bytes` of output: the append that
    /// reaches the limit keeps what fits and is followed by one truncation
    /// notice ([`LogChunk::marker`]); later appends are dropped
    /// ([`Appended`] says which happened).
    fn append_log(
        &self,
        node: &str,
        id: RunId,
        stream: LogStream,
        data: &[u8],
        max_bytes: u64,
    ) -> Result<Appended, StoreError>;

    /// Removes the logs `retention` selects (runs in a final state only),
    /// leaving one notice ([`LogChunk::marker`]) in each pruned log, so a
    /// reader learns why it is empty.
    fn prune_logs(&self, retention: &LogRetention) -> Result<Pruned, StoreError>;

    /// Up to `limit` chunks of run `id`'s output after position `after`
    /// (0: from the start), oldest first, and no more chunks once they
    /// hold `max_bytes` (the chunk that crosses it is the last; at least
    /// one is returned when there is one), so a reader's page is bounded
    /// in bytes too. [`StoreError::RunNotFound`] if there is no such run.
    fn read_log(
        &self,
        id: RunId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<LogChunk>, StoreError>;

    /// Stores a credential of `node`: the SHA-256 (lower-case hex) of a
    /// bearer token that opens that node's endpoints and no other node's.
    /// The token itself is never stored. Synced: an issued credential
    /// survives a crash. An empty node id or hash is refused.
    fn add_node_credential(&self, node: &str, token_sha256: &str) -> Result<(), StoreError>;

    /// Revokes every credential of `node`; returns how many there were.
    /// Synced.
    fn revoke_node_credentials(&self, node: &str) -> Result<usize, StoreError>;

    /// Every credential: (token SHA-256 hex, node id), by hash. What the
    /// server checks node requests against (it keeps a copy, reloaded
    /// every second, so revocations through any replica take effect
    /// everywhere within that).
    fn node_credentials(&self) -> Result<Vec<(String, NodeId)>, StoreError>;

    /// Calls `wake` whenever another process sharing this database may have
    /// made runs claimable (a submit, a retry, released claims) or appended
    /// a run's output, so a replica's dispatcher and log followers hear of
    /// what happened through another replica without polling. Stores that
    /// only one process uses need not do anything (the default); `wake`
    /// may also be called spuriously.
    fn watch(&self, wake: Box<dyn Fn(StoreEvent) + Send + Sync>) -> Result<(), StoreError> {
        let _ = wake;
        Ok(())
    }
}

/// One run's reports in a [`StateStore::report_batch`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunReports {
    /// The run.
    pub run: RunId,
    /// Its reports, oldest first.
    pub reports: Vec<NodeReport>,
    /// How long before the request each report happened, in ms, as the
    /// node measured it (missing entries: 0). A node that holds a report
    /// back to send it with the next one, or that queued it behind a
    /// request in flight, still gets the report's time recorded, not the
    /// time it arrived. The store never dates a report before the run's
    /// previous one nor after now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ages_ms: Vec<Millis>,
    /// The attempt the reports are about (the run's `attempts` in the
    /// assignment the node executes). Reports of another attempt than the
    /// run's current one are refused ([`StoreError::NotAssigned`]): a node
    /// cut off while its attempt was declared lost and retried must not
    /// have its late result recorded for the retry, even when the retry
    /// came back to the same node. `None`: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

impl RunReports {
    /// `reports` of `run`, all as of now.
    pub fn new(run: RunId, reports: Vec<NodeReport>) -> Self {
        RunReports {
            run,
            reports,
            ages_ms: Vec::new(),
            attempt: None,
        }
    }
}

/// The one answer of a batch of one.
fn only<T>(mut answers: Vec<Result<T, StoreError>>) -> Result<T, StoreError> {
    answers
        .pop()
        .unwrap_or_else(|| Err(StoreError::Backend("a batch of one got no answer".into())))
}

/// What [`StateStore::watch`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreEvent {
    /// Runs may be claimable.
    Queue,
    /// Run output was appended.
    Log(RunId),
}

#[cfg(test)]
mod error_tests {
    use super::*;

    #[test]
    fn store_errors_say_their_source_once_in_the_chain() {
        let transition = StoreError::Transition {
            run: RunId(7),
            source: TransitionError::Illegal {
                from: RunState::Succeeded,
                to: RunState::Running,
            },
        };
        let backend = StoreError::Backend("disk I/O error".into());
        for (e, want) in [
            (
                &transition,
                "run-7: illegal run transition succeeded -> running",
            ),
            (&backend, "state store: disk I/O error"),
        ] {
            assert_eq!(ember_error::repeated_source(e), None, "{want}");
            assert_eq!(ember_error::chain(e).to_string(), want);
        }
    }
}
