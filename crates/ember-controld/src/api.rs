//! Wire types of the control-plane API beyond the model in
//! [`ember_control::model`], which the API speaks directly.

use ember_control::model::{Run, RunId};
use serde::{Deserialize, Serialize};

/// One line of a node's work stream (`GET /v1/nodes/{id}/work`),
/// newline-delimited JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkMessage {
    /// Execute this run (it is `scheduled` on the receiving node).
    Assign {
        /// The run, with everything needed to execute it.
        run: Box<Run>,
    },
    /// Stop this run: it was cancelled.
    Cancel {
        /// The run.
        run: RunId,
    },
    /// Sent first on every new stream: the runs the control plane believes
    /// are starting or running on this node. A node that does not have one
    /// (it restarted and lost it) reports it failed, so it does not stay
    /// `running` forever.
    Active {
        /// The runs.
        runs: Vec<RunId>,
    },
}

/// Which output stream a log record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl LogStream {
    /// The name used in query strings.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// One record of a run's log (`GET /v1/runs/{id}/logs`), one JSON object a
/// line. Output is stored as text: bytes that are not UTF-8 are replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Which stream.
    pub stream: LogStream,
    /// The output.
    pub data: String,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable machine-readable code (`bad_request`, `not_found`, ...).
    pub error: String,
    /// What went wrong, for people.
    pub message: String,
}

/// The body of `POST /v1/runs`' answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitResponse {
    /// The run.
    pub run: Run,
    /// `false` when an idempotency key returned an earlier run.
    pub created: bool,
}
