//! Wire types of the control-plane API beyond the model in
//! [`ember_control::model`], which the API speaks directly.

pub use ember_control::RunReports;
pub use ember_control::model::LogStream;
use ember_control::model::{NodeReport, PinnedImage, Resources, Run, RunId, RunState};
use serde::{Deserialize, Serialize};

/// Runs in a `GET /v1/runs` page when the client does not say.
pub const DEFAULT_PAGE: usize = 100;
/// The most runs one `GET /v1/runs` page may ask for.
pub const MAX_PAGE: usize = 1000;

/// Parses `run-7` or `7`: decimal digits only (no sign, no spaces), at
/// most 18 of them, as the OpenAPI document's pattern says.
pub fn parse_run_id(s: &str) -> Option<RunId> {
    let digits = s.strip_prefix("run-").unwrap_or(s);
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(RunId)
}

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
    /// Stop this run: it was cancelled, or (with `attempt`) that attempt
    /// was declared lost.
    Cancel {
        /// The run.
        run: RunId,
        /// Only this attempt of it (a later one, retried on this node
        /// meanwhile, runs on). Absent: whatever attempt runs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
    },
    /// Sent first on every new stream: the runs the control plane believes
    /// are starting or running on this node. A node that does not have one
    /// (it restarted and lost it) reports it lost, so it does not stay
    /// `running` forever and is retried at once while attempts remain.
    Active {
        /// The runs.
        runs: Vec<RunId>,
        /// The server sends a [`WorkMessage::Keepalive`] after this many
        /// milliseconds without another message; a node that hears
        /// nothing for three times as long treats the stream as dead and
        /// reconnects. Absent: the server sends no keepalives.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keepalive_ms: Option<u64>,
        /// The runs scheduled on this node but not yet accepted, which
        /// follow as [`WorkMessage::Assign`]s. A run the node executes that
        /// is in neither list is no longer its own (it was lost and retried
        /// while the node was cut off): the node stops it. Absent (an older
        /// server): the node stops nothing.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scheduled: Option<Vec<RunId>>,
    },
    /// Nothing to do: sent when the stream has been idle for the keepalive
    /// interval, so proxies and NATs keep the connection and the node can
    /// tell a quiet stream from a dead one.
    Keepalive,
    /// Keep at least `count` idle runners of `key` on this node, creating
    /// the missing ones (runners already idle or being created for the key
    /// count). Idempotent: the control plane repeats it until the node's
    /// inventory shows the runners, so it is safe to receive twice.
    Prewarm {
        /// The deployment that wants warm runners.
        deployment: String,
        /// The warm key ([`Run::warm_key`]) the node reports the runners
        /// under in its inventory.
        key: String,
        /// The image, pulled first if the node lacks it.
        image: PinnedImage,
        /// The runners' resource limits (part of their key).
        #[serde(default)]
        resources: Resources,
        /// The deployment's recycling key; with `deployment`, the runners'
        /// recycling scope ([`ember_control::model::recycle_scope`]).
        #[serde(default)]
        recycle_key: Option<String>,
        /// The runners' root filesystem is read-only (part of their key).
        #[serde(default)]
        readonly_rootfs: bool,
        /// Idle runners of the key wanted on this node.
        count: u32,
    },
    /// This node's pull plan ([`ember_control::pullplan`]): images to
    /// pre-pull at low priority, most launched first, and the images its
    /// garbage collector must keep. Each plan replaces the one before.
    /// Nodes that do not know this type ignore the line.
    PullPlan {
        /// Images to pull, most launched first.
        pulls: Vec<PlannedPull>,
        /// Manifest digests the node's GC keeps (planned or in use here).
        keep: Vec<String>,
    },
}

/// One pre-pull of a [`WorkMessage::PullPlan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedPull {
    /// The image, pinned as the runs that launched it pinned it.
    pub image: PinnedImage,
    /// Its bytes as the nodes holding it report them (0 when unknown):
    /// what the node reports as arriving while it pulls.
    #[serde(default)]
    pub bytes: u64,
}

/// One record of a run's log (`GET /v1/runs/{id}/logs`), one JSON object a
/// line: `{"stream":"stdout","data":"aGkK"}`.
///
/// `data` is the output's raw bytes in standard base64 (with padding), so
/// any output survives byte for byte: invalid UTF-8, NULs, and multi-byte
/// characters split between two records (the bytes of consecutive records
/// of one stream concatenate to exactly what the process wrote).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Which stream.
    pub stream: LogStream,
    /// The output's bytes (base64 on the wire).
    #[serde(with = "base64_bytes")]
    pub data: Vec<u8>,
    /// `true` for a notice the control plane wrote, not the process: the
    /// run's output reached the per-run limit and the rest was dropped, or
    /// the log was pruned. Such a record's stream is stderr.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub marker: bool,
}

