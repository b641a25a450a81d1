//! HTTP: the read side of the distribution API, `/metrics`, the warm
//! endpoint, and forwarding to the peer that owns a blob.

use crate::cache::{Cache, Doc};
use crate::error::CacheError;
use crate::flight::{self, Lookup, Source};
use crate::metrics::Metrics;
use crate::route::{self, ByteRange, Target};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use std::sync::Arc;

/// Marks a request forwarded by a peer, so the owner serves it itself even
/// if its view of the ring differs (no forwarding loops).
pub const FORWARDED: &str = "x-ember-forwarded";

/// The router for a cache.
pub fn router(cache: Arc<Cache>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/ember/v1/warm", post(warm))
        .fallback(dispatch)
        .with_state(cache)
}

async fn metrics(State(cache): State<Arc<Cache>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        cache.metrics.render() + &crate::snapshots::render_gauges(&cache),
    )
        .into_response()
}

async fn warm(State(cache): State<Arc<Cache>>, body: Bytes) -> Response {
    match crate::warm::warm(&cache, &body).await {
        Ok(report) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            report,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn dispatch(
    State(cache): State<Arc<Cache>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let mut resp = match handle(&cache, &method, &uri, &headers).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    resp.headers_mut().insert(
        HeaderName::from_static("docker-distribution-api-version"),
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

async fn handle(
    cache: &Arc<Cache>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Response, CacheError> {
    let path = uri.path();
    if !path.starts_with("/v2") {
        return Err(CacheError::NotFound(path.chars().take(200).collect()));
    }
    let head = *method == Method::HEAD;
    if *method != Method::GET && !head {
        return Err(CacheError::Unsupported(format!("{method}")));
    }
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let target = route::parse_path(path)?;
    let (name, target) = match target {
        Target::Base => {
            if let Some(up) = cache.default_upstream()
                && !up.client_allowed(auth)
            {
                return Err(CacheError::Unauthorized(up.name.clone()));
            }
            return Ok(json_response(StatusCode::OK, "{}"));
        }
        Target::Manifest { ref name, .. } | Target::Blob { ref name, .. } => (name.clone(), target),
    };
    let ns = query_param(uri.query(), "ns");
    let (up, repo) = cache.select(&name, ns.as_deref())?;
    if !up.client_allowed(auth) {
        return Err(CacheError::Unauthorized(up.name.clone()));
    }
    match target {
        Target::Manifest { reference, .. } => {
            let (doc, stale) = cache.manifest(&up, &repo, &reference).await?;
            Ok(manifest_response(&doc, stale, head))
        }
        Target::Blob { digest, .. } => {
            if !headers.contains_key(FORWARDED)
                && let Some(ring) = cache.ring()
            {
                let owner = ring.owner(&digest);
                if owner != ring.me() {
                    match forward(cache, owner, method, uri, headers).await {
                        Ok(r) => return Ok(r),
                        Err(e) => {
                            tracing::warn!(peer = owner, error = %e, "peer failed; serving locally");
                            Metrics::add(&cache.metrics.peer_fallbacks, 1);
                        }
                    }
                }
            }
            let range = headers
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(route::parse_range);
            if head {
                let size = cache.blob_size(&up, &repo, &digest).await?;
                return blob_response(cache, None, &digest, Some(size), range, true);
            }
            let lookup = cache.blob(&up, &repo, &digest).await?;
            let size = match &lookup {
                Lookup::Hit(p) => Some(p.size),
                Lookup::Flight(f) => f.started().await?,
            };
            let source = match lookup {
                Lookup::Hit(p) => Source::Stored(p),
                Lookup::Flight(f) => Source::Flight(f),
            };
            blob_response(cache, Some(source), &digest, size, range, false)
        }
        Target::Base => Ok(json_response(StatusCode::OK, "{}")),
    }
}

fn json_response(status: StatusCode, body: &'static str) -> Response {
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

fn hv(s: &str) -> HeaderValue {
    // Everything passed here is a digest, a number or a media type that
    // came through a validating parser; a bad one becomes an empty value.
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn manifest_response(doc: &Doc, stale: bool, head: bool) -> Response {
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, hv(&doc.media_type))
        .header(header::CONTENT_LENGTH, doc.bytes.len())
        .header("docker-content-digest", hv(&doc.digest.to_string()))
        .header(header::ETAG, hv(&format!("\"{}\"", doc.digest)));
    if stale {
        b = b.header(header::WARNING, "110 - \"Response is Stale\"");
    }
    let body = if head {
        Body::empty()
    } else {
        Body::from(doc.bytes.clone())
    };
    b.body(body).unwrap_or_else(|_| Response::default())
}

fn blob_response(
    cache: &Cache,
    source: Option<Source>,
    digest: &ember_oci::Digest,
    size: Option<u64>,
    range: Option<route::RangeSpec>,
    head: bool,
) -> Result<Response, CacheError> {
    // A range can only be served once the size is known; without it (an
    // upstream answering without Content-Length) the whole blob is sent.
    let range: Option<ByteRange> = match (range, size) {
        (Some(spec), Some(size)) => Some(spec.resolve(size)?),
        _ => None,
    };
    let mut b = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", hv(&digest.to_string()))
        .header(header::ETAG, hv(&format!("\"{digest}\"")))
        .header(header::ACCEPT_RANGES, "bytes");
    let (start, end) = match (range, size) {
        (Some(r), Some(size)) => {
            b = b
                .status(StatusCode::PARTIAL_CONTENT)
                .header(
                    header::CONTENT_RANGE,
                    hv(&format!("bytes {}-{}/{size}", r.start, r.end - 1)),
                )
                .header(header::CONTENT_LENGTH, r.end - r.start);
            (r.start, Some(r.end))
        }
        _ => {
            b = b.status(StatusCode::OK);
            if let Some(size) = size {
                b = b.header(header::CONTENT_LENGTH, size);
            }
            (0, size)
        }
    };
    let body = match (source, head) {
        (Some(src), false) => {
            Body::from_stream(flight::body(src, start, end, cache.metrics.clone()))
        }
        _ => Body::empty(),
    };
    b.body(body)
        .map_err(|e| CacheError::io("building a response", std::io::Error::other(e)))
}

/// Forwards a blob request to its owner and streams the answer back. Errors
/// (unreachable, 5xx) make the caller serve the request itself.
async fn forward(
    cache: &Cache,
    owner: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Response, String> {
    let pq = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let url = format!("{owner}{pq}");
    let m = reqwest::Method::from_bytes(method.as_str().as_bytes()).map_err(|e| e.to_string())?;
    let mut req = cache.peer_http.request(m, &url).header(FORWARDED, "1");
    for h in [header::RANGE, header::AUTHORIZATION, header::ACCEPT] {
        if let Some(v) = headers.get(&h).and_then(|v| v.to_str().ok()) {
            req = req.header(h.as_str(), v);
        }
    }
    let resp = req.send().await.map_err(|e| crate::upstream::chain(&e))?;
    let status = resp.status().as_u16();
    if status >= 500 {
        return Err(format!("answered {status}"));
    }
    Metrics::add(&cache.metrics.peer_forwards, 1);
    let mut b = Response::builder().status(status);
    for h in [
        "content-type",
        "content-length",
        "content-range",
        "docker-content-digest",
        "accept-ranges",
        "etag",
        "www-authenticate",
    ] {
        if let Some(v) = resp.headers().get(h).and_then(|v| v.to_str().ok()) {
            b = b.header(h, hv(v));
        }
    }
    let metrics = cache.metrics.clone();
    let stream = resp.bytes_stream().map(move |c| {
        c.inspect(|b| Metrics::add(&metrics.served_bytes, b.len() as u64))
            .map_err(std::io::Error::other)
    });
    let body = if *method == Method::HEAD {
        Body::empty()
    } else {
        Body::from_stream(stream)
    };
    b.body(body).map_err(|e| e.to_string())
}

/// The value of `key` in a query string, percent-decoded.
fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len() + 1
            && let Some(h) = s.get(i + 1..i + 3)
            && let Ok(v) = u8::from_str_radix(h, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query() {
        assert_eq!(
            query_param(Some("a=1&ns=docker.io"), "ns").as_deref(),
            Some("docker.io")
        );
        assert_eq!(
            query_param(Some("ns=127.0.0.1%3A5000"), "ns").as_deref(),
            Some("127.0.0.1:5000")
        );
        assert_eq!(query_param(Some("x=1"), "ns"), None);
        assert_eq!(query_param(None, "ns"), None);
    }
}
