//! A run's output: `GET /v1/runs/{id}/logs` (read, or followed until the
//! run ends) and `POST /v1/nodes/{id}/runs/{run}/logs` (a node appends).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use ember_api::wire::{LogRecord, LogStream};
use ember_control::Appended;
use ember_control::model::{LogChunk, RunId};
use tokio::sync::broadcast;

use super::{query_pairs, run_id};
use crate::server::{ApiError, Shared};

/// Log chunks read from the store at a time, at most...
const LOG_PAGE: usize = 256;
/// ...and about this many bytes of output (one chunk more at most): a log
/// read holds one page at a time, however long the log is.
const LOG_PAGE_BYTES: usize = 1 << 20;

pub(crate) async fn get_logs(
    State(s): State<Shared>,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let id = run_id(&id)?;
    let mut follow = false;
    for (k, v) in query_pairs(&uri) {
        match (k.as_str(), v.as_str()) {
            ("follow", "true" | "1" | "") => follow = true,
            ("follow", "false" | "0") => follow = false,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {k}={v}"
                )));
            }
        }
    }
    // Subscribe before the first read, so nothing appended in between is
    // missed.
    let rx = s.log_events.subscribe();
    if s.db(move |st| st.get_run(id)).await?.is_none() {
        return Err(ApiError::NotFound(format!("{id} not found")));
    }
    struct Follow {
        s: Shared,
        id: RunId,
        after: u64,
        rx: broadcast::Receiver<RunId>,
        done: bool,
        /// The run was seen final: what the next read finds is all
        /// there will be. A read without `follow` starts so: it ends at
        /// the first empty page.
        final_seen: bool,
    }
    // Both kinds of read stream the log a page at a time (at most
    // LOG_PAGE_BYTES held per reader), so a long log is never built in
    // memory whole.
    let st = Follow {
        s,
        id,
        after: 0,
        rx,
        done: false,
        final_seen: !follow,
    };
    let stream = futures_util::stream::unfold(st, |mut f| async move {
        loop {
            if f.done {
                return None;
            }
            let (id, after) = (f.id, f.after);
            match f
                .s
                .db(move |st| st.read_log(id, after, LOG_PAGE, LOG_PAGE_BYTES))
                .await
            {
                Ok(chunks) if !chunks.is_empty() => {
                    f.after = chunks.last().map_or(f.after, |c| c.seq);
                    // Encoding a page (up to a MiB, base64 in JSON) is CPU
                    // work: off the async workers, so readers re-reading a
                    // long log cannot starve the nodes' appends and reports
                    // of a worker (seen in CI: a run printing 100 MB crawled for minutes).
                    let encoded = tokio::task::spawn_blocking(move || {
                        let mut out = Vec::new();
                        records(&chunks, &mut out).map(|()| out)
                    })
                    .await
                    .map_err(|e| ApiError::Internal(format!("encoding a log page: {e}")))
                    .and_then(|r| r);
                    return match encoded {
                        Ok(out) => Some((Ok::<Bytes, std::io::Error>(Bytes::from(out)), f)),
                        Err(e) => Some((
                            Err(std::io::Error::other(ember_error::chain(&e).to_string())),
                            Follow { done: true, ..f },
                        )),
                    };
                }
                Ok(_) if f.final_seen => return None,
                Ok(_) => {}
                Err(e) => {
                    return Some((
                        Err(std::io::Error::other(ember_error::chain(&e).to_string())),
                        Follow { done: true, ..f },
                    ));
                }
            }
            let finished = match f.s.db(move |st| st.get_run(id)).await {
                Ok(Some(run)) => run.state.is_final(),
                _ => true,
            };
            if finished {
                // Nodes post all output before reporting the exit, so
                // reading on after seeing the final state (until a read
                // comes back empty) gets everything, including output
                // appended between the last read and that check.
                f.final_seen = true;
                continue;
            }
            loop {
                match f.rx.recv().await {
                    Ok(r) if r == f.id => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Appends `chunks` to `out` as NDJSON [`LogRecord`] lines.
fn records(chunks: &[LogChunk], out: &mut Vec<u8>) -> Result<(), ApiError> {
    for c in chunks {
        let record = LogRecord {
            stream: c.stream,
            data: c.data.clone(),
            marker: c.marker,
        };
        serde_json::to_writer(&mut *out, &record)
            .map_err(|e| ApiError::Internal(format!("serialising a log record: {e}")))?;
        out.push(b'\n');
    }
    Ok(())
}

pub(crate) async fn node_logs(
    State(s): State<Shared>,
    Path((node, id)): Path<(String, String)>,
    uri: Uri,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = run_id(&id)?;
    let mut stream = LogStream::Stdout;
    for (k, v) in query_pairs(&uri) {
        match (k.as_str(), v.as_str()) {
            ("stream", "stdout") => stream = LogStream::Stdout,
            ("stream", "stderr") => stream = LogStream::Stderr,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {k}={v} (expected stream=stdout|stderr)"
                )));
            }
        }
    }
    let body_was_empty = body.is_empty();
    // The bytes as they came (base64 only in the records clients read):
    // output need not be UTF-8, and a character may be split between two
    // appends. The store checks the run is this node's and active, so a
    // stale node learns it is stale even from an empty post.
    let max = s.config.max_log_bytes;
    let appended = s
        .db(move |st| st.append_log(&node, id, stream, &body, max))
        .await?;
    if !body_was_empty && appended != Appended::Dropped {
        let _ = s.log_events.send(id);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
