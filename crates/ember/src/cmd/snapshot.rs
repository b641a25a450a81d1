//! `ember snapshot create|ls|rm` and the restore side of `ember run
//! --snapshot`: capture a start-up once with CRIU, start every later run
//! from a copy of it.
//!
//! Capture: a runner container whose PID 1 is the exec agent (its binary
//! and a private socket directory bind-mounted, standard streams
//! `/dev/null`: CRIU cannot restore a host file as a descriptor) runs the
//! start-up with the agent's readiness protocol (`EMBER_READY_FD`, see
//! docs/agent-protocol.md). Once it wrote `ready` and the agent parked it,
//! this process disconnects (CRIU refuses a socket whose peer is outside
//! the container), checkpoints the runner with CRIU through runc, packs the
//! checkpoint into the store as an artifact and destroys the runner.
//!
//! Restore: a new container from the verified unpacked artifact, with its
//! own socket directory, overlay and cgroup; `Resume` wakes the parked
//! start-up with one JSON line (`restored`, a fresh `seed`, the run's
//! `argv` and `env`) and the output streams back like `ember run`'s.
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
use ember_agent_proto::{AgentClient, ExecRequest, ExecResult, Readiness};
use ember_node::images::{ImageError, find_local, resolve_or_pull};
use ember_runtime::checkpoint::{self, CheckpointError, CheckpointOptions, RestoreTarget};
use ember_runtime::{
    BindMount, Container, ContainerStdio, Criu, ImageIdentity, Prepared, RunSpec, Runc,
};
use ember_store::{ImageRecord, SnapshotManifest, StartUp, Store};
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where the agent binary is mounted in a runner (as the pool does).
const AGENT_PATH: &str = "/.ember/agent";
/// The agent's socket directory in a runner.
const SOCKET_DIR: &str = "/run/ember";
/// Longest path `connect(2)` takes for a Unix socket.
const SUN_PATH_MAX: usize = 107;
/// How long a new runner's agent has to listen.
const AGENT_WAIT: Duration = Duration::from_secs(30);

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

fn unique_id(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("ember-{what}-{}-{nanos:08x}", std::process::id())
}

fn identity(image: &ImageRecord) -> ImageIdentity {
    ImageIdentity {
        digest: image.manifest.to_string(),
        layers: image.layers.iter().map(|l| l.diff_id.to_string()).collect(),
    }
}

/// A private socket directory (mode 0700, as the pool makes them) and the
/// path to connect to the agent's socket in it.
struct SocketDir {
    dir: PathBuf,
    socket: PathBuf,
    /// Keeps `/proc/self/fd/N` valid when `socket` goes through it.
    _fd: Option<File>,
}

