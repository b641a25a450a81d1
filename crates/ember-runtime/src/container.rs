//! The high-level lifecycle `ember run` uses: prepare, run, clean up.
//!
//! ```text
//! Container::new(runc, id, dir)
//!     .prepare(layers, image, run)   mount overlay, resolve user, write config.json
//!  -> Prepared::run*()               runc run (or create + start), wait, exit code
//!  -> Prepared::cleanup()            runc state, overlay, container dir: all gone
//! ```
//!
//! Cleanup is guaranteed on every path: a failed `prepare` undoes what it
//! did, and dropping a [`Prepared`] cleans up. A [`ContainerHandle`] lets
//! another thread (the one that catches SIGINT/SIGTERM) forward a signal
//! and clean up while `run` is blocked; cleanup then kills the container,
//! waits for `runc run` to return, and removes everything. It takes locks and
//! spawns runc, so call it from a signal-handling thread or task (tokio's
//! `signal`, `signal-hook`), not from inside an async-signal handler.
//!
//! Each container directory holds a `lock` file, locked (`flock`) for as long
//! as its [`Prepared`] lives. The kernel drops the lock when the process
//! dies, which is how [`crate::recover`](mod@crate::recover) tells leftovers of a killed Ember
//! from containers another Ember process is still running.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;
use oci_spec::image::ImageConfiguration;

use crate::cgroup::Cgroups;
use crate::mount::{MountError, RootFs};
use crate::runc::{self, ContainerStdio, Runc, RuncError, RuncProcess, Signaller};
use crate::spec::{self, RunSpec, SpecError};
use crate::user::{self, ResolvedUser, UserError};

/// Name of the lock file inside a container directory.
pub const LOCK_FILE: &str = "lock";

/// How long cleanup waits for a killed container's `runc run` to return
/// before removing things from under it anyway.
const CLEANUP_WAIT: Duration = Duration::from_secs(10);

/// Errors of the container lifecycle. Each names the container.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The container directory could not be created or locked.
    #[error("cannot set up directory {path} of container {id}")]
    Dir {
        /// The container.
        id: String,
        /// The directory or file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The container directory could not be removed.
    #[error("cannot remove directory {path} of container {id}")]
    RemoveDir {
        /// The container.
        id: String,
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Mounting or unmounting the root filesystem failed.
    #[error("root filesystem of container {id}")]
    Mount {
        /// The container.
        id: String,
        /// Why.
        #[source]
        source: MountError,
    },
    /// The user could not be resolved.
    #[error("user of container {id}")]
    User {
        /// The container.
        id: String,
        /// Why.
        #[source]
        source: UserError,
    },
    /// The runtime configuration could not be built or written.
    #[error("runtime configuration of container {id}")]
    Spec {
        /// The container.
        id: String,
        /// Why.
        #[source]
        source: SpecError,
    },
    /// runc failed (the error names the container).
    #[error(transparent)]
    Runc(#[from] RuncError),
    /// `run` was called while the container was already running.
    #[error("container {id} is already running")]
    AlreadyRunning {
        /// The container.
        id: String,
    },
    /// `run` was called after cleanup.
    #[error("container {id} has been cleaned up")]
    CleanedUp {
        /// The container.
        id: String,
    },
}

impl ContainerError {
    /// The exit code Docker would report for this failure: 127 (command not
    /// found) or 126 (not executable) when runc could not exec the process,
    /// else 125.
    pub fn docker_exit_code(&self) -> i32 {
        match self {
            ContainerError::Runc(e) => e.docker_exit_code(),
            _ => 125,
        }
    }
}

/// How a prepared container is started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StartMode {
    /// One `runc run`: the fastest. Create and start cannot be told apart.
    #[default]
    Run,
    /// `runc create`, `runc start`, wait, `runc delete`: three runc
    /// invocations, so slower, but [`Timings`] separates create from start.
    /// Makes this process a child subreaper (see
    /// [`runc::become_subreaper`]) to collect the exit status.
    CreateStart,
}

/// Options of one run.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// The container's standard streams.
    pub stdio: ContainerStdio,
    /// Kill the container (SIGKILL) if it runs longer than this.
    pub timeout: Option<Duration>,
    /// How to start it.
    pub mode: StartMode,
}

