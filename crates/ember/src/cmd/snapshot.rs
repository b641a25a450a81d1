//! `ember snapshot create|ls|rm` and the restore side of `ember run
//! --snapshot`: capture a start-up once with CRIU, start every later run
//! from a copy of it. Arguments and output only: capture, restore and the
//! fresh-start fallback are `ember_node::snapshot`'s (shared with the
//! node's runs of snapshot deployments).
//!
//! Whatever keeps a restore from happening (CRIU missing, a checkpoint
//! taken on another kernel, CRIU version or CPU, a corrupt artifact, a
//! failed `runc restore`) is said on stderr, and the run falls back to a
//! fresh start of the captured start-up, resumed with `restored: false`.

use crate::cmd::cluster::find_agent;
use crate::cmd::pull::pull_for;
use crate::cmd::run::{Args as RunArgs, TimingsFormat};
use crate::progress::Progress;
use crate::util::{RegistryArgs, human_bytes};
use anyhow::{Context, bail};
use ember_node::images::{ImageError, find_local, resolve_or_pull};
use ember_node::snapshot::{
    self, CaptureRequest, ResumeRequest, RunEvent, RunTimings, SnapshotError, SnapshotHost,
};
use ember_runtime::{Criu, Runc};
use ember_store::{ImageRecord, Store};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Snapshot subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Capture a start-up: run CMD in a new runner until it signals
    /// readiness, checkpoint it with CRIU and keep the checkpoint in the
    /// store as snapshot NAME. `ember run --snapshot NAME -- ARGS` then
    /// starts from a copy of it.
    ///
    /// The program signals readiness by writing `ready` and a newline to
    /// the descriptor in $EMBER_READY_FD (3), then reads one line from it:
    /// a JSON object `{"restored": true|false, "seed": "<64 hex digits>",
    /// "argv": [...], "env": ["K=V", ...], "snapshot": NAME}` carrying the
    /// run's arguments. Every restored copy starts from the same memory, so
    /// re-seed random generators from `seed` (or /dev/urandom) and
    /// regenerate ids after reading it.
    #[command(
        after_help = "Example:\n  ember snapshot create slow busybox -- \\\n    \
sh -c 'sleep 3; echo ready >&3; read -r req <&3; echo \"$req\"'\n  \
ember run --snapshot slow -- hello"
    )]
    Create(Box<CreateArgs>),
    /// List snapshots.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshots (their artifacts go when no snapshot names them).
    Rm {
        /// Snapshot names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Send snapshot NAME to a cluster cache (`ember cache`), artifact
    /// first (skipped if the cache has it), then its manifest.
    Push(crate::cmd::snapshot_transfer::PushArgs),
    /// Bring snapshot NAME from a cluster cache into this store, if it can
    /// be restored on this machine (checked before the download); the
    /// artifact is verified as it arrives.
    Pull(crate::cmd::snapshot_transfer::PullArgs),
}

/// `ember snapshot create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Set an environment variable of the start-up (repeatable).
    #[arg(short, long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// How long the start-up may take to signal readiness, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    pub ready_timeout: f64,
    /// The static ember-agent binary [default: $EMBER_AGENT, or found next
    /// to this binary].
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// The CRIU binary.
    #[arg(long, value_name = "PATH", env = "EMBER_CRIU", default_value = "criu")]
    pub criu: PathBuf,
    /// Pull the image even if it is in the store.
    #[arg(long)]
    pub pull: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Snapshot name (letters, digits, '.', '_', '-'); an existing
    /// snapshot of that name is replaced.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Image reference.
    #[arg(value_name = "IMAGE")]
    pub image: String,
    /// The start-up command (replaces the image's Cmd; its Entrypoint
    /// stays).
    #[arg(
        value_name = "CMD",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

