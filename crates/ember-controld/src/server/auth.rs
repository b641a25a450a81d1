//! Who may call what, as two layers over the router: [`require_client`]
//! over the client routes (the client token), [`require_node`] over the
//! node routes (the shared node token or a credential issued to the node
//! named in the path). Handlers behind them check nothing themselves.
//!
//! The credential table is kept in memory ([`crate::credentials`]) and
//! reloaded by [`credentials_loop`], so revocations through other
//! replicas take effect here within a second.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::Response;
use ember_control::model::NodeId;

use super::{ApiError, Shared};
use crate::credentials;

/// What [`require_node`] leaves in a node request's extensions: the hash
/// of the issued credential that opened it, if one did (the shared token,
/// or no token at all where none is required, leaves `None`). The work
/// stream keeps it, so revoking the credential closes the stream.
#[derive(Debug, Clone)]
pub(super) struct NodeAuth {
    /// The credential's hash.
    pub(super) credential: Option<String>,
}

/// The layer over client routes: the client token, when one is set.
pub(super) async fn require_client(
    State(s): State<Shared>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    check_token(req.headers(), &s.config.client_token)?;
    Ok(next.run(req).await)
}

/// The layer over node routes, whose path names the node as `{id}`: see
/// [`node_auth`]. Leaves a [`NodeAuth`] in the request's extensions.
pub(super) async fn require_node(
    State(s): State<Shared>,
    Path(params): Path<HashMap<String, String>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let node = params
        .get("id")
        .ok_or_else(|| ApiError::Internal("a node route without {id}".into()))?;
    let credential = node_auth(&s, req.headers(), node).await?;
    req.extensions_mut().insert(NodeAuth { credential });
    Ok(next.run(req).await)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Constant-time comparison: the token is a secret.
fn same_secret(got: &str, want: &str) -> bool {
    got.len() == want.len()
        && got
            .bytes()
            .zip(want.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn check_token(headers: &HeaderMap, want: &Option<String>) -> Result<(), ApiError> {
    let Some(want) = want else { return Ok(()) };
    if bearer(headers).is_some_and(|g| same_secret(g, want)) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Checks a request on `node`'s endpoints: the shared node token (any
/// node), else a credential issued to `node` (one issued to another node
/// is 403), else nothing only when neither is configured. Returns the hash
/// of the credential used, if one was.
async fn node_auth(
    s: &Shared,
    headers: &HeaderMap,
    node: &str,
) -> Result<Option<String>, ApiError> {
    let got = bearer(headers);
    if let (Some(want), Some(got)) = (&s.config.node_token, got)
        && same_secret(got, want)
    {
        return Ok(None);
    }
    if let Some(got) = got {
        let h = credentials::hash(got);
        let mut owner = s.credentials.owner(&h);
        // Issued through another replica since the last reload, perhaps.
        if owner.is_none() && s.credentials.may_reload() {
            reload_credentials(s).await?;
            owner = s.credentials.owner(&h);
        }
        match owner {
            Some(o) if o == node => return Ok(Some(h)),
            Some(o) => {
                tracing::warn!(credential_of = %o, path_node = %node, "a node credential used for another node");
                return Err(ApiError::Forbidden(format!(
                    "this credential is not node {node:?}'s"
                )));
            }
            None => {}
        }
    }
    if s.config.node_token.is_none() && !s.config.require_node_credentials {
        return Ok(None);
    }
    Err(ApiError::Unauthorized)
}

/// Reloads the credential table from the store and closes the work
/// streams whose credential is gone (revoked, through any replica).
pub(super) async fn reload_credentials(s: &Shared) -> Result<(), ApiError> {
    let rows = s.db(|st| st.node_credentials()).await?;
    s.credentials.replace(rows);
    let revoked: Vec<NodeId> = {
        let streams = s.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams
            .iter()
            .filter(|(_, w)| {
                w.credential
                    .as_ref()
                    .is_some_and(|h| s.credentials.owner(h).is_none())
            })
            .map(|(n, _)| n.clone())
            .collect()
    };
    if !revoked.is_empty() {
        let mut streams = s.streams.lock().unwrap_or_else(|e| e.into_inner());
        for n in revoked {
            // Dropping the sender ends the stream.
            if streams.remove(&n).is_some() {
                tracing::warn!(node = %n, "closed a work stream: its credential was revoked");
            }
        }
    }
    Ok(())
}

/// How often the credential table is reloaded, so revocations through
/// other replicas take effect here.
const CREDENTIALS_RELOAD: Duration = Duration::from_secs(1);

/// Reloads the credential table every [`CREDENTIALS_RELOAD`].
pub(super) async fn credentials_loop(s: Shared) {
    let mut tick = tokio::time::interval(CREDENTIALS_RELOAD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = reload_credentials(&s).await {
            tracing::warn!(error = %ember_error::chain(&e), "reloading node credentials failed");
        }
    }
}
