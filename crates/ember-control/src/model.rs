//! The control plane's data: deployments, runs, nodes, and the run state
//! machine.
//!
//! Every type here is plain data with serde derives, because the same
//! structs are what the HTTP/JSON API will speak and what the stores
//! persist. Times are [`Millis`] (milliseconds since the Unix epoch) taken
//! from an injected [`Clock`](crate::Clock), never read here, so tests are
//! deterministic.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::cachedecl::CacheDecl;
use crate::cachedecl::{CacheDeclError, validate_caches};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// A node's identity, chosen by the node (`ember node --id`, or its hostname).
pub type NodeId = String;

/// A run's identity: assigned by the store, increasing in submission order,
/// which is what makes FIFO within one deployment cheap to query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(pub i64);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "run-{}", self.0)
    }
}

/// Why some input to the model is not acceptable; a client error (4xx).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The digest is not `sha256:` followed by 64 lowercase hex digits.
    #[error("image {reference:?} is not pinned to a sha256 digest: {digest:?}")]
    UnpinnedImage {
        /// The reference as the user wrote it.
        reference: String,
        /// The digest that was given.
        digest: String,
    },
    /// A run names both a deployment and an image, or neither.
    #[error("a run needs exactly one of a deployment or an image")]
    RunTarget,
    /// A node credential's hash is not a SHA-256 in lower-case hex.
    #[error("a node credential's hash must be 64 lower-case hex digits")]
    CredentialHash,
    /// A name that must be non-empty (deployment, node, key) is empty.
    #[error("{what} must not be empty")]
    Empty {
        /// What was empty.
        what: &'static str,
    },
    /// A declared directory cache is not acceptable.
    #[error(transparent)]
    Cache(#[from] CacheDeclError),
}

/// An image reference pinned to a manifest digest at deploy/submit time, so
/// every node runs exactly the same bytes even if the tag moves later.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PinnedImage {
    /// The reference as the user wrote it (kept for display and pulls through mirrors).
    pub reference: String,
    /// The manifest digest, `sha256:<64 hex>`.
    pub digest: String,
}

impl PinnedImage {
    /// Checks that `digest` really is a sha256 digest.
    pub fn new(
        reference: impl Into<String>,
        digest: impl Into<String>,
    ) -> Result<Self, ModelError> {
        let image = PinnedImage {
            reference: reference.into(),
            digest: digest.into(),
        };
        image.validate()?;
        Ok(image)
    }

    /// Checks the digest's form; called again on every submit because serde
    /// deserialisation bypasses [`PinnedImage::new`].
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.reference.is_empty() {
            return Err(ModelError::Empty {
                what: "image reference",
            });
        }
        let ok = self.digest.strip_prefix("sha256:").is_some_and(|hex| {
            hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if ok {
            Ok(())
        } else {
            Err(ModelError::UnpinnedImage {
                reference: self.reference.clone(),
                digest: self.digest.clone(),
            })
        }
    }
}

/// What a run may use on its node. Zero means "no limit".
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in thousandths of a core.
    #[serde(default)]
    pub cpu_millis: u32,
    /// Memory limit in bytes.
    #[serde(default)]
    pub memory_bytes: u64,
}