/// Where the time of one container start went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Creating the container directory and mounting the overlay.
    pub mount: Duration,
    /// Resolving the user from the image's `/etc/passwd` and `/etc/group`.
    pub resolve_user: Duration,
    /// Building and writing `config.json`.
    pub config: Duration,
    /// `runc create` ([`StartMode::CreateStart`] only): namespaces, mounts,
    /// cgroups, up to the process waiting to exec.
    pub create: Option<Duration>,
    /// `runc start` ([`StartMode::CreateStart`] only): until the process
    /// was released to exec.
    pub start: Option<Duration>,
    /// From spawning `runc run` (or from `runc start` returning) until the
    /// container exited.
    pub run: Duration,
    /// `runc delete` after exit ([`StartMode::CreateStart`] only; `runc
    /// run` deletes its container itself).
    pub delete: Option<Duration>,
}

impl Timings {
    /// Everything before runc: mount, user, config.
    pub fn prepare(&self) -> Duration {
        self.mount + self.resolve_user + self.config
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// Exit code of the container's process; `128 + N` if killed by signal
    /// N (137 after a timeout).
    pub exit_code: i32,
    /// The timeout expired and the container was killed.
    pub timed_out: bool,
    /// Captured standard output ([`crate::runc::Output::Capture`] only).
    pub stdout: Vec<u8>,
    /// Captured standard error ([`crate::runc::Output::Capture`] only).
    pub stderr: Vec<u8>,
    /// Where the time went.
    pub timings: Timings,
}

/// A container to be prepared: its runc, id and directory.
#[derive(Debug, Clone)]
pub struct Container {
    runc: Runc,
    id: String,
    dir: PathBuf,
    /// Set by [`Container::init_process`].
    init: Option<Vec<String>>,
}

impl Container {
    /// Container `id`, kept in `dir` (the OCI bundle, removed on cleanup).
    pub fn new(runc: Runc, id: impl Into<String>, dir: impl Into<PathBuf>) -> Container {
        Container {
            runc,
            id: id.into(),
            dir: dir.into(),
            init: None,
        }
    }

    /// Makes `argv` the container's process exactly (the image's
    /// `Entrypoint` and `Cmd` are ignored), run as root with the default
    /// capabilities in `/`: for a long-lived init such as the warm pool's
    /// exec agent, which switches each command it runs to the user the
    /// run asked for. That user is still resolved against the image and
    /// reported by [`Prepared::user`]; only the process runs as root.
    pub fn init_process(mut self, argv: Vec<String>) -> Container {
        self.init = Some(argv);
        self
    }

