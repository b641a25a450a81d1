//! `ember run`: pull if needed, mount, start with runc, stream output, exit
//! with the container's code.

use crate::cmd::pull::pull_for;
use crate::progress::Progress;
use crate::util::{RegistryArgs, parse_size};
use anyhow::{Context, bail};
use ember_node::images::{ImageError, ReadyImage, find_local, resolve_or_pull};
use ember_runtime::{Container, ContainerStdio, Input, Output, RunOptions, RunSpec, Runc};
use ember_store::Store;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Run a command in a new container.
///
/// The image is pulled if it is not in the store. The root filesystem is an
/// overlay of the stored layers (nothing is copied); the container gets its
/// own pid, mount, ipc, uts and network namespaces (no network but
/// loopback) and runs with runc. Output streams through; ember exits with
/// the container's exit code (128+N if killed by signal N, 125 if ember
/// itself failed). Mounts, runc state and the container directory are
/// removed on exit, on Ctrl-C and on timeout.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  ember run --rm busybox echo hi\n  \
ember run --timings --memory 256M --cpus 0.5 127.0.0.1:5000/app:v1 -- ./job --fast\n  \
ember run --snapshot slow --timings -- hello world")]
pub struct Args {
    /// Remove the container when it exits (always the case today: Ember
    /// does not keep stopped containers; accepted for Docker compatibility).
    #[arg(long)]
    pub rm: bool,
    /// Print where the start time went on stderr; `--timings=json` prints
    /// one JSON object instead.
    #[arg(long, value_name = "FORMAT", num_args = 0..=1, require_equals = true, default_missing_value = "text")]
    pub timings: Option<TimingsFormat>,
    /// Set an environment variable (repeatable).
    #[arg(short, long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// User (name, uid, name:group or uid:gid) to run as.
    #[arg(short, long)]
    pub user: Option<String>,
    /// Memory limit, e.g. 256M.
    #[arg(short, long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// CPU limit in CPUs, e.g. 0.5.
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,
    /// Maximum number of processes in the container.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub pids_limit: i64,
    /// Kill the container after this many seconds (exit code 137).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// After forwarding SIGINT/SIGTERM (Ctrl-C), how many seconds the
    /// container gets to exit before it is killed; a second Ctrl-C kills
    /// at once. A shell as PID 1 ignores SIGINT, so without this Ctrl-C
    /// could not stop it.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub stop_timeout: f64,
    /// Pull the image even if it is in the store.
    #[arg(long)]
    pub pull: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Start from snapshot NAME (`ember snapshot create`) instead of an
    /// image: a copy of its checkpoint is restored and its parked start-up
    /// resumed with the run's arguments (the positional arguments; no
    /// IMAGE) and `--env`. When the checkpoint cannot be used here (CRIU
    /// missing, another kernel, CRIU version or CPU, a corrupt artifact),
    /// this says why and falls back to a fresh start of the start-up.
    #[arg(long, value_name = "NAME")]
    pub snapshot: Option<String>,
    /// With --snapshot: fail (exit 125) instead of falling back to a fresh
    /// start when the snapshot cannot be restored.
    #[arg(long, requires = "snapshot")]
    pub no_fallback: bool,
    /// With --snapshot: the CRIU binary.
    #[arg(long, value_name = "PATH", env = "EMBER_CRIU")]
    pub criu: Option<std::path::PathBuf>,
    /// Image reference (not with --snapshot).
    #[arg(value_name = "IMAGE", required_unless_present = "snapshot")]
    pub image: Option<String>,
    /// Command and arguments (replace the image's Cmd; its Entrypoint stays).
    #[arg(
        value_name = "CMD",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

/// Output format of `--timings`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimingsFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object.
    Json,
}

/// Start-time breakdown of one run, in milliseconds.
#[derive(Debug, Default, serde::Serialize)]
struct RunTimings {
    resolve_ms: f64,
    pull_ms: f64,
    unpack_ms: f64,
    mount_ms: f64,
    create_ms: f64,
    start_ms: Option<f64>,
    first_output_ms: Option<f64>,
    exit_ms: f64,
    cleanup_ms: f64,
    total_ms: f64,
    pulled: bool,
    exit_code: i32,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn container_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("ember-{}-{:08x}", std::process::id(), nanos)
}