/// What a user deploys: a named, reusable run template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentSpec {
    /// Unique name; runs refer to it.
    pub name: String,
    /// The image, pinned at deploy time.
    pub image: PinnedImage,
    /// Command and arguments (empty: the image's entrypoint/cmd).
    #[serde(default)]
    pub command: Vec<String>,
    /// Environment added to the image's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Resource limits.
    #[serde(default)]
    pub resources: Resources,
    /// The recycling key its runs share runners under (with runs of other
    /// deployments and plain runs that name the same key, and the same
    /// image and shape); `None`: the runs of this deployment share runners
    /// only with each other. See [`recycle_scope`].
    #[serde(default)]
    pub recycle_key: Option<String>,
    /// Run its runners with a read-only root filesystem (`/workspace`,
    /// `/tmp`, `/var/tmp`, `/run` and `/dev/shm` stay writable).
    #[serde(default)]
    pub readonly_rootfs: bool,
    /// How many idle runners nodes should keep warm for this deployment.
    #[serde(default)]
    pub warm_runners: u32,
    /// Node labels a node must carry to run this deployment.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Directory caches its runs restore before their process starts and
    /// save after it exits 0 ([`CacheDecl`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caches: Vec<CacheDecl>,
    /// Snapshot starts: `command` is a start-up that signals readiness
    /// (docs/agent-protocol.md); a node checkpoints it once and starts
    /// later runs from a copy, handing each run's command and env to the
    /// start-up through `Resume` ([`RunSnapshot`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snapshot: bool,
}

impl DeploymentSpec {
    /// The warm key of this deployment's runs ([`Run::warm_key`]; a run's
    /// own overrides of command and env don't change it).
    pub fn warm_key(&self) -> String {
        warm_key(
            &self.image,
            &self.resources,
            self.readonly_rootfs,
            self.recycle_scope().as_deref(),
        )
    }

    /// The scope its runs recycle runners in ([`recycle_scope`]).
    pub fn recycle_scope(&self) -> Option<String> {
        recycle_scope(Some(&self.name), self.recycle_key.as_deref())
    }

    /// Checks the name and the image pin.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.name.is_empty() {
            return Err(ModelError::Empty {
                what: "deployment name",
            });
        }
        validate_caches(&self.caches)?;
        self.image.validate()
    }
}

/// A stored deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// What the user deployed.
    #[serde(flatten)]
    pub spec: DeploymentSpec,
    /// When it was created.
    pub created_at: Millis,
}

/// What a user submits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Run this deployment (its image, command, env, resources, key)...
    #[serde(default)]
    pub deployment: Option<String>,
    /// ...or this image.
    #[serde(default)]
    pub image: Option<PinnedImage>,
    /// Overrides the deployment's command when non-empty.
    #[serde(default)]
    pub command: Vec<String>,
    /// Added to (and overriding) the deployment's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Kill the process after this long (milliseconds).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// A second submit with the same key returns the first run instead of
    /// creating another, so clients can retry submits safely.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// How many times the run may be scheduled in total; a run lost with
    /// attempts left goes back to the queue. `0` is read as 1.
    #[serde(default)]
    pub max_attempts: u32,
    /// Node labels required (merged over the deployment's selector).
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Share runners with the other runs that name this key (overrides a
    /// deployment's). A run of an image without one (and without a
    /// deployment) gets a runner no run has used, destroyed after it.
    #[serde(default)]
    pub recycle_key: Option<String>,
    /// Run with a read-only root filesystem (or'ed with the
    /// deployment's).
    #[serde(default)]
    pub readonly_rootfs: bool,
    /// Directory caches, merged over the deployment's: one with the path
    /// of a deployment's cache replaces it
    /// ([`merge_caches`](crate::cachedecl::merge_caches)).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caches: Vec<CacheDecl>,
}

/// The scope in which runs share (recycle) runners: runs share a runner
/// only when they have the same scope (and the same image and runtime
/// shape). A recycling key, when given, is the scope; else a deployment's
/// runs share among themselves; a plain run of an image with neither has
/// no scope, and its runner serves it alone (`ember-pool`'s single-use
/// runners). Reuse is something a run opts into by naming a deployment or
/// a key, so runs that never asked never see each other's files.
pub fn recycle_scope(deployment: Option<&str>, recycle_key: Option<&str>) -> Option<String> {
    // Tagged, so a key and a deployment of the same name stay apart.
    match (recycle_key, deployment) {
        (Some(k), _) => Some(format!("key:{k}")),
        (None, Some(d)) => Some(format!("deployment:{d}")),
        (None, None) => None,
    }
}

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Waiting for a node.
    Queued,
    /// Assigned to a node that has not acknowledged it yet.
    Scheduled,
    /// The node is preparing it: image, runner.
    Starting,
    /// The process runs.
    Running,
    /// Exited with status 0.
    Succeeded,
    /// Exited non-zero, timed out, or could not start.
    Failed,
    /// Cancelled by a user.
    Cancelled,
    /// Its node stopped heartbeating; may go back to `Queued` while attempts remain.
    Lost,
}

