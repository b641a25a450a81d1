//! `ember bench burst`: N no-op runs queued at once on a running control
//! plane, and — in the same invocation — the node's raw warm-pool
//! throughput for the same action, so the control plane's overhead is a
//! ratio of two numbers taken minutes apart on the same machine.
//!
//! All burst figures come from the runs' stored records (the control
//! plane's clock), not from this client's polling, so how often the client
//! looks does not change them.

use crate::cmd::bench::{PoolMeasurement, local_image, loop_stats, measure_pool};
use crate::cmd::cluster::{ControlArgs, find_agent};
use crate::cmd::submit::pin;
use crate::util::{RegistryArgs, quantile, span};
use anyhow::{Context, bail};
use ember_api::client::ControlClient;
use ember_control::model::{DeploymentSpec, Millis, PinnedImage, Run, RunId, RunSpec, RunState};
use ember_oci::{Digest, Reference};
use ember_runtime::Runc;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The recycling key of the bench's deployment: its runners are reused by
/// every burst (and only by bursts), whatever else runs the same image.
const RECYCLE_KEY: &str = "ember-bench-burst";

/// How often the client asks whether the burst's last run is final. One
/// small GET each time, so the poll does not load the control plane it
/// measures.
const POLL: Duration = Duration::from_millis(100);

/// Options of `ember bench burst`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "The image is pinned to its digest here (as `ember submit` \
does) and run through one deployment, `bench-burst-<digest prefix>`, whose \
recycling key keeps its runners warm between bursts.\n\
runs/s = succeeded runs / (first submit → last run final); first start = first \
submit → earliest process start; p50/p99 = submit → process started per run; \
all from the control plane's records. overhead = 1 - runs/s ÷ raw runs/s.\n\n\
Examples:\n  ember bench burst --image 127.0.0.1:5000/ember/busybox:latest --runs 1000\n  \
ember bench burst --control http://10.0.0.2:7070 --token T --image busybox --json --no-raw"
)]
pub struct Args {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Image to run; it needs `true` on its PATH.
    #[arg(long, value_name = "REF")]
    pub image: String,
    /// Runs in the burst.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub runs: usize,
    /// Submit requests in flight at once.
    #[arg(long, value_name = "C", default_value_t = 64)]
    pub submitters: usize,
    /// Runs submitted together and waited for before the burst, so that it
    /// finds warm runners [default: the cluster's slots; 0: none].
    #[arg(long, value_name = "N")]
    pub warmup: Option<usize>,
    /// Threads of the raw pool measurement [default: the slots of the
    /// cluster's live nodes, else 8].
    #[arg(long, value_name = "N")]
    pub slots: Option<usize>,
    /// Actions of the raw pool measurement [default: --runs].
    #[arg(long, value_name = "N")]
    pub raw_runs: Option<usize>,
    /// Skip the raw pool measurement (and so the overhead).
    #[arg(long)]
    pub no_raw: bool,
    /// CPUs the raw pool measurement may use (e.g. `0` or `0,1`), so it
    /// can be given the same CPUs as the node when the node is pinned
    /// (`taskset`) apart from the control plane [default: any].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub raw_cpus: Vec<usize>,
    /// Give up waiting for the runs after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub timeout: u64,
    /// Print one JSON object instead of text (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    /// The static ember-agent binary for the raw measurement [default:
    /// $EMBER_AGENT, or found next to this binary or in the cargo target
    /// directory].
    #[arg(long, value_name = "PATH", env = "EMBER_AGENT")]
    pub agent: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// The burst's figures, computed from the runs' records.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub(crate) struct BurstStats {
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
    /// Submit → process started, per started run.
    pub p50_ms: Millis,
    pub p90_ms: Millis,
    pub p99_ms: Millis,
    pub max_ms: Millis,
    /// Submit → assigned to a node (the queue wait, placement included).
    pub queue_p50_ms: Millis,
    pub queue_p99_ms: Millis,
    /// Assigned → process started (the node's part).
    pub node_p50_ms: Millis,
    pub node_p99_ms: Millis,
}

