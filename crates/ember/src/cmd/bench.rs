//! `ember bench`: Ember's numbers next to the reference tools', measured in
//! the same run on the same machine.

use crate::cmd::pull::pull_image;
use crate::util::{RegistryArgs, quantile};
use anyhow::{Context, bail};
use ember_pool::{Outcome, Pool, PoolConfig, RunnerImage, RunnerShape, RunnerSpec};
use ember_runtime::{Container, ContainerStdio, RunOptions, RunSpec, Runc};
use ember_store::Store;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, ExitCode, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Benchmarks.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// No-op actions through recycled warm runners, against `runc exec`
    /// and `podman exec` loops on the same image.
    ///
    /// Each action is acquire + exec of `true` through the runner's agent +
    /// release (workspace reset included). Reported: actions per second,
    /// per-action latency (p50/p99), and dispatch latency: from the start
    /// of acquire until the agent reports the process started (its
    /// `execve` succeeded), as the client sees it. The peers run their
    /// loops sequentially into one running container of the same image.
    /// Runners live in `<root>/bench/`, apart from a node's pool.
    Warm(WarmArgs),
    /// N no-op runs submitted at once to a running control plane, against
    /// the node's raw warm-pool throughput measured in the same run.
    ///
    /// The runs (`true` in the image, one deployment with a recycling key
    /// so runners are reused) are submitted concurrently; once all are
    /// final their stored records give runs/s (first submit → last final
    /// state), the time to the first start and submit → started
    /// percentiles. Then the same action goes through a local warm pool
    /// (under `<root>/bench/`, as in `bench warm`) with as many threads as
    /// the cluster has slots, and the control plane's overhead is
    /// 1 − burst runs/s ÷ raw runs/s.
    Burst(crate::cmd::burst::Args),
}

/// Options of `ember bench warm`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  ember bench warm --image 127.0.0.1:5000/ember/busybox:latest\n  \
ember bench warm --image busybox --n 5000 --concurrency 2 --json\n  \
ember bench warm --image busybox --paused"
)]
pub struct WarmArgs {
    /// Image to run (pulled if it is not in the store). It needs `true` on
    /// its PATH, and `sleep` for the peers' long-running container.
    #[arg(long, value_name = "REF")]
    pub image: String,
    /// Actions through the pool.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    pub n: usize,
    /// Threads issuing actions at once (each with its own runner).
    #[arg(long, value_name = "C", default_value_t = 1)]
    pub concurrency: usize,
    /// Make every action find its runner frozen (delayed pause at 0, and
    /// an explicit freeze before each action), to show the cost of
    /// unfreezing. Latencies exclude the freeze; actions/s includes it.
    #[arg(long)]
    pub paused: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// `runc exec` iterations (0 skips the peer).
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub runc_n: usize,
    /// `podman exec` iterations (0 skips the peer).
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub podman_n: usize,
    /// Image reference podman pulls [default: --image]. Loopback
    /// registries are pulled with --tls-verify=false.
    #[arg(long, value_name = "REF")]
    pub podman_image: Option<String>,
    /// The static ember-agent binary [default: $EMBER_AGENT, or found next
    /// to this binary or in the cargo target directory].
    #[arg(long, value_name = "PATH", env = "EMBER_AGENT")]
    pub agent: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// Runs `ember bench`.
pub async fn run(root: &Path, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Warm(args) => warm(root, args).await,
        Command::Burst(args) => crate::cmd::burst::run(root, args).await,
    }
}

/// Latency figures of one loop, in milliseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct LoopStats {
    pub n: usize,
    pub actions_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
}