impl RunState {
    /// Every state, for iteration in tests and SQL.
    pub const ALL: [RunState; 8] = [
        RunState::Queued,
        RunState::Scheduled,
        RunState::Starting,
        RunState::Running,
        RunState::Succeeded,
        RunState::Failed,
        RunState::Cancelled,
        RunState::Lost,
    ];

    /// The name used in storage and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Scheduled => "scheduled",
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::Lost => "lost",
        }
    }

    /// Parses [`RunState::as_str`]'s output.
    pub fn parse(s: &str) -> Option<RunState> {
        RunState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The run occupies a slot on its node.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            RunState::Scheduled | RunState::Starting | RunState::Running
        )
    }

    /// Nothing more will happen to the run (except `Lost → Queued`, a retry).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled | RunState::Lost
        )
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a state change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The state machine has no such edge.
    #[error("illegal run transition {from} -> {to}")]
    Illegal {
        /// Current state.
        from: RunState,
        /// Requested state.
        to: RunState,
    },
    /// `lost → queued` with every attempt used.
    #[error("no attempts left ({attempts} of {max_attempts} used)")]
    NoAttemptsLeft {
        /// Attempts used.
        attempts: u32,
        /// Attempts allowed.
        max_attempts: u32,
    },
}

/// The run state machine, as one function so that every store and the API
/// enforce the same edges:
///
/// ```text
/// queued → scheduled → starting → running → succeeded | failed | cancelled | lost
///   │          │  └──────────┴─→ failed | cancelled | lost
///   └─→ cancelled
/// lost → queued   (a retry, only while attempts < max_attempts)
/// ```
///
/// `scheduled → failed` exists because a node may refuse a run before it
/// acknowledges it (bad image, no space); `starting → failed` is a failed
/// pull or runner start.
pub fn check_transition(
    from: RunState,
    to: RunState,
    attempts: u32,
    max_attempts: u32,
) -> Result<(), TransitionError> {
    use RunState::*;
    let legal = match (from, to) {
        (Queued, Scheduled | Cancelled) => true,
        (Scheduled, Starting | Failed | Cancelled | Lost) => true,
        (Starting, Running | Failed | Cancelled | Lost) => true,
        (Running, Succeeded | Failed | Cancelled | Lost) => true,
        (Lost, Queued) => {
            if attempts >= max_attempts {
                return Err(TransitionError::NoAttemptsLeft {
                    attempts,
                    max_attempts,
                });
            }
            true
        }
        _ => false,
    };
    if legal {
        Ok(())
    } else {
        Err(TransitionError::Illegal { from, to })
    }
}

/// When each phase of the current attempt's start happened; the difference
/// between neighbours is what `ember runs --stats` will report (queue,
/// placement, image, runner, process).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartTimes {
    /// Entered the queue (submit, or re-queue after a loss).
    pub queued: Option<Millis>,
    /// Picked up by a scheduler (the last claim, if a claim was released
    /// for lack of capacity and taken again): queue ends, placement begins.
    /// A warm hand-off claims and schedules at once.
    pub claimed: Option<Millis>,
    /// Assigned to a node.
    pub scheduled: Option<Millis>,
    /// The node had the image's layers.
    pub image_ready: Option<Millis>,
    /// The node had a runner (warm or new) for it.
    pub runner_ready: Option<Millis>,
    /// The node had restored the run's declared directory caches into the
    /// runner (absent for a run that declares none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caches_restored: Option<Millis>,
    /// The process started.
    pub process_started: Option<Millis>,
    /// It reached a final state.
    pub finished: Option<Millis>,
    /// A snapshot run's copy was restored from the node's checkpoint (the
    /// restore phase ends; absent when it started fresh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_restored: Option<Millis>,
    /// Why a snapshot run started fresh instead of restoring (no
    /// checkpoint on the node yet, a failed restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_note: Option<String>,
}

