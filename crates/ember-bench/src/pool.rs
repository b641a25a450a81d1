//! The raw warm-pool measurement both benchmarks share: a command run
//! many times through recycled runners of a private pool, from a few
//! threads at once, timed per action.

use crate::{Say, show_command};
use ember_pool::{
    Outcome, Pool, PoolConfig, PoolError, Released, RunnerImage, RunnerShape, RunnerSpec,
};
use ember_runtime::Runc;
use ember_store::Store;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Warm-up actions per thread before the timed loop.
const WARMUP_PER_THREAD: usize = 20;

/// The most stderr of a failed action kept for its error.
const STDERR_KEPT: usize = 512;

/// Errors of the pool measurement.
#[derive(Debug, thiserror::Error)]
pub enum PoolBenchError {
    /// The pool could not be set up.
    #[error("starting the bench pool")]
    Start(#[source] PoolError),
    /// Runners an earlier bench left could not be removed.
    #[error("recovering an earlier bench's runners")]
    Recover(#[source] PoolError),
    /// No runner could be had.
    #[error("acquiring a runner")]
    Acquire(#[source] PoolError),
    /// The command could not be sent to the runner or its answer read.
    #[error("running `{command}` in a runner")]
    Exec {
        /// The command.
        command: String,
        /// Why.
        #[source]
        source: PoolError,
    },
    /// The command ran and did not succeed.
    #[error("`{command}` failed in a runner ({status}){}", stderr_suffix(stderr))]
    Failed {
        /// The command.
        command: String,
        /// How it ended (`exit 3`, `signal 9`, ...).
        status: String,
        /// The start of what it wrote to stderr.
        stderr: String,
    },
    /// The runner was discarded instead of recycled, so the loop would
    /// measure runner creation.
    #[error("the runner was not recycled: {0}")]
    NotRecycled(String),
    /// A thread of the loop panicked.
    #[error("a benchmark thread panicked")]
    Panicked,
}

fn stderr_suffix(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(": {s}")
    }
}

/// One pool action's timings.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    /// Acquire + exec + release.
    pub total: Duration,
    /// Acquire start → the agent reports the process started.
    pub dispatch: Duration,
    /// Acquire alone.
    pub acquire: Duration,
    /// The agent's own spawn time.
    pub spawn: Duration,
    /// The runner was frozen at acquire.
    pub frozen: bool,
}

/// What [`measure_pool`] measured.
#[derive(Debug)]
pub struct PoolMeasurement {
    /// One per timed action.
    pub samples: Vec<Sample>,
    /// Wall time of the timed loop (warm-up excluded).
    pub wall: Duration,
    /// Runners the pool created, warm-up included.
    pub runners_created: u64,
}

/// What [`measure_pool`] runs and how.
#[derive(Debug, Clone)]
pub struct PoolRun<'a> {
    /// The bench's directory (`<root>/bench`); the pool lives in `pool/`.
    pub bench: &'a Path,
    /// The runtime, rooted under `bench`.
    pub runc: &'a Runc,
    /// The image the runners run.
    pub image: &'a RunnerImage,
    /// The static agent binary.
    pub agent: &'a Path,
    /// The command of every action, run as given (the image's Entrypoint
    /// is not applied).
    pub command: &'a [String],
    /// Timed actions.
    pub n: usize,
    /// Threads issuing actions at once, each with its own runner.
    pub concurrency: usize,
    /// Freeze the idle runners before every action (outside the timing),
    /// so each action finds its runner frozen.
    pub paused: bool,
}

/// Runs `run.n` actions through a fresh warm pool under `run.bench`, from
/// `run.concurrency` threads each with its own runner, after a warm-up of
/// 20 actions per thread; the pool is shut down (its runners destroyed)
/// before this returns.
pub fn measure_pool(
    run: &PoolRun<'_>,
    store: Store,
    say: &Say,
) -> Result<PoolMeasurement, PoolBenchError> {
    let concurrency = run.concurrency.max(1);
    let mut cfg = PoolConfig::new(run.bench.join("pool"), run.runc.clone(), run.agent);
    cfg.store = Some(store);
    cfg.max_runners = concurrency * 2;
    cfg.pause_after = if run.paused {
        Some(Duration::ZERO)
    } else {
        // Never during the run: the figures are for unfrozen runners.
        None
    };
    let pool = Pool::new(cfg).map_err(PoolBenchError::Start)?;
    let recovered = pool.recover().map_err(PoolBenchError::Recover)?;
    if !recovered.runners.is_empty() {
        say(&format!(
            "removed {} runners left by an earlier run",
            recovered.runners.len()
        ));
    }
    let result = pool_loops(&pool, run, concurrency, say);
    let runners_created = pool.stats().created;
    pool.shutdown();
    drop(pool);
    let (samples, wall) = result?;
    Ok(PoolMeasurement {
        samples,
        wall,
        runners_created,
    })
}