    /// Mounts `layers` (lowest first) at `<dir>/rootfs`, resolves the user
    /// and writes `<dir>/config.json`. On error, whatever was done is undone.
    pub fn prepare<P: AsRef<Path>>(
        self,
        layers: &[P],
        image: &ImageConfiguration,
        run: &RunSpec,
    ) -> Result<Prepared, ContainerError> {
        let Container {
            runc,
            id,
            dir,
            init,
        } = self;
        runc::validate_id(&id)?;
        let dir = std::path::absolute(&dir).map_err(|source| ContainerError::Dir {
            id: id.clone(),
            path: dir.clone(),
            source,
        })?;
        let created_dir = !dir.exists();
        let result = prepare_in(&id, &dir, layers, image, run, init.as_deref());
        match result {
            Ok((lock, rootfs, user, timings, cgroups_path)) => Ok(Prepared {
                inner: Arc::new(Inner {
                    runc,
                    id,
                    dir,
                    state: Mutex::new(State {
                        rootfs: Some(rootfs),
                        lock: Some(lock),
                        running: None,
                        cleaned: false,
                    }),
                    finished: Condvar::new(),
                }),
                user,
                timings,
                cgroups_path,
            }),
            Err(e) => {
                // The RootFs (if any) was dropped, so unmounted, already.
                if created_dir {
                    let _ = fs::remove_dir_all(&dir);
                }
                Err(e)
            }
        }
    }
}

type Prep = (Flock<File>, RootFs, ResolvedUser, Timings, String);

fn prepare_in<P: AsRef<Path>>(
    id: &str,
    dir: &Path,
    layers: &[P],
    image: &ImageConfiguration,
    run: &RunSpec,
    init: Option<&[String]>,
) -> Result<Prep, ContainerError> {
    let mut timings = Timings::default();
    let t = Instant::now();
    let lock = locked_dir(id, dir)?;
    let rootfs = RootFs::mount(dir, layers).map_err(|source| ContainerError::Mount {
        id: id.to_owned(),
        source,
    })?;
    timings.mount = t.elapsed();

    let t = Instant::now();
    let user = user::resolve_user(rootfs.path(), run.effective_user(image)).map_err(|source| {
        ContainerError::User {
            id: id.to_owned(),
            source,
        }
    })?;
    timings.resolve_user = t.elapsed();

    let t = Instant::now();
    let spec_err = |source| ContainerError::Spec {
        id: id.to_owned(),
        source,
    };
    let spec = match init {
        None => spec::build_spec(id, image, run, &user).map_err(spec_err)?,
        Some(argv) => {
            let run = RunSpec {
                args: Some(argv.to_vec()),
                user: None,
                ..run.clone()
            };
            let mut spec =
                spec::build_spec(id, image, &run, &ResolvedUser::root()).map_err(spec_err)?;
            if let Some(p) = spec.process_mut() {
                // build_spec prepends the image's Entrypoint; an init must
                // be exactly the process asked for.
                p.set_args(Some(argv.to_vec()));
                p.set_cwd("/".into());
            }
            spec
        }
    };
    let cgroups_path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("{}/{id}", run.cgroup_parent.trim_end_matches('/')));
    spec::write_config(dir, &spec).map_err(spec_err)?;
    timings.config = t.elapsed();
    Ok((lock, rootfs, user, timings, cgroups_path))
}

/// Creates `dir` with its lock file already held: a new directory is set up
/// under a temporary name (`.new-<id>` beside it) and renamed into place,
/// so [`crate::recover`] (which removes directories whose lock it can
/// take, or that have none) never sees it unlocked. An existing `dir` is
/// locked where it is.
fn locked_dir(id: &str, dir: &Path) -> Result<Flock<File>, ContainerError> {
    let dir_err = |path: &Path| {
        let (id, path) = (id.to_owned(), path.to_path_buf());
        move |source| ContainerError::Dir { id, path, source }
    };
    let lock_in = |d: &Path| {
        let lock_path = d.join(LOCK_FILE);
        let file = File::create(&lock_path).map_err(dir_err(&lock_path))?;
        Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| dir_err(&lock_path)(errno.into()))
    };
    if dir.exists() {
        return lock_in(dir);
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).map_err(dir_err(parent))?;
    let tmp = parent.join(format!(".new-{id}"));
    fs::create_dir(&tmp).map_err(dir_err(&tmp))?;
    let locked = lock_in(&tmp).and_then(|lock| {
        fs::rename(&tmp, dir).map_err(dir_err(dir))?;
        Ok(lock)
    });
    if locked.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    locked
}

/// What is running right now, for signals and cleanup.
#[derive(Debug)]
enum Running {
    /// `run` has begun but runc's process is not known yet.
    Starting,
    /// A `runc run`, signalled through its pidfd.
    Runc(Signaller),
    /// A created/started container, signalled through `runc kill`.
    Created,
}

#[derive(Debug)]
struct State {
    rootfs: Option<RootFs>,
    lock: Option<Flock<File>>,
    running: Option<Running>,
    cleaned: bool,
}

