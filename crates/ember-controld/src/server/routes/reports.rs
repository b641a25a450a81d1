//! Nodes' run events: `POST /v1/nodes/{id}/runs/{run}/events` (one run)
//! and `POST /v1/nodes/{id}/events` (a batch over several runs), and what
//! follows an exit: the freed warm runner handed the next queued run of
//! its key.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use ember_api::wire::{
    EventResult, EventResults, MAX_EVENT_BATCH, NodeEvents, RunReports, WorkMessage,
};
use ember_control::StoreError;
use ember_control::model::{NodeReport, Run, RunId};

use super::{parse_json, run_id};
use crate::server::error::json_response;
use crate::server::{ApiError, Shared};

pub(crate) async fn node_event(
    State(s): State<Shared>,
    Path((node, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = run_id(&id)?;
    let reports = match parse_json::<NodeEvents>(&body, "run event")? {
        NodeEvents::One(r) => vec![r],
        NodeEvents::Many(rs) => rs,
    };
    if reports.is_empty() {
        return Err(ApiError::BadRequest("an empty list of run events".into()));
    }
    // In order; a refused one ends the list (what came before it stands).
    let run = apply_reports(&s, &node, vec![RunReports::new(id, reports)])
        .await?
        .pop()
        .unwrap_or(Err(StoreError::RunNotFound(id)))?;
    Ok(json_response(StatusCode::OK, &run))
}

/// A node's reports on several runs in one request and one transaction:
/// what a node sends once reports pile up, so that a burst costs a request
/// per batch rather than per report.
pub(crate) async fn node_events(
    State(s): State<Shared>,
    Path(node): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let batch = parse_json::<Vec<RunReports>>(&body, "run events")?;
    if batch.is_empty() {
        return Err(ApiError::BadRequest("an empty list of run events".into()));
    }
    if batch.len() > MAX_EVENT_BATCH {
        return Err(ApiError::BadRequest(format!(
            "{} runs' events in one request; at most {MAX_EVENT_BATCH}",
            batch.len()
        )));
    }
    // What the document requires of every entry (a run id of at least 1,
    // at least one report): a malformed entry refuses the request, as a
    // malformed batch does; the store would refuse only that entry,
    // inside a 200.
    for b in &batch {
        if b.run.0 < 1 {
            return Err(ApiError::BadRequest(format!(
                "run id {} in the batch: run ids start at 1",
                b.run.0
            )));
        }
        if b.reports.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "run {}'s entry has no reports (at least one is required)",
                b.run
            )));
        }
    }
    let ids: Vec<RunId> = batch.iter().map(|b| b.run).collect();
    let out = apply_reports(&s, &node, batch).await?;
    let results = ids
        .into_iter()
        .zip(out)
        .map(|(run, r)| match r {
            Ok(after) => EventResult {
                run,
                state: Some(after.state),
                error: None,
            },
            Err(e) => EventResult {
                run,
                state: None,
                error: Some(ApiError::from(e).body()),
            },
        })
        .collect();
    Ok(json_response(StatusCode::OK, &EventResults { results }))
}

/// Applies `node`'s reports in one transaction (one answer per entry of
/// `batch`), then hands every runner a finished run left idle the oldest
/// queued run with its key, in one more transaction and without a round
/// through placement, and pushes those runs to the node. The dispatcher
/// is woken for the slots no hand-off took; log followers hear of every
/// run that moved (they stop at a final state).
pub(crate) async fn apply_reports(
    s: &Shared,
    node: &str,
    batch: Vec<RunReports>,
) -> Result<Vec<Result<Run, StoreError>>, ApiError> {
    let n = node.to_owned();
    let kinds = crate::server::metrics::ControlMetrics::kinds(&batch);
    let (out, handed, mut freed) = s
        .db(move |st| {
            let out = st.report_batch(&n, &batch)?;
            let mut keys = Vec::new();
            let mut freed = 0usize;
            for (b, r) in batch.iter().zip(&out) {
                let Ok(run) = r else { continue };
                // A run its node lost went back to the queue (or stayed
                // lost): either way its slot is free, and the dispatcher
                // must hear of a queued run.
                if b.reports.iter().any(|r| matches!(r, NodeReport::Lost { .. })) {
                    tracing::warn!(node = %n, run = %run.id, state = %run.state, "run lost by its node");
                    freed += 1;
                    continue;
                }
                if !run.state.is_final() {
                    continue;
                }
                let idle = b.reports.iter().any(|r| {
                    matches!(
                        r,
                        NodeReport::Exited {
                            runner_idle: true,
                            ..
                        }
                    )
                });
                if idle {
                    keys.push(run.warm_key());
                } else {
                    freed += 1;
                }
            }
            let handed = if keys.is_empty() {
                Vec::new()
            } else {
                st.claim_for_runners(&n, &keys).unwrap_or_else(|e| {
                    tracing::warn!(node = %n, error = %ember_error::chain(&e), "warm hand-off failed");
                    vec![None; keys.len()]
                })
            };
            Ok((out, handed, freed))
        })
        .await?;
    s.metrics.reported(&kinds, &out);
    for next in handed {
        let Some(run) = next else {
            freed += 1;
            continue;
        };
        let id = run.id;
        if !s.push(node, WorkMessage::Assign { run: Box::new(run) }) {
            tracing::warn!(node, run = %id, "node disconnected before the warm hand-off");
        }
    }
    if freed > 0 {
        s.wake.notify_one();
    }
    for run in out.iter().flatten() {
        let _ = s.log_events.send(run.id);
    }
    Ok(out)
}
