//! A small HTTP client for the control-plane API, used by the CLI and by
//! nodes.

use std::time::Duration;

use bytes::Bytes;
use ember_control::model::{
    Deployment, DeploymentSpec, Node, NodeAnswer, NodeReport, NodeSpec, Run, RunId, RunSpec,
};
use serde::de::DeserializeOwned;

use crate::wire::{
    ErrorBody, EventResults, LogStream, NodeEvents, RunPage, RunReports, SubmitResponse,
};

/// Errors talking to the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not usable.
    #[error("invalid control-plane URL {0:?}: expected http://HOST:PORT")]
    BadUrl(String),
    /// The request did not get an answer.
    #[error("{url}: {detail}")]
    Http {
        /// What was requested.
        url: String,
        /// Why it failed (the whole cause chain).
        detail: String,
    },
    /// The server answered with an error.
    #[error("{url}: {status} {error}: {message}")]
    Api {
        /// What was requested.
        url: String,
        /// HTTP status.
        status: u16,
        /// The error code.
        error: String,
        /// The server's message.
        message: String,
    },
    /// The answer was not what the API promises.
    #[error("{url}: unexpected response: {detail}")]
    Decode {
        /// What was requested.
        url: String,
        /// What was wrong.
        detail: String,
    },
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The longest an ordinary (non-streaming) request may take, answer
/// included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Serialises a request body. The model types always serialise.
fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// `e` and its sources, `: `-separated: what a one-line message needs when
/// the cause is several layers down. The same as [`ember_error::chain`].
pub fn error_chain(e: &dyn std::error::Error) -> String {
    chain(e)
}

fn chain(e: &dyn std::error::Error) -> String {
    ember_error::chain(e).to_string()
}