#[derive(Debug)]
struct Inner {
    runc: Runc,
    id: String,
    dir: PathBuf,
    state: Mutex<State>,
    /// Signalled whenever `running` goes back to `None`.
    finished: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not stop cleanup: the state stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn signal(&self, signal: Signal) -> Result<(), ContainerError> {
        let state = self.lock();
        match &state.running {
            // runc forwards what it can catch; SIGKILL and SIGSTOP would hit
            // runc itself and orphan the container, so those go via runc.
            Some(Running::Runc(s)) if !matches!(signal, Signal::SIGKILL | Signal::SIGSTOP) => {
                s.signal(signal).map_err(|source| {
                    ContainerError::Runc(RuncError::Process {
                        op: "run",
                        id: self.id.clone(),
                        what: "forwarding a signal",
                        source,
                    })
                })
            }
            Some(_) => {
                drop(state);
                match self.runc.kill(&self.id, signal, false) {
                    // Not created yet, or already gone.
                    Err(RuncError::NotFound { .. }) => Ok(()),
                    r => r.map_err(ContainerError::from),
                }
            }
            None => Ok(()),
        }
    }

    fn cleanup(&self) -> Result<(), ContainerError> {
        let mut state = self.lock();
        if state.cleaned {
            return Ok(());
        }
        let mut first_error: Option<ContainerError> = None;
        if state.running.is_some() {
            // Kill, and keep killing: runc may still be creating the
            // container, when `runc kill` finds nothing to kill yet.
            let deadline = Instant::now() + CLEANUP_WAIT;
            loop {
                drop(state);
                if let Err(e) = self.runc.kill(&self.id, Signal::SIGKILL, false) {
                    tracing::debug!(id = %self.id, error = %ember_error::chain(&e), "kill during cleanup");
                }
                state = self.lock();
                let (s, _) = self
                    .finished
                    .wait_timeout_while(state, Duration::from_millis(200), |s| s.running.is_some())
                    .unwrap_or_else(|p| p.into_inner());
                state = s;
                if state.running.is_none() || Instant::now() >= deadline {
                    break;
                }
            }
            // Another cleanup may have finished the job meanwhile.
            if state.cleaned {
                return Ok(());
            }
        }
        // `runc run` removes its own state; only look, do not exec runc,
        // unless something is left (a create/start run, a killed runc).
        if self.runc.has_state(&self.id)
            && let Err(e) = self.runc.delete(&self.id, true)
        {
            first_error.get_or_insert(e.into());
        }
        if let Some(mut rootfs) = state.rootfs.take()
            && let Err(source) = rootfs.unmount()
        {
            first_error.get_or_insert(ContainerError::Mount {
                id: self.id.clone(),
                source,
            });
            // Keep it: removing the directory would now reach into the
            // still-mounted layers' overlay.
            state.rootfs = Some(rootfs);
            return first_error.map_or(Ok(()), Err);
        }
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                first_error.get_or_insert(ContainerError::RemoveDir {
                    id: self.id.clone(),
                    path: self.dir.clone(),
                    source,
                });
            }
        }
        state.lock = None;
        state.cleaned = first_error.is_none();
        first_error.map_or(Ok(()), Err)
    }

    fn set_running(&self, running: Option<Running>) {
        let mut state = self.lock();
        state.running = running;
        if state.running.is_none() {
            self.finished.notify_all();
        }
    }
}

/// A prepared container: root filesystem mounted, `config.json` written.
///
/// Dropping it cleans up (errors are logged); call [`Prepared::cleanup`] to
/// see them.
#[derive(Debug)]
pub struct Prepared {
    inner: Arc<Inner>,
    user: ResolvedUser,
    timings: Timings,
    /// The `cgroupsPath` of its `config.json`.
    cgroups_path: String,
}

/// Controls a [`Prepared`] container from another thread: forward signals,
/// clean up. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ContainerHandle {
    inner: Arc<Inner>,
}

impl ContainerHandle {
    /// Sends `signal` to the container's process, if one is running.
    ///
    /// A signal from the terminal (Ctrl-C) reaches `runc run` directly, as it
    /// shares Ember's process group, and runc forwards it; forward only what
    /// was sent to Ember alone (`kill <pid>`), or the container gets it twice.
    pub fn signal(&self, signal: Signal) -> Result<(), ContainerError> {
        self.inner.signal(signal)
    }