/// How an exec ended, in words.
fn status(r: &ember_pool::ExecResult) -> String {
    if let Some(e) = &r.spawn_error {
        format!("could not start: {e}")
    } else if r.timed_out {
        "timed out".into()
    } else if let Some(s) = r.signal {
        format!("signal {s}")
    } else {
        format!("exit {}", r.exit_code.unwrap_or(-1))
    }
}

/// The warm-up and timed loops of [`measure_pool`].
fn pool_loops(
    pool: &Pool,
    run: &PoolRun<'_>,
    concurrency: usize,
    say: &Say,
) -> Result<(Vec<Sample>, Duration), PoolBenchError> {
    let spec = RunnerSpec::new(
        run.image.clone(),
        RunnerShape::default(),
        Some("bench".into()),
    );
    let action = |pool: &Pool| -> Result<Sample, PoolBenchError> {
        if run.paused {
            // Outside the timing: the point is what a frozen runner costs
            // to reuse, not what freezing costs.
            pool.freeze_idle();
        }
        let t0 = Instant::now();
        let mut lease = pool.acquire(&spec).map_err(PoolBenchError::Acquire)?;
        let acquired = t0.elapsed();
        let req = lease.command(run.command.iter().cloned());
        let mut started = None;
        let mut stderr = Vec::new();
        let result = lease
            .exec_with(
                &req,
                &mut |_| started = Some(t0.elapsed()),
                &mut |is_err, b| {
                    // Kept only to explain a failure; a successful action's
                    // output is dropped, as a run's would be by a no-op client.
                    if is_err && stderr.len() < STDERR_KEPT {
                        let room = STDERR_KEPT - stderr.len();
                        stderr.extend_from_slice(&b[..b.len().min(room)]);
                    }
                },
            )
            .map_err(|source| PoolBenchError::Exec {
                command: show_command(run.command),
                source,
            })?;
        let frozen = lease.info().was_frozen;
        let released = pool.release(lease, Outcome::of(&result));
        let total = t0.elapsed();
        if !result.success() {
            return Err(PoolBenchError::Failed {
                command: show_command(run.command),
                status: status(&result),
                stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
            });
        }
        if released != Released::Recycled {
            return Err(PoolBenchError::NotRecycled(format!("{released:?}")));
        }
        Ok(Sample {
            total,
            dispatch: started.unwrap_or(total),
            acquire: acquired,
            spawn: Duration::from_micros(result.spawn_us),
            frozen,
        })
    };

    // Warm up: one runner per thread, created at once, then a few rounds
    // so caches and the allocator settle.
    say(&format!("warming {concurrency} runner(s) ..."));
    let t = Instant::now();
    std::thread::scope(|s| -> Result<(), PoolBenchError> {
        let hs: Vec<_> = (0..concurrency)
            .map(|_| {
                s.spawn(|| -> Result<(), PoolBenchError> {
                    for _ in 0..WARMUP_PER_THREAD {
                        action(pool)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join().map_err(|_| PoolBenchError::Panicked)??;
        }
        Ok(())
    })?;
    say(&format!(
        "warm after {:.0} ms",
        crate::stats::ms(t.elapsed())
    ));

    let n = run.n;
    let next = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::with_capacity(n));
    let t = Instant::now();
    std::thread::scope(|s| -> Result<(), PoolBenchError> {
        let hs: Vec<_> = (0..concurrency)
            .map(|_| {
                s.spawn(|| -> Result<(), PoolBenchError> {
                    let mut mine = Vec::with_capacity(n / concurrency + 1);
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        mine.push(action(pool)?);
                    }
                    samples
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(mine);
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join().map_err(|_| PoolBenchError::Panicked)??;
        }
        Ok(())
    })?;
    let wall = t.elapsed();
    let samples = samples.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok((samples, wall))
}
