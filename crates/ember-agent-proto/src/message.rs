//! The JSON bodies of control frames.
//!
//! Every struct accepts unknown fields and missing optional fields, so a
//! peer of the same protocol version may add fields without breaking the
//! other side; a change that would break an older peer bumps
//! [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).

use serde::{Deserialize, Serialize};

/// The first frame each side sends on a new connection.
///
/// The client speaks first; the agent answers with its own `Hello`, or with
/// an [`ErrorMsg`] and a closed connection when the versions differ.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Hello {
    /// The sender's [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
    pub version: u32,
    /// Free-form name and version of the sender, for logs.
    pub agent: String,
}

/// The agent's answer to a ping.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Pong {
    /// The agent's protocol version.
    pub version: u32,
    /// Milliseconds since the agent started.
    pub uptime_ms: u64,
    /// Execs whose main process has not exited yet, across all connections.
    pub running: u32,
}

/// A command to run.
///
/// The child gets exactly `env` (nothing of the agent's own environment), its
/// own session and process group, `stdin` (or `/dev/null`), and pipes for
/// stdout and stderr.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct ExecRequest {
    /// Program and arguments. A program name without `/` is looked up in
    /// the `PATH` of `env` (or a default `PATH` when `env` has none).
    pub argv: Vec<String>,
    /// The complete environment, each entry `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory; the agent's own (`/` in a container) when `None`.
    pub cwd: Option<String>,
    /// User id to run as; supplementary groups are dropped when set.
    pub uid: Option<u32>,
    /// Group id to run as; becomes the only group when set.
    pub gid: Option<u32>,
    /// Bytes written to the child's stdin, which is then closed. `None`
    /// connects stdin to `/dev/null`. Base64 on the wire.
    #[serde(with = "crate::b64::option")]
    pub stdin: Option<Vec<u8>>,
    /// Kill the whole process tree (SIGKILL) after this many milliseconds
    /// and report `timed_out`.
    pub timeout_ms: Option<u64>,
    /// Readiness protocol (snapshots): give the child one end of a Unix
    /// socketpair as descriptor 3, named by `EMBER_READY_FD=3` in its
    /// environment. When the child writes the line `ready`, the agent sends
    /// [`Ready`] and parks the exec (it survives its client going away, and
    /// its timeout no longer runs) until a [`Resume`] arrives.
    pub ready: bool,
}

/// Sent when an exec started with [`ExecRequest::ready`] wrote `ready`: it
/// is parked, waiting for [`Resume`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Ready {
    /// The exec (as in [`Started`]).
    pub exec_id: u64,
}

/// Wakes a parked exec: the agent writes `message` and a newline to the
/// exec's readiness descriptor, and the connection that sent this becomes
/// the exec's own (it gets [`Started`] again, then the output and the
/// `Exit`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Resume {
    /// The parked exec.
    pub exec_id: u64,
    /// One line for the program (no newline in it), by convention a JSON
    /// object (see `docs/agent-protocol.md`); at most [`MAX_RESUME_MESSAGE`]
    /// bytes.
    pub message: String,
    /// A timeout from now on, as in [`ExecRequest::timeout_ms`].
    pub timeout_ms: Option<u64>,
}

/// Longest [`Resume::message`] the agent accepts: it is written to the
/// readiness socket in one non-blocking write, which this always fits.
pub const MAX_RESUME_MESSAGE: usize = 64 * 1024;

/// Sent once the child has been spawned (its `execve` succeeded).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Started {
    /// The agent-wide id of the exec, for [`Cancel`].
    pub exec_id: u64,
    /// The child's pid in the agent's pid namespace; also its process group
    /// and session id.
    pub pid: i32,
}

/// How an exec ended; the last frame of an exec.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct ExecResult {
    /// The exec's id (as in [`Started`]).
    pub exec_id: u64,
    /// Exit status when the main process exited normally; 127 (or 126 for
    /// a permission error) when it could not be spawned, see `spawn_error`.
    pub exit_code: Option<i32>,
    /// The signal that killed the main process.
    pub signal: Option<i32>,
    /// The exec's timeout expired and its tree was killed.
    pub timed_out: bool,
    /// A [`Cancel`] reached the exec (or its connection went away).
    pub cancelled: bool,
    /// Microseconds from the agent reading the request to the child's
    /// `execve` succeeding.
    pub spawn_us: u64,
    /// Microseconds from spawning the child to reaping it.
    pub wall_us: u64,
    /// User CPU time of the main process and the descendants it waited for.
    pub user_us: u64,
    /// System CPU time, likewise.
    pub sys_us: u64,
    /// Peak resident set size of the largest of those processes, in KiB.
    pub max_rss_kb: u64,
    /// Why the child could not be spawned (`chdir /x: No such file or
    /// directory`), in which case no [`Started`] frame was sent.
    pub spawn_error: Option<String>,
    /// The exec did not end: a resumed `ready` exec wrote `ready` (or
    /// `ready CODE`, the `exit_code` here) again, ending the request it
    /// was resumed with, and is parked for the next [`Resume`]. Only
    /// `wall_us` (since the resume) is measured then.
    pub parked: bool,
}

impl ExecResult {
    /// True when the command was spawned and exited with status 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && self.spawn_error.is_none()
    }
}

/// Sends `signal` to a running exec's process group.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Cancel {
    /// Which exec (from [`Started`]); any connection may cancel any exec.
    pub exec_id: u64,
    /// Signal number, 1 to 64 (9 for SIGKILL, 15 for SIGTERM).
    pub signal: i32,
}

/// A failure the agent reports instead of the expected answer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct ErrorMsg {
    /// What failed, for humans.
    pub message: String,
}
