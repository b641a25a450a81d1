//! One runner: a container whose PID 1 is the exec agent.
//!
//! ```text
//! <pool root>/runners/<id>/
//!     lock          flock'ed by the owning process for the runner's life
//!     runner.json   the pool's record: id, key, image, owner pid, cgroup path
//!     config.json   the OCI bundle's configuration (process: the agent)
//!     rootfs/ upper/ work/   the overlay (see ember_runtime::mount)
//!     run/          mode 0700 root, bind-mounted at /run/ember: agent.sock
//!     workspace/    bind-mounted at /workspace, emptied after every run
//!     tmp/          bind-mounted at /tmp (mode 1777), emptied after every run
//!     var-tmp/      bind-mounted at /var/tmp (mode 1777), emptied after every run
//!     runfs/        bind-mounted at /run (mode 0755), emptied after every run
//!                   except `ember`, the mount point of /run/ember
//!     shm/          a tmpfs (64 MiB, mode 1777) bind-mounted at /dev/shm,
//!                   emptied after every run
//!     agent.log     the agent's (and runc's container) stdout and stderr
//! ```
//!
//! The scratch directories (all but `run/`) exist only when
//! [`PoolConfig::reset_scratch`](crate::PoolConfig::reset_scratch) is on
//! (the default); they live on the host so that the pool can empty them
//! between runs with a few syscalls, without reaching into the overlay
//! (whose upper directory must not change under a mounted overlayfs).
//! They hide whatever the image has at those paths, as a tmpfs would.
//!
//! The runner is an `ember_runtime::Container` (prepared with the agent as
//! its [`init_process`](ember_runtime::Container::init_process)): the
//! runtime mounts the overlay, resolves the user, writes `config.json` and
//! holds the `lock`, and its cleanup removes them, so
//! `ember_runtime::recover` cleans up the runners of a killed pool process
//! like any other leftover container. This module adds what makes it a
//! runner: the scratch directories, the agent's socket, the store claim.
//! [`RuncRuntime`] puts it behind the pool's seam
//! ([`crate::runtime::RunnerRuntime`]).
//!
//! The container is started with one foreground `runc run`
//! ([`Prepared::spawn`]), held as a child of this process; runc removes its
//! state and cgroups when the agent exits. Destroying a runner kills the
//! agent (PID 1 of the container's pid namespace, so the kernel kills
//! everything else in it), waits for runc, and leaves the rest to the
//! runtime's cleanup (runc state, overlay, directory).

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ember_agent_proto::{AgentClient, ClientError, ExecRequest, ExecResult, Pong, Started};
use ember_runtime::cgroup::{Cgroups, MemoryEvents};
use ember_runtime::runc::PidFd;
use ember_runtime::spec::{self, SpecError};
use ember_runtime::user::ResolvedUser;
use ember_runtime::{
    BindMount, Container, ContainerError, ContainerStdio, Input, Output, Prepared, RunSpec, Runc,
    RuncError, runc::RuncProcess,
};
use ember_store::Store;
use nix::sys::signal::Signal;

use crate::error::PoolError;
use crate::key::RunnerSpec;
use crate::pool::{PoolConfig, PoolRecoverReport};
use crate::runtime::{Probe, RunnerContainer, RunnerRuntime};

/// Where the agent binary is bind-mounted inside a runner.
pub const AGENT_PATH: &str = "/.ember/agent";
/// The directory inside a runner that holds the agent's socket.
pub const SOCKET_DIR: &str = "/run/ember";
/// The agent's socket inside a runner.
pub const SOCKET_PATH: &str = "/run/ember/agent.sock";
/// The per-run workspace inside a runner.
pub const WORKSPACE: &str = "/workspace";