/// Serde for `Vec<u8>` as a standard base64 string.
mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_records_carry_any_bytes_as_base64() {
        let rec = LogRecord {
            stream: LogStream::Stderr,
            data: vec![0xff, 0x00, 0xfe, b'\n', 0xe2, 0x82],
            marker: false,
        };
        let line = serde_json::to_string(&rec).expect("serialise");
        assert_eq!(line, r#"{"stream":"stderr","data":"/wD+CuKC"}"#);
        let back: LogRecord = serde_json::from_str(&line).expect("parse");
        assert_eq!(back, rec);
        assert!(
            serde_json::from_str::<LogRecord>(r#"{"stream":"stdout","data":"not base64!"}"#)
                .is_err()
        );
    }

    #[test]
    fn pull_plan_lines() {
        let m: WorkMessage = serde_json::from_str(
            r#"{"type":"pull_plan","keep":["sha256:k"],
                "pulls":[{"image":{"reference":"app","digest":"sha256:x"},"bytes":7}]}"#,
        )
        .expect("parse");
        let WorkMessage::PullPlan { pulls, keep } = m else {
            panic!("not a pull plan: {m:?}")
        };
        assert_eq!(
            (pulls[0].bytes, keep.as_slice()),
            (7, ["sha256:k".to_string()].as_slice())
        );
    }

    #[test]
    fn keepalive_and_prewarm_lines() {
        assert_eq!(
            serde_json::to_string(&WorkMessage::Keepalive).expect("serialise"),
            r#"{"type":"keepalive"}"#
        );
        // A server that announces no interval leaves the field out, and a
        // node reads an `active` line without it.
        let m: WorkMessage =
            serde_json::from_str(r#"{"type":"active","runs":[3]}"#).expect("parse");
        assert_eq!(
            m,
            WorkMessage::Active {
                runs: vec![RunId(3)],
                keepalive_ms: None,
                scheduled: None
            }
        );
        let m: WorkMessage = serde_json::from_str(
            r#"{"type":"prewarm","deployment":"web","key":"k","count":2,
                "image":{"reference":"app","digest":"sha256:x"}}"#,
        )
        .expect("parse");
        assert!(matches!(
            m,
            WorkMessage::Prewarm {
                count: 2,
                recycle_key: None,
                ..
            }
        ));
    }
}

/// Body of `POST /v1/nodes/{id}/runs/{run}/events`: one report, or several
/// in the order they happened (a node sends what piled up while its last
/// request was in flight as one request).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NodeEvents {
    /// One report.
    One(NodeReport),
    /// Several, applied in order.
    Many(Vec<NodeReport>),
}

/// Largest batch `POST /v1/nodes/{id}/events` takes: a node never has more
/// runs than slots, so a bigger batch is a bug or an attack.
pub const MAX_EVENT_BATCH: usize = 4096;

/// Answer of `POST /v1/nodes/{id}/events` (the body is a list of
/// [`RunReports`]): one result per entry of the request, in its order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventResults {
    /// The results.
    pub results: Vec<EventResult>,
}

/// How one run's reports in a batch went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventResult {
    /// The run.
    pub run: RunId,
    /// Its state after the reports, when all of them applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<RunState>,
    /// Why one was refused (the reports before it stand), as the per-run
    /// endpoint would have answered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// A credential just issued to a node (`POST /v1/nodes/{id}/credentials`):
/// the token is shown this once (the control plane keeps only its
/// SHA-256); it opens that node's endpoints and no other node's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCredential {
    /// The node it is for.
    pub node: String,
    /// The bearer token, for `ember node --token`.
    pub token: String,
}

/// The answer to `DELETE /v1/nodes/{id}/credentials`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCredentials {
    /// The node.
    pub node: String,
    /// How many credentials it had (all revoked now).
    pub revoked: usize,
}

/// One page of `GET /v1/runs`: runs newest first, and where the next page
/// starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunPage {
    /// The runs, newest first.
    pub runs: Vec<Run>,
    /// Pass as `cursor` to get the next (older) page; absent on the last
    /// page. Opaque: it is not a run id a client should rely on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}