/// Figures of a burst from its runs' records.
pub(crate) fn burst_stats(runs: &[Run]) -> BurstStats {
    let sorted = |f: &dyn Fn(&Run) -> Option<Millis>| {
        let mut v: Vec<Millis> = runs.iter().filter_map(f).collect();
        v.sort_unstable();
        v
    };
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
    let total = sorted(&|r| span(r.times.queued, r.times.process_started));
    let queue = sorted(&|r| {
        r.times
            .process_started
            .and(span(r.times.queued, r.times.scheduled))
    });
    let node = sorted(&|r| span(r.times.scheduled, r.times.process_started));
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
        p50_ms: quantile(&total, 0.5),
        p90_ms: quantile(&total, 0.9),
        p99_ms: quantile(&total, 0.99),
        max_ms: total.last().copied().unwrap_or(0),
        queue_p50_ms: quantile(&queue, 0.5),
        queue_p99_ms: quantile(&queue, 0.99),
        node_p50_ms: quantile(&node, 0.5),
        node_p99_ms: quantile(&node, 0.99),
    }
}

/// The raw pool's figures, or why there are none.
#[derive(Debug, Default, serde::Serialize)]
struct Raw {
    raw_runs_per_s: Option<f64>,
    raw_p50_ms: Option<f64>,
    raw_p99_ms: Option<f64>,
    raw_n: Option<usize>,
    raw_concurrency: usize,
    raw_runners_created: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_skipped: Option<String>,
    /// 1 − burst runs/s ÷ raw runs/s.
    overhead: Option<f64>,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    image: String,
    digest: String,
    deployment: String,
    requested: usize,
    #[serde(flatten)]
    burst: BurstStats,
    /// Submits the control plane refused or that got no answer.
    submit_errors: usize,
    /// First submit sent → last submit answered, as this client saw it.
    submit_ms: f64,
    submitters: usize,
    warmup: usize,
    nodes: usize,
    /// Slots of the live nodes.
    slots: u32,
    #[serde(flatten)]
    raw: Raw,
    cpus: usize,
}