    /// Waits up to `timeout` for a run in progress to return; `true` if none
    /// is (any longer) in progress. For a grace period between forwarding
    /// SIGTERM and [`ContainerHandle::cleanup`]'s SIGKILL.
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        let state = self.inner.lock();
        let (state, _) = self
            .inner
            .finished
            .wait_timeout_while(state, timeout, |s| s.running.is_some())
            .unwrap_or_else(|p| p.into_inner());
        state.running.is_none()
    }

    /// Kills the container if it runs, waits for its run to return, and
    /// removes runc state, mounts and the container directory. Idempotent.
    pub fn cleanup(&self) -> Result<(), ContainerError> {
        self.inner.cleanup()
    }
}

impl Prepared {
    /// The container id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The container directory, which is the OCI bundle.
    pub fn bundle(&self) -> &Path {
        &self.inner.dir
    }

    /// The mounted root filesystem, `<bundle>/rootfs`.
    pub fn rootfs(&self) -> PathBuf {
        self.inner.dir.join(crate::mount::ROOTFS_DIR)
    }

    /// The user the process runs as.
    pub fn user(&self) -> &ResolvedUser {
        &self.user
    }

    /// The container's cgroups (its `config.json`'s `cgroupsPath` in every
    /// v1 hierarchy); they exist while it runs.
    pub fn cgroups(&self) -> Cgroups {
        Cgroups::for_path(&self.cgroups_path)
    }

    /// Its `cgroupsPath` (`/ember/<id>`).
    pub fn cgroups_path(&self) -> &str {
        &self.cgroups_path
    }

    /// Starts the container with one foreground `runc run` and returns at
    /// once, for a container that outlives the call (the warm pool's
    /// runners). The caller owns the returned process: it must kill the
    /// container and wait for the process before [`Prepared::cleanup`],
    /// since cleanup does not know of it (nor do [`ContainerHandle`]'s
    /// signals).
    pub fn spawn(&self, stdio: ContainerStdio) -> Result<RuncProcess, ContainerError> {
        {
            let state = self.inner.lock();
            if state.cleaned {
                return Err(ContainerError::CleanedUp {
                    id: self.inner.id.clone(),
                });
            }
            if state.running.is_some() {
                return Err(ContainerError::AlreadyRunning {
                    id: self.inner.id.clone(),
                });
            }
        }
        Ok(self
            .inner
            .runc
            .spawn_run(&self.inner.id, &self.inner.dir, stdio)?)
    }

    /// Time spent preparing (the runc fields are empty).
    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// A handle for signals and cleanup from other threads.
    pub fn handle(&self) -> ContainerHandle {
        ContainerHandle {
            inner: Arc::clone(&self.inner),
        }
    }

    /// Runs the container with inherited stdio until it exits.
    pub fn run(&self) -> Result<RunOutcome, ContainerError> {
        self.run_with(RunOptions::default())
    }

    /// Runs the container with inherited stdio; kills it with SIGKILL if it
    /// runs longer than `timeout` ([`RunOutcome::timed_out`] then says so).
    pub fn run_with_timeout(&self, timeout: Duration) -> Result<RunOutcome, ContainerError> {
        self.run_with(RunOptions {
            timeout: Some(timeout),
            ..RunOptions::default()
        })
    }

    /// Runs the container with the given options until it exits.
    pub fn run_with(&self, opts: RunOptions) -> Result<RunOutcome, ContainerError> {
        {
            // Check and claim in one critical section, so a concurrent
            // cleanup either runs first (and this fails) or sees the run.
            let mut state = self.inner.lock();
            if state.cleaned {
                return Err(ContainerError::CleanedUp {
                    id: self.inner.id.clone(),
                });
            }
            if state.running.is_some() {
                return Err(ContainerError::AlreadyRunning {
                    id: self.inner.id.clone(),
                });
            }
            state.running = Some(Running::Starting);
        }
        let result = match opts.mode {
            StartMode::Run => self.run_foreground(opts),
            StartMode::CreateStart => self.run_created(opts),
        };
        self.inner.set_running(None);
        result
    }