/// A run as stored: the resolved spec (deployment fields copied in at
/// submit, so later deployment edits don't change queued runs) and its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// Identity.
    pub id: RunId,
    /// The deployment it came from, if any.
    pub deployment: Option<String>,
    /// The image to run.
    pub image: PinnedImage,
    /// Command and arguments.
    pub command: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Resource limits.
    pub resources: Resources,
    /// Recycling key (the run's own, else the deployment's).
    pub recycle_key: Option<String>,
    /// Read-only root filesystem.
    #[serde(default)]
    pub readonly_rootfs: bool,
    /// Node labels required.
    pub node_selector: BTreeMap<String, String>,
    /// Timeout in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Client's idempotency key.
    pub idempotency_key: Option<String>,
    /// Times scheduled so far.
    pub attempts: u32,
    /// Times it may be scheduled.
    pub max_attempts: u32,
    /// Current state.
    pub state: RunState,
    /// The node of the current (or last) attempt.
    pub node: Option<NodeId>,
    /// Process exit code, once known.
    pub exit_code: Option<i32>,
    /// Why it failed, if it did without an exit code.
    pub error: Option<String>,
    /// When it was first submitted.
    pub submitted_at: Millis,
    /// The current attempt's start-time breakdown.
    pub times: StartTimes,
    /// Directory caches to restore and save ([`CacheDecl`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caches: Vec<CacheDecl>,
    /// What the node said about the current attempt's caches that is not
    /// a failure: a cache skipped (no cache URL on the node), missed or
    /// restored from a fallback.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_notes: Vec<String>,
    /// A run of a snapshot deployment: what `Resume` hands its start-up
    /// (`command` and `env` above are the deployment's start-up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<RunSnapshot>,
}

/// What a run of a snapshot deployment hands the restored (or freshly
/// started) start-up through `Resume`: the run's own command and
/// environment, as submitted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSnapshot {
    /// The run's arguments (`argv` of the resume message).
    #[serde(default)]
    pub argv: Vec<String>,
    /// The run's environment (`env` of the resume message, as `K=V`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// How every [`Run::snapshot_key`] begins.
pub const SNAPSHOT_KEY_PREFIX: &str = "d.";

