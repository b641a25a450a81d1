//! Driving the `runc` command line.
//!
//! Every call spawns `runc --root <root> …` directly (no shell), so Ember
//! keeps its containers in its own runc state directory, apart from any
//! other user of runc on the machine.
//!
//! [`Runc::spawn_run`] is the fast path: one `runc run` in the foreground,
//! without a terminal, so the container's stdio are runc's own (inherited,
//! piped or any descriptor) and output streams straight through. runc
//! forwards the signals it receives to the container, and removes the
//! container's state and cgroup when it exits, so a plain run needs no
//! `runc delete`. [`Runc::create`] and [`Runc::start`] split the same work in
//! two for callers that prepare containers ahead of time; see
//! [`become_subreaper`] for how to collect such a container's exit status.
//!
//! Exit codes follow the shell: a process killed by signal N is `128 + N`.
//! Failures of runc itself (as opposed to the container exiting non-zero)
//! are recognised from runc's JSON log, `<bundle>/runc.log`.

use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags};
use nix::sys::signal::Signal;
use nix::sys::time::TimeSpec;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use serde::Deserialize;

/// Name of runc's log inside a bundle.
pub const LOG_FILE: &str = "runc.log";
/// Name of the file `runc create` writes the container's pid to.
pub const PID_FILE: &str = "init.pid";

/// Errors from driving runc. Each names the container it concerns.
#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    /// An id runc would reject (or one that could escape its state dir).
    #[error("invalid container id {id:?}: use 1-128 characters from [A-Za-z0-9_+.-], not . or ..")]
    InvalidId {
        /// The id.
        id: String,
    },
    /// The runc binary could not be executed.
    #[error("cannot execute {binary} for `runc {op}` of container {id}")]
    Spawn {
        /// The subcommand.
        op: &'static str,
        /// The container.
        id: String,
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// runc ran and failed.
    #[error("runc {op} of container {id} failed ({status}): {stderr}")]
    Failed {
        /// The subcommand.
        op: &'static str,
        /// The container.
        id: String,
        /// How runc exited.
        status: String,
        /// What runc said (stderr, or the errors of its log).
        stderr: String,
    },
    /// The container does not exist in this runc root.
    #[error("container {id} does not exist")]
    NotFound {
        /// The container.
        id: String,
    },
    /// runc's JSON output could not be parsed.
    #[error("cannot parse the output of runc {op} for container {id}")]
    Parse {
        /// The subcommand.
        op: &'static str,
        /// The container (empty for `list`).
        id: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Waiting for, signalling or reading from a process failed.
    #[error("runc {op} of container {id}: {what}")]
    Process {
        /// The subcommand.
        op: &'static str,
        /// The container.
        id: String,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl RuncError {
    /// The exit code Docker reports for this failure: 127 when the command
    /// was not found, 126 when it could not be executed, 125 otherwise
    /// (the runtime itself failed).
    pub fn docker_exit_code(&self) -> i32 {
        match self {
            RuncError::Failed { stderr, .. }
                if stderr.contains("executable file not found")
                    || stderr.contains("no such file or directory") =>
            {
                127
            }
            RuncError::Failed { stderr, .. } if stderr.contains("permission denied") => 126,
            _ => 125,
        }
    }
}

/// Where a container's standard input comes from.
#[derive(Debug, Default)]
pub enum Input {
    /// The caller's own standard input.
    #[default]
    Inherit,
    /// `/dev/null`.
    Null,
    /// Any readable descriptor.
    Fd(OwnedFd),
}

/// Where a container's standard output or error goes.
#[derive(Debug, Default)]
pub enum Output {
    /// The caller's own descriptor: output streams straight through.
    #[default]
    Inherit,
    /// `/dev/null`.
    Null,
    /// Collected in memory and returned when the container exits.
    Capture,
    /// Any writable descriptor (a log file, a socket, a pipe).
    Fd(OwnedFd),
}

/// The standard streams of a container (and of the runc that starts it).
#[derive(Debug, Default)]
pub struct ContainerStdio {
    /// Standard input.
    pub stdin: Input,
    /// Standard output.
    pub stdout: Output,
    /// Standard error.
    pub stderr: Output,
}

impl ContainerStdio {
    /// Input from `/dev/null`, output and error captured.
    pub fn captured() -> ContainerStdio {
        ContainerStdio {
            stdin: Input::Null,
            stdout: Output::Capture,
            stderr: Output::Capture,
        }
    }

    /// Everything to `/dev/null`.
    pub fn null() -> ContainerStdio {
        ContainerStdio {
            stdin: Input::Null,
            stdout: Output::Null,
            stderr: Output::Null,
        }
    }

    fn apply(self, cmd: &mut Command) {
        cmd.stdin(match self.stdin {
            Input::Inherit => Stdio::inherit(),
            Input::Null => Stdio::null(),
            Input::Fd(fd) => Stdio::from(fd),
        });
        cmd.stdout(output(self.stdout));
        cmd.stderr(output(self.stderr));
    }
}

fn output(o: Output) -> Stdio {
    match o {
        Output::Inherit => Stdio::inherit(),
        Output::Null => Stdio::null(),
        Output::Capture => Stdio::piped(),
        Output::Fd(fd) => Stdio::from(fd),
    }
}

/// How a container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunExit {
    /// Exit code; `128 + N` when killed by signal N.
    pub exit_code: i32,
    /// Captured standard output ([`Output::Capture`] only).
    pub stdout: Vec<u8>,
    /// Captured standard error ([`Output::Capture`] only).
    pub stderr: Vec<u8>,
}

/// A container's status as runc reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerStatus {
    /// Being created.
    Creating,
    /// Created, waiting for `runc start`.
    Created,
    /// Its process runs.
    Running,
    /// Frozen.
    Paused,
    /// Its process has exited.
    Stopped,
    /// Something newer runc versions report.
    #[serde(other)]
    Unknown,
}

/// One container of `runc state` / `runc list`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ContainerState {
    /// Container id.
    pub id: String,
    /// Pid of the container's init process on the host (0 when stopped).
    #[serde(default)]
    pub pid: i32,
    /// Status.
    pub status: ContainerStatus,
    /// Bundle directory.
    #[serde(default)]
    pub bundle: PathBuf,
    /// Root filesystem.
    #[serde(default)]
    pub rootfs: PathBuf,
    /// Creation time (RFC 3339).
    #[serde(default)]
    pub created: String,
}

