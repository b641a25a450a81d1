//! The handlers, one file per resource. Tokens are checked by the layers
//! in `auth.rs` before any of these run; failures are [`ApiError`]s,
//! turned into answers in `error.rs`.
//!
//! * `runs`: submit, list, get, cancel.
//! * `logs`: a run's output, read or followed by clients, appended by nodes.
//! * `deployments`: create, list.
//! * `nodes`: register/heartbeat, list, issue and revoke credentials.
//! * `work`: a node's work stream.
//! * `reports`: nodes' run events, one or a batch, and the warm hand-off.

pub(super) mod deployments;
pub(super) mod logs;
pub(super) mod nodes;
pub(super) mod reports;
pub(super) mod runs;
pub(super) mod work;

use axum::http::Uri;
use ember_api::wire::parse_run_id;
use ember_control::model::RunId;

use super::{ApiError, Shared};

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::BadRequest(format!("missing JSON body ({what})")));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid {what} JSON: {e}")))
}

pub(super) fn run_id(s: &str) -> Result<RunId, ApiError> {
    parse_run_id(s).ok_or_else(|| ApiError::BadRequest(format!("invalid run id {s:?}")))
}

/// The query's `key=value` pairs, percent-decoded (and `+` read as a
/// space), as `application/x-www-form-urlencoded` says: `?deployment=x%20y`
/// names the deployment `x y`.
pub(super) fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// Bytes of a run's or deployment's environment and command line: what
/// [`ServerConfig::max_env_bytes`](crate::server::ServerConfig::max_env_bytes) limits.
pub(super) fn env_bytes<'a>(
    env: &std::collections::BTreeMap<String, String>,
    command: impl IntoIterator<Item = &'a String>,
) -> usize {
    env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + command.into_iter().map(String::len).sum::<usize>()
}

pub(super) fn check_env_size(s: &Shared, what: &str, bytes: usize) -> Result<(), ApiError> {
    let max = s.config.max_env_bytes;
    if bytes > max {
        return Err(ApiError::TooLarge(format!(
            "the {what}'s environment and command line are {bytes} bytes; at most {max} are accepted"
        )));
    }
    Ok(())
}