/// Name of the pool's own record in a runner directory.
pub const RECORD_FILE: &str = "runner.json";
const RUN_DIR: &str = "run";
const WORKSPACE_DIR: &str = "workspace";
const TMP_DIR: &str = "tmp";
const VAR_TMP_DIR: &str = "var-tmp";
const RUNFS_DIR: &str = "runfs";
const SHM_DIR: &str = "shm";
/// The name of `/run/ember`'s mount point inside `runfs/`: kept by the
/// reset (removing it on the host would detach the agent's socket
/// directory inside the container).
const RUNFS_KEEP: &str = "ember";
/// Options of the runner's `/dev/shm` tmpfs: the size runc's default
/// `/dev/shm` has.
const SHM_OPTIONS: &str = "mode=1777,size=65536k";
const AGENT_LOG: &str = "agent.log";
/// Longest path `connect(2)` takes for a Unix socket (`sun_path` less NUL).
const SUN_PATH_MAX: usize = 107;
/// How long before a run's start a scratch directory's last change must
/// be for its unchanged ctime to prove that the run did not touch it.
/// Timestamps come from the kernel's coarse clock (one tick, up to 10 ms),
/// so a change within the tick of the previous one may leave the ctime as
/// it was; a directory changed that recently is emptied regardless.
const CTIME_MARGIN: Duration = Duration::from_millis(50);
/// How long destroying waits for `runc run` to return after the kill.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// Errors of creating or destroying one runner. Each names the runner.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// A directory or file of the runner could not be set up.
    #[error("runner {id}: cannot set up {path}")]
    Dir {
        /// The runner.
        id: String,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The runtime could not prepare the container (overlay, user,
    /// `config.json`, lock) or clean it up (the error names it).
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// The runtime configuration could not be built or written.
    #[error("runner {id}: runtime configuration")]
    Spec {
        /// The runner.
        id: String,
        /// Why.
        #[source]
        source: SpecError,
    },
    /// runc failed (the error names the container).
    #[error(transparent)]
    Runc(#[from] RuncError),
    /// The container stopped before its agent listened.
    #[error(
        "runner {id}: the container exited ({how}) before the agent listened; agent log: {log}"
    )]
    EarlyExit {
        /// The runner.
        id: String,
        /// Exit code or runc's error.
        how: String,
        /// The end of the agent's log.
        log: String,
    },
    /// The agent did not answer.
    #[error("runner {id}: agent")]
    Agent {
        /// The runner.
        id: String,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// The agent answered a health check but is not idle.
    #[error("runner {id}: agent reports {running} execs still running")]
    NotIdle {
        /// The runner.
        id: String,
        /// Execs the agent still runs.
        running: u32,
    },
    /// A cgroup file could not be written.
    #[error("runner {id}: cgroup {what}")]
    Cgroup {
        /// The runner.
        id: String,
        /// What was done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The store refused the runner's claim on its image.
    #[error("runner {id}: claiming its image in the store")]
    Claim {
        /// The runner.
        id: String,
        /// Why.
        #[source]
        source: Box<ember_store::StoreError>,
    },
}

/// What every runner shares: where runners live and how they are started.
#[derive(Debug, Clone)]
pub(crate) struct Env {
    pub runners_dir: PathBuf,
    pub runc: Runc,
    pub agent_binary: PathBuf,
    pub store: Option<Store>,
    pub create_timeout: Duration,
    pub reset_scratch: bool,
}

/// Defaults of an exec in this runner: the image's environment, working
/// directory and user, resolved once at creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecDefaults {
    /// The image's environment plus `HOSTNAME`, `PATH` and `HOME`.
    pub env: Vec<String>,
    /// The image's working directory, else `/`.
    pub cwd: String,
    /// The user's uid, unless root.
    pub uid: Option<u32>,
    /// The user's gid, unless root.
    pub gid: Option<u32>,
}

impl ExecDefaults {
    /// An exec request for `argv` with these defaults.
    pub fn request<S: Into<String>>(&self, argv: impl IntoIterator<Item = S>) -> ExecRequest {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            env: self.env.clone(),
            cwd: Some(self.cwd.clone()),
            uid: self.uid,
            gid: self.gid,
            ..ExecRequest::default()
        }
    }
}

/// The pool's record of a runner, `runner.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunnerRecord {
    /// Container id.
    pub id: String,
    /// The runner's key.
    pub key: String,
    /// The image's manifest digest.
    pub image: String,
    /// Pid of the process that owns the runner.
    pub owner_pid: u32,
    /// Unix milliseconds when it was created.
    pub created_ms: u64,
    /// Its `cgroupsPath`.
    pub cgroups_path: String,
}

/// The real [`RunnerRuntime`]: runners prepared on
/// [`ember_runtime::Container`] (overlay, user, `config.json`, lock),
/// started with a foreground `runc run`, driven through their agent.
#[derive(Debug, Clone)]
pub struct RuncRuntime {
    env: Env,
}