/// A created (not yet started) container.
#[derive(Debug)]
pub struct Created {
    /// Pid of the container's init process.
    pub pid: i32,
    /// Read end of its standard output, for [`Output::Capture`].
    pub stdout: Option<ChildStdout>,
    /// Read end of its standard error, for [`Output::Capture`].
    pub stderr: Option<ChildStderr>,
}

/// The runc binary and the state directory it keeps containers in.
#[derive(Debug, Clone)]
pub struct Runc {
    binary: PathBuf,
    root: PathBuf,
}

impl Runc {
    /// `runc` from `PATH`, keeping state in `root` (for Ember,
    /// `<ember root>/runc`).
    pub fn new(root: impl Into<PathBuf>) -> Runc {
        Runc {
            binary: PathBuf::from("runc"),
            root: root.into(),
        }
    }

    /// Uses another runc binary.
    pub fn with_binary(mut self, binary: impl Into<PathBuf>) -> Runc {
        self.binary = binary.into();
        self
    }

    /// The runc binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The state directory (`runc --root`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether runc holds state for `id`, by looking at its state directory
    /// instead of running `runc state` (a directory lookup against ~10 ms).
    pub fn has_state(&self, id: &str) -> bool {
        validate_id(id).is_ok() && self.root.join(id).exists()
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        cmd
    }

    /// Starts `runc run --bundle <bundle> <id>` in the foreground and returns
    /// without waiting. Use [`RuncProcess::wait`] for the exit code.
    pub fn spawn_run(
        &self,
        id: &str,
        bundle: &Path,
        stdio: ContainerStdio,
    ) -> Result<RuncProcess, RuncError> {
        validate_id(id)?;
        let log = bundle.join(LOG_FILE);
        // A stale log would make a clean exit look like a runc failure.
        let _ = fs::remove_file(&log);
        let mut cmd = self.command();
        cmd.arg("--log")
            .arg(&log)
            .args(["--log-format", "json", "run", "--bundle"])
            .arg(bundle)
            .arg(id);
        stdio.apply(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| RuncError::Spawn {
            op: "run",
            id: id.to_owned(),
            binary: self.binary.clone(),
            source,
        })?;
        let pidfd = match PidFd::open(child.id() as i32) {
            Ok(fd) => Arc::new(fd),
            Err(source) => {
                // Without a pidfd this process could not be signalled or
                // timed safely; do not leave it running.
                let _ = child.kill();
                let _ = child.wait();
                return Err(RuncError::Process {
                    op: "run",
                    id: id.to_owned(),
                    what: "pidfd_open",
                    source,
                });
            }
        };
        let stdout = child.stdout.take().map(reader);
        let stderr = child.stderr.take().map(reader);
        Ok(RuncProcess {
            id: id.to_owned(),
            child,
            pidfd,
            stdout,
            stderr,
            log,
        })
    }

