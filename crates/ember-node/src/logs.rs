//! Log shipping (`POST /v1/nodes/{id}/runs/{run}/logs`): a run's output,
//! as it arrives, one request per chunk the executor read. A chunk goes
//! out only after the reports before it are through, and the exit is
//! reported only after the last chunk, so log followers (who stop at the
//! final state) see every byte.

use bytes::Bytes;
use ember_api::wire::LogStream;
use ember_control::model::RunId;

use crate::agent::NodeAgent;

impl NodeAgent {
    /// Appends `data` to `run`'s `stream`. A refusal (the run was cancelled
    /// or reassigned meanwhile) is not the run's failure: it is only noted.
    pub(crate) async fn ship_output(&self, run: RunId, stream: LogStream, data: Vec<u8>) {
        if let Err(e) = self
            .client
            .append_log(&self.cfg.id, run, stream, Bytes::from(data))
            .await
        {
            tracing::debug!(run = %run, error = %ember_error::chain(&e), "log append refused");
        }
    }
}