/// The deployment part of a [`Run::snapshot_key`] (`d.<name>.` ), so a
/// node can find the other checkpoints of the same deployment.
pub fn snapshot_key_deployment(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(SNAPSHOT_KEY_PREFIX)?;
    let (name, hash) = rest.rsplit_once('.')?;
    (hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some(name)
}

/// Longest deployment-name part of a [`Run::snapshot_key`].
const SNAPSHOT_KEY_NAME_MAX: usize = 48;

/// The deployment-name part of the [`Run::snapshot_key`]s of deployment
/// `deployment`: its name with characters a file name cannot hold
/// replaced, cut to 48 characters (two long or odd names can share it).
pub fn snapshot_key_name(deployment: &str) -> String {
    deployment
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(SNAPSHOT_KEY_NAME_MAX)
        .collect()
}

/// The checkpoints in `held` (a node's [`Inventory::snapshots`]) that no
/// live snapshot deployment in `deployments` can restore again: their
/// deployment was deleted or no longer has `snapshot` set. A key whose
/// name part is shared with a live snapshot deployment is kept (a
/// checkpoint of an earlier image or start-up of a live deployment is the
/// node's to drop, when a run with the new key arrives).
pub fn stale_snapshots(held: &BTreeSet<String>, deployments: &[Deployment]) -> BTreeSet<String> {
    let live: BTreeSet<String> = deployments
        .iter()
        .filter(|d| d.spec.snapshot)
        .map(|d| snapshot_key_name(&d.spec.name))
        .collect();
    held.iter()
        .filter(|k| snapshot_key_deployment(k).is_some_and(|name| !live.contains(name)))
        .cloned()
        .collect()
}

/// 64-bit FNV-1a: a hash that stays the same across builds and hosts (a
/// snapshot key is stored on nodes and compared by the control plane).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The warm key of runs of `image` with `resources`, `readonly_rootfs`
/// and recycling `scope`; see [`Run::warm_key`].
fn warm_key(
    image: &PinnedImage,
    resources: &Resources,
    readonly_rootfs: bool,
    scope: Option<&str>,
) -> String {
    let mut key = format!(
        "{}|cpu={}|mem={}",
        image.digest, resources.cpu_millis, resources.memory_bytes
    );
    if readonly_rootfs {
        key.push_str("|ro");
    }
    match scope {
        Some(s) => {
            key.push_str("|scope=");
            key.push_str(s);
        }
        // Never the key of an idle runner: nodes keep none for such runs.
        None => key.push_str("|single-use"),
    }
    key
}

impl Run {
    /// The fairness group the run queues in: its deployment, or for ad-hoc
    /// runs the image digest, so a burst of ad-hoc runs of one image is one
    /// group like a deployment's burst is.
    pub fn queue_key(&self) -> String {
        match &self.deployment {
            Some(d) => format!("d:{d}"),
            None => format!("i:{}", self.image.digest),
        }
    }

    /// The key of the warm runners that can serve this run. Two runs with the
    /// same key are interchangeable for a runner: same image, command-independent
    /// runtime shape and recycling scope. (The node's pool hashes more of the
    /// shape; this is the control plane's coarser view of it.) A run without
    /// a scope ([`Run::recyclable`] false) has a key no idle runner carries.
    pub fn warm_key(&self) -> String {
        warm_key(
            &self.image,
            &self.resources,
            self.readonly_rootfs,
            self.recycle_scope().as_deref(),
        )
    }

    /// The scope its runner is recycled in ([`recycle_scope`]); `None`
    /// for a plain run, whose runner serves it alone.
    pub fn recycle_scope(&self) -> Option<String> {
        recycle_scope(self.deployment.as_deref(), self.recycle_key.as_deref())
    }

    /// Whether its runner may serve other runs (it has a scope).
    pub fn recyclable(&self) -> bool {
        self.recycle_scope().is_some()
    }

    /// The key of the checkpoint a run of a snapshot deployment restores
    /// from (`None` for other runs): its deployment, image and start-up
    /// (command, env, runtime shape), so a new image or start-up command
    /// makes a new checkpoint. It is also the checkpoint's snapshot name
    /// in the node's store, and what nodes report in
    /// [`Inventory::snapshots`]: `d.<deployment>.<16 hex digits>`
    /// (letters, digits, `.`, `_`, `-`).
    pub fn snapshot_key(&self) -> Option<String> {
        self.snapshot.as_ref()?;
        let deployment = self.deployment.as_deref().unwrap_or("");
        let canon = serde_json::json!([
            deployment,
            self.image.digest,
            self.command,
            self.env,
            self.resources.cpu_millis,
            self.resources.memory_bytes,
            self.readonly_rootfs,
        ]);
        Some(format!(
            "{}{}.{:016x}",
            SNAPSHOT_KEY_PREFIX,
            snapshot_key_name(deployment),
            fnv1a(canon.to_string().as_bytes())
        ))
    }

    /// Moves the run to `to` if the state machine allows it, stamping the
    /// phase time and resetting attempt-specific fields on a retry.
    pub fn apply(&mut self, to: RunState, now: Millis) -> Result<(), TransitionError> {
        check_transition(self.state, to, self.attempts, self.max_attempts)?;
        match to {
            RunState::Queued => {
                // A retry starts a fresh attempt: its breakdown must not mix
                // with the lost attempt's.
                self.node = None;
                self.exit_code = None;
                self.error = None;
                self.cache_notes.clear();
                self.times = StartTimes {
                    queued: Some(now),
                    ..StartTimes::default()
                };
            }
            RunState::Scheduled => {
                self.attempts += 1;
                // A warm hand-off never went through a claim: placement
                // took no time.
                self.times.claimed.get_or_insert(now);
                self.times.scheduled = Some(now);
            }
            RunState::Starting => {}
            RunState::Running => {
                self.times.process_started = Some(now);
            }
            RunState::Succeeded | RunState::Failed | RunState::Cancelled | RunState::Lost => {
                self.times.finished = Some(now);
            }
        }
        self.state = to;
        Ok(())
    }
}

/// What a node has that matters for placement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Image manifest digest → bytes of its layers present on the node
    /// (partially present images count what is there).
    #[serde(default)]
    pub images: BTreeMap<String, u64>,
    /// Warm key ([`Run::warm_key`]) → idle runners with that key.
    #[serde(default)]
    pub idle_runners: BTreeMap<String, u32>,
    /// Free bytes on the store's disk.
    #[serde(default)]
    pub free_disk_bytes: u64,
    /// Image manifest digest → its total layer bytes, for images being
    /// pulled now (by a run or a pre-pull): the scheduler counts them as
    /// arriving.
    #[serde(default)]
    pub pulling: BTreeMap<String, u64>,
    /// The most bytes of images the node's store may hold (its GC's
    /// high watermark), when it has one: the pull planner's budget for
    /// the node. Absent: what it holds plus its free disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_budget_bytes: Option<u64>,
    /// Image manifest digest → its layers, for the images in `images`:
    /// what the pull planner needs to count a layer shared by several
    /// images once. Absent (an older node): each image counts as one layer
    /// of its bytes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub image_layers: BTreeMap<String, Vec<ImageLayer>>,
    /// Checkpoints of snapshot deployments the node holds
    /// ([`Run::snapshot_key`]): the scheduler prefers a node that holds a
    /// run's.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub snapshots: BTreeSet<String>,
}