    /// Runs container `id` from `bundle` to completion.
    pub fn run(
        &self,
        id: &str,
        bundle: &Path,
        stdio: ContainerStdio,
    ) -> Result<RunExit, RuncError> {
        self.spawn_run(id, bundle, stdio)?.wait()
    }

    /// `runc create --bundle <bundle> --pid-file <bundle>/init.pid <id>`.
    ///
    /// The container's init inherits `stdio` and waits for [`Runc::start`].
    /// When `runc create` exits, the init is re-parented to the nearest
    /// subreaper, so only a process that called [`become_subreaper`] can
    /// collect its exit status (see [`wait_container`]).
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        stdio: ContainerStdio,
    ) -> Result<Created, RuncError> {
        validate_id(id)?;
        let log = bundle.join(LOG_FILE);
        let pid_file = bundle.join(PID_FILE);
        let _ = fs::remove_file(&log);
        let mut cmd = self.command();
        cmd.arg("--log")
            .arg(&log)
            .args(["--log-format", "json", "create", "--bundle"])
            .arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id);
        stdio.apply(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| RuncError::Spawn {
            op: "create",
            id: id.to_owned(),
            binary: self.binary.clone(),
            source,
        })?;
        // The pipes stay open in the container; only wait for runc itself.
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let status = child.wait().map_err(|source| RuncError::Process {
            op: "create",
            id: id.to_owned(),
            what: "wait",
            source,
        })?;
        if !status.success() {
            return Err(RuncError::Failed {
                op: "create",
                id: id.to_owned(),
                status: describe(status),
                stderr: log_errors(&log).unwrap_or_default(),
            });
        }
        let pid = fs::read_to_string(&pid_file)
            .map_err(|source| RuncError::Process {
                op: "create",
                id: id.to_owned(),
                what: "reading the pid file",
                source,
            })?
            .trim()
            .parse()
            .map_err(|_| RuncError::Process {
                op: "create",
                id: id.to_owned(),
                what: "parsing the pid file",
                source: io::ErrorKind::InvalidData.into(),
            })?;
        Ok(Created {
            pid,
            stdout,
            stderr,
        })
    }

    /// `runc start <id>`: lets a created container's process run.
    pub fn start(&self, id: &str) -> Result<(), RuncError> {
        self.simple("start", id, &["start", id]).map(drop)
    }

    /// `runc delete [--force] <id>`. A container that does not exist is
    /// success, so this is idempotent.
    pub fn delete(&self, id: &str, force: bool) -> Result<(), RuncError> {
        let args: &[&str] = if force {
            &["delete", "--force", id]
        } else {
            &["delete", id]
        };
        match self.simple("delete", id, args) {
            Err(RuncError::NotFound { .. }) => Ok(()),
            r => r.map(drop),
        }
    }

    /// `runc kill [--all] <id> <signal>`.
    pub fn kill(&self, id: &str, signal: Signal, all: bool) -> Result<(), RuncError> {
        let sig = (signal as i32).to_string();
        let args: &[&str] = if all {
            &["kill", "--all", id, &sig]
        } else {
            &["kill", id, &sig]
        };
        self.simple("kill", id, args).map(drop)
    }

    /// `runc pause <id>` (cgroup freezer).
    pub fn pause(&self, id: &str) -> Result<(), RuncError> {
        self.simple("pause", id, &["pause", id]).map(drop)
    }

    /// `runc resume <id>`.
    pub fn resume(&self, id: &str) -> Result<(), RuncError> {
        self.simple("resume", id, &["resume", id]).map(drop)
    }

    /// `runc state <id>`.
    pub fn state(&self, id: &str) -> Result<ContainerState, RuncError> {
        let out = self.simple("state", id, &["state", id])?;
        serde_json::from_slice(&out).map_err(|source| RuncError::Parse {
            op: "state",
            id: id.to_owned(),
            source,
        })
    }

    /// `runc list`: every container in this root.
    pub fn list(&self) -> Result<Vec<ContainerState>, RuncError> {
        let out = self.exec("list", "", &["list", "--format", "json"])?;
        // runc prints `null` for an empty list.
        let list: Option<Vec<ContainerState>> =
            serde_json::from_slice(&out).map_err(|source| RuncError::Parse {
                op: "list",
                id: String::new(),
                source,
            })?;
        Ok(list.unwrap_or_default())
    }

    fn simple(&self, op: &'static str, id: &str, args: &[&str]) -> Result<Vec<u8>, RuncError> {
        validate_id(id)?;
        self.exec(op, id, args)
    }

    fn exec(&self, op: &'static str, id: &str, args: &[&str]) -> Result<Vec<u8>, RuncError> {
        let out = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| RuncError::Spawn {
                op,
                id: id.to_owned(),
                binary: self.binary.clone(),
                source,
            })?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if stderr.contains("does not exist") {
            return Err(RuncError::NotFound { id: id.to_owned() });
        }
        Err(RuncError::Failed {
            op,
            id: id.to_owned(),
            status: describe(out.status),
            stderr,
        })
    }
}

