//! The Turborepo remote-cache API (`/v8/artifacts`) on the directory
//! cache's chunk store, so teams already using `turbo` can point it at
//! Ember (`turbo run build --api http://cache:5000 --token T --team X`).
//!
//! An artifact is stored as a one-file entry of scope `turbo/<team>` keyed
//! by its hash: chunked and compressed like a saved tree, verified on every
//! read, under the same budgets, expiry and GC. Every request needs one of
//! the configured bearer tokens; with none configured the API is off.

use crate::dircache::DirStore;
use crate::error::CacheError;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Largest artifact accepted. Artifacts are streamed in and out, so this
/// bounds disk use, not memory.
const MAX_ARTIFACT: u64 = 16 << 30;

/// Largest `POST /v8/artifacts` query body.
const MAX_QUERY: usize = 4 << 20;

/// Body frames or chunks buffered between the network and the store.
const STREAM_AHEAD: usize = 4;

/// Headers of an upload kept and sent back with the artifact.
const KEPT: [&str; 2] = ["x-artifact-duration", "x-artifact-tag"];

/// The `/v8` routes (to be merged at the root).
pub fn router<S>(store: Arc<DirStore>) -> Router<S> {
    Router::new()
        .route("/v8/artifacts/status", get(status))
        .route("/v8/artifacts/events", post(events))
        .route("/v8/artifacts", post(query))
        .route(
            "/v8/artifacts/{hash}",
            get(get_artifact).head(get_artifact).put(put_artifact),
        )
        .layer(DefaultBodyLimit::max(MAX_QUERY))
        .with_state(store)
}

type St = State<Arc<DirStore>>;

/// Checks the bearer token and returns the scope of the request's team.
fn authorize(store: &DirStore, uri: &Uri, headers: &HeaderMap) -> Result<String, CacheError> {
    let tokens = &store.config().turbo_tokens;
    if tokens.is_empty() {
        return Err(CacheError::NotFound(
            "the Turborepo API is not enabled".into(),
        ));
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if !token.is_some_and(|t| tokens.iter().any(|k| k == t)) {
        return Err(CacheError::Unauthorized("turborepo".into()));
    }
    let mut team = None;
    for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        if k == "teamId" || (k == "slug" && team.is_none()) {
            team = Some(v.into_owned());
        }
    }
    let team = team.unwrap_or_else(|| "-".into());
    if team.len() > 200 || team.chars().any(char::is_control) {
        return Err(CacheError::BadRequest("invalid team".into()));
    }
    Ok(format!("turbo/{team}"))
}

fn check_hash(h: &str) -> Result<(), CacheError> {
    let ok = !h.is_empty()
        && h.len() <= 128
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(CacheError::BadRequest("invalid artifact hash".into()))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CacheError::io("a worker thread", std::io::Error::other(e)))?
}