impl RuncRuntime {
    /// The runtime of a pool whose runners live in `runners_dir` (which
    /// exists, canonical), with `config`'s runc, agent, store and timings.
    /// Fails when the agent binary is not a static executable.
    pub fn new(config: &PoolConfig, runners_dir: PathBuf) -> Result<RuncRuntime, PoolError> {
        check_agent_binary(&config.agent_binary).map_err(|reason| PoolError::AgentBinary {
            path: config.agent_binary.clone(),
            reason,
        })?;
        let agent_binary =
            std::path::absolute(&config.agent_binary).map_err(|source| PoolError::Dir {
                path: config.agent_binary.clone(),
                source,
            })?;
        Ok(RuncRuntime {
            env: Env {
                runners_dir,
                runc: config.runc.clone(),
                agent_binary,
                store: config.store.clone(),
                create_timeout: config.create_timeout,
                reset_scratch: config.reset_scratch,
            },
        })
    }
}

impl RunnerRuntime for RuncRuntime {
    fn create(&self, id: &str, spec: &RunnerSpec) -> Result<Box<dyn RunnerContainer>, RunnerError> {
        Ok(Box::new(Runner::create(&self.env, id, spec)?))
    }

    fn recover(&self) -> Result<PoolRecoverReport, PoolError> {
        crate::recover::recover(&self.env)
    }
}

/// A live runner container. Owned by the pool's idle list or by one lease
/// (through [`RunnerContainer`]).
#[derive(Debug)]
pub(crate) struct Runner {
    id: String,
    dir: PathBuf,
    defaults: ExecDefaults,
    cgroups: Cgroups,
    /// Frozen (the freezer may still be FREEZING).
    frozen: bool,
    /// Path to connect to the agent (possibly via `/proc/self/fd`).
    socket: PathBuf,
    user: ResolvedUser,
    reset_scratch: bool,
    /// `shm/` is mounted (a tmpfs) and must be unmounted on destroy.
    shm_mounted: bool,
    /// The ctime of `workspace/` and each [`SCRATCH`] directory right
    /// after the last reset emptied it.
    reset_ctimes: [Option<(i64, i64)>; 1 + SCRATCH.len()],
    client: Option<AgentClient>,
    process: Option<RuncProcess>,
    init: Option<PidFd>,
    /// The runtime's container: lock, overlay, `config.json`; its cleanup
    /// removes runc state, the overlay and the directory.
    prepared: Option<Prepared>,
    /// Keeps `/proc/self/fd/N` valid when [`Runner::socket`] uses it.
    _run_dir_fd: Option<File>,
    runc: Runc,
    store: Option<Store>,
    claimed: bool,
    destroyed: bool,
    /// `memory.failcnt` and `memory.oom_control`, kept open once both
    /// opened: the pool reads them on every release, and opening two
    /// cgroup files by path each time was about a tenth of the node
    /// agent's CPU per run under a burst.
    memory_files: Mutex<Option<MemoryFiles>>,
}

/// A runner's memory-limit counter files, open.
#[derive(Debug)]
struct MemoryFiles {
    failcnt: File,
    oom_control: File,
}

impl MemoryFiles {
    fn open(cgroups: &Cgroups) -> Option<MemoryFiles> {
        let dir = cgroups.memory_dir()?;
        Some(MemoryFiles {
            failcnt: File::open(dir.join("memory.failcnt")).ok()?,
            oom_control: File::open(dir.join("memory.oom_control")).ok()?,
        })
    }

    /// What [`Cgroups::memory_events`] reads, through the open files
    /// (a cgroup file read from offset 0 shows its current value).
    fn read(&self) -> MemoryEvents {
        let failcnt = read_from_start(&self.failcnt)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        let oom_kill = read_from_start(&self.oom_control)
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0);
        MemoryEvents { failcnt, oom_kill }
    }
}

/// The whole of `file`, read with `pread` from offset 0.
fn read_from_start(file: &File) -> io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 512];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        let n = file.read_at(&mut buf[len..], len as u64)?;
        if n == 0 {
            break;
        }
        len += n;
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

impl Runner {
    /// Creates runner `id` for `spec` and waits until its agent answers.
    /// On error, everything created so far is removed.
    pub fn create(env: &Env, id: &str, spec: &RunnerSpec) -> Result<Runner, RunnerError> {
        let mut r = Runner {
            id: id.to_owned(),
            dir: env.runners_dir.join(id),
            defaults: ExecDefaults {
                env: Vec::new(),
                cwd: "/".into(),
                uid: None,
                gid: None,
            },
            cgroups: Cgroups::for_path(&format!(
                "{}/{id}",
                spec::DEFAULT_CGROUP_PARENT.trim_end_matches('/')
            )),
            frozen: false,
            socket: PathBuf::new(),
            user: ResolvedUser::root(),
            reset_scratch: env.reset_scratch,
            shm_mounted: false,
            reset_ctimes: [None; 1 + SCRATCH.len()],
            client: None,
            process: None,
            init: None,
            prepared: None,
            _run_dir_fd: None,
            runc: env.runc.clone(),
            store: env.store.clone(),
            claimed: false,
            destroyed: false,
            memory_files: Mutex::new(None),
        };
        match r.start(env, spec) {
            Ok(()) => Ok(r),
            Err(e) => {
                if let Err(t) = r.destroy() {
                    tracing::warn!(id, error = %ember_error::chain(&t), "cleaning up a runner that failed to start");
                }
                Err(e)
            }
        }
    }

