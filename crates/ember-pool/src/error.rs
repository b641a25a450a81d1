//! The pool's error type.

use std::io;
use std::path::PathBuf;

use ember_agent_proto::ClientError;
use ember_runtime::RecoverError;

use crate::runner::RunnerError;

/// Errors of the pool. A failed run is not an error: it is an
/// [`ExecResult`](ember_agent_proto::ExecResult) with a non-zero exit.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The agent binary cannot be bind-mounted into runners.
    #[error("agent binary {path}: {reason}")]
    AgentBinary {
        /// The binary.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value is out of range.
    #[error("invalid pool configuration: {0}")]
    Config(String),
    /// A pool directory could not be created or read.
    #[error("pool directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A new runner could not be created (the error names it).
    #[error("creating a runner")]
    Create(#[source] Box<RunnerError>),
    /// An exec could not be sent or its answer not read.
    #[error("exec in runner {id}")]
    Exec {
        /// The runner.
        id: String,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// The pool has been shut down.
    #[error("the runner pool is shut down")]
    ShutDown,
    /// Recovery could not even list what to recover.
    #[error("recovering leftover runners")]
    Recover(#[from] RecoverError),
}
