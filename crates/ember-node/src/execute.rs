//! Executing one assigned run, on a blocking thread through the warm pool:
//!
//! ```text
//! Assign ─► [Accepted ─► pull, only if the image is not here] ─► ImageReady
//!        ─► pool.acquire(key) ─► RunnerReady ─► exec ─► Started ─► output → logs endpoint
//!        ─► release (runner back to idle) ─► Exited { code, runner_idle }
//! ```
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
            tracing::warn!(error = %e, "cancelling an exec");
        }
        let snapshot_exec = self
            .snapshot_exec
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some((socket, id)) = snapshot_exec
            && let Err(e) = crate::snapshot::signal_exec(&socket, id, SIGKILL)
        {
            tracing::warn!(error = %e, "cancelling a snapshot run's exec");
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
            .map_err(|e| format!("reading the image config: {e}"))?;
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
            // beside) the node's checkpoint, outside the pool.
            let done = if run.snapshot.is_some() {
                crate::snapshot::deploy::exec_snapshot(&agent, &run, &record, &handle, &tx)
            } else {
                exec_blocking(&agent, &run, &record, &handle, &tx)
            };
            let last = match done {
                Ok((code, runner_idle)) => NodeReport::Exited { code, runner_idle },
                Err(error) => NodeReport::Failed { error },
            };
            let _ = tx.send(Event::report(last));
        })
    };
    // A final report relayed means the executor ran to its end: only a
    // panic would make its join say more, so the task need not wait (a
    // wake-up) for the blocking thread to finish.
    let finished = relay::relay(agent, id, at, rx).await;
    if finished {
        drop(exec);
    } else if let Err(e) = exec.await {
        agent
            .report(
                id,
                at,
                NodeReport::Failed {
                    error: format!("executor failed: {e}"),
                },
            )
            .await;
    }
    // The runner's idle again (or gone): the next heartbeat says so.
    agent.inventory_changed.notify_one();
}

/// Acquires a runner, runs the process and releases the runner; returns
/// the exit code (128+N for signal N) and whether the runner is idle in
/// the pool again, or why the run could not run.
fn exec_blocking(
    agent: &NodeAgent,
    run: &Run,
    record: &ImageRecord,
    handle: &RunHandle,
    tx: &EventTx,
) -> Result<(i32, bool), String> {
    let image = agent.runner_image(record)?;
    let argv = ember_runtime::spec::process_args(&image.config, Some(&run.command))
        .map_err(|e| format!("command: {e}"))?;
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
        .map_err(|e| format!("starting a runner: {e}"))?;
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
            return Err(format!("exec: {}", ember_api::client::error_chain(&e)));
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
    // Recycled: back in the pool idle (not discarded for its outcome, a
    // failed reset or the pool's budget).
    let runner_idle = matches!(agent.pool.release(lease, outcome), Released::Recycled);
    if let Some(e) = result.spawn_error {
        return Err(format!("starting the process: {e}"));
    }
    let code = match (result.exit_code, result.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 255,
    };
    Ok((code, runner_idle))
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
