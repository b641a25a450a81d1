//! Executing one assigned run, on a blocking thread through the warm pool:
//!
//! ```text
//! Assign ─► [Accepted ─► pull, only if the image is not here] ─► ImageReady
//!        ─► pool.acquire(key) ─► RunnerReady ─► [restore caches ─► CachesRestored]
//!        ─► exec ─► Started ─► output → logs endpoint
//!        ─► release (runner back to idle) ─► Exited { code, runner_idle }
//! ```
//!
//! A run that declares caches (`caches`) and exits 0 is reported exited
//! as soon as its process exits (`runner_idle: false`: the runner is still
//! held), then its caches are saved from the runner, and only then is the
//! runner released: the save needs the runner's files as the run left
//! them, and the release resets them. The run's slot on the node is held
//! until the save ends; the next heartbeat reports the runner idle.
//!
//! The blocking side sends its reports and output to the run's task in
//! order; the task sends them on (`report`, `logs`) in that order
//! (`relay`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::agent::NodeAgent;
use crate::relay::{self, Event, EventTx};
use ember_api::wire::LogStream;
use ember_control::model::{NodeReport, Resources, Run};
use ember_pool::{Canceller, Outcome, Released, RunnerImage, RunnerShape, RunnerSpec};
use ember_store::ImageRecord;

use crate::caches::{self, Prepared, RunnerFs};

/// Cancellation state of one run on this node.
#[derive(Default)]
pub(crate) struct RunHandle {
    /// The attempt being executed (the assignment's `attempts`).
    pub(crate) attempt: u32,
    pub(crate) cancelled: AtomicBool,
    /// The exec to signal, once started.
    exec: Mutex<Option<(Canceller, u64)>>,
    /// A snapshot run's exec to signal, once resumed: its agent's socket
    /// and the exec id (snapshot runners are not the pool's).
    pub(crate) snapshot_exec: Mutex<Option<(std::path::PathBuf, u64)>>,
}

impl RunHandle {
    /// The handle of a new run's `attempt`.
    pub(crate) fn new(attempt: u32) -> RunHandle {
        RunHandle {
            attempt,
            ..RunHandle::default()
        }
    }

    /// Stops the run: before its process starts, or by killing it.
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let exec = self.exec.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some((c, id)) = exec
            && let Err(e) = c.cancel(id, SIGKILL)
        {
            tracing::warn!(error = %ember_error::chain(&e), "cancelling an exec");
        }
        let snapshot_exec = self
            .snapshot_exec
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some((socket, id)) = snapshot_exec
            && let Err(e) = crate::snapshot::signal_exec(&socket, id, SIGKILL)
        {
            tracing::warn!(error = %ember_error::chain(&e), "cancelling a snapshot run's exec");
        }
    }
}

/// SIGKILL (the same number on every Linux architecture), without a libc
/// dependency for one constant.
pub(crate) const SIGKILL: i32 = 9;

impl NodeAgent {
    /// `record` as the pool runs it, read from the store the first time.
    fn runner_image(&self, record: &ImageRecord) -> Result<RunnerImage, String> {
        if let Some(image) = self
            .runner_images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&record.manifest)
        {
            return Ok(image.clone());
        }
        let image = RunnerImage::from_store(&self.store, record)
            .map_err(|e| format!("reading the image config: {}", ember_error::chain(&e)))?;
        self.runner_images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(record.manifest.clone(), image.clone());
        Ok(image)
    }
}

