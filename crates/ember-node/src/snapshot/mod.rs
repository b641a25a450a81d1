//! Snapshot starts: capture a start-up once with CRIU, start later runs
//! from a copy of it, and start fresh when a copy cannot be restored.
//! `ember snapshot create` / `ember run --snapshot` and the node's runs of
//! snapshot deployments ([`deploy`]) both go through here.
//!
//! Capture ([`capture`]): a runner container whose PID 1 is the exec agent
//! (its binary and a private socket directory bind-mounted, standard
//! streams `/dev/null`: CRIU cannot restore a host file as a descriptor)
//! runs the start-up with the agent's readiness protocol
//! (`EMBER_READY_FD`, see docs/agent-protocol.md). Once it wrote `ready`
//! and the agent parked it, the caller's connection is closed (CRIU
//! refuses a socket whose peer is outside the container), the runner is
//! checkpointed with CRIU through runc, the checkpoint is packed into the
//! store as an artifact and the runner destroyed.
//!
//! Restore ([`run_from_snapshot`]): a new container from the verified
//! unpacked artifact, with its own socket directory, overlay and cgroup;
//! `Resume` wakes the parked start-up with one JSON line (`restored`, a
//! fresh `seed`, the run's `argv` and `env`). Whatever keeps a restore
//! from happening (CRIU missing, a checkpoint taken on another kernel,
//! CRIU version or CPU, a corrupt artifact, a failed `runc restore`) is
//! handed to the caller as the fallback's reason, and the run starts the
//! captured start-up fresh instead ([`fresh_start`]), resumed with
//! `restored: false`.

pub(crate) mod deploy;

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_agent_proto::{AgentClient, ExecRequest, ExecResult, Readiness};
use ember_runtime::checkpoint::{self, CheckpointError, CheckpointOptions, RestoreTarget};
use ember_runtime::netns::NetnsHolder;
use ember_runtime::{
    BindMount, Container, ContainerStdio, Criu, ImageIdentity, Prepared, RunSpec, Runc,
};
use ember_store::{ImageRecord, SnapshotManifest, StartUp, Store};

/// Where the agent binary is mounted in a runner (as the pool does).
const AGENT_PATH: &str = "/.ember/agent";
/// The agent's socket directory in a runner.
const SOCKET_DIR: &str = "/run/ember";
/// Longest path `connect(2)` takes for a Unix socket.
const SUN_PATH_MAX: usize = 107;
/// How long a new runner's agent has to listen.
const AGENT_WAIT: Duration = Duration::from_secs(30);
/// How long a fresh start-up may take to become ready when the caller
/// gives no timeout.
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(600);