/// A peer's figures, or why it was skipped.
#[derive(Debug, serde::Serialize)]
struct Peer {
    #[serde(flatten)]
    stats: Option<LoopStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<String>,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    image: String,
    n: usize,
    concurrency: usize,
    paused: bool,
    actions_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
    dispatch_p50_ms: f64,
    dispatch_p99_ms: f64,
    acquire_p50_ms: f64,
    spawn_p50_ms: f64,
    /// Share of actions whose runner was frozen at acquire.
    frozen_share: f64,
    runners_created: u64,
    runc_exec: Peer,
    podman_exec: Peer,
    /// Pool actions/s over the peer's (the peers run sequentially).
    ratio_vs_runc_exec: Option<f64>,
    ratio_vs_podman_exec: Option<f64>,
    cpus: usize,
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn loop_stats(mut samples: Vec<Duration>, wall: Duration) -> LoopStats {
    samples.sort();
    let n = samples.len();
    let total: Duration = samples.iter().sum();
    LoopStats {
        n,
        actions_per_s: n as f64 / wall.as_secs_f64().max(1e-9),
        p50_ms: ms(quantile(&samples, 0.5)),
        p99_ms: ms(quantile(&samples, 0.99)),
        mean_ms: if n == 0 { 0.0 } else { ms(total) / n as f64 },
    }
}

/// Opens the store under `root` and returns it with `reference`'s image,
/// pulled first if it is not complete in the store.
pub(crate) async fn local_image(
    root: &Path,
    reference: &str,
    registry: &RegistryArgs,
    quiet: bool,
) -> anyhow::Result<(Store, RunnerImage)> {
    let store = Store::open(root).with_context(|| format!("opening store {}", root.display()))?;
    let local = {
        let index = store.read_index()?;
        store
            .resolve(&index, reference)
            .ok()
            .filter(|i| store.missing_layers(i).is_empty())
    };
    let record = match local {
        Some(r) => r,
        None => {
            pull_image(&store, reference, registry, quiet, false)
                .await
                .with_context(|| format!("pulling {reference}"))?
                .image
        }
    };
    let image = RunnerImage::from_store(&store, &record)?;
    Ok((store, image))
}

async fn warm(root: &Path, args: WarmArgs) -> anyhow::Result<ExitCode> {
    if args.n == 0 || args.concurrency == 0 {
        bail!("--n and --concurrency must be at least 1");
    }
    let agent = crate::cmd::cluster::find_agent(args.agent.clone())?;
    let (store, image) = local_image(root, &args.image, &args.registry, args.json).await?;
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || warm_blocking(&root, store, image, agent, args))
        .await
        .context("benchmark thread failed")?
}

/// One pool action's timings.
#[derive(Default)]
pub(crate) struct Sample {
    /// Acquire + exec + release.
    pub total: Duration,
    /// Acquire start → the agent reports the process started.
    pub dispatch: Duration,
    pub acquire: Duration,
    /// The agent's own spawn time.
    pub spawn: Duration,
    /// The runner was frozen at acquire.
    pub frozen: bool,
}

/// What [`measure_pool`] measured.
pub(crate) struct PoolMeasurement {
    pub samples: Vec<Sample>,
    /// Wall time of the timed loop (warm-up excluded).
    pub wall: Duration,
    /// Runners the pool created, warm-up included.
    pub runners_created: u64,
}