/// Runs `ember bench burst`.
pub async fn run(root: &Path, args: Args) -> anyhow::Result<ExitCode> {
    if args.runs == 0 || args.submitters == 0 {
        bail!("--runs and --submitters must be at least 1");
    }
    let client = args.control.client()?;
    let say = |s: &str| eprintln!("burst: {s}");

    // The cluster: its live nodes' slots size the warm-up and the raw pool.
    let nodes = client.nodes().await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let live: Vec<_> = nodes
        .iter()
        .filter(|n| n.last_heartbeat + 60_000 >= now)
        .collect();
    // The control plane's clock may not be ours: all registered nodes
    // rather than none.
    let live = if live.is_empty() {
        nodes.iter().collect()
    } else {
        live
    };
    if live.is_empty() {
        bail!("no node is registered with {}", client.base());
    }
    let slots: u32 = live.iter().map(|n| n.spec.slots).sum();

    let pinned = pin(&args.image).await?;
    let deployment = ensure_deployment(&client, &pinned).await?;

    // Ready the raw measurement before the burst: a missing agent or image
    // fails fast, and the pull does not overlap the burst.
    let raw_concurrency = args
        .slots
        .unwrap_or(usize::try_from(slots).unwrap_or(8))
        .max(1);
    let raw_input = if args.no_raw {
        None
    } else {
        let agent = find_agent(args.agent.clone())?;
        let r: Reference = pinned.reference.parse()?;
        let d: Digest = pinned.digest.parse()?;
        let by_digest = r.with_digest(d).to_string();
        let (store, image) = local_image(root, &by_digest, &args.registry, args.json).await?;
        Some((agent, store, image))
    };

    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let warmup = args
        .warmup
        .unwrap_or(usize::try_from(slots).unwrap_or(usize::MAX));
    if warmup > 0 {
        say(&format!("warm-up: {warmup} run(s) of {deployment}"));
        let (ids, errors, _) = submit_all(&client, &deployment, warmup, args.submitters).await;
        if let Some(e) = errors.first() {
            bail!("warm-up submit: {e}");
        }
        let runs = wait_final(&client, &ids, deadline, "warm-up").await?;
        if let Some(r) = runs.iter().find(|r| r.state != RunState::Succeeded) {
            bail!("warm-up run {} ended {}", r.id, describe(r));
        }
    }

    say(&format!(
        "submitting {} runs of `true` in {} ({} in flight)",
        args.runs, pinned.reference, args.submitters
    ));
    let (ids, errors, submit_wall) =
        submit_all(&client, &deployment, args.runs, args.submitters).await;
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
    let runs = wait_final(&client, &ids, deadline, "runs").await?;
    let burst = burst_stats(&runs);
    say(&format!(
        "{} succeeded, {} failed, {} unfinished; {:.0} runs/s",
        burst.succeeded, burst.failed, burst.unfinished, burst.runs_per_s
    ));

    let mut raw = Raw {
        raw_concurrency,
        ..Raw::default()
    };
    match raw_input {
        None => raw.raw_skipped = Some("--no-raw".into()),
        Some((agent, store, image)) => {
            let n = args.raw_runs.unwrap_or(args.runs).max(1);
            say(&format!(
                "raw pool: {n} actions of `true`, {raw_concurrency} thread(s), under {}",
                root.join("bench").display()
            ));
            let bench = root.join("bench");
            let cpus = args.raw_cpus.clone();
            let measured = tokio::task::spawn_blocking(move || {
                // The pool's threads and the runtimes they start inherit
                // this thread's CPUs; the thread gets its own back after.
                let _pinned = Pinned::to(&cpus)?;
                let runc = Runc::new(bench.join("runc"));
                measure_pool(
                    &bench,
                    &runc,
                    store,
                    &image,
                    &agent,
                    n,
                    raw_concurrency,
                    false,
                    &|s: &str| eprintln!("burst: raw pool: {s}"),
                )
            })
            .await
            .context("raw pool thread failed")?;
            match measured {
                Ok(PoolMeasurement {
                    samples,
                    wall,
                    runners_created,
                }) => {
                    let s = loop_stats(samples.iter().map(|s| s.total).collect(), wall);
                    raw.overhead = Some(1.0 - burst.runs_per_s / s.actions_per_s.max(1e-9));
                    raw.raw_runs_per_s = Some(s.actions_per_s);
                    raw.raw_p50_ms = Some(s.p50_ms);
                    raw.raw_p99_ms = Some(s.p99_ms);
                    raw.raw_n = Some(s.n);
                    raw.raw_runners_created = Some(runners_created);
                }
                Err(e) => raw.raw_skipped = Some(format!("failed: {e:#}")),
            }
        }
    }
    let raw_failed = raw
        .raw_skipped
        .as_deref()
        .is_some_and(|s| s.starts_with("failed"));

    let failures: Vec<&Run> = runs
        .iter()
        .filter(|r| r.state != RunState::Succeeded)
        .collect();
    let report = Report {
        image: pinned.reference.clone(),
        digest: pinned.digest.clone(),
        deployment,
        requested: args.runs,
        burst,
        submit_errors: errors.len(),
        submit_ms: submit_wall.as_secs_f64() * 1e3,
        submitters: args.submitters,
        warmup,
        nodes: live.len(),
        slots,
        raw,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report);
    }
    for r in failures.iter().take(3) {
        eprintln!("burst: {} ended {}", r.id, describe(r));
    }
    if let Some(e) = errors.first() {
        eprintln!("burst: {} submits failed, first: {e}", errors.len());
    }
    if !failures.is_empty() || !errors.is_empty() || raw_failed {
        if let Some(why) = report.raw.raw_skipped.as_deref().filter(|_| raw_failed) {
            eprintln!("burst: raw pool measurement {why}");
        }
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
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

/// Creates the bench's deployment of `image`, or reuses the one an
/// earlier burst created. Its name carries the digest, so one per image
/// version.
async fn ensure_deployment(client: &ControlClient, image: &PinnedImage) -> anyhow::Result<String> {
    let hex = image.digest.trim_start_matches("sha256:");
    let name = format!("bench-burst-{}", &hex[..hex.len().min(12)]);
    let spec = DeploymentSpec {
        name: name.clone(),
        image: image.clone(),
        command: vec!["true".into()],
        env: BTreeMap::new(),
        resources: Default::default(),
        recycle_key: Some(RECYCLE_KEY.into()),
        readonly_rootfs: false,
        warm_runners: 0,
        node_selector: BTreeMap::new(),
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
        Some(_) => bail!("deployment {name} exists but does not run `true` in {image:?}"),
        None => Err(e).context(format!("creating deployment {name}")),
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
                        .map_err(|e| e.to_string()),
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
    fn to(cpus: &[usize]) -> anyhow::Result<Pinned> {
        use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
        use nix::unistd::Pid;
        if cpus.is_empty() {
            return Ok(Pinned(None));
        }
        let before = sched_getaffinity(Pid::from_raw(0)).context("reading this thread's CPUs")?;
        let mut set = CpuSet::new();
        for &c in cpus {
            set.set(c)
                .with_context(|| format!("CPU {c} is out of range"))?;
        }
        sched_setaffinity(Pid::from_raw(0), &set)
            .with_context(|| format!("pinning the raw pool to CPUs {cpus:?}"))?;
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
async fn fetch_runs(client: &ControlClient, ids: &[RunId]) -> anyhow::Result<Vec<Run>> {
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
                    return Ok::<_, anyhow::Error>(out);
                };
                out.push(client.run(*id).await?);
            }
        });
    }
    let mut runs = Vec::with_capacity(ids.len());
    while let Some(done) = tasks.join_next().await {
        runs.extend(done.context("fetch task failed")??);
    }
    Ok(runs)
}