/// Runs `ember snapshot ...`.
pub async fn run(root: &Path, cmd: Command) -> anyhow::Result<ExitCode> {
    let store = Store::open(root).with_context(|| format!("opening store {}", root.display()))?;
    match cmd {
        Command::Create(a) => create(root, &store, *a).await,
        Command::Push(a) => crate::cmd::snapshot_transfer::push(&store, a).await,
        Command::Pull(a) => crate::cmd::snapshot_transfer::pull(&store, a).await,
        Command::Ls { json } => {
            let list = store.snapshots()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<24} {:<32} {:<20} {:>10} {:>10}",
                "NAME", "IMAGE", "ARTIFACT", "SIZE", "CAPTURE"
            );
            for m in list {
                println!(
                    "{:<24} {:<32} {:<20} {:>10} {:>9.1}s",
                    m.name,
                    m.image_name,
                    &m.artifact.to_string()[..19],
                    human_bytes(m.artifact_bytes),
                    m.capture_ms as f64 / 1e3
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm { names } => {
            for n in names {
                let r = store.remove_snapshot(&n)?;
                println!(
                    "removed snapshot {n} ({} freed)",
                    human_bytes(r.bytes_freed)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The image for `reference`, pulled if it is not in the store.
async fn ready_image(
    store: &Store,
    reference: &str,
    registry: &RegistryArgs,
    pull: bool,
) -> anyhow::Result<ImageRecord> {
    let local = if pull {
        None
    } else {
        find_local(store, reference)?
    };
    let mut progress = None;
    let ready = resolve_or_pull(store, local, || {
        let mut p = pull_for(reference, registry, false)?;
        let bar = Arc::new(Progress::new(false));
        p.progress = bar.clone();
        progress = Some(bar);
        Ok::<_, anyhow::Error>(p)
    })
    .await;
    if let Some(p) = progress {
        p.finish();
    }
    match ready {
        Ok(r) => Ok(r.into_record()),
        Err(ImageError::Setup(e)) => Err(e.context(format!("pulling {reference}"))),
        Err(ImageError::Pull { source, .. }) => {
            Err(anyhow::Error::new(*source).context(format!("pulling {reference}")))
        }
    }
}

async fn create(root: &Path, store: &Store, a: CreateArgs) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    ember_store::snapshot::validate_name(&a.name)?;
    let env = parse_env(&a.env)?;
    let criu = Criu::new(&a.criu);
    let info = criu
        .probe()
        .context("cannot capture a snapshot without a working CRIU")?;
    let agent = find_agent(a.agent.clone())?;
    let image = ready_image(store, &a.image, &a.registry, a.pull).await?;
    let claim = store.claim_image(&unique_id("capture"), &image.manifest)?;
    let host = host(root, store, criu, agent);
    let result = tokio::task::spawn_blocking(move || {
        // The start-up's output goes to stderr: stdout stays for runs.
        let mut err = std::io::stderr();
        snapshot::capture(
            &host,
            &CaptureRequest {
                name: &a.name,
                image: &image,
                image_name: &a.image,
                argv: &a.command,
                env: &env,
                ready_timeout: Duration::from_secs_f64(a.ready_timeout.max(0.001)),
                t0,
            },
            &mut |_, b| {
                let _ = err.write_all(b);
            },
        )
    })
    .await
    .context("capture thread failed")?;
    drop(claim);
    let c = match result {
        Ok(c) => c,
        Err(e @ SnapshotError::Checkpoint(_)) => {
            return Err(anyhow::Error::new(e).context("checkpointing the runner"));
        }
        Err(e @ SnapshotError::Artifact(_)) => {
            return Err(anyhow::Error::new(e).context("storing the checkpoint"));
        }
        Err(e) => return Err(e.into()),
    };
    eprintln!(
        "start-up {:.1} s until ready | runner {:.1} ms | checkpoint {:.1} ms (CRIU dump {:.1} ms) | pack {:.1} ms",
        c.startup.as_secs_f64(),
        ms(c.runner),
        ms(c.checkpoint),
        ms(c.dump),
        ms(c.pack)
    );
    let m = c.manifest;
    eprintln!(
        "snapshot {}: artifact {} ({}, {} unpacked), captured in {:.1} s with CRIU {}{}",
        m.name,
        m.artifact,
        human_bytes(m.artifact_bytes),
        human_bytes(m.unpacked_bytes),
        m.capture_ms as f64 / 1e3,
        info.version,
        if info.kdat_cached {
            ""
        } else {
            " (no kernel-feature cache: restores pay CRIU's kernel probe; see scripts/install-criu.sh)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Where the CLI's snapshot runners live: under the store's root, with
/// the runc state `ember run` uses.
fn host(root: &Path, store: &Store, criu: Criu, agent: PathBuf) -> SnapshotHost {
    SnapshotHost {
        store: store.clone(),
        runc: Runc::new(root.join("runc")),
        containers: root.join("containers"),
        criu,
        agent,
    }
}

fn unique_id(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("ember-{what}-{}-{nanos:08x}", std::process::id())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn parse_env(env: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    env.iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("invalid --env {kv:?}: expected KEY=VALUE"),
        })
        .collect()
}

/// Start-time breakdown of `ember run --snapshot`, milliseconds.
#[derive(Debug, Default, serde::Serialize)]
struct SnapshotTimings {
    /// Reading the manifest and finding the image.
    resolve_ms: f64,
    /// Verifying and unpacking the artifact (0 when its copy was there).
    unpack_ms: f64,
    /// The restore phase: metadata checks, copy of the filesystem changes,
    /// overlay mount, `runc restore`.
    restore_ms: Option<f64>,
    /// Of which `runc restore` (CRIU).
    criu_restore_ms: Option<f64>,
    /// A fresh start instead (fallback): runner creation until the agent
    /// answered.
    fresh_start_ms: Option<f64>,
    /// Fallback: the start-up until it signalled readiness.
    ready_ms: Option<f64>,
    /// Connecting to the agent and sending Resume.
    connect_ms: f64,
    first_output_ms: Option<f64>,
    exit_ms: f64,
    cleanup_ms: f64,
    total_ms: f64,
    restored: bool,
    /// Why the run did not restore, when it did not.
    fallback: Option<String>,
    exit_code: i32,
}

impl SnapshotTimings {
    fn fill(&mut self, t: &RunTimings) {
        let opt = |d: Option<Duration>| d.map(ms);
        self.unpack_ms = ms(t.unpack);
        self.restore_ms = opt(t.restore);
        self.criu_restore_ms = opt(t.criu_restore);
        self.fresh_start_ms = opt(t.fresh_start);
        self.ready_ms = opt(t.ready);
        self.connect_ms = ms(t.connect);
        self.exit_ms = ms(t.exit);
        self.cleanup_ms = ms(t.cleanup);
        self.restored = t.restored;
        self.fallback = t.fallback.clone();
    }
}

/// Copies output to our streams, noting the first byte.
struct Sink {
    first: Arc<OnceLock<Instant>>,
}

impl Sink {
    fn write(&self, is_stderr: bool, b: &[u8]) {
        let _ = self.first.set(Instant::now());
        if is_stderr {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(b).and_then(|_| e.flush());
        } else {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(b).and_then(|_| o.flush());
        }
    }
}

/// `ember run --snapshot NAME [--] [ARGS]`.
pub async fn run_snapshot(root: &Path, name: &str, args: RunArgs) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let mut t = SnapshotTimings::default();
    // The runtime shape (limits, user, directory) is the checkpoint's.
    let fixed: Vec<&str> = [
        (args.memory.is_some(), "--memory"),
        (args.cpus.is_some(), "--cpus"),
        (args.workdir.is_some(), "--workdir"),
        (args.user.is_some(), "--user"),
        (args.pull, "--pull"),
    ]
    .into_iter()
    .filter_map(|(set, flag)| set.then_some(flag))
    .collect();
    if !fixed.is_empty() {
        eprintln!(
            "ember: {} ignored with --snapshot: a restored copy runs as it was captured",
            fixed.join(", ")
        );
    }
    let store = Store::open(root).with_context(|| format!("opening store {}", root.display()))?;
    let manifest = store.snapshot(name)?;
    let ix = store.read_index()?;
    let image = ix.images.get(&manifest.image).cloned().with_context(|| {
        format!(
            "snapshot {name}: its image {} ({}) is no longer in the store; pull it again",
            manifest.image_name, manifest.image
        )
    })?;
    if !store.missing_layers(&image).is_empty() {
        bail!(
            "snapshot {name}: layers of its image {} are missing; pull it again",
            manifest.image_name
        );
    }
    let run_argv: Vec<String> = args.image.iter().chain(&args.command).cloned().collect();
    let run_env: Vec<String> = parse_env(&args.env)?
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    t.resolve_ms = ms(t0.elapsed());
    let claim = store.claim_image(&unique_id("run"), &image.manifest)?;
    let criu = Criu::new(args.criu.clone().unwrap_or_else(|| "criu".into()));
    // The agent is needed only for a fallback; a missing one is said then.
    let agent = find_agent(None);
    let host = host(
        root,
        &store,
        criu,
        agent.as_ref().cloned().unwrap_or_default(),
    );
    let running: Running = Arc::new(Mutex::new(None));
    let req = ResumeRequest {
        name: name.to_owned(),
        argv: run_argv,
        env: run_env,
        timeout: args.timeout.map(Duration::from_secs_f64),
    };
    let no_fallback = args.no_fallback;
    let name2 = name.to_owned();
    let running2 = running.clone();
    let signals = tokio::spawn(forward_signals(running));
    let result = tokio::task::spawn_blocking(move || {
        let first = Arc::new(OnceLock::new());
        let sink = Sink {
            first: first.clone(),
        };
        let mut agent_missing = None;
        let r = snapshot::run_from_snapshot(
            &host,
            &manifest,
            &image,
            &req,
            t0,
            &mut |_| {
                if no_fallback {
                    return false;
                }
                if let Err(e) = &agent {
                    agent_missing = Some(crate::util::error_chain(e));
                    return false;
                }
                true
            },
            &mut |ev| match ev {
                RunEvent::FreshStart(why) => {
                    eprintln!("ember: snapshot {name2} not restored: {why}");
                    eprintln!("ember: falling back to a fresh start of the snapshot's start-up");
                }
                RunEvent::Resuming { socket, exec_id } => {
                    *running2.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((socket.to_path_buf(), exec_id));
                }
                RunEvent::Restored => {}
            },
            &mut |e, b| sink.write(e, b),
        );
        let r = match r {
            Ok(r) => r,
            Err(e) if no_fallback => {
                return Err(anyhow::Error::new(e)
                    .context(format!("snapshot {name2}: not restored (--no-fallback)")));
            }
            Err(e) => {
                let e = anyhow::Error::new(e);
                return Err(match agent_missing {
                    Some(a) => e.context(format!(
                        "snapshot {name2}: not restored, and no fresh start: {a}"
                    )),
                    None => e,
                });
            }
        };
        Ok((r, first.get().copied()))
    })
    .await
    .context("run thread failed")?;
    signals.abort();
    drop(claim);
    let (outcome, first) = result?;
    t.fill(&outcome.timings);
    t.first_output_ms = first.map(|f| ms(f.duration_since(t0)));
    if outcome.result.timed_out {
        eprintln!("ember: killed after the timeout");
    }
    if let Some(e) = &outcome.result.spawn_error {
        eprintln!("ember: {e}");
    }
    let code = snapshot::exit_code(&outcome.result);
    t.exit_code = code;
    t.total_ms = ms(t0.elapsed());
    match args.timings {
        Some(TimingsFormat::Json) => eprintln!("{}", serde_json::to_string(&t)?),
        Some(TimingsFormat::Text) => {
            let opt = |v: Option<f64>| v.map(|x| format!("{x:.1} ms")).unwrap_or("-".into());
            eprintln!(
                "timings: resolve {:.1} ms | unpack {:.1} ms | restore {} (criu {}) | fresh start {} | \
                 ready {} | connect {:.1} ms | first output at {} | exit at {:.1} ms | \
                 cleanup {:.1} ms | total {:.1} ms | {}",
                t.resolve_ms,
                t.unpack_ms,
                opt(t.restore_ms),
                opt(t.criu_restore_ms),
                opt(t.fresh_start_ms),
                opt(t.ready_ms),
                t.connect_ms,
                opt(t.first_output_ms),
                t.exit_ms,
                t.cleanup_ms,
                t.total_ms,
                if t.restored {
                    "restored"
                } else {
                    "fresh start (fallback)"
                }
            );
        }
        None => {}
    }
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// The agent socket and exec id of the run in progress, for signals.
type Running = Arc<Mutex<Option<(PathBuf, u64)>>>;

/// Forwards SIGINT, SIGTERM and SIGHUP to the run's exec through its
/// agent (the restored process is in the container's session, out of
/// reach of the terminal's signals); a second SIGINT or SIGTERM kills it.
async fn forward_signals(running: Running) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return;
    };
    let mut seen = false;
    loop {
        let sig = tokio::select! {
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
            _ = hup.recv() => libc::SIGHUP,
        };
        let sig = if seen && sig != libc::SIGHUP {
            eprintln!("ember: killing the run");
            libc::SIGKILL
        } else {
            sig
        };
        seen |= sig != libc::SIGHUP;
        let target = running.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some((socket, exec_id)) = target {
            let _ =
                tokio::task::spawn_blocking(move || snapshot::signal_exec(&socket, exec_id, sig))
                    .await;
        }
    }
}