/// Executes `run` (the slot is the caller's) and reports how it went.
pub(crate) async fn execute(agent: &Arc<NodeAgent>, run: Run, handle: Arc<RunHandle>) {
    let id = run.id;
    let at = Some(run.attempts);
    let cached = agent.image_at_hand(&run.image.digest);
    // With the image at hand, `ImageReady` follows at once and implies
    // acceptance: one request per run fewer. A pull may take seconds, so
    // then the control plane hears first that the run was taken.
    if !cached {
        agent.report(id, at, NodeReport::Accepted).await;
    }
    let record = match agent.ensure_image(&run.image).await {
        Ok(r) => r,
        Err(error) => {
            agent.report(id, at, NodeReport::Failed { error }).await;
            return;
        }
    };
    if !cached {
        // New layers: the placement's image locality should know.
        agent.inventory_changed.notify_one();
    }

    let (tx, rx) = relay::channel();
    let _ = tx.send(Event::report(NodeReport::ImageReady));
    let exec = {
        let agent = agent.clone();
        let run = run.clone();
        tokio::task::spawn_blocking(move || {
            // A snapshot deployment's runs restore from (or start fresh
            // beside) the node's checkpoint, outside the pool (and without
            // its declared caches).
            let done = if run.snapshot.is_some() {
                crate::snapshot::deploy::exec_snapshot(&agent, &run, &record, &handle, &tx)
                    .map(|(code, idle)| Done::Exited(code, idle))
            } else {
                exec_blocking(&agent, &run, &record, &handle, &tx)
            };
            let last = match done {
                Ok(Done::Exited(code, runner_idle)) => NodeReport::Exited { code, runner_idle },
                Ok(Done::Reported) => return,
                Err(error) => NodeReport::Failed { error },
            };
            let _ = tx.send(Event::report(last));
        })
    };
    // A final report relayed means the executor ran to its end: only a
    // panic would make its join say more, so the task need not wait (a
    // wake-up) for the blocking thread to finish.
    let finished = relay::relay(agent, id, at, rx).await;
    // A run with caches is reported exited before their save: its slot
    // stays taken until the executor (the save) is done.
    let saving = !run.caches.is_empty() && run.snapshot.is_none();
    if finished && !saving {
        drop(exec);
    } else if let Err(e) = exec.await
        && !finished
    {
        agent
            .report(
                id,
                at,
                NodeReport::Failed {
                    error: format!("executor failed: {}", ember_error::chain(&e)),
                },
            )
            .await;
    }
    // The runner's idle again (or gone): the next heartbeat says so.
    agent.inventory_changed.notify_one();
}

/// How [`exec_blocking`] ended, when the run ran.
enum Done {
    /// The exit code (128+N for signal N) and whether the runner is idle
    /// in the pool again: still to be reported.
    Exited(i32, bool),
    /// The exit was reported already (before the caches' save).
    Reported,
}

/// Restores `run`'s declared caches into the leased runner and reports
/// `CachesRestored`; returns the runner's filesystem and the caches to
/// save after a successful exit, or the run's error (a key's file
/// missing).
fn restore_caches(
    agent: &NodeAgent,
    run: &Run,
    lease: &ember_pool::Lease,
    tx: &EventTx,
) -> Result<(RunnerFs, Vec<Prepared>), String> {
    let defaults = lease.defaults();
    let owner = (defaults.uid.unwrap_or(0), defaults.gid.unwrap_or(0));
    let pids = lease
        .cgroups()
        .procs()
        .map_err(|e| format!("caches: listing the runner's processes: {e}"))?;
    let fs = RunnerFs::of_init(&pids, &defaults.cwd, owner).map_err(|e| format!("caches: {e}"))?;
    let prepared = caches::prepare(run, &fs)?;
    let restored = tokio::runtime::Handle::current().block_on(caches::restore_all(
        agent.dircache.as_ref(),
        prepared,
        &fs,
    ));
    let _ = tx.send(Event::report(NodeReport::CachesRestored {
        notes: restored.notes,
    }));
    Ok((fs, restored.to_save))
}