    fn run_foreground(&self, opts: RunOptions) -> Result<RunOutcome, ContainerError> {
        let inner = &*self.inner;
        let mut timings = self.timings;
        let t = Instant::now();
        let process = inner.runc.spawn_run(&inner.id, &inner.dir, opts.stdio)?;
        inner.set_running(Some(Running::Runc(process.signaller())));
        let mut timed_out = false;
        if let Some(timeout) = opts.timeout
            && !process.wait_timeout(timeout)?
        {
            timed_out = true;
            self.kill_after_timeout(|d| process.wait_timeout(d))?;
        }
        let exit = process.wait()?;
        timings.run = t.elapsed();
        Ok(RunOutcome {
            exit_code: exit.exit_code,
            timed_out,
            stdout: exit.stdout,
            stderr: exit.stderr,
            timings,
        })
    }

    /// SIGKILLs the container after a timeout. runc may still be creating
    /// it (then `runc kill` finds nothing), so retry until the process
    /// exits; as a last resort kill runc itself and leave the rest to
    /// cleanup.
    fn kill_after_timeout(
        &self,
        exited_within: impl Fn(Duration) -> Result<bool, RuncError>,
    ) -> Result<(), ContainerError> {
        let inner = &*self.inner;
        for _ in 0..100 {
            match inner.runc.kill(&inner.id, Signal::SIGKILL, false) {
                Ok(()) | Err(RuncError::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(error = %ember_error::chain(&e), "killing timed-out container")
                }
            }
            if exited_within(Duration::from_millis(100))? {
                return Ok(());
            }
        }
        if let Some(Running::Runc(s)) = &inner.lock().running {
            let _ = s.signal(Signal::SIGKILL);
        }
        Ok(())
    }

    fn run_created(&self, opts: RunOptions) -> Result<RunOutcome, ContainerError> {
        let inner = &*self.inner;
        let mut timings = self.timings;
        let proc_err = |what, source| {
            ContainerError::Runc(RuncError::Process {
                op: "create",
                id: inner.id.clone(),
                what,
                source,
            })
        };
        runc::become_subreaper().map_err(|e| proc_err("becoming a subreaper", e))?;
        let t = Instant::now();
        let created = inner.runc.create(&inner.id, &inner.dir, opts.stdio)?;
        timings.create = Some(t.elapsed());
        inner.set_running(Some(Running::Created));
        let readers = [created.stdout.map(reader), created.stderr.map(reader)];

        let t = Instant::now();
        inner.runc.start(&inner.id)?;
        timings.start = Some(t.elapsed());
        let t = Instant::now();
        let mut timed_out = false;
        let code = match runc::wait_container(&inner.id, created.pid, opts.timeout)? {
            Some(code) => code,
            None => {
                timed_out = true;
                // It may exit on its own meanwhile; the wait tells.
                if let Err(e) = inner.runc.kill(&inner.id, Signal::SIGKILL, false) {
                    tracing::debug!(id = %inner.id, error = %ember_error::chain(&e), "kill after timeout");
                }
                runc::wait_container(&inner.id, created.pid, None)?.unwrap_or(137)
            }
        };
        timings.run = t.elapsed();
        let t = Instant::now();
        inner.runc.delete(&inner.id, false)?;
        timings.delete = Some(t.elapsed());
        let [out, err] =
            readers.map(|r| r.map(|h| h.join().unwrap_or_default()).unwrap_or_default());
        Ok(RunOutcome {
            exit_code: code,
            timed_out,
            stdout: out,
            stderr: err,
            timings,
        })
    }

    /// Kills the container if it runs, and removes runc state, the overlay
    /// mount and the container directory. Idempotent.
    pub fn cleanup(&self) -> Result<(), ContainerError> {
        self.inner.cleanup()
    }
}

fn reader<R: io::Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error ends capture; what was read is still returned.
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Err(e) = self.inner.cleanup() {
            tracing::warn!(id = %self.inner.id, error = %ember_error::chain(&e), "cleanup failed");
        }
    }
}
