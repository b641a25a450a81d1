//! `/v1/deployments`: create, list, delete.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use ember_control::model::DeploymentSpec;

use super::{check_env_size, env_bytes, parse_json};
use crate::server::error::json_response;
use crate::server::{ApiError, Shared};

pub(crate) async fn create_deployment(
    State(s): State<Shared>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let spec: DeploymentSpec = parse_json(&body, "deployment")?;
    check_env_size(&s, "deployment", env_bytes(&spec.env, &spec.command))?;
    let d = s.db(move |st| st.create_deployment(&spec)).await?;
    if d.spec.warm_runners > 0 {
        s.prewarm.notify_one();
    }
    Ok(json_response(StatusCode::CREATED, &d))
}

pub(crate) async fn list_deployments(State(s): State<Shared>) -> Result<Response, ApiError> {
    let ds = s.db(|st| st.list_deployments()).await?;
    Ok(json_response(StatusCode::OK, &ds))
}

/// `DELETE /v1/deployments/{name}`: the deployment goes; its runs stay.
/// Nodes drop its checkpoints at their next heartbeat (the answer's
/// `stale_snapshots`), and its warm runners stop being kept.
pub(crate) async fn delete_deployment(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let d = s.db(move |st| st.delete_deployment(&name)).await?;
    if d.spec.warm_runners > 0 {
        s.prewarm.notify_one();
    }
    tracing::info!(deployment = %d.spec.name, "deleted a deployment");
    Ok(json_response(StatusCode::OK, &d))
}
