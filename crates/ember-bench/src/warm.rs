//! `ember bench warm`: Ember's warm-pool actions next to the reference
//! tools' (`runc exec`, `podman exec`), measured in the same run on the
//! same machine.

use crate::pool::{PoolBenchError, PoolMeasurement, PoolRun, Sample, measure_pool};
use crate::stats::{LoopStats, loop_stats, ms, quantile};
use crate::{Say, error_chain, show_command};
use ember_pool::RunnerImage;
use ember_runtime::{Container, ContainerStdio, RunOptions, RunSpec, Runc};
use ember_store::Store;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

/// How long the `runc exec` peer's container may take to start.
const PEER_START: Duration = Duration::from_secs(20);

/// What `ember bench warm` measures.
#[derive(Debug, Clone)]
pub struct WarmConfig {
    /// The image's reference, as given (for the report, and for podman
    /// unless `podman_image` is set).
    pub image: String,
    /// The bench's directory (`<root>/bench`), apart from a node's pool.
    pub bench: PathBuf,
    /// The static agent binary.
    pub agent: PathBuf,
    /// The command of every action, pool and peers alike.
    pub command: Vec<String>,
    /// Actions through the pool.
    pub n: usize,
    /// Threads issuing actions at once.
    pub concurrency: usize,
    /// Every action finds its runner frozen.
    pub paused: bool,
    /// `runc exec` iterations (0 skips the peer).
    pub runc_n: usize,
    /// `podman exec` iterations (0 skips the peer).
    pub podman_n: usize,
    /// The reference podman pulls [default: `image`].
    pub podman_image: Option<String>,
}

impl WarmConfig {
    /// Checks the settings, so that a caller can refuse them before
    /// pulling the image; [`run`] checks them too.
    pub fn validate(&self) -> Result<(), WarmError> {
        if self.n == 0 || self.concurrency == 0 {
            return Err(WarmError::Config(
                "--n and --concurrency must be at least 1",
            ));
        }
        if self.command.is_empty() {
            return Err(WarmError::Config("the command is empty"));
        }
        Ok(())
    }
}