/// Waits until every run in `ids` (sorted) is final or `deadline` passes,
/// printing progress about once a second; returns their records.
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
) -> anyhow::Result<Vec<Run>> {
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
            eprintln!(
                "burst: {what}: about {lo}/{} final after {:.1} s",
                ids.len(),
                t.elapsed().as_secs_f64()
            );
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
        eprintln!(
            "burst: {what}: {} of {} runs not final after the timeout",
            pending.len(),
            ids.len()
        );
    }
    Ok(done.into_values().collect())
}

fn print_text(r: &Report) {
    let b = &r.burst;
    println!(
        "ember bench burst: {} runs of `true` in {} ({} node(s), {} slots, {} CPUs)",
        r.requested, r.image, r.nodes, r.slots, r.cpus
    );
    println!(
        "  burst           {:>8.0} runs/s   ({} succeeded in {} ms, first submit → last final)",
        b.runs_per_s, b.succeeded, b.span_ms
    );
    println!(
        "  first start     {:>8} ms       (first submit → earliest process start)",
        b.first_start_ms
            .map_or_else(|| "-".to_owned(), |v| v.to_string())
    );
    println!(
        "  submit→started  p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
        b.p50_ms, b.p90_ms, b.p99_ms, b.max_ms
    );
    println!(
        "    of which      queue p50 {} / p99 {} ms, node p50 {} / p99 {} ms",
        b.queue_p50_ms, b.queue_p99_ms, b.node_p50_ms, b.node_p99_ms
    );
    println!(
        "  submits         {:.0} ms for {} ({} in flight), {} refused",
        r.submit_ms, b.runs, r.submitters, r.submit_errors
    );
    println!(
        "  failed          {} (+{} unfinished)",
        b.failed, b.unfinished
    );
    match (&r.raw.raw_runs_per_s, &r.raw.raw_skipped) {
        (Some(rps), _) => {
            println!(
                "  raw pool        {:>8.0} runs/s   ({} actions, {} thread(s), p50 {:.3} ms)",
                rps,
                r.raw.raw_n.unwrap_or(0),
                r.raw.raw_concurrency,
                r.raw.raw_p50_ms.unwrap_or(0.0)
            );
            println!(
                "  overhead        {:>8.1} %        (1 − burst ÷ raw; target ≤ 20 %)",
                r.raw.overhead.unwrap_or(0.0) * 100.0
            );
        }
        (None, why) => println!(
            "  raw pool        skipped: {}",
            why.as_deref().unwrap_or("unknown")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_control::model::{Resources, StartTimes};

    fn run(id: i64, state: RunState, q: Millis, s: Millis, p: Millis, f: Millis) -> Run {
        Run {
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
                queued: Some(q),
                scheduled: Some(s),
                image_ready: Some(s),
                runner_ready: Some(s),
                process_started: Some(p),
                finished: Some(f),
                // Fields the bench does not read.
                ..StartTimes::default()
            },
        }
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
        assert_eq!(s.node_p50_ms, 9);
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
}
