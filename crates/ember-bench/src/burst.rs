//! `ember bench burst`: N runs queued at once on a running control plane,
//! and — in the same invocation — the node's raw warm-pool throughput for
//! the same command, so the control plane's overhead is a ratio of two
//! numbers taken minutes apart on the same machine.
//!
//! All burst figures come from the runs' stored records (the control
//! plane's clock), not from this client's polling, so how often the client
//! looks does not change them. The phases are those of [`crate::stats`].

use crate::pool::{PoolBenchError, PoolMeasurement, PoolRun, measure_pool};
use crate::stats::{self, PhaseSamples, loop_stats, span};
use crate::{DEFAULT_COMMAND, Say, error_chain, show_command};
use ember_api::client::{ClientError, ControlClient};
use ember_control::model::{DeploymentSpec, Millis, PinnedImage, Run, RunId, RunSpec, RunState};
use ember_pool::RunnerImage;
use ember_runtime::Runc;
use ember_store::Store;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The recycling key of the bench's deployments: their runners are reused
/// by every burst (and only by bursts), whatever else runs the same image.
const RECYCLE_KEY: &str = "ember-bench-burst";

/// How often the client asks whether the burst's last run is final. One
/// small GET each time, so the poll does not load the control plane it
/// measures.
const POLL: Duration = Duration::from_millis(100);

/// A node counts as live if it heartbeat within this long.
const LIVE_MS: Millis = 60_000;

