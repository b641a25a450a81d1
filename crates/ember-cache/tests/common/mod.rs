//! Shared test support: a cache on a free port, a scriptable fake upstream
//! for faults the real registry cannot produce, and HTTP helpers.
#![allow(dead_code)]
// Test support: a panic is the right answer to any surprise here.
#![allow(clippy::unwrap_used)]

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use ember_cache::{CacheConfig, RunningCache, UpstreamSpec};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber_init();
}

fn tracing_subscriber_init() -> Option<()> {
    None
}

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Deterministic pseudo-random bytes (incompressible, unlike zeros).
pub fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A cache and its temporary directory.
pub struct TestCache {
    pub server: RunningCache,
    pub dir: Option<tempfile::TempDir>,
}

impl TestCache {
    pub fn url(&self) -> String {
        self.server.url()
    }
    pub fn addr(&self) -> String {
        self.server.addr().to_string()
    }
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.server.cache().metrics.render();
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }
    /// Waits (up to 10 s) for a metric to reach `value`, and returns it.
    /// Commits happen just after clients got their last byte.
    pub async fn wait_metric(&self, name: &str, value: u64) -> u64 {
        for _ in 0..1000 {
            if self.metric(name) == value {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.metric(name)
    }
    /// Stops the server and hands back the directory (for restarts).
    pub async fn stop(mut self) -> tempfile::TempDir {
        let dir = self.dir.take().expect("dir");
        self.server.shutdown().await.expect("shutdown");
        dir
    }
}

pub fn config(dir: &std::path::Path, max_bytes: u64, upstreams: &[&str]) -> CacheConfig {
    CacheConfig::new(
        dir.to_path_buf(),
        max_bytes,
        upstreams
            .iter()
            .map(|u| UpstreamSpec::parse(u).expect("upstream"))
            .collect(),
    )
}

pub async fn start_cache_with(cfg: CacheConfig, dir: tempfile::TempDir) -> TestCache {
    init();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let server = ember_cache::spawn(cfg, listener).expect("start cache");
    TestCache {
        server,
        dir: Some(dir),
    }
}

pub async fn start_cache(upstreams: &[&str], max_bytes: u64) -> TestCache {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), max_bytes, upstreams);
    start_cache_with(cfg, dir).await
}

pub fn http() -> reqwest::Client {
    init();
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .expect("client")
}

/// GET and the whole body; `Err` when the body broke off.
pub async fn get(url: &str) -> (StatusCode, HeaderMap, Result<Bytes, String>) {
    get_with(url, &[]).await
}

pub async fn get_with(
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Result<Bytes, String>) {
    let mut req = http().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("send");
    let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
    let mut h = HeaderMap::new();
    for (k, v) in resp.headers() {
        h.insert(
            header::HeaderName::from_bytes(k.as_str().as_bytes()).expect("name"),
            header::HeaderValue::from_bytes(v.as_bytes()).expect("value"),
        );
    }
    let body = resp.bytes().await.map_err(|e| format!("{e:?}"));
    (status, h, body)
}

pub fn oci_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("json error body");
    v["errors"][0]["code"].as_str().expect("code").to_string()
}

// ---------------------------------------------------------------------
// A fake upstream registry whose behaviour each test scripts.
// ---------------------------------------------------------------------

/// How the fake upstream serves a blob.
#[derive(Clone, Debug, Default)]
pub enum Mode {
    /// Correctly.
    #[default]
    Normal,
    /// With one byte flipped in the middle.
    Corrupt,
    /// Sends this many bytes, waits for `release`, then breaks the
    /// connection (the next request is served normally).
    CutAfterOnce(usize),
    /// Answers 500 this many times, then normally.
    Fail500(usize),
    /// Sends this many bytes, then waits for `release` before the rest.
    GateAfter(usize),
}

#[derive(Default)]
pub struct FakeState {
    pub blobs: HashMap<String, (Bytes, Mode)>,
    /// tag or digest → (bytes, media type), per repo-less key.
    pub manifests: HashMap<String, (Bytes, String)>,
    /// Every request: (method, path, Range header, Authorization header).
    pub log: Vec<(String, String, Option<String>, Option<String>)>,
    /// Answer 503 to everything.
    pub down: bool,
    /// Require this basic credential (user, pass) via the bearer flow.
    pub token_auth: Option<(String, String)>,
    /// Sent as every manifest's `Docker-Content-Digest` instead of its
    /// sha256 (a lying or odd upstream).
    pub digest_header: Option<String>,
}

#[derive(Clone)]
pub struct Fake {
    pub state: Arc<Mutex<FakeState>>,
    pub release: Arc<Notify>,
    pub addr: SocketAddr,
    stop: Arc<Notify>,
}

impl Fake {
    pub async fn start() -> Fake {
        init();
        let state = Arc::new(Mutex::new(FakeState::default()));
        let release = Arc::new(Notify::new());
        let stop = Arc::new(Notify::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fake = Fake {
            state,
            release,
            addr,
            stop: stop.clone(),
        };
        let app = axum::Router::new()
            .fallback(fake_handler)
            .with_state(fake.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.notified().await })
                .await
        });
        fake
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn add_blob(&self, bytes: Vec<u8>, mode: Mode) -> String {
        let d = sha256(&bytes);
        self.state
            .lock()
            .unwrap()
            .blobs
            .insert(d.clone(), (Bytes::from(bytes), mode));
        d
    }

    pub fn set_mode(&self, digest: &str, mode: Mode) {
        self.state.lock().unwrap().blobs.get_mut(digest).unwrap().1 = mode;
    }

    /// Adds a manifest under its digest and `tag`; returns the digest.
    pub fn add_manifest(&self, tag: &str, bytes: Vec<u8>, media_type: &str) -> String {
        let d = sha256(&bytes);
        let mut st = self.state.lock().unwrap();
        let v = (Bytes::from(bytes), media_type.to_string());
        st.manifests.insert(d.clone(), v.clone());
        st.manifests.insert(tag.to_string(), v);
        d
    }

    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    pub fn requests(&self, method: &str, fragment: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .log
            .iter()
            .filter(|(m, p, _, _)| m == method && p.contains(fragment))
            .count()
    }

    pub fn log(&self) -> Vec<(String, String, Option<String>, Option<String>)> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn shutdown(&self) {
        self.stop.notify_one();
    }
}