/// Rejects ids runc would refuse, and any that could name a path outside
/// the state directory.
pub fn validate_id(id: &str) -> Result<(), RuncError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(RuncError::InvalidId { id: id.to_owned() })
    }
}

/// The shell's exit code for a status: the code, or `128 + N` for signal N.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 128,
    }
}

pub(crate) fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "unknown status".to_owned(),
    }
}

fn reader<R: Read + Send + 'static>(mut r: R) -> JoinHandle<io::Result<Vec<u8>>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        r.read_to_end(&mut buf)?;
        Ok(buf)
    })
}

#[derive(Deserialize)]
struct LogLine {
    #[serde(default)]
    level: String,
    #[serde(default)]
    msg: String,
}

/// The error messages of a runc JSON log, joined; `None` if there are none.
pub(crate) fn log_errors(log: &Path) -> Option<String> {
    let text = fs::read_to_string(log).ok()?;
    let msgs: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<LogLine>(l).ok())
        .filter(|l| l.level == "error" || l.level == "fatal")
        .map(|l| l.msg)
        .collect();
    (!msgs.is_empty()).then(|| msgs.join("; "))
}

/// A running `runc run`.
#[derive(Debug)]
pub struct RuncProcess {
    id: String,
    child: Child,
    pidfd: Arc<PidFd>,
    stdout: Option<JoinHandle<io::Result<Vec<u8>>>>,
    stderr: Option<JoinHandle<io::Result<Vec<u8>>>>,
    log: PathBuf,
}

impl RuncProcess {
    /// Pid of the runc process (not of the container).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A handle that signals this runc from any thread. runc forwards
    /// catchable signals to the container.
    pub fn signaller(&self) -> Signaller {
        Signaller(Arc::clone(&self.pidfd))
    }

    /// Waits up to `timeout` for runc to exit; `true` if it has (the exit
    /// status is then collected by [`RuncProcess::wait`] without blocking).
    pub fn wait_timeout(&self, timeout: Duration) -> Result<bool, RuncError> {
        self.pidfd
            .wait_readable(timeout)
            .map_err(|source| self.error("waiting with a timeout", source))
    }

    /// Waits for runc (and so the container) to exit and collects captured
    /// output. A failure of runc itself, rather than of the container, is an
    /// error carrying runc's messages.
    pub fn wait(mut self) -> Result<RunExit, RuncError> {
        let status = self
            .child
            .wait()
            .map_err(|source| self.error("wait", source))?;
        let stdout = join(self.stdout.take()).map_err(|e| self.error("reading stdout", e))?;
        let stderr = join(self.stderr.take()).map_err(|e| self.error("reading stderr", e))?;
        // runc exits 1 on its own fatal errors and logs them; a container
        // that exits 1 leaves the log empty.
        if status.code() == Some(1)
            && let Some(msgs) = log_errors(&self.log)
        {
            return Err(RuncError::Failed {
                op: "run",
                id: self.id.clone(),
                status: describe(status),
                stderr: msgs,
            });
        }
        Ok(RunExit {
            exit_code: exit_code(status),
            stdout,
            stderr,
        })
    }

    fn error(&self, what: &'static str, source: io::Error) -> RuncError {
        RuncError::Process {
            op: "run",
            id: self.id.clone(),
            what,
            source,
        }
    }
}

