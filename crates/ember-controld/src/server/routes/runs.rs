//! `/v1/runs`: submit (through the batcher), list, get, cancel.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use ember_api::wire::{DEFAULT_PAGE, MAX_PAGE, RunPage, SubmitResponse, WorkMessage, parse_run_id};
use ember_control::model::{RunSpec, RunState};
use ember_control::store::RunFilter;

use super::{check_env_size, env_bytes, parse_json, query_pairs, run_id};
use crate::server::error::json_response;
use crate::server::{ApiError, Shared};

/// The longest `Idempotency-Key` accepted (it is stored with the run).
const MAX_IDEMPOTENCY_KEY: usize = 256;

pub(crate) async fn submit_run(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut spec: RunSpec = parse_json(&body, "run")?;
    check_env_size(&s, "run", env_bytes(&spec.env, &spec.command))?;
    if let Some(key) = headers.get("idempotency-key") {
        let key = key
            .to_str()
            .map_err(|_| ApiError::BadRequest("Idempotency-Key must be ASCII".into()))?;
        if key.is_empty() {
            return Err(ApiError::BadRequest("Idempotency-Key is empty".into()));
        }
        // Printable ASCII, as the document's pattern says (to_str lets a
        // tab through).
        if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(ApiError::BadRequest(
                "Idempotency-Key must be printable ASCII".into(),
            ));
        }
        if key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(ApiError::BadRequest(format!(
                "Idempotency-Key is {} bytes; at most {MAX_IDEMPOTENCY_KEY}",
                key.len()
            )));
        }
        match &spec.idempotency_key {
            // Two different keys for one request: a conflict, like a key
            // reused for another spec.
            Some(k) if k != key => {
                return Err(ApiError::Conflict(format!(
                    "Idempotency-Key header {key:?} differs from the body's {k:?}"
                )));
            }
            _ => spec.idempotency_key = Some(key.to_owned()),
        }
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    s.submits
        .send((spec, tx))
        .map_err(|_| ApiError::Internal("the submit batcher stopped".into()))?;
    let submitted = rx
        .await
        .map_err(|_| ApiError::Internal("the submit batcher dropped a submit".into()))??;
    let status = if submitted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_response(
        status,
        &SubmitResponse {
            run: submitted.run,
            created: submitted.created,
        },
    ))
}

/// `GET /v1/runs`: one page of runs, newest first, at most `limit`
/// ([`DEFAULT_PAGE`], at most [`MAX_PAGE`]), with the cursor of the next
/// page when there may be one.
pub(crate) async fn list_runs(State(s): State<Shared>, uri: Uri) -> Result<Response, ApiError> {
    let mut filter = RunFilter {
        limit: Some(DEFAULT_PAGE),
        ..RunFilter::default()
    };
    for (k, v) in query_pairs(&uri) {
        match k.as_str() {
            "state" => {
                for st in v.split(',') {
                    filter.states.push(RunState::parse(st).ok_or_else(|| {
                        ApiError::BadRequest(format!("unknown run state {st:?}"))
                    })?);
                }
            }
            "deployment" => filter.deployment = Some(v),
            "node" => filter.node = Some(v),
            "limit" => {
                let n: usize = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "limit must be a number from 1 to {MAX_PAGE}, not {v:?}"
                        ))
                    })?;
                filter.limit = Some(n);
            }
            "cursor" => {
                filter.before = Some(parse_run_id(&v).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "invalid cursor {v:?} (pass next_cursor of the previous page)"
                    ))
                })?);
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}"
                )));
            }
        }
    }
    let limit = filter.limit.unwrap_or(DEFAULT_PAGE);
    let runs = s.db(move |st| st.list_runs(&filter)).await?;
    // A full page may have more behind it; the cursor is the last run's id
    // (the next page holds older runs), opaque to clients.
    let next_cursor = (runs.len() == limit)
        .then(|| runs.last().map(|r| r.id.0.to_string()))
        .flatten();
    Ok(json_response(
        StatusCode::OK,
        &RunPage { runs, next_cursor },
    ))
}

pub(crate) async fn get_run(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = run_id(&id)?;
    let run = s
        .db(move |st| st.get_run(id))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("{id} not found")))?;
    Ok(json_response(StatusCode::OK, &run))
}

pub(crate) async fn cancel_run(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = run_id(&id)?;
    // The run may move between the read and the compare-and-set (a node
    // report); retry a few times against the fresh state.
    for _ in 0..5 {
        let run = s
            .db(move |st| st.get_run(id))
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("{id} not found")))?;
        if run.state.is_final() {
            return Err(ApiError::Conflict(format!(
                "{id} is already {}; nothing to cancel",
                run.state
            )));
        }
        let from = run.state;
        match s
            .db(move |st| st.transition_run(id, from, RunState::Cancelled))
            .await
        {
            Ok(run) => {
                s.metrics.finished(run.state);
                if let Some(node) = &run.node
                    && from.is_active()
                {
                    s.push(
                        node,
                        WorkMessage::Cancel {
                            run: id,
                            attempt: None,
                        },
                    );
                }
                let _ = s.log_events.send(id);
                // The cancelled run's slot is free.
                s.wake.notify_one();
                return Ok(json_response(StatusCode::OK, &run));
            }
            Err(ApiError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::Conflict(format!(
        "{id} kept changing state; try again"
    )))
}