async fn fake_handler(
    State(fake): State<Fake>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path().to_string();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let (down, token_auth) = {
        let mut st = fake.state.lock().unwrap();
        st.log.push((
            method.to_string(),
            path.clone(),
            range.clone(),
            auth.clone(),
        ));
        (st.down, st.token_auth.clone())
    };
    if down {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    // Token service: basic credentials in, bearer token out.
    if path == "/token" {
        let Some((u, p)) = token_auth else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let expected = format!("Basic {}", base64(format!("{u}:{p}").as_bytes()));
        if auth.as_deref() != Some(expected.as_str()) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        return r#"{"token":"good-token"}"#.into_response();
    }
    if token_auth.is_some() && auth.as_deref() != Some("Bearer good-token") {
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(
                header::WWW_AUTHENTICATE,
                format!(
                    "Bearer realm=\"http://{}/token\",service=\"fake\"",
                    fake.addr
                ),
            )
            .body(Body::empty())
            .unwrap();
    }
    if path == "/v2/" {
        return "{}".into_response();
    }
    if let Some(i) = path.find("/manifests/") {
        let key = &path[i + "/manifests/".len()..];
        let (found, digest_header) = {
            let st = fake.state.lock().unwrap();
            (st.manifests.get(key).cloned(), st.digest_header.clone())
        };
        return match found {
            Some((bytes, mt)) => {
                let b = Response::builder()
                    .header(header::CONTENT_TYPE, mt)
                    .header(
                        "docker-content-digest",
                        digest_header.unwrap_or_else(|| sha256(&bytes)),
                    )
                    .header(header::CONTENT_LENGTH, bytes.len());
                if method == Method::HEAD {
                    b.body(Body::empty()).unwrap()
                } else {
                    b.body(Body::from(bytes)).unwrap()
                }
            }
            None => (
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}"#,
            )
                .into_response(),
        };
    }
    if let Some(i) = path.find("/blobs/") {
        let d = &path[i + "/blobs/".len()..];
        let found = fake.state.lock().unwrap().blobs.get(d).cloned();
        let Some((bytes, mode)) = found else {
            return (
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}"#,
            )
                .into_response();
        };
        if method == Method::HEAD {
            return Response::builder()
                .header(header::CONTENT_LENGTH, bytes.len())
                .body(Body::empty())
                .unwrap();
        }
        // One-shot modes revert to normal after use.
        match &mode {
            Mode::CutAfterOnce(_) => fake.set_mode(d, Mode::Normal),
            Mode::Fail500(n) => {
                let next = if *n <= 1 {
                    Mode::Normal
                } else {
                    Mode::Fail500(n - 1)
                };
                fake.set_mode(d, next);
                return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response();
            }
            _ => {}
        }
        let total = bytes.len();
        let start = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|s| *s < total);
        let mut data = bytes.to_vec();
        if matches!(mode, Mode::Corrupt) {
            data[total / 2] ^= 0xff;
        }
        let from = start.unwrap_or(0);
        let body_bytes = Bytes::from(data).slice(from..);
        let mut b = Response::builder().header(header::CONTENT_LENGTH, total - from);
        if let Some(s) = start {
            b = b.status(StatusCode::PARTIAL_CONTENT).header(
                header::CONTENT_RANGE,
                format!("bytes {s}-{}/{total}", total - 1),
            );
        }
        let release = fake.release.clone();
        let stream = async_stream(body_bytes, mode, release);
        return b.body(Body::from_stream(stream)).unwrap();
    }
    StatusCode::NOT_FOUND.into_response()
}

fn async_stream(
    body: Bytes,
    mode: Mode,
    release: Arc<Notify>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let chunk = 64 * 1024;
    futures_util::stream::unfold(
        (body, 0usize, mode, release, false),
        move |(body, pos, mode, release, gated)| async move {
            if pos >= body.len() {
                return None;
            }
            let mut end = (pos + chunk).min(body.len());
            match &mode {
                Mode::CutAfterOnce(n) => {
                    if pos >= *n {
                        release.notified().await;
                        return Some((
                            Err(std::io::Error::other("cut")),
                            (body, usize::MAX, mode, release, gated),
                        ));
                    }
                    end = end.min(*n);
                }
                Mode::GateAfter(n) => {
                    if pos >= *n && !gated {
                        release.notified().await;
                        return Some((Ok(Bytes::new()), (body, pos, mode, release, true)));
                    }
                    if !gated {
                        end = end.min(*n);
                    }
                }
                _ => {}
            }
            let c = body.slice(pos..end);
            Some((Ok(c), (body, end, mode, release, gated)))
        },
    )
}

pub fn base64(input: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A one-layer OCI manifest for a config and layers of the fake upstream.
pub fn manifest(config: &(String, usize), layers: &[(String, usize)]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": layers.iter().map(|(d, s)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s
        })).collect::<Vec<_>>(),
    }))
    .unwrap()
}