impl SocketDir {
    fn new(store: &Store) -> anyhow::Result<SocketDir> {
        // Under the store's tmp/: if this process dies, the next open of
        // the store removes it.
        let dir = store.tmp_path("sock");
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        let host = dir.join("agent.sock");
        let (socket, fd) = if host.as_os_str().len() <= SUN_PATH_MAX {
            (host, None)
        } else {
            let f = File::open(&dir)?;
            let p = PathBuf::from(format!("/proc/self/fd/{}/agent.sock", f.as_raw_fd()));
            (p, Some(f))
        };
        Ok(SocketDir {
            dir,
            socket,
            _fd: fd,
        })
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A runner started for a capture or a fresh start: the agent as PID 1.
struct FreshRunner {
    prepared: Prepared,
    pid: i32,
    client: Option<AgentClient>,
    // Dropped after `prepared` (fields drop in order): the container
    // goes before its socket directory.
    sock: SocketDir,
    /// The start-up's request, with the image's defaults.
    request: ExecRequest,
    /// Preparing the container and starting it until the agent answered.
    started_in: Duration,
}

/// Starts a runner for `image` and connects to its agent. `argv`/`env`
/// make the start-up's request (Entrypoint + argv or Cmd, as `ember run`).
fn start_runner(
    root: &Path,
    store: &Store,
    image: &ImageRecord,
    agent: &Path,
    argv: &[String],
    env: &[(String, String)],
) -> anyhow::Result<FreshRunner> {
    let t = Instant::now();
    let config = store.image_config(image)?;
    let id = unique_id("snap");
    let sock = SocketDir::new(store)?;
    // The agent must be exactly PID 1's program: no Entrypoint before it.
    let mut runner_config = config.clone();
    if let Some(mut c) = runner_config.config().clone() {
        c.set_entrypoint(None);
        runner_config.set_config(Some(c));
    }
    let spec = RunSpec {
        args: Some(vec![
            AGENT_PATH.into(),
            "--socket".into(),
            format!("{SOCKET_DIR}/agent.sock"),
        ]),
        // Root, to switch each exec to the image's user.
        user: Some("0:0".into()),
        pids_limit: Some(4096),
        mounts: vec![
            BindMount {
                source: agent.to_path_buf(),
                destination: AGENT_PATH.into(),
                readonly: true,
            },
            BindMount {
                source: sock.dir.clone(),
                destination: SOCKET_DIR.into(),
                readonly: false,
            },
        ],
        ..RunSpec::default()
    };
    let runc = Runc::new(root.join("runc"));
    let layers = store.layer_dirs(image);
    let prepared = Container::new(runc.clone(), &id, root.join("containers").join(&id))
        .prepare(&layers, &runner_config, &spec)
        .with_context(|| format!("preparing a runner for {}", image.repository))?;

    // The start-up's request: the image's environment, directory and user.
    let rootfs = prepared.rootfs();
    let user =
        ember_runtime::user::resolve_user(&rootfs, RunSpec::default().effective_user(&config))?;
    let mut full_argv: Vec<String> = config
        .config()
        .as_ref()
        .and_then(|c| c.entrypoint().clone())
        .unwrap_or_default();
    if argv.is_empty() {
        full_argv.extend(
            config
                .config()
                .as_ref()
                .and_then(|c| c.cmd().clone())
                .unwrap_or_default(),
        );
    } else {
        full_argv.extend(argv.iter().cloned());
    }
    if full_argv.is_empty() {
        bail!("no command: give one, or use an image with a Cmd or Entrypoint");
    }
    let request = ExecRequest {
        argv: full_argv,
        env: ember_runtime::spec::process_env(&config, env, &id, &user.home)?,
        cwd: Some(ember_runtime::spec::process_cwd(
            &config,
            &RunSpec::default(),
        )?),
        uid: (user.uid != 0 || user.gid != 0).then_some(user.uid),
        gid: (user.uid != 0 || user.gid != 0).then_some(user.gid),
        ..ExecRequest::default()
    };

    // `runc create` + `start` leave it running detached, as a checkpoint
    // needs; /dev/null streams, as a restore needs.
    let created = runc.create(&id, prepared.bundle(), ContainerStdio::null())?;
    runc.start(&id)?;
    let client = AgentClient::connect_timeout(&sock.socket, AGENT_WAIT)
        .with_context(|| format!("connecting to the agent of runner {id}"))?;
    Ok(FreshRunner {
        prepared,
        pid: created.pid,
        client: Some(client),
        sock,
        request,
        started_in: t.elapsed(),
    })
}

/// Sockets process `pid` holds.
fn sockets(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Runs the start-up until it is parked; its output goes to `on_output`.
fn until_ready(
    runner: &mut FreshRunner,
    timeout: Duration,
    on_output: &mut dyn FnMut(bool, &[u8]),
) -> anyhow::Result<Readiness> {
    let mut req = runner.request.clone();
    req.timeout_ms = Some(timeout.as_millis() as u64);
    let client = runner
        .client
        .as_mut()
        .context("the runner has no agent connection")?;
    Ok(client.exec_until_ready(&req, &mut |_| {}, on_output)?)
}

fn describe(r: &ExecResult) -> String {
    match (r.exit_code, r.signal, &r.spawn_error) {
        (_, _, Some(e)) => format!("could not start: {e}"),
        (_, Some(s), _) => format!("killed by signal {s}"),
        (Some(c), _, _) => format!("exit code {c}"),
        _ => "ended".into(),
    }
}

fn exit_code(r: &ExecResult) -> i32 {
    if r.timed_out {
        return 137;
    }
    match (r.exit_code, r.signal) {
        (_, Some(s)) => 128 + s,
        (Some(c), _) => c,
        _ => 125,
    }
}

async fn create(root: &Path, store: &Store, a: CreateArgs) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    ember_store::snapshot::validate_name(&a.name)?;
    parse_env(&a.env)?;
    let criu = Criu::new(&a.criu);
    let info = criu
        .probe()
        .context("cannot capture a snapshot without a working CRIU")?;
    let agent = find_agent(a.agent.clone())?;
    let image = ready_image(store, &a.image, &a.registry, a.pull).await?;
    let claim = unique_id("capture");
    store.add_user(&claim, &image.manifest, std::process::id())?;
    let root = root.to_path_buf();
    let store2 = store.clone();
    let result =
        tokio::task::spawn_blocking(move || capture(&root, &store2, &a, &image, &agent, &criu, t0))
            .await
            .context("capture thread failed")?;
    store.remove_user(&claim);
    let m = result?;
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

fn capture(
    root: &Path,
    store: &Store,
    a: &CreateArgs,
    image: &ImageRecord,
    agent: &Path,
    criu: &Criu,
    t0: Instant,
) -> anyhow::Result<SnapshotManifest> {
    let env = parse_env(&a.env)?;
    let mut runner = start_runner(root, store, image, agent, &a.command, &env)?;
    let t_startup = Instant::now();
    // The start-up's output goes to stderr: stdout stays for runs.
    let mut err = std::io::stderr();
    let ready = until_ready(
        &mut runner,
        Duration::from_secs_f64(a.ready_timeout.max(0.001)),
        &mut |_, b| {
            let _ = err.write_all(b);
        },
    )?;
    let exec_id = match ready {
        Readiness::Ready(r) => r.exec_id,
        Readiness::Exited(r) => bail!(
            "the start-up ended ({}) before it signalled readiness; it must write \"ready\" \
             to the descriptor in $EMBER_READY_FD (see `ember snapshot create --help`)",
            describe(&r)
        ),
    };
    let startup = t_startup.elapsed();
    // CRIU refuses a socket whose peer is outside the container: close
    // ours and wait until the agent closed its end, leaving its listener
    // and the parked start-up's readiness socket.
    runner.client = None;
    let deadline = Instant::now() + AGENT_WAIT;
    while sockets(runner.pid) > 2 {
        if Instant::now() >= deadline {
            bail!("the agent kept its connection open; cannot checkpoint");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let runc = Runc::new(root.join("runc"));
    let dest = store.tmp_path("checkpoint");
    let ckpt = checkpoint::checkpoint(
        &runc,
        criu,
        runner.prepared.id(),
        runner.prepared.bundle(),
        &dest,
        &identity(image),
        CheckpointOptions::default(),
    )
    .context("checkpointing the runner")?;
    let t_pack = Instant::now();
    let packed = store.put_snapshot_dir(&ckpt.dir);
    if packed.is_err() {
        let _ = fs::remove_dir_all(&ckpt.dir);
    }
    let (artifact, artifact_bytes, unpacked_bytes) = packed.context("storing the checkpoint")?;
    let pack = t_pack.elapsed();
    if let Err(e) = runner.prepared.cleanup() {
        tracing::warn!(error = %ember_error::chain(&e), "removing the captured runner");
    }
    let manifest = SnapshotManifest {
        name: a.name.clone(),
        artifact,
        artifact_bytes,
        unpacked_bytes,
        image: image.manifest.clone(),
        image_name: a.image.clone(),
        layers: image.layers.iter().map(|l| l.diff_id.clone()).collect(),
        start: StartUp {
            argv: runner.request.argv.clone(),
            env: runner.request.env.clone(),
            cwd: runner.request.cwd.clone(),
            uid: runner.request.uid,
            gid: runner.request.gid,
            exec_id,
        },
        metadata: serde_json::to_value(&ckpt.metadata)?,
        capture_ms: t0.elapsed().as_millis() as u64,
        created_ms: ember_store::now_ms(),
    };
    store.put_snapshot(&manifest)?;
    // Replacing a snapshot of the same name leaves its artifact unnamed.
    if let Err(e) = store.gc_snapshots_of(None) {
        tracing::warn!(error = %ember_error::chain(&e), "collecting replaced snapshot artifacts");
    }
    eprintln!(
        "start-up {:.1} s until ready | runner {:.1} ms | checkpoint {:.1} ms (CRIU dump {:.1} ms) | pack {:.1} ms",
        startup.as_secs_f64(),
        ms(runner.started_in),
        ms(ckpt.total_time),
        ms(ckpt.dump_time),
        ms(pack)
    );
    Ok(manifest)
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

/// A fresh 256-bit seed from the kernel.
fn fresh_seed() -> anyhow::Result<String> {
    let mut b = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .context("reading /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
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
    let claim = unique_id("run");
    store.add_user(&claim, &image.manifest, std::process::id())?;
    let root = root.to_path_buf();
    let store2 = store.clone();
    let name2 = name.to_owned();
    let running: Running = Arc::new(Mutex::new(None));
    let opts = RestoreRun {
        criu: Criu::new(args.criu.clone().unwrap_or_else(|| "criu".into())),
        timeout: args.timeout.map(Duration::from_secs_f64),
        no_fallback: args.no_fallback,
        argv: run_argv,
        env: run_env,
        running: running.clone(),
    };
    let signals = tokio::spawn(forward_signals(running));
    let result = tokio::task::spawn_blocking(move || {
        restore_run(&root, &store2, &name2, &manifest, &image, &opts, &mut t, t0).map(|c| (c, t))
    })
    .await
    .context("run thread failed")?;
    signals.abort();
    store.remove_user(&claim);
    let (code, mut t) = result?;
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
            let _ = tokio::task::spawn_blocking(move || {
                AgentClient::connect_timeout(&socket, Duration::from_secs(1))
                    .and_then(|mut c| c.cancel(exec_id, sig))
            })
            .await;
        }
    }
}

struct RestoreRun {
    running: Running,
    criu: Criu,
    timeout: Option<Duration>,
    no_fallback: bool,
    argv: Vec<String>,
    env: Vec<String>,
}

fn resume_message(name: &str, restored: bool, o: &RestoreRun) -> anyhow::Result<String> {
    Ok(serde_json::to_string(&serde_json::json!({
        "restored": restored,
        "seed": fresh_seed()?,
        "argv": o.argv,
        "env": o.env,
        "snapshot": name,
    }))?)
}

/// Why a restore did not happen, for the message and the timings.
fn why_not(e: &anyhow::Error) -> String {
    if let Some(c) = e.downcast_ref::<CheckpointError>() {
        return match c {
            CheckpointError::CriuMissing { .. } | CheckpointError::CriuUnusable { .. } => {
                format!("CRIU is not usable here: {}", ember_error::chain(c))
            }
            CheckpointError::Mismatch { .. } => {
                format!(
                    "the checkpoint does not match this machine: {}",
                    ember_error::chain(c)
                )
            }
            _ => format!("restore failed: {}", ember_error::chain(c)),
        };
    }
    crate::util::error_chain(e)
}

#[allow(clippy::too_many_arguments)]
fn restore_run(
    root: &Path,
    store: &Store,
    name: &str,
    manifest: &SnapshotManifest,
    image: &ImageRecord,
    o: &RestoreRun,
    t: &mut SnapshotTimings,
    t0: Instant,
) -> anyhow::Result<i32> {
    let first = Arc::new(OnceLock::new());
    let sink = Sink {
        first: first.clone(),
    };
    let timeout_ms = o.timeout.map(|d| d.as_millis() as u64);
    let attempt = (|| -> anyhow::Result<(checkpoint::Restored, SocketDir)> {
        let tu = Instant::now();
        let (dir, _unpacked) = store.unpack_snapshot(manifest)?;
        t.unpack_ms = ms(tu.elapsed());
        let sock = SocketDir::new(store)?;
        let id = unique_id("restore");
        let runc = Runc::new(root.join("runc"));
        let layers = store.layer_dirs(image);
        let rebind = [BindMount {
            source: sock.dir.clone(),
            destination: SOCKET_DIR.into(),
            readonly: false,
        }];
        let restored = checkpoint::restore(
            &runc,
            &o.criu,
            &dir,
            &RestoreTarget {
                id: &id,
                dir: &root.join("containers").join(&id),
                layers: &layers,
                image: &identity(image),
                rebind: &rebind,
            },
        )?;
        t.restore_ms = Some(ms(restored.total_time));
        t.criu_restore_ms = Some(ms(restored.restore_time));
        Ok((restored, sock))
    })();
    let outcome = match attempt {
        Ok((restored, sock)) => {
            let tc = Instant::now();
            let mut client = AgentClient::connect_timeout(&sock.socket, AGENT_WAIT)
                .context("connecting to the restored agent")?;
            t.connect_ms = ms(tc.elapsed());
            t.restored = true;
            let msg = resume_message(name, true, o)?;
            *o.running.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((sock.socket.clone(), manifest.start.exec_id));
            let r = client
                .resume(manifest.start.exec_id, &msg, timeout_ms, &mut |e, b| {
                    sink.write(e, b)
                })
                .context("resuming the restored start-up")?;
            t.exit_ms = ms(t0.elapsed());
            let tc = Instant::now();
            drop(client);
            let mut restored = restored;
            if let Err(e) = restored.cleanup() {
                tracing::warn!(error = %ember_error::chain(&e), "removing the restored container");
            }
            drop(sock);
            t.cleanup_ms = ms(tc.elapsed());
            r
        }
        Err(e) => {
            let why = why_not(&e);
            if o.no_fallback {
                return Err(e.context(format!("snapshot {name}: not restored (--no-fallback)")));
            }
            eprintln!("ember: snapshot {name} not restored: {why}");
            eprintln!("ember: falling back to a fresh start of the snapshot's start-up");
            t.fallback = Some(why);
            fresh_start(root, store, name, manifest, image, o, &sink, t, t0)?
        }
    };
    if let Some(f) = first.get() {
        t.first_output_ms = Some(ms(f.duration_since(t0)));
    }
    if outcome.timed_out {
        eprintln!("ember: killed after the timeout");
    }
    if let Some(e) = &outcome.spawn_error {
        eprintln!("ember: {e}");
    }
    Ok(exit_code(&outcome))
}

/// The fallback: the captured start-up in a new runner, resumed with
/// `restored: false` on the same connection once it is ready.
#[allow(clippy::too_many_arguments)]
fn fresh_start(
    root: &Path,
    store: &Store,
    name: &str,
    manifest: &SnapshotManifest,
    image: &ImageRecord,
    o: &RestoreRun,
    sink: &Sink,
    t: &mut SnapshotTimings,
    t0: Instant,
) -> anyhow::Result<ExecResult> {
    let agent = find_agent(None)?;
    // The captured request already holds the image's defaults and the
    // Entrypoint; start the runner with it as it was.
    let mut runner = start_runner(root, store, image, &agent, &manifest.start.argv, &[])?;
    runner.request.argv = manifest.start.argv.clone();
    runner.request.env = manifest.start.env.clone();
    runner.request.cwd = manifest.start.cwd.clone();
    runner.request.uid = manifest.start.uid;
    runner.request.gid = manifest.start.gid;
    t.fresh_start_ms = Some(ms(runner.started_in));
    let tr = Instant::now();
    let ready = until_ready(
        &mut runner,
        o.timeout.unwrap_or(Duration::from_secs(600)),
        &mut |e, b| sink.write(e, b),
    )?;
    let r = match ready {
        Readiness::Exited(r) => r,
        Readiness::Ready(ready) => {
            t.ready_ms = Some(ms(tr.elapsed()));
            let msg = resume_message(name, false, o)?;
            *o.running.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((runner.sock.socket.clone(), ready.exec_id));
            let client = runner
                .client
                .as_mut()
                .context("the runner has no agent connection")?;
            client.resume(
                ready.exec_id,
                &msg,
                o.timeout.map(|d| d.as_millis() as u64),
                &mut |e, b| sink.write(e, b),
            )?
        }
    };
    t.exit_ms = ms(t0.elapsed());
    let tc = Instant::now();
    runner.client = None;
    if let Err(e) = runner.prepared.cleanup() {
        tracing::warn!(error = %ember_error::chain(&e), "removing the runner");
    }
    drop(runner);
    t.cleanup_ms = ms(tc.elapsed());
    Ok(r)
}