/// Errors of `ember bench burst` (failed runs are not errors: the report
/// counts them).
#[derive(Debug, thiserror::Error)]
pub enum BurstError {
    /// A setting is out of range.
    #[error("invalid benchmark settings: {0}")]
    Config(&'static str),
    /// The cluster has no node to run on.
    #[error("no node is registered with {0}")]
    NoNodes(String),
    /// A request to the control plane failed.
    #[error(transparent)]
    Control(#[from] ClientError),
    /// The bench's deployment could not be created.
    #[error("creating deployment {name}")]
    CreateDeployment {
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// A deployment of the bench's name exists but runs something else.
    #[error("deployment {name} exists but does not run `{command}` in {image}")]
    DeploymentMismatch {
        /// Its name.
        name: String,
        /// The command the bench wants.
        command: String,
        /// The image the bench wants.
        image: String,
    },
    /// A warm-up submit was refused.
    #[error("warm-up submit: {0}")]
    WarmupSubmit(String),
    /// A warm-up run did not succeed.
    #[error("warm-up run {id} ended {how}")]
    WarmupRun {
        /// The run.
        id: RunId,
        /// How it ended.
        how: String,
    },
    /// A task of the bench failed.
    #[error("{0} task failed")]
    Task(&'static str, #[source] tokio::task::JoinError),
}

/// Why the raw measurement has no figures.
#[derive(Debug, thiserror::Error)]
enum RawError {
    #[error("CPU {0} is out of range")]
    CpuRange(usize, #[source] nix::Error),
    #[error("pinning the raw pool to CPUs {0:?}")]
    Pin(Vec<usize>, #[source] nix::Error),
    #[error("reading this thread's CPUs")]
    Affinity(#[source] nix::Error),
    #[error(transparent)]
    Pool(#[from] PoolBenchError),
}

/// What `ember bench burst` measures.
#[derive(Debug, Clone)]
pub struct BurstConfig {
    /// Runs in the burst.
    pub runs: usize,
    /// Submit requests in flight at once.
    pub submitters: usize,
    /// Runs submitted and waited for before the burst [default: the
    /// cluster's slots].
    pub warmup: Option<usize>,
    /// Threads of the raw pool measurement [default: the cluster's slots].
    pub slots: Option<usize>,
    /// Actions of the raw pool measurement [default: `runs`].
    pub raw_runs: Option<usize>,
    /// CPUs the raw measurement may use (none: any).
    pub raw_cpus: Vec<usize>,
    /// How long to wait for the runs.
    pub timeout: Duration,
    /// The command every run (and raw action) runs.
    pub command: Vec<String>,
    /// The bench's directory (`<root>/bench`) for the raw pool.
    pub bench: PathBuf,
}

impl BurstConfig {
    /// Checks the settings, so that a caller can refuse them before
    /// talking to the cluster; [`run`] checks them too.
    pub fn validate(&self) -> Result<(), BurstError> {
        if self.runs == 0 || self.submitters == 0 {
            return Err(BurstError::Config(
                "--runs and --submitters must be at least 1",
            ));
        }
        if self.command.is_empty() {
            return Err(BurstError::Config("the command is empty"));
        }
        Ok(())
    }
}

/// The live part of the cluster, which sizes the warm-up and the raw pool.
#[derive(Debug, Clone, Copy)]
pub struct Cluster {
    /// Live nodes (all registered ones if none looks live by our clock).
    pub nodes: usize,
    /// Their slots.
    pub slots: u32,
}

/// Reads the cluster's live nodes; fails if none is registered.
pub async fn cluster(client: &ControlClient) -> Result<Cluster, BurstError> {
    let nodes = client.nodes().await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let live: Vec<_> = nodes
        .iter()
        .filter(|n| n.last_heartbeat + LIVE_MS >= now)
        .collect();
    // The control plane's clock may not be ours: all registered nodes
    // rather than none.
    let live = if live.is_empty() {
        nodes.iter().collect()
    } else {
        live
    };
    if live.is_empty() {
        return Err(BurstError::NoNodes(client.base().to_string()));
    }
    Ok(Cluster {
        nodes: live.len(),
        slots: live.iter().map(|n| n.spec.slots).sum(),
    })
}

/// What the raw pool measurement needs, readied before the burst so that
/// a missing agent or image fails fast and a pull does not overlap it.
#[derive(Debug)]
pub struct RawInput {
    /// The static agent binary.
    pub agent: PathBuf,
    /// A store holding the image.
    pub store: Store,
    /// The pinned image, as the runners run it.
    pub image: RunnerImage,
}

/// The burst's figures, computed from the runs' records.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct BurstStats {
    /// Records looked at.
    pub runs: usize,
    /// Exited 0.
    pub succeeded: usize,
    /// Final but not succeeded (failed, cancelled, lost).
    pub failed: usize,
    /// Not final when the wait ended.
    pub unfinished: usize,
    /// First submit → last final state, ms.
    pub span_ms: Millis,
    /// Succeeded runs per second of `span_ms`.
    pub runs_per_s: f64,
    /// First submit → earliest process start, ms.
    pub first_start_ms: Option<Millis>,
    /// Submit → process started ([`stats::TOTAL`]), per started run.
    pub p50_ms: Millis,
    /// 90th percentile of the same.
    pub p90_ms: Millis,
    /// 99th percentile of the same.
    pub p99_ms: Millis,
    /// Largest of the same.
    pub max_ms: Millis,
    /// Submit → claimed by a scheduler ([`stats::QUEUE`]).
    pub queue_p50_ms: Millis,
    /// 99th percentile of the same.
    pub queue_p99_ms: Millis,
    /// Claimed → assigned to a node ([`stats::PLACEMENT`]).
    pub placement_p50_ms: Millis,
    /// 99th percentile of the same.
    pub placement_p99_ms: Millis,
    /// Assigned → process started, the node's part ([`stats::NODE`]).
    pub node_p50_ms: Millis,
    /// 99th percentile of the same.
    pub node_p99_ms: Millis,
}

/// Figures of a burst from its runs' records.
pub fn burst_stats(runs: &[Run]) -> BurstStats {
    let first_submit = runs.iter().map(|r| r.submitted_at).min();
    let last_final = runs
        .iter()
        .filter(|r| r.state.is_final())
        .filter_map(|r| r.times.finished)
        .max();
    let first_start = runs.iter().filter_map(|r| r.times.process_started).min();
    let succeeded = runs
        .iter()
        .filter(|r| r.state == RunState::Succeeded)
        .count();
    let unfinished = runs.iter().filter(|r| !r.state.is_final()).count();
    let span_ms = span(first_submit, last_final).unwrap_or(0);
    let mut phases =
        PhaseSamples::new(&[stats::TOTAL, stats::QUEUE, stats::PLACEMENT, stats::NODE]);
    phases.add(runs);
    let total = phases.get(stats::TOTAL.name);
    let queue = phases.get(stats::QUEUE.name);
    let placement = phases.get(stats::PLACEMENT.name);
    let node = phases.get(stats::NODE.name);
    BurstStats {
        runs: runs.len(),
        succeeded,
        failed: runs.len() - succeeded - unfinished,
        unfinished,
        span_ms,
        // A burst that all ends within one millisecond is still a rate,
        // not a division by zero.
        runs_per_s: succeeded as f64 / (span_ms.max(1) as f64 / 1e3),
        first_start_ms: span(first_submit, first_start),
        p50_ms: total.p50_ms,
        p90_ms: total.p90_ms,
        p99_ms: total.p99_ms,
        max_ms: total.max_ms,
        queue_p50_ms: queue.p50_ms,
        queue_p99_ms: queue.p99_ms,
        placement_p50_ms: placement.p50_ms,
        placement_p99_ms: placement.p99_ms,
        node_p50_ms: node.p50_ms,
        node_p99_ms: node.p99_ms,
    }
}

/// The raw pool's figures, or why there are none.
#[derive(Debug, Default, serde::Serialize)]
pub struct Raw {
    /// Actions per second through the pool.
    pub raw_runs_per_s: Option<f64>,
    /// Median action.
    pub raw_p50_ms: Option<f64>,
    /// 99th percentile action.
    pub raw_p99_ms: Option<f64>,
    /// Timed actions.
    pub raw_n: Option<usize>,
    /// Threads.
    pub raw_concurrency: usize,
    /// Runners the raw pool created.
    pub raw_runners_created: Option<u64>,
    /// Why there are no figures (`--no-raw`, `failed: ...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_skipped: Option<String>,
    /// 1 − burst runs/s ÷ raw runs/s.
    pub overhead: Option<f64>,
    /// The measurement was tried and failed.
    #[serde(skip)]
    pub failed: bool,
}

/// The report of `ember bench burst` (its JSON is what the README and
/// `bench/burst/run.sh` read).
#[derive(Debug, serde::Serialize)]
pub struct BurstReport {
    /// The image reference.
    pub image: String,
    /// Its manifest digest.
    pub digest: String,
    /// The command every run ran.
    pub command: Vec<String>,
    /// The bench's deployment.
    pub deployment: String,
    /// Runs asked for.
    pub requested: usize,
    /// Figures from the records.
    #[serde(flatten)]
    pub burst: BurstStats,
    /// Submits the control plane refused or that got no answer.
    pub submit_errors: usize,
    /// First submit sent → last submit answered, as this client saw it.
    pub submit_ms: f64,
    /// Submit requests in flight.
    pub submitters: usize,
    /// Warm-up runs.
    pub warmup: usize,
    /// Live nodes.
    pub nodes: usize,
    /// Slots of the live nodes.
    pub slots: u32,
    /// The raw pool measurement.
    #[serde(flatten)]
    pub raw: Raw,
    /// CPUs of this machine.
    pub cpus: usize,
    /// The first few runs that did not succeed, in words.
    #[serde(skip)]
    pub failures: Vec<String>,
    /// The first refused submit.
    #[serde(skip)]
    pub first_submit_error: Option<String>,
}

impl BurstReport {
    /// Every run succeeded, every submit was taken, and the raw
    /// measurement (if tried) worked.
    pub fn all_ok(&self) -> bool {
        self.failures.is_empty() && self.submit_errors == 0 && !self.raw.failed
    }
}

/// Runs the burst on `cluster` with `image` (pinned), then the raw pool
/// measurement if `raw` is given.
pub async fn run(
    client: &ControlClient,
    cluster: Cluster,
    image: &PinnedImage,
    raw: Option<RawInput>,
    cfg: &BurstConfig,
    say: &Say,
) -> Result<BurstReport, BurstError> {
    cfg.validate()?;
    let shown = show_command(&cfg.command);
    let slots = cluster.slots;
    let deployment = ensure_deployment(client, image, &cfg.command).await?;
    let raw_concurrency = cfg
        .slots
        .unwrap_or(usize::try_from(slots).unwrap_or(8))
        .max(1);

    let deadline = Instant::now() + cfg.timeout;
    let warmup = cfg
        .warmup
        .unwrap_or(usize::try_from(slots).unwrap_or(usize::MAX));
    if warmup > 0 {
        say(&format!("warm-up: {warmup} run(s) of {deployment}"));
        let (ids, errors, _) = submit_all(client, &deployment, warmup, cfg.submitters).await;
        if let Some(e) = errors.into_iter().next() {
            return Err(BurstError::WarmupSubmit(e));
        }
        let runs = wait_final(client, &ids, deadline, "warm-up", say).await?;
        if let Some(r) = runs.iter().find(|r| r.state != RunState::Succeeded) {
            return Err(BurstError::WarmupRun {
                id: r.id,
                how: describe(r),
            });
        }
    }

    say(&format!(
        "submitting {} runs of `{shown}` in {} ({} in flight)",
        cfg.runs, image.reference, cfg.submitters
    ));
    let (ids, errors, submit_wall) =
        submit_all(client, &deployment, cfg.runs, cfg.submitters).await;
    say(&format!(
        "submitted {} in {:.0} ms{}",
        ids.len(),
        submit_wall.as_secs_f64() * 1e3,
        if errors.is_empty() {
            String::new()
        } else {
            format!(", {} submits failed (first: {})", errors.len(), errors[0])
        }
    ));
    let runs = wait_final(client, &ids, deadline, "runs", say).await?;
    let burst = burst_stats(&runs);
    say(&format!(
        "{} succeeded, {} failed, {} unfinished; {:.0} runs/s",
        burst.succeeded, burst.failed, burst.unfinished, burst.runs_per_s
    ));

    let mut raw_report = Raw {
        raw_concurrency,
        ..Raw::default()
    };
    match raw {
        None => raw_report.raw_skipped = Some("--no-raw".into()),
        Some(RawInput {
            agent,
            store,
            image,
        }) => {
            let n = cfg.raw_runs.unwrap_or(cfg.runs).max(1);
            say(&format!(
                "raw pool: {n} actions of `{shown}`, {raw_concurrency} thread(s), under {}",
                cfg.bench.display()
            ));
            let bench = cfg.bench.clone();
            let cpus = cfg.raw_cpus.clone();
            let command = cfg.command.clone();
            let outer = say.clone();
            let say: Say = Arc::new(move |s: &str| outer(&format!("raw pool: {s}")));
            let measured = tokio::task::spawn_blocking(move || -> Result<_, RawError> {
                // The pool's threads and the runtimes they start inherit
                // this thread's CPUs; the thread gets its own back after.
                let _pinned = Pinned::to(&cpus)?;
                let runc = Runc::new(bench.join("runc"));
                Ok(measure_pool(
                    &PoolRun {
                        bench: &bench,
                        runc: &runc,
                        image: &image,
                        agent: &agent,
                        command: &command,
                        n,
                        concurrency: raw_concurrency,
                        paused: false,
                    },
                    store,
                    &say,
                )?)
            })
            .await
            .map_err(|e| BurstError::Task("raw pool", e))?;
            match measured {
                Ok(PoolMeasurement {
                    samples,
                    wall,
                    runners_created,
                }) => {
                    let s = loop_stats(samples.iter().map(|s| s.total).collect(), wall);
                    raw_report.overhead = Some(1.0 - burst.runs_per_s / s.actions_per_s.max(1e-9));
                    raw_report.raw_runs_per_s = Some(s.actions_per_s);
                    raw_report.raw_p50_ms = Some(s.p50_ms);
                    raw_report.raw_p99_ms = Some(s.p99_ms);
                    raw_report.raw_n = Some(s.n);
                    raw_report.raw_runners_created = Some(runners_created);
                }
                Err(e) => {
                    raw_report.raw_skipped = Some(format!("failed: {}", error_chain(&e)));
                    raw_report.failed = true;
                }
            }
        }
    }

    let failures: Vec<String> = runs
        .iter()
        .filter(|r| r.state != RunState::Succeeded)
        .take(3)
        .map(|r| format!("{} ended {}", r.id, describe(r)))
        .collect();
    Ok(BurstReport {
        image: image.reference.clone(),
        digest: image.digest.clone(),
        command: cfg.command.clone(),
        deployment,
        requested: cfg.runs,
        burst,
        submit_errors: errors.len(),
        submit_ms: submit_wall.as_secs_f64() * 1e3,
        submitters: cfg.submitters,
        warmup,
        nodes: cluster.nodes,
        slots,
        raw: raw_report,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        failures,
        first_submit_error: errors.into_iter().next(),
    })
}

/// A run's end in words: its state and exit code or error.
fn describe(r: &Run) -> String {
    let mut s = r.state.to_string();
    if let Some(c) = r.exit_code {
        s.push_str(&format!(" (exit {c})"));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!(": {e}"));
    }
    s
}

/// FNV-1a, 64 bits: a stable short name for a command (std's hasher may
/// change between Rust releases; names must not).
fn fnv1a(words: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in words {
        for b in w.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The bench's deployment name for `image` and `command`: one per image
/// version, and per command other than the default (so bursts of
/// different commands never reuse each other's deployment).
pub fn deployment_name(image: &PinnedImage, command: &[String]) -> String {
    let hex = image.digest.trim_start_matches("sha256:");
    let mut name = format!("bench-burst-{}", &hex[..hex.len().min(12)]);
    if command != [DEFAULT_COMMAND] {
        name.push_str(&format!("-{:08x}", fnv1a(command) as u32));
    }
    name
}

/// Creates the bench's deployment of `image` running `command`, or reuses
/// the one an earlier burst created.
async fn ensure_deployment(
    client: &ControlClient,
    image: &PinnedImage,
    command: &[String],
) -> Result<String, BurstError> {
    let name = deployment_name(image, command);
    let spec = DeploymentSpec {
        caches: Vec::new(),
        name: name.clone(),
        image: image.clone(),
        command: command.to_vec(),
        env: BTreeMap::new(),
        resources: Default::default(),
        recycle_key: Some(RECYCLE_KEY.into()),
        readonly_rootfs: false,
        warm_runners: 0,
        node_selector: BTreeMap::new(),
        snapshot: false,
    };
    let created = client.deploy(&spec).await;
    let Err(e) = created else {
        return Ok(name);
    };
    // Most likely it exists already (names are unique): reuse it if it
    // runs the same thing the same way.
    let same = |d: &DeploymentSpec| {
        d.image.digest == spec.image.digest
            && d.command == spec.command
            && d.env == spec.env
            && d.resources == spec.resources
            && d.recycle_key == spec.recycle_key
            && d.node_selector == spec.node_selector
    };
    match client
        .deployments()
        .await?
        .into_iter()
        .find(|d| d.spec.name == name)
    {
        Some(d) if same(&d.spec) => Ok(name),
        Some(_) => Err(BurstError::DeploymentMismatch {
            name,
            command: show_command(command),
            image: format!("{image:?}"),
        }),
        None => Err(BurstError::CreateDeployment { name, source: e }),
    }
}

/// Submits `n` runs of `deployment` with `submitters` requests in flight;
/// returns the ids (sorted), the errors, and the time from the first
/// request to the last answer.
async fn submit_all(
    client: &ControlClient,
    deployment: &str,
    n: usize,
    submitters: usize,
) -> (Vec<RunId>, Vec<String>, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let spec = Arc::new(RunSpec {
        deployment: Some(deployment.to_owned()),
        max_attempts: 1,
        ..RunSpec::default()
    });
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..submitters.min(n) {
        let (client, next, spec) = (client.clone(), next.clone(), spec.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                out.push(
                    client
                        .submit(&spec, None)
                        .await
                        .map(|s| s.run.id)
                        .map_err(|e| ember_error::chain(&e).to_string()),
                );
            }
            out
        });
    }
    let (mut ids, mut errors) = (Vec::with_capacity(n), Vec::new());
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(id) => ids.push(id),
                        Err(e) => errors.push(e),
                    }
                }
            }
            Err(e) => errors.push(format!("submit task: {e}")),
        }
    }
    ids.sort_unstable();
    (ids, errors, t.elapsed())
}

/// The calling thread restricted to some CPUs until this is dropped.
struct Pinned(Option<nix::sched::CpuSet>);

impl Pinned {
    /// Pins the calling thread to `cpus` (none: leaves it alone).
    fn to(cpus: &[usize]) -> Result<Pinned, RawError> {
        use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
        use nix::unistd::Pid;
        if cpus.is_empty() {
            return Ok(Pinned(None));
        }
        let before = sched_getaffinity(Pid::from_raw(0)).map_err(RawError::Affinity)?;
        let mut set = CpuSet::new();
        for &c in cpus {
            set.set(c).map_err(|e| RawError::CpuRange(c, e))?;
        }
        sched_setaffinity(Pid::from_raw(0), &set).map_err(|e| RawError::Pin(cpus.to_vec(), e))?;
        Ok(Pinned(Some(before)))
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(before) = &self.0 {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), before);
        }
    }
}