/// One layer of an image a node holds ([`Inventory::image_layers`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageLayer {
    /// The layer's `sha256:` diff_id (what layers are shared by).
    pub diff_id: String,
    /// Its bytes on the node's disk.
    pub bytes: u64,
}

/// What a node says about itself when it registers or heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// Identity.
    pub id: NodeId,
    /// How many runs it executes at once.
    pub slots: u32,
    /// Labels for node selectors.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its images, runners and disk.
    #[serde(default)]
    pub inventory: Inventory,
}

/// A stored node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// What it last said.
    #[serde(flatten)]
    pub spec: NodeSpec,
    /// When it last said it (control-plane clock, not the node's).
    pub last_heartbeat: Millis,
}

/// The answer to a node's registration or heartbeat (`PUT
/// /v1/nodes/{id}`): the stored node, and what the node should drop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAnswer {
    /// The node as stored.
    #[serde(flatten)]
    pub node: Node,
    /// Checkpoints the node reported ([`Inventory::snapshots`]) whose
    /// deployment is gone or no longer takes snapshots
    /// ([`stale_snapshots`]): the node removes them from its store. Sent
    /// on every heartbeat while the node still reports them, so a node
    /// that was away when the deployment was deleted converges too.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub stale_snapshots: BTreeSet<String>,
}