fn join(h: Option<JoinHandle<io::Result<Vec<u8>>>>) -> io::Result<Vec<u8>> {
    match h {
        None => Ok(Vec::new()),
        Some(h) => h
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("output reader panicked"))),
    }
}

/// Sends signals to one process, safely against pid reuse: it holds a
/// pidfd, so once the process is gone signals fail instead of reaching a
/// stranger.
#[derive(Debug, Clone)]
pub struct Signaller(Arc<PidFd>);

impl Signaller {
    /// Sends `signal`. A process that has already exited is not an error.
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        match self.0.send_signal(signal) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            r => r,
        }
    }
}

/// A process file descriptor (Linux ≥ 5.3): a handle on a process that
/// cannot be confused with a later process reusing its pid.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// Opens a pidfd for `pid`, which must be a live process.
    pub fn open(pid: i32) -> io::Result<PidFd> {
        // SAFETY: pidfd_open takes a pid and flags by value and returns a new
        // descriptor or -1; no memory is shared with the kernel.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just created this descriptor and nothing else
        // owns it; the value fits a RawFd because descriptors are ints.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
    }

    /// Sends `signal` to the process.
    pub fn send_signal(&self, signal: Signal) -> io::Result<()> {
        // SAFETY: a valid pidfd, a signal number, a null siginfo (allowed:
        // the kernel then fills it as kill(2) would) and flags 0.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit (a pidfd becomes
    /// readable then); `Ok(false)` on timeout.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            // ppoll's timeout is exact: poll's whole milliseconds rounded a
            // wait under 1 ms down to 0 and so spun through it, which the
            // pool's agent-connect loop (200 µs pauses, then the rest of
            // each 10 ms one) did on every runner it created.
            let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
            match nix::poll::ppoll(&mut fds, Some(TimeSpec::from(left)), None) {
                Ok(0) if left.is_zero() => return Ok(false),
                // The kernel may still wake a little early: go round again.
                Ok(0) => continue,
                Ok(_) => return Ok(true),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Makes this process a child subreaper (`PR_SET_CHILD_SUBREAPER`), so a
/// container's init is re-parented to it when `runc create` exits and
/// [`wait_container`] can collect its status. Process-wide: any orphaned
/// descendant then becomes this process's child, which a long-running caller
/// must reap.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Waits for a created container's init (`pid`, from [`Created::pid`]) to
/// exit, up to `timeout` if given, and reaps it. `Ok(None)` on timeout.
///
/// Needs [`become_subreaper`] before [`Runc::create`]: otherwise the init is
/// not this process's child and its status cannot be collected.
pub fn wait_container(
    id: &str,
    pid: i32,
    timeout: Option<Duration>,
) -> Result<Option<i32>, RuncError> {
    let err = |what, source| RuncError::Process {
        op: "start",
        id: id.to_owned(),
        what,
        source,
    };
    if let Some(t) = timeout {
        let fd = PidFd::open(pid).map_err(|e| err("pidfd_open", e))?;
        if !fd.wait_readable(t).map_err(|e| err("waiting", e))? {
            return Ok(None);
        }
    }
    loop {
        match nix::sys::wait::waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(Some(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(Some(128 + sig as i32)),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(err("waitpid (is this process a subreaper?)", e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["a", "abc-1_2.3+x", &"x".repeat(128)] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signals_map_like_a_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }

    #[test]
    fn state_json_parses() {
        let s: ContainerState = serde_json::from_str(
            r#"{"ociVersion":"1.0.2-dev","id":"x","pid":42,"status":"running","bundle":"/b","rootfs":"/b/rootfs","created":"2024-01-01T00:00:00Z","owner":""}"#,
        )
        .unwrap();
        assert_eq!(s.status, ContainerStatus::Running);
        assert_eq!(s.pid, 42);
        let odd: ContainerState =
            serde_json::from_str(r#"{"id":"y","status":"hibernating"}"#).unwrap();
        assert_eq!(odd.status, ContainerStatus::Unknown);
    }

    #[test]
    fn log_errors_are_extracted() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        fs::write(
            &p,
            "{\"level\":\"warning\",\"msg\":\"meh\"}\n{\"level\":\"error\",\"msg\":\"runc run failed: boom\"}\n",
        )
        .unwrap();
        assert_eq!(log_errors(&p).as_deref(), Some("runc run failed: boom"));
        fs::write(&p, "").unwrap();
        assert_eq!(log_errors(&p), None);
    }
}
