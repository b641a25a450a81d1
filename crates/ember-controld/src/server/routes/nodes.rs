//! `/v1/nodes`: list (clients), register and heartbeat (`PUT`, the node
//! itself), and a node's credentials (issued and revoked by clients).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use ember_api::wire::{NodeCredential, RevokedCredentials};
use ember_control::model::{NodeAnswer, NodeSpec, stale_snapshots};

use super::parse_json;
use crate::credentials;
use crate::server::auth::reload_credentials;
use crate::server::error::json_response;
use crate::server::{ApiError, Shared};

pub(crate) async fn list_nodes(State(s): State<Shared>) -> Result<Response, ApiError> {
    let nodes = s.db(|st| st.list_nodes()).await?;
    Ok(json_response(StatusCode::OK, &nodes))
}

/// Issues a new credential for node `id` (which need not have registered
/// yet); the token is in the answer and nowhere else.
pub(crate) async fn issue_credential(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let token =
        credentials::new_token().map_err(|e| ApiError::Internal(format!("making a token: {e}")))?;
    let h = credentials::hash(&token);
    let (node, hash) = (id.clone(), h.clone());
    s.db(move |st| st.add_node_credential(&node, &hash)).await?;
    s.credentials.insert(h, id.clone());
    tracing::info!(node = %id, "issued a node credential");
    Ok(json_response(
        StatusCode::CREATED,
        &NodeCredential { node: id, token },
    ))
}

/// Revokes every credential of node `id`; its work stream, if one of them
/// opened it, is closed here at once and on other replicas within a second.
pub(crate) async fn revoke_credentials(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let node = id.clone();
    let revoked = s.db(move |st| st.revoke_node_credentials(&node)).await?;
    reload_credentials(&s).await?;
    tracing::info!(node = %id, revoked, "revoked node credentials");
    Ok(json_response(
        StatusCode::OK,
        &RevokedCredentials { node: id, revoked },
    ))
}

pub(crate) async fn put_node(
    State(s): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let spec: NodeSpec = parse_json(&body, "node")?;
    // A well-formed body for another node: 409, as the document says (a
    // schema cannot tie the body to the path, so this is no 400).
    if spec.id != id {
        return Err(ApiError::Conflict(format!(
            "node id in the body ({:?}) differs from the path ({id:?})",
            spec.id
        )));
    }
    // A node that holds checkpoints of snapshot deployments learns here
    // which of them no live deployment restores any more (deleted, or its
    // snapshot setting gone); one that was away at the delete converges at
    // its next heartbeat. Nodes with none pay no deployment read.
    let answer = s
        .db(move |st| {
            let node = st.upsert_node(&spec)?;
            let stale = if spec.inventory.snapshots.is_empty() {
                Default::default()
            } else {
                stale_snapshots(&spec.inventory.snapshots, &st.list_deployments()?)
            };
            Ok(NodeAnswer {
                node,
                stale_snapshots: stale,
            })
        })
        .await?;
    // New capacity or new warm runners may make queued runs placeable.
    s.wake.notify_one();
    // A heartbeat is where warm runners used up (or expired) show.
    s.prewarm.notify_one();
    Ok(json_response(StatusCode::OK, &answer))
}
