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
use std::collections::BTreeMap;
use std::sync::Arc;

/// Largest artifact accepted.
const MAX_ARTIFACT: usize = 512 << 20;

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
        .layer(DefaultBodyLimit::max(MAX_ARTIFACT))
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
        blocking(move || s.get_blob(&scope, &hash))
            .await?
            .ok_or(CacheError::NotFound(format!("artifact {what}")))
    }
    .await;
    match r {
        Ok((data, meta)) => {
            let mut b = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, data.len());
            for (k, v) in &meta {
                if let Ok(v) = HeaderValue::from_str(v) {
                    b = b.header(k.as_str(), v);
                }
            }
            let body = if method == Method::HEAD {
                axum::body::Body::empty()
            } else {
                axum::body::Body::from(data)
            };
            b.body(body).unwrap_or_else(|_| Response::default())
        }
        Err(e) => e.into_response(),
    }
}

async fn put_artifact(
    State(s): St,
    UrlPath(hash): UrlPath<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = async {
        let scope = authorize(&s, &uri, &headers)?;
        check_hash(&hash)?;
        let mut meta = BTreeMap::new();
        for k in KEPT {
            if let Some(v) = headers.get(k).and_then(|v| v.to_str().ok())
                && v.len() <= 1024
            {
                meta.insert(k.to_string(), v.to_string());
            }
        }
        let h = hash.clone();
        blocking(move || s.put_blob(&scope, &h, &body, meta)).await?;
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