/// Errors of `ember bench warm` (a peer's failure is not one: the report
/// says why it was skipped).
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    /// A setting is out of range.
    #[error("invalid benchmark settings: {0}")]
    Config(&'static str),
    /// The pool measurement failed.
    #[error("the pool measurement")]
    Pool(#[from] PoolBenchError),
}

/// Why a peer's loop could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The `runc exec` peer's long-running container.
    #[error("preparing the runc exec container")]
    Prepare(#[source] ember_runtime::ContainerError),
    /// It did not reach `running`.
    #[error("the runc exec container did not start")]
    NotStarted,
    /// A peer's program could not be started.
    #[error("running {program}")]
    Spawn {
        /// The program.
        program: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A peer's step failed.
    #[error("{what} failed: {detail}")]
    Failed {
        /// The step (`runc exec ID CMD`, `podman pull`).
        what: String,
        /// Its status or stderr.
        detail: String,
    },
    /// Its scratch directory.
    #[error("creating {0}")]
    Dir(PathBuf, #[source] std::io::Error),
}

/// A peer's figures, or why it was skipped.
#[derive(Debug, serde::Serialize)]
pub struct Peer {
    /// Its loop's figures.
    #[serde(flatten)]
    pub stats: Option<LoopStats>,
    /// Why there are none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

impl Peer {
    fn skipped(why: impl Into<String>) -> Peer {
        Peer {
            stats: None,
            skipped: Some(why.into()),
        }
    }

    fn of(r: Result<LoopStats, PeerError>) -> Peer {
        match r {
            Ok(s) => Peer {
                stats: Some(s),
                skipped: None,
            },
            Err(e) => Peer::skipped(error_chain(&e)),
        }
    }
}

/// The report of `ember bench warm` (its JSON is what the README quotes).
#[derive(Debug, serde::Serialize)]
pub struct WarmReport {
    /// The image, as given.
    pub image: String,
    /// The command of every action.
    pub command: Vec<String>,
    /// Timed pool actions.
    pub n: usize,
    /// Threads.
    pub concurrency: usize,
    /// Every runner was frozen at acquire.
    pub paused: bool,
    /// Pool actions per second.
    pub actions_per_s: f64,
    /// Per action (acquire + exec + release).
    pub p50_ms: f64,
    /// 99th percentile action.
    pub p99_ms: f64,
    /// Mean action.
    pub mean_ms: f64,
    /// Acquire start → process started, median.
    pub dispatch_p50_ms: f64,
    /// Likewise, 99th percentile.
    pub dispatch_p99_ms: f64,
    /// Acquire alone, median.
    pub acquire_p50_ms: f64,
    /// The agent's spawn, median.
    pub spawn_p50_ms: f64,
    /// Share of actions whose runner was frozen at acquire.
    pub frozen_share: f64,
    /// Runners the pool created.
    pub runners_created: u64,
    /// `runc exec` loop.
    pub runc_exec: Peer,
    /// `podman exec` loop.
    pub podman_exec: Peer,
    /// Pool actions/s over the peer's (the peers run sequentially).
    pub ratio_vs_runc_exec: Option<f64>,
    /// Likewise for podman.
    pub ratio_vs_podman_exec: Option<f64>,
    /// CPUs of this machine.
    pub cpus: usize,
}

/// Runs the benchmark (blocking: call it from a thread that may block).
/// `store` holds `image`'s layers.
pub fn run(
    cfg: &WarmConfig,
    store: Store,
    image: &RunnerImage,
    say: &Say,
) -> Result<WarmReport, WarmError> {
    cfg.validate()?;
    let runc = Runc::new(cfg.bench.join("runc"));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shown = show_command(&cfg.command);

    // --- the pool ---------------------------------------------------------
    say(&format!(
        "pool: {} actions of `{shown}` in {}",
        cfg.n, cfg.image
    ));
    let PoolMeasurement {
        samples,
        wall,
        runners_created,
    } = measure_pool(
        &PoolRun {
            bench: &cfg.bench,
            runc: &runc,
            image,
            agent: &cfg.agent,
            command: &cfg.command,
            n: cfg.n,
            concurrency: cfg.concurrency,
            paused: cfg.paused,
        },
        store,
        say,
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
    let runc_exec = if cfg.runc_n == 0 {
        Peer::skipped("--runc-n 0")
    } else {
        say(&format!("runc exec loop ({} iterations) ...", cfg.runc_n));
        Peer::of(runc_exec_loop(
            &cfg.bench,
            &runc,
            image,
            &cfg.command,
            cfg.runc_n,
        ))
    };

    // --- podman exec --------------------------------------------------------
    let podman_exec = if cfg.podman_n == 0 {
        Peer::skipped("--podman-n 0")
    } else {
        say(&format!(
            "podman exec loop ({} iterations) ...",
            cfg.podman_n
        ));
        let reference = cfg.podman_image.as_deref().unwrap_or(&cfg.image);
        Peer::of(podman_exec_loop(
            &cfg.bench,
            reference,
            &cfg.command,
            cfg.podman_n,
        ))
    };

    let ratio = |p: &Peer| {
        p.stats
            .as_ref()
            .map(|s| main.actions_per_s / s.actions_per_s.max(1e-9))
    };
    Ok(WarmReport {
        image: cfg.image.clone(),
        command: cfg.command.clone(),
        n: samples.len(),
        concurrency: cfg.concurrency,
        paused: cfg.paused,
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
    })
}

impl fmt::Display for WarmReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self;
        writeln!(
            f,
            "ember bench warm: {} actions of `{}` in {}, concurrency {}{} ({} CPUs)",
            r.n,
            show_command(&r.command),
            r.image,
            r.concurrency,
            if r.paused {
                ", every runner frozen at acquire"
            } else {
                ""
            },
            r.cpus
        )?;
        writeln!(
            f,
            "{:<14} {:>10} {:>10} {:>10} {:>10} {:>8}",
            "", "actions/s", "p50 ms", "p99 ms", "mean ms", "ratio"
        )?;
        writeln!(
            f,
            "{:<14} {:>10.0} {:>10.3} {:>10.3} {:>10.3} {:>8}",
            "ember pool", r.actions_per_s, r.p50_ms, r.p99_ms, r.mean_ms, "1"
        )?;
        for (name, peer, ratio) in [
            ("runc exec", &r.runc_exec, r.ratio_vs_runc_exec),
            ("podman exec", &r.podman_exec, r.ratio_vs_podman_exec),
        ] {
            match (&peer.stats, &peer.skipped) {
                (Some(s), _) => writeln!(
                    f,
                    "{:<14} {:>10.1} {:>10.3} {:>10.3} {:>10.3} {:>8}",
                    format!("{name} (n={})", s.n),
                    s.actions_per_s,
                    s.p50_ms,
                    s.p99_ms,
                    s.mean_ms,
                    ratio.map_or("-".into(), |x| format!("{x:.0}x"))
                )?,
                (None, why) => writeln!(
                    f,
                    "{name:<14} skipped: {}",
                    why.as_deref().unwrap_or("unknown")
                )?,
            }
        }
        writeln!(
            f,
            "dispatch (acquire → process started): p50 {:.3} ms, p99 {:.3} ms \
             [acquire p50 {:.3} ms, agent spawn p50 {:.3} ms]",
            r.dispatch_p50_ms, r.dispatch_p99_ms, r.acquire_p50_ms, r.spawn_p50_ms
        )?;
        writeln!(
            f,
            "runners created: {}; frozen at acquire: {:.0}%",
            r.runners_created,
            r.frozen_share * 100.0
        )
    }
}

/// Times `n` sequential `runc exec <id> CMD` into one running container
/// of the image.
fn runc_exec_loop(
    bench: &Path,
    runc: &Runc,
    image: &RunnerImage,
    command: &[String],
    n: usize,
) -> Result<LoopStats, PeerError> {
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
        .map_err(PeerError::Prepare)?;
    let handle = prepared.handle();
    let runner = std::thread::spawn(move || {
        let r = prepared.run_with(RunOptions {
            stdio: ContainerStdio::null(),
            ..RunOptions::default()
        });
        drop(prepared);
        r
    });
    let result = (|| -> Result<LoopStats, PeerError> {
        let deadline = Instant::now() + PEER_START;
        loop {
            if let Ok(s) = runc.state(&id)
                && s.status == ember_runtime::runc::ContainerStatus::Running
            {
                break;
            }
            if Instant::now() > deadline || runner.is_finished() {
                return Err(PeerError::NotStarted);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let exec = || -> Result<Duration, PeerError> {
            let t = Instant::now();
            let status = Process::new(runc.binary())
                .arg("--root")
                .arg(runc.root())
                .args(["exec", &id])
                .args(command)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|source| PeerError::Spawn {
                    program: "runc exec",
                    source,
                })?;
            let d = t.elapsed();
            if !status.success() {
                return Err(PeerError::Failed {
                    what: format!("runc exec {id} {}", show_command(command)),
                    detail: status.to_string(),
                });
            }
            Ok(d)
        };
        exec()?; // warm-up
        let t = Instant::now();
        let samples = (0..n).map(|_| exec()).collect::<Result<Vec<_>, _>>()?;
        Ok(loop_stats(samples, t.elapsed()))
    })();
    if let Err(e) = handle.cleanup() {
        tracing::warn!(error = %ember_error::chain(&e), "removing the runc exec container");
    }
    let _ = runner.join();
    result
}

/// Times `n` sequential `podman exec NAME CMD` into a container of
/// `reference` in a throwaway podman store, with the flags podman needs on
/// this kind of machine.
fn podman_exec_loop(
    bench: &Path,
    reference: &str,
    command: &[String],
    n: usize,
) -> Result<LoopStats, PeerError> {
    let dir = bench.join(format!("podman-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| PeerError::Dir(dir.clone(), e))?;
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
    let podman = |extra: &[&str]| -> Result<String, PeerError> {
        let out = Process::new("podman")
            .args(&base)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| PeerError::Spawn {
                program: "podman",
                source,
            })?;
        if !out.status.success() {
            return Err(PeerError::Failed {
                what: format!("podman {}", extra.first().copied().unwrap_or("")),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let name = format!("ember-bench-{}", std::process::id());
    let result = (|| -> Result<LoopStats, PeerError> {
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
        let mut exec_args = vec!["exec", name.as_str()];
        exec_args.extend(command.iter().map(String::as_str));
        let exec = || -> Result<Duration, PeerError> {
            let t = Instant::now();
            podman(&exec_args)?;
            Ok(t.elapsed())
        };
        exec()?; // warm-up
        let t = Instant::now();
        let samples = (0..n).map(|_| exec()).collect::<Result<Vec<_>, _>>()?;
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