/// Errors of capturing and restoring snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Store: the image's config, the artifact, a manifest.
    #[error(transparent)]
    Store(#[from] ember_store::StoreError),
    /// The snapshot artifact or its manifest.
    #[error(transparent)]
    Artifact(#[from] ember_store::SnapshotError),
    /// CRIU, `runc checkpoint` or `runc restore`, or a checkpoint that
    /// does not match this machine.
    #[error(transparent)]
    Checkpoint(Box<CheckpointError>),
    /// Preparing or removing a runner's bundle.
    #[error("preparing a runner for {image}")]
    Prepare {
        /// The image.
        image: String,
        /// Why.
        #[source]
        source: ember_runtime::ContainerError,
    },
    /// `runc create` or `runc start`.
    #[error(transparent)]
    Runc(#[from] ember_runtime::RuncError),
    /// The image's user or the start-up's environment or directory.
    #[error(transparent)]
    User(#[from] ember_runtime::UserError),
    /// See [`SnapshotError::User`].
    #[error(transparent)]
    Spec(#[from] ember_runtime::SpecError),
    /// Talking to the runner's agent.
    #[error("{what}")]
    Agent {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: ember_agent_proto::ClientError,
    },
    /// A file of the runner's socket directory, or `/dev/urandom`.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither the caller nor the image names a command.
    #[error("no command: give one, or use an image with a Cmd or Entrypoint")]
    NoCommand,
    /// The start-up exited instead of signalling readiness.
    #[error(
        "the start-up ended ({how}) before it signalled readiness; it must write \"ready\" \
         to the descriptor in $EMBER_READY_FD (see docs/agent-protocol.md)"
    )]
    NotReady {
        /// How it ended.
        how: String,
    },
    /// The agent kept the caller's connection open, so CRIU would refuse.
    #[error("the agent kept its connection open; cannot checkpoint")]
    AgentConnected,
    /// Building the resume message.
    #[error("encoding the resume message")]
    Encode(#[from] serde_json::Error),
}

impl From<CheckpointError> for SnapshotError {
    fn from(e: CheckpointError) -> Self {
        // Boxed: the largest error by far, and rare.
        SnapshotError::Checkpoint(Box::new(e))
    }
}

impl SnapshotError {
    fn agent(what: impl Into<String>) -> impl FnOnce(ember_agent_proto::ClientError) -> Self {
        let what = what.into();
        move |source| SnapshotError::Agent { what, source }
    }

    /// Why a restore did not happen, in one line for a run's note or a
    /// message: the error with its causes.
    pub fn why_not_restored(&self) -> String {
        let head = match self {
            SnapshotError::Checkpoint(c) => match **c {
                CheckpointError::CriuMissing { .. } | CheckpointError::CriuUnusable { .. } => {
                    "CRIU is not usable here: "
                }
                CheckpointError::Mismatch { .. } => "the checkpoint does not match this machine: ",
                _ => "restore failed: ",
            },
            _ => "",
        };
        let mut s = format!("{head}{self}");
        let mut cur = std::error::Error::source(self);
        while let Some(e) = cur {
            s.push_str(": ");
            s.push_str(&e.to_string());
            cur = e.source();
        }
        s
    }
}

/// Where snapshot runners live: their bundles, their runc state and the
/// store they come from.
#[derive(Debug, Clone)]
pub struct SnapshotHost {
    /// The store (images, artifacts, socket directories under its tmp/).
    pub store: Store,
    /// runc, with its state root.
    pub runc: Runc,
    /// Parent of the runners' bundle directories.
    pub containers: PathBuf,
    /// The CRIU binary.
    pub criu: Criu,
    /// The static `ember-agent` binary runners run as PID 1.
    pub agent: PathBuf,
}

/// A unique container id.
fn unique_id(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("ember-{what}-{}-{nanos:08x}{seq:x}", std::process::id())
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
    fn new(store: &Store) -> Result<SocketDir, SnapshotError> {
        // Under the store's tmp/: if this process dies, the next open of
        // the store removes it.
        let dir = store.tmp_path("sock");
        let io = |what| {
            let path = dir.clone();
            move |source| SnapshotError::Io { what, path, source }
        };
        fs::create_dir(&dir).map_err(io("creating"))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io("chmod"))?;
        let host = dir.join("agent.sock");
        let (socket, fd) = if host.as_os_str().len() <= SUN_PATH_MAX {
            (host, None)
        } else {
            let f = File::open(&dir).map_err(io("opening"))?;
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
    /// Holds the runner's network namespace at its path, which `runc
    /// checkpoint` looks at; the runner keeps the namespace itself.
    _netns: NetnsHolder,
}

/// Starts a runner for `image` and connects to its agent. `argv`/`env`
/// make the start-up's request (Entrypoint + argv or Cmd, as `ember run`).
fn start_runner(
    host: &SnapshotHost,
    image: &ImageRecord,
    argv: &[String],
    env: &[(String, String)],
) -> Result<FreshRunner, SnapshotError> {
    let t = Instant::now();
    let store = &host.store;
    let config = store.image_config(image)?;
    let id = unique_id("snap");
    let sock = SocketDir::new(store)?;
    // A network namespace of its own that the runner joins: external to
    // CRIU, so no capture or restore locks, saves or recreates it (see
    // ember_runtime::netns).
    let netns = NetnsHolder::spawn().map_err(CheckpointError::from)?;
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
        // No tmpfs for CRIU to tar and untar on every restore.
        mask_with_binds: true,
        netns_path: Some(netns.path()),
        mounts: vec![
            BindMount {
                source: host.agent.clone(),
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
    let layers = store.layer_dirs(image);
    let prepared = Container::new(host.runc.clone(), &id, host.containers.join(&id))
        .prepare(&layers, &runner_config, &spec)
        .map_err(|source| SnapshotError::Prepare {
            image: image.repository.clone(),
            source,
        })?;

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
        return Err(SnapshotError::NoCommand);
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
    let created = host
        .runc
        .create(&id, prepared.bundle(), ContainerStdio::null())?;
    host.runc.start(&id)?;
    let client = AgentClient::connect_timeout(&sock.socket, AGENT_WAIT).map_err(
        SnapshotError::agent(format!("connecting to the agent of runner {id}")),
    )?;
    Ok(FreshRunner {
        prepared,
        pid: created.pid,
        client: Some(client),
        sock,
        request,
        started_in: t.elapsed(),
        _netns: netns,
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
) -> Result<Readiness, SnapshotError> {
    let mut req = runner.request.clone();
    req.timeout_ms = Some(timeout.as_millis() as u64);
    let client = runner
        .client
        .as_mut()
        .ok_or(SnapshotError::AgentConnected)?;
    client
        .exec_until_ready(&req, &mut |_| {}, on_output)
        .map_err(SnapshotError::agent(
            "running the start-up until it is ready",
        ))
}

/// How an exec ended, in words.
pub fn describe(r: &ExecResult) -> String {
    match (r.exit_code, r.signal, &r.spawn_error) {
        (_, _, Some(e)) => format!("could not start: {e}"),
        (_, Some(s), _) => format!("killed by signal {s}"),
        (Some(c), _, _) => format!("exit code {c}"),
        _ => "ended".into(),
    }
}

/// The exit status of an exec as a shell reports it (128+N for signal N,
/// 137 for a timeout).
pub fn exit_code(r: &ExecResult) -> i32 {
    if r.timed_out {
        return 137;
    }
    match (r.exit_code, r.signal) {
        (_, Some(s)) => 128 + s,
        (Some(c), _) => c,
        _ => 125,
    }
}

/// What to capture.
pub struct CaptureRequest<'a> {
    /// The snapshot's name in the store (replaced if it exists).
    pub name: &'a str,
    /// The image, in the store.
    pub image: &'a ImageRecord,
    /// A name of the image, for messages.
    pub image_name: &'a str,
    /// The start-up command (replaces the image's Cmd; its Entrypoint
    /// stays).
    pub argv: &'a [String],
    /// Environment of the start-up, over the image's.
    pub env: &'a [(String, String)],
    /// How long the start-up may take to signal readiness.
    pub ready_timeout: Duration,
    /// When the capture began (the manifest's `capture_ms` counts from
    /// it).
    pub t0: Instant,
}

/// A capture's result and where its time went.
#[derive(Debug)]
pub struct Captured {
    /// The stored snapshot.
    pub manifest: SnapshotManifest,
    /// The start-up, until it signalled readiness.
    pub startup: Duration,
    /// Runner creation until its agent answered.
    pub runner: Duration,
    /// The checkpoint (freeze, CRIU dump, copy of the filesystem changes).
    pub checkpoint: Duration,
    /// Of which CRIU's dump.
    pub dump: Duration,
    /// Packing the checkpoint into the store.
    pub pack: Duration,
}

/// Captures `req`'s start-up as snapshot `req.name`; the start-up's
/// output goes to `on_output`. Blocking.
pub fn capture(
    host: &SnapshotHost,
    req: &CaptureRequest<'_>,
    on_output: &mut dyn FnMut(bool, &[u8]),
) -> Result<Captured, SnapshotError> {
    ember_store::snapshot::validate_name(req.name)?;
    let store = &host.store;
    let mut runner = start_runner(host, req.image, req.argv, req.env)?;
    let t_startup = Instant::now();
    let ready = until_ready(
        &mut runner,
        req.ready_timeout.max(Duration::from_millis(1)),
        on_output,
    );
    let ready = match ready {
        Ok(r) => r,
        Err(e) => {
            cleanup_runner(runner);
            return Err(e);
        }
    };
    let exec_id = match ready {
        Readiness::Ready(r) => r.exec_id,
        Readiness::Exited(r) => {
            cleanup_runner(runner);
            return Err(SnapshotError::NotReady { how: describe(&r) });
        }
    };
    let startup = t_startup.elapsed();
    // CRIU refuses a socket whose peer is outside the container: close
    // ours and wait until the agent closed its end, leaving its listener
    // and the parked start-up's readiness socket.
    runner.client = None;
    let deadline = Instant::now() + AGENT_WAIT;
    while sockets(runner.pid) > 2 {
        if Instant::now() >= deadline {
            cleanup_runner(runner);
            return Err(SnapshotError::AgentConnected);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let dest = store.tmp_path("checkpoint");
    let ckpt = checkpoint::checkpoint(
        &host.runc,
        &host.criu,
        runner.prepared.id(),
        runner.prepared.bundle(),
        &dest,
        &identity(req.image),
        CheckpointOptions::default(),
    );
    let ckpt = match ckpt {
        Ok(c) => c,
        Err(e) => {
            cleanup_runner(runner);
            return Err(e.into());
        }
    };
    let t_pack = Instant::now();
    let packed = store.put_snapshot_dir(&ckpt.dir);
    if packed.is_err() {
        let _ = fs::remove_dir_all(&ckpt.dir);
    }
    let request = runner.request.clone();
    let runner_time = runner.started_in;
    cleanup_runner(runner);
    let (artifact, artifact_bytes, unpacked_bytes) = packed?;
    let pack = t_pack.elapsed();
    let manifest = SnapshotManifest {
        name: req.name.to_owned(),
        artifact,
        artifact_bytes,
        unpacked_bytes,
        image: req.image.manifest.clone(),
        image_name: req.image_name.to_owned(),
        layers: req.image.layers.iter().map(|l| l.diff_id.clone()).collect(),
        start: StartUp {
            argv: request.argv,
            env: request.env,
            cwd: request.cwd,
            uid: request.uid,
            gid: request.gid,
            exec_id,
        },
        metadata: serde_json::to_value(&ckpt.metadata)?,
        capture_ms: req.t0.elapsed().as_millis() as u64,
        created_ms: ember_store::now_ms(),
    };
    store.put_snapshot(&manifest)?;
    // Replacing a snapshot of the same name leaves its artifact unnamed.
    if let Err(e) = store.gc_snapshots_of(None) {
        tracing::warn!(error = %ember_error::chain(&e), "collecting replaced snapshot artifacts");
    }
    Ok(Captured {
        manifest,
        startup,
        runner: runner_time,
        checkpoint: ckpt.total_time,
        dump: ckpt.dump_time,
        pack,
    })
}

/// Destroys a runner (a failure is logged: nothing else can be done).
fn cleanup_runner(mut runner: FreshRunner) {
    runner.client = None;
    if let Err(e) = runner.prepared.cleanup() {
        tracing::warn!(error = %ember_error::chain(&e), "removing a snapshot runner");
    }
}

/// A fresh 256-bit seed from the kernel.
fn fresh_seed() -> Result<String, SnapshotError> {
    let mut b = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .map_err(|source| SnapshotError::Io {
            what: "reading",
            path: "/dev/urandom".into(),
            source,
        })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// What a run hands the start-up through `Resume`.
#[derive(Debug, Clone, Default)]
pub struct ResumeRequest {
    /// The snapshot's name (the `snapshot` field of the message).
    pub name: String,
    /// The run's arguments.
    pub argv: Vec<String>,
    /// The run's environment (`KEY=VALUE`).
    pub env: Vec<String>,
    /// Kill the run after this long.
    pub timeout: Option<Duration>,
}

impl ResumeRequest {
    /// The one JSON line `Resume` carries (docs/agent-protocol.md);
    /// `served` is how many requests the process served before this one
    /// (a copy that parked itself again after each, see
    /// [`PreparedCopy::served`]).
    fn message(&self, restored: bool, served: u32) -> Result<String, SnapshotError> {
        Ok(serde_json::to_string(&serde_json::json!({
            "restored": restored,
            "seed": fresh_seed()?,
            "argv": self.argv,
            "env": self.env,
            "snapshot": self.name,
            "served": served,
        }))?)
    }
}

/// Progress of a run from a snapshot, in order.
#[derive(Debug)]
pub enum RunEvent<'a> {
    /// The copy is restored (its agent not yet connected).
    Restored,
    /// It could not be, or there was no snapshot: the start-up is started
    /// fresh. The reason, for the run's note.
    FreshStart(&'a str),
    /// The start-up is about to be resumed: `exec_id` in the agent
    /// listening on `socket` (to signal it).
    Resuming {
        /// The agent's socket.
        socket: &'a Path,
        /// The parked exec.
        exec_id: u64,
    },
}

/// Where a run from a snapshot spent its start, and how it went.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RunTimings {
    /// Verifying and unpacking the artifact (0 when its copy was there).
    pub unpack: Duration,
    /// The restore phase: metadata checks, copy of the filesystem changes,
    /// overlay mount, `runc restore`.
    pub restore: Option<Duration>,
    /// Of which `runc restore` (CRIU).
    pub criu_restore: Option<Duration>,
    /// A fresh start instead: runner creation until the agent answered.
    pub fresh_start: Option<Duration>,
    /// Fresh start: the start-up until it signalled readiness.
    pub ready: Option<Duration>,
    /// Connecting to the restored agent.
    pub connect: Duration,
    /// When the process ended (from the caller's `t0`).
    pub exit: Duration,
    /// Removing the container.
    pub cleanup: Duration,
    /// Whether the run was restored.
    pub restored: bool,
    /// Why the run did not restore, when it did not.
    pub fallback: Option<String>,
}

/// How a run from a snapshot ended.
#[derive(Debug)]
pub struct RunOutcome {
    /// The resumed exec's result.
    pub result: ExecResult,
    /// Where its start went.
    pub timings: RunTimings,
    /// The restored copy, when its start-up ended the run by parking
    /// itself again (`ready` after the request, `result.parked`): ready to
    /// serve another run of the same snapshot, instead of being removed.
    /// The caller keeps it or [`PreparedCopy::remove`]s it.
    pub kept: Option<PreparedCopy>,
}

/// When a restored copy is removed after its run.
#[derive(Debug, Clone, Copy)]
pub enum Cleanup<'a> {
    /// Before returning: for a process that exits right after the run
    /// (`ember run --snapshot`), which must not leave the copy behind.
    Inline,
    /// On a thread of its own, off the run's critical path, counted in
    /// the [`Cleanups`] given: for the node, whose process outlives the
    /// run and waits for them when it stops (and removes leftovers of an
    /// earlier process at start, should one end first). The run's
    /// `cleanup` time is then 0.
    Background(&'a Cleanups),
}

/// Removals of restored copies running in the background
/// ([`Cleanup::Background`]), so a stopping node can wait for them instead
/// of leaving mounted overlays behind.
#[derive(Debug, Default, Clone)]
pub struct Cleanups(std::sync::Arc<CleanupCount>);

#[derive(Debug, Default)]
struct CleanupCount {
    running: std::sync::Mutex<usize>,
    done: std::sync::Condvar,
}

impl CleanupCount {
    fn count(&self) -> std::sync::MutexGuard<'_, usize> {
        // A counter: consistent whatever a panicking holder did.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Cleanups {
    /// Counts one removal until the guard is dropped.
    fn start(&self) -> CleanupGuard {
        *self.0.count() += 1;
        CleanupGuard(self.0.clone())
    }

    /// Waits until no removal runs, for at most `limit`; how many still
    /// run then.
    pub fn wait(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        let mut n = self.0.count();
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            n = self
                .0
                .done
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *n
    }
}

/// One removal counted in [`Cleanups`].
struct CleanupGuard(std::sync::Arc<CleanupCount>);

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        let mut n = self.0.count();
        *n = n.saturating_sub(1);
        self.0.done.notify_all();
    }
}

/// Restores a copy of `manifest` (whose image is `image`) and resumes its
/// start-up with `req`; if the copy cannot be restored, calls
/// `fallback_ok` with the reason, and unless it says no, starts the
/// captured start-up fresh instead. `t0` is when the run began. The copy
/// is removed before this returns ([`Cleanup::Inline`]).
#[allow(clippy::too_many_arguments)]
pub fn run_from_snapshot(
    host: &SnapshotHost,
    manifest: &SnapshotManifest,
    image: &ImageRecord,
    req: &ResumeRequest,
    t0: Instant,
    fallback_ok: &mut dyn FnMut(&SnapshotError) -> bool,
    on_event: &mut dyn FnMut(RunEvent<'_>),
    on_output: &mut dyn FnMut(bool, &[u8]),
) -> Result<RunOutcome, SnapshotError> {
    run_from_snapshot_with(
        host,
        manifest,
        image,
        req,
        t0,
        Cleanup::Inline,
        fallback_ok,
        on_event,
        on_output,
    )
}

/// A restored copy of a snapshot whose agent is connected and whose
/// start-up is still parked before `Resume`: exactly what a run restores
/// before it resumes. The node keeps some ready ahead of runs
/// ([`deploy`]'s spares); one serves one run and is destroyed after it.
pub struct PreparedCopy {
    restored: checkpoint::Restored,
    client: AgentClient,
    // Removed after the container ([`PreparedCopy::remove`]).
    sock: SocketDir,
    /// The snapshot it was restored from (its artifact names the content).
    pub manifest: SnapshotManifest,
    /// What restoring it took (unpack, restore, CRIU restore, connect).
    pub timings: RunTimings,
    /// When it was ready.
    pub ready_at: Instant,
    /// Runs it served already: 0 for a copy just restored; a copy whose
    /// start-up parks itself again after a run ([`RunOutcome::kept`])
    /// serves the next with its memory as that run left it.
    pub served: u32,
}

impl std::fmt::Debug for PreparedCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedCopy")
            .field("id", &self.restored.id())
            .field("snapshot", &self.manifest.name)
            .field("served", &self.served)
            .finish()
    }
}

impl PreparedCopy {
    /// Destroys the copy (its container, overlay and socket directory)
    /// without running it; a failure is logged.
    pub fn remove(self) {
        let PreparedCopy {
            mut restored,
            client,
            sock,
            ..
        } = self;
        drop(client);
        if let Err(e) = restored.cleanup() {
            tracing::warn!(error = %ember_error::chain(&e), "removing a restored container");
        }
        drop(sock);
    }

    /// Removes the copy as `cleanup` says: now, or on a thread of its own
    /// counted in the node's [`Cleanups`] (`runc delete` and the unmount
    /// take 0.1–0.2 s a run's result does not wait for).
    pub fn remove_with(self, cleanup: Cleanup<'_>) {
        match cleanup {
            Cleanup::Inline => self.remove(),
            Cleanup::Background(cleanups) => {
                let counted = cleanups.start();
                if let Err(e) = std::thread::Builder::new()
                    .name("snapshot-cleanup".into())
                    .spawn(move || {
                        // Runs waiting for a restore come first.
                        lower_priority(CLEANUP_NICENESS);
                        self.remove();
                        drop(counted);
                    })
                {
                    tracing::warn!(error = %e, "no thread to remove a restored container");
                }
            }
        }
    }
}

/// The niceness of a thread that removes a used copy in the background:
/// the lowest, as nothing waits for it but the node's shutdown.
const CLEANUP_NICENESS: i32 = 19;

/// Runs this thread (and the runc and CRIU it starts, which inherit it)
/// at `niceness`, so work nothing waits for (spares, removals) gets the
/// CPU only when runs do not want it.
pub(crate) fn lower_priority(niceness: i32) {
    // SAFETY: setpriority on this thread's own id; no memory is shared.
    let r =
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, niceness) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "lowering a background thread's priority");
    }
}

/// Restores a copy of `manifest` (whose image is `image`) and connects
/// to its agent, leaving the start-up parked: the first half of
/// [`run_from_snapshot_with`].
pub fn prepare_copy(
    host: &SnapshotHost,
    manifest: &SnapshotManifest,
    image: &ImageRecord,
) -> Result<PreparedCopy, SnapshotError> {
    let mut t = RunTimings::default();
    let tu = Instant::now();
    // Held until the restore has read the unpacked copy: the store's
    // budget GC never evicts a snapshot a restore is reading.
    let _claim = host.store.claim_snapshot(manifest)?;
    let (dir, _unpacked) = host.store.unpack_snapshot(manifest)?;
    t.unpack = tu.elapsed();
    let sock = SocketDir::new(&host.store)?;
    let id = unique_id("restore");
    let layers = host.store.layer_dirs(image);
    let rebind = [BindMount {
        source: sock.dir.clone(),
        destination: SOCKET_DIR.into(),
        readonly: false,
    }];
    let mut restored = checkpoint::restore(
        &host.runc,
        &host.criu,
        &dir,
        &RestoreTarget {
            id: &id,
            dir: &host.containers.join(&id),
            layers: &layers,
            image: &identity(image),
            rebind: &rebind,
        },
    )?;
    t.restore = Some(restored.total_time);
    t.criu_restore = Some(restored.restore_time);
    let tc = Instant::now();
    let client = match AgentClient::connect_timeout(&sock.socket, AGENT_WAIT) {
        Ok(c) => c,
        Err(source) => {
            if let Err(e) = restored.cleanup() {
                tracing::warn!(error = %ember_error::chain(&e), "removing a restored container");
            }
            return Err(SnapshotError::Agent {
                what: "connecting to the restored agent".into(),
                source,
            });
        }
    };
    t.connect = tc.elapsed();
    t.restored = true;
    Ok(PreparedCopy {
        restored,
        client,
        sock,
        manifest: manifest.clone(),
        timings: t,
        ready_at: Instant::now(),
        served: 0,
    })
}

/// Resumes a prepared copy's start-up with `req` (a fresh seed, the run's
/// argv and env) and removes the copy as `cleanup` says, unless the
/// start-up parked itself again after the run and `cleanup` is
/// [`Cleanup::Background`]: then the copy comes back in
/// [`RunOutcome::kept`]. The second half of [`run_from_snapshot_with`].
/// `t` holds what the caller measured (for a copy prepared ahead, no
/// restore: it happened before the run).
pub fn resume_copy(
    copy: PreparedCopy,
    req: &ResumeRequest,
    t0: Instant,
    mut t: RunTimings,
    cleanup: Cleanup<'_>,
    on_event: &mut dyn FnMut(RunEvent<'_>),
    on_output: &mut dyn FnMut(bool, &[u8]),
) -> Result<RunOutcome, SnapshotError> {
    let mut copy = copy;
    let resumed = (|| {
        let msg = req.message(true, copy.served)?;
        on_event(RunEvent::Resuming {
            socket: &copy.sock.socket,
            exec_id: copy.manifest.start.exec_id,
        });
        let timeout_ms = req.timeout.map(|d| d.as_millis() as u64);
        copy.client
            .resume(copy.manifest.start.exec_id, &msg, timeout_ms, on_output)
            .map_err(SnapshotError::agent("resuming the restored start-up"))
    })();
    t.exit = t0.elapsed();
    // Kept only by a caller that outlives the run (the node): a process
    // that exits after it must not leave the copy behind.
    if let Ok(result) = &resumed
        && result.parked
        && matches!(cleanup, Cleanup::Background(_))
    {
        copy.served += 1;
        copy.ready_at = Instant::now();
        return Ok(RunOutcome {
            result: resumed?,
            timings: t,
            kept: Some(copy),
        });
    }
    let tc = Instant::now();
    copy.remove_with(cleanup);
    t.cleanup = tc.elapsed();
    Ok(RunOutcome {
        result: resumed?,
        timings: t,
        kept: None,
    })
}

/// [`run_from_snapshot`], removing the restored copy as `cleanup` says.
#[allow(clippy::too_many_arguments)]
pub fn run_from_snapshot_with(
    host: &SnapshotHost,
    manifest: &SnapshotManifest,
    image: &ImageRecord,
    req: &ResumeRequest,
    t0: Instant,
    cleanup: Cleanup<'_>,
    fallback_ok: &mut dyn FnMut(&SnapshotError) -> bool,
    on_event: &mut dyn FnMut(RunEvent<'_>),
    on_output: &mut dyn FnMut(bool, &[u8]),
) -> Result<RunOutcome, SnapshotError> {
    let copy = match prepare_copy(host, manifest, image) {
        Ok(c) => c,
        Err(e) => {
            if !fallback_ok(&e) {
                return Err(e);
            }
            let why = e.why_not_restored();
            on_event(RunEvent::FreshStart(&why));
            let t = RunTimings {
                fallback: Some(why),
                ..RunTimings::default()
            };
            let start = StartWith::Captured(&manifest.start);
            return fresh_start(host, image, &start, req, t0, t, on_event, on_output);
        }
    };
    on_event(RunEvent::Restored);
    let t = copy.timings.clone();
    resume_copy(copy, req, t0, t, cleanup, on_event, on_output)
}

/// What a fresh start runs.
#[derive(Debug)]
pub enum StartWith<'a> {
    /// A captured start-up, exactly as it was (the image's defaults and
    /// Entrypoint already applied).
    Captured(&'a StartUp),
    /// A start-up command over the image's defaults, as a capture would
    /// run it.
    Command {
        /// Replaces the image's Cmd (empty: the Cmd).
        argv: &'a [String],
        /// Over the image's environment.
        env: &'a [(String, String)],
    },
}

/// A fresh start: the start-up in a new runner, resumed with `restored:
/// false` on the same connection once it is ready. `t` holds what the
/// caller measured so far.
#[allow(clippy::too_many_arguments)]
pub fn fresh_start(
    host: &SnapshotHost,
    image: &ImageRecord,
    start: &StartWith<'_>,
    req: &ResumeRequest,
    t0: Instant,
    mut t: RunTimings,
    on_event: &mut dyn FnMut(RunEvent<'_>),
    on_output: &mut dyn FnMut(bool, &[u8]),
) -> Result<RunOutcome, SnapshotError> {
    let mut runner = match start {
        StartWith::Captured(s) => {
            // The captured request already holds the image's defaults and
            // the Entrypoint; start the runner with it as it was.
            let mut r = start_runner(host, image, &s.argv, &[])?;
            r.request.argv = s.argv.clone();
            r.request.env = s.env.clone();
            r.request.cwd = s.cwd.clone();
            r.request.uid = s.uid;
            r.request.gid = s.gid;
            r
        }
        StartWith::Command { argv, env } => start_runner(host, image, argv, env)?,
    };
    t.fresh_start = Some(runner.started_in);
    let tr = Instant::now();
    let result = (|| {
        let ready = until_ready(
            &mut runner,
            req.timeout.unwrap_or(DEFAULT_READY_TIMEOUT),
            on_output,
        )?;
        Ok::<_, SnapshotError>(match ready {
            Readiness::Exited(r) => r,
            Readiness::Ready(ready) => {
                t.ready = Some(tr.elapsed());
                let msg = req.message(false, 0)?;
                on_event(RunEvent::Resuming {
                    socket: &runner.sock.socket,
                    exec_id: ready.exec_id,
                });
                let client = runner
                    .client
                    .as_mut()
                    .ok_or(SnapshotError::AgentConnected)?;
                client
                    .resume(
                        ready.exec_id,
                        &msg,
                        req.timeout.map(|d| d.as_millis() as u64),
                        on_output,
                    )
                    .map_err(SnapshotError::agent("resuming the start-up"))?
            }
        })
    })();
    t.exit = t0.elapsed();
    let tc = Instant::now();
    // A fresh runner is not kept even when its start-up parked itself
    // again: it is not a restored copy, and holds the host's files open.
    cleanup_runner(runner);
    t.cleanup = tc.elapsed();
    Ok(RunOutcome {
        result: result?,
        timings: t,
        kept: None,
    })
}

/// Signals exec `exec_id` through the agent at `socket` (a run's cancel,
/// or a signal the CLI forwards).
pub fn signal_exec(socket: &Path, exec_id: u64, signal: i32) -> Result<(), SnapshotError> {
    AgentClient::connect_timeout(socket, Duration::from_secs(1))
        .and_then(|mut c| c.cancel(exec_id, signal))
        .map_err(SnapshotError::agent(format!("signalling exec {exec_id}")))
}