/// What a node reports about a run assigned to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum NodeReport {
    /// The node took the run (`scheduled → starting`).
    Accepted,
    /// The image is on the node (stamps `image_ready`).
    ImageReady,
    /// A runner is ready (stamps `runner_ready`).
    RunnerReady,
    /// The run's declared directory caches are restored into the runner,
    /// or skipped (stamps `caches_restored`; sent only by runs that
    /// declare caches, between `RunnerReady` and `Started`).
    CachesRestored {
        /// One line per cache worth telling the user (restored from
        /// which key, missed, skipped and why).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        notes: Vec<String>,
    },
    /// A snapshot run restored its copy from the node's checkpoint
    /// (`restored`, stamps `snapshot_restored`) or starts fresh instead,
    /// with the reason in `note` (kept in `snapshot_note`).
    Snapshot {
        /// Whether the copy was restored.
        restored: bool,
        /// Why not, when it was not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    /// The process started (`starting → running`).
    Started,
    /// The process exited (`running → succeeded | failed`).
    Exited {
        /// Exit status.
        code: i32,
        /// The runner that ran it is idle again on the node (recycled), so
        /// a queued run with the same warm key can go to it at once.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        runner_idle: bool,
    },
    /// The run could not start or was killed (`→ failed`).
    Failed {
        /// Why.
        error: String,
    },
    /// The node no longer has the run: its agent restarted (and its
    /// runners with it) while the run was active. The run is lost through
    /// no fault of its own, as if the node had stopped heartbeating
    /// (`→ lost`), and goes back to the queue at once, in the same
    /// transaction, while attempts remain (`lost → queued`).
    Lost {
        /// Why.
        error: String,
    },
}

/// Which output stream a log record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl LogStream {
    /// The name used in query strings.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }

    /// The stream named `name` ([`LogStream::as_str`]).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "stdout" => Some(LogStream::Stdout),
            "stderr" => Some(LogStream::Stderr),
            _ => None,
        }
    }
}