/// Runs `n` no-op actions (`true` in `image`) through a fresh warm pool
/// under `bench`, from `concurrency` threads each with its own runner,
/// after a warm-up of 20 actions per thread; the pool is shut down (its
/// runners destroyed) before this returns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn measure_pool(
    bench: &Path,
    runc: &Runc,
    store: Store,
    image: &RunnerImage,
    agent: &Path,
    n: usize,
    concurrency: usize,
    paused: bool,
    say: &dyn Fn(&str),
) -> anyhow::Result<PoolMeasurement> {
    let concurrency = concurrency.max(1);
    let mut cfg = PoolConfig::new(bench.join("pool"), runc.clone(), agent);
    cfg.store = Some(store);
    cfg.max_runners = concurrency * 2;
    cfg.pause_after = if paused {
        Some(Duration::ZERO)
    } else {
        // Never during the run: the figures are for unfrozen runners.
        None
    };
    let pool = Pool::new(cfg).context("starting the pool")?;
    let recovered = pool.recover().context("recovering an earlier bench")?;
    if !recovered.runners.is_empty() {
        say(&format!(
            "removed {} runners left by an earlier run",
            recovered.runners.len()
        ));
    }
    let result = pool_loops(&pool, image, n, concurrency, paused, say);
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

/// The warm-up and timed loops of [`measure_pool`].
fn pool_loops(
    pool: &Pool,
    image: &RunnerImage,
    n: usize,
    concurrency: usize,
    paused: bool,
    say: &dyn Fn(&str),
) -> anyhow::Result<(Vec<Sample>, Duration)> {
    let spec = RunnerSpec::new(image.clone(), RunnerShape::default(), Some("bench".into()));
    let action = |pool: &Pool| -> anyhow::Result<Sample> {
        if paused {
            // Outside the timing: the point is what a frozen runner costs
            // to reuse, not what freezing costs.
            pool.freeze_idle();
        }
        let t0 = Instant::now();
        let mut lease = pool.acquire(&spec)?;
        let acquired = t0.elapsed();
        let req = lease.command(["true"]);
        let mut started = None;
        let result =
            lease.exec_with(&req, &mut |_| started = Some(t0.elapsed()), &mut |_, _| {})?;
        let frozen = lease.info().was_frozen;
        let released = pool.release(lease, Outcome::of(&result));
        let total = t0.elapsed();
        if !result.success() {
            bail!("`true` failed in a runner: {result:?}");
        }
        if released != ember_pool::Released::Recycled {
            bail!("the runner was not recycled: {released:?}");
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
    std::thread::scope(|s| -> anyhow::Result<()> {
        let hs: Vec<_> = (0..concurrency)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    for _ in 0..20 {
                        action(pool)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("warm-up thread panicked"))??;
        }
        Ok(())
    })?;
    say(&format!("warm after {:.0} ms", ms(t.elapsed())));

    let next = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::with_capacity(n));
    let t = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let hs: Vec<_> = (0..concurrency)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
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
            h.join()
                .map_err(|_| anyhow::anyhow!("benchmark thread panicked"))??;
        }
        Ok(())
    })?;
    let wall = t.elapsed();
    let samples = samples.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok((samples, wall))
}