/// Copies a pipe to our own stream, noting when the first byte arrived.
fn forward(from: OwnedFd, mut to: impl Write + Send + 'static, first: Arc<OnceLock<Instant>>) {
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(from);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = first.set(Instant::now());
                    if to.write_all(&buf[..n]).and_then(|_| to.flush()).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Runs `ember run`.
pub async fn run(root: &Path, mut args: Args) -> anyhow::Result<ExitCode> {
    if let Some(name) = args.snapshot.clone() {
        return crate::cmd::snapshot::run_snapshot(root, &name, args).await;
    }
    let image_ref = args.image.take().context("IMAGE is required")?;
    let t0 = Instant::now();
    let mut t = RunTimings::default();
    let env = args
        .env
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("invalid --env {kv:?}: expected KEY=VALUE"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let memory = args.memory.as_deref().map(parse_size).transpose()?;
    if let Some(c) = args.cpus
        && !(c > 0.0 && c.is_finite())
    {
        bail!("invalid --cpus {c}: must be a positive number");
    }
    if let Some(w) = &args.workdir
        && !w.starts_with('/')
    {
        bail!("invalid --workdir {w:?}: must be an absolute path");
    }

    // Resolve locally, pull if missing.
    let store = Store::open(root).with_context(|| format!("opening store {}", root.display()))?;
    let local = if args.pull {
        None
    } else {
        find_local(&store, &image_ref)?
    };
    t.resolve_ms = ms(t0.elapsed());
    let mut progress = None;
    let ready = resolve_or_pull(&store, local, || {
        let mut pull = pull_for(&image_ref, &args.registry, false)?;
        let p = Arc::new(Progress::new(args.timings.is_some()));
        pull.progress = p.clone();
        progress = Some(p);
        Ok::<_, anyhow::Error>(pull)
    })
    .await;
    if let Some(p) = progress {
        p.finish();
    }
    let image = match ready {
        Ok(ReadyImage::Local(image)) => image,
        Ok(ReadyImage::Pulled(report)) => {
            t.pulled = true;
            t.resolve_ms += ms(report.timings.resolve);
            t.pull_ms = ms(report.timings.fetch);
            t.unpack_ms = ms(report.timings.unpack + report.timings.commit);
            report.image
        }
        Err(ImageError::Setup(e)) => return Err(e.context(format!("pulling {image_ref}"))),
        Err(ImageError::Pull { source, .. }) => {
            return Err(anyhow::Error::new(*source).context(format!("pulling {image_ref}")));
        }
    };
    let config = store.image_config(&image)?;
    let layers = store.layer_dirs(&image);
    let id = container_id();
    // Claim the image first so a concurrent `ember gc` leaves it alone.
    let claim = store.claim_image(&id, &image.manifest)?;
    let result = run_container(
        root, &args, &image_ref, &id, &layers, &config, env, memory, &mut t, t0,
    )
    .await;
    drop(claim);
    if let Err(e) = store.touch(&image.manifest) {
        tracing::warn!(error = %ember_error::chain(&e), "could not update the image's last use");
    }
    let code = result?;
    t.exit_code = code;
    t.total_ms = ms(t0.elapsed());
    match args.timings {
        Some(TimingsFormat::Json) => eprintln!("{}", serde_json::to_string(&t)?),
        Some(TimingsFormat::Text) => {
            let opt = |v: Option<f64>| v.map(|x| format!("{x:.1} ms")).unwrap_or("-".into());
            eprintln!(
                "timings: resolve {:.1} ms | pull {:.1} ms | unpack {:.1} ms | mount {:.1} ms | \
                 create {:.1} ms | start→first output {} | first output at {} | exit at {:.1} ms | \
                 cleanup {:.1} ms | total {:.1} ms",
                t.resolve_ms,
                t.pull_ms,
                t.unpack_ms,
                t.mount_ms,
                t.create_ms,
                opt(t.start_ms),
                opt(t.first_output_ms),
                t.exit_ms,
                t.cleanup_ms,
                t.total_ms
            );
        }
        None => {}
    }
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

#[allow(clippy::too_many_arguments)]
async fn run_container(
    root: &Path,
    args: &Args,
    image_ref: &str,
    id: &str,
    layers: &[std::path::PathBuf],
    config: &oci_spec::image::ImageConfiguration,
    env: Vec<(String, String)>,
    memory: Option<u64>,
    t: &mut RunTimings,
    t0: Instant,
) -> anyhow::Result<i32> {
    let runc = Runc::new(root.join("runc"));
    let spec = RunSpec {
        args: (!args.command.is_empty()).then(|| args.command.clone()),
        env,
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        memory_bytes: memory.map(|m| m as i64),
        cpus: args.cpus,
        pids_limit: Some(args.pids_limit),
        ..Default::default()
    };
    let dir = root.join("containers").join(id);
    let prepared = Container::new(runc, id, &dir)
        .prepare(layers, config, &spec)
        .with_context(|| format!("preparing container for {image_ref}"))?;
    let pt = prepared.timings();
    t.mount_ms = ms(pt.mount);
    t.create_ms = ms(pt.resolve_user + pt.config);

    // Signals to ember go to the container; ember stays to clean up. The
    // first SIGINT/SIGTERM starts a grace period, after which (or at the
    // next signal) the container is killed, as `docker stop` does.
    let handle = prepared.handle();
    let grace = Duration::from_secs_f64(args.stop_timeout.max(0.0));
    let signals = tokio::spawn(async move {
        use nix::sys::signal::Signal;
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let kill_at = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let sig = tokio::select! {
                _ = int.recv() => Signal::SIGINT,
                _ = term.recv() => Signal::SIGTERM,
                _ = hup.recv() => Signal::SIGHUP,
                _ = kill_at => Signal::SIGKILL,
            };
            let sig = if deadline.is_some() && sig != Signal::SIGHUP {
                Signal::SIGKILL
            } else {
                sig
            };
            if sig != Signal::SIGHUP && deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + grace);
            }
            if sig == Signal::SIGKILL {
                eprintln!("ember: killing the container");
            }
            if let Err(e) = handle.signal(sig) {
                tracing::debug!(error = %ember_error::chain(&e), "forwarding signal");
            }
            if sig == Signal::SIGKILL {
                return;
            }
        }
    });

    // With --timings, output goes through pipes so the first byte can be
    // timed; otherwise the container writes straight to our stdout/stderr.
    let first = Arc::new(OnceLock::new());
    let stdio = if args.timings.is_some() {
        let (out_r, out_w) = nix::unistd::pipe().context("creating a pipe")?;
        let (err_r, err_w) = nix::unistd::pipe().context("creating a pipe")?;
        forward(out_r, std::io::stdout(), first.clone());
        forward(err_r, std::io::stderr(), first.clone());
        ContainerStdio {
            stdin: Input::Inherit,
            stdout: Output::Fd(out_w),
            stderr: Output::Fd(err_w),
        }
    } else {
        ContainerStdio::default()
    };
    let opts = RunOptions {
        stdio,
        timeout: args.timeout.map(Duration::from_secs_f64),
        ..Default::default()
    };
    let spawned_at = Instant::now();
    let outcome = tokio::task::spawn_blocking(move || {
        let r = prepared.run_with(opts);
        let exited = Instant::now();
        let c0 = Instant::now();
        let cleaned = prepared.cleanup();
        (r, cleaned, exited, c0.elapsed())
    })
    .await
    .context("container thread failed")?;
    signals.abort();
    let (result, cleaned, exited, cleanup) = outcome;
    t.exit_ms = ms(exited.duration_since(t0));
    t.cleanup_ms = ms(cleanup);
    if let Some(f) = first.get() {
        t.first_output_ms = Some(ms(f.duration_since(t0)));
        t.start_ms = Some(ms(f.saturating_duration_since(spawned_at)));
    }
    if let Err(e) = cleaned {
        tracing::warn!(error = %ember_error::chain(&e), "cleaning up the container");
    }
    let outcome = result.with_context(|| format!("running container for {image_ref}"))?;
    if outcome.timed_out {
        eprintln!(
            "ember: container killed after the {}s timeout",
            args.timeout.unwrap_or_default()
        );
    }
    Ok(outcome.exit_code)
}