    fn dir_err(&self, path: &Path) -> impl FnOnce(io::Error) -> RunnerError + use<> {
        let (id, path) = (self.id.clone(), path.to_path_buf());
        move |source| RunnerError::Dir { id, path, source }
    }

    fn start(&mut self, env: &Env, spec: &RunnerSpec) -> Result<(), RunnerError> {
        let id = self.id.clone();
        let image = spec.image();
        let shape = spec.shape();
        if let Some(store) = &self.store {
            store
                .add_user(&id, &image.manifest, std::process::id())
                .map_err(|source| RunnerError::Claim {
                    id: id.clone(),
                    source: Box::new(source),
                })?;
            self.claimed = true;
        }

        // Host directories the container sees; they are created once the
        // runtime has made (and locked) the runner directory, before runc
        // needs them as bind-mount sources.
        let run_dir = self.dir.join(RUN_DIR);
        let workspace = self.dir.join(WORKSPACE_DIR);
        let mut mounts = shape.mounts.clone();
        mounts.push(BindMount {
            source: env.agent_binary.clone(),
            destination: AGENT_PATH.into(),
            readonly: true,
        });
        if env.reset_scratch {
            // Before /run/ember, which is mounted inside /run.
            for s in SCRATCH {
                mounts.push(BindMount {
                    source: self.dir.join(s.host),
                    destination: s.container.into(),
                    readonly: false,
                });
            }
        }
        mounts.push(BindMount {
            source: run_dir.clone(),
            destination: SOCKET_DIR.into(),
            readonly: false,
        });
        mounts.push(BindMount {
            source: workspace.clone(),
            destination: WORKSPACE.into(),
            readonly: false,
        });
        let run = RunSpec {
            user: shape.user.clone(),
            memory_bytes: shape.memory_bytes,
            cpus: shape.cpus,
            pids_limit: shape.pids_limit,
            readonly_rootfs: shape.readonly_rootfs,
            network: shape.network,
            mounts,
            ..RunSpec::default()
        };
        // The agent runs as root with the default capabilities: it must
        // switch each exec to the run's user (resolved here, in the image).
        // Execs as another user lose the capabilities at execve, as under
        // Docker.
        let prepared = Container::new(self.runc.clone(), &id, &self.dir)
            .init_process(agent_argv())
            .prepare(&image.layers, &image.config, &run)?;
        self.user = prepared.user().clone();
        self.cgroups = prepared.cgroups();
        let cgroups_path = prepared.cgroups_path().to_owned();
        self.prepared = Some(prepared);

        // Private to the node: only root on the host may reach the socket.
        make_dir(&run_dir, 0o700, None).map_err(self.dir_err(&run_dir))?;
        make_dir(&workspace, 0o755, Some((self.user.uid, self.user.gid)))
            .map_err(self.dir_err(&workspace))?;
        if env.reset_scratch {
            for s in SCRATCH {
                let path = self.dir.join(s.host);
                make_dir(&path, s.mode, None).map_err(self.dir_err(&path))?;
            }
            let shm = self.dir.join(SHM_DIR);
            nix::mount::mount(
                Some("shm"),
                &shm,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID
                    | nix::mount::MsFlags::MS_NODEV
                    | nix::mount::MsFlags::MS_NOEXEC,
                Some(SHM_OPTIONS),
            )
            .map_err(|e| self.dir_err(&shm)(e.into()))?;
            self.shm_mounted = true;
        }

        let record = RunnerRecord {
            id: id.clone(),
            key: spec.key().to_string(),
            image: image.manifest.to_string(),
            owner_pid: std::process::id(),
            created_ms: ember_store::now_ms(),
            cgroups_path,
        };
        let record_path = self.dir.join(RECORD_FILE);
        let bytes = serde_json::to_vec_pretty(&record).map_err(|e| RunnerError::Dir {
            id: id.clone(),
            path: record_path.clone(),
            source: e.into(),
        })?;
        // No fsync: a crash loses the runner anyway, and recovery works
        // from the lock and config.json too.
        fs::write(&record_path, bytes).map_err(self.dir_err(&record_path))?;

        let spec_err = |source| RunnerError::Spec {
            id: id.clone(),
            source,
        };
        let hostname = id.clone();
        self.defaults = ExecDefaults {
            env: spec::process_env(&image.config, &[], &hostname, &self.user.home)
                .map_err(spec_err)?,
            cwd: spec::process_cwd(&image.config, &RunSpec::default()).map_err(spec_err)?,
            uid: (self.user.uid != 0 || self.user.gid != 0).then_some(self.user.uid),
            gid: (self.user.uid != 0 || self.user.gid != 0).then_some(self.user.gid),
        };

        // The agent's output (and runc's container errors) go to a log file
        // next to the bundle, for post-mortems.
        let log_path = self.dir.join(AGENT_LOG);
        let log = File::create(&log_path).map_err(self.dir_err(&log_path))?;
        let log2 = log.try_clone().map_err(self.dir_err(&log_path))?;
        let stdio = ContainerStdio {
            stdin: Input::Null,
            stdout: Output::Fd(log.into()),
            stderr: Output::Fd(log2.into()),
        };
        let host_socket = run_dir.join("agent.sock");
        self.socket = if host_socket.as_os_str().len() <= SUN_PATH_MAX {
            host_socket
        } else {
            // Too long for sun_path: connect through a descriptor of the
            // directory instead, which the kernel resolves like any path.
            let f = File::open(&run_dir).map_err(self.dir_err(&run_dir))?;
            let p = PathBuf::from(format!("/proc/self/fd/{}/agent.sock", f.as_raw_fd()));
            self._run_dir_fd = Some(f);
            p
        };

        let process = self
            .prepared
            .as_ref()
            .ok_or_else(|| ContainerError::CleanedUp { id: id.clone() })?
            .spawn(stdio)?;
        self.process = Some(process);
        let client = self.connect(env.create_timeout)?;
        self.client = Some(client);
        // The agent is the only process yet: remember it to kill it later
        // without exec'ing runc.
        if let Ok(procs) = self.cgroups.procs()
            && let [pid] = procs[..]
        {
            self.init = PidFd::open(pid).ok();
        }
        Ok(())
    }