fn warm_blocking(
    root: &Path,
    store: Store,
    image: RunnerImage,
    agent: PathBuf,
    args: WarmArgs,
) -> anyhow::Result<ExitCode> {
    let bench = root.join("bench");
    let runc = Runc::new(bench.join("runc"));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };

    // --- the pool ---------------------------------------------------------
    say(&format!(
        "pool: {} actions of `true` in {}",
        args.n, args.image
    ));
    let PoolMeasurement {
        samples,
        wall,
        runners_created,
    } = measure_pool(
        &bench,
        &runc,
        store,
        &image,
        &agent,
        args.n,
        args.concurrency,
        args.paused,
        &say,
    )?;

    let frozen_share =
        samples.iter().filter(|s| s.frozen).count() as f64 / samples.len().max(1) as f64;
    let sorted = |f: fn(&Sample) -> Duration| {
        let mut v: Vec<Duration> = samples.iter().map(f).collect();
        v.sort();
        v
    };
    let dispatch = sorted(|s| s.dispatch);
    let acquire = sorted(|s| s.acquire);
    let spawn = sorted(|s| s.spawn);
    let main = loop_stats(samples.iter().map(|s| s.total).collect(), wall);
    say(&format!(
        "pool: {:.0} actions/s, p50 {:.3} ms, p99 {:.3} ms",
        main.actions_per_s, main.p50_ms, main.p99_ms
    ));

    // --- runc exec ----------------------------------------------------------
    let runc_exec = if args.runc_n == 0 {
        Peer {
            stats: None,
            skipped: Some("--runc-n 0".into()),
        }
    } else {
        say(&format!("runc exec loop ({} iterations) ...", args.runc_n));
        match runc_exec_loop(&bench, &runc, &image, args.runc_n) {
            Ok(s) => Peer {
                stats: Some(s),
                skipped: None,
            },
            Err(e) => Peer {
                stats: None,
                skipped: Some(format!("{e:#}")),
            },
        }
    };

    // --- podman exec --------------------------------------------------------
    let podman_exec = if args.podman_n == 0 {
        Peer {
            stats: None,
            skipped: Some("--podman-n 0".into()),
        }
    } else {
        say(&format!(
            "podman exec loop ({} iterations) ...",
            args.podman_n
        ));
        let reference = args.podman_image.as_deref().unwrap_or(&args.image);
        match podman_exec_loop(&bench, reference, args.podman_n) {
            Ok(s) => Peer {
                stats: Some(s),
                skipped: None,
            },
            Err(e) => Peer {
                stats: None,
                skipped: Some(format!("{e:#}")),
            },
        }
    };

    let ratio = |p: &Peer| {
        p.stats
            .as_ref()
            .map(|s| main.actions_per_s / s.actions_per_s.max(1e-9))
    };
    let report = Report {
        image: args.image.clone(),
        n: samples.len(),
        concurrency: args.concurrency,
        paused: args.paused,
        actions_per_s: main.actions_per_s,
        p50_ms: main.p50_ms,
        p99_ms: main.p99_ms,
        mean_ms: main.mean_ms,
        dispatch_p50_ms: ms(quantile(&dispatch, 0.5)),
        dispatch_p99_ms: ms(quantile(&dispatch, 0.99)),
        acquire_p50_ms: ms(quantile(&acquire, 0.5)),
        spawn_p50_ms: ms(quantile(&spawn, 0.5)),
        frozen_share,
        runners_created,
        ratio_vs_runc_exec: ratio(&runc_exec),
        ratio_vs_podman_exec: ratio(&podman_exec),
        runc_exec,
        podman_exec,
        cpus,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_text(r: &Report) {
    println!(
        "ember bench warm: {} actions of `true` in {}, concurrency {}{} ({} CPUs)",
        r.n,
        r.image,
        r.concurrency,
        if r.paused {
            ", every runner frozen at acquire"
        } else {
            ""
        },
        r.cpus
    );
    println!(
        "{:<14} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "", "actions/s", "p50 ms", "p99 ms", "mean ms", "ratio"
    );
    println!(
        "{:<14} {:>10.0} {:>10.3} {:>10.3} {:>10.3} {:>8}",
        "ember pool", r.actions_per_s, r.p50_ms, r.p99_ms, r.mean_ms, "1"
    );
    for (name, peer, ratio) in [
        ("runc exec", &r.runc_exec, r.ratio_vs_runc_exec),
        ("podman exec", &r.podman_exec, r.ratio_vs_podman_exec),
    ] {
        match (&peer.stats, &peer.skipped) {
            (Some(s), _) => println!(
                "{:<14} {:>10.1} {:>10.3} {:>10.3} {:>10.3} {:>8}",
                format!("{name} (n={})", s.n),
                s.actions_per_s,
                s.p50_ms,
                s.p99_ms,
                s.mean_ms,
                ratio.map_or("-".into(), |x| format!("{x:.0}x"))
            ),
            (None, why) => println!(
                "{name:<14} skipped: {}",
                why.as_deref().unwrap_or("unknown")
            ),
        }
    }
    println!(
        "dispatch (acquire → process started): p50 {:.3} ms, p99 {:.3} ms \
         [acquire p50 {:.3} ms, agent spawn p50 {:.3} ms]",
        r.dispatch_p50_ms, r.dispatch_p99_ms, r.acquire_p50_ms, r.spawn_p50_ms
    );
    println!(
        "runners created: {}; frozen at acquire: {:.0}%",
        r.runners_created,
        r.frozen_share * 100.0
    );
}

/// Times `n` sequential `runc exec <id> true` into one running container
/// of the image.
fn runc_exec_loop(
    bench: &Path,
    runc: &Runc,
    image: &RunnerImage,
    n: usize,
) -> anyhow::Result<LoopStats> {
    let id = format!("ember-bench-runc-{}", std::process::id());
    let dir = bench.join("containers").join(&id);
    let run = RunSpec {
        args: Some(vec!["sleep".into(), "86400".into()]),
        ..RunSpec::default()
    };
    // The image's Entrypoint would wrap `sleep`; the peer needs a plain
    // long-running process.
    let mut config = image.config.clone();
    let mut inner = config.config().clone();
    if let Some(c) = inner.as_mut() {
        c.set_entrypoint(None);
    }
    config.set_config(inner);
    let prepared = Container::new(runc.clone(), &id, &dir)
        .prepare(&image.layers, &config, &run)
        .context("preparing the runc exec container")?;
    let handle = prepared.handle();
    let runner = std::thread::spawn(move || {
        let r = prepared.run_with(RunOptions {
            stdio: ContainerStdio::null(),
            ..RunOptions::default()
        });
        drop(prepared);
        r
    });
    let result = (|| -> anyhow::Result<LoopStats> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = runc.state(&id)
                && s.status == ember_runtime::runc::ContainerStatus::Running
            {
                break;
            }
            if Instant::now() > deadline || runner.is_finished() {
                bail!("the runc exec container did not start");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let exec = || -> anyhow::Result<Duration> {
            let t = Instant::now();
            let status = Process::new(runc.binary())
                .arg("--root")
                .arg(runc.root())
                .args(["exec", &id, "true"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("running runc exec")?;
            let d = t.elapsed();
            if !status.success() {
                bail!("runc exec {id} true failed: {status}");
            }
            Ok(d)
        };
        exec()?; // warm-up
        let t = Instant::now();
        let samples = (0..n).map(|_| exec()).collect::<anyhow::Result<Vec<_>>>()?;
        Ok(loop_stats(samples, t.elapsed()))
    })();
    if let Err(e) = handle.cleanup() {
        tracing::warn!(error = %e, "removing the runc exec container");
    }
    let _ = runner.join();
    result
}

/// Times `n` sequential `podman exec NAME true` into a container of
/// `reference` in a throwaway podman store, with the flags podman needs on
/// this kind of machine.
fn podman_exec_loop(bench: &Path, reference: &str, n: usize) -> anyhow::Result<LoopStats> {
    let dir = bench.join(format!("podman-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let base: Vec<String> = vec![
        "--root".into(),
        dir.join("root").display().to_string(),
        "--runroot".into(),
        dir.join("runroot").display().to_string(),
        "--tmpdir".into(),
        dir.join("tmp").display().to_string(),
        "--runtime".into(),
        "runc".into(),
        "--cgroup-manager".into(),
        "cgroupfs".into(),
        "--events-backend".into(),
        "file".into(),
    ];
    let podman = |extra: &[&str]| -> anyhow::Result<String> {
        let out = Process::new("podman")
            .args(&base)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .context("running podman")?;
        if !out.status.success() {
            bail!(
                "podman {} failed: {}",
                extra.first().copied().unwrap_or(""),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let name = format!("ember-bench-{}", std::process::id());
    let result = (|| -> anyhow::Result<LoopStats> {
        let loopback = reference.starts_with("127.") || reference.starts_with("localhost");
        let tls = if loopback {
            "--tls-verify=false"
        } else {
            "--tls-verify=true"
        };
        podman(&["pull", "-q", tls, reference])?;
        podman(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--entrypoint",
            "",
            reference,
            "sleep",
            "86400",
        ])?;
        let exec = || -> anyhow::Result<Duration> {
            let t = Instant::now();
            podman(&["exec", &name, "true"])?;
            Ok(t.elapsed())
        };
        exec()?; // warm-up
        let t = Instant::now();
        let samples = (0..n).map(|_| exec()).collect::<anyhow::Result<Vec<_>>>()?;
        Ok(loop_stats(samples, t.elapsed()))
    })();
    // Everything podman made lives under `dir`: remove the container, let
    // podman undo its storage mounts, then remove the directory.
    let _ = podman(&["rm", "-f", "-t", "0", &name]);
    let _ = podman(&["system", "reset", "-f"]);
    if let Ok(points) = ember_runtime::mount::mounts_under(&dir) {
        for p in points {
            let _ = ember_runtime::mount::unmount(&p);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_nearest_ranks() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Duration::from_millis(51));
        assert_eq!(quantile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(quantile::<Duration>(&[], 0.5), Duration::ZERO);
        let s = loop_stats(v, Duration::from_secs(2));
        assert_eq!(s.n, 100);
        assert!((s.actions_per_s - 50.0).abs() < 1e-9);
        assert!((s.mean_ms - 50.5).abs() < 1e-9);
    }
}