/// Fetches the records of `ids`, 64 requests in flight.
async fn fetch_runs(client: &ControlClient, ids: &[RunId]) -> Result<Vec<Run>, BurstError> {
    let ids: Arc<Vec<RunId>> = Arc::new(ids.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..ids.len().min(64) {
        let (client, next, ids) = (client.clone(), next.clone(), ids.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else {
                    return Ok::<_, ClientError>(out);
                };
                out.push(client.run(*id).await?);
            }
        });
    }
    let mut runs = Vec::with_capacity(ids.len());
    while let Some(done) = tasks.join_next().await {
        runs.extend(done.map_err(|e| BurstError::Task("fetch", e))??);
    }
    Ok(runs)
}

/// Waits until every run in `ids` (sorted) is final or `deadline` passes,
/// saying progress about once a second; returns their records.
///
/// While the burst runs only the last run is polled (runs of one
/// deployment start in submission order, so it is among the last to end);
/// progress is a binary search for the first run not yet final, which
/// assumes the same order and is an estimate. The records are then read
/// once each, and the few still running read again until final.
async fn wait_final(
    client: &ControlClient,
    ids: &[RunId],
    deadline: Instant,
    what: &str,
    say: &Say,
) -> Result<Vec<Run>, BurstError> {
    let Some(&last) = ids.last() else {
        return Ok(Vec::new());
    };
    let t = Instant::now();
    let mut shown = Instant::now();
    loop {
        if client.run(last).await?.state.is_final() || Instant::now() >= deadline {
            break;
        }
        if shown.elapsed() >= Duration::from_secs(1) {
            shown = Instant::now();
            let (mut lo, mut hi) = (0, ids.len());
            while lo < hi {
                let mid = (lo + hi) / 2;
                if client.run(ids[mid]).await?.state.is_final() {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            say(&format!(
                "{what}: about {lo}/{} final after {:.1} s",
                ids.len(),
                t.elapsed().as_secs_f64()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    let mut done: BTreeMap<RunId, Run> = BTreeMap::new();
    let mut pending: BTreeSet<RunId> = ids.iter().copied().collect();
    loop {
        let want: Vec<RunId> = pending.iter().copied().collect();
        for r in fetch_runs(client, &want).await? {
            if r.state.is_final() {
                pending.remove(&r.id);
            }
            done.insert(r.id, r);
        }
        if pending.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL / 2).await;
    }
    if !pending.is_empty() {
        say(&format!(
            "{what}: {} of {} runs not final after the timeout",
            pending.len(),
            ids.len()
        ));
    }
    Ok(done.into_values().collect())
}

impl fmt::Display for BurstReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (r, b) = (self, &self.burst);
        writeln!(
            f,
            "ember bench burst: {} runs of `{}` in {} ({} node(s), {} slots, {} CPUs)",
            r.requested,
            show_command(&r.command),
            r.image,
            r.nodes,
            r.slots,
            r.cpus
        )?;
        writeln!(
            f,
            "  burst           {:>8.0} runs/s   ({} succeeded in {} ms, first submit → last final)",
            b.runs_per_s, b.succeeded, b.span_ms
        )?;
        writeln!(
            f,
            "  first start     {:>8} ms       (first submit → earliest process start)",
            b.first_start_ms
                .map_or_else(|| "-".to_owned(), |v| v.to_string())
        )?;
        writeln!(
            f,
            "  submit→started  p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
            b.p50_ms, b.p90_ms, b.p99_ms, b.max_ms
        )?;
        writeln!(
            f,
            "    of which      queue p50 {} / p99 {} ms, placement p50 {} / p99 {} ms, node p50 {} / p99 {} ms",
            b.queue_p50_ms,
            b.queue_p99_ms,
            b.placement_p50_ms,
            b.placement_p99_ms,
            b.node_p50_ms,
            b.node_p99_ms
        )?;
        writeln!(
            f,
            "  submits         {:.0} ms for {} ({} in flight), {} refused",
            r.submit_ms, b.runs, r.submitters, r.submit_errors
        )?;
        writeln!(
            f,
            "  failed          {} (+{} unfinished)",
            b.failed, b.unfinished
        )?;
        match (&r.raw.raw_runs_per_s, &r.raw.raw_skipped) {
            (Some(rps), _) => {
                writeln!(
                    f,
                    "  raw pool        {:>8.0} runs/s   ({} actions, {} thread(s), p50 {:.3} ms)",
                    rps,
                    r.raw.raw_n.unwrap_or(0),
                    r.raw.raw_concurrency,
                    r.raw.raw_p50_ms.unwrap_or(0.0)
                )?;
                writeln!(
                    f,
                    "  overhead        {:>8.1} %        (1 − burst ÷ raw; target ≤ 20 %)",
                    r.raw.overhead.unwrap_or(0.0) * 100.0
                )
            }
            (None, why) => writeln!(
                f,
                "  raw pool        skipped: {}",
                why.as_deref().unwrap_or("unknown")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_control::model::{Resources, StartTimes};

    /// A run queued at `q`, claimed at `c`, scheduled at `s`, started at
    /// `p`, final at `f`.
    fn run_claimed(
        id: i64,
        state: RunState,
        q: Millis,
        c: Millis,
        s: Millis,
        p: Millis,
        f: Millis,
    ) -> Run {
        Run {
            cache_notes: Vec::new(),
            caches: Vec::new(),
            id: RunId(id),
            deployment: Some("d".into()),
            image: PinnedImage {
                reference: "app".into(),
                digest: "sha256:x".into(),
            },
            command: vec!["true".into()],
            env: BTreeMap::new(),
            resources: Resources::default(),
            recycle_key: None,
            readonly_rootfs: false,
            node_selector: BTreeMap::new(),
            timeout_ms: None,
            idempotency_key: None,
            attempts: 1,
            max_attempts: 1,
            state,
            node: Some("n".into()),
            exit_code: (state == RunState::Succeeded).then_some(0),
            error: None,
            submitted_at: q,
            times: StartTimes {
                caches_restored: None,
                queued: Some(q),
                claimed: Some(c),
                scheduled: Some(s),
                image_ready: Some(s),
                runner_ready: Some(s),
                process_started: Some(p),
                finished: Some(f),
                ..StartTimes::default()
            },
            snapshot: None,
        }
    }

    /// A run claimed and scheduled at once (a warm hand-off).
    fn run(id: i64, state: RunState, q: Millis, s: Millis, p: Millis, f: Millis) -> Run {
        run_claimed(id, state, q, s, s, p, f)
    }

    #[test]
    fn figures_come_from_the_records() {
        use RunState::*;
        let runs = vec![
            run(1, Succeeded, 1000, 1002, 1005, 1006),
            run(2, Succeeded, 1001, 1010, 1012, 1013),
            run(3, Failed, 1001, 1011, 1020, 1021),
            run(4, Succeeded, 1003, 1030, 1040, 1500),
        ];
        let s = burst_stats(&runs);
        assert_eq!((s.runs, s.succeeded, s.failed, s.unfinished), (4, 3, 1, 0));
        assert_eq!(s.span_ms, 500);
        assert!((s.runs_per_s - 6.0).abs() < 1e-9);
        assert_eq!(s.first_start_ms, Some(5));
        // submit → started: 5, 11, 19, 37.
        assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (19, 37, 37));
        assert_eq!(s.queue_p50_ms, 10);
        assert_eq!(s.placement_p50_ms, 0);
        assert_eq!(s.node_p50_ms, 9);
    }

    #[test]
    fn queue_is_submit_to_claim_and_placement_is_apart() {
        use RunState::*;
        // Claimed 2, 3, 4 ms after submit; placed 5, 7, 9 ms after that.
        let runs = vec![
            run_claimed(1, Succeeded, 1000, 1002, 1007, 1010, 1011),
            run_claimed(2, Succeeded, 1000, 1003, 1010, 1012, 1013),
            run_claimed(3, Succeeded, 1000, 1004, 1013, 1020, 1021),
        ];
        let s = burst_stats(&runs);
        assert_eq!((s.queue_p50_ms, s.queue_p99_ms), (3, 4));
        assert_eq!((s.placement_p50_ms, s.placement_p99_ms), (7, 9));
        assert_eq!((s.node_p50_ms, s.node_p99_ms), (3, 7));
        // A run that never started counts in no phase.
        let mut unstarted = run_claimed(4, Running, 1000, 1001, 1500, 0, 0);
        unstarted.times.process_started = None;
        unstarted.times.finished = None;
        let mut with = runs.clone();
        with.push(unstarted);
        let t = burst_stats(&with);
        assert_eq!(
            (t.queue_p50_ms, t.placement_p99_ms, t.p99_ms),
            (s.queue_p50_ms, s.placement_p99_ms, s.p99_ms)
        );
    }

    #[test]
    fn unfinished_runs_are_counted_apart() {
        let mut r = run(1, RunState::Running, 10, 11, 12, 0);
        r.times.finished = None;
        let s = burst_stats(&[r]);
        assert_eq!((s.succeeded, s.failed, s.unfinished), (0, 0, 1));
        assert_eq!(s.runs_per_s, 0.0);
        assert_eq!(burst_stats(&[]), BurstStats::default());
    }

    #[test]
    fn deployment_names_keep_the_default_and_tell_commands_apart() {
        let image = PinnedImage {
            reference: "app".into(),
            digest: "sha256:0123456789abcdef".into(),
        };
        let cmd = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            deployment_name(&image, &cmd(&["true"])),
            "bench-burst-0123456789ab"
        );
        let a = deployment_name(&image, &cmd(&["sh", "-c", "true"]));
        let b = deployment_name(&image, &cmd(&["sh", "-c true"]));
        assert!(a.starts_with("bench-burst-0123456789ab-"), "{a}");
        assert_ne!(a, b, "word boundaries count");
        assert_eq!(a, deployment_name(&image, &cmd(&["sh", "-c", "true"])));
    }
}