    /// Connects to the agent, retrying until it listens, and fails early
    /// if runc exits first.
    fn connect(&mut self, timeout: Duration) -> Result<AgentClient, RunnerError> {
        let deadline = Instant::now() + timeout;
        // Wait for the socket to appear, watching runc: a container that
        // fails to start should fail the create at once, not at the
        // deadline. The socket only appears once the agent runs, so this
        // also keeps a slow start from eating into the hello's time.
        let mut pause = Duration::from_micros(200);
        while !self.socket.exists() {
            let exited = match &self.process {
                Some(p) => p.wait_timeout(pause)?,
                None => true,
            };
            if exited {
                let how = match self.process.take().map(RuncProcess::wait) {
                    Some(Ok(exit)) => format!("exit code {}", exit.exit_code),
                    Some(Err(e)) => ember_error::chain(&e).to_string(),
                    None => "no runc process".into(),
                };
                return Err(RunnerError::EarlyExit {
                    id: self.id.clone(),
                    how,
                    log: self.log_tail(),
                });
            }
            if Instant::now() >= deadline {
                return Err(RunnerError::Agent {
                    id: self.id.clone(),
                    source: ClientError::Connect {
                        path: self.socket.clone(),
                        source: io::ErrorKind::TimedOut.into(),
                    },
                });
            }
            pause = (pause * 2).min(Duration::from_millis(10));
        }
        // Between bind and listen the agent refuses connections;
        // connect_timeout retries those.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        AgentClient::connect_timeout(&self.socket, left).map_err(|source| RunnerError::Agent {
            id: self.id.clone(),
            source,
        })
    }

    /// The last lines of the agent's log.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.dir.join(AGENT_LOG)) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(5);
        let tail = lines[start..].join(" | ");
        if tail.is_empty() {
            "(empty)".into()
        } else {
            tail
        }
    }

    /// The agent connection. Only a destroyed runner has none.
    pub fn client(&mut self) -> Result<&mut AgentClient, ClientError> {
        self.client.as_mut().ok_or(ClientError::Broken)
    }

    /// Pings the agent within `timeout` and checks that nothing runs.
    pub fn health_check(&mut self, timeout: Duration) -> Result<Pong, RunnerError> {
        let id = self.id.clone();
        let agent_err = |source| RunnerError::Agent {
            id: id.clone(),
            source,
        };
        let client = self.client().map_err(agent_err)?;
        client
            .set_timeout(Some(timeout))
            .map_err(|e| agent_err(ClientError::Io(e)))?;
        let pong = client.ping();
        // A timed-out ping breaks the client, and it is then never used
        // again; otherwise execs must be free to run for as long as they
        // like.
        let reset = client.set_timeout(None);
        let pong = pong.map_err(agent_err)?;
        reset.map_err(|e| agent_err(ClientError::Io(e)))?;
        if pong.running != 0 {
            return Err(RunnerError::NotIdle {
                id: self.id.clone(),
                running: pong.running,
            });
        }
        Ok(pong)
    }

    /// Freezes the runner (returns before the freezer settles).
    pub fn freeze(&mut self) -> Result<(), RunnerError> {
        self.cgroups
            .freeze()
            .map_err(|source| RunnerError::Cgroup {
                id: self.id.clone(),
                what: "freeze",
                source,
            })?;
        self.frozen = true;
        Ok(())
    }

    /// Thaws a runner the pool froze.
    pub fn thaw(&mut self) -> Result<(), RunnerError> {
        self.cgroups.thaw().map_err(|source| RunnerError::Cgroup {
            id: self.id.clone(),
            what: "thaw",
            source,
        })?;
        self.frozen = false;
        Ok(())
    }

    /// Empties `/workspace` and the scratch directories (`/tmp`,
    /// `/var/tmp`, `/run` but `/run/ember`, `/dev/shm`) and restores their
    /// owner and mode for the next run.
    ///
    /// A directory whose ctime is still the one it had right after the
    /// previous reset, from well before this lease began, is skipped: it
    /// was empty then, and adding, removing or renaming an entry, or
    /// changing its mode, owner or times, would have moved its ctime (which
    /// a run cannot set back). That keeps the reset after a run that wrote
    /// nothing at one `lstat` per directory.
    pub fn reset_scratch(&mut self, lease_started: SystemTime) -> io::Result<()> {
        let user = (self.user.uid, self.user.gid);
        let mut dirs = vec![(WORKSPACE_DIR, 0o755, user, None)];
        if self.reset_scratch {
            dirs.extend(SCRATCH.iter().map(|s| (s.host, s.mode, (0, 0), s.keep)));
        }
        let settled = lease_started.checked_sub(CTIME_MARGIN);
        for (i, (name, mode, owner, keep)) in dirs.into_iter().enumerate() {
            let path = self.dir.join(name);
            let now = ctime_of(&path)?;
            let untouched =
                self.reset_ctimes[i] == Some(now) && settled.is_some_and(|t| system_time(now) < t);
            if untouched {
                continue;
            }
            empty_dir(&path, keep)?;
            restore_dir(&path, mode, owner)?;
            self.reset_ctimes[i] = Some(ctime_of(&path)?);
        }
        Ok(())
    }

    /// The host path of the runner's `/workspace`.
    pub fn workspace(&self) -> PathBuf {
        self.dir.join(WORKSPACE_DIR)
    }

    /// Kills the container and removes everything it had: runc state,
    /// cgroups, the overlay mount, the directory and the store claim.
    /// Idempotent; the first error is returned after every step was tried.
    pub fn destroy(&mut self) -> Result<(), RunnerError> {
        if self.destroyed {
            return Ok(());
        }
        let mut first: Option<RunnerError> = None;
        // Not held open while the cgroups are removed.
        *self
            .memory_files
            .get_mut()
            .unwrap_or_else(|e| e.into_inner()) = None;
        // Frozen tasks do not act on SIGKILL until thawed.
        if self.frozen || self.cgroups.freezer_dir().is_some_and(Path::exists) {
            let _ = self.cgroups.thaw();
            self.frozen = false;
        }
        self.client = None;
        if let Some(p) = self.process.take() {
            let killed = self
                .init
                .as_ref()
                .is_some_and(|fd| fd.send_signal(Signal::SIGKILL).is_ok());
            if !killed {
                match self.runc.kill(&self.id, Signal::SIGKILL, true) {
                    Ok(()) | Err(RuncError::NotFound { .. }) => {}
                    Err(e) => {
                        tracing::debug!(id = %self.id, error = %ember_error::chain(&e), "runc kill")
                    }
                }
            }
            let mut exited = p.wait_timeout(EXIT_WAIT).unwrap_or(false);
            if !exited {
                tracing::warn!(id = %self.id, "runc run did not return after the kill; killing runc");
                let _ = p.signaller().signal(Signal::SIGKILL);
                exited = p.wait_timeout(EXIT_WAIT).unwrap_or(false);
            }
            if exited {
                // The exit status tells nothing new: the agent was killed.
                let _ = p.wait();
            } else {
                // Leak the child rather than block forever on it.
                std::mem::forget(p);
            }
        }
        self.init = None;
        // runc removes the cgroups when the agent exits; a runc killed
        // halfway leaves them behind.
        if let Err(e) = self.cgroups.remove_leftovers() {
            first.get_or_insert(RunnerError::Cgroup {
                id: self.id.clone(),
                what: "remove",
                source: e,
            });
        }
        if self.shm_mounted {
            // Detached: the container's bind of it is gone with its mount
            // namespace, but a lazy unmount never fails for a busy one.
            match nix::mount::umount2(&self.dir.join(SHM_DIR), nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {
                    self.shm_mounted = false
                }
                Err(e) => {
                    // Keep the directory: removing it would empty the
                    // still-mounted tmpfs and then fail.
                    return Err(first.unwrap_or(RunnerError::Dir {
                        id: self.id.clone(),
                        path: self.dir.join(SHM_DIR),
                        source: e.into(),
                    }));
                }
            }
        }
        self._run_dir_fd = None;
        // The runtime's cleanup: runc state if any is left, the overlay,
        // the directory and (last) the lock.
        if let Some(prepared) = self.prepared.take()
            && let Err(e) = prepared.cleanup()
        {
            // Kept, so that the next destroy (or the drop) tries again.
            self.prepared = Some(prepared);
            first.get_or_insert(e.into());
        }
        // The claim keeps the store from removing the layers; it goes only
        // once nothing of the runner can still have them mounted.
        if self.prepared.is_none()
            && self.claimed
            && let Some(store) = &self.store
        {
            store.remove_user(&self.id);
            self.claimed = false;
        }
        self.destroyed = first.is_none();
        first.map_or(Ok(()), Err)
    }
}