/// A client for one control plane with one bearer token.
#[derive(Debug, Clone)]
pub struct ControlClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl ControlClient {
    /// A client for `base` (`http://host:port`) sending `token`.
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::BadUrl(base.to_owned()));
        }
        let http = ember_http::client::builder(&[base])
            .user_agent(concat!("ember/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ClientError::Http {
                url: base.to_owned(),
                detail: chain(&e),
            })?;
        Ok(ControlClient {
            base: base.trim_end_matches('/').to_owned(),
            token: token.filter(|t| !t.is_empty()),
            http,
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request that must be answered within [`REQUEST_TIMEOUT`]: a
    /// connection that went silent (a restarted NAT, a dead peer) fails it
    /// instead of hanging a node's heartbeats or reports forever.
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.req_stream(method, path).timeout(REQUEST_TIMEOUT)
    }

    /// A request whose response may stay open indefinitely (work stream,
    /// followed logs): no overall timeout; the reader watches for silence.
    fn req_stream(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Sends `req` and returns the response if its status is a success,
    /// else the API error it carries.
    pub async fn send(
        &self,
        path: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let url = self.url(path);
        let resp = req.send().await.map_err(|e| ClientError::Http {
            url: url.clone(),
            detail: chain(&e),
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.bytes().await.unwrap_or_default();
        let (error, message) = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(b) => (b.error, b.message),
            Err(_) => (
                status.canonical_reason().unwrap_or("error").to_owned(),
                String::from_utf8_lossy(&body).into_owned(),
            ),
        };
        Err(ClientError::Api {
            url,
            status: status.as_u16(),
            error,
            message,
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        path: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = self.send(path, req).await?;
        let body = resp.bytes().await.map_err(|e| ClientError::Http {
            url: self.url(path),
            detail: chain(&e),
        })?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            url: self.url(path),
            detail: e.to_string(),
        })
    }

    /// `POST /v1/runs`, with an `Idempotency-Key` header when `key` is set.
    pub async fn submit(
        &self,
        spec: &RunSpec,
        key: Option<&str>,
    ) -> Result<SubmitResponse, ClientError> {
        let mut req = self
            .req(reqwest::Method::POST, "/v1/runs")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(to_json(spec));
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        self.json("/v1/runs", req).await
    }

    /// `GET /v1/runs?limit=&cursor=`: one page, newest first (`limit`
    /// `None`: the server's default page size; `cursor`: the previous
    /// page's `next_cursor`).
    pub async fn runs_page(
        &self,
        limit: Option<usize>,
        cursor: Option<&str>,
    ) -> Result<RunPage, ClientError> {
        // The serializer is not Send: finish it before any await.
        let q = {
            let mut q = form_urlencoded::Serializer::new(String::new());
            if let Some(l) = limit {
                q.append_pair("limit", &l.to_string());
            }
            if let Some(c) = cursor {
                q.append_pair("cursor", c);
            }
            q.finish()
        };
        let path = if q.is_empty() {
            "/v1/runs".to_owned()
        } else {
            format!("/v1/runs?{q}")
        };
        self.json(&path, self.req(reqwest::Method::GET, &path))
            .await
    }

    /// Every run, newest first, fetched page by page (all of them end up
    /// in memory: for tests and small clusters; page with
    /// [`ControlClient::runs_page`] otherwise).
    pub async fn runs(&self) -> Result<Vec<Run>, ClientError> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self.runs_page(None, cursor.as_deref()).await?;
            all.extend(page.runs);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(all),
            }
        }
    }

    /// `GET /v1/runs/{id}`.
    pub async fn run(&self, id: RunId) -> Result<Run, ClientError> {
        let path = format!("/v1/runs/{}", id.0);
        self.json(&path, self.req(reqwest::Method::GET, &path))
            .await
    }

    /// `POST /v1/runs/{id}/cancel`.
    pub async fn cancel(&self, id: RunId) -> Result<Run, ClientError> {
        let path = format!("/v1/runs/{}/cancel", id.0);
        self.json(&path, self.req(reqwest::Method::POST, &path))
            .await
    }

    /// `GET /v1/runs/{id}/logs[?follow=true]`: the response, whose body is
    /// newline-delimited [`LogRecord`](crate::wire::LogRecord)s.
    pub async fn logs(&self, id: RunId, follow: bool) -> Result<reqwest::Response, ClientError> {
        let path = format!(
            "/v1/runs/{}/logs{}",
            id.0,
            if follow { "?follow=true" } else { "" }
        );
        self.send(&path, self.req_stream(reqwest::Method::GET, &path))
            .await
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<Vec<Node>, ClientError> {
        self.json("/v1/nodes", self.req(reqwest::Method::GET, "/v1/nodes"))
            .await
    }

    /// `POST /v1/deployments`.
    pub async fn deploy(&self, spec: &DeploymentSpec) -> Result<Deployment, ClientError> {
        self.json(
            "/v1/deployments",
            self.req(reqwest::Method::POST, "/v1/deployments")
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(to_json(spec)),
        )
        .await
    }

    /// `GET /v1/deployments`.
    pub async fn deployments(&self) -> Result<Vec<Deployment>, ClientError> {
        self.json(
            "/v1/deployments",
            self.req(reqwest::Method::GET, "/v1/deployments"),
        )
        .await
    }

    /// `DELETE /v1/deployments/{name}`: removes it; returns what it was.
    pub async fn delete_deployment(&self, name: &str) -> Result<Deployment, ClientError> {
        let path = format!("/v1/deployments/{}", path_segment(name));
        self.json(&path, self.req(reqwest::Method::DELETE, &path))
            .await
    }

    /// `POST /v1/nodes/{id}/credentials`: a new credential for node `id`.
    pub async fn issue_node_credential(
        &self,
        node: &str,
    ) -> Result<crate::wire::NodeCredential, ClientError> {
        let path = format!("/v1/nodes/{node}/credentials");
        self.json(&path, self.req(reqwest::Method::POST, &path))
            .await
    }

    /// `DELETE /v1/nodes/{id}/credentials`: revokes all of node `id`'s.
    pub async fn revoke_node_credentials(
        &self,
        node: &str,
    ) -> Result<crate::wire::RevokedCredentials, ClientError> {
        let path = format!("/v1/nodes/{node}/credentials");
        self.json(&path, self.req(reqwest::Method::DELETE, &path))
            .await
    }

    /// `PUT /v1/nodes/{id}`: register or heartbeat.
    pub async fn put_node(&self, spec: &NodeSpec) -> Result<NodeAnswer, ClientError> {
        let path = format!("/v1/nodes/{}", spec.id);
        self.json(
            &path,
            self.req(reqwest::Method::PUT, &path)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(to_json(spec)),
        )
        .await
    }

    /// `GET /v1/nodes/{id}/work`: the open stream.
    pub async fn work(&self, node: &str) -> Result<reqwest::Response, ClientError> {
        let path = format!("/v1/nodes/{node}/work");
        self.send(&path, self.req_stream(reqwest::Method::GET, &path))
            .await
    }

    /// `POST /v1/nodes/{node}/runs/{run}/events`.
    pub async fn report(
        &self,
        node: &str,
        run: RunId,
        report: &NodeReport,
    ) -> Result<Run, ClientError> {
        self.report_events(node, run, &NodeEvents::One(report.clone()))
            .await
    }

    /// `POST /v1/nodes/{node}/runs/{run}/events` with one report or several
    /// in order.
    pub async fn report_events(
        &self,
        node: &str,
        run: RunId,
        report: &NodeEvents,
    ) -> Result<Run, ClientError> {
        let path = format!("/v1/nodes/{node}/runs/{}/events", run.0);
        self.json(
            &path,
            self.req(reqwest::Method::POST, &path)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(to_json(report)),
        )
        .await
    }

    /// `POST /v1/nodes/{node}/events`: reports on several runs in one
    /// request; one result per entry, in order.
    pub async fn report_batch(
        &self,
        node: &str,
        batch: &[RunReports],
    ) -> Result<EventResults, ClientError> {
        let path = format!("/v1/nodes/{node}/events");
        self.json(
            &path,
            self.req(reqwest::Method::POST, &path)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(to_json(&batch)),
        )
        .await
    }

    /// `POST /v1/nodes/{node}/runs/{run}/logs?stream=...`: `data` is the
    /// raw output (any bytes), sent as the body unchanged.
    pub async fn append_log(
        &self,
        node: &str,
        run: RunId,
        stream: LogStream,
        data: Bytes,
    ) -> Result<(), ClientError> {
        let path = format!(
            "/v1/nodes/{node}/runs/{}/logs?stream={}",
            run.0,
            stream.as_str()
        );
        self.send(
            &path,
            self.req(reqwest::Method::POST, &path)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(data),
        )
        .await
        .map(|_| ())
    }
}

/// `s` as one URL path segment: bytes other than unreserved characters
/// percent-encoded (a deployment name may hold `/`, `?` or spaces).
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