/// A piece of a run's output as stored: what one append from the node
/// carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// Position in the run's log: increasing, not necessarily contiguous;
    /// pass the last one seen to [`StateStore::read_log`](crate::StateStore::read_log)
    /// to continue after it.
    pub seq: u64,
    /// Which stream.
    pub stream: LogStream,
    /// The bytes exactly as the process wrote them, or (with `marker`)
    /// Ember's own notice.
    pub data: Vec<u8>,
    /// `true` for a notice the control plane wrote itself, not the process:
    /// that the run's output reached the per-run limit and the rest was
    /// dropped, or that its log was pruned. Its `stream` is stderr.
    pub marker: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunState::*;

    /// The complete edge list; every pair not in it must be refused.
    const EDGES: &[(RunState, RunState)] = &[
        (Queued, Scheduled),
        (Queued, Cancelled),
        (Scheduled, Starting),
        (Scheduled, Failed),
        (Scheduled, Cancelled),
        (Scheduled, Lost),
        (Starting, Running),
        (Starting, Failed),
        (Starting, Cancelled),
        (Starting, Lost),
        (Running, Succeeded),
        (Running, Failed),
        (Running, Cancelled),
        (Running, Lost),
        (Lost, Queued),
    ];

    #[test]
    fn exactly_the_documented_edges_are_legal() {
        for from in RunState::ALL {
            for to in RunState::ALL {
                let got = check_transition(from, to, 0, 1);
                if EDGES.contains(&(from, to)) {
                    assert_eq!(got, Ok(()), "{from} -> {to}");
                } else {
                    assert_eq!(got, Err(TransitionError::Illegal { from, to }));
                }
            }
        }
    }

    #[test]
    fn retry_needs_attempts_left() {
        assert_eq!(check_transition(Lost, Queued, 1, 2), Ok(()));
        assert_eq!(
            check_transition(Lost, Queued, 2, 2),
            Err(TransitionError::NoAttemptsLeft {
                attempts: 2,
                max_attempts: 2
            })
        );
    }

    #[test]
    fn final_states_have_no_way_out_but_a_retry() {
        for from in RunState::ALL.into_iter().filter(|s| s.is_final()) {
            for to in RunState::ALL {
                if (from, to) != (Lost, Queued) {
                    assert!(check_transition(from, to, 0, 9).is_err(), "{from} -> {to}");
                }
            }
        }
    }

    #[test]
    fn state_names_round_trip_in_storage_and_json() {
        for st in RunState::ALL {
            assert_eq!(RunState::parse(st.as_str()), Some(st));
            let json = serde_json::to_string(&st).expect("serialise");
            assert_eq!(json, format!("\"{}\"", st.as_str()));
        }
        assert_eq!(RunState::parse("paused"), None);
    }

    #[test]
    fn images_must_be_pinned_to_a_sha256_digest() {
        let hex = "0123456789abcdef".repeat(4);
        assert!(PinnedImage::new("app", format!("sha256:{hex}")).is_ok());
        for bad in [
            "latest".to_owned(),
            format!("sha512:{hex}"),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{}", hex.to_uppercase()),
        ] {
            assert!(PinnedImage::new("app", bad).is_err());
        }
    }

    fn run() -> Run {
        Run {
            id: RunId(1),
            deployment: None,
            image: PinnedImage {
                reference: "app".into(),
                digest: "sha256:x".into(),
            },
            command: vec![],
            env: BTreeMap::new(),
            resources: Resources::default(),
            recycle_key: None,
            readonly_rootfs: false,
            node_selector: BTreeMap::new(),
            timeout_ms: None,
            idempotency_key: None,
            attempts: 0,
            max_attempts: 2,
            state: Queued,
            node: None,
            exit_code: None,
            error: None,
            submitted_at: 5,
            times: StartTimes {
                queued: Some(5),
                ..StartTimes::default()
            },
            caches: vec![],
            cache_notes: vec![],
            snapshot: None,
        }
    }

    #[test]
    fn apply_counts_attempts_and_a_retry_starts_a_fresh_breakdown() {
        let mut r = run();
        r.apply(Scheduled, 10).expect("schedule");
        r.node = Some("n1".into());
        r.apply(Starting, 11).expect("start");
        r.apply(Running, 12).expect("run");
        r.apply(Lost, 13).expect("lose");
        assert_eq!(
            (r.attempts, r.times.scheduled, r.times.finished),
            (1, Some(10), Some(13))
        );
        r.apply(Queued, 20).expect("retry");
        assert_eq!(r.node, None);
        assert_eq!(
            r.times,
            StartTimes {
                queued: Some(20),
                ..StartTimes::default()
            }
        );
        r.apply(Scheduled, 21).expect("schedule again");
        assert_eq!(r.attempts, 2);
        let before = r.clone();
        assert!(r.apply(Succeeded, 22).is_err());
        assert_eq!(r, before, "a refused transition changes nothing");
    }

    #[test]
    fn ad_hoc_runs_queue_by_image_and_deployment_runs_by_deployment() {
        let mut r = run();
        assert_eq!(r.queue_key(), "i:sha256:x");
        r.deployment = Some("web".into());
        assert_eq!(r.queue_key(), "d:web");
        let plain = r.warm_key();
        r.recycle_key = Some("tenant-a".into());
        assert_ne!(r.warm_key(), plain, "the recycling key separates runners");
    }

    #[test]
    fn reuse_is_opt_in_by_deployment_or_recycling_key() {
        let mut r = run();
        assert!(!r.recyclable(), "a plain run shares its runner with nobody");
        assert_eq!(r.recycle_scope(), None);
        assert!(r.warm_key().ends_with("|single-use"));

        r.deployment = Some("web".into());
        let web = r.warm_key();
        assert!(r.recyclable());
        r.deployment = Some("api".into());
        assert_ne!(
            r.warm_key(),
            web,
            "two deployments share nothing by default"
        );

        // A key is shared by whoever names it, deployment or not.
        r.recycle_key = Some("web".into());
        let keyed = r.warm_key();
        r.deployment = None;
        assert_eq!(r.warm_key(), keyed);
        // ...and never meets the deployment of the same name.
        assert_ne!(keyed, web);

        r.readonly_rootfs = true;
        assert_ne!(r.warm_key(), keyed, "a read-only root is another shape");
    }
}