impl RunnerContainer for Runner {
    fn id(&self) -> &str {
        &self.id
    }

    fn defaults(&self) -> &ExecDefaults {
        &self.defaults
    }

    fn health_check(&mut self, timeout: Duration) -> Result<(), RunnerError> {
        Runner::health_check(self, timeout).map(drop)
    }

    fn alive(&self) -> bool {
        // The agent is the container's init (when its pid was found at
        // start): its pidfd turns readable once it exits.
        self.init
            .as_ref()
            .is_some_and(|p| matches!(p.wait_readable(Duration::ZERO), Ok(false)))
    }

    fn freeze(&mut self) -> Result<(), RunnerError> {
        Runner::freeze(self)
    }

    fn thaw(&mut self) -> Result<(), RunnerError> {
        Runner::thaw(self)
    }

    fn probe(&self) -> Arc<dyn Probe> {
        Arc::new(self.cgroups.clone())
    }

    fn memory_events(&self) -> MemoryEvents {
        let mut files = self.memory_files.lock().unwrap_or_else(|e| e.into_inner());
        if files.is_none() {
            *files = MemoryFiles::open(&self.cgroups);
        }
        match &*files {
            Some(f) => f.read(),
            // Not there (yet): read by path, as the cgroup says.
            None => self.cgroups.memory_events(),
        }
    }