/// Acquires a runner, restores the run's caches, runs the process, saves
/// the caches after a successful exit and releases the runner; returns
/// how it ended ([`Done`]), or why the run could not run.
fn exec_blocking(
    agent: &NodeAgent,
    run: &Run,
    record: &ImageRecord,
    handle: &RunHandle,
    tx: &EventTx,
) -> Result<Done, String> {
    let image = agent.runner_image(record)?;
    let argv = ember_runtime::spec::process_args(&image.config, Some(&run.command))
        .map_err(|e| format!("command: {}", ember_error::chain(&e)))?;
    // Runners are shared only within the run's recycling scope (its
    // deployment or recycling key); a plain run's spec has none, so the
    // pool gives it a never-used runner and destroys it afterwards.
    let spec = RunnerSpec::new(
        image,
        shape_of(&run.resources, run.readonly_rootfs),
        run.recycle_scope(),
    );
    let mut lease = agent
        .pool
        .acquire(&spec)
        .map_err(|e| format!("starting a runner: {}", ember_error::chain(&e)))?;
    agent.metrics.lease(lease.info().reused);
    if spec.recyclable() {
        agent
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(lease.key().as_str().to_owned(), run.warm_key());
    }
    let _ = tx.send(Event::report(NodeReport::RunnerReady));
    if handle.cancelled.load(Ordering::SeqCst) {
        agent.pool.release(lease, Outcome::Succeeded);
        return Err("cancelled before it started".into());
    }
    let mut to_save = None;
    if !run.caches.is_empty() {
        match restore_caches(agent, run, &lease, tx) {
            Ok(saving) => {
                // A restore can take a while: a cancel during it stops
                // the run before its process starts.
                if handle.cancelled.load(Ordering::SeqCst) {
                    agent.pool.release(lease, Outcome::Succeeded);
                    return Err("cancelled before it started".into());
                }
                to_save = Some(saving);
            }
            Err(e) => {
                // The runner is as healthy as before; the restore leaves
                // a cache's target as it was on failure.
                agent.pool.release(lease, Outcome::Succeeded);
                return Err(e);
            }
        }
    }
    let mut req = lease.command(argv);
    for (k, v) in &run.env {
        req.env.retain(|e| !e.starts_with(&format!("{k}=")));
        req.env.push(format!("{k}={v}"));
    }
    req.timeout_ms = run.timeout_ms;
    let canceller = lease.canceller();
    let result = lease.exec_with(
        &req,
        &mut |started| {
            *handle.exec.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((canceller.clone(), started.exec_id));
            let _ = tx.send(Event::report(NodeReport::Started));
            // A cancel that arrived between the check above and now.
            if handle.cancelled.load(Ordering::SeqCst) {
                let _ = canceller.cancel(started.exec_id, SIGKILL);
            }
        },
        &mut |is_stderr, data| {
            let stream = if is_stderr {
                LogStream::Stderr
            } else {
                LogStream::Stdout
            };
            let _ = tx.send(Event::Output(stream, data.to_vec()));
        },
    );
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            agent.pool.release(lease, Outcome::Failed);
            // The whole chain: "exec in runner ..." alone hides why the
            // agent refused (a bad environment entry, an argv it cannot
            // pass on).
            return Err(format!("exec: {}", ember_error::chain(&e)));
        }
    };
    // A non-zero exit is the program's answer, not a sign the runner is
    // damaged (the pool still health-checks it): keep it warm. Signals,
    // timeouts and cancels may leave it in any state: discard it.
    let outcome = if result.spawn_error.is_none()
        && !result.timed_out
        && !result.cancelled
        && result.signal.is_none()
    {
        Outcome::Succeeded
    } else {
        Outcome::Failed
    };
    let code = match (result.exit_code, result.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 255,
    };
    // Saved only after a clean exit 0, in writable mode, with a cache to
    // save to: the exit is reported first, so the run's end does not wait
    // for the upload, and the runner is released after it.
    if let (Some((fs, saving)), Some(client), None, 0) =
        (&to_save, agent.dircache.as_ref(), &result.spawn_error, code)
        && !saving.is_empty()
        && outcome == Outcome::Succeeded
    {
        let _ = tx.send(Event::report(NodeReport::Exited {
            code,
            runner_idle: false,
        }));
        tokio::runtime::Handle::current().block_on(caches::save_all(client, saving, fs));
        agent.pool.release(lease, outcome);
        return Ok(Done::Reported);
    }
    // Recycled: back in the pool idle (not discarded for its outcome, a
    // failed reset or the pool's budget).
    let runner_idle = matches!(agent.pool.release(lease, outcome), Released::Recycled);
    if let Some(e) = result.spawn_error {
        return Err(format!("starting the process: {e}"));
    }
    Ok(Done::Exited(code, runner_idle))
}

/// The runner shape for a run's (or a deployment's) resources and root
/// filesystem.
pub(crate) fn shape_of(resources: &Resources, readonly_rootfs: bool) -> RunnerShape {
    let mut shape = RunnerShape {
        readonly_rootfs,
        ..RunnerShape::default()
    };
    if resources.memory_bytes > 0 {
        shape.memory_bytes = i64::try_from(resources.memory_bytes).ok();
    }
    if resources.cpu_millis > 0 {
        shape.cpus = Some(f64::from(resources.cpu_millis) / 1000.0);
    }
    shape
}