async fn status(State(s): St, uri: Uri, headers: HeaderMap) -> Response {
    match authorize(&s, &uri, &headers) {
        Ok(_) => json(StatusCode::OK, r#"{"status":"enabled"}"#.into()),
        Err(e) => e.into_response(),
    }
}

async fn events(State(s): St, uri: Uri, headers: HeaderMap) -> Response {
    // Usage events (HIT/MISS) are accepted and not kept.
    match authorize(&s, &uri, &headers) {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => e.into_response(),
    }
}

fn json(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// `POST /v8/artifacts {"hashes": [...]}`: which artifacts exist.
async fn query(State(s): St, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let r = async {
        let scope = authorize(&s, &uri, &headers)?;
        #[derive(serde::Deserialize)]
        struct Q {
            hashes: Vec<String>,
        }
        let q: Q =
            serde_json::from_slice(&body).map_err(|e| CacheError::BadRequest(e.to_string()))?;
        let mut out = serde_json::Map::new();
        for h in q.hashes.into_iter().take(1000) {
            let v = if check_hash(&h).is_ok() && s.has_entry(&scope, &h) {
                serde_json::json!({})
            } else {
                serde_json::Value::Null
            };
            out.insert(h, v);
        }
        Ok::<_, CacheError>(serde_json::Value::Object(out).to_string())
    }
    .await;
    match r {
        Ok(b) => json(StatusCode::OK, b),
        Err(e) => e.into_response(),
    }
}

async fn get_artifact(
    State(s): St,
    UrlPath(hash): UrlPath<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let r = async {
        let scope = authorize(&s, &uri, &headers)?;
        check_hash(&hash)?;
        let what = hash.clone();
        let s2 = s.clone();
        let (manifest, meta) = blocking(move || s2.blob_manifest(&scope, &hash))
            .await?
            .ok_or_else(|| CacheError::NotFound(format!("artifact {what}")))?;
        // Every chunk present before the first byte: a collected chunk is
        // a clean 404, not a cut-off body.
        let digests: Vec<String> = manifest.chunks.iter().map(|c| c.digest.clone()).collect();
        if !s.absent(&digests).is_empty() {
            return Err(CacheError::NotFound(format!("artifact {what}")));
        }
        Ok::<_, CacheError>((manifest, meta))
    }
    .await;
    let (manifest, meta) = match r {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, manifest.data_bytes());
    for (k, v) in &meta {
        if let Ok(v) = HeaderValue::from_str(v) {
            b = b.header(k.as_str(), v);
        }
    }
    let body = if method == Method::HEAD {
        axum::body::Body::empty()
    } else {
        // Streamed: one chunk at a time is read, verified and handed on,
        // at most STREAM_AHEAD ahead of the client. A chunk that fails its
        // check ends the body early, so the client sees a cut-off answer
        // (shorter than its Content-Length), never wrong bytes.
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(STREAM_AHEAD);
        tokio::task::spawn_blocking(move || {
            for c in &manifest.chunks {
                let r = match s.blob_chunk(c) {
                    Ok(Some(d)) => Ok(Bytes::from(d)),
                    Ok(None) => Err(std::io::Error::other(format!("chunk {} is gone", c.digest))),
                    Err(e) => Err(std::io::Error::other(e.to_string())),
                };
                if let Err(e) = &r {
                    tracing::warn!(error = %ember_error::chain(&e), "serving a Turborepo artifact");
                }
                let end = r.is_err();
                if tx.blocking_send(r).is_err() || end {
                    break;
                }
            }
        });
        axum::body::Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|x| (x, rx))
        }))
    };
    b.body(body).unwrap_or_else(|_| Response::default())
}

/// The request body as a blocking reader, for the chunker.
struct BodyReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    cur: Bytes,
}

impl std::io::Read for BodyReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

async fn put_artifact(
    State(s): St,
    UrlPath(hash): UrlPath<String>,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let checked = authorize(&s, &uri, &headers).and_then(|scope| {
        check_hash(&hash)?;
        Ok(scope)
    });
    let scope = match checked {
        Ok(scope) => scope,
        Err(e) => {
            crate::error::discard_body(body).await;
            return e.into_response();
        }
    };
    let r = async {
        let mut meta = BTreeMap::new();
        for k in KEPT {
            if let Some(v) = headers.get(k).and_then(|v| v.to_str().ok())
                && v.len() <= 1024
            {
                meta.insert(k.to_string(), v.to_string());
            }
        }
        // Streamed into the chunk store as it arrives: the channel holds a
        // few body frames, the chunker one chunk.
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(STREAM_AHEAD);
        let h = hash.clone();
        let store = tokio::task::spawn_blocking(move || {
            let src = BodyReader {
                rx,
                cur: Bytes::new(),
            };
            s.put_blob_from(&scope, &h, src, MAX_ARTIFACT, meta)
        });
        let mut frames = body.into_data_stream();
        while let Some(f) = frames.next().await {
            // A body broken off is an error for the chunker, so a
            // truncated upload is never stored as an artifact.
            let f = f.map_err(std::io::Error::other);
            let end = f.is_err();
            if tx.send(f).await.is_err() || end {
                break; // the store stopped; its error is reported below
            }
        }
        drop(tx);
        store
            .await
            .map_err(|e| CacheError::io("a worker thread", std::io::Error::other(e)))??;
        Ok::<_, CacheError>(hash)
    }
    .await;
    match r {
        Ok(hash) => json(
            StatusCode::ACCEPTED,
            serde_json::json!({"urls": [format!("/v8/artifacts/{hash}")]}).to_string(),
        ),
        Err(e) => e.into_response(),
    }
}