    fn exec(
        &mut self,
        req: &ExecRequest,
        on_started: &mut dyn FnMut(&Started),
        on_output: &mut dyn FnMut(bool, &[u8]),
    ) -> Result<ExecResult, ClientError> {
        self.client()?.exec_with(req, on_started, on_output)
    }

    fn reset_scratch(&mut self, lease_started: SystemTime) -> io::Result<()> {
        Runner::reset_scratch(self, lease_started)
    }

    fn workspace(&self) -> PathBuf {
        Runner::workspace(self)
    }

    fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    fn cgroups(&self) -> &Cgroups {
        &self.cgroups
    }

    fn destroy(&mut self) -> Result<(), RunnerError> {
        Runner::destroy(self)
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Err(e) = self.destroy() {
            tracing::warn!(id = %self.id, error = %ember_error::chain(&e), "destroying runner");
        }
    }
}

/// The agent's command line inside a runner.
fn agent_argv() -> Vec<String> {
    vec![AGENT_PATH.into(), "--socket".into(), SOCKET_PATH.into()]
}

fn make_dir(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    fs::create_dir(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    if let Some((uid, gid)) = owner {
        chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// The ctime of `path` itself (not followed), seconds and nanoseconds.
fn ctime_of(path: &Path) -> io::Result<(i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(path)?;
    Ok((meta.ctime(), meta.ctime_nsec()))
}

/// A `(seconds, nanoseconds)` timestamp as a `SystemTime`.
fn system_time((secs, nanos): (i64, i64)) -> SystemTime {
    let d = Duration::new(secs.unsigned_abs(), nanos.clamp(0, 999_999_999) as u32);
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + d
    } else {
        SystemTime::UNIX_EPOCH - d
    }
}

fn restore_dir(path: &Path, mode: u32, (uid, gid): (u32, u32)) -> io::Result<()> {
    // lchown/chmod of the directory itself: a run cannot replace the
    // directory (it is a mount point), only change its owner or mode.
    let meta = fs::symlink_metadata(path)?;
    use std::os::unix::fs::MetadataExt;
    if meta.mode() & 0o7777 != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    if meta.uid() != uid || meta.gid() != gid {
        chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// A scratch directory: a host directory bind-mounted into the runner and
/// emptied after every run.
struct Scratch {
    /// Its name in the runner directory.
    host: &'static str,
    /// Where the runner sees it.
    container: &'static str,
    /// Its mode (root-owned).
    mode: u32,
    /// An entry the reset keeps.
    keep: Option<&'static str>,
}

/// The scratch directories, in mount order (`/run` before `/run/ember`).
const SCRATCH: [Scratch; 4] = [
    Scratch {
        host: TMP_DIR,
        container: "/tmp",
        mode: 0o1777,
        keep: None,
    },
    Scratch {
        host: VAR_TMP_DIR,
        container: "/var/tmp",
        mode: 0o1777,
        keep: None,
    },
    Scratch {
        host: RUNFS_DIR,
        container: "/run",
        mode: 0o755,
        keep: Some(RUNFS_KEEP),
    },
    Scratch {
        host: SHM_DIR,
        container: "/dev/shm",
        mode: 0o1777,
        keep: None,
    },
];

/// Removes everything inside `dir` but the entry named `keep`, without
/// following symlinks.
fn empty_dir(dir: &Path, keep: Option<&str>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if keep.is_some_and(|k| entry.file_name() == k) {
            continue;
        }
        let path = entry.path();
        // file_type() does not follow symlinks, and remove_dir_all does
        // not either, so a link the run left cannot point the deletion
        // at host files.
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Checks that `path` is a statically linked ELF executable: it is
/// bind-mounted into images that may have no C library (or another one),
/// so a dynamically linked agent would fail to start in some runners only.
pub(crate) fn check_agent_binary(path: &Path) -> Result<(), String> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("not executable".into());
    }
    let mut head = vec![0u8; 64];
    f.read_exact(&mut head)
        .map_err(|_| "too short for an ELF file".to_string())?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let phoff = u64::from_le_bytes(head[32..40].try_into().map_err(|_| "bad header")?);
    let phentsize = u16_at(&head, 54);
    let phnum = u16_at(&head, 56);
    if phentsize < 4 || phnum > 4096 {
        return Err("malformed program headers".into());
    }
    let mut table = vec![0u8; (phentsize * phnum) as usize];
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(phoff)).map_err(|e| e.to_string())?;
    f.read_exact(&mut table)
        .map_err(|_| "truncated program headers".to_string())?;
    const PT_INTERP: u32 = 3;
    if table
        .chunks(phentsize as usize)
        .any(|ph| u32_at(ph, 0) == PT_INTERP)
    {
        return Err("dynamically linked (build it with crates/ember-agent/build-static.sh)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_check_tells_static_from_dynamic() {
        // The test binary itself is dynamically linked.
        let me = std::env::current_exe().unwrap();
        let e = check_agent_binary(&me).unwrap_err();
        assert!(e.contains("dynamically linked"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        fs::write(&p, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_agent_binary(&p).is_err());
        // Busybox on this machine is static (busybox-static).
        if Path::new("/bin/busybox").exists()
            && let Err(e) = check_agent_binary(Path::new("/bin/busybox"))
        {
            assert!(e.contains("dynamically"), "{e}");
        }
    }

    #[test]
    fn empty_dir_does_not_follow_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"x").unwrap();
        let ws = d.path().join("ws");
        fs::create_dir_all(ws.join("a/b")).unwrap();
        fs::write(ws.join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, ws.join("link")).unwrap();
        std::os::unix::fs::symlink(&outside, ws.join("a/link")).unwrap();
        empty_dir(&ws, None).unwrap();
        assert_eq!(fs::read_dir(&ws).unwrap().count(), 0);
        assert!(outside.join("keep").exists());
    }
}
