//! `GET /v1/nodes/{id}/work`: a node's work stream, NDJSON
//! [`WorkMessage`]s for as long as the node stays connected.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use ember_api::wire::WorkMessage;
use ember_control::model::{NodeId, Run, RunState};
use ember_control::store::RunFilter;
use tokio::sync::mpsc;

use crate::server::auth::NodeAuth;
use crate::server::{ApiError, Shared, WorkStream};

pub(crate) async fn work_stream(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Extension(auth): Extension<NodeAuth>,
) -> Result<Response, ApiError> {
    let credential = auth.credential;
    let node = id.clone();
    let known = s
        .db(move |st| Ok(st.list_nodes()?.into_iter().any(|n| n.spec.id == node)))
        .await?;
    if !known {
        return Err(ApiError::NotFound(format!(
            "node {id:?} is not registered (PUT /v1/nodes/{id} first)"
        )));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let conn = s.next_conn.fetch_add(1, Ordering::Relaxed);
    // A zero interval would send keepalives in a busy loop.
    let keepalive = s.config.keepalive.max(Duration::from_millis(10));
    // Runs assigned while the node was away (or before a control-plane
    // restart) are sent again; the node ignores runs it already has.
    let node = id.clone();
    let mine = s
        .db(move |st| {
            st.list_runs(&RunFilter {
                states: vec![RunState::Scheduled, RunState::Starting, RunState::Running],
                node: Some(node),
                ..RunFilter::default()
            })
        })
        .await?;
    let (pending, active): (Vec<Run>, Vec<Run>) = mine
        .into_iter()
        .rev()
        .partition(|r| r.state == RunState::Scheduled);
    let _ = tx.send(WorkMessage::Active {
        runs: active.iter().map(|r| r.id).collect(),
        keepalive_ms: Some(u64::try_from(keepalive.as_millis()).unwrap_or(u64::MAX)),
        scheduled: Some(pending.iter().map(|r| r.id).collect()),
    });
    for run in pending {
        let _ = tx.send(WorkMessage::Assign { run: Box::new(run) });
    }
    {
        let mut streams = s.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.insert(
            id.clone(),
            WorkStream {
                conn,
                tx,
                credential,
            },
        );
    }
    tracing::info!(node = %id, "work stream opened");
    s.wake.notify_one();
    s.prewarm.notify_one();
    s.prepull.notify_one();

    /// Removes the stream from the table when the response body is dropped
    /// (the node disconnected).
    struct Guard {
        s: Shared,
        node: NodeId,
        conn: u64,
    }
    impl Drop for Guard {
        fn drop(&mut self) {
            let mut streams = self.s.streams.lock().unwrap_or_else(|e| e.into_inner());
            if streams.get(&self.node).is_some_and(|w| w.conn == self.conn) {
                streams.remove(&self.node);
                tracing::info!(node = %self.node, "work stream closed");
            }
        }
    }
    let guard = Guard { s, node: id, conn };
    let stream = futures_util::stream::unfold((rx, guard), move |(mut rx, guard)| async move {
        let msg = match tokio::time::timeout(keepalive, rx.recv()).await {
            Ok(Some(msg)) => msg,
            Ok(None) => return None,
            // Idle for a whole interval. A write to a peer that is gone
            // also fails here, which closes the stream on this side.
            Err(_) => WorkMessage::Keepalive,
        };
        let mut line = match serde_json::to_vec(&msg) {
            Ok(l) => l,
            Err(e) => return Some((Err(std::io::Error::other(e)), (rx, guard))),
        };
        line.push(b'\n');
        Some((Ok::<Bytes, std::io::Error>(Bytes::from(line)), (rx, guard)))
    });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}
